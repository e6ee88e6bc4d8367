"""Router: fp32 softmax and top-k, against HF Mixtral's router and a float64 reference."""

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from leantrain.moe.router import Router


def test_matches_hf_mixtral_router():
    torch.manual_seed(0)
    router = Router(dim=16, num_experts=8, top_k=2, renormalize=True)
    hf = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2))
    with torch.no_grad():
        hf.weight.copy_(router.gate.weight)
    x = torch.randn(50, 16)
    routing = router(x)
    hf_logits, hf_scores, hf_indices = hf(x)
    torch.testing.assert_close(routing.logits, hf_logits)
    assert torch.equal(routing.experts, hf_indices)
    torch.testing.assert_close(routing.weights, hf_scores)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50))


def test_fp32_under_bf16_and_raw_probabilities_without_renormalisation():
    torch.manual_seed(0)
    router = Router(dim=32, num_experts=6, top_k=3, renormalize=False).to(torch.bfloat16)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        routing = router(x)
    assert routing.logits.dtype == routing.probs.dtype == routing.weights.dtype == torch.float32
    logits64 = x.double() @ router.gate.weight.double().T
    probs64 = logits64.softmax(-1)
    torch.testing.assert_close(routing.logits.double(), logits64, rtol=1e-6, atol=1e-6)
    expected_experts = probs64.argsort(-1, descending=True)[:, :3]
    assert torch.equal(routing.experts, expected_experts)
    torch.testing.assert_close(routing.weights.double(), probs64.gather(1, expected_experts), rtol=1e-6, atol=1e-7)
