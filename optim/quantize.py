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

import bisect
import functools
import math
import struct

import torch

BLOCK_SIZE = 256
"""Elements sharing one absmax (bitsandbytes' block size for its 8-bit optimizers)."""
MIN_QUANTIZED_NUMEL = 4096
"""Smaller tensors keep float32 moments (bitsandbytes' ``min_8bit_size``): their state is negligible."""
STATE_BITS = (32, 8)


def _float32(x: float) -> float:
    """``x`` rounded to float32 (to nearest), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


@functools.cache
def _map_values(signed: bool) -> tuple[float, ...]:
    values = [0.0, 1.0]
    for i in range(7):
        steps = 2**i if signed else 2 ** (i + 1)
        scale = 10.0 ** (i - 6)
        # Midpoints of ``steps`` equal intervals of [0.1, 1], in float64, rounded once to float32.
        mids = [_float32(scale * (0.1 + 0.9 * (j + 0.5) / steps)) for j in range(steps)]
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == 256
    return tuple(sorted(values))


@functools.cache
def _boundaries(signed: bool) -> tuple[float, ...]:
    """Entry i's upper decision boundary: the largest float32 at least as close to entry i as to entry i+1."""
    values = _map_values(signed)
    out = []
    for a, b in zip(values[:-1], values[1:]):
        mid = (a + b) / 2  # exact in float64
        down = _float32(mid)
        if down > mid:  # one float32 step towards -inf
            bits = struct.unpack("<I", struct.pack("<f", down))[0]
            down = _from_bits(bits + 1 if down < 0 else bits - 1)
        out.append(down)
    return tuple(out)


@functools.cache
def _prefix_table(signed: bool) -> tuple[list[int], int]:
    """For each upper 16 bits of a float32: the code of the lowest value with them, and the most boundaries
    any such range holds (1 or 2), so that a code is that start plus a few comparisons (see ``quantize_``)."""
    bounds = _boundaries(signed)
    starts, most = [], 0
    for index in range(1 << 16):
        first = (index - (1 << 15)) << 16  # the int32 pattern of the range's first float
        ends = (_from_bits(first), _from_bits(first | 0xFFFF))
        if any(math.isnan(e) for e in ends):
            starts.append(0)
            continue
        lo, hi = min(ends), max(ends)
        start = bisect.bisect_left(bounds, lo)  # boundaries below lo: the code of lo
        starts.append(start)
        most = max(most, bisect.bisect_right(bounds, hi) - start)
    return starts, most


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 entries of the dynamic map (signed: for the first moment)."""
    return torch.tensor(_map_values(signed), dtype=torch.float32)


class CodeTable:
    """A dynamic map on one device, with what finds the nearest entry of a value fast.

    ``boundaries[i]`` is the largest float32 that is at least as close to entry i as to entry i+1,
    so the code of x is the number of boundaries below x: the nearest entry, ties going to the lower
    one, exactly as an argmin of the distances would in exact arithmetic. Instead of a binary search
    (``torch.bucketize``: eight dependent gathers per element, the bulk of a step), the upper 16
    bits of x's float32 pattern index the code of the lowest value sharing them, and ``extra``
    comparisons with the following boundaries finish the count (``extra`` is the most boundaries
    such a range holds: 1 for these maps, whose entries are further apart than the ~0.8% of a value
    the range spans). Exact: the same codes as ``torch.bucketize`` on the boundaries (a test).
    """

    def __init__(self, signed: bool, device: torch.device | str = "cpu"):
        starts, extra = _prefix_table(signed)
        self.signed = signed
        self.values = dynamic_map(signed).to(device)
        self.boundaries = torch.tensor(_boundaries(signed), dtype=torch.float32, device=device)
        self.extra = extra
        padded = _boundaries(signed) + (math.inf,) * extra
        self.padded_boundaries = torch.tensor(padded, dtype=torch.float32, device=device)
        self.prefix_codes = torch.tensor(starts, dtype=torch.int32, device=device)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 code of each float32 value of ``x`` (flat): the number of boundaries below it."""
        prefix = torch.bitwise_right_shift(x.view(torch.int32), 16).add_(1 << 15)
        start = self.prefix_codes.index_select(0, prefix)
        code = start.clone()
        for j in range(self.extra):
            code += self.padded_boundaries.index_select(0, start + j if j else start).lt(x)
        return code


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
    codes.view(-1).copy_(table.codes(normalized))


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: CodeTable) -> torch.Tensor:
    """The float32 values (flat) of a range of codes with its per-block maxima."""
    flat = table.values.index_select(0, codes.reshape(-1).to(torch.int32))
    rows, tail = _per_block(flat)
    n_rows = rows.shape[0]
    rows.mul_(absmax[:n_rows, None])
    if tail.numel():
        tail.mul_(absmax[n_rows:])
    return flat
