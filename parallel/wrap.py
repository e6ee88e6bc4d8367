"""Data-parallel engines: the only place that knows the backend (ddp | fsdp2 | deepspeed).

``build_engine`` wraps the loss module (model + loss in one module) for the configured backend and
builds the optimizer on the wrapped parameters. The loop then talks to one small object:

    with engine.micro_step(is_last):        # no gradient sync before the window's last backward
        loss = engine.module(inputs, targets)
        engine.backward(loss * scale)
    grad_norm = engine.step()               # clip to the global norm, then the optimizer step
    engine.zero_grad()

The loss scale is the same on every backend: each averages gradients over ranks, as DDP does.
``checkpoint_states`` says which states go into a checkpoint and in which group (written once by
rank 0, or by every rank for itself); ``full_state_dict`` gathers the weights for the final save.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..errors import UserError
from .config import ParallelConfig
from .world import World

BACKENDS = ("ddp", "fsdp2", "deepspeed")


class DataParallelEngine:
    """A single process or DDP: every rank holds the whole model and optimizer.

    ``module`` is what the loop calls for the loss; ``model`` is the bare model inside it (whose
    state dict is the checkpoint's and the final weights'); ``optimizer`` is the optimizer the LR
    scheduler drives. Optimizers that step inside backward or keep gradients elsewhere (per-layer
    updates, offload) are told about accumulation windows through ``begin_micro_step`` and clip
    with their own ``clip_grad_norm_`` when they have one.
    """

    skip_non_finite = True
    """Skip the update when the norm is not finite (``leantrain estimate``'s fake step turns the check off)."""

    def __init__(self, module: nn.Module, model: nn.Module, optimizer: Optimizer, grad_clip: float):
        self.module = module
        self.model = model
        self.optimizer = optimizer
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")

    def micro_step(self, is_last: bool) -> AbstractContextManager:
        """Context of one forward and backward; gradients are synchronised only when ``is_last``."""
        if hasattr(self.optimizer, "begin_micro_step"):
            self.optimizer.begin_micro_step(is_last)
        if isinstance(self.module, DistributedDataParallel) and not is_last:
            return self.module.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip the gradients to ``trainer.grad_clip`` and step; returns the global norm before clipping.

        A non-finite norm (divergence, overflow) skips the update: the weights stay as they were and
        the loop counts the step as bad. Optimizers that update inside backward (per-layer updates)
        skip each parameter whose gradient is non-finite themselves; their ``step`` always runs.
        """
        if hasattr(self.optimizer, "clip_grad_norm_"):
            norm = self.optimizer.clip_grad_norm_(self.model.parameters(), self.max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        if not self.skip_non_finite or getattr(self.optimizer, "steps_in_backward", False) or torch.isfinite(norm):
            self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(replicated, per_rank) Stateful objects: here the model and optimizer are the same on every rank."""
        return {"model": self.model, "optimizer": self.optimizer}, {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict (a collective on sharding backends: every rank must call it)."""
        return self.model.state_dict()


def build_engine(loss_module: nn.Module, model: nn.Module, cfg: ParallelConfig, world: World,
                 make_optimizer: Callable[[], Optimizer], *, grad_clip: float, micro_batch_size: int,
                 accumulation_steps: int, freezes_parameters: bool = False,
                 materialize: Callable[[], None] | None = None) -> DataParallelEngine:
    """Wrap ``loss_module`` (which holds ``model``) for ``parallel.backend`` and build its optimizer.

    ``materialize`` gives a meta-device ``model`` its weights (None: it has them): FSDP2 calls it
    after sharding, so that no rank ever holds the whole model; the other backends before wrapping.
    ``make_optimizer`` is called after the wrapping, so it sees the parameters the backend trains
    (FSDP2's sharded DTensors). ``micro_batch_size`` and ``accumulation_steps`` are per rank.
    ``freezes_parameters``: the optimizer switches ``requires_grad`` during training (LISA), so DDP
    must find the parameters without gradients at every step (see ``wrap_model``).
    """
    if cfg.backend not in BACKENDS:
        raise UserError(f"parallel.backend: unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if cfg.backend == "fsdp2":
        from .fsdp import build_fsdp2_engine

        return build_fsdp2_engine(loss_module, model, cfg, world, make_optimizer, grad_clip, materialize)
    if materialize is not None:
        materialize()
    if cfg.backend == "deepspeed":
        from .deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(loss_module, model, cfg, world, make_optimizer, grad_clip=grad_clip,
                                      micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps)
    module = wrap_model(loss_module, cfg, world, find_unused_parameters=freezes_parameters)
    optimizer = make_optimizer()
    if isinstance(module, DistributedDataParallel) and hasattr(optimizer, "attach_ddp"):
        optimizer.attach_ddp(module)
    return DataParallelEngine(module, model, optimizer, grad_clip)


def wrap_model(module: nn.Module, cfg: ParallelConfig, world: World, find_unused_parameters: bool = False) -> nn.Module:
    """Return ``module`` wrapped in DDP (unchanged in a single process).

    DDP registers a gradient hook on every parameter that requires gradients when it is built and,
    by default, waits for all of them in each backward. An optimizer that freezes parameters for a
    while (LISA switches its active blocks every ``interval`` steps) needs ``find_unused_parameters``:
    each forward then walks the autograd graph and marks the frozen parameters ready, and since they
    are unused on every rank their ``.grad`` stays None. ``static_graph`` would not do: it assumes the
    set of used parameters never changes. The walk costs a little per step, so it is on only then.
    DDP rebuilds its buckets once, before the second step, in the order the first step's gradients
    became ready (frozen parameters count as ready at once); later switches keep that order, which
    only changes how communication overlaps backward, never the reduced values.
    """
    if cfg.backend not in BACKENDS:
        raise UserError(f"parallel.backend: unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if not world.distributed:
        return module
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=cfg.ddp_bucket_mb,
                                   find_unused_parameters=find_unused_parameters)
