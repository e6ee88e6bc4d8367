"""Blockwise dynamic quantisation against a float64 nearest-entry reference and bitsandbytes."""

import math

import pytest
import torch

from leantrain.optim.quantize import BLOCK_SIZE, CodeTable, dequantize, dynamic_map, num_blocks, quantize_
from support import reference_quantize


def moments_like(numel: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Values spread over six orders of magnitude, as Adam's moments are, with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.logspace(-6, 0, numel)[torch.randperm(numel, generator=gen)]
    x[::97] = 0.0
    return x if signed else x.square()


def test_dynamic_map_is_bitsandbytes_map():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed)
        assert ours.dtype == torch.float32 and ours.numel() == 256 and ours.unique().numel() == 256
        assert bool((ours[1:] > ours[:-1]).all())
        # bnb rounds its midpoints in float32 arithmetic; ours are rounded once from float64.
        torch.testing.assert_close(ours, bnb.create_dynamic_map(signed=signed), rtol=2e-7, atol=0)
    assert dynamic_map(True).min() > -1.0 and dynamic_map(True).max() == 1.0 and dynamic_map(False).min() == 0.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [4096, 5000, 300])
def test_round_trip_matches_the_float64_reference(signed, numel):
    x = moments_like(numel, signed).view(-1, 4) if numel % 4 == 0 else moments_like(numel, signed)
    table = CodeTable(signed)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(numel))
    quantize_(x, table, codes, absmax)
    ref_codes, ref_absmax = reference_quantize(x, table.values)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    back = dequantize(codes, absmax, table).view(x.shape)
    block_max = ref_absmax.double().repeat_interleave(BLOCK_SIZE)[:numel].view(x.shape)
    ref_back = table.values.double()[ref_codes.long()] * block_max
    torch.testing.assert_close(back.double(), ref_back, rtol=1e-7, atol=0)
    # Error bound: half the widest gap of the map (or the distance from -1 to the lowest entry), times
    # the block's max: 0.7% signed, 0.35% unsigned.
    values = table.values.double()
    half_gap = max(values.diff().max().item() / 2, 1.0 + values.min().item() if signed else 0.0)
    bound = (half_gap + 2**-23) * block_max  # plus the float32 rounding of entry * absmax
    assert bool(((back.double() - x.double()).abs() <= bound).all())
    assert bool((back[x == 0] == 0).all())


def test_ties_and_edges():
    table = CodeTable(True)
    values = table.values
    # A value exactly halfway between two entries (representable in float32) goes to the lower one.
    i = 200
    mid = (values[i].double() + values[i + 1].double()) / 2
    if mid.float().double() == mid:
        x = torch.zeros(BLOCK_SIZE)
        x[0], x[1] = 1.0, mid.float()
        codes, absmax = torch.empty(BLOCK_SIZE, dtype=torch.uint8), torch.empty(1)
        quantize_(x, table, codes, absmax)
        assert codes[1].item() == i
    # An all-zero block: maxima 0, everything decodes to 0 (no NaN from 0 / 0).
    x = torch.zeros(2 * BLOCK_SIZE)
    x[:BLOCK_SIZE] = torch.linspace(-2, 3, BLOCK_SIZE)
    codes, absmax = torch.empty(x.shape, dtype=torch.uint8), torch.empty(2)
    quantize_(x, table, codes, absmax)
    assert absmax.tolist() == [3.0, 0.0]
    back = dequantize(codes, absmax, table)
    assert back[BLOCK_SIZE - 1].item() == 3.0 and bool((back[BLOCK_SIZE:] == 0).all()) and not back.isnan().any()


@pytest.mark.parametrize("signed", [True, False])
def test_never_farther_than_bitsandbytes(signed):
    """bitsandbytes' CPU kernel picks a neighbour of the nearest entry now and then; ours is the nearest."""
    pytest.importorskip("bitsandbytes")
    x = moments_like(1 << 16, signed, seed=3)
    table = CodeTable(signed)
    codes, absmax = torch.empty(x.shape, dtype=torch.uint8), torch.empty(num_blocks(x.numel()))
    quantize_(x, table, codes, absmax)
    bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, table.values, BLOCK_SIZE)
    assert torch.equal(bnb_absmax, absmax)
    normalized = (x.double() / absmax.double().clamp(min=1e-300).repeat_interleave(BLOCK_SIZE))
    ours = (table.values.double()[codes.long()] - normalized).abs()
    theirs = (table.values.double()[bnb_codes.long()] - normalized).abs()
    assert bool((ours <= theirs + 1e-12).all())
    back = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, table.values, BLOCK_SIZE, torch.float32)
    torch.testing.assert_close(back, dequantize(codes, absmax, table), rtol=0, atol=0)


def test_traceable_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table = CodeTable(False)
        x = torch.rand(5000)
        codes, absmax = torch.empty(x.shape, dtype=torch.uint8), torch.empty(math.ceil(5000 / 256))
        quantize_(x, table, codes, absmax)
        assert dequantize(codes, absmax, table).shape == (5000,)
