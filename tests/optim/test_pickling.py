"""copy.deepcopy and pickle of a model with its optimizer: the copy trains exactly as the original goes on to."""

import copy
import pickle

import pytest
import torch
from torch import nn

from leantrain.optim import FRUGAL, LISA, AdamW8bit, GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW

VOCAB, DIM = 16, 8


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.output(h)


def split(model):
    """Plain AdamW group, and the block matrices the low-rank optimizers project."""
    matrices = [layer.weight for layer in model.layers]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return others, matrices


def galore(model):
    others, matrices = split(model)
    return GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 2, "update_proj_gap": 3}],
                       lr=1e-2, stagger=True)


def galore_8bit(model):
    others, matrices = split(model)
    return GaLoreAdamW8bit([{"params": others}, {"params": matrices, "rank": 2, "update_proj_gap": 3}], lr=1e-2)


def adamw_8bit(model):
    return AdamW8bit(model.parameters(), lr=1e-2)


def natural_galore(model):
    others, matrices = split(model)
    return NaturalGaLoreAdamW([{"params": others}, {"params": matrices, "rank": 2, "update_proj_gap": 3}],
                              lr=1e-2, stagger=True, switch="rotate")


def frugal(model):
    others, matrices = split(model)
    return FRUGAL([{"params": others}, {"params": matrices, "projectable": True}], lr=1e-2, update_gap=3,
                  selection="randk", seed=3)


def apollo(model):
    from leantrain.optim.apollo import APOLLO

    others, matrices = split(model)
    return APOLLO([{"params": others}, {"params": matrices, "rank": 2, "update_proj_gap": 3, "scale": 1.0,
                                        "proj_type": "std", "proj": "random", "scale_type": "channel"}], lr=1e-2)


def lisa(model):
    return LISA(model, lambda groups: GaLoreAdamW(groups, lr=1e-2), n_layers=2, interval=3, seed=1)


def train(model, opt, steps):
    for step in steps:
        tokens = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()


def deep_copy(objects):
    return copy.deepcopy(objects)


def pickle_round_trip(objects):
    return pickle.loads(pickle.dumps(objects))


@pytest.mark.parametrize("build", [galore, galore_8bit, adamw_8bit, natural_galore, frugal, apollo, lisa])
@pytest.mark.parametrize("copier", [deep_copy, pickle_round_trip])
def test_a_copy_of_model_and_optimizer_steps_as_the_original(build, copier):
    torch.manual_seed(0)
    model = Stack()
    opt = build(model)
    train(model, opt, range(4))  # past a refresh / switch, so plan, stagger, counters and blocks matter
    copied = copier({"model": model, "opt": opt})
    twin, twin_opt = copied["model"], copied["opt"]
    assert type(twin_opt) is type(opt)
    twin_params = {id(p) for p in twin.parameters()}
    assert all(id(p) in twin_params for g in twin_opt.param_groups for p in g["params"])  # linked to the copy
    train(model, opt, range(4, 11))  # two more refreshes / switches
    train(twin, twin_opt, range(4, 11))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p is not q
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
    assert opt.state_dict().keys() == twin_opt.state_dict().keys()
