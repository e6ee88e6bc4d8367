"""FSDP2: ``fully_shard`` per transformer block and at the root, sharded checkpoints as local tensors.

Each block is its own FSDP unit (its weights are gathered for its forward and backward only); the
root, the loss module, holds the rest (embeddings, final norm, output head), so the head weight that
the loss reads inside ``forward`` is gathered like any other. Parameters become DTensors sharded on
dim 0, and so do the gradients (reduce-scattered, averaged over ranks like DDP's) and the optimizer
state that AdamW creates with ``zeros_like``. Low-rank optimizers are swapped for their sharded
forms (``sharded_lowrank.py``).

Checkpoints keep the shards: each rank writes its own local tensors, every DTensor replaced by a
plain tensor plus its placements and global shape, and rebuilds the DTensors on load. The sharded
optimizers give their state its placement too (``sharded_lowrank.py``), so a run saved by W ranks
resumes at any other number: each rank cuts its new shards from the concatenation of the old ones
(``reshard_local_states``), one tensor at a time from memory-mapped files. The same placed state
dicts serve ``torch.distributed.checkpoint`` in one's own loop (README, "FSDP2 in your own loop").
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from ..errors import UserError
from ..optim.layerwise import LayerwiseOptimizer
from .config import ParallelConfig
from .sharded_lowrank import shard_optimizer
from .world import World, ensure_process_group
from .wrap import DataParallelEngine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCK_LISTS = ("layers", "h", "blocks")  # leantrain and LLaMA-likes, GPT-2, others
_DTENSOR_KEY = "__dtensor_local__"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the first ``nn.ModuleList`` named layers, h or blocks (empty if there is none)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            return list(module)
    return []


def shard_model(loss_module: nn.Module, model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh) -> None:
    """Apply ``fully_shard`` to every block of ``model``, then to ``loss_module`` as the root, in place."""
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(cfg, key) not in DTYPES:
            raise UserError(f"parallel.{key}={getattr(cfg, key)!r}; choose one of {', '.join(DTYPES)}")
    # fp32 gathers what is stored: fp32 weights, or bf16 ones (model.param_dtype) without an upcast copy.
    param_dtype = DTYPES[cfg.param_dtype] if cfg.param_dtype != "fp32" else None
    options: dict[str, Any] = dict(
        mesh=mesh, reshard_after_forward=cfg.fsdp_reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[cfg.reduce_dtype]),
        offload_policy=CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.fsdp_cpu_offload
        else OffloadPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(loss_module, **options)


def build_fsdp2_engine(loss_module: nn.Module, model: nn.Module, cfg: ParallelConfig, world: World,
                       make_optimizer: Callable[[], Optimizer], grad_clip: float,
                       materialize: Callable[[], None] | None = None) -> "FSDP2Engine":
    """Shard ``model`` (on the meta device when ``materialize`` is given, which then allocates and
    initialises only this rank's shards), then build the optimizer on the sharded parameters."""
    ensure_process_group(world)
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    shard_model(loss_module, model, cfg, mesh)
    if materialize is not None:
        materialize()
    optimizer = make_optimizer()
    if isinstance(optimizer, LayerwiseOptimizer):
        optimizer.convert_inner(shard_optimizer)  # one optimizer per parameter: each its sharded form
    else:
        optimizer = shard_optimizer(optimizer)
    return FSDP2Engine(loss_module, model, optimizer, grad_clip, mesh)


class FSDP2Engine(DataParallelEngine):
    """The loop's view of an FSDP2 run: sharded model, sharded optimizer state, per-rank checkpoints."""

    def __init__(self, module: nn.Module, model: nn.Module, optimizer: Optimizer, grad_clip: float, mesh: DeviceMesh):
        super().__init__(module, model, optimizer, grad_clip)
        self.mesh = mesh

    def micro_step(self, is_last: bool) -> AbstractContextManager:
        # Without sync the unsharded gradients accumulate locally; the last backward reduce-scatters
        # them, and only then does FSDP2 call the parameters' post-accumulate-grad hooks (per-layer updates).
        if hasattr(self.optimizer, "begin_micro_step"):
            self.optimizer.begin_micro_step(is_last)
        if isinstance(self.module, FSDPModule):
            self.module.set_requires_gradient_sync(is_last)
        return nullcontext()

    def step(self) -> torch.Tensor:
        if hasattr(self.optimizer, "clip_grad_norm_"):  # per-layer updates: the norm is the optimizer's
            return super().step()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):  # partial sums of squares on each rank
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        if not self.skip_non_finite or torch.isfinite(norm):  # else skipped, as in DataParallelEngine.step
            self.optimizer.step()
        return norm

    def checkpoint_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        model, optimizer = ShardedModelState(self.model), ShardedOptimizerState(self.optimizer, self.mesh)
        return {}, {"model": model, "optimizer": optimizer}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.full_tensor() if isinstance(value, DTensor) else value
                for name, value in self.model.state_dict().items()}


def to_local_state(tree: Any) -> Any:
    """``tree`` with every DTensor replaced by ``{__dtensor_local__: shard, placements, shape}``."""
    if isinstance(tree, DTensor):
        local = tree.to_local().detach()
        if local.untyped_storage().nbytes() != local.numel() * local.element_size():
            local = local.clone()  # a view into FSDP's padded buffer would save the whole buffer
        return {_DTENSOR_KEY: local, "placements": [_encode(p) for p in tree.placements], "shape": list(tree.shape)}
    if isinstance(tree, dict):
        return {key: to_local_state(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_local_state(value) for value in tree)
    return tree


def from_local_state(tree: Any, mesh: DeviceMesh) -> Any:
    """Inverse of ``to_local_state``: the DTensors rebuilt on ``mesh`` from this rank's shards."""
    if isinstance(tree, dict) and _DTENSOR_KEY in tree:
        shape = torch.Size(tree["shape"])
        return DTensor.from_local(tree[_DTENSOR_KEY], mesh, [_decode(p) for p in tree["placements"]], run_check=False,
                                  shape=shape, stride=_contiguous_stride(shape))
    if isinstance(tree, dict):
        return {key: from_local_state(value, mesh) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(from_local_state(value, mesh) for value in tree)
    return tree


def reshard_local_states(trees: list[Any], mesh: DeviceMesh) -> Any:
    """This rank's ``to_local_state`` tree on ``mesh`` from the trees every rank of another world size saved.

    A ``Shard(d)`` tensor is the old shards concatenated along d in rank order (torch.chunk's split),
    cut again for this rank; anything else (replicated DTensors, plain tensors, numbers) is the same
    on every rank and taken from the first tree.
    """
    first = trees[0]
    if isinstance(first, dict) and _DTENSOR_KEY in first:
        placements = [_decode(p) for p in first["placements"]]
        if len(placements) != 1 or len(mesh.shape) != 1:
            raise ValueError(f"resharding supports 1-D meshes, got placements {placements} on mesh {mesh.shape}")
        local = first[_DTENSOR_KEY]
        if isinstance(placements[0], Shard):
            dim = placements[0].dim
            whole = torch.cat([tree[_DTENSOR_KEY] for tree in trees], dim=dim)
            if list(whole.shape) != list(first["shape"]):
                raise ValueError(f"shards of shape {[tuple(t[_DTENSOR_KEY].shape) for t in trees]} do not make "
                                 f"the global shape {first['shape']}")
            size = whole.shape[dim]
            chunk = -(-size // mesh.size())
            start = min(mesh.get_local_rank() * chunk, size)
            local = whole.narrow(dim, start, min(start + chunk, size) - start).clone()
        return {**first, _DTENSOR_KEY: local}
    if isinstance(first, dict):
        return {key: reshard_local_states([tree[key] for tree in trees], mesh) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(reshard_local_states([tree[i] for tree in trees], mesh) for i in range(len(first)))
    return first


def _encode(placement: Any) -> list:
    if isinstance(placement, Shard):
        return ["shard", placement.dim]
    if isinstance(placement, Replicate):
        return ["replicate"]
    raise ValueError(f"cannot checkpoint a DTensor with placement {placement}")


def _decode(encoded: list) -> Shard | Replicate:
    return Shard(encoded[1]) if encoded[0] == "shard" else Replicate()


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


class ShardedModelState:
    """This rank's shards of a model's state dict, as plain tensors."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return to_local_state(self.model.state_dict())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = self.model.state_dict()
        if set(state) != set(current):
            missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
            raise UserError(f"checkpoint model state does not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
        for name, target in current.items():
            saved = state[name]
            local = target.to_local() if isinstance(target, DTensor) else target
            shard = saved[_DTENSOR_KEY] if isinstance(saved, dict) else saved
            if shard.shape != local.shape:
                raise UserError(f"checkpoint model state {name!r} has a shard of shape {tuple(shard.shape)}, this "
                                f"rank holds {tuple(local.shape)}: resume with the world size it was saved with")
            local.copy_(shard)

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Load the states saved by every rank of a run at another world size (see ``reshard_local_states``)."""
        self.load_state_dict(reshard_local_states(states, _mesh_of(self.model)))


def _mesh_of(model: nn.Module) -> DeviceMesh:
    for value in model.state_dict().values():
        if isinstance(value, DTensor):
            return value.device_mesh
    raise ValueError("the model holds no DTensor: it is not sharded")


class ShardedOptimizerState:
    """This rank's part of an optimizer's state dict (sharded moments as local tensors)."""

    def __init__(self, optimizer: Optimizer, mesh: DeviceMesh):
        self.optimizer = optimizer
        self.mesh = mesh

    def state_dict(self) -> dict[str, Any]:
        return to_local_state(self.optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(from_local_state(state, self.mesh))

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Load the states saved by every rank of a run at another world size (see ``reshard_local_states``)."""
        self.load_state_dict(reshard_local_states(states, self.mesh))
