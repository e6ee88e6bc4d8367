"""8-bit optimizer states and bf16 weights on CUDA: against the same algorithm on the CPU, and a closed form."""

import math

import pytest
import torch

from leantrain.optim import AdamW, AdamW8bit
from leantrain.optim.quantize import CodeTable, dequantize, num_blocks, quantize_
from leantrain.optim.rounding import stochastic_round_

pytestmark = pytest.mark.cuda


def moments_like(numel: int, signed: bool, seed: int) -> torch.Tensor:
    """Values over six orders of magnitude, as Adam's moments are, with some exact zeros and a ragged last block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.logspace(-6, 0, numel)[torch.randperm(numel, generator=gen)]
    x[::97] = 0.0
    return x if signed else x.square()


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_on_cuda_is_bitwise_the_cpus(signed):
    # Every operation is exact or one correctly rounded float32 division (abs, max, div, bucketize on
    # exact boundaries, a table lookup, one multiplication), so the two devices must agree bit for bit.
    x = moments_like(10_000, signed, seed=1)
    results = {}
    for device in ("cpu", "cuda"):
        table = CodeTable(signed, device)
        codes = torch.empty(x.shape, dtype=torch.uint8, device=device)
        absmax = torch.empty(num_blocks(x.numel()), dtype=torch.float32, device=device)
        quantize_(x.to(device), table, codes, absmax)
        results[device] = (codes.cpu(), absmax.cpu(), dequantize(codes, absmax, table).cpu())
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        assert cpu.dtype == cuda.dtype and torch.equal(cpu, cuda)


def test_adamw8bit_on_cuda_follows_the_cpu():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(256, 64, generator=gen) * 0.02, torch.randn(64, generator=gen) * 0.02]  # 8-bit, fp32 states
    grads = [[torch.randn(p.shape, generator=gen) * 10.0 ** -(step % 3) for p in init] for step in range(3)]
    lr = 1e-3
    runs = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(x.to(device)) for x in init]
        opt = AdamW8bit(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device)
            opt.step()
        runs[device] = (params, opt)
    (cpu_params, cpu_opt), (cuda_params, cuda_opt) = runs["cpu"], runs["cuda"]
    big, small = cuda_opt.state[cuda_params[0]], cuda_opt.state[cuda_params[1]]
    assert big["exp_avg_codes"].dtype == torch.uint8 and big["exp_avg_codes"].is_cuda and "exp_avg" in small
    # The moments' updates are elementwise float32 arithmetic that the two devices may round differently
    # in the last bit (fused multiply-adds), which moves an element across a code boundary only when
    # it lies within an ulp of one: a rare code differs, by an entry of the table. One entry is at
    # most 1.4% of the block's maximum (the top decade has 64 steps over [0.1, 1]): so are a
    # maximum that picked it up, and the element's update (about lr) over the steps.
    for cpu_p, cuda_p in zip(cpu_params, cuda_params):
        cpu_state, cuda_state = cpu_opt.state[cpu_p], cuda_opt.state[cuda_p]
        assert cpu_state.keys() == cuda_state.keys()
        for key, want in cpu_state.items():
            got = cuda_state[key]
            if not torch.is_tensor(want):
                assert got == want, key
            elif want.dtype == torch.uint8:
                # an element that diverged stays about one table step away: two codes at most
                assert (got.cpu() != want).float().mean() <= 0.01, key
                assert (got.cpu().int() - want.int()).abs().max() <= 2, key
            elif want.is_floating_point():
                torch.testing.assert_close(got.cpu(), want, rtol=2.0**-6, atol=1e-12, msg=key)
            else:
                assert torch.equal(got.cpu(), want), key
        torch.testing.assert_close(cuda_p.detach().cpu(), cpu_p.detach(), rtol=2.0**-18, atol=len(grads) * lr * 0.05)


def test_stochastic_rounding_on_cuda_picks_a_neighbour_with_the_right_odds():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(64, generator=gen).to(torch.bfloat16).float()  # 64 bf16 values, both signs
    high = (low.view(torch.int32) + (1 << 16)).view(torch.float32)  # the next bf16 away from zero
    value = low + torch.rand(64, generator=gen) * 0.99 * (high - low)  # strictly between (or at low)
    # Closed form: the 16 random bits carry into the kept ones with probability (discarded bits) / 2^16.
    p_up = (value.view(torch.int32) & 0xFFFF).double() / 2**16
    copies = 1 << 14
    target = torch.empty(copies * 64, dtype=torch.bfloat16, device="cuda")
    stochastic_round_(target, value.repeat(copies).cuda(), torch.Generator(device="cuda").manual_seed(1))
    got = target.float().cpu().view(copies, 64)
    assert ((got == low) | (got == high)).all()
    freq = (got == high).double().mean(0)
    # 5 standard deviations of a binomial frequency over 2^14 draws: a false alarm about once in 10^5 runs.
    assert ((freq - p_up).abs() <= 5 * (p_up * (1 - p_up) / copies).sqrt() + 1e-12).all()
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0], device="cuda")
    out = torch.empty(5, dtype=torch.bfloat16, device="cuda")
    stochastic_round_(out, special, torch.Generator(device="cuda").manual_seed(2))
    assert out[:2].tolist() == [math.inf, -math.inf] and out[2].isnan() and (out[3:] == 0).all()


def test_bf16_weights_with_8bit_states_on_cuda_track_the_cpu():
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(128, 64, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(128, 64, generator=gen) for _ in range(4)]
    lr = 1e-2
    runs = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(init.to(device))
        opt = AdamW([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0, state_bits=8, seed=3)
        for g in grads:
            p.grad = g.to(device, torch.bfloat16)
            opt.step()
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg_codes"].device.type == device
        runs[device] = p.detach().cpu().float()
    # The two devices draw different random bits, so each rounding may land on the other neighbour:
    # at most one bf16 ulp (2^-7 of the weight) per step apart, plus the codes' rare differences
    # (the test above), each worth a few percent of one update (about lr).
    ulp = runs["cpu"].abs() * 2.0**-7
    assert ((runs["cuda"] - runs["cpu"]).abs() <= len(grads) * (ulp + 0.05 * lr) + 1e-6).all()
