"""The process group: ranks, device and collectives, the ground floor every other part asks.

Launched by ``torchrun`` the environment names RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; otherwise the run is a single process and no process group is created.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class World:
    """Where this process sits: its rank, the number of ranks and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def group(self) -> "dist.ProcessGroup | None":
        """The data-parallel process group (all ranks), or None in a single process."""
        return dist.group.WORLD if self.distributed else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` takes this rank's CUDA device when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("trainer.device: 'cuda' was asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise UserError(f"trainer.device: unknown device {requested!r}; choose auto, cpu or cuda")


def init_world(device: str = "auto", timeout_s: float = 600.0) -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # Each restart attempt gets its own store prefix: after `torchrun --max-restarts` restarts the
        # group, a rank reading the default store can find the previous attempt's address of a peer
        # and gloo's connectFullMesh fails or hangs (seen on this machine, see shared/REFERENCE.md).
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0 and not agent_store),
                              timeout=timedelta(seconds=timeout_s))
        # Without the agent's store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) each rendezvous round gets a fresh
        # store, and a node restarted alone has its own restart count: no prefix then.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "fresh"
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return World(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def ensure_process_group(world: World) -> None:
    """Give a single-process run a one-rank process group: FSDP2 and DeepSpeed need one even alone."""
    if dist.is_initialized():
        return
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=world.device if world.device.type == "cuda" else None)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
