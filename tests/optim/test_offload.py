"""Optimizer offload: bitwise equal to the wrapped optimizer on CPU, and a planner that follows its model."""

import itertools
import math

import pytest
import torch

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.optim.galore import GaLoreAdamW
from leantrain.optim.groups import decay_groups, low_rank_groups
from leantrain.optim.natural_galore import NaturalGaLoreAdamW
from leantrain.optim.offload import (
    OffloadOptimizer,
    Rates,
    SubgroupCost,
    plan_placement,
    predict_step_time,
)

STEPS, ACCUM, MAX_NORM = 4, 2, 0.05
# Half of the work on each side: a free link and equal update rates.
BALANCED = Rates(h2d_bytes_per_s=1e18, d2h_bytes_per_s=1e18, cpu_params_per_s=1e9, device_params_per_s=1e9)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)
    return Transformer(resolve_model_config(cfg, vocab_size=64, seq_len=16))


OPTIMIZERS = {
    "adamw": lambda m: (decay_groups(m.named_parameters(), 0.1), torch.optim.AdamW,
                        dict(lr=1e-2, betas=(0.9, 0.95), fused=True)),
    "galore": lambda m: (low_rank_groups(m, ["attention", "feed_forward"], 0.1,
                                         dict(rank=4, update_proj_gap=2, scale=0.5, proj_type="std")),
                         GaLoreAdamW, dict(lr=1e-2, switch="rotate", decay_before_update=True)),
    "natural_galore": lambda m: (low_rank_groups(m, ["attention", "feed_forward"], 0.0,
                                                 dict(rank=4, update_proj_gap=3, proj_type="std")),
                                 NaturalGaLoreAdamW, dict(lr=1e-2, history=3)),
}


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(STEPS * ACCUM)]


def train(model, optimizer, data, steps=STEPS, start=0):
    """The trainer's step: accumulate, clip the global norm, step, zero."""
    offloaded = isinstance(optimizer, OffloadOptimizer)
    for step in range(start, steps):
        for micro in range(ACCUM):
            tokens = data[step * ACCUM + micro]
            if offloaded:
                optimizer.begin_micro_step(micro == ACCUM - 1)
            hidden = model(tokens)
            (hidden @ model.head_weight.T).logsumexp(-1).mean().backward()
        if offloaded:
            optimizer.clip_grad_norm_(model.parameters(), MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def build(name, offload=None, **options):
    model = tiny_model()
    groups, cls, kwargs = OPTIMIZERS[name](model)
    if offload is None:
        return model, cls(groups, **kwargs)
    return model, OffloadOptimizer(groups, cls, mode=offload, subgroup_numel=3000, **options, **kwargs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["cpu", "interleaved", "measured"])
def test_offload_is_bitwise_identical_to_no_offload(name, mode):
    data = batches()
    ref_model, ref_opt = build(name)
    train(ref_model, ref_opt, data)
    if mode == "measured":
        model, opt = build(name, "interleaved", cpu_threads=2)  # rates measured here, plan adapted per step
    else:
        model, opt = build(name, mode, rates=BALANCED, adapt=False, cpu_threads=2)
    assert len(opt._subgroups) > 3
    if mode == "interleaved":
        assert any(opt.placement) and not all(opt.placement)
    if mode == "cpu":
        assert not any(opt.placement)
    train(model, opt, data)
    for (n, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n
    opt.close()


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_state_dict_is_the_wrapped_optimizers_and_resumes_bitwise(name):
    data = batches()
    ref_model, ref_opt = build(name)
    train(ref_model, ref_opt, data, steps=2)
    model, opt = build(name, "interleaved", rates=BALANCED, adapt=False)
    train(model, opt, data, steps=2)
    saved, expected = opt.state_dict(), ref_opt.state_dict()
    assert saved["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert entry.keys() == saved["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, saved["state"][index][key]), (index, key)
    # a fresh model and wrapper, restored from the wrapper's state (weights as the checkpoint has them)
    resumed_model, resumed = build(name, "cpu")
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, data, start=2)
    train(ref_model, ref_opt, data, start=2)
    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for o in (opt, resumed):
        o.close()


def test_wrapper_places_what_its_planner_predicts():
    rates = Rates(h2d_bytes_per_s=4e9, d2h_bytes_per_s=4e9, cpu_params_per_s=1e9, device_params_per_s=1e11)
    model, opt = build("adamw", "interleaved", rates=rates, adapt=False)
    train(model, opt, batches(), steps=1)
    assert opt.placement == plan_placement(opt.costs, rates)
    assert opt.predicted_step_s == predict_step_time(opt.costs, opt.placement, rates)
    # after a step the planner sees the real state: masters plus AdamW's two moments
    assert all(c.state_bytes == 12 * c.numel for c in opt.costs)
    opt.close()


def test_prediction_is_the_busiest_resource():
    costs = [SubgroupCost(numel=100, state_bytes=1200, param_bytes=400)] * 2
    rates = Rates(h2d_bytes_per_s=1000.0, d2h_bytes_per_s=500.0, cpu_params_per_s=50.0, device_params_per_s=1000.0)
    # device: h2d (1200 + 400) / 1000 = 1.6 s, d2h 1200 / 500 = 2.4 s, host 100 / 50 = 2 s, device 0.1 s
    assert predict_step_time(costs, [True, False], rates) == pytest.approx(2.4)
    assert predict_step_time(costs, [False, False], rates) == pytest.approx(4.0)
    assert predict_step_time(costs, [True, True], rates) == pytest.approx(4.8)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 3.0, 7.0, 20.0])
def test_full_overlap_condition_sets_how_often_a_subgroup_goes_to_the_device(ratio):
    """Equal subgroups, 12 bytes of state per parameter: device subgroups every g-th, g >= 1 + 12 U / B."""
    n, subgroups = 1_000_000, 16
    cpu = 2e9
    rates = Rates(h2d_bytes_per_s=12 * cpu / ratio, d2h_bytes_per_s=12 * cpu / ratio, cpu_params_per_s=cpu,
                  device_params_per_s=1e15)
    costs = [SubgroupCost(n, 12 * n, 0)] * subgroups
    placement = plan_placement(costs, rates)
    k = sum(placement)
    g_min = 1 + 12 * cpu / rates.h2d_bytes_per_s  # = 1 + ratio
    # the largest count whose transfers hide behind the other subgroups' host updates, or one more if
    # the link then finishes before the host would have
    hidden = max(c for c in range(subgroups + 1) if c == 0 or subgroups / c >= g_min)
    candidates = {hidden, min(hidden + 1, subgroups)}
    best = min(candidates, key=lambda c: predict_step_time(costs, [i < c for i in range(subgroups)], rates))
    assert k == best
    if k == hidden and k > 0:
        link = k * 12 * n / rates.h2d_bytes_per_s
        assert link <= (subgroups - k) * n / cpu * (1 + 1e-12)  # full overlap


def test_device_subgroups_are_spread_every_gth():
    n = 1000
    costs = [SubgroupCost(n, 12 * n, 0)] * 8
    every_4th = Rates(h2d_bytes_per_s=4.0, d2h_bytes_per_s=4.0, cpu_params_per_s=1.0, device_params_per_s=1e15)
    assert [i for i, d in enumerate(plan_placement(costs, every_4th)) if d] == [0, 4]
    every_2nd = Rates(h2d_bytes_per_s=12.0, d2h_bytes_per_s=12.0, cpu_params_per_s=1.0, device_params_per_s=1e15)
    assert [i for i, d in enumerate(plan_placement(costs, every_2nd)) if d] == [0, 2, 4, 6]


def test_planner_matches_brute_force_on_mixed_state_sizes():
    """Dense (12 B/param) and low-rank (4 B/param) subgroups of equal size: the plan is the optimum."""
    gen = torch.Generator().manual_seed(3)
    n = 1000
    for trial in range(20):
        kinds = torch.randint(0, 2, (8,), generator=gen).tolist()
        costs = [SubgroupCost(n, (12 if k else 4) * n, 2 * n) for k in kinds]
        r = torch.rand(4, generator=gen).tolist()
        rates = Rates(h2d_bytes_per_s=1e3 * (0.2 + r[0]) * 12, d2h_bytes_per_s=1e3 * (0.2 + r[1]) * 12,
                      cpu_params_per_s=1e3 * (0.2 + r[2]), device_params_per_s=1e3 * (1 + 10 * r[3]))
        plan = predict_step_time(costs, plan_placement(costs, rates), rates)
        best = min(predict_step_time(costs, list(p), rates) for p in itertools.product([False, True], repeat=8))
        assert plan == pytest.approx(best, rel=1e-12), trial


def test_measured_rates_are_positive_and_finite():
    model, opt = build("adamw", "interleaved")
    train(model, opt, batches(), steps=2)
    for value in (opt.rates.h2d_bytes_per_s, opt.rates.d2h_bytes_per_s, opt.rates.cpu_params_per_s,
                  opt.rates.device_params_per_s):
        assert 0 < value < math.inf
    opt.close()


def test_bad_settings_name_the_key():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError, match="optim.offload='gpu'"):
        OffloadOptimizer([w], torch.optim.AdamW, mode="gpu")
    with pytest.raises(UserError, match="offload_subgroup_size"):
        OffloadOptimizer([w], torch.optim.AdamW, mode="cpu", subgroup_numel=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_interleaved_offload_matches_adamw_on_the_device(device):
    """Host subgroups step on the CPU, device subgroups are prefetched (on CUDA: on a side stream) and
    step on the device: the weights follow torch's AdamW run on the device alone, step after step."""
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 64, generator=gen).to(device), torch.randn(32, 64, generator=gen).to(device))
            for _ in range(3)]
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)  # GELU, not ReLU: no kink where a last-bit difference could flip a gradient
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                   torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)

    ref_model, model = mlp(), mlp()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    opt = OffloadOptimizer(model.parameters(), torch.optim.AdamW, mode="interleaved", subgroup_numel=5000,
                           rates=BALANCED, adapt=False, cpu_threads=2, **kwargs)
    assert opt._cuda == (device == "cuda") and any(opt.placement) and not all(opt.placement)
    on_device = {p for s, d in zip(opt._subgroups, opt.placement) if d for p in s.params}
    for step, (x, y) in enumerate(data):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            if o is opt:
                opt.begin_micro_step(True)
            torch.nn.functional.mse_loss(m(x), y).backward()
            if o is opt:
                opt.clip_grad_norm_(m.parameters(), MAX_NORM)
            else:
                torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)
            o.step()
            o.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        for want, got in zip(ref_model.parameters(), model.parameters()):
            if step == 0 and got in on_device:
                # Same gradients, the same single-tensor AdamW kernels on the same device: bitwise.
                assert torch.equal(got, want)
            else:
                # The host's fp32 kernels round a few operations differently from the GPU's (fused
                # multiply-adds): the update, about lr, differs in its last bits and the weight in its
                # last few; the gradients of later steps then differ as little.
                torch.testing.assert_close(got, want, rtol=2.0**-18, atol=(step + 1) * kwargs["lr"] * 2.0**-16)
    opt.close()
