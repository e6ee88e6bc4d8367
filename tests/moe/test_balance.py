"""Load-balancing loss, z-loss and statistics in one process, against float64 references and HF's loss."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from leantrain.errors import UserError
from leantrain.moe.balance import BalanceCollector, domain_routing_metrics, domain_concentration
from leantrain.moe.config import MoEConfig
from leantrain.moe.router import Routing

E, K = 6, 2


def routing_from(logits: torch.Tensor) -> Routing:
    probs = logits.softmax(-1)
    weights, experts = probs.topk(K, dim=-1)
    return Routing(logits=logits, probs=probs, experts=experts, weights=weights)


def record(collector: BalanceCollector, layer: int, logits: torch.Tensor, batch_size: int) -> Routing:
    routing = routing_from(logits)
    collector.record(layer, routing, torch.bincount(routing.experts.flatten(), minlength=E), batch_size)
    return routing


def cfg(balance: str, lbl: float = 1.0, micro: float = 0.0, z: float = 0.0) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=K, balance=balance, lbl_coef=lbl, micro_lbl_coef=micro, z_loss_coef=z)


def reference_lbl(experts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """N_E sum_i f_i P_i in float64 from one-hot counts, f normalised over all k choices."""
    one_hot = torch.zeros(experts.shape[0], E, dtype=torch.float64).scatter_add_(
        1, experts, torch.ones(experts.shape, dtype=torch.float64))
    freq = one_hot.sum(0) / one_hot.sum()
    return E * (freq * probs.double().mean(0)).sum()


def test_micro_matches_hf_mixtral_loss_and_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(40, E, dtype=torch.float64, requires_grad=True)
    collector = BalanceCollector(cfg("micro"))
    record(collector, 0, logits, 4)
    loss = collector.loss()
    # HF counts each of the k choices as a whole token, so its loss is k times ours.
    logits_hf = logits.detach().clone().requires_grad_(True)
    hf = load_balancing_loss_func((logits_hf,), E, K) / K
    torch.testing.assert_close(loss, hf.to(loss.dtype))
    loss.backward()
    hf.backward()
    torch.testing.assert_close(logits.grad, logits_hf.grad)

    # Every expert chosen equally often with uniform probabilities: exactly 1.
    uniform = Routing(logits=torch.zeros(E, E), probs=torch.full((E, E), 1 / E),
                      experts=torch.stack([torch.arange(E), torch.arange(E).roll(1)], 1), weights=torch.ones(E, K))
    collector.record(0, uniform, torch.full((E,), K), 1)
    assert collector.loss().item() == pytest.approx(1.0, abs=1e-12)


def test_sequence_mode_is_the_mean_of_per_sequence_losses():
    torch.manual_seed(1)
    batch, seq = 3, 10
    logits = torch.randn(batch * seq, E, dtype=torch.float64, requires_grad=True)
    collector = BalanceCollector(cfg("sequence"))
    record(collector, 0, logits, batch)
    loss = collector.loss()
    routing = routing_from(logits)
    expected = torch.stack([reference_lbl(routing.experts[b * seq:(b + 1) * seq], routing.probs[b * seq:(b + 1) * seq])
                            for b in range(batch)]).mean()
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - reference_lbl(routing.experts, routing.probs).item()) > 1e-3  # not the micro LBL


def test_z_loss_and_coefficients_sum_over_layers():
    torch.manual_seed(2)
    collector = BalanceCollector(cfg("micro", lbl=0.5, z=0.25))
    logits = [torch.randn(12, E, dtype=torch.float64) * 3 for _ in range(2)]
    for layer, lg in enumerate(logits):
        record(collector, layer, lg, 2)
    loss = collector.loss()
    expected = 0.0
    for lg in logits:
        routing = routing_from(lg)
        z = lg.exp().sum(-1).log().square().mean()
        expected += 0.5 * reference_lbl(routing.experts, routing.probs) + 0.25 * z
    torch.testing.assert_close(loss, expected)
    metrics = collector.metrics()
    mean_z = sum(lg.exp().sum(-1).log().square().mean() for lg in logits).item() / 2
    assert metrics["moe/z_loss"] == pytest.approx(mean_z, rel=1e-12)


def test_global_buffer_accumulates_over_micro_steps_and_resets():
    """Micro-step a uses the counts of micro-steps 1..a and its own probabilities; reset starts over."""
    torch.manual_seed(3)
    collector = BalanceCollector(cfg("global", lbl=1.0, micro=0.1))
    cumulative = torch.zeros(E, dtype=torch.float64)
    steps = [torch.randn(16, E, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for a, logits in enumerate(steps):
        routing = record(collector, 0, logits, 2)
        counts = torch.bincount(routing.experts.flatten(), minlength=E).double()
        cumulative += counts
        loss = collector.loss()
        assert torch.equal(collector.window_counts()[0], cumulative)
        logits_ref = logits.detach().clone().requires_grad_(True)
        probs_ref = logits_ref.softmax(-1)
        expected = E * (cumulative / cumulative.sum() * probs_ref.mean(0)).sum()
        expected = expected + 0.1 * E * (counts / counts.sum() * probs_ref.mean(0)).sum()
        torch.testing.assert_close(loss, expected)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(logits.grad, logits_ref.grad)
        if a:  # from the second micro-step on, the window differs from the micro-batch
            assert not torch.allclose(cumulative / cumulative.sum(), counts / counts.sum())

    collector.reset()
    assert collector.window_counts() == {} and collector.metrics() == {}
    logits = torch.randn(16, E, dtype=torch.float64)
    routing = record(collector, 0, logits, 2)
    loss = collector.loss()
    expected = reference_lbl(routing.experts, routing.probs) * 1.1
    torch.testing.assert_close(loss, expected)


def test_metrics_loads_and_domain_concentration():
    collector = BalanceCollector(cfg("micro"), domain_names=["code", "prose"])
    # Two sequences of 4 tokens: "code" always picks experts 0 and 1, "prose" spreads over 2..5.
    experts = torch.tensor([[0, 1]] * 4 + [[2, 3], [4, 5], [2, 4], [3, 5]])
    probs = torch.full((8, E), 1 / E)
    routing = Routing(logits=probs.log(), probs=probs, experts=experts, weights=torch.full((8, K), 0.5))
    collector.set_domains(torch.tensor([0, 1]))
    collector.record(0, routing, torch.bincount(experts.flatten(), minlength=E), 2)
    collector.loss()
    metrics = collector.metrics()
    counts = torch.bincount(experts.flatten(), minlength=E).double()
    assert metrics["moe/layer0/max_load"] == pytest.approx((E * counts.max() / counts.sum()).item())
    assert metrics["moe/layer0/min_load"] == pytest.approx((E * counts.min() / counts.sum()).item())
    assert metrics["moe/lbl"] == pytest.approx(1.0)  # uniform probabilities: 1 whatever the counts
    assert metrics["moe/concentration/code"] == pytest.approx(1.0)
    assert metrics["moe/concentration/prose"] == pytest.approx(0.5)  # top-2 of 4 equally used experts
    torch.testing.assert_close(collector.domain_frequencies()[0][0], torch.tensor([.5, .5, 0, 0, 0, 0]).double())


def test_domain_concentration_closed_form():
    # A domain on 2 experts, one spread evenly over 4, one on 3 with 6/2/1 pairs, one with no pairs at all.
    counts = torch.tensor([[5, 5, 0, 0], [3, 3, 3, 3], [6, 2, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.5, 8 / 9, 0.0], dtype=torch.float64)
    torch.testing.assert_close(domain_concentration(counts, 2), expected)
    metrics = domain_routing_metrics({1: counts, 3: counts.flip(0)}, ["a", "b", "c", "d"], 2, "val_moe/")
    assert metrics["val_moe/layer1/concentration/a"] == 1.0 and metrics["val_moe/layer3/concentration/a"] == 0.0
    assert metrics["val_moe/layer3/concentration/b"] == pytest.approx(8 / 9)
    assert metrics["val_moe/concentration/b"] == pytest.approx((0.5 + 8 / 9) / 2)
    # All domains together route 14, 10, 4, 3 pairs to the 4 experts in both layers.
    assert metrics["val_moe/layer1/max_load"] == metrics["val_moe/layer3/max_load"] == pytest.approx(4 * 14 / 31)
    assert metrics["val_moe/max_load"] == pytest.approx(4 * 14 / 31)
    assert len(metrics) == 4 * 3 + 3


def test_misuse_is_reported():
    collector = BalanceCollector(cfg("micro"), domain_names=["code"])
    with pytest.raises(UserError, match="domain labels"):
        collector.set_domains(torch.tensor([0, 1]))
    collector.set_domains(None)
    record(collector, 0, torch.randn(4, E), 1)
    with pytest.raises(RuntimeError, match="recorded twice"):
        record(collector, 0, torch.randn(4, E), 1)
    with pytest.raises(RuntimeError, match="loss\\(\\) was never taken"):
        collector.reset()
