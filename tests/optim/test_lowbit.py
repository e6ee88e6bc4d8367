"""8-bit optimizer states: AdamW8bit and GaLoreAdamW8bit against float64 references of the same algorithm."""

import io
import math

import pytest
import torch

from leantrain.errors import UserError
from leantrain.optim import AdamW, AdamW8bit, GaLoreAdamW, GaLoreAdamW8bit
from leantrain.optim.groups import count_state_bytes
from leantrain.optim.quantize import BLOCK_SIZE, dynamic_map
from support import reference_quantize

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1


def dequantized(state: dict, name: str) -> torch.Tensor:
    """A moment in float64: the float32 state tensor, or its codes times its blocks' maxima."""
    if name in state:
        return state[name].double()
    codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
    values = dynamic_map(name == "exp_avg").double()[codes.long()].reshape(-1)
    return (values * absmax.double().repeat_interleave(BLOCK_SIZE)[: values.numel()]).view(codes.shape)


def gradients(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 0, shape[-1])  # columns over three orders of magnitude, as real gradients
    return [torch.randn(shape, generator=gen) * scales for _ in range(steps)]


def train(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


def assert_codes_close(codes, ref_codes):
    """Codes of a float32 computation against a float64 one: equal but for rare neighbours at a boundary."""
    diff = (codes.long() - ref_codes.long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_32_bit_is_torch_adamw_bit_for_bit(maximize):
    torch.manual_seed(0)
    w0 = torch.randn(64, 80)
    b0 = torch.randn(80)
    ours_p = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    torch_p = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    ours = AdamW([{"params": ours_p[:1]}, {"params": ours_p[1:], "weight_decay": 0.0}], lr=LR, betas=BETAS,
                 weight_decay=WD, maximize=maximize)
    ref = torch.optim.AdamW([{"params": torch_p[:1]}, {"params": torch_p[1:], "weight_decay": 0.0}], lr=LR,
                            betas=BETAS, weight_decay=WD, maximize=maximize, foreach=False)
    grads = [[g, g[0]] for g in gradients((64, 80), 5)]
    train(ours, ours_p, grads)
    train(ref, torch_p, grads)
    for a, b in zip(ours_p, torch_p):
        assert torch.equal(a, b)
    assert torch.equal(ours.state[ours_p[0]]["exp_avg_sq"], ref.state[torch_p[0]]["exp_avg_sq"])


def test_adamw_validates_like_torch():
    w = torch.zeros(3, requires_grad=True)
    for kwargs in (dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                   dict(weight_decay=-1.0), dict(amsgrad=True), dict(state_bits=4), dict(state_bits=True)):
        with pytest.raises(UserError):
            AdamW([w], **kwargs)
    with pytest.raises(UserError, match="state_bits"):
        GaLoreAdamW([w], state_bits=16)


def test_adamw8bit_step_matches_a_float64_reference():
    shape = (96, 100)  # 9600 elements: 37 full blocks and a partial one
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    opt = AdamW8bit([w], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    grads = gradients(shape, 4)
    train(opt, [w], [[g] for g in grads[:3]])
    state = opt.state[w]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == shape
    assert state["exp_avg_absmax"].shape == (math.ceil(9600 / BLOCK_SIZE),)
    # Dequantise -> Adam in float64 -> requantise, from the state the optimizer holds.
    m, v, p, g = dequantized(state, "exp_avg"), dequantized(state, "exp_avg_sq"), w.detach().double(), grads[3].double()
    t = 4
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    p = p * (1 - LR * WD) - LR / (1 - BETAS[0]**t) * m / (v.sqrt() / math.sqrt(1 - BETAS[1]**t) + EPS)
    train(opt, [w], [[grads[3]]])
    torch.testing.assert_close(w.detach().double(), p, rtol=1e-5, atol=1e-7)
    for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
        ref_codes, ref_absmax = reference_quantize(value, dynamic_map(name == "exp_avg"))
        torch.testing.assert_close(state[f"{name}_absmax"], ref_absmax, rtol=1e-6, atol=0)
        assert_codes_close(state[f"{name}_codes"], ref_codes)


def test_galore8bit_step_matches_a_float64_reference():
    shape = (256, 96)  # right projection: 256 x 32 low-rank moments (8192 elements, quantised)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    scale, rank = 0.25, 32
    opt = GaLoreAdamW8bit([{"params": [w], "rank": rank, "update_proj_gap": 100, "scale": scale}], lr=LR,
                          betas=BETAS, weight_decay=WD, decay_before_update=True)
    grads = gradients(shape, 4, seed=5)
    train(opt, [w], [[g] for g in grads[:3]])
    state = opt.state[w]
    assert state["exp_avg_codes"].shape == (256, rank) and "exp_avg" not in state
    q = state["proj_right"].double()
    m, v, p = dequantized(state, "exp_avg"), dequantized(state, "exp_avg_sq"), w.detach().double()
    low = grads[3].double() @ q.T
    t, eps = 4, 1e-6
    m = BETAS[0] * m + (1 - BETAS[0]) * low
    v = BETAS[1] * v + (1 - BETAS[1]) * low * low
    step_size = LR * math.sqrt(1 - BETAS[1]**t) / (1 - BETAS[0]**t)
    p = p * (1 - LR * WD) - step_size * scale * (m / (v.sqrt() + eps)) @ q
    train(opt, [w], [[grads[3]]])
    torch.testing.assert_close(w.detach().double(), p, rtol=1e-5, atol=1e-7)
    for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
        ref_codes, ref_absmax = reference_quantize(value, dynamic_map(name == "exp_avg"))
        torch.testing.assert_close(state[f"{name}_absmax"], ref_absmax, rtol=1e-5, atol=0)
        assert_codes_close(state[f"{name}_codes"], ref_codes)


def test_small_tensors_keep_float32_moments_and_state_shrinks_to_a_quarter():
    big = torch.zeros(512, 256, requires_grad=True)
    small = torch.zeros(4095, requires_grad=True)
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in opt.state[small]
    assert set(opt.state[big]) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    fp32 = AdamW([big])
    fp32.step()
    ratio = (count_state_bytes(opt) - 2 * 4 * 4095 - 4) / count_state_bytes(fp32)
    assert 0.25 < ratio <= 0.27  # 2 bytes + 8 / 256 per element against 8


@pytest.mark.parametrize("make", [
    lambda params: AdamW8bit(params, lr=LR, weight_decay=WD),
    lambda params: GaLoreAdamW8bit([{"params": params[:1], "rank": 32, "update_proj_gap": 3}, {"params": params[1:]}],
                                   lr=LR, switch="rotate"),
], ids=["adamw8bit", "galore8bit"])
def test_resume_through_weights_only_load_is_bit_exact(make):
    shapes = [(128, 64), (64, 80)]
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(10 * t + i)) for i, s in enumerate(shapes)]
             for t in range(8)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    straight_p = [x.clone().requires_grad_() for x in init]
    straight = make(straight_p)
    train(straight, straight_p, grads)
    first_p = [x.clone().requires_grad_() for x in init]
    first = make(first_p)
    train(first, first_p, grads[:5])
    buffer = io.BytesIO()
    torch.save({"optim": first.state_dict(), "params": [p.detach() for p in first_p]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_p = [x.clone().requires_grad_() for x in saved["params"]]
    resumed = make(resumed_p)
    resumed.load_state_dict(saved["optim"])
    for p in resumed_p:
        assert resumed.state[p]["exp_avg_codes"].dtype == torch.uint8
    train(resumed, resumed_p, grads[5:])
    for a, b in zip(straight_p, resumed_p):
        assert torch.equal(a, b)


def test_8bit_training_tracks_32_bit():
    """A least-squares problem: 8-bit AdamW and GaLore end within a few percent of their 32-bit runs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    target = x @ torch.randn(128, 64, generator=gen)

    def run(make):
        w = torch.zeros(128, 64, requires_grad=True)
        opt = make(w)
        for _ in range(150):
            loss = (x @ w - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (x @ w - target).square().mean().item()

    start = target.square().mean().item()
    for full, low in ((lambda w: AdamW([w], lr=0.05, weight_decay=0.0),
                       lambda w: AdamW8bit([w], lr=0.05, weight_decay=0.0)),
                      (lambda w: GaLoreAdamW([{"params": [w], "rank": 32, "update_proj_gap": 50}], lr=0.05),
                       lambda w: GaLoreAdamW8bit([{"params": [w], "rank": 32, "update_proj_gap": 50}], lr=0.05))):
        a, b = run(full), run(low)
        assert a < 0.2 * start and abs(b - a) <= 0.05 * a + 1e-3 * start
