"""Stochastic rounding of bf16 weights: unbiased, seeded, and what lets bf16 training follow fp32."""

import io
import math

import pytest
import torch

from leantrain.optim import FRUGAL, AdamW, AdamW8bit, GaLoreAdamW, LayerwiseOptimizer
from leantrain.optim.rounding import rounding_generator, stochastic_round_


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above (in magnitude) each float32 entry: truncation and the next one."""
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    high = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return low, high


def test_unbiased_in_expectation_with_the_closed_form_spread():
    n = 1 << 20
    for value in (1.0 + 0.3 * 2**-7, -3.7e-3, 1234.5678):
        x = torch.full((n,), value)
        out = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_(out, x, torch.Generator().manual_seed(0))
        low, high = neighbours(x[:1])
        rounded = out.float()
        assert bool(((rounded == low) | (rounded == high)).all())
        # P(high) = (|x| - |low|) / ulp, so E[rounded] = x; the mean of n draws has sd ulp sqrt(p (1 - p) / n).
        ulp = (high - low).abs().item()
        p = abs(value - low.item()) / ulp
        sd = ulp * math.sqrt(p * (1 - p) / n)
        assert abs(rounded.double().mean().item() - value) < 5 * sd
        assert abs((rounded == high).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_exact_values_specials_and_reproducibility():
    x = torch.tensor([1.0, -2.5, 0.0, math.inf, -math.inf, math.nan, 3.0e38, 1e-40])
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(1))
    assert out[:5].float().tolist() == [1.0, -2.5, 0.0, math.inf, -math.inf] and out[5].isnan()
    y = torch.randn(10000)
    a, b, c = (torch.empty(10000, dtype=torch.bfloat16) for _ in range(3))
    stochastic_round_(a, y, rounding_generator(torch.device("cpu"), 0, 3, 7))
    stochastic_round_(b, y, rounding_generator(torch.device("cpu"), 0, 3, 7))
    stochastic_round_(c, y, rounding_generator(torch.device("cpu"), 1, 3, 7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = torch.empty(10000, dtype=torch.bfloat16)
    stochastic_round_(d, y, rounding_generator(torch.device("cpu"), 0, 4, 7))  # another parameter
    assert not torch.equal(a, d)


def test_small_updates_move_bf16_weights_where_round_to_nearest_stalls():
    """An update of 1e-4 per step on a weight of 1 is a fortieth of bf16's ulp there (2^-7)."""
    steps, lr = 200, 1e-4

    def run(make, dtype):
        w = torch.nn.Parameter(torch.ones(64, 64, dtype=dtype))
        opt = make([w])
        for _ in range(steps):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().float()

    fp32 = run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), torch.float32)
    rne = run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), torch.bfloat16)
    sr = run(lambda p: AdamW(p, lr=lr, weight_decay=0.0), torch.bfloat16)
    assert torch.allclose(fp32, torch.full_like(fp32, 1 - steps * lr), atol=1e-5)
    assert bool((rne == 1.0).all())  # stalled
    assert abs(sr.mean().item() - fp32.mean().item()) < 1e-3 * steps * lr * 50  # within 5% of the 0.02 moved


def tiny_regression(make, dtype, steps=60):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=gen)
    target = x @ torch.randn(64, 64, generator=gen)
    w = torch.nn.Parameter(torch.zeros(64, 64, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(64, dtype=dtype))
    opt = make([w, b])
    for _ in range(steps):
        loss = (x.to(dtype) @ w + b - target.to(dtype)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x @ w.float() + b.float() - target).square().mean().item(), target.square().mean().item()


@pytest.mark.parametrize("make", [
    lambda p: AdamW(p, lr=0.05, weight_decay=0.0),
    lambda p: AdamW8bit(p, lr=0.05, weight_decay=0.0),
    lambda p: GaLoreAdamW([{"params": p[:1], "rank": 16, "update_proj_gap": 20}, {"params": p[1:]}], lr=0.05),
    lambda p: GaLoreAdamW([{"params": p[:1], "rank": 16, "update_proj_gap": 20}, {"params": p[1:]}], lr=0.05,
                          state_bits=8),
    lambda p: FRUGAL([{"params": p[:1], "projectable": True}, {"params": p[1:]}], lr=0.05, selection="columns",
                     density=0.5, update_gap=20),
], ids=["adamw", "adamw8bit", "galore", "galore8bit", "frugal"])
def test_bf16_training_tracks_fp32(make):
    loss32, start = tiny_regression(make, torch.float32)
    loss16, _ = tiny_regression(make, torch.bfloat16)
    assert loss32 < 0.5 * start
    assert abs(loss16 - loss32) < 0.05 * loss32 + 1e-3 * start


def test_bf16_galore_keeps_a_bf16_basis_and_float32_moments():
    w = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["proj_right"].dtype == torch.bfloat16 and opt.state[w]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("make", [
    lambda p: AdamW8bit(p, lr=0.01),
    lambda p: GaLoreAdamW([{"params": p[:1], "rank": 64, "update_proj_gap": 3}, {"params": p[1:]}], lr=0.01),
], ids=["adamw8bit", "galore"])
def test_bf16_resume_is_bit_exact(make):
    def fresh():
        return [torch.nn.Parameter(torch.randn(128, 96, generator=torch.Generator().manual_seed(i)).bfloat16())
                for i in range(2)]

    grads = [[torch.randn(128, 96, generator=torch.Generator().manual_seed(10 * t + i)).bfloat16() for i in range(2)]
             for t in range(6)]

    def train(opt, params, gs):
        for g in gs:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    straight_p = fresh()
    train(make(straight_p), straight_p, grads)
    first_p = fresh()
    first = make(first_p)
    train(first, first_p, grads[:3])
    buffer = io.BytesIO()
    torch.save({"optim": first.state_dict(), "params": [p.detach() for p in first_p]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_p = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed = make(resumed_p)
    resumed.load_state_dict(saved["optim"])
    assert all(v.dtype != torch.bfloat16 for s in resumed.state.values() for k, v in s.items() if "proj" not in k)
    train(resumed, resumed_p, grads[3:])
    for a, b in zip(straight_p, resumed_p):
        assert torch.equal(a, b)


def test_layerwise_wrapper_rounds_like_the_unwrapped_optimizer():
    """Each per-parameter optimizer draws the stream of its parameter's position: bitwise the same run."""
    def params():
        return [torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).bfloat16())
                for i in range(3)]

    plain_p, wrapped_p = params(), params()
    plain = AdamW(plain_p, lr=1e-3)
    wrapped = LayerwiseOptimizer(wrapped_p, AdamW, lr=1e-3)
    for t in range(3):
        for i, (a, b) in enumerate(zip(plain_p, wrapped_p)):
            g = torch.randn(64, 64, generator=torch.Generator().manual_seed(10 * t + i)).bfloat16()
            a.grad, b.grad = g.clone(), g.clone()
        plain.step()
        wrapped.step()
    for a, b in zip(plain_p, wrapped_p):
        assert torch.equal(a, b)
