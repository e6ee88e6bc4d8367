"""The divergence guard: optimizer steps with a non-finite gradient norm are skipped and counted.

The gradient norm is the one test every rank agrees on without another collective: each backend
computes it over all ranks' gradients (DDP after its all-reduce, FSDP2 from every shard, DeepSpeed
in its own overflow check), and a non-finite loss on any rank makes the gradients non-finite. The
engine skips the update of such a step (see ``DataParallelEngine.step``); the guard counts it and,
after ``trainer.max_bad_steps`` in a row, stops the run before any checkpoint of it is written.
"""

import math

from ..errors import UserError


class DivergenceError(UserError):
    """The run diverged: too many optimizer steps in a row had a non-finite gradient norm."""


class DivergenceGuard:
    """Counts the current streak of bad steps; ``stop_if_diverged`` raises at ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.streak = 0

    def check(self, grad_norm: float) -> bool:
        """True if the step was good, False if it was skipped (a non-finite gradient norm)."""
        self.streak = 0 if math.isfinite(grad_norm) else self.streak + 1
        return self.streak == 0

    def stop_if_diverged(self, step: int) -> None:
        """DivergenceError if ``step`` ends ``max_bad_steps`` bad steps in a row."""
        if self.streak >= self.max_bad_steps:
            raise DivergenceError(
                f"training diverged: steps {step - self.streak + 1} to {step} had a non-finite loss or gradient "
                f"norm ({self.streak} in a row, trainer.max_bad_steps={self.max_bad_steps}); nothing of them was "
                "saved. Resume from the newest checkpoint with a lower optim.lr, or raise trainer.max_bad_steps"
            )
