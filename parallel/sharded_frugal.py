"""FRUGAL on FSDP2's DTensor parameters, rows sharded on dim 0, without gathering gradients.

A rank holds rows [r0, r1) of each m x n weight and its gradient. What each selection becomes:

- block: whole tensors are state-full or state-free; AdamW and signSGD are elementwise and run on
  each shard, the moments placed as the parameter.
- columns: the chosen columns are columns of every shard: the moments (m_i x k) stay local.
- svd, random: the basis on the shorter side, as FRUGAL chooses it. For m >= n it is Q (r x n),
  the same on every rank, and the moments m_i x r are local; for m < n it is P (m x r), split by
  rows like the weight, and the low-rank gradient P^T G = sum_i P_i^T G_i is all-reduced, so its
  moments (r x n) are replicated. ``svd`` takes the top singular vectors from the all-reduced Gram
  matrix (sharded_lowrank.exact_basis; signs may differ from LAPACK's SVD, which matters only with
  ``reset_statistics=False``), ``random`` the single-device optimizer's seeded basis.
- rows and randk choose rows or entries of the whole matrix, which FSDP2 splits unevenly over the
  ranks' moments: refused, naming the selections that run.

``state_dict()`` places the state as sharded_lowrank.py does, so torch.distributed.checkpoint
saves and reshards it.
"""

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from ..errors import UserError
from ..optim import frugal
from ..optim.frugal import FRUGAL
from ..optim.projector import projection_side
from .sharded_lowrank import Layout, _all_reduce, _group_of, exact_basis, local_state_dict, placed_state_dict, row_range

UNEVEN_SELECTIONS = ("rows", "randk")


class ShardedFRUGAL(FRUGAL):
    """FRUGAL for DTensor parameters sharded on dim 0 over a 1-D mesh (see the module). Takes FRUGAL's arguments."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not isinstance(p, DTensor):
                raise ValueError(f"{type(self).__name__} steps DTensor parameters (FSDP2); got a plain tensor")
        if not group["projectable"] or group["selection"] == "block":
            return
        if group["selection"] in UNEVEN_SELECTIONS:
            raise UserError(f"FRUGAL selection {group['selection']!r} cannot run on FSDP2's row shards (it picks "
                            "rows or entries of the whole matrix); choose block, columns, svd or random, or "
                            "parallel.backend=ddp")
        for p in group["params"]:
            if p.device_mesh.ndim != 1 or p.placements != (Shard(0),):
                raise ValueError(f"projectable parameters must be sharded on dim 0 over a 1-D mesh, got {p.placements}")

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any], lr: float, position: int) -> None:
        """FRUGAL's whole-tensor AdamW on this rank's shard (non-projectable parameters and active blocks)."""
        state, local = self.state[p], p.to_local()
        if "step" not in state:
            frugal._fresh_moments(state, local, group["state_bits"])
        if group["weight_decay"] != 0.0:
            local.mul_(1.0 - group["lr"] * group["weight_decay"])
        direction, step_size = frugal._adam_direction(p.grad.to_local(), state, group, self._tables)
        local.add_(direction, alpha=-lr * step_size)

    def _split_step(self, p: torch.Tensor, group: dict[str, Any], position: int) -> None:
        local, grad = p.to_local(), p.grad.to_local()
        state = self.state[p]
        selection = group["selection"]
        subspace_index = group["steps_done"] // group["update_gap"]
        if state.get("subspace_index") != subspace_index:
            self._select(p, state, group, subspace_index, position)
        if group["weight_decay"] != 0.0:
            local.mul_(1.0 - group["lr"] * group["weight_decay"])
        low = self._project(p, grad, state, selection)
        direction, step_size = frugal._adam_direction(low, state, group, self._tables)
        self._add_lifted(p, local, direction, state, selection,
                         alpha=-group["lr"] * group["state_full_lr_scale"] * step_size)
        if group["state_free"] != "none" and not _covers_all(p, state, selection):
            lifted = grad.new_zeros(grad.shape)
            self._add_lifted(p, lifted, low, state, selection, alpha=1.0)
            frugal._state_free_update(local, grad - lifted, group)

    def _select(self, p: DTensor, state: dict[str, Any], group: dict[str, Any], subspace_index: int,
                position: int) -> None:
        """FRUGAL's ``_select_subspace`` on this rank's rows."""
        selection = group["selection"]
        carry = not group["reset_statistics"] and "exp_avg" in state
        if selection == "columns":
            n = p.shape[1]
            generator = frugal.selection_generator(group["seed"], subspace_index, position)
            indices = torch.randperm(n, generator=generator)[: frugal.subspace_size(n, group["density"])]
            indices = indices.sort().values.to(device=p.to_local().device, dtype=torch.int32)
            if carry:
                frugal._carry_coordinate_moments(state, indices, selection, n, self._tables, group["state_bits"])
            state["indices"] = indices
        else:
            state["projection"] = self._basis(p, group, subspace_index, position)
        state["subspace_index"] = subspace_index
        if not carry:
            frugal._fresh_moments(state, self._project(p, torch.zeros_like(p.to_local()), state, selection),
                                  group["state_bits"])

    def _basis(self, p: DTensor, group: dict[str, Any], subspace_index: int, position: int) -> torch.Tensor:
        """Q (replicated) for m >= n, this rank's rows of P otherwise."""
        side = projection_side("std", p.shape)
        if group["selection"] == "svd":
            m, n = p.shape
            rank = frugal.subspace_size(n if side == "right" else m, group["density"])
            left, right = exact_basis(p.grad, rank, side)
            basis = right if side == "right" else left
        else:  # the single-device draw, then this rank's rows of a left basis
            basis = frugal.random_basis(p.shape, group, subspace_index, position)
            if side == "left":
                start, stop = row_range(p)
                basis = basis[start:stop]
        return basis.to(device=p.to_local().device, dtype=p.dtype).contiguous()

    def _project(self, p: DTensor, grad: torch.Tensor, state: dict[str, Any], selection: str) -> torch.Tensor:
        if selection == "columns":
            return grad.index_select(1, state["indices"])
        basis = state["projection"]
        if projection_side("std", p.shape) == "right":
            return grad @ basis.T
        return _all_reduce(basis.T @ grad, _group_of(p))

    def _add_lifted(self, p: DTensor, target: torch.Tensor, low: torch.Tensor, state: dict[str, Any],
                    selection: str, alpha: float) -> None:
        if selection == "columns":
            target.index_add_(1, state["indices"], low, alpha=alpha)
        elif projection_side("std", p.shape) == "right":
            target.addmm_(low, state["projection"], alpha=alpha)
        else:
            target.addmm_(state["projection"], low, alpha=alpha)

    def state_dict(self) -> dict[str, Any]:
        """FRUGAL's state dict with each split state tensor a DTensor of its global shape (see the module)."""
        return placed_state_dict(self, super().state_dict(), frugal_layout)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(local_state_dict(self, state_dict, frugal_layout))


def _covers_all(p: DTensor, state: dict[str, Any], selection: str) -> bool:
    """Whether the state-full part spans the whole weight (no residual but rounding noise is left)."""
    if selection == "columns":
        return len(state["indices"]) == p.shape[1]
    m, n = p.shape
    if projection_side("std", p.shape) == "right":  # Q is r x n
        return state["projection"].shape[0] == n
    return state["projection"].shape[1] == m  # this rank's rows of P, m_i x r


def frugal_layout(p: DTensor, group: dict[str, Any], state: dict[str, Any]) -> Layout:
    """ShardedFRUGAL's split state, in ``sharded_lowrank.sharded_layout``'s form."""
    if not group["projectable"] or group["selection"] == "block":
        return {"exp_avg": (-1, tuple(p.shape), -1), "exp_avg_sq": (-1, tuple(p.shape), -1)}
    m, n = p.shape
    rows = p.to_local().shape[0]
    if group["selection"] == "columns":
        k = len(state["indices"])
        return {"exp_avg": (0, (m, k), rows), "exp_avg_sq": (0, (m, k), rows)}
    r = state["projection"].shape[0 if projection_side("std", p.shape) == "right" else 1]
    if projection_side("std", p.shape) == "right":
        return {"exp_avg": (0, (m, r), rows), "exp_avg_sq": (0, (m, r), rows)}
    return {"projection": (0, (m, r), rows)}
