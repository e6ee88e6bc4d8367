"""Run by test_engines.py under torchrun: optimizers on FSDP2 round-trip through torch.distributed.checkpoint.

``save DIR`` (2 ranks): for each case, train 4 steps (GaLore's bases, FRUGAL's subspaces and LISA's
blocks change at step 4, right after), save model and optimizer with ``get_state_dict`` and
``dcp.save``, train 5 more; a fresh model and optimizer loaded with ``dcp.load`` and
``set_state_dict`` must then take the same 5 steps bit for bit. The weights after those steps are
written to DIR for ``resume``. ``resume DIR`` (any world size): load each case's checkpoint, take
the 5 steps and compare with the 2-rank weights (float64, so only the summation order differs).
Prints ``OK <mode> <cases>``.
"""

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from leantrain.optim.frugal import FRUGAL
from leantrain.optim.galore import GaLoreAdamW
from leantrain.optim.lisa import LISA
from leantrain.optim.natural_galore import NaturalGaLoreAdamW
from leantrain.parallel import shard_optimizer

BATCH, SAVE_AT, AFTER = 8, 4, 5  # 8 rows: gradients of rank 8, above every subspace here
OPTIONS = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, decay_before_update=True)


def galore(kind, proj_type, **extra):
    def make(model):
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim == 1]
        groups = [{"params": matrices, "rank": 3, "update_proj_gap": 2, "proj_type": proj_type, "scale": 0.5},
                  {"params": vectors}]
        return shard_optimizer(kind(groups, switch="rotate", **OPTIONS, **extra))
    return make


def frugal(selection):
    def make(model):
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim == 1]
        groups = [{"params": matrices, "projectable": True}, {"params": vectors}]
        return shard_optimizer(FRUGAL(groups, lr=0.02, weight_decay=0.05, density=0.4, update_gap=2,
                                      selection=selection, block_order="random"))
    return make


CASES = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.05, foreach=False),
    **{f"galore_{t}": galore(GaLoreAdamW, t) for t in ("std", "reverse_std", "full")},
    **{f"natural_galore_{t}": galore(NaturalGaLoreAdamW, t, history=3) for t in ("std", "reverse_std", "full")},
    **{f"frugal_{s}": frugal(s) for s in ("block", "columns", "svd", "random")},
    # torch's AdamW as the base (for float64 weights LISA would take leantrain's, which FSDP2 does not run)
    "lisa": lambda model: shard_optimizer(LISA(model, functools.partial(torch.optim.AdamW, lr=0.02, foreach=False),
                                               n_layers=1, interval=2)),
}


class Net(nn.Module):
    """(12, 7) tall, three (12, 12) blocks, (5, 12) wide with uneven shards: right, left and full projections."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(7, 12)
        self.layers = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.last = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.tanh(self.first(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.last(x)


def build(mesh, case):
    torch.manual_seed(0)
    model = Net().double()
    for layer in (model.first, *model.layers, model.last):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, CASES[case](model)


def train(model, optimizer, steps):
    """``steps`` steps on a global batch of BATCH rows, this rank taking its share of them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = BATCH // world
    for t in steps:
        x = torch.randn(BATCH, 7, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        rows = x[rank * per_rank:(rank + 1) * per_rank]
        # FSDP averages gradients over ranks: world / BATCH makes them those of the global mean.
        loss = (model(rows) - 0.3).square().sum() * world / BATCH
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def weights(model):
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


def load(mesh, case, checkpoint):
    model, optimizer = build(mesh, case)
    if hasattr(optimizer, "prepare_load"):  # LISA's blocks and FRUGAL's subspaces depend on the step
        optimizer.prepare_load(SAVE_AT)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    # Trainable parameters may have no state (LISA's blocks switched on at the saved step, FRUGAL's
    # state-free blocks): their moments start on the next step that needs them, as in the straight run.
    options = StateDictOptions(strict=not hasattr(optimizer, "prepare_load"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    return model, optimizer


def main(mode, directory):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for case in CASES:
        checkpoint = directory / case
        if mode == "save":
            model, optimizer = build(mesh, case)
            train(model, optimizer, range(SAVE_AT))
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
            train(model, optimizer, range(SAVE_AT, SAVE_AT + AFTER))
            expected = weights(model)
            if dist.get_rank() == 0:
                torch.save(expected, directory / f"{case}.pt")
        else:
            expected = torch.load(directory / f"{case}.pt")
        model, optimizer = load(mesh, case, checkpoint)
        train(model, optimizer, range(SAVE_AT, SAVE_AT + AFTER))
        for name, value in weights(model).items():
            if mode == "save":
                assert torch.equal(value, expected[name]), (case, name, (value - expected[name]).abs().max())
            else:
                err = (value - expected[name]).abs().max().item()
                assert err < 1e-9, (case, name, err)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK {mode} {len(CASES)}", flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/support.py exit_rank: gloo threads can abort interpreter finalization


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
