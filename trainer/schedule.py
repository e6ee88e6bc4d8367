"""Learning-rate schedules as multipliers of the peak LR, for ``torch.optim.lr_scheduler.LambdaLR``."""

import math
from collections.abc import Callable

import torch

from ..optim.config import OptimConfig

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR at ``step`` (0-based optimizer steps) as a fraction of ``optim.lr``.

    cosine: linear warmup, then cosine from 1 down to ``min_lr_ratio`` at ``max_steps``.
    wsd: linear warmup, constant, then a linear decay to ``min_lr_ratio`` over the last
    ``decay_fraction`` of the run (warmup-stable-decay).
    constant: linear warmup, then 1.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (its step counter) checkpoints as plain numbers."""
    multiplier: Callable[[int], float] = lambda step: lr_multiplier(step, cfg, max_steps)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
