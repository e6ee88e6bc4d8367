"""Blockwise dynamic 8-bit quantisation of optimizer moments (Dettmers et al., 2022).

A tensor is cut into blocks of ``BLOCK_SIZE`` consecutive elements (over its flattened layout);
each block keeps its absolute maximum in float32, and each element the uint8 index of the entry of
a 256-entry code table nearest to its value divided by that maximum. The table is the *dynamic*
map of bitsandbytes' ``create_dynamic_map``: seven decades 10^-6 .. 10^0, the decade 10^(i-6)
holding the midpoints of 2^i (signed, with both signs) or 2^(i+1) (unsigned) equal steps of
[0.1, 1], plus 0 and 1. Precision is relative, so a block that spans several orders of magnitude
(Adam's moments do) keeps its small entries. The first moment uses the signed table, the second
(never negative) the unsigned one, which spends the sign bit on precision.

Everything is plain torch on the tensors' device (CPU or CUDA), traceable on fake tensors: the
codes are a uint8 tensor of the moment's shape, the maxima a float32 tensor of one entry per
block, so optimizer state stays plain tensors.
"""

import math

import torch

BLOCK_SIZE = 256
"""Elements sharing one absmax (bitsandbytes' block size for its 8-bit optimizers)."""
MIN_QUANTIZED_NUMEL = 4096
"""Smaller tensors keep float32 moments (bitsandbytes' ``min_8bit_size``): their state is negligible."""
STATE_BITS = (32, 8)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 entries of the dynamic map (signed: for the first moment)."""
    values = [0.0, 1.0]
    for i in range(7):
        steps = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - 6)
        # Midpoints of ``steps`` equal intervals of [0.1, 1], in float64, rounded once to float32 below.
        mids = [scale * (0.1 + 0.9 * (j + 0.5) / steps) for j in range(steps)]
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float64).float()


def _round_down_to_float32(x: torch.Tensor) -> torch.Tensor:
    """The largest float32 not above each float64 entry of ``x``."""
    down = x.float()
    return torch.where(down.double() > x, torch.nextafter(down, torch.tensor(-math.inf)), down)


class CodeTable:
    """A dynamic map on one device with its decision boundaries.

    ``boundaries[i]`` is the largest float32 that is at least as close to entry i as to entry i+1,
    so ``bucketize`` on them picks the nearest entry, ties going to the lower one, exactly as an
    argmin of the distances would in exact arithmetic.
    """

    def __init__(self, signed: bool, device: torch.device | str = "cpu"):
        values = dynamic_map(signed)
        midpoints = (values[:-1].double() + values[1:].double()) / 2  # exact in float64
        self.signed = signed
        self.values = values.to(device)
        self.boundaries = _round_down_to_float32(midpoints).to(device)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def _per_block(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full blocks as rows, the partial last block) of a flat tensor."""
    full = flat.numel() // BLOCK_SIZE * BLOCK_SIZE
    return flat[:full].view(-1, BLOCK_SIZE), flat[full:]


def quantize_(x: torch.Tensor, table: CodeTable, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Write the codes (uint8, ``x``'s numel) and per-block maxima (float32) of float32 ``x``.

    ``x`` and ``codes`` are read as flat, contiguous element ranges whose start is a block boundary;
    ``absmax`` holds one entry per block of the range.
    """
    flat = x.reshape(-1)
    rows, tail = _per_block(flat)
    amax = rows.abs().amax(dim=1)
    if tail.numel():
        amax = torch.cat([amax, tail.abs().amax().reshape(1)])
    absmax.copy_(amax)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero block stays zero
    normalized = torch.empty_like(flat)
    n_rows = rows.shape[0]
    torch.div(rows, scale[:n_rows, None], out=normalized[: rows.numel()].view_as(rows))
    if tail.numel():
        torch.div(tail, scale[n_rows:], out=normalized[rows.numel():])
    index = torch.bucketize(normalized, table.boundaries, out_int32=True)
    codes.view(-1).copy_(index)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """The float32 values (flat) of a range of codes with its per-block maxima."""
    flat = table.values.index_select(0, codes.reshape(-1).to(torch.int32))
    rows, tail = _per_block(flat)
    n_rows = rows.shape[0]
    rows.mul_(absmax[:n_rows, None])
    if tail.numel():
        tail.mul_(absmax[n_rows:])
    return flat
