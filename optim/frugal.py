"""FRUGAL: full-rank updates with gradient splitting (Zmushko et al., 2024).

The gradient of every parameter in a *projectable* group is split in two. Its part in a
low-dimensional subspace is updated by AdamW, whose moments live only in that subspace; the residual
is updated by a state-free rule (signSGD by default). Every ``update_gap`` steps the subspace is chosen
again and, by default, the moments restart. Parameters in other groups get plain AdamW.

Subspaces (``selection``), for a weight of shape (m, n) and ``density`` rho:
  block    whole tensors: round(rho * #tensors) of the group's tensors are state-full (BAdam-like);
           ``block_order`` random | ascending | descending walks through them.
  columns  rho * n random columns;  rows: rho * m random rows;  randk: rho * m * n random entries.
  svd      the top singular vectors of the gradient on the shorter side (GaLore's projector).
  random   a random orthonormal basis of the same size as svd.

Random choices come from a generator seeded with (seed, subspace index, parameter position), so every
data-parallel rank draws the same subspace without communicating, and a resumed run draws what the
uninterrupted run would have. ``svd`` is computed from the gradient after data-parallel reduction,
which is the same on every rank.

With ``state_bits=8`` the AdamW moments (of the subspace, of active blocks, of the dense groups) are
blockwise 8-bit (``moments.py``). bf16 weights take each step's whole update (decay, state-full
and state-free parts) in float32 and are rounded stochastically once (``rounding.py``).
"""

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import UserError
from . import moments
from .adamw import adam_update_
from .groups import zero_step
from .moments import CodeTables, check_state_bits
from .pickling import whole_state
from .projector import add_projected_back_, exact_basis, project, projection_side
from .rounding import float32_update, needs_rounding, rounding_generator

SELECTIONS = ("block", "columns", "rows", "randk", "svd", "random")
BLOCK_ORDERS = ("random", "ascending", "descending")
STATE_FREE_RULES = ("signsgd", "sgd", "none")
_COORDINATE_SELECTIONS = ("columns", "rows", "randk")


def subspace_size(total: int, density: float) -> int:
    """How many of ``total`` directions (columns, rows, entries, tensors) are state-full.

    At least one as soon as the density is positive, so a small tensor never silently loses its
    state-full part.
    """
    if density <= 0.0:
        return 0
    return min(total, max(1, round(density * total)))


def selection_generator(seed: int, subspace_index: int, position: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments: identical on every rank and after a resume."""
    mixed = ((seed * 1_000_003 + subspace_index) * 1_000_033 + position) % (2**63)
    return torch.Generator().manual_seed(mixed)


class FRUGAL(Optimizer):
    """AdamW in a low-dimensional subspace of each projectable weight plus a state-free rule elsewhere.

    Mark the param groups to split with ``"projectable": True`` (the weights of the linear layers);
    the other groups (embeddings, norms, the output head) get plain AdamW. Every FRUGAL option below
    can also be set per group. The state is plain tensors and integers, so ``state_dict()`` loads with
    ``torch.load(weights_only=True)``.

    Args:
        density: fraction of each weight (or of the group's tensors, for ``block``) that is state-full.
        update_gap: steps between subspace changes.
        selection: block | columns | rows | randk | svd | random.
        block_order: random | ascending | descending (``block`` only).
        state_free: signsgd | sgd | none, the rule for the residual (``none`` is GaLore-like).
        reset_statistics: restart the AdamW moments and step count when the subspace changes. When off,
            coordinate selections keep the moments of the coordinates that stay selected, ``block``
            keeps those of tensors that stay active, ``svd``/``random`` keep them as they are (GaLore).
        state_full_lr_scale: learning-rate scale of the state-full (AdamW) part of projectable weights.
        inactive_lr_scale: learning-rate scale of the state-free part.
        seed: seed of every random subspace choice and of the stochastic rounding of bf16 weights.
        state_bits: 32 | 8, the AdamW moments' precision (tensors below 4096 elements stay float32).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        density: float = 0.25,
        update_gap: int = 200,
        selection: str = "block",
        block_order: str = "descending",
        state_free: str = "signsgd",
        reset_statistics: bool = True,
        state_full_lr_scale: float = 1.0,
        inactive_lr_scale: float = 1.0,
        seed: int = 0,
        state_bits: int = 32,
    ):
        self._tables = CodeTables()
        self.rounding_offset = 0  # see rounding.py: set by wrappers that give each parameter its own optimizer
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, projectable=False,
            density=density, update_gap=update_gap, selection=selection, block_order=block_order,
            state_free=state_free, reset_statistics=reset_statistics,
            state_full_lr_scale=state_full_lr_scale, inactive_lr_scale=inactive_lr_scale, seed=seed,
            state_bits=state_bits,
        )
        super().__init__(params, defaults)
        if not any(group["projectable"] for group in self.param_groups):
            warnings.warn("FRUGAL: no param group is marked 'projectable': True, so every parameter gets plain AdamW",
                          stacklevel=2)

    def __getstate__(self) -> dict[str, Any]:
        return whole_state(self)  # torch's keeps neither the code tables nor the rounding offset

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        group.setdefault("steps_done", 0)
        group.setdefault("subspace_index", -1)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        position = 0
        for group in self.param_groups:
            first_position = position
            position += len(group["params"])
            if not group["projectable"]:
                for offset, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._adamw_update(p, group, lr=group["lr"], position=first_position + offset)
            elif group["selection"] == "block":
                self._block_step(group, first_position)
            else:
                for offset, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._split_step(p, group, first_position + offset)
            group["steps_done"] += 1
        return loss

    def prepare_load(self, step: int) -> None:
        """Give this fresh optimizer the state keys a run has after ``step`` steps (which blocks hold moments).

        Replays step ``step`` on zero gradients at learning rate 0 (see ``groups.zero_step``), so that a
        template state dict for torch.distributed.checkpoint holds the keys the saved state has.
        """
        if step < 1:
            return
        for group in self.param_groups:
            group["steps_done"] = step - 1
        zero_step(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; subspace indices keep their integer dtype.

        ``Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, which would turn
        the index tensors into floats, so they are set aside and put back.
        """
        super().load_state_dict(state_dict)
        moments.restore_saved_dtypes(self, state_dict)

    # --- one parameter's update -------------------------------------------------------------------

    def _adamw_update(self, p: Tensor, group: dict[str, Any], lr: float, position: int) -> None:
        """Plain AdamW on the whole tensor (non-projectable parameters and active blocks)."""
        state = self.state[p]
        if "step" not in state:
            _fresh_moments(state, p, group["state_bits"])
        if not (moments.is_quantized(state) or needs_rounding(p)):
            if group["weight_decay"] != 0.0:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            direction, step_size = _adam_direction(p.grad, state, group, self._tables)
            p.add_(direction, alpha=-lr * step_size)
            return
        # 8-bit moments or bf16 weights: range by range, with torch's AdamW arithmetic.
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = int(state["step"])
        ordinal = self.rounding_offset + position
        generator = (rounding_generator(p.device, group["seed"], ordinal, group["steps_done"])
                     if needs_rounding(p) else None)
        adam_update_(p, p.grad, state, self._tables, beta1=beta1, beta2=beta2, eps=group["eps"],
                     step_size=lr / (1.0 - beta1**step), bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
                     decay=group["lr"] * group["weight_decay"], decay_before=True, generator=generator)

    def _block_step(self, group: dict[str, Any], first_position: int) -> None:
        """BAdam-like split: whole tensors are either state-full (AdamW) or state-free."""
        params = group["params"]
        subspace_index = group["steps_done"] // group["update_gap"]
        active = _active_blocks(group, subspace_index, first_position)
        if group["subspace_index"] != subspace_index:
            previous = (_active_blocks(group, group["subspace_index"], first_position)
                        if group["subspace_index"] >= 0 else set())
            for i, p in enumerate(params):
                keep = i in active and i in previous and not group["reset_statistics"]
                if not keep:
                    # Frees the moments of deactivated tensors; active ones restart lazily.
                    self.state.pop(p, None)
            group["subspace_index"] = subspace_index
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if i in active:
                self._adamw_update(p, group, lr=group["lr"] * group["state_full_lr_scale"],
                                   position=first_position + i)
                continue
            ordinal = self.rounding_offset + first_position + i
            with float32_update(p, group["seed"], ordinal, group["steps_done"]) as work:
                if group["weight_decay"] != 0.0:
                    work.mul_(1.0 - group["lr"] * group["weight_decay"])
                _state_free_update(work, p.grad, group)

    def _split_step(self, p: Tensor, group: dict[str, Any], position: int) -> None:
        """Columns, rows, randk, svd or random split of one 2-D weight."""
        grad = p.grad
        state = self.state[p]
        subspace_index = group["steps_done"] // group["update_gap"]
        if state.get("subspace_index") != subspace_index:
            _select_subspace(p, grad, state, group, subspace_index, position, self._tables)
        selection = group["selection"]
        with float32_update(p, group["seed"], self.rounding_offset + position, group["steps_done"]) as work:
            if group["weight_decay"] != 0.0:
                work.mul_(1.0 - group["lr"] * group["weight_decay"])
            low = _project(grad, state, selection)
            direction, step_size = _adam_direction(low, state, group, self._tables)
            _add_lifted(work, direction, state, selection,
                        alpha=-group["lr"] * group["state_full_lr_scale"] * step_size)
            # A subspace that covers the whole weight leaves no residual (only rounding noise to take the sign of).
            if group["state_free"] != "none" and low.numel() < p.numel():
                residual = grad - _lift(low, state, selection, grad.shape)
                _state_free_update(work, residual, group)


# --- validation ---------------------------------------------------------------------------------------


def _validate_group(group: dict[str, Any]) -> None:
    check_state_bits(group["state_bits"], "FRUGAL state_bits")
    if not 0.0 <= group["density"] <= 1.0:
        raise UserError(f"FRUGAL density must be in [0, 1], got {group['density']}")
    if not isinstance(group["update_gap"], int) or group["update_gap"] < 1:
        raise UserError(f"FRUGAL update_gap must be a positive integer, got {group['update_gap']!r}")
    if group["selection"] not in SELECTIONS:
        raise UserError(f"FRUGAL selection: unknown {group['selection']!r}; choose one of {', '.join(SELECTIONS)}")
    if group["block_order"] not in BLOCK_ORDERS:
        raise UserError(f"FRUGAL block_order: unknown {group['block_order']!r}; "
                        f"choose one of {', '.join(BLOCK_ORDERS)}")
    if group["state_free"] not in STATE_FREE_RULES:
        raise UserError(f"FRUGAL state_free: unknown {group['state_free']!r}; "
                        f"choose one of {', '.join(STATE_FREE_RULES)}")
    if group["lr"] < 0.0:
        raise UserError(f"FRUGAL lr must be non-negative, got {group['lr']}")
    beta1, beta2 = group["betas"]
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise UserError(f"FRUGAL betas must be two numbers in [0, 1), got {group['betas']}")
    if group["eps"] < 0.0:
        raise UserError(f"FRUGAL eps must be non-negative, got {group['eps']}")
    for key in ("state_full_lr_scale", "inactive_lr_scale"):
        if group[key] < 0.0:
            raise UserError(f"FRUGAL {key} must be non-negative, got {group[key]}")
    if group["projectable"] and group["selection"] != "block":
        for p in group["params"]:
            if p.ndim != 2:
                raise UserError(f"FRUGAL selection {group['selection']!r} splits 2-D weights only; a projectable "
                                f"group holds a tensor of shape {tuple(p.shape)} (use selection=block or "
                                f"move it to a group without 'projectable')")


# --- AdamW and the state-free rules ---------------------------------------------------------------------


def _fresh_moments(state: dict[str, Any], like: Tensor, state_bits: int) -> None:
    state["step"] = torch.tensor(0.0)
    moments.init_moments(state, like.shape, like.device, moments.moment_dtype(like), state_bits)


def _adam_direction(grad: Tensor, state: dict[str, Any], group: dict[str, Any], tables: CodeTables
                    ) -> tuple[Tensor, float]:
    """Advance the moments by one step; return m / (sqrt(v / bc2) + eps) and the step size factor 1 / bc1.

    The same arithmetic as ``torch.optim.AdamW``'s single-tensor path, on float32 moments or 8-bit
    ones dequantised for the step and requantised after it.
    """
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = moments.read(state, tables)
    grad = grad.to(exp_avg.dtype)
    state["step"] += 1
    step = state["step"].item()
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    direction = exp_avg / denom
    moments.write(state, tables, exp_avg, exp_avg_sq)
    return direction, 1.0 / bias_correction1


def _state_free_update(p: Tensor, residual: Tensor, group: dict[str, Any]) -> None:
    lr = group["lr"] * group["inactive_lr_scale"]
    if group["state_free"] == "signsgd":
        p.add_(residual.sign(), alpha=-lr)
    elif group["state_free"] == "sgd":
        p.add_(residual, alpha=-lr)


# --- subspaces ------------------------------------------------------------------------------------------


def _active_blocks(group: dict[str, Any], subspace_index: int, first_position: int) -> set[int]:
    """Indices (within the group) of the tensors that are state-full for this subspace index."""
    n = len(group["params"])
    k = subspace_size(n, group["density"])
    if group["block_order"] == "random":
        generator = selection_generator(group["seed"], subspace_index, first_position)
        return set(torch.randperm(n, generator=generator)[:k].tolist())
    start = subspace_index * k
    if group["block_order"] == "ascending":
        return {(start + j) % n for j in range(k)}
    return {(n - 1 - start - j) % n for j in range(k)}


def _select_subspace(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                     subspace_index: int, position: int, tables: CodeTables) -> None:
    """Choose the subspace of ``p`` for this subspace index and set up (or carry over) the moments."""
    selection, density = group["selection"], group["density"]
    m, n = p.shape
    carry = not group["reset_statistics"] and "step" in state
    if selection in _COORDINATE_SELECTIONS:
        total = {"columns": n, "rows": m, "randk": m * n}[selection]
        generator = selection_generator(group["seed"], subspace_index, position)
        indices = torch.randperm(total, generator=generator)[: subspace_size(total, density)]
        # int32 halves the index memory (randk keeps one index per state-full entry).
        index_dtype = torch.int32 if total < 2**31 else torch.long
        indices = indices.sort().values.to(device=p.device, dtype=index_dtype)
        if carry:
            _carry_coordinate_moments(state, indices, selection, total, tables, group["state_bits"])
        state["indices"] = indices
    else:
        state["projection"] = _orthonormal_basis(grad, group, subspace_index, position)
    state["subspace_index"] = subspace_index
    if not carry:
        _fresh_moments(state, _project(torch.zeros_like(p, dtype=moments.moment_dtype(p)), state, selection),
                       group["state_bits"])


def _carry_coordinate_moments(state: dict[str, Any], indices: Tensor, selection: str, total: int,
                              tables: CodeTables, state_bits: int) -> None:
    """Keep the moments of coordinates selected before and now; coordinates new to the subspace start at 0."""
    dim = 1 if selection == "columns" else 0
    slot_of = torch.full((total,), -1, dtype=torch.long, device=indices.device)
    slot_of[state["indices"]] = torch.arange(len(state["indices"]), device=indices.device)
    old_slots = slot_of[indices]
    kept = old_slots >= 0

    def carried(name: str, old: Tensor) -> Tensor:
        shape = list(old.shape)
        shape[dim] = len(indices)
        new = old.new_zeros(shape)
        new.index_copy_(dim, kept.nonzero().squeeze(1), old.index_select(dim, old_slots[kept]))
        return new

    moments.transform(state, tables, carried, state_bits)


def _orthonormal_basis(grad: Tensor, group: dict[str, Any], subspace_index: int, position: int) -> Tensor:
    """Projection on the shorter side of the weight: (r, n) rows for tall/square, (m, r) columns for wide.

    ``svd`` takes the top singular vectors of the gradient (GaLore's projector), ``random`` a uniformly
    random orthonormal basis (QR of a seeded Gaussian matrix, the signs of R's diagonal made positive).
    """
    m, n = grad.shape
    side = projection_side("std", grad.shape)
    rank = subspace_size(n if side == "right" else m, group["density"])
    if group["selection"] == "svd":
        left, right = exact_basis(grad, rank, side)
        basis = right if side == "right" else left
    else:
        basis = random_basis(grad.shape, group, subspace_index, position)
    return basis.to(device=grad.device, dtype=grad.dtype).contiguous()


def random_basis(shape: torch.Size, group: dict[str, Any], subspace_index: int, position: int) -> Tensor:
    """``selection=random``'s basis of an (m, n) weight, on the CPU in float32: a function of its arguments."""
    m, n = shape
    side = projection_side("std", shape)
    rank = subspace_size(n if side == "right" else m, group["density"])
    generator = selection_generator(group["seed"], subspace_index, position)
    gaussian = torch.randn(n if side == "right" else m, rank, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.T if side == "right" else q


def _basis_pair(state: dict[str, Any], shape: torch.Size) -> tuple[str, Tensor | None, Tensor | None]:
    """(side, left, right) in the projector's convention for the stored basis."""
    side = projection_side("std", shape)
    basis = state["projection"]
    return (side, None, basis) if side == "right" else (side, basis, None)


def _project(full: Tensor, state: dict[str, Any], selection: str) -> Tensor:
    """The coordinates of ``full`` in the subspace (the shape of the moments)."""
    if selection == "columns":
        return full.index_select(1, state["indices"])
    if selection == "rows":
        return full.index_select(0, state["indices"])
    if selection == "randk":
        return full.reshape(-1).index_select(0, state["indices"])
    return project(full, *_basis_pair(state, full.shape))


def _lift(low: Tensor, state: dict[str, Any], selection: str, shape: torch.Size) -> Tensor:
    """The full-size tensor whose projection is ``low`` and which is zero off the subspace."""
    full = low.new_zeros(shape)
    _add_lifted(full, low, state, selection, alpha=1.0)
    return full


def _add_lifted(target: Tensor, low: Tensor, state: dict[str, Any], selection: str, alpha: float) -> None:
    """target += alpha * lift(low), without building the full-size tensor for coordinate subspaces."""
    if selection == "columns":
        target.index_add_(1, state["indices"], low, alpha=alpha)
    elif selection == "rows":
        target.index_add_(0, state["indices"], low, alpha=alpha)
    elif selection == "randk":
        target.view(-1).index_add_(0, state["indices"], low, alpha=alpha)
    else:
        add_projected_back_(target, low, *_basis_pair(state, target.shape), alpha=alpha)
