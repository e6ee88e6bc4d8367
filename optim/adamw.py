"""AdamW with 8-bit moments and bf16 weights: ``AdamW`` and ``AdamW8bit``.

The same algorithm and hyper-parameters as ``torch.optim.AdamW`` (decoupled weight decay, bias
correction, eps added to sqrt(v / bc2)), with float32 parameters and ``state_bits=32`` it matches
torch's single-tensor path bit for bit. Beyond it: ``state_bits=8`` keeps both moments in blockwise
dynamic 8-bit form (``quantize.py``; bitsandbytes' ``AdamW8bit`` algorithm: dequantise, update in
float32, requantise), and bf16 parameters are updated in float32 and written back with stochastic
rounding (``rounding.py``). Large tensors are updated a range at a time, so the step's temporaries
stay below a few ``CHUNK_NUMEL`` elements whatever the tensor's size. The state is plain tensors:
``state_dict()`` loads with ``torch.load(weights_only=True)``.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..errors import UserError
from . import moments
from .moments import CodeTables, check_state_bits
from .rounding import needs_rounding, rounding_generator, stochastic_round_


def adam_update_(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], tables: CodeTables, *,
                 beta1: float, beta2: float, eps: float, step_size: float, bias_correction2_sqrt: float | None,
                 decay: float, decay_before: bool, generator: torch.Generator | None) -> None:
    """One Adam step of a whole tensor ``p`` whose moments are in ``state`` (float32 or 8-bit), range by range.

    p += -step_size * m / denom, with denom = sqrt(v) / bias_correction2_sqrt + eps (torch's form)
    or, when ``bias_correction2_sqrt`` is None, sqrt(v) + eps (galore-torch's, the correction folded
    into ``step_size``). ``decay`` = lr * weight_decay is applied before the update (torch's order,
    p *= 1 - decay) or after it (p -= decay * p). bf16 ``p`` is updated in float32 and rounded with
    ``generator``.
    """
    rounding = needs_rounding(p)
    contiguous = p if p.is_contiguous() else p.contiguous()
    flat_p, flat_grad = contiguous.view(-1), grad.reshape(-1)
    for start, stop in moments.chunks(p.numel()):
        g = flat_grad[start:stop]
        exp_avg, exp_avg_sq = moments.read(state, tables, start, stop)
        if g.dtype != exp_avg.dtype:
            g = g.to(exp_avg.dtype)
        work = flat_p[start:stop].float() if rounding else flat_p[start:stop]
        if decay != 0.0 and decay_before:
            work.mul_(1.0 - decay)
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if bias_correction2_sqrt is None:
            denom = exp_avg_sq.sqrt().add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        work.addcdiv_(exp_avg, denom, value=-step_size)
        del denom
        if decay != 0.0 and not decay_before:
            work.add_(work, alpha=-decay)
        moments.write(state, tables, exp_avg, exp_avg_sq, start, stop)
        if rounding:
            stochastic_round_(flat_p[start:stop], work, generator)
    if contiguous is not p:
        p.copy_(contiguous)


class AdamW(Optimizer):
    """``torch.optim.AdamW`` with 8-bit moments (``state_bits=8``) and stochastic rounding of bf16 weights.

    Args are torch's (``lr``, ``betas``, ``eps``, ``weight_decay`` 1e-2, ``maximize``) plus
    ``state_bits`` (32 | 8; tensors below 4096 elements keep float32 moments) and ``seed`` (of the
    stochastic rounding of bf16 weights). ``amsgrad`` is not supported.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, state_bits: int = 32, seed: int = 0):
        if not 0.0 <= lr:
            raise UserError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise UserError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise UserError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise UserError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise UserError(f"Invalid weight_decay value: {weight_decay}")
        if amsgrad:
            raise UserError("leantrain's AdamW does not implement amsgrad; use torch.optim.AdamW for it")
        check_state_bits(state_bits)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        state_bits=state_bits, seed=seed)
        super().__init__(params, defaults)
        self._tables = CodeTables()
        self._ordinals: dict[torch.Tensor, int] | None = None
        self.rounding_offset = 0  # see rounding.py: set by wrappers that give each parameter its own optimizer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_state_bits(self.param_groups[-1]["state_bits"], f"param group {len(self.param_groups) - 1}: state_bits")
        self._ordinals = None

    def _ordinal(self, p: torch.Tensor) -> int:
        if self._ordinals is None:
            self._ordinals = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self.rounding_offset + self._ordinals[p]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # a CPU float32 scalar, as torch.optim keeps it
                    moments.init_moments(state, p.shape, p.device, moments.moment_dtype(p), group["state_bits"])
                state["step"] += 1
                step = int(state["step"])
                grad = -p.grad if group["maximize"] else p.grad
                generator = (rounding_generator(p.device, group["seed"], self._ordinal(p), step)
                             if needs_rounding(p) else None)
                adam_update_(p, grad, state, self._tables, beta1=beta1, beta2=beta2, eps=group["eps"],
                             step_size=group["lr"] / (1.0 - beta1**step),
                             bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
                             decay=group["lr"] * group["weight_decay"], decay_before=True, generator=generator)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        moments.restore_saved_dtypes(self, state_dict)
        self._ordinals = None


class AdamW8bit(AdamW):
    """``AdamW`` with ``state_bits=8``: both moments blockwise 8-bit (bitsandbytes' ``AdamW8bit`` algorithm)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, state_bits: int = 8, seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, state_bits=state_bits,
                         seed=seed)
