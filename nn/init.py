"""Weight initialisation that depends on the seed alone: not on the world size, the device or the dtype.

A parameter is drawn in chunks of whole rows along dim 0, ``CHUNK_ELEMENTS`` elements each (a
figure of its shape alone). Chunk ``c`` of the parameter named ``name`` comes from its own CPU
generator, seeded by (seed, name, c), in fp32, and is cast into the parameter's storage dtype as it
is copied. A process that holds only some rows (an FSDP2 shard on dim 0, a ``DTensor``) draws just
the chunks that overlap them, so one rank and N ranks get the same full weights, and the extra
memory is one fp32 chunk. The draws are on the CPU so that CPU and CUDA runs start from the same
weights (about 1.3 s per 10^8 elements on one core: 90 s for the 7b preset).
"""

import hashlib
import math

import torch
from torch.distributed.tensor import DTensor

CHUNK_ELEMENTS = 1 << 22
"""Elements per chunk (16 MiB in fp32), rounded down to whole rows; at least one row."""


def chunk_seed(seed: int, name: str, index: int) -> int:
    """The generator seed of chunk ``index`` of parameter ``name``: a 63-bit hash of all three."""
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill ``param`` (or this rank's rows of it) with Normal(0, std) drawn chunk by chunk (module docstring)."""
    if param.ndim == 0:
        raise ValueError(f"{name}: a scalar parameter has no rows to draw")
    local, first = _local_rows(param)
    if local.numel() == 0 or local.device.type == "meta":
        return
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(param.shape[1:])))
    last = first + local.shape[0]
    generator = torch.Generator(device="cpu")
    for index in range(first // rows_per_chunk, -(-last // rows_per_chunk)):
        start = index * rows_per_chunk
        stop = min(start + rows_per_chunk, param.shape[0])
        generator.manual_seed(chunk_seed(seed, name, index))
        chunk = torch.empty((stop - start, *param.shape[1:]), dtype=torch.float32, device="cpu")
        chunk.normal_(0.0, std, generator=generator)
        lo, hi = max(start, first), min(stop, last)
        local[lo - first:hi - first].copy_(chunk[lo - start:hi - start])


@torch.no_grad()
def ones_(param: torch.Tensor) -> None:
    """Fill ``param`` (or this rank's rows of it) with ones."""
    local = _local_rows(param)[0]
    if local.device.type != "meta":
        local.fill_(1.0)


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this process holds of ``param`` and the global index of its first row."""
    if not isinstance(param, DTensor):
        return param, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Shard

    if any(isinstance(p, Shard) and p.dim != 0 for p in param.placements):
        raise ValueError(f"weights sharded on a dim other than 0 cannot be initialised by rows: {param.placements}")
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), offset[0] if offset else 0
