"""Wrap the model for data parallelism: the only place that knows the backend."""

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from .config import ParallelConfig
from .world import World

BACKENDS = ("ddp",)


def wrap_model(module: nn.Module, cfg: ParallelConfig, world: World) -> nn.Module:
    """Return ``module`` ready for data-parallel training (unchanged in a single process)."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"parallel.backend: unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if not world.distributed:
        return module
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=cfg.ddp_bucket_mb)
