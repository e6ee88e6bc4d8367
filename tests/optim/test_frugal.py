"""FRUGAL against independent references: torch AdamW, a hand-written signSGD, and a float64 naive split."""

import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from leantrain.errors import UserError
from leantrain.optim.frugal import FRUGAL, subspace_size
from support import exit_rank, run_rank_scripts

SHAPES = {"tall": (12, 6), "wide": (6, 12), "square": (8, 8)}
SPLIT_SELECTIONS = ("columns", "rows", "randk", "svd", "random")
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def make_params(shapes, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def gradients(params, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def frugal_groups(projected, dense=()):
    groups = [{"params": list(projected), "projectable": True}]
    if dense:
        groups.append({"params": list(dense)})
    return groups


# --- density 1 is AdamW, density 0 is signSGD -------------------------------------------------------------


@pytest.mark.parametrize("selection", ("block", "columns", "rows", "randk"))
@pytest.mark.parametrize("reset, gap", [(True, 100), (False, 3)])
def test_density_one_equals_adamw(selection, reset, gap):
    shapes = list(SHAPES.values())
    ours = make_params(shapes + [(5,), (7, 4)])
    ref = make_params(shapes + [(5,), (7, 4)])
    opt = FRUGAL(frugal_groups(ours[:3], ours[3:]), **HP, density=1.0, selection=selection,
                 update_gap=gap, reset_statistics=reset)
    ref_opt = torch.optim.AdamW(ref, **HP, foreach=False)
    for t in range(7):
        for p, q, g in zip(ours, ref, gradients(ours, t)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("selection", ("block",) + SPLIT_SELECTIONS)
def test_density_zero_signsgd_equals_signsgd(selection):
    shapes = list(SHAPES.values())
    ours = make_params(shapes)
    ref = [p.detach().double().clone() for p in ours]
    lr, wd, scale = 1e-2, 0.1, 0.5
    opt = FRUGAL(frugal_groups(ours), lr=lr, weight_decay=wd, density=0.0, selection=selection,
                 state_free="signsgd", inactive_lr_scale=scale, update_gap=2)
    for t in range(5):
        grads = gradients(ours, t)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for q, g in zip(ref, grads):
            q.mul_(1 - lr * wd).sub_(lr * scale * torch.sign(g.double()))
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.double(), q, atol=1e-6, rtol=0)
    moment_numel = sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)
    assert moment_numel == 0


# --- the split against a float64 naive reference ------------------------------------------------------------


class NaiveSplit:
    """FRUGAL's split written as explicit float64 matrices: low = G P^T (right) or Q^T G (left)."""

    def __init__(self, weight: torch.Tensor, selection: str, state_free: str, lr: float, betas, eps: float,
                 weight_decay: float, full_scale: float, free_scale: float):
        self.w = weight.detach().double().clone()
        self.selection, self.state_free = selection, state_free
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.full_scale, self.free_scale = full_scale, free_scale

    def new_subspace(self, grad: torch.Tensor, implementation_state: dict) -> None:
        m, n = self.w.shape
        s = self.selection
        if s == "columns":
            self.right, self.basis = True, torch.eye(n, dtype=torch.float64)[implementation_state["indices"]]
        elif s == "rows":
            self.right, self.basis = False, torch.eye(m, dtype=torch.float64)[:, implementation_state["indices"]]
        elif s == "randk":
            self.mask = torch.zeros(m * n, dtype=torch.bool)
            self.mask[implementation_state["indices"]] = True
        elif s == "svd":
            u, _, vh = torch.linalg.svd(grad.double())
            self.right = m >= n
            r = subspace_size(n if self.right else m, self.density)
            self.basis = vh[:r] if self.right else u[:, :r]
        else:
            self.right = m >= n
            self.basis = implementation_state["projection"].double()
        low = self.down(torch.zeros_like(self.w))
        self.m1, self.m2, self.t = torch.zeros_like(low), torch.zeros_like(low), 0

    def down(self, full):
        if self.selection == "randk":
            return full.reshape(-1)[self.mask]
        return full @ self.basis.T if self.right else self.basis.T @ full

    def up(self, low):
        if self.selection == "randk":
            full = torch.zeros(self.w.numel(), dtype=torch.float64)
            full[self.mask] = low
            return full.reshape(self.w.shape)
        return low @ self.basis if self.right else self.basis @ low

    def step(self, grad: torch.Tensor) -> None:
        g = grad.double()
        b1, b2 = self.betas
        low = self.down(g)
        self.t += 1
        self.m1 = b1 * self.m1 + (1 - b1) * low
        self.m2 = b2 * self.m2 + (1 - b2) * low * low
        m_hat = self.m1 / (1 - b1**self.t)
        v_hat = self.m2 / (1 - b2**self.t)
        adam = m_hat / (v_hat.sqrt() + self.eps)
        residual = g - self.up(low)
        free = {"signsgd": torch.sign(residual), "sgd": residual, "none": torch.zeros_like(residual)}[self.state_free]
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * self.full_scale * self.up(adam) \
            - self.lr * self.free_scale * free


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", SPLIT_SELECTIONS)
def test_split_matches_float64_reference(selection, shape):
    density, gap = 0.5, 3
    (p,) = make_params([SHAPES[shape]])
    cfg = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = FRUGAL(frugal_groups([p]), **cfg, density=density, selection=selection, update_gap=gap,
                 state_full_lr_scale=2.0, inactive_lr_scale=0.5)
    ref = NaiveSplit(p, selection, "signsgd", cfg["lr"], cfg["betas"], cfg["eps"], cfg["weight_decay"], 2.0, 0.5)
    ref.density = density
    m, n = SHAPES[shape]
    for t in range(7):
        (g,) = gradients([p], t)
        p.grad = g.clone()
        opt.step()
        state = opt.state[p]
        if t % gap == 0:
            ref.new_subspace(g, state)
            if selection in ("columns", "rows", "randk"):
                total = {"columns": n, "rows": m, "randk": m * n}[selection]
                assert state["indices"].dtype == torch.int32
                assert state["indices"].tolist() == sorted(set(state["indices"].tolist()))
                assert len(state["indices"]) == subspace_size(total, density)
            elif selection == "random":
                basis = state["projection"].double()
                gram = basis @ basis.T if m >= n else basis.T @ basis
                torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
        ref.step(g)
        torch.testing.assert_close(p.double(), ref.w, atol=2e-5, rtol=0)
    # The moments hold only the subspace: a density fraction of the weight (of its shorter side for bases).
    expected = {"columns": m * subspace_size(n, density), "rows": subspace_size(m, density) * n,
                "randk": subspace_size(m * n, density)}.get(selection, max(m, n) * subspace_size(min(m, n), density))
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == expected


@pytest.mark.parametrize("state_free", ("sgd", "none"))
def test_other_state_free_rules(state_free):
    (p,) = make_params([SHAPES["tall"]])
    opt = FRUGAL(frugal_groups([p]), lr=1e-2, density=0.5, selection="columns", state_free=state_free, update_gap=4)
    ref = NaiveSplit(p, "columns", state_free, 1e-2, (0.9, 0.999), 1e-8, 0.0, 1.0, 1.0)
    for t in range(5):
        (g,) = gradients([p], t)
        p.grad = g.clone()
        opt.step()
        if t % 4 == 0:
            ref.new_subspace(g, opt.state[p])
        ref.step(g)
    torch.testing.assert_close(p.double(), ref.w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("selection", ("columns", "rows", "randk"))
def test_kept_statistics_follow_their_coordinates(selection):
    """reset_statistics=False: a coordinate that stays selected keeps its moments, a new one starts at 0."""
    (p,) = make_params([SHAPES["wide"]])
    lr, (b1, b2), eps = 1e-2, (0.9, 0.99), 1e-8
    opt = FRUGAL(frugal_groups([p]), lr=lr, betas=(b1, b2), eps=eps, density=0.5, selection=selection,
                 update_gap=2, reset_statistics=False)
    w = p.detach().double().clone()
    m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
    masks = []
    for t in range(8):
        (g,) = gradients([p], t)
        p.grad = g.clone()
        opt.step()
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        idx = opt.state[p]["indices"].long()
        if selection == "columns":
            mask.view(w.shape)[:, idx] = True
        elif selection == "rows":
            mask.view(w.shape)[idx] = True
        else:
            mask[idx] = True
        mask = mask.view(w.shape)
        masks.append(mask)
        m1[~mask], m2[~mask] = 0.0, 0.0
        g = g.double()
        m1 = torch.where(mask, b1 * m1 + (1 - b1) * g, m1)
        m2 = torch.where(mask, b2 * m2 + (1 - b2) * g * g, m2)
        k = t + 1  # the step count is not reset either
        adam = (m1 / (1 - b1**k)) / ((m2 / (1 - b2**k)).sqrt() + eps)
        w = w - lr * torch.where(mask, adam, torch.sign(g))
        torch.testing.assert_close(p.double(), w, atol=2e-5, rtol=0)
    assert not torch.equal(masks[0], masks[2])  # the subspace did change


# --- block selection ---------------------------------------------------------------------------------------


def active_blocks(opt, params) -> list[int]:
    return [i for i, p in enumerate(params) if "exp_avg" in opt.state.get(p, {})]


@pytest.mark.parametrize("order, expected", [("ascending", [[0], [1], [2], [3], [0]]),
                                             ("descending", [[3], [2], [1], [0], [3]])])
def test_block_orders_walk_the_tensors(order, expected):
    params = make_params([(4, 3)] * 4)
    opt = FRUGAL(frugal_groups(params), lr=1e-2, density=0.25, selection="block", block_order=order, update_gap=2)
    seen = []
    for t in range(10):
        for p, g in zip(params, gradients(params, t)):
            p.grad = g
        opt.step()
        if t % 2 == 0:
            seen.append(active_blocks(opt, params))
    assert seen == expected


def test_block_random_is_seeded_and_updates_like_adamw_plus_signsgd():
    def run(seed):
        params = make_params([(4, 3), (3, 4), (5, 2), (2, 5), (3, 3), (6,)])
        opt = FRUGAL(frugal_groups(params), **HP, density=0.4, selection="block", block_order="random",
                     update_gap=2, seed=seed, inactive_lr_scale=0.5)
        ref = [p.detach().double().clone() for p in params]
        moments = {}
        history = []
        for t in range(8):
            grads = gradients(params, t)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            active = active_blocks(opt, params)
            assert len(active) == subspace_size(len(params), 0.4)
            if t % 2 == 0:
                history.append(active)
                moments = {i: [torch.zeros_like(ref[i]), torch.zeros_like(ref[i]), 0] for i in active}
            lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
            for i, g in enumerate(grads):
                g = g.double()
                ref[i].mul_(1 - lr * wd)
                if i in moments:
                    m1, m2, k = moments[i]
                    k += 1
                    m1 = b1 * m1 + (1 - b1) * g
                    m2 = b2 * m2 + (1 - b2) * g * g
                    moments[i] = [m1, m2, k]
                    ref[i] -= lr * (m1 / (1 - b1**k)) / ((m2 / (1 - b2**k)).sqrt() + eps)
                else:
                    ref[i] -= lr * 0.5 * torch.sign(g)
            for p, q in zip(params, ref):
                torch.testing.assert_close(p.double(), q, atol=1e-5, rtol=0)
            # Deactivated tensors hold no state at all.
            assert set(opt.state) == {params[i] for i in active}
        return history

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_non_projectable_groups_get_plain_adamw():
    ours = make_params([(6, 4), (4,)])
    ref = make_params([(6, 4), (4,)])
    opt = FRUGAL(frugal_groups(ours[:1], ours[1:]), **HP, density=0.0, selection="columns")
    ref_opt = torch.optim.AdamW(ref[1:], **HP, foreach=False)
    for t in range(4):
        for p, q, g in zip(ours, ref, gradients(ours, t)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours[1], ref[1], atol=1e-6, rtol=0)


# --- checkpointing -----------------------------------------------------------------------------------------


def run_steps(params, opt, steps):
    for t in steps:
        for p, g in zip(params, gradients(params, t)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("selection", ("block",) + SPLIT_SELECTIONS)
@pytest.mark.parametrize("reset", (True, False))
def test_state_dict_round_trip_and_resume(selection, reset):
    shapes = list(SHAPES.values()) + [(5,)]
    options = dict(**HP, density=0.5, selection=selection, block_order="random", update_gap=3,
                   reset_statistics=reset, seed=7)

    straight = make_params(shapes)
    opt = FRUGAL(frugal_groups(straight[:3], straight[3:]), **options)
    run_steps(straight, opt, range(8))

    first = make_params(shapes)
    opt = FRUGAL(frugal_groups(first[:3], first[3:]), **options)
    run_steps(first, opt, range(4))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    opt = FRUGAL(frugal_groups(resumed[:3], resumed[3:]), **options)
    opt.load_state_dict(saved["optim"])
    for state in opt.state.values():
        if "indices" in state:
            assert state["indices"].dtype == torch.int32
    run_steps(resumed, opt, range(4, 8))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


# --- user mistakes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, words", [
    (dict(selection="topk"), "selection"), (dict(density=1.5), "density"), (dict(update_gap=0), "update_gap"),
    (dict(state_free="adam"), "state_free"), (dict(block_order="zigzag"), "block_order"),
])
def test_bad_options_raise_user_error(options, words):
    with pytest.raises(UserError, match=words):
        FRUGAL(frugal_groups(make_params([(4, 4)])), **options)


def test_non_matrix_in_split_group_raises_user_error():
    with pytest.raises(UserError, match=r"shape \(4,\)"):
        FRUGAL(frugal_groups(make_params([(4, 4), (4,)])), selection="columns")


# --- data parallel -----------------------------------------------------------------------------------------



DDP_CASES = [("block", "random"), ("columns", None), ("rows", None), ("randk", None), ("svd", None), ("random", None)]


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for selection, order in DDP_CASES:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 4))
            ddp = nn.parallel.DistributedDataParallel(model)
            weights = [m.weight for m in model if isinstance(m, nn.Linear)]
            biases = [m.bias for m in model if isinstance(m, nn.Linear)]
            opt = FRUGAL(frugal_groups(weights, biases), lr=1e-2, density=0.5, selection=selection,
                         block_order=order or "random", update_gap=2, seed=3)
            torch.manual_seed(100 + rank)  # the ranks' global RNGs differ on purpose
            for _ in range(5):
                x = torch.randn(4, 8)
                ddp(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            local = [str(sorted(opt.state[w].keys())) for w in weights]
            tensors = [v for w in weights for k, v in sorted(opt.state[w].items()) if torch.is_tensor(v)]
            tensors += [p.detach() for p in model.parameters()]
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (local, [t.double() for t in tensors]))
            if rank == 0:
                (keys0, t0), (keys1, t1) = gathered
                assert keys0 == keys1, selection
                for a, b in zip(t0, t1, strict=True):
                    assert torch.equal(a, b), selection
    finally:
        dist.destroy_process_group()


def test_identical_choices_on_two_ddp_ranks():
    run_rank_scripts(__file__, 2)


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    exit_rank()


@pytest.mark.parametrize("saved_at", [3, 4])  # at the end of a subspace; inside the next
def test_prepare_load_gives_a_fresh_optimizer_the_saved_state_keys(saved_at):
    shapes = list(SHAPES.values())
    options = dict(**HP, density=0.5, selection="block", block_order="random", update_gap=3, seed=7)
    params = make_params(shapes)
    opt = FRUGAL(frugal_groups(params), **options)
    run_steps(params, opt, range(saved_at))
    fresh = make_params(shapes, seed=1)
    weights = [p.detach().clone() for p in fresh]
    prepared = FRUGAL(frugal_groups(fresh), **options)
    prepared.prepare_load(saved_at)
    assert [i for i, p in enumerate(params) if p in opt.state] == [i for i, p in enumerate(fresh) if p in prepared.state]
    assert all(torch.equal(p, w) for p, w in zip(fresh, weights))
