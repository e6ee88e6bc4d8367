"""GaLoreAdamW against a float64 straight-line reference, for every option and matrix shape."""

import io
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from leantrain.errors import UserError
from leantrain.optim import projector
from leantrain.optim.galore import GaLoreAdamW, stagger_offsets
from leantrain.optim.groups import count_state_bytes

SHAPES = {"tall": (12, 7), "wide": (7, 12), "square": (9, 9)}
LR, BETAS, EPS, WD, SCALE, GAP = 0.02, (0.9, 0.99), 1e-6, 0.05, 0.5, 5


def gradient(w: torch.Tensor, t: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A gradient that depends on the weights and changes over time, so the subspace moves."""
    return a @ w @ b + torch.sin((t + 1) * w) + 0.1 * t


def problem(shape, dtype=torch.float64):
    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    return (torch.randn(m, n, generator=gen, dtype=dtype), torch.randn(m, m, generator=gen, dtype=dtype) / m,
            torch.randn(n, n, generator=gen, dtype=dtype) / n)


def reference_galore(w0, a, b, steps, *, rank, proj_type, switch, decay_first, offset=0):
    """GaLore AdamW for one matrix, written out with explicit identity bases, in float64."""
    w = w0.clone()
    m, n = w.shape
    k = min(rank, m, n)
    sides = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}
    side = sides.get(proj_type, proj_type)
    eye_m, eye_n = torch.eye(m, dtype=w.dtype), torch.eye(n, dtype=w.dtype)
    p_mat = q_mat = None
    mom = var = None
    t_adam = 0
    for t in range(steps):
        g = gradient(w, t, a, b)
        if p_mat is None or (t - offset) % GAP == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new_p = u[:, :k] if side in ("left", "full") else eye_m
            new_q = vh[:k] if side in ("right", "full") else eye_n
            if p_mat is not None and switch == "reset":
                mom, var, t_adam = torch.zeros_like(mom), torch.zeros_like(var), 0
            elif p_mat is not None and switch == "rotate":
                r_left, r_right = new_p.T @ p_mat, q_mat @ new_q.T
                mom = r_left @ mom @ r_right
                var = r_left.square() @ var @ r_right.square()
            p_mat, q_mat = new_p, new_q
        low = p_mat.T @ g @ q_mat.T
        if mom is None:
            mom, var = torch.zeros_like(low), torch.zeros_like(low)
        t_adam += 1
        mom = BETAS[0] * mom + (1 - BETAS[0]) * low
        var = BETAS[1] * var + (1 - BETAS[1]) * low**2
        step_size = LR * math.sqrt(1 - BETAS[1] ** t_adam) / (1 - BETAS[0] ** t_adam)
        update = SCALE * p_mat @ (mom / (var.sqrt() + EPS)) @ q_mat
        if decay_first:
            w = w * (1 - LR * WD) - step_size * update
        else:
            w = w - step_size * update
            w = w - LR * WD * w
    return w


def run_ours(w0, a, b, steps, *, dtype=torch.float64, **options):
    group_keys = ("rank", "proj_type", "refresh_offset")
    group = {k: options.pop(k) for k in group_keys if k in options}
    weight = torch.nn.Parameter(w0.clone().to(dtype))
    opt = GaLoreAdamW([{"params": [weight], "update_proj_gap": GAP, "scale": SCALE, **group}], lr=LR, betas=BETAS,
                      eps=EPS, weight_decay=WD, **options)
    for t in range(steps):
        weight.grad = gradient(weight.detach(), t, a.to(dtype), b.to(dtype))
        opt.step()
    return weight.detach(), opt


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("proj_type", projector.PROJ_TYPES)
def test_every_option_matches_float64_reference(shape, proj_type):
    w0, a, b = problem(shape)
    for rank in (3, 20):  # 20 >= min(m, n): the basis keeps every direction
        for switch in ("keep", "reset", "rotate"):
            for decay_first in (False, True):
                expected = reference_galore(w0, a, b, 23, rank=rank, proj_type=proj_type, switch=switch,
                                            decay_first=decay_first)
                got, _ = run_ours(w0, a, b, 23, rank=rank, proj_type=proj_type, switch=switch,
                                  decay_before_update=decay_first, foreach=decay_first)  # both Adam paths
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9,
                                           msg=f"rank {rank} switch {switch} decay_first {decay_first}")


def test_options_change_the_result():
    """Sanity of the reference test: each option alters the trajectory."""
    w0, a, b = problem((12, 7))
    base = reference_galore(w0, a, b, 23, rank=3, proj_type="std", switch="keep", decay_first=False)
    for kwargs in (dict(switch="reset"), dict(switch="rotate"), dict(decay_first=True), dict(proj_type="left")):
        options = dict(rank=3, proj_type="std", switch="keep", decay_first=False) | kwargs
        assert not torch.allclose(reference_galore(w0, a, b, 23, **options), base, rtol=1e-6, atol=1e-6)


def test_full_rank_projection_is_lossless():
    w0, a, b = problem((12, 7))
    g = gradient(w0, 0, a, b)
    for side in ("left", "right", "full"):
        left, right = projector.exact_basis(g, 7, side)
        back = torch.zeros_like(g)
        projector.add_projected_back_(back, projector.project(g, side, left, right), side, left, right, alpha=1.0)
        torch.testing.assert_close(back, g)


def test_rotate_is_exact_when_the_subspace_only_reorders():
    """New basis = old basis with permuted, sign-flipped vectors: rotate must carry the moments over exactly."""
    w0, a, b = problem((12, 7))
    g = gradient(w0, 0, a, b)
    _, old_right = projector.exact_basis(g, 4, "right")
    perm = torch.tensor([2, 0, 3, 1])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=g.dtype)
    new_right = old_right[perm] * signs[:, None]
    _, r_right = projector.change_of_basis("right", None, old_right, None, new_right)
    moment = torch.randn(12, 4, dtype=g.dtype)
    rotated = projector.apply_change(moment, None, r_right)
    # The same full-space update before and after.
    torch.testing.assert_close(rotated @ new_right, moment @ old_right)
    torch.testing.assert_close(projector.apply_change(moment.square(), None, r_right.square()), rotated.square())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_stagger_offsets_match_reference_refresh_schedule(shape):
    w0, a, b = problem(shape)
    expected = reference_galore(w0, a, b, 17, rank=3, proj_type="std", switch="keep", decay_first=False, offset=3)
    got, _ = run_ours(w0, a, b, 17, rank=3, proj_type="std", refresh_offset=3)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_stagger_spreads_refreshes(monkeypatch):
    assert stagger_offsets([8] * 4, False) == [0, 0, 0, 0]
    assert stagger_offsets([8] * 4, True) == [0, 2, 4, 6]
    assert stagger_offsets([8] * 4, 2) == [0, 4, 0, 4]
    calls = []
    real = projector.exact_basis
    monkeypatch.setattr(projector, "exact_basis", lambda g, k, side: calls.append(step) or real(g, k, side))
    weights = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": weights, "rank": 2, "update_proj_gap": 8}], stagger=True)
    for step in range(17):
        for w in weights:
            w.grad = torch.randn(6, 5)
        opt.step()
    per_step = [calls.count(s) for s in range(17)]
    assert per_step[0] == 4  # every matrix needs a first basis
    assert per_step[1:] == [0, 1] * 8  # one refresh every other step, never all four at once


def test_randomized_basis_recovers_a_low_rank_subspace():
    gen = torch.Generator().manual_seed(1)
    for (m, n), side in (((60, 40), "right"), ((40, 60), "left"), ((50, 50), "full"), ((60, 40), "left")):
        g = torch.randn(m, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, n, generator=gen,
                                                                                 dtype=torch.float64)
        exact = projector.exact_basis(g, 5, side)
        approx = projector.randomized_basis(g, 5, side, oversample=3, power_iters=1, generator=gen)
        for e, r in zip(exact, approx):
            if e is None:
                assert r is None
                continue
            gram = r.T @ r if r.shape[0] > r.shape[1] else r @ r.T
            torch.testing.assert_close(gram, torch.eye(5, dtype=gram.dtype))
            proj_e = e @ e.T if e.shape[0] > e.shape[1] else e.T @ e
            proj_r = r @ r.T if r.shape[0] > r.shape[1] else r.T @ r
            torch.testing.assert_close(proj_r, proj_e, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16])
def test_randomized_basis_captures_nearly_the_exact_energy(sketch_dtype):
    gen = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(200, 120, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(120, 120, generator=gen)).Q
    g = (u * 0.95 ** torch.arange(120.0)) @ v.T  # a decaying spectrum, as gradients have
    for side in ("left", "right", "full"):
        exact = projector.project(g, side, *projector.exact_basis(g, 16, side)).norm()
        basis = projector.randomized_basis(g, 16, side, 8, 1, gen, sketch_dtype)
        for b in basis:  # orthonormal to float32 precision, whatever the sketch's precision
            if b is not None:
                gram = b.T @ b if b.shape[0] > b.shape[1] else b @ b.T
                torch.testing.assert_close(gram, torch.eye(16), atol=1e-5, rtol=0)
        approx = projector.project(g, side, *basis).norm()
        assert approx <= exact * (1 + 1e-5)
        assert approx >= 0.97 * exact


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
def test_randomized_signs_follow_the_previous_basis(sketch_dtype):
    gen = torch.Generator().manual_seed(8)
    u = torch.linalg.qr(torch.randn(30, 3, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(20, 3, generator=gen)).Q
    g = (u * torch.tensor([10.0, 5.0, 2.0])) @ v.T
    w = torch.nn.Parameter(torch.zeros(30, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 1}], svd="randomized", sketch_dtype=sketch_dtype)
    bases = []
    for _ in range(4):  # every step refreshes, each with a new random test matrix
        w.grad = g.clone()
        opt.step()
        bases.append(opt.state[w]["proj_right"].clone())
    for later in bases[1:]:
        assert ((later * bases[0]).sum(1) > 0.99).all()


def test_guard_keeps_the_basis_on_nan_gradient_and_svd_failure(monkeypatch):
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1}])
    w.grad = torch.randn(8, 6)
    opt.step()
    basis = opt.state[w]["proj_right"].clone()
    w.grad = torch.full((8, 6), float("nan"))
    with pytest.warns(RuntimeWarning, match="kept the previous subspace"):
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], basis)

    def failing_svd(*args):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(projector, "exact_basis", failing_svd)
    w.grad = torch.randn(8, 6)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], basis)
    assert opt.refresh_failures == 2


def test_guard_skips_a_matrix_without_any_basis():
    w = torch.nn.Parameter(torch.randn(8, 6))
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.full((8, 6), float("inf"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(w.detach(), before) and opt.state[w]["step"].item() == 0
    w.grad = torch.randn(8, 6)
    opt.step()
    assert opt.state[w]["step"].item() == 1 and not torch.equal(w.detach(), before)


def test_rejects_tensors_that_are_not_matrices():
    for shape in ((5,), (2, 3, 4)):
        with pytest.raises(UserError, match="2-D matrices only"):
            GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(*shape))], "rank": 2}])
    GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(2, 3, 4))]}])  # dense groups take any shape


@pytest.mark.parametrize("bad", [dict(proj_type="diagonal"), dict(rank=0), dict(update_proj_gap=1.5),
                                 dict(svd="lanczos"), dict(switch="swap"), dict(refresh_offset=-1),
                                 dict(sketch_dtype="float16"), dict(foreach="yes"), dict(power_iters=0)])
def test_rejects_bad_group_options(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 2, **bad}])


def test_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    for kwargs in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1),
                   dict(stagger=-2), dict(stagger="yes")):
        with pytest.raises(UserError):
            GaLoreAdamW(p, **kwargs)


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("options", [dict(), dict(svd="randomized", switch="rotate", stagger=True),
                                     dict(switch="reset")], ids=["default", "randomized-rotate", "reset"])
def test_state_dict_round_trip_and_resume(options):
    gen = torch.Generator().manual_seed(3)
    shapes = [(10, 6), (6, 10), (8, 8), (6,)]
    init = [torch.randn(*s, generator=gen) for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(14)]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = GaLoreAdamW([{"params": params[:3], "rank": 3, "update_proj_gap": 4, "proj_type": "full"},
                           {"params": params[3:]}], weight_decay=0.01, **options)
        return params, opt

    straight_params, straight = make()
    _train(straight, straight_params, grads)

    first_params, first = make()
    _train(first, first_params, grads[:7])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first_params], "optim": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params, resumed = make()
    with torch.no_grad():
        for p, value in zip(resumed_params, saved["params"]):
            p.copy_(value)
    resumed.load_state_dict(saved["optim"])
    for p in resumed_params:
        state = resumed.state[p]
        assert state["step"].device.type == "cpu" and state["moment_step"].device.type == "cpu"
        assert all(v.device == p.device for k, v in state.items() if k not in ("step", "moment_step"))
    assert count_state_bytes(resumed) == count_state_bytes(first)
    _train(resumed, resumed_params, grads[7:])
    for a, b in zip(straight_params, resumed_params):
        assert torch.equal(a, b)


def test_counters_stay_exact_with_low_precision_parameters():
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn(6, 4, dtype=torch.bfloat16)
    opt.step()
    opt.state[w]["step"].fill_(1001.0)
    opt.state[w]["moment_step"].fill_(1001.0)
    other = GaLoreAdamW([{"params": [w], "rank": 2}])
    other.load_state_dict(opt.state_dict())
    assert other.state[w]["moment_step"].dtype == torch.float32
    assert other.state[w]["moment_step"].item() == 1001.0 and other.state[w]["step"].item() == 1001.0
    # bf16 weights keep float32 moments (the update is computed in float32), and a load keeps them so.
    assert other.state[w]["exp_avg"].dtype == torch.float32


def test_sliced_dense_update_equals_the_whole_tensor_update(monkeypatch):
    from leantrain.optim import galore

    results = []
    for slice_elements in (1 << 22, 7):
        monkeypatch.setattr(galore, "_DENSE_SLICE", slice_elements)
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((10, 3), (2, 9, 2), (30,), ())]
        opt = GaLoreAdamW(params, lr=0.1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for whole, sliced in zip(*results):
        assert torch.equal(whole, sliced)


def test_auto_sketch_dtype_keeps_float64_and_follows_the_device_otherwise():
    from leantrain.optim.projector import default_sketch_dtype, sketch_dtype_for

    assert sketch_dtype_for("auto", torch.zeros(2, 2, dtype=torch.float64)) == torch.float64
    assert sketch_dtype_for("auto", torch.zeros(2, 2)) == default_sketch_dtype("cpu")
    assert sketch_dtype_for("bfloat16", torch.zeros(2, 2, dtype=torch.float64)) == torch.bfloat16
    assert sketch_dtype_for("float32", torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.float32


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while it is active, less those that existed before."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key and key not in self.known and key not in self.live:
                    self.live[key] = t.untyped_storage().nbytes()
                    self.peak = max(self.peak, sum(self.live.values()))
                    weakref.finalize(t, self.live.pop, key, None)
        return out


@pytest.mark.parametrize("foreach", [False, True])
def test_unbatched_step_holds_one_matrix_of_temporaries_at_a_time(foreach):
    """Without foreach kernels each matrix is finished before the next is projected; with them, the group is batched."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(64, 48, generator=gen)) for _ in range(8)]
    opt = GaLoreAdamW([{"params": params, "rank": 8}], lr=0.01, foreach=foreach)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # creates the state and the bases
    existing = params + [p.grad for p in params] + [t for s in opt.state.values() for t in s.values()]
    with _LiveBytes(existing) as live:
        opt.step()
    one_matrix = 64 * 8 * 4  # a projected gradient or an update, 64 x rank 8 float32
    if foreach:
        assert live.peak >= len(params) * 2 * one_matrix
    else:
        assert 0 < live.peak <= 3 * one_matrix
