"""Acceptance: with its defaults, our GaLoreAdamW reproduces galore-torch 1.0's GaLoreAdamW."""

import warnings

import pytest
import torch

from leantrain.optim import projector
from leantrain.optim.galore import GaLoreAdamW

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    galore_torch = pytest.importorskip("galore_torch")

SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}


def train(optimizer_class, shape: tuple[int, int], proj_type: str, steps: int = 50) -> list[torch.Tensor]:
    """50 steps on a projected weight and a dense bias, with gradients that depend on the weights."""
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    weight = torch.nn.Parameter(torch.randn(m, n, generator=gen))
    bias = torch.nn.Parameter(torch.randn(n, generator=gen))
    left = torch.randn(m, m, generator=gen) / m**0.5
    right = torch.randn(n, n, generator=gen) / n**0.5
    groups = [{"params": [weight], "rank": 6, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type},
              {"params": [bias]}]
    optimizer = optimizer_class(groups, lr=0.01, weight_decay=0.1)
    for t in range(steps):
        with torch.no_grad():
            weight.grad = left @ weight @ right + torch.sin((t + 1) * weight)
            bias.grad = 0.5 * bias + torch.cos(bias * t)
        optimizer.step()
    return [weight.detach().clone(), bias.detach().clone()]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("proj_type", projector.PROJ_TYPES)
def test_matches_galore_torch(shape, proj_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's deprecation warning
        expected = train(galore_torch.GaLoreAdamW, shape, proj_type)
    got = train(GaLoreAdamW, shape, proj_type)
    for e, g in zip(expected, got):
        assert ((g - e).abs().max() / e.abs().max()).item() < 1e-5
    # The run moved the weights far beyond the tolerance, so agreement is not trivial.
    assert (got[0] - train(GaLoreAdamW, shape, proj_type, steps=0)[0]).abs().max() > 0.1
