"""HF MoE models (model.hf) balanced by leantrain's collector instead of their own auxiliary loss.

References: each model's own ``load_balancing_loss_func`` (from its HF modeling module) on the router logits the
HF model itself returns, and HF's own causal-LM loss. HF's function pools the counts and probabilities of all the
layers it is given into one product, so its value for several layers is neither the sum nor the mean of per-layer
LBLs; it is compared one layer at a time. It also counts top_k picks per token where ours counts shares of the
routed pairs (sum_i f_i = 1), so HF's single-layer value is top_k times ours.
"""

import sys

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM)

from leantrain.moe.balance import BalanceCollector
from leantrain.moe.config import MoEConfig
from leantrain.nn.hf import HFCausalLMAdapter, RouterShape
from leantrain.nn.loss import LanguageModelLoss

VOCAB, EXPERTS, TOP_K = 67, 4, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=TOP_K)


def qwen2_moe(**overrides) -> Qwen2MoeForCausalLM:
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**SHAPE, num_experts=EXPERTS, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24, **overrides))


def mixtral(**overrides) -> MixtralForCausalLM:
    return MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=EXPERTS, **overrides))


def olmoe(**overrides) -> OlmoeForCausalLM:
    return OlmoeForCausalLM(OlmoeConfig(**SHAPE, num_experts=EXPERTS, eos_token_id=0, pad_token_id=0, **overrides))


BUILDERS = {"qwen2_moe": qwen2_moe, "mixtral": mixtral, "olmoe": olmoe}


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name](**overrides)
    with torch.no_grad():  # peaked routers, so that the layers route unevenly
        for module_name, p in model.named_parameters():
            if module_name.endswith("mlp.gate.weight"):
                p.mul_(20)
    return model


def tokens(batch: int = 3, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def collector_for(adapter: HFCausalLMAdapter, balance: str = "micro", z: float = 0.0) -> BalanceCollector:
    return BalanceCollector(adapter.moe_config(MoEConfig(balance=balance, lbl_coef=1.0, z_loss_coef=z)))


def hf_lbl_per_layer(hf_model, x: torch.Tensor) -> list[torch.Tensor]:
    """HF's own load_balancing_loss_func on each layer's router logits from HF's own forward."""
    lbl = sys.modules[type(hf_model).__module__].load_balancing_loss_func
    logits = hf_model(input_ids=x, output_router_logits=True).router_logits
    assert len(logits) == hf_model.config.num_hidden_layers
    return [lbl((layer,), EXPERTS, TOP_K) for layer in logits]


@pytest.mark.parametrize("name", BUILDERS)
def test_micro_lbl_per_layer_is_hfs_own_and_so_is_its_gradient(name):
    hf_model = build(name)
    adapter = HFCausalLMAdapter(hf_model)
    assert adapter.router == RouterShape(EXPERTS, TOP_K, renormalize=name == "mixtral")
    x = tokens()
    collector = collector_for(adapter)
    adapter(x, collector)
    ours = collector.loss()
    metrics = collector.metrics()
    theirs = hf_lbl_per_layer(hf_model, x)
    for layer, value in enumerate(theirs):
        assert metrics[f"moe/layer{layer}/lbl"] * TOP_K == pytest.approx(value.item(), rel=1e-5)
    assert max(metrics[f"moe/layer{layer}/lbl"] for layer in range(2)) > 1.03  # unevenly routed: 1 when balanced
    reference = sum(theirs) / TOP_K
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)

    params = [p for p in hf_model.parameters()]
    grads = torch.autograd.grad(ours, params, allow_unused=True)
    expected = torch.autograd.grad(reference, params, allow_unused=True)
    routers = 0
    for (param_name, _), g, e in zip(hf_model.named_parameters(), grads, expected):
        assert (g is None) == (e is None), param_name
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7, msg=param_name)
            routers += param_name.endswith("mlp.gate.weight")
    assert routers == 2


def test_hfs_auxiliary_loss_is_never_added():
    hf_model = build("qwen2_moe", router_aux_loss_coef=0.5)
    adapter = HFCausalLMAdapter(hf_model)
    x = tokens()
    collector = collector_for(adapter)
    ours = LanguageModelLoss(adapter)(x[:, :-1], x[:, 1:], collector)
    with_aux = hf_model(input_ids=x, labels=x, output_router_logits=True)
    cross_entropy = with_aux.loss - 0.5 * with_aux.aux_loss
    torch.testing.assert_close(ours, cross_entropy * x[:, 1:].numel(), rtol=1e-5, atol=1e-5)
    assert with_aux.aux_loss > 1.0  # so the assertion above would see it
    assert collector.loss() > 0  # the balance loss comes from the collector alone


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_activation_checkpointing_records_once_with_the_same_gradient(name):
    x = tokens()
    grads = []
    for checkpointing in (False, True):
        hf_model = build(name)
        adapter = HFCausalLMAdapter(hf_model)
        if checkpointing:
            hf_model.activation_checkpointing_enable()
        hf_model.train()
        collector = collector_for(adapter, balance="global", z=1e-3)
        loss = LanguageModelLoss(adapter)(x[:, :-1], x[:, 1:], collector) / x.numel() + collector.loss()
        loss.backward()  # a second recording (the recomputation) would raise here or in reset()
        collector.reset()
        grads.append({n: p.grad for n, p in hf_model.named_parameters()})
    for param_name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][param_name], grad, rtol=1e-5, atol=1e-7, msg=param_name)


def test_dense_models_have_no_routers():
    torch.manual_seed(0)
    adapter = HFCausalLMAdapter(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items()
                                                                 if k != "num_experts_per_tok"})))
    assert adapter.router is None
    assert adapter.moe_config(MoEConfig(num_experts=0)).num_experts == 0
    with pytest.raises(ValueError, match="without softmax routers"):
        adapter(tokens(), BalanceCollector(MoEConfig(num_experts=EXPERTS)))
