"""Natural GaLore: GaLore with the low-rank gradient preconditioned by an inverse empirical Fisher.

Each projected matrix keeps its last s low-rank gradients as the rows of H (s x d, d the low-rank
gradient's size). The current low-rank gradient g is appended, then replaced by the natural
gradient (lambda I + H^T H)^-1 g, computed with the Woodbury identity through an s x s Cholesky
solve instead of a d x d one. Adam then runs on the natural gradient, and the update is projected
back as in GaLore (Das, 2024).

The authors' code (selfsupervised-ai/Natural-GaLore) uses s = 20 and lambda = 1e-3; the Fisher is
the plain sum over the history (no 1/s), with the current gradient included, as there.

Memory trade-off: the history costs s times the low-rank gradient per matrix, on top of GaLore's two
moments and basis, so at s = 20 a matrix holds 22 low-rank copies. The default ``history=0`` picks,
per matrix, the largest s up to 20 whose whole state (moments, history, basis) stays below AdamW's
two full-size moments: for a d x d matrix s < 2 d / rank - 3, so s = 4 at rank d/4 and 12 at
rank d/8, and 0 -- plain GaLore -- where the rank is too large for any history to fit. A larger s
estimates the Fisher from more steps (the paper's gains are at s = 20) and costs two passes over
s x d floats per step; pass ``history`` to choose it yourself.

With ``state_bits=8`` only Adam's two moments are quantised; the history stays in the weight's
dtype (it is the Fisher's data, summed in a Gram matrix, not a running average).
"""

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import UserError
from . import moments, projector
from .galore import GaLoreAdamW

MAX_HISTORY = 20  # the authors' s


def woodbury_natural_gradient(history: torch.Tensor, row: int, damping: float, gram: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lambda I + H^T H)^-1 h with h = H[row], flattened; also the s x s system and its Cholesky info.

    Woodbury turns the d x d inverse into an s x s one. Because h is itself a row of H (h = H^T e),
    the push-through form (lambda I + H^T H)^-1 H^T e = H^T (lambda I + H H^T)^-1 e applies: it
    skips the subtraction (h - H^T c) / lambda of the textbook form, whose terms are about
    |h|^2 / lambda times larger than the result and would cancel away float32's digits. The system is
    solved in float64; a nonzero info means rounding broke its positive definiteness (see
    ``damped_solve_fallback``). Rows of zeros (an unfilled history) add nothing to the Fisher.
    ``gram`` is H H^T when it is known already (summed over the shards of a sharded history).
    """
    if gram is None:
        gram = history @ history.T
    size = gram.shape[0]
    system = gram.double() + damping * torch.eye(size, dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(system)
    unit = torch.zeros(size, 1, dtype=torch.float64, device=gram.device)
    unit[row] = 1.0
    coef = torch.cholesky_solve(unit, chol).squeeze(1)
    return history.T @ coef.to(history.dtype), system, info


def damped_solve_fallback(history: torch.Tensor, row: int, system: torch.Tensor, damping: float) -> torch.Tensor:
    """The same natural gradient through an eigendecomposition, with eigenvalues floored at the damping."""
    evals, evecs = torch.linalg.eigh(system)
    coef = evecs @ (evecs[row] / evals.clamp(min=damping))
    return history.T @ coef.to(history.dtype)


def auto_history(shape: torch.Size, side: str, k: int) -> int:
    """Largest s <= 20 whose state on an m x n matrix (2 moments, s history rows, basis) is below 2 m n."""
    m, n = shape
    low = {"left": k * n, "right": m * k, "full": k * k}[side]
    basis = {"left": m * k, "right": k * n, "full": m * k + k * n}[side]
    fits = (2 * m * n - basis - 1) // low - 2
    return max(0, min(MAX_HISTORY, fits))


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose low-rank gradients are preconditioned by the inverse empirical Fisher.

    Takes GaLoreAdamW's arguments plus ``history`` (s; 0 picks it per matrix, see the module
    docstring) and ``damping`` (lambda), both overridable per group. When a matrix's subspace
    changes its history is rotated into the new basis with ``switch="rotate"`` and cleared otherwise.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, *, history: int = 0, damping: float = 1e-3, **galore_options: Any):
        # Set before GaLoreAdamW.__init__, whose add_param_group calls read them.
        self._natural_defaults = {"history": history, "damping": damping}
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, **galore_options)
        self.defaults.update(self._natural_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._natural_defaults.items():
            param_group.setdefault(key, value)
        index = len(self.param_groups)
        if not (isinstance(param_group["history"], int) and param_group["history"] >= 0):
            raise UserError(f"param group {index}: history must be an int >= 0, got {param_group['history']!r}")
        if not param_group["damping"] > 0.0:
            raise UserError(f"param group {index}: damping must be > 0, got {param_group['damping']!r}")
        super().add_param_group(param_group)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)
        if "rank" not in group:
            return
        side = projector.projection_side(group["proj_type"], p.shape)
        k = projector.effective_rank(group["rank"], p.shape)
        size = group["history"] or auto_history(p.shape, side, k)
        if size > 0:
            shape = moments.moment_shape(state)
            state["history"] = torch.zeros(size, math.prod(shape), dtype=p.dtype, device=self._local(p).device)

    def _fisher_gram(self, p: torch.Tensor, group: dict[str, Any], history: torch.Tensor) -> torch.Tensor:
        """H H^T of ``p``'s history (a subclass holding part of each row sums it over the parts)."""
        return history @ history.T

    def _precondition(self, group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, Any]],
                      lows: list[torch.Tensor]) -> list[torch.Tensor]:
        damping = group["damping"]
        out, pending = [], []
        for p, state, low in zip(params, states, lows):
            if "history" not in state:
                out.append(low)
                continue
            history = state["history"]
            row = int(state["step"]) % history.shape[0]
            history[row].copy_(low.reshape(-1))
            gram = self._fisher_gram(p, group, history)
            natural, system, info = woodbury_natural_gradient(history, row, damping, gram)
            out.append(natural.view_as(low))
            pending.append((len(out) - 1, history, row, system, info))
        # One host sync per group to catch the rare Cholesky failure, instead of one per matrix.
        if pending and bool(torch.stack([info for *_, info in pending]).any()):
            for i, history, row, system, info in pending:
                if info.item() != 0:
                    out[i] = damped_solve_fallback(history, row, system, damping).view_as(lows[i])
        return out

    def _on_subspace_change(self, state: dict[str, Any], policy: str, r_left: torch.Tensor | None,
                            r_right: torch.Tensor | None) -> None:
        if "history" not in state:
            return
        history = state["history"]
        if policy == "rotate":
            rows = history.view(history.shape[0], *moments.moment_shape(state))
            history.copy_(projector.apply_change(rows, r_left, r_right).reshape(history.shape))
        else:
            history.zero_()

