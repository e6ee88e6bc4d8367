"""MoELayer: parity with HF's MixtralSparseMoeBlock, shared experts, activation checkpointing, config checks."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from leantrain.errors import UserError
from leantrain.moe.balance import BalanceCollector
from leantrain.moe.config import MoEConfig, check_moe_config
from leantrain.moe.layer import MoELayer, is_moe_block


def hf_copy(layer: MoELayer) -> MixtralSparseMoeBlock:
    e, d, h2 = layer.experts.gate_up.shape
    config = MixtralConfig(hidden_size=d, intermediate_size=h2 // 2, num_local_experts=e,
                           num_experts_per_tok=layer.top_k, router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.down.transpose(1, 2))
    return block


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_matches_hf_mixtral_block(impl):
    torch.manual_seed(0)
    layer = MoELayer(32, 48, MoEConfig(num_experts=8, top_k=2, impl=impl))
    layer.init_weights(0.2, 0.2)  # large enough that routing is far from uniform
    block = hf_copy(layer)
    x = torch.randn(3, 20, 32, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_(True)
    y, y_hf = layer(x), block(x_hf)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_hf.backward(grad)
    torch.testing.assert_close(x.grad, x_hf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.gate_up.grad, block.experts.gate_up_proj.grad.transpose(1, 2),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.gate.weight.grad, block.gate.weight.grad, rtol=1e-5, atol=1e-6)


def test_shared_experts_add_a_dense_swiglu():
    torch.manual_seed(0)
    routed = MoELayer(16, 24, MoEConfig(num_experts=4, top_k=1))
    shared = MoELayer(16, 24, MoEConfig(num_experts=4, top_k=1, shared_experts=2))
    shared.load_state_dict(routed.state_dict(), strict=False)
    assert shared.shared.w1.out_features == 48
    x = torch.randn(2, 5, 16)
    expected = routed(x) + shared.shared(x)
    torch.testing.assert_close(shared(x), expected)


@pytest.mark.parametrize("early_stop", [True, False])
def test_checkpointing_records_statistics_once(early_stop):
    """The forward runs again in the backward pass; its statistics must not be recorded again.

    Without early stop the recomputation runs to the end of the layer, past the recording.
    """
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, balance="global", lbl_coef=1.0, z_loss_coef=0.1)
    layer = MoELayer(16, 32, cfg)
    layer.init_weights(0.3, 0.3)
    calls = []
    layer.router.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 8, 16)
    results = []
    for use_checkpoint in (False, True):
        collector = BalanceCollector(cfg)
        layer.zero_grad()
        calls.clear()
        xin = x.clone().requires_grad_(True)
        with set_checkpoint_early_stop(early_stop):
            y = checkpoint(layer, xin, collector, use_reentrant=False) if use_checkpoint else layer(xin, collector)
            loss = y.square().mean() + collector.loss()
            loss.backward()
        results.append((len(calls), loss.detach(), collector.window_counts()[0].clone(), collector.metrics(),
                        layer.router.gate.weight.grad.clone(), xin.grad.clone()))
        collector.reset()  # raises if the recomputation left a second record behind
    (calls_plain, *plain), (calls_ckpt, *ckpt) = results
    assert calls_plain == 1 and calls_ckpt == 2  # the checkpointed forward did run twice
    assert plain[1].sum() == 2 * 8 * 2 and torch.equal(plain[1], ckpt[1])
    assert plain[2] == ckpt[2]
    torch.testing.assert_close(plain[0], ckpt[0])
    torch.testing.assert_close(plain[3], ckpt[3])
    torch.testing.assert_close(plain[4], ckpt[4])


def test_which_blocks_are_moe():
    assert [is_moe_block(MoEConfig(num_experts=4, every_n_layers=2), i) for i in range(4)] == [False, True, False, True]
    assert all(is_moe_block(MoEConfig(num_experts=4), i) for i in range(3))
    assert not any(is_moe_block(MoEConfig(num_experts=0), i) for i in range(3))


@pytest.mark.parametrize("field,value", [("top_k", 9), ("balance", "batch"), ("impl", "triton"),
                                         ("every_n_layers", 0), ("lbl_coef", -1.0), ("num_experts", -2)])
def test_bad_config_names_the_key(field, value):
    cfg = MoEConfig(num_experts=8)
    setattr(cfg, field, value)
    with pytest.raises(UserError, match=f"moe.{field}"):
        check_moe_config(cfg)
