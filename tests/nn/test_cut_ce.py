"""Cut cross-entropy against an independent float64 loss built on the full logit matrix."""

import os

import pytest
import torch
import torch.nn.functional as F

from leantrain.errors import UserError
from leantrain.nn.cut_ce import (
    LinearCrossEntropy,
    chunk_rows,
    linear_cross_entropy,
    resolve_filter_eps,
    resolve_impl,
    select_rows,
    triton_tiles,
    vocab_order,
    vocab_splits,
)

B, T, D, V = 2, 37, 48, 1000
SMALL_CHUNK = 16 * V * 4  # 16 tokens a chunk: the 74 tokens take several chunks and a ragged tail


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matmuls are tiny: one thread avoids waiting on a busy machine's second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(e, c, targets, bias=None, softcap=None, shift=0, z_loss=0.0, reduction="mean", ignore_index=-100):
    """Float64 loss and lse over the materialised logits, written from the definition."""
    e, c = e.double(), c.double()
    if shift:
        e, targets = e[..., :-shift, :], targets[..., shift:]
    logits = e @ c.T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    target_logit = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    per_token = torch.where(valid, lse - target_logit + z_loss * lse**2, 0.0)
    lse = torch.where(valid, lse, 0.0)
    if reduction == "mean":
        return per_token.sum() / valid.sum(), lse
    if reduction == "sum":
        return per_token.sum(), lse
    return per_token, lse


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference entry."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


def make_inputs(dtype=torch.float32, ignore=True, bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(B, T, D, generator=g) * scale).to(dtype).requires_grad_()
    c = (torch.randn(V, D, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        targets[0, :5] = -100
        targets[1, 11] = -100
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    return e, c, targets, b


CASES = {
    "plain": {},
    "ignore": {"ignore": True},
    "softcap": {"ignore": True, "softcap": 4.0},
    "shift": {"ignore": True, "shift": 1},
    "z_loss": {"ignore": True, "z_loss": 1e-2},
    "bias": {"ignore": True, "bias": True},
    "all": {"ignore": True, "bias": True, "softcap": 3.0, "shift": 2, "z_loss": 1e-3},
}


def run_case(case: str, reduction: str, impl: str = "torch", dtype=torch.float32, device="cpu", **extra):
    kw = dict(CASES[case])
    e, c, targets, bias = make_inputs(dtype, ignore=kw.pop("ignore", False), bias=kw.pop("bias", False))
    e, c, targets = e.detach().to(device).requires_grad_(), c.detach().to(device).requires_grad_(), targets.to(device)
    if bias is not None:
        bias = bias.detach().to(device).requires_grad_()
    params = [e, c] + ([bias] if bias is not None else [])
    loss, lse = linear_cross_entropy(e, c, targets, bias, reduction=reduction, return_lse=True, impl=impl,
                                     **kw, **extra)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(device) \
        if reduction == "none" else torch.tensor(1.7, device=device)
    grads = torch.autograd.grad(loss, params, upstream)

    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    ref_bias = ref_params[2] if bias is not None else None
    ref_loss, ref_lse = reference(ref_params[0], ref_params[1], targets.cpu(), ref_bias, reduction=reduction, **kw)
    ref_grads = torch.autograd.grad(ref_loss, ref_params, upstream.cpu().double())
    return (loss, lse, grads), (ref_loss, ref_lse, ref_grads)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64_reference(case, reduction):
    (loss, lse, grads), (ref_loss, ref_lse, ref_grads) = run_case(case, reduction, chunk_bytes=SMALL_CHUNK)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < 1e-5
    assert lse.shape == ref_lse.shape and rel_err(lse, ref_lse) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_naive_impl_matches_reference(reduction):
    (loss, lse, grads), (ref_loss, ref_lse, ref_grads) = run_case("all", reduction, impl="naive")
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_through_returned_lse(reduction):
    """A z-loss written by the user on the returned lse gets exact gradients (fused and recomputed paths)."""
    e, c, targets, bias = make_inputs(bias=True)
    loss, lse = linear_cross_entropy(e, c, targets, bias, reduction=reduction, return_lse=True, shift=1,
                                     chunk_bytes=SMALL_CHUNK)
    (loss.sum() + 0.05 * lse.square().sum()).backward()
    ref = [p.detach().double().requires_grad_() for p in (e, c, bias)]
    ref_loss, ref_lse = reference(*ref[:2], targets, ref[2], reduction=reduction, shift=1)
    (ref_loss.sum() + 0.05 * ref_lse.square().sum()).backward()
    for p, r in zip((e, c, bias), ref):
        assert rel_err(p.grad, r.grad) < 1e-5


def test_lse_only_gradient():
    """Backpropagating through lse alone (the loss unused) works on the fused path."""
    e, c, targets, _ = make_inputs()
    _, lse = linear_cross_entropy(e, c, targets, reduction="sum", return_lse=True, chunk_bytes=SMALL_CHUNK)
    lse.sum().backward()
    ref = [p.detach().double().requires_grad_() for p in (e, c)]
    reference(*ref, targets, reduction="sum")[1].sum().backward()
    assert rel_err(e.grad, ref[0].grad) < 1e-5 and rel_err(c.grad, ref[1].grad) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_inputs_within_bf16_tolerance(reduction):
    (loss, lse, grads), (ref_loss, ref_lse, ref_grads) = run_case("all", reduction, dtype=torch.bfloat16,
                                                                   chunk_bytes=SMALL_CHUNK)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    # The reference sees the same bf16-rounded inputs; what remains is bf16 matmul rounding.
    bf16_eps = 2.0**-8
    assert rel_err(loss, ref_loss) < bf16_eps
    assert rel_err(lse, ref_lse) < bf16_eps
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 4 * bf16_eps


def test_autocast_with_fp32_head():
    """The trainer's call: fp32 head weight, hidden states under bf16 autocast, summed loss."""
    e, c, targets, _ = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = e * 1.0  # stays fp32: autocast leaves elementwise ops alone
        loss = linear_cross_entropy(hidden, c, targets, reduction="sum", shift=1, chunk_bytes=SMALL_CHUNK)
    loss.backward()
    # The reference at the bf16-rounded inputs, as a Linear under autocast would see them.
    ref = [p.detach().bfloat16().double().requires_grad_() for p in (e, c)]
    ref_loss, _ = reference(*ref, targets, reduction="sum", shift=1)
    ref_loss.backward()
    assert loss.dtype == torch.float32 and c.grad.dtype == torch.float32 and e.grad.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 2.0**-8
    assert rel_err(c.grad, ref[1].grad) < 4 * 2.0**-8 and rel_err(e.grad, ref[0].grad) < 4 * 2.0**-8
    # Under autocast the matmuls really run in bf16: the result differs from the fp32 one.
    fp32 = linear_cross_entropy(e.detach(), c.detach(), targets, reduction="sum", shift=1)
    assert loss.item() != fp32.item()


def test_mixed_dtypes_promote_without_autocast():
    """bf16 hidden states with an fp32 head and no autocast compute in fp32: exact to 1e-5."""
    e, c, targets, _ = make_inputs()
    e_bf16 = e.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(e_bf16, c, targets, chunk_bytes=SMALL_CHUNK)
    loss.backward()
    ref = [e_bf16.detach().double().requires_grad_(), c.detach().double().requires_grad_()]
    ref_loss, _ = reference(*ref, targets)
    ref_loss.backward()
    assert rel_err(loss, ref_loss) < 1e-5
    assert e_bf16.grad.dtype == torch.bfloat16 and rel_err(e_bf16.grad, ref[0].grad) < 1e-2
    assert c.grad.dtype == torch.float32 and rel_err(c.grad, ref[1].grad) < 1e-5


def peaked_inputs():
    """Softmax peaked on a shared set of 100 frequent classes scattered through the vocabulary, as in a
    trained model; targets among the likely classes. Every other class has a probability near 1e-7."""
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    frequent = torch.randperm(V, generator=g)[:100]
    c = torch.randn(V, D, generator=g) * 0.3
    c[frequent] += 3.0 * direction
    e = 4.0 * direction + 0.5 * torch.randn(B, T, D, generator=g)
    with torch.no_grad():
        targets = (e @ c.T).topk(3, dim=-1).indices[..., 2]
    targets[0, :4] = -100
    return e.requires_grad_(), c.requires_grad_(), targets


def filter_reference(e, c, targets, reduction, eps):
    """Exact float64 gradients, and the most the entries with |softmax - onehot| < eps can contribute."""
    e64, c64 = e.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref_loss, _ = reference(e64, c64, targets, reduction=reduction)
    ref_de, ref_dc = torch.autograd.grad(ref_loss, (e64, c64), torch.ones_like(ref_loss))
    with torch.no_grad():
        probs = (e64 @ c64.T).softmax(-1)
        onehot = F.one_hot(targets.clamp(min=0), V).double()
        valid = (targets != -100)[..., None].double()
        weight = 1.0 / valid.sum() if reduction == "mean" else 1.0
        g = (probs - onehot) * valid * weight  # the exact logit gradient
        dropped = ((probs - onehot).abs() < eps).double() * g.abs()
        bound_de = dropped @ c64.abs()
        bound_dc = dropped.reshape(-1, V).T @ e64.abs().reshape(-1, D)
    return ref_loss, ref_de, ref_dc, bound_de, bound_dc


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_filtering_error_bounded_by_dropped_entries(reduction):
    eps = 1e-3
    e, c, targets = peaked_inputs()
    loss = linear_cross_entropy(e, c, targets, reduction=reduction, filter_eps=eps, chunk_bytes=SMALL_CHUNK)
    de, dc = torch.autograd.grad(loss, (e, c), torch.ones_like(loss))
    ref_loss, ref_de, ref_dc, bound_de, bound_dc = filter_reference(e, c, targets, reduction, eps)
    assert rel_err(loss, ref_loss) < 1e-5  # the loss itself is never filtered
    err_de = (de.double() - ref_de).abs()
    err_dc = (dc.double() - ref_dc).abs()
    # Rounding of the kept part, on top of the bound.
    slack_de = 1e-5 * ref_de.abs().max()
    slack_dc = 1e-5 * ref_dc.abs().max()
    assert (err_de <= bound_de + slack_de).all()
    assert (err_dc <= bound_dc + slack_dc).all()
    # The filter engaged: the classifier rows of the skipped blocks got no gradient at all. Sorting
    # gathered the 100 scattered frequent classes into the first blocks, so most rows are skipped.
    skipped = (dc == 0).all(dim=1) & (ref_dc != 0).any(dim=1)
    assert skipped.sum() > V // 2


def test_filtering_off_is_exact_on_the_same_data():
    e, c, targets = peaked_inputs()
    _, ref_de, ref_dc, _, _ = filter_reference(e, c, targets, "mean", 1e-3)
    de0, dc0 = torch.autograd.grad(linear_cross_entropy(e, c, targets, chunk_bytes=SMALL_CHUNK), (e, c))
    assert rel_err(de0, ref_de) < 1e-5 and rel_err(dc0, ref_dc) < 1e-5


def test_filter_eps_auto_is_machine_epsilon_over_32():
    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float32) == 2.0**-23 / 32
    assert resolve_filter_eps(None, torch.float32) is None
    assert resolve_filter_eps(1e-4, torch.float32) == 1e-4


def test_vocab_order_sorts_by_average_logit():
    e, c, targets, bias = make_inputs(bias=True)
    rows = select_rows(targets, -100, 0, V)
    order = vocab_order(e.detach().reshape(-1, D), c.detach(), bias.detach(), rows)
    valid = (targets != -100).reshape(-1)
    avg = (e.detach().reshape(-1, D)[valid].double() @ c.detach().double().T + bias.detach().double()).mean(0)
    assert torch.equal(order, avg.argsort(descending=True))


def test_chunk_rows_fit_the_budget():
    assert chunk_rows(128256, torch.float32, None, 128 * 2**20) == 256
    assert chunk_rows(128256, torch.float32, 30.0, 128 * 2**20) == 128  # tanh buffer too
    assert chunk_rows(128256, torch.bfloat16, None, 128 * 2**20) == 160  # plus the bf16 copy
    assert chunk_rows(10**9, torch.float32, None, 1) == 1
    for vocab in (1000, 32000, 256000):
        rows = chunk_rows(vocab, torch.float32, None, 2**24)
        assert rows * vocab * 4 <= 2**24


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_largest_temporary_is_one_chunk():
    """Peak memory of forward + backward beyond the returned gradients stays near one chunk of logits."""
    n, d, v, chunk = 2048, 256, 16000, 4 * 2**20
    e = torch.randn(n, d, requires_grad=True)
    c = (torch.randn(v, d) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,))
    linear_cross_entropy(e[:64], c, targets[:64], chunk_bytes=chunk).backward()  # warm up BLAS and autograd
    e.grad = c.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_bytes("VmRSS")
    linear_cross_entropy(e, c, targets, chunk_bytes=chunk).backward()
    extra = _status_bytes("VmHWM") - start
    grads = (e.numel() + c.numel()) * 4
    logits = n * v * 4  # 131 MB: what the naive loss holds (three times over)
    # A copy of dC (16 MB) or of the logits would break this.
    assert extra - grads < 3 * chunk, (extra, grads)
    assert extra - grads < logits / 10


def test_gradient_accumulation_and_scaled_loss():
    e, c, targets, _ = make_inputs()
    loss_a = linear_cross_entropy(e[:, :20], c, targets[:, :20], reduction="sum", chunk_bytes=SMALL_CHUNK)
    (0.5 * loss_a).backward()
    loss_b = linear_cross_entropy(e[:, 20:], c, targets[:, 20:], reduction="sum", chunk_bytes=SMALL_CHUNK)
    (0.5 * loss_b).backward()
    ref = [p.detach().double().requires_grad_() for p in (e, c)]
    (0.5 * reference(*ref, targets, reduction="sum")[0]).backward()
    assert rel_err(e.grad, ref[0].grad) < 1e-5 and rel_err(c.grad, ref[1].grad) < 1e-5


def test_only_one_input_requires_grad():
    e, c, targets, _ = make_inputs()
    (dc,) = torch.autograd.grad(linear_cross_entropy(e.detach(), c, targets, chunk_bytes=SMALL_CHUNK), (c,))
    (de,) = torch.autograd.grad(linear_cross_entropy(e, c.detach(), targets, chunk_bytes=SMALL_CHUNK), (e,))
    ref = [p.detach().double().requires_grad_() for p in (e, c)]
    reference(*ref, targets)[0].backward()
    assert rel_err(de, ref[0].grad) < 1e-5 and rel_err(dc, ref[1].grad) < 1e-5


def test_no_grad_forward_and_eval_loss():
    e, c, targets, _ = make_inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(e, c, targets, reduction="sum", chunk_bytes=SMALL_CHUNK)
    assert not loss.requires_grad
    assert rel_err(loss, reference(e.detach(), c.detach(), targets, reduction="sum")[0]) < 1e-5


def test_second_backward_through_fused_graph_is_refused():
    e, c, targets, _ = make_inputs()
    loss = linear_cross_entropy(e, c, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_all_tokens_ignored():
    e, c, targets, _ = make_inputs()
    targets = torch.full_like(targets, -100)
    assert torch.isnan(linear_cross_entropy(e, c, targets))  # as F.cross_entropy
    loss = linear_cross_entropy(e, c, targets, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and e.grad.abs().sum() == 0 and c.grad.abs().sum() == 0


def test_module_form_matches_function():
    e, c, targets, bias = make_inputs(bias=True)
    module = LinearCrossEntropy(reduction="sum", softcap=5.0, shift=1, z_loss=1e-3, chunk_bytes=SMALL_CHUNK)
    got = module(e, c, targets, bias)
    want = linear_cross_entropy(e, c, targets, bias, reduction="sum", softcap=5.0, shift=1, z_loss=1e-3)
    assert torch.allclose(got, want, rtol=1e-6)
    assert "reduction='sum'" in repr(module)


def test_ddp_single_process_gets_the_forward_computed_gradients():
    """DDP's reducer sees the gradients that the fused path computed in the forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Head(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

        def forward(self, hidden, targets):
            return linear_cross_entropy(hidden, self.weight, targets, reduction="sum", chunk_bytes=SMALL_CHUNK)

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    e, c, targets, _ = make_inputs()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DistributedDataParallel(Head(c.detach()))
        model(e.detach(), targets).backward()
    finally:
        dist.destroy_process_group()
    ref = c.detach().double().requires_grad_()
    reference(e.detach(), ref, targets, reduction="sum")[0].backward()
    assert rel_err(model.module.weight.grad, ref.grad) < 1e-5


@pytest.mark.parametrize("kwargs, key", [
    ({"reduction": "avg"}, "reduction"),
    ({"impl": "cuda"}, "impl"),
    ({"softcap": 0.0}, "softcap"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"shift": -1}, "shift"),
    ({"shift": T}, "shift"),
    ({"filter_eps": "fast"}, "filter_eps"),
    ({"chunk_bytes": 0}, "chunk_bytes"),
])
def test_bad_options_raise_user_error_naming_the_key(kwargs, key):
    e, c, targets, _ = make_inputs()
    with pytest.raises(UserError, match=key):
        linear_cross_entropy(e, c, targets, **kwargs)


def test_bad_inputs_raise_user_error():
    e, c, targets, _ = make_inputs()
    bad = targets.clone()
    bad[0, 7] = V
    with pytest.raises(UserError, match=f"target {V}"):
        linear_cross_entropy(e, c, bad)
    with pytest.raises(UserError, match="targets"):
        linear_cross_entropy(e, c, targets[:, :-1])
    with pytest.raises(UserError, match="integer"):
        linear_cross_entropy(e, c, targets.float())
    with pytest.raises(UserError, match="c"):
        linear_cross_entropy(e, c[:, :-1], targets)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_triton_on_cpu_is_an_error_and_auto_is_torch():
    e, c, targets, _ = make_inputs()
    with pytest.raises(UserError, match="impl='triton'"):
        linear_cross_entropy(e, c, targets, impl="triton")
    assert resolve_impl("auto", e) == "torch"


def test_triton_tiles_and_vocab_splits():
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            t = triton_tiles(dtype, backward)
            for size in (t.block_m, t.block_v, t.block_d):
                assert size >= 16 and size & (size - 1) == 0  # tl.dot needs powers of two >= 16
            # Pipelined e and c blocks fit 96 KiB of shared memory.
            itemsize = torch.finfo(dtype).bits // 8
            assert t.num_stages * (t.block_m + t.block_v) * t.block_d * itemsize <= 96 * 2**10
    tiles = triton_tiles(torch.bfloat16, backward=False)
    for n_rows, vocab, sms in [(8192, 256000, 132), (8192, 128256, 108), (100, 1000, 132), (1, 17, 8), (10**5, 300, 1)]:
        splits, per_split = vocab_splits(n_rows, vocab, tiles, sms)
        assert per_split % tiles.block_v == 0
        assert (splits - 1) * per_split < vocab <= splits * per_split  # covers V, no empty split
        row_blocks = -(-n_rows // tiles.block_m)
        assert splits == 1 or row_blocks * (splits - 1) < 4 * sms  # splits only as far as needed


# Without CUDA the `cuda` marker skips these (conftest.py) and says so; with CUDA Triton must be there too.
needs_triton = pytest.mark.skipif(torch.cuda.is_available() and __import__("importlib").util.find_spec("triton") is None,
                                  reason="needs Triton")


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "softcap", "shift", "z_loss", "bias", "all"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_fp32_matches_float64_reference(impl, case, reduction):
    torch.backends.cuda.matmul.allow_tf32 = False
    (loss, lse, grads), (ref_loss, ref_lse, ref_grads) = run_case(case, reduction, impl=impl, device="cuda")
    assert rel_err(loss.cpu(), ref_loss) < 1e-5 and rel_err(lse.cpu(), ref_lse) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.cpu(), want) < 1e-5


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_gpu_triton_matches_the_torch_path(case, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    (loss, lse, grads), _ = run_case(case, "none", impl="triton", dtype=dtype, device="cuda")
    (ref_loss, ref_lse, ref_grads), _ = run_case(case, "none", impl="torch", dtype=dtype, device="cuda")
    # Each path is within a tolerance of float64 (the tests around this one: fp32 1e-5; bf16 2^-8 for
    # loss and lse, 4 * 2^-8 for gradients), so the two are within twice that of each other.
    loss_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (2.0**-8, 4 * 2.0**-8)
    assert rel_err(loss, ref_loss) < 2 * loss_tol and rel_err(lse, ref_lse) < 2 * loss_tol
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == dtype and rel_err(got, want) < 2 * grad_tol


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_triton_bf16_within_bf16_tolerance(reduction):
    (loss, lse, grads), (ref_loss, ref_lse, ref_grads) = run_case("all", reduction, impl="triton",
                                                                   dtype=torch.bfloat16, device="cuda")
    # The kernels keep fp32 logits, so they are at least as close as the CPU path.
    assert rel_err(loss.cpu(), ref_loss) < 2.0**-8 and rel_err(lse.cpu(), ref_lse) < 2.0**-8
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16 and rel_err(got.cpu(), want) < 4 * 2.0**-8


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_triton_filtering_bounded(reduction):
    torch.backends.cuda.matmul.allow_tf32 = False
    eps = 1e-3
    e, c, targets = peaked_inputs()
    e_cuda, c_cuda = e.detach().cuda().requires_grad_(), c.detach().cuda().requires_grad_()
    loss = linear_cross_entropy(e_cuda, c_cuda, targets.cuda(), reduction=reduction, filter_eps=eps, impl="triton")
    de, dc = (g.cpu().double() for g in torch.autograd.grad(loss, (e_cuda, c_cuda), torch.ones_like(loss)))
    ref_loss, ref_de, ref_dc, bound_de, bound_dc = filter_reference(e, c, targets, reduction, eps)
    assert rel_err(loss.cpu(), ref_loss) < 1e-5
    assert ((de - ref_de).abs() <= bound_de + 1e-5 * ref_de.abs().max()).all()
    assert ((dc - ref_dc).abs() <= bound_dc + 1e-5 * ref_dc.abs().max()).all()


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_cpu_benchmark_runs_and_ours_uses_less_memory():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "cce.py"
    spec = importlib.util.spec_from_file_location("cce_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--tokens", "512", "--dim", "64", "--vocab", "8000", "--repeats", "1",
                          "--methods", "naive,ours", "--chunk-bytes", str(2**20)])
    naive, ours = summary["methods"]["naive"], summary["methods"]["ours"]
    assert abs(naive["loss"] - ours["loss"]) < 1e-4 * naive["loss"]
    assert ours["beyond_grads_bytes"] < naive["beyond_grads_bytes"] / 4
