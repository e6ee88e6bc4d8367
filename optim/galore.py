"""GaLore AdamW: Adam on low-rank projections of gradient matrices (Zhao et al., 2024).

Param groups that carry ``rank`` are projected: each 2-D gradient G is mapped to a k-dimensional
subspace (``proj_type`` picks the side), Adam runs there, and the update is mapped back, times
``scale``. The subspace is the gradient's top-k singular subspace, refreshed every
``update_proj_gap`` steps of the matrix (at steps 0, T, 2T, ...). Groups without ``rank`` get plain
AdamW in the same optimizer.

With its defaults this reproduces ``galore_torch.GaLoreAdamW`` (galore-torch 1.0): eps added to
sqrt(v) with the bias correction folded into the step size, eps 1e-6, exact fp32 SVD, moments kept
across refreshes, weight decay applied after the update. Beyond it, as options: a randomized SVD,
a subspace-switch policy, refreshes staggered across matrices, a guard that keeps the old basis
when a refresh cannot be trusted, torch-order weight decay, and 8-bit moments (``state_bits=8``,
``GaLoreAdamW8bit``: the low-rank and dense moments blockwise quantised as in ``moments.py``).
bf16 weights are updated in float32 and rounded stochastically (``rounding.py``); their bases are
kept in bf16, as galore-torch keeps its projector in the weight's dtype. All state is tensors, so
``state_dict()`` loads with ``torch.load(weights_only=True)``.
"""

import math
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from ..errors import UserError
from . import moments, projector
from .adamw import adam_update_
from .moments import CodeTables, check_state_bits
from .projector import PROJ_TYPES, SVD_METHODS
from .rounding import float32_update, needs_rounding, rounding_generator

SWITCH_POLICIES = ("keep", "reset", "rotate")
# galore-torch's projector defaults, for projected groups that name only ``rank``.
PROJECTION_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}


def stagger_offsets(gaps: list[int], stagger: bool | int) -> list[int]:
    """Refresh phase of each projected matrix, given each one's ``update_proj_gap``.

    ``False`` (or 0, 1): every matrix refreshes at 0, T, 2T... ``True``: the phases spread evenly
    over the gap, one matrix after another, so a step pays for about len/T refreshes. ``N``: the
    matrices take turns in N waves, T/N steps apart.
    """
    waves = len(gaps) if stagger is True else int(stagger)
    if waves <= 1:
        return [0] * len(gaps)
    return [(i % waves) * gap // waves for i, gap in enumerate(gaps)]


def check_stagger(stagger: Any, key: str = "stagger") -> bool | int:
    """``stagger`` as a bool or a non-negative int, or a UserError naming ``key``."""
    if isinstance(stagger, bool) or (isinstance(stagger, int) and stagger >= 0):
        return stagger
    raise UserError(f"{key} must be true, false or a number of waves >= 0, got {stagger!r}")


# Elements per slice of a dense update: bounds its sqrt(v) + eps temporary (16 MiB in fp32) instead
# of allocating one as large as the parameter, which would be a step's largest transient when
# parameters are stepped one at a time inside backward.
_DENSE_SLICE = 1 << 22


def _add_adam_update_(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float,
                      alpha: float) -> None:
    """p += alpha * exp_avg / (sqrt(exp_avg_sq) + eps), slice by slice along the first dimension."""
    if p.ndim == 0 or p.numel() <= _DENSE_SLICE:
        p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=alpha)
        return
    rows = max(1, _DENSE_SLICE // (p.numel() // p.shape[0]))
    for start in range(0, p.shape[0], rows):
        end = start + rows
        p[start:end].addcdiv_(exp_avg[start:end], exp_avg_sq[start:end].sqrt().add_(eps), value=alpha)


def _uses_foreach(group: dict[str, Any], params: list[torch.Tensor]) -> bool:
    """The group's ``foreach`` option; None means batched kernels when every parameter is on CUDA."""
    return group["foreach"] if group["foreach"] is not None else all(p.is_cuda for p in params)


class GaLoreAdamW(Optimizer):
    """AdamW whose ``rank`` groups keep their moments in a low-rank gradient subspace.

    Projected groups take ``rank`` and, optionally, ``update_proj_gap`` (200), ``scale`` (1.0),
    ``proj_type`` (std | reverse_std | left | right | full) and ``refresh_offset`` (the matrix's
    refresh phase, overriding ``stagger``). Options beyond galore-torch, all per group except
    ``stagger``: ``svd`` (exact | randomized, with ``oversample`` extra columns, ``power_iters``
    Gram applications and the ``sketch_dtype`` of its large products: auto picks bfloat16 where
    the hardware runs it natively, float64 for float64 gradients), ``switch`` (what the moments do when the subspace changes:
    keep | reset, which zeroes them and restarts bias correction | rotate, which maps them into the
    new basis), ``stagger`` (see ``stagger_offsets``), ``guard`` (keep the old basis when the
    gradient is not finite or the SVD fails), ``decay_before_update`` (torch's decoupled-decay
    order), ``foreach`` (None: batched kernels on CUDA only, as torch.optim decides; without them
    each matrix is stepped to the end before the next is projected; 8-bit moments always step one
    matrix at a time), ``state_bits`` (32 | 8, per group too) and ``seed`` (of the stochastic
    rounding of bf16 weights).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, *, svd: str = "exact", oversample: int = 8, power_iters: int = 1,
                 sketch_dtype: str = "auto", switch: str = "keep", stagger: bool | int = False, guard: bool = True,
                 decay_before_update: bool = False, foreach: bool | None = None, state_bits: int = 32,
                 seed: int = 0):
        if lr < 0.0:
            raise UserError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise UserError(f"Invalid betas: {tuple(betas)} (each must be in [0, 1))")
        if eps < 0.0:
            raise UserError(f"Invalid eps: {eps} (must be >= 0)")
        if weight_decay < 0.0:
            raise UserError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        self.stagger = check_stagger(stagger)
        self.refresh_failures = 0
        self._plan: dict[torch.Tensor, tuple[int, int]] | None = None
        self._ordinals: dict[torch.Tensor, int] | None = None
        self._tables = CodeTables()
        self.rounding_offset = 0  # see rounding.py: set by wrappers that give each parameter its own optimizer
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        svd=svd, oversample=oversample, power_iters=power_iters, sketch_dtype=sketch_dtype,
                        switch=switch, guard=guard, decay_before_update=decay_before_update, foreach=foreach,
                        state_bits=state_bits, seed=seed)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            for key, value in PROJECTION_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        self._plan = None
        self._ordinals = None

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        where = f"param group {index}"
        if group["svd"] not in SVD_METHODS:
            raise UserError(f"{where}: svd={group['svd']!r}; choose one of {', '.join(SVD_METHODS)}")
        if group["switch"] not in SWITCH_POLICIES:
            raise UserError(f"{where}: switch={group['switch']!r}; choose one of {', '.join(SWITCH_POLICIES)}")
        if not (isinstance(group["oversample"], int) and group["oversample"] >= 0):
            raise UserError(f"{where}: oversample must be an int >= 0, got {group['oversample']!r}")
        if not (isinstance(group["power_iters"], int) and group["power_iters"] >= 1):
            raise UserError(f"{where}: power_iters must be an int >= 1, got {group['power_iters']!r}")
        if group["sketch_dtype"] not in ("auto", *projector.SKETCH_DTYPES):
            raise UserError(f"{where}: sketch_dtype={group['sketch_dtype']!r}; choose auto, float32 or bfloat16")
        if group["foreach"] not in (None, True, False):
            raise UserError(f"{where}: foreach must be true, false or None (automatic), got {group['foreach']!r}")
        check_state_bits(group["state_bits"], f"{where}: state_bits")
        if "rank" not in group:
            return
        for key in ("rank", "update_proj_gap"):
            if not (isinstance(group[key], int) and group[key] >= 1):
                raise UserError(f"{where}: {key} must be a positive int, got {group[key]!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise UserError(f"{where}: proj_type={group['proj_type']!r}; choose one of {', '.join(PROJ_TYPES)}")
        offset = group.get("refresh_offset", 0)
        if not (isinstance(offset, int) and offset >= 0):
            raise UserError(f"{where}: refresh_offset must be an int >= 0, got {offset!r}")
        for p in group["params"]:
            if p.ndim != 2:
                raise UserError(f"{where}: GaLore projects 2-D matrices only, got a tensor of shape "
                                f"{tuple(p.shape)}; put it in a group without 'rank' (plain AdamW)")

    def _refresh_plan(self) -> dict[torch.Tensor, tuple[int, int]]:
        """(ordinal, refresh offset) of every projected parameter, in param-group order."""
        if self._plan is None:
            projected = [(p, g) for g in self.param_groups if "rank" in g for p in g["params"]]
            offsets = stagger_offsets([g["update_proj_gap"] for _, g in projected], self.stagger)
            self._plan = {p: (i, g.get("refresh_offset", offset))
                          for i, ((p, g), offset) in enumerate(zip(projected, offsets))}
        return self._plan

    def _ordinal(self, p: torch.Tensor) -> int:
        """``p``'s position among all the parameters: its stream of rounding bits."""
        if self._ordinals is None:
            self._ordinals = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self.rounding_offset + self._ordinals[p]

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        # Counters stay on the CPU as float32 scalars, as torch.optim keeps "step".
        state["step"] = torch.tensor(0.0)
        state["moment_step"] = torch.tensor(0.0)
        local = self._local(p)
        if "rank" in group:
            side = projector.projection_side(group["proj_type"], p.shape)
            shape = self._low_rank_shape(p, side, projector.effective_rank(group["rank"], p.shape))
        else:
            shape = local.shape
        moments.init_moments(state, shape, local.device, moments.moment_dtype(p), group["state_bits"])

    # Where a subclass steps parameters it holds only part of (parallel/sharded_lowrank.py), it
    # overrides these: the tensor this process updates, its low-rank shape, how a basis is found,
    # how a gradient is projected and an update mapped back, and the change of basis.
    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """The part of a parameter or gradient that this process holds and updates."""
        return t

    def _low_rank_shape(self, p: torch.Tensor, side: str, k: int) -> tuple[int, int]:
        """Shape of this process's low-rank gradient and moments of ``p``."""
        return projector.low_rank_shape(side, p.shape, k)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimization step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._refresh_plan()
        for group in self.param_groups:
            # Batched (foreach) kernels take the whole group at once. Otherwise each matrix is
            # finished before the next is projected, so its low-rank temporaries come back from the
            # allocator's cache instead of the group's all being fresh pages every step (on 130m
            # blocks on the CPU, page faults on those cost about 8% of the step).
            batched = _uses_foreach(group, group["params"]) and group["state_bits"] == 32
            params, lows, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                if "rank" in group:
                    low = self._project(p, state, group, *plan[p])
                    if low is None:  # no basis yet: the guard skips this matrix's step
                        continue
                else:
                    low = self._local(p.grad)
                params.append(p)
                lows.append(low)
                states.append(state)
                if not batched:
                    self._step_matrices(group, params, lows, states)
                    params, lows, states = [], [], []
            if params:
                self._step_matrices(group, params, lows, states)
        return loss

    def _step_matrices(self, group: dict[str, Any], params: list[torch.Tensor], lows: list[torch.Tensor],
                       states: list[dict[str, Any]]) -> None:
        """Precondition (projected groups), then Adam and the update, for some of a group's parameters."""
        if "rank" in group:
            lows = self._precondition(group, params, states, lows)
        self._update(group, params, lows, states)

    def _project(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], ordinal: int,
                 offset: int) -> torch.Tensor | None:
        """The low-rank gradient of ``p``, refreshing its basis first when due."""
        side = projector.projection_side(group["proj_type"], p.shape)
        step = int(state["step"])
        has_basis = "proj_left" in state or "proj_right" in state
        if not has_basis or (step - offset) % group["update_proj_gap"] == 0:
            self._refresh(p, state, group, side, ordinal, step)
            has_basis = "proj_left" in state or "proj_right" in state
        if not has_basis:
            return None
        return self._project_gradient(p, side, state)

    def _project_gradient(self, p: torch.Tensor, side: str, state: dict[str, Any]) -> torch.Tensor:
        return projector.project(p.grad, side, state.get("proj_left"), state.get("proj_right"))

    def _add_projected_back(self, p: torch.Tensor, target: torch.Tensor, update: torch.Tensor, side: str,
                            state: dict[str, Any], alpha: float) -> None:
        """target (``p`` or the part of it this process holds) += alpha * ``update`` mapped back."""
        projector.add_projected_back_(target, update, side, state.get("proj_left"), state.get("proj_right"), alpha)

    def _change_of_basis(self, p: torch.Tensor, side: str, old: tuple[torch.Tensor | None, torch.Tensor | None],
                         state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(R_left, R_right) from the ``old`` bases to the state's new ones (``projector.change_of_basis``)."""
        return projector.change_of_basis(side, *old, state.get("proj_left"), state.get("proj_right"))

    def _refresh(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], side: str, ordinal: int,
                 step: int) -> None:
        """Recompute the basis from the current gradient and apply the switch policy to the moments."""
        basis = self._new_basis(p, projector.effective_rank(group["rank"], p.shape), side, group, ordinal, step,
                                state)
        if basis is None:
            self.refresh_failures += 1
            warnings.warn("GaLore kept the previous subspace of a matrix: its gradient was not finite or its "
                          "SVD failed", RuntimeWarning, stacklevel=3)
            return
        left, right = basis
        old_left, old_right = state.get("proj_left"), state.get("proj_right")
        # Copies: an SVD's leading vectors are views into its full factors.
        if left is not None:
            state["proj_left"] = left.to(dtype=p.dtype, copy=True, memory_format=torch.contiguous_format)
        if right is not None:
            state["proj_right"] = right.to(dtype=p.dtype, copy=True, memory_format=torch.contiguous_format)
        if old_left is None and old_right is None:
            return
        policy = group["switch"]
        r_left = r_right = None
        if policy == "reset":
            moments.zero(state)
            state["moment_step"].zero_()
        elif policy == "rotate":
            r_left, r_right = self._change_of_basis(p, side, (old_left, old_right), state)
            # Second moments as the variances of independent coordinates seen through the rotation.
            squares = [None if r is None else r.square() for r in (r_left, r_right)]
            if moments.is_quantized(state):
                changes = {"exp_avg": (r_left, r_right), "exp_avg_sq": squares}
                moments.transform(state, self._tables,
                                  lambda name, x: projector.apply_change(x, *[None if r is None else r.to(x.dtype)
                                                                              for r in changes[name]]),
                                  group["state_bits"])
            else:
                state["exp_avg"].copy_(projector.apply_change(state["exp_avg"], r_left, r_right))
                state["exp_avg_sq"].copy_(projector.apply_change(state["exp_avg_sq"], *squares))
        self._on_subspace_change(state, policy, r_left, r_right)

    def _new_basis(self, p: torch.Tensor, k: int, side: str, group: dict[str, Any], ordinal: int, step: int,
                   state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """The new basis; with the guard, None when the gradient is not finite or the SVD fails or returns NaN."""
        grad = p.grad
        if not group["guard"]:
            return self._basis(grad, k, side, group, ordinal, step, state)
        if not torch.isfinite(grad).all():
            return None
        try:
            basis = self._basis(grad, k, side, group, ordinal, step, state)
        except torch.linalg.LinAlgError:
            return None
        if any(b is not None and not torch.isfinite(b).all() for b in basis):
            return None
        return basis

    def _basis(self, grad: torch.Tensor, k: int, side: str, group: dict[str, Any], ordinal: int, step: int,
               state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if group["svd"] == "exact":
            return projector.exact_basis(grad, k, side)
        generator = torch.Generator(device=grad.device)
        # Seeded by matrix and step, so a resumed run draws the same test matrices.
        generator.manual_seed((ordinal + 1) * 1_000_003 + step)
        left, right = projector.randomized_basis(grad, k, side, group["oversample"], group["power_iters"], generator,
                                                 projector.sketch_dtype_for(group["sketch_dtype"], grad))
        if "proj_left" in state and left is not None:
            left = projector.align_signs(left, state["proj_left"].to(left.dtype), vectors_dim=1)
        if "proj_right" in state and right is not None:
            right = projector.align_signs(right, state["proj_right"].to(right.dtype), vectors_dim=0)
        return left, right

    def _on_subspace_change(self, state: dict[str, Any], policy: str, r_left: torch.Tensor | None,
                            r_right: torch.Tensor | None) -> None:
        """Subclasses move any other low-rank state into the new basis here."""

    def _precondition(self, group: dict[str, Any], params: list[torch.Tensor], states: list[dict[str, Any]],
                      lows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Subclasses transform the low-rank gradients before Adam here."""
        return lows

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], lows: list[torch.Tensor],
                states: list[dict[str, Any]]) -> None:
        """Adam on the (projected) gradients, then the update mapped back onto the parameters."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for state in states:
            state["step"] += 1
            state["moment_step"] += 1
        projected = "rank" in group
        # Moments are float32 for bf16 weights: their (bf16) gradients join them in float32.
        lows = [low.to(moments.moment_dtype(p)) for p, low in zip(params, lows)]
        # Dense tensors with 8-bit moments or bf16 weights step range by range (``adam_update_``).
        ranged = [not projected and (moments.is_quantized(s) or needs_rounding(self._local(p)))
                  for p, s in zip(params, states)]
        # galore-torch's Adam (eps added to sqrt(v), bias correction folded into the step size), with
        # the first moment as a lerp (one pass instead of two). torch's foreach kernels batch these
        # on CUDA; on the CPU they fall back to a loop about twice as slow as this one.
        foreach = _uses_foreach(group, params) and not any(ranged) and not any(map(moments.is_quantized, states))
        updates: list[torch.Tensor | None] = [None] * len(params)
        if foreach:
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(exp_avgs, lows, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, lows, lows, value=1.0 - beta2)
            if projected:  # the low-rank m / (sqrt(v) + eps), to map back
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_add_(denoms, group["eps"])
                updates = list(torch._foreach_div(exp_avgs, denoms))
                del denoms
        else:
            for i, (low, state) in enumerate(zip(lows, states)):
                if ranged[i]:
                    continue
                # The state's float32 moments, or 8-bit ones dequantised (and requantised after).
                exp_avg, exp_avg_sq = moments.read(state, self._tables)
                exp_avg.lerp_(low, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
                if projected:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                    updates[i] = torch.div(exp_avg, denom, out=denom)  # into the same buffer
                moments.write(state, self._tables, exp_avg, exp_avg_sq)
        for i, (p, state) in enumerate(zip(params, states)):
            target = self._local(p)
            step_size = lr
            if group["correct_bias"]:
                t = state["moment_step"].item()
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
            step = int(state["step"])
            if ranged[i]:
                generator = (rounding_generator(target.device, group["seed"], self._ordinal(p), step)
                             if needs_rounding(target) else None)
                adam_update_(target, lows[i], state, self._tables, beta1=beta1, beta2=beta2, eps=group["eps"],
                             step_size=step_size, bias_correction2_sqrt=None, decay=lr * wd,
                             decay_before=group["decay_before_update"], generator=generator)
                continue
            with float32_update(target, group["seed"], self._ordinal(p), step) as work:
                if wd > 0.0 and group["decay_before_update"]:
                    work.mul_(1.0 - lr * wd)
                if projected:
                    side = projector.projection_side(group["proj_type"], p.shape)
                    self._add_projected_back(p, work, updates[i], side, state, alpha=-step_size * group["scale"])
                else:
                    _add_adam_update_(work, state["exp_avg"], state["exp_avg_sq"], group["eps"], -step_size)
                if wd > 0.0 and not group["decay_before_update"]:
                    work.add_(work, alpha=-lr * wd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        moments.restore_saved_dtypes(self, state_dict)
        # torch.optim casts every floating-point state tensor but "step" to its parameter's dtype and
        # device; the bias-correction counter must stay an exact CPU scalar, so restore it as saved.
        saved = state_dict["state"]
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid in saved and "moment_step" in saved[pid]:
                self.state[p]["moment_step"] = saved[pid]["moment_step"].detach().to("cpu", torch.float32, copy=True)
        self._plan = None
        self._ordinals = None


class GaLoreAdamW8bit(GaLoreAdamW):
    """``GaLoreAdamW`` with ``state_bits=8``: low-rank and dense moments blockwise 8-bit (galore-torch's 8-bit variant).

    galore-torch builds its ``GaLoreAdamW8bit`` on bitsandbytes' 8-bit Adam; this one quantises
    with the same map and block size in plain torch (``quantize.py``), on the CPU or CUDA.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, *, state_bits: int = 8, **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, state_bits=state_bits, **options)
