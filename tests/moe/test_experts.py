"""Routed experts: dispatch, grouped matmuls and combine against a per-token float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from leantrain.errors import UserError
from leantrain.moe.experts import Experts, grouped_mm_supported
from leantrain.moe.router import Routing

NUM_EXPERTS, TOP_K = 6, 2


def make_routing(num_tokens: int, dtype: torch.dtype, seed: int = 0) -> Routing:
    """Random top-2 routing that never picks expert 3, so one expert has no tokens."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([0, 1, 2, 4, 5])
    experts = torch.stack([allowed[torch.randperm(5, generator=gen)[:TOP_K]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOP_K, generator=gen, dtype=dtype).requires_grad_(True)
    probs = torch.full((num_tokens, NUM_EXPERTS), 1 / NUM_EXPERTS, dtype=dtype)
    return Routing(logits=probs.log(), probs=probs, experts=experts, weights=weights)


def reference_forward(x, gate_up, down, routing):
    """Token by token, expert by expert: sum_s w[n,s] * SwiGLU_{e[n,s]}(x[n])."""
    hidden = down.shape[1]
    out = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for s in range(routing.experts.shape[1]):
            e = routing.experts[n, s]
            h = x[n] @ gate_up[e]
            acc = acc + routing.weights[n, s] * ((F.silu(h[:hidden]) * h[hidden:]) @ down[e])
        out.append(acc)
    return torch.stack(out)


def run(experts, x, routing, grad_out):
    counts = torch.bincount(routing.experts.flatten(), minlength=NUM_EXPERTS)
    y = experts(x, routing, counts)
    y.backward(grad_out)
    return y, x.grad, experts.gate_up.grad, experts.down.grad, routing.weights.grad


@pytest.mark.parametrize("impl,dtype,tol", [("loop", torch.float64, 1e-12), ("grouped_mm", torch.float32, 2e-5),
                                            ("loop", torch.float32, 2e-5)])
def test_matches_per_token_reference(impl, dtype, tol):
    torch.manual_seed(0)
    dim, hidden, tokens = 16, 24, 37
    experts = Experts(dim, hidden, NUM_EXPERTS, impl=impl).to(dtype)
    x = torch.randn(tokens, dim, dtype=dtype, requires_grad=True)
    routing = make_routing(tokens, dtype)
    grad_out = torch.randn(tokens, dim, dtype=dtype)
    got = run(experts, x, routing, grad_out)

    gate_up = experts.gate_up.detach().double().requires_grad_(True)
    down = experts.down.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    weights64 = routing.weights.detach().double().requires_grad_(True)
    routing64 = Routing(routing.logits, routing.probs, routing.experts, weights64)
    ref = reference_forward(x64, gate_up, down, routing64)
    ref.backward(grad_out.double())
    expected = (ref, x64.grad, gate_up.grad, down.grad, weights64.grad)
    for name, g, e in zip(("out", "x", "gate_up", "down", "weights"), got, expected):
        scale = e.abs().max().item()
        assert (g.double() - e).abs().max().item() <= tol * scale, name
    assert experts.gate_up.grad[3].abs().max() == 0 and experts.down.grad[3].abs().max() == 0


def test_gradcheck_loop_float64():
    torch.manual_seed(1)
    experts = Experts(4, 3, NUM_EXPERTS, impl="loop").double()
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    routing = make_routing(7, torch.float64, seed=1)
    counts = torch.bincount(routing.experts.flatten(), minlength=NUM_EXPERTS)

    def fn(x, gate_up, down, weights):
        routing_w = Routing(routing.logits, routing.probs, routing.experts, weights)
        return torch.func.functional_call(experts, {"gate_up": gate_up, "down": down}, (x, routing_w, counts))

    inputs = (x, experts.gate_up.detach().clone().requires_grad_(True),
              experts.down.detach().clone().requires_grad_(True), routing.weights)
    assert torch.autograd.gradcheck(fn, inputs)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    experts = Experts(32, 64, NUM_EXPERTS, impl="auto")
    x = torch.randn(40, 32)
    routing = make_routing(40, torch.float32)
    counts = torch.bincount(routing.experts.flatten(), minlength=NUM_EXPERTS)
    ref = experts(x, routing, counts)
    with torch.autocast("cpu", torch.bfloat16):
        y = experts(x, routing, counts)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 3e-2 * ref.abs().max()
    y.float().sum().backward()
    assert experts.gate_up.grad.dtype == torch.float32 and experts.gate_up.grad.abs().sum() > 0


def test_grouped_mm_needs_aligned_rows():
    assert grouped_mm_supported(torch.float32, torch.device("cpu"), (16, 24))
    assert not grouped_mm_supported(torch.float32, torch.device("cpu"), (6, 24))
    assert not grouped_mm_supported(torch.float64, torch.device("cpu"), (16, 24))
    experts = Experts(6, 24, NUM_EXPERTS, impl="grouped_mm")
    routing = make_routing(5, torch.float32)
    counts = torch.bincount(routing.experts.flatten(), minlength=NUM_EXPERTS)
    with pytest.raises(UserError, match="moe.impl=grouped_mm"):
        experts(torch.randn(5, 6), routing, counts)
    experts.impl = "auto"  # falls back to the loop
    assert experts(torch.randn(5, 6), routing, counts).shape == (5, 6)


def test_loop_splits_large_experts_into_blocks(monkeypatch):
    """Experts with more rows than a block accumulate their weight gradients over blocks."""
    import leantrain.moe.experts as experts_module

    monkeypatch.setattr(experts_module, "_block_rows", lambda width, element_size: 4)
    torch.manual_seed(3)
    experts = Experts(8, 12, NUM_EXPERTS, impl="loop").double()
    x = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    routing = make_routing(23, torch.float64, seed=3)
    counts = torch.bincount(routing.experts.flatten(), minlength=NUM_EXPERTS)
    assert counts.max() > 8  # three blocks or more for some expert
    grad_out = torch.randn(23, 8, dtype=torch.float64)
    got = run(experts, x, routing, grad_out)
    gate_up = experts.gate_up.detach().clone().requires_grad_(True)
    down = experts.down.detach().clone().requires_grad_(True)
    x64 = x.detach().clone().requires_grad_(True)
    weights = routing.weights.detach().clone().requires_grad_(True)
    ref = reference_forward(x64, gate_up, down, Routing(routing.logits, routing.probs, routing.experts, weights))
    ref.backward(grad_out)
    for g, e in zip(got, (ref, x64.grad, gate_up.grad, down.grad, weights.grad)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
