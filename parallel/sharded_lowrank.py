"""GaLore and Natural GaLore on FSDP2's DTensor parameters, rows sharded on dim 0, without gathering gradients.

A rank holds rows [r0, r1) of each m x n weight, of its gradient G_i, and of every row-indexed
factor. What each piece of GaLore becomes:

- Right projection (G Q^T, Q k x n, GaLore's choice when m >= n): G_i Q^T is this rank's rows of
  the low-rank gradient, so projection, moments (m_i x k) and the update (those rows times Q) stay
  local. Q, the top-k eigenvectors of the Gram matrix G^T G = sum_i G_i^T G_i, is replicated.
- Left projection (P^T G, P m x k): P is sharded by rows like the weight, and P^T G = sum_i P_i^T G_i
  is reduce-scattered by columns: each rank keeps the moments of k x ceil(n / W) columns, and the
  Adam update is all-gathered (k x n) before P_i maps it back onto the local rows.
- Full (P^T G Q^T): the k x k low-rank gradient is all-reduced; its moments are replicated.

Bases at refresh steps: exact SVD from the all-reduced Gram G^T G when n <= m (the right singular
vectors are its eigenvectors and P_i = G_i V / sigma), else from the gradient gathered once (the
n x n Gram would be larger than G itself); the randomized range finder runs on the shards with
all-reduced n x w products and a Cholesky QR of row-sharded blocks, drawing the same test matrix
as the single-device optimizer. Natural GaLore's Fisher Gram (s x s) is all-reduced over the
shards of the history. Exact bases from the Gram can differ from LAPACK's SVD by the signs of
singular vectors, which only matters with ``switch="keep"`` across a refresh.

Every collective runs on every rank in the same order: decisions that could differ between ranks
(the guard's "is the gradient finite") are all-reduced first.

``state_dict()`` gives every state tensor its placement, so that ``torch.distributed.checkpoint``
saves each shard once and can load it at another world size: what is split with the rows (the
moments and history of a right projection, a left basis P_i) or by columns (the moments and history
of a left projection, without the padding of the last block) becomes a ``Shard`` DTensor of its
global shape; what every rank holds whole (a right basis Q, the k x k state of a full projection,
step counters) stays a plain tensor, the same on every rank. ``load_state_dict`` takes either form.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from ..errors import UserError
from ..optim import projector
from ..optim.frugal import FRUGAL
from ..optim.galore import GaLoreAdamW
from ..optim.lisa import LISA
from ..optim.natural_galore import NaturalGaLoreAdamW

FSDP2_OPTIMIZERS = "adamw, galore, natural_galore, frugal and lisa"


def shard_optimizer(optimizer: Optimizer) -> Optimizer:
    """``optimizer`` in a form that steps DTensor parameters sharded on dim 0 (torch's run as they are)."""
    kind = type(optimizer)
    if kind.__name__ == "OffloadOptimizer":
        raise UserError("optim.offload cannot wrap the optimizer under parallel.backend=fsdp2: FSDP2 offloads the "
                        "sharded weights and optimizer state itself, set parallel.fsdp_cpu_offload=true instead")
    if kind.__module__.startswith("torch.optim"):
        return optimizer
    groups = optimizer.base.param_groups if kind is LISA else optimizer.param_groups
    if any(group.get("state_bits", 32) != 32 for group in groups):
        raise UserError("optim.state_bits=8 cannot run on FSDP2's shards yet: its quantisation blocks of 256 "
                        "values lie over each rank's shard, which a checkpoint could not recut at another world "
                        "size; use optim.state_bits=32 or parallel.backend=ddp")
    if kind is LISA and type(optimizer.base).__module__.startswith("torch.optim"):
        return optimizer  # torch's AdamW on the DTensors; FSDP2 skips the frozen blocks' gradients
    if kind is FRUGAL:
        from .sharded_frugal import ShardedFRUGAL

        options = {key: value for key, value in optimizer.defaults.items() if key != "projectable"}
        return ShardedFRUGAL(optimizer.param_groups, **options)
    sharded = {GaLoreAdamW: ShardedGaLoreAdamW, NaturalGaLoreAdamW: ShardedNaturalGaLoreAdamW}.get(kind)
    if sharded is None:
        raise UserError(f"parallel.backend=fsdp2 cannot run {kind.__name__}: it runs optim.name {FSDP2_OPTIMIZERS}; "
                        f"use parallel.backend=ddp for this optimizer")
    return sharded(optimizer.param_groups, **optimizer.defaults, stagger=optimizer.stagger)


def _group_of(t: DTensor) -> dist.ProcessGroup:
    return t.device_mesh.get_group()


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _any_rank(flag: bool, device: torch.device, group: dist.ProcessGroup) -> bool:
    return bool(_all_reduce(torch.tensor([float(flag)], device=device), group, dist.ReduceOp.MAX).item())


def row_range(t: DTensor) -> tuple[int, int]:
    """Rows [start, stop) of a Shard(0) DTensor held by this rank (torch.chunk's split, as DTensor's)."""
    m = t.shape[0]
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-m // world)
    start = min(rank * chunk, m)
    stop = min(start + chunk, m)
    if stop - start != t.to_local().shape[0]:
        raise ValueError(f"unexpected shard of {tuple(t.to_local().shape)} for a {tuple(t.shape)} Shard(0) DTensor")
    return start, stop


def _working(matrix: torch.Tensor) -> torch.Tensor:
    return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()


def exact_basis(grad: DTensor, k: int, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(P_i, Q): this rank's rows of the top-k left singular vectors and the replicated right ones."""
    m, n = grad.shape
    local = _working(grad.to_local())
    if n <= m:  # the n x n Gram is no larger than the gradient
        a = local.double()
        evals, evecs = torch.linalg.eigh(_all_reduce(a.T @ a, _group_of(grad)))
        v = evecs[:, -k:].flip(-1)  # eigh sorts ascending
        right = v.T.to(local.dtype) if side in ("right", "full") else None
        left = None
        if side in ("left", "full"):
            sigma = evals[-k:].flip(-1).clamp(min=0.0).sqrt()
            left = (a @ v / sigma.clamp(min=torch.finfo(torch.float64).tiny)).to(local.dtype)
        return left, right
    left, right = projector.exact_basis(grad.full_tensor(), k, side)
    if left is not None:
        start, stop = row_range(grad)
        left = left[start:stop]
    return left, right


def _orthonormal_rows(y: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """An orthonormal basis of a row-sharded tall matrix's columns: Cholesky QR, twice for accuracy."""
    for _ in range(2):
        chol = torch.linalg.cholesky(_all_reduce((y.T @ y).double(), group))
        y = torch.linalg.solve_triangular(chol.T.to(y.dtype), y, upper=True, left=False)
    return y


def randomized_basis(grad: DTensor, k: int, side: str, oversample: int, power_iters: int,
                     generator: torch.Generator, sketch_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``projector.randomized_basis`` on row shards: the same test matrix and Rayleigh-Ritz extraction.

    The products with the local rows run in ``sketch_dtype`` (None: the gradient's), as on one
    device; the sums over ranks, QRs and small eigenproblems run in the working dtype.
    """
    group = _group_of(grad)
    a = _working(grad.to_local())
    dtype = a.dtype
    s = a.to(sketch_dtype or dtype)

    def times(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (left.to(s.dtype) @ right.to(s.dtype)).to(dtype)

    m, n = grad.shape
    width = min(k + oversample, m, n)
    iterate_right = side == "right" or (side == "full" and n <= m)
    if iterate_right:  # x is n x width, replicated; products with G are row-sharded
        x = torch.randn(n, width, generator=generator, device=a.device, dtype=dtype)
        for _ in range(power_iters):
            x = torch.linalg.qr(_all_reduce(times(s.T, times(s, x)), group)).Q
        c = times(s, x)
        if side == "full":
            q_c = _orthonormal_rows(c, group)
            u_r, _, wh = torch.linalg.svd(_all_reduce(q_c.T @ c, group))
            return q_c @ u_r[:, :k], (x @ wh[:k].T).T
        _, w = torch.linalg.eigh(_all_reduce(c.T @ c, group))
        return None, (x @ w[:, -k:].flip(-1)).T
    start, stop = row_range(grad)  # x is m x width, sharded by rows like the weight
    x = torch.randn(m, width, generator=generator, device=a.device, dtype=dtype)[start:stop]
    for _ in range(power_iters):
        x = _orthonormal_rows(times(s, _all_reduce(times(s.T, x), group)), group)
    c = _all_reduce(times(s.T, x), group)
    if side == "full":
        u_c, _, wh = torch.linalg.svd(c, full_matrices=False)
        return x @ wh[:k].T, u_c[:, :k].T
    _, w = torch.linalg.eigh(c.T @ c)
    return x @ w[:, -k:].flip(-1), None


def _aligned_rows(new: torch.Tensor, old: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``projector.align_signs`` for a row-sharded P: the column dot products summed over ranks."""
    dots = _all_reduce((new * old).sum(dim=0, keepdim=True), group)
    return new * torch.where(dots < 0, -1.0, 1.0).to(new.dtype)


def _column_chunk(n: int, world: int) -> int:
    return -(-n // world)


def reduce_scatter_columns(low: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of ``low`` (k x n) over ranks, this rank's k x ceil(n / W) block of columns (zero-padded)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k, n = low.shape
    chunk = _column_chunk(n, world)
    stacked = torch.zeros(world * chunk, k, dtype=low.dtype, device=low.device)
    stacked[:n] = low.T
    out = torch.empty(chunk, k, dtype=low.dtype, device=low.device)
    dist.reduce_scatter_single(out, stacked, group=group)
    return out.T.contiguous()


def all_gather_columns(block: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of ``reduce_scatter_columns`` without the sum: the k x n matrix from every rank's block."""
    world = dist.get_world_size(group)
    k, chunk = block.shape
    out = torch.empty(world * chunk, k, dtype=block.dtype, device=block.device)
    dist.all_gather_single(out, block.T.contiguous(), group=group)
    return out[:n].T


def low_rank_local_shape(side: str, p: DTensor, k: int) -> tuple[int, int]:
    """Shape of this rank's low-rank gradient and moments."""
    if side == "right":
        return p.to_local().shape[0], k
    if side == "left":
        return k, _column_chunk(p.shape[1], p.device_mesh.size())
    return k, k


class ShardedGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW for DTensor parameters sharded on dim 0 over a 1-D mesh; it keeps its state as local tensors.

    Takes GaLoreAdamW's arguments. Projected parameters must be 2-D ``Shard(0)`` DTensors; the others
    may be DTensors with any placement (their AdamW runs on the local shards). Only the hooks that
    touch a whole matrix change: GaLoreAdamW's step, Adam and switch policies run as they are.
    """

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        super()._check_group(group, index)
        for p in group["params"]:
            if not isinstance(p, DTensor):
                raise ValueError(f"{type(self).__name__} steps DTensor parameters (FSDP2); got a plain tensor")
            if "rank" in group and (p.device_mesh.ndim != 1 or p.placements != (Shard(0),)):
                raise ValueError(f"projected parameters must be sharded on dim 0 over a 1-D mesh, got {p.placements}")

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def state_dict(self) -> dict[str, Any]:
        """GaLoreAdamW's state dict with each split state tensor a DTensor of its global shape (see the module)."""
        return placed_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``state_dict()``'s form, saved at any world size (split state may also come whole)."""
        super().load_state_dict(local_state_dict(self, state_dict))

    def _low_rank_shape(self, p: torch.Tensor, side: str, k: int) -> tuple[int, int]:
        return low_rank_local_shape(side, p, k)

    def _project_gradient(self, p: torch.Tensor, side: str, state: dict[str, Any]) -> torch.Tensor:
        grad, comm = p.grad.to_local(), _group_of(p)
        left, right = state.get("proj_left"), state.get("proj_right")
        if side == "right":
            return grad @ right.T
        if side == "left":
            return reduce_scatter_columns(left.T @ grad, comm)
        return _all_reduce(left.T @ grad @ right.T, comm)

    def _add_projected_back(self, p: torch.Tensor, target: torch.Tensor, update: torch.Tensor, side: str,
                            state: dict[str, Any], alpha: float) -> None:
        if side == "left":  # this rank holds a block of the update's columns and all of P's local rows
            update = all_gather_columns(update, p.shape[1], _group_of(p))
        super()._add_projected_back(p, target, update, side, state, alpha)

    def _change_of_basis(self, p: torch.Tensor, side: str, old: tuple[torch.Tensor | None, torch.Tensor | None],
                         state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        r_left, r_right = super()._change_of_basis(p, side, old, state)
        if r_left is not None:  # P_new^T P_old, summed over the row shards
            r_left = _all_reduce(r_left, _group_of(p))
        return r_left, r_right

    def _new_basis(self, p: torch.Tensor, k: int, side: str, group: dict[str, Any], ordinal: int, step: int,
                   state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """The new basis, or None (on every rank alike) when the guard rejects the gradient or the SVD."""
        grad, comm = p.grad, _group_of(p)
        device = grad.to_local().device
        guard = group["guard"]
        if guard and _any_rank(not bool(torch.isfinite(grad.to_local()).all()), device, comm):
            return None
        try:
            if group["svd"] == "exact":
                left, right = exact_basis(grad, k, side)
            else:
                generator = torch.Generator(device=device)
                generator.manual_seed((ordinal + 1) * 1_000_003 + step)  # as GaLoreAdamW: same draws on every rank
                left, right = randomized_basis(grad, k, side, group["oversample"], group["power_iters"], generator,
                                               projector.sketch_dtype_for(group["sketch_dtype"], grad.to_local()))
                if "proj_left" in state and left is not None:
                    left = _aligned_rows(left, state["proj_left"].to(left.dtype), comm)
                if "proj_right" in state and right is not None:
                    right = projector.align_signs(right, state["proj_right"].to(right.dtype), vectors_dim=0)
        except torch.linalg.LinAlgError:  # the factorised matrices are replicated: every rank fails alike
            if guard:
                return None
            raise
        if guard:
            bad = any(b is not None and not bool(torch.isfinite(b).all()) for b in (left, right))
            if _any_rank(bad, device, comm):
                return None
        return left, right


class ShardedNaturalGaLoreAdamW(ShardedGaLoreAdamW, NaturalGaLoreAdamW):
    """NaturalGaLoreAdamW on row-sharded DTensors: the history holds this rank's part of each low-rank gradient."""

    def _fisher_gram(self, p: torch.Tensor, group: dict[str, Any], history: torch.Tensor) -> torch.Tensor:
        gram = history @ history.T
        # The full (k x k) low-rank gradient is replicated; left and right ones are split over ranks.
        if projector.projection_side(group["proj_type"], p.shape) != "full":
            gram = _all_reduce(gram, _group_of(p))
        return gram


# ---- checkpoint state with placements ----------------------------------------------------------------


def _split(length: int, world: int, rank: int) -> tuple[int, int]:
    """(start, size) of ``rank``'s part of a dimension of ``length`` under ``Shard`` (torch.chunk's split)."""
    chunk = -(-length // world)
    start = min(rank * chunk, length)
    return start, min(start + chunk, length) - start


Layout = dict[str, tuple[int, tuple[int, ...], int]]


def sharded_layout(p: DTensor, group: dict[str, Any], state: dict[str, Any]) -> Layout:
    """The state tensors of ``p`` that are split over ranks: key -> (split dim, global shape, stored size).

    The global shape is of the tensor as a checkpoint holds it; ``history`` (s rows of flattened
    low-rank gradients) is viewed as s x (the low-rank gradient's global shape), its first size
    taken from the state. The stored size is this rank's extent along the split dim as the optimizer
    keeps it: the column blocks of a left projection are padded to ceil(n / W). A split dim of -1
    marks a dense moment, placed as the parameter. Keys not named are replicated.
    """
    if "rank" not in group:
        return {key: (-1, tuple(p.shape), -1) for key in ("exp_avg", "exp_avg_sq")}
    m, n = p.shape
    side = projector.projection_side(group["proj_type"], p.shape)
    k = projector.effective_rank(group["rank"], p.shape)
    rows = p.to_local().shape[0]
    if side == "right":
        return {"exp_avg": (0, (m, k), rows), "exp_avg_sq": (0, (m, k), rows), "history": (1, (-1, m, k), rows)}
    if side == "full":
        return {"proj_left": (0, (m, k), rows)}
    chunk = _column_chunk(n, p.device_mesh.size())
    return {"proj_left": (0, (m, k), rows), "exp_avg": (1, (k, n), chunk), "exp_avg_sq": (1, (k, n), chunk),
            "history": (2, (-1, k, n), chunk)}


def _to_dtensor(local: torch.Tensor, p: DTensor, layout: tuple[int, tuple[int, ...], int]) -> DTensor:
    dim, shape, stored = layout
    mesh = p.device_mesh
    if dim < 0:  # a dense moment: the parameter's own placement and shape
        return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    shape = (local.shape[0], *shape[1:]) if shape[0] == -1 else shape
    _, size = _split(shape[dim], mesh.size(), mesh.get_local_rank())
    held = [*shape]
    held[dim] = stored
    view = local.reshape(held).narrow(dim, 0, size).contiguous()
    return DTensor.from_local(view, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _from_dtensor(value: torch.Tensor, p: DTensor, layout: tuple[int, tuple[int, ...], int]) -> torch.Tensor:
    """This rank's state tensor, as the optimizer keeps it, from a DTensor (any placement) or a plain one."""
    dim, shape, stored = layout
    if not isinstance(value, DTensor):  # a tensor saved whole: this rank's part of it
        value = DTensor.from_local(value, p.device_mesh, [Replicate()], run_check=False)
    placements = p.placements if dim < 0 else [Shard(dim)]
    local = value.redistribute(p.device_mesh, placements).to_local()
    if dim < 0:
        return local
    if local.shape[dim] < stored:
        pad = [*local.shape]
        pad[dim] = stored - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad)], dim=dim)
    return local.reshape(local.shape[0], -1) if shape[0] == -1 else local.contiguous()


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _params_by_key(optimizer: Optimizer, saved: dict[str, Any]) -> dict[Any, tuple[torch.Tensor, dict[str, Any]]]:
    """Each key of ``saved["state"]`` (a parameter's index, or its name in DCP's state dicts) -> (parameter, group).

    As ``Optimizer.load_state_dict`` does, saved and current parameters pair up by position in their groups.
    """
    keys = [key for group in saved["param_groups"] for key in group["params"]]
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    if len(keys) != len(params):
        raise UserError(f"optimizer state holds {len(keys)} parameters, this optimizer {len(params)}")
    return dict(zip(keys, params))


def placed_state_dict(optimizer: Optimizer, saved: dict[str, Any],
                      layout_of: Callable[[DTensor, dict[str, Any], dict[str, Any]], Layout] = sharded_layout
                      ) -> dict[str, Any]:
    """``saved`` (``optimizer``'s torch state dict) with each split state tensor a DTensor (see the module).

    ``layout_of(parameter, group, state)`` names the split tensors; DTensors in the state stay as they are.
    """
    params = _params_by_key(optimizer, saved)
    state = {}
    for index, entry in saved["state"].items():
        p, group = params[index]
        layout = layout_of(p, group, entry)
        state[index] = {key: _to_dtensor(value, p, layout[key]) if key in layout and not isinstance(value, DTensor)
                        else value for key, value in entry.items()}
    return {**saved, "state": state}


def local_state_dict(optimizer: Optimizer, saved: dict[str, Any],
                     layout_of: Callable[[DTensor, dict[str, Any], dict[str, Any]], Layout] = sharded_layout,
                     keeps_dtensors: bool = False) -> dict[str, Any]:
    """Inverse of ``placed_state_dict``: every split state tensor as this rank keeps it.

    ``keeps_dtensors``: the optimizer keeps its dense moments as DTensors (FRUGAL's whole-tensor AdamW).
    """
    params = _params_by_key(optimizer, saved)
    state = {}
    for index, entry in saved["state"].items():
        p, group = params[index]
        layout = layout_of(p, group, entry)
        state[index] = {key: _from_dtensor(value, p, layout[key])
                        if key in layout and not (keeps_dtensors and layout[key][0] < 0) else value
                        for key, value in entry.items()}
    return {**saved, "state": state}
