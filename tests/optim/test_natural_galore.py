"""Natural GaLore against float64 dense references: the Woodbury solve, the optimizer, its state size."""

import io
import math

import pytest
import torch

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.model import PRESETS, Transformer, resolve_model_config
from leantrain.optim import projector
from leantrain.optim.config import DEFAULT_TARGET_MODULES
from leantrain.optim.groups import count_state_bytes, low_rank_groups
from leantrain.optim.natural_galore import (
    NaturalGaLoreAdamW,
    auto_history,
    damped_solve_fallback,
    woodbury_natural_gradient,
)

LR, BETAS, EPS, SCALE, GAP, DAMPING = 0.02, (0.9, 0.99), 1e-6, 0.5, 5, 1e-2


def dense_natural_gradient(rows: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """(damping I + sum_i h_i h_i^T)^-1 g with a d x d float64 solve."""
    fisher = rows.T.double() @ rows.double()
    return torch.linalg.solve(damping * torch.eye(g.numel(), dtype=torch.float64) + fisher, g.double())


def test_woodbury_matches_a_dense_solve():
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    history[4:] = 0  # unfilled rows add nothing
    for row in (0, 3):
        natural, system, info = woodbury_natural_gradient(history, row, 1e-3)
        assert info.item() == 0
        torch.testing.assert_close(natural, dense_natural_gradient(history[:4], history[row], 1e-3))
        torch.testing.assert_close(damped_solve_fallback(history, row, system, 1e-3), natural)


def test_woodbury_in_float32_is_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(5, 300, generator=gen)
    natural, _, _ = woodbury_natural_gradient(history, 2, 1e-3)
    expected = dense_natural_gradient(history, history[2], 1e-3)
    assert ((natural.double() - expected).norm() / expected.norm()) < 1e-4


def gradient(w, t, a, b):
    return a @ w @ b + torch.sin((t + 1) * w) + 0.1 * t


def reference_natural_galore(w0, a, b, steps, *, rank, proj_type, history, switch):
    """Natural GaLore for one matrix in float64: history list, dense Fisher solve, Adam, projection back."""
    w = w0.clone()
    m, n = w.shape
    k = min(rank, m, n)
    side = projector.projection_side(proj_type, w.shape)
    eye_m, eye_n = torch.eye(m, dtype=w.dtype), torch.eye(n, dtype=w.dtype)
    p_mat = q_mat = mom = var = None
    past: list[torch.Tensor] = []
    for t in range(steps):
        g = gradient(w, t, a, b)
        if p_mat is None or t % GAP == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new_p = u[:, :k] if side in ("left", "full") else eye_m
            new_q = vh[:k] if side in ("right", "full") else eye_n
            if p_mat is not None:
                r_left, r_right = new_p.T @ p_mat, q_mat @ new_q.T
                if switch == "rotate":
                    mom, var = r_left @ mom @ r_right, r_left.square() @ var @ r_right.square()
                    past = [r_left @ h @ r_right for h in past]
                else:
                    past = []
            p_mat, q_mat = new_p, new_q
        low = p_mat.T @ g @ q_mat.T
        past = (past + [low])[-history:]
        rows = torch.stack([h.reshape(-1) for h in past])
        natural = dense_natural_gradient(rows, low.reshape(-1), DAMPING).view_as(low)
        if mom is None:
            mom, var = torch.zeros_like(low), torch.zeros_like(low)
        mom = BETAS[0] * mom + (1 - BETAS[0]) * natural
        var = BETAS[1] * var + (1 - BETAS[1]) * natural**2
        step_size = LR * math.sqrt(1 - BETAS[1] ** (t + 1)) / (1 - BETAS[0] ** (t + 1))
        w = w - step_size * SCALE * p_mat @ (mom / (var.sqrt() + EPS)) @ q_mat
    return w


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_optimizer_matches_float64_reference(shape, proj_type):
    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64) / m
    b = torch.randn(n, n, generator=gen, dtype=torch.float64) / n
    for rank, switch in ((3, "keep"), (3, "rotate"), (20, "keep")):
        expected = reference_natural_galore(w0, a, b, 17, rank=rank, proj_type=proj_type, history=3, switch=switch)
        weight = torch.nn.Parameter(w0.clone())
        opt = NaturalGaLoreAdamW([{"params": [weight], "rank": rank, "update_proj_gap": GAP, "scale": SCALE,
                                   "proj_type": proj_type}], lr=LR, betas=BETAS, eps=EPS, history=3,
                                 damping=DAMPING, switch=switch)
        for t in range(17):
            weight.grad = gradient(weight.detach(), t, a, b)
            opt.step()
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-8, atol=1e-8, msg=f"{rank} {switch}")


def test_preconditioning_changes_the_trajectory():
    gen = torch.Generator().manual_seed(5)
    w0, a, b = torch.randn(12, 7, generator=gen), torch.randn(12, 12, generator=gen), torch.randn(7, 7, generator=gen)
    runs = []
    for history in (1, 4):
        weight = torch.nn.Parameter(w0.clone())
        opt = NaturalGaLoreAdamW([{"params": [weight], "rank": 3}], history=history, lr=0.01)
        for t in range(8):
            weight.grad = gradient(weight.detach(), t, a, b)
            opt.step()
        runs.append(weight.detach())
    assert (runs[0] - runs[1]).abs().max() > 1e-3


def test_history_is_cleared_on_keep_and_reset_and_rotated_on_rotate():
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(10, 6, generator=gen)
    grads = [torch.randn(10, 6, generator=gen) for _ in range(4)]
    for switch in ("keep", "reset", "rotate"):
        w = torch.nn.Parameter(init.clone())
        opt = NaturalGaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], history=4, switch=switch)
        for g in grads[:3]:
            w.grad = g.clone()
            opt.step()
        state = opt.state[w]
        filled, old_right = state["history"][:3].clone(), state["proj_right"].clone()
        w.grad = grads[3].clone()
        opt.step()  # step 3 refreshes the subspace, then writes its own gradient into row 3
        if switch == "rotate":
            _, r_right = projector.change_of_basis("right", None, old_right, None, state["proj_right"])
            expected = filled.view(3, 10, 2) @ r_right
            torch.testing.assert_close(state["history"][:3], expected.reshape(3, 20))
            assert expected.abs().sum() > 0
        else:
            assert torch.equal(state["history"][:3], torch.zeros_like(filled))
        assert state["history"][3].abs().sum() > 0


def natural_galore_numel(shape, rank, proj_type, history):
    """State elements of one projected matrix: 2 moments, history rows, basis (plus 2 counters)."""
    m, n = shape
    side = projector.projection_side(proj_type, shape)
    k = projector.effective_rank(rank, shape)
    low = math.prod(projector.low_rank_shape(side, shape, k))
    basis = {"left": m * k, "right": k * n, "full": m * k + k * n}[side]
    return (2 + history) * low + basis


@pytest.mark.parametrize("proj_type", projector.PROJ_TYPES)
def test_state_size_formula_matches_the_optimizer(proj_type):
    for shape in ((12, 7), (7, 12), (9, 9)):
        w = torch.nn.Parameter(torch.randn(*shape))
        opt = NaturalGaLoreAdamW([{"params": [w], "rank": 3, "proj_type": proj_type}])
        w.grad = torch.randn(*shape)
        opt.step()
        history = opt.state[w]["history"].shape[0] if "history" in opt.state[w] else 0
        assert history == auto_history(torch.Size(shape), projector.projection_side(proj_type, shape), 3)
        assert count_state_bytes(opt) == 4 * (natural_galore_numel(shape, 3, proj_type, history) + 2)


def test_auto_history_closed_form():
    # d x d, right projection: (3 + s) * rank < 2 d.
    assert auto_history(torch.Size((512, 512)), "right", 128) == 4
    assert auto_history(torch.Size((1024, 1024)), "right", 128) == 12
    assert auto_history(torch.Size((768, 768)), "right", 256) == 2
    assert auto_history(torch.Size((4096, 4096)), "right", 128) == 20  # capped at the authors' s
    assert auto_history(torch.Size((256, 256)), "right", 128) == 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_default_state_is_below_adamw_for_every_preset(preset):
    """With optim defaults (rank 128), per projected matrix where GaLore itself fits, and for the whole model."""
    cfg = resolve_model_config(ModelConfig(preset=preset), vocab_size=512, seq_len=128)
    with torch.device("meta"):
        model = Transformer(cfg)
    projected = low_rank_groups(model, DEFAULT_TARGET_MODULES, 0.0, {"rank": 128, "proj_type": "std"})[0]["params"]
    assert len(projected) == 7 * cfg.n_layers
    projected_ids = {id(p) for p in projected}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in projected_ids)
    total_natural, total_adamw = 2 * dense, 2 * dense
    for p in projected:
        side = projector.projection_side("std", p.shape)
        history = auto_history(p.shape, side, projector.effective_rank(128, p.shape))
        natural = natural_galore_numel(p.shape, 128, "std", history)
        if natural_galore_numel(p.shape, 128, "std", 0) < 2 * p.numel():
            assert natural < 2 * p.numel()
        else:
            assert history == 0  # the rank is too large for any history (tiny's 128-wide k/v projections)
        total_natural += natural
        total_adamw += 2 * p.numel()
    assert total_natural < total_adamw


def test_state_dict_round_trip_and_resume():
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(10, 6, generator=gen)
    grads = [torch.randn(10, 6, generator=gen) for _ in range(12)]

    def make():
        w = torch.nn.Parameter(init.clone())
        return w, NaturalGaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 4}], history=3,
                                     switch="rotate", svd="randomized")

    def train(w, opt, gs):
        for g in gs:
            w.grad = g.clone()
            opt.step()

    w_straight, straight = make()
    train(w_straight, straight, grads)
    w_first, first = make()
    train(w_first, first, grads[:6])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    w_resumed, resumed = make()
    with torch.no_grad():
        w_resumed.copy_(w_first)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(w_resumed, resumed, grads[6:])
    assert torch.equal(w_straight, w_resumed)


def test_rejects_bad_options():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(UserError, match="history"):
        NaturalGaLoreAdamW([{"params": p, "rank": 2}], history=-1)
    with pytest.raises(UserError, match="damping"):
        NaturalGaLoreAdamW([{"params": p, "rank": 2}], damping=0.0)
