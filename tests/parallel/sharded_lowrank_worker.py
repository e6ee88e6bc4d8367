"""Run by test_engines.py under ``torchrun --nproc_per_node=2``: sharded GaLore and FRUGAL against the originals.

Every rank steps DTensor weights sharded on dim 0 with the sharded optimizer, and full copies of the
same weights with the single-device optimizer, on the same gradients, in float64; after every step
the gathered weights must match. Prints ``OK <cases>`` on success; any mismatch raises.
"""

import io
import itertools
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from leantrain.errors import UserError
from leantrain.optim.frugal import FRUGAL
from leantrain.optim.galore import GaLoreAdamW
from leantrain.optim.natural_galore import NaturalGaLoreAdamW
from leantrain.parallel.fsdp import ShardedOptimizerState
from leantrain.parallel.sharded_frugal import ShardedFRUGAL
from leantrain.parallel.sharded_lowrank import (
    ShardedGaLoreAdamW,
    ShardedNaturalGaLoreAdamW,
    all_gather_columns,
    reduce_scatter_columns,
    shard_optimizer,
)

# tall and wide (both exact-basis paths), square, uneven shards, and a row that only one rank holds
SHAPES = [(12, 7), (7, 12), (9, 9), (5, 8), (1, 6)]
OPTIONS = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, decay_before_update=True)


def gradient(w: torch.Tensor, t: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ w @ b + torch.sin((t + 1) * w) + 0.1 * t


def problem(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    return (torch.randn(m, n, generator=gen, dtype=torch.float64),
            torch.randn(m, m, generator=gen, dtype=torch.float64) / m,
            torch.randn(n, n, generator=gen, dtype=torch.float64) / n)


def build(mesh, kind, group_options, sharded):
    problems = [problem(s) for s in SHAPES]
    dense = torch.linspace(-1, 1, 10, dtype=torch.float64)
    if sharded:
        weights = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w, _, _ in problems]
        bias = torch.nn.Parameter(distribute_tensor(dense.clone(), mesh, [Shard(0)]))
    else:
        weights = [torch.nn.Parameter(w.clone()) for w, _, _ in problems]
        bias = torch.nn.Parameter(dense.clone())
    groups = [{"params": weights, **group_options}, {"params": [bias]}]
    optimizer = kind(groups, **OPTIONS)
    if sharded:
        optimizer = shard_optimizer(optimizer)
    return weights, bias, optimizer, problems


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def set_grads(weights, bias, problems, t, mesh):
    for w, (_, a, b) in zip(weights, problems):
        g = gradient(full(w).detach(), t, a, b)
        w.grad = distribute_tensor(g, mesh, [Shard(0)]) if hasattr(w, "full_tensor") else g
    g = torch.cos(full(bias).detach() * (t + 1))
    bias.grad = distribute_tensor(g, mesh, [Shard(0)]) if hasattr(bias, "full_tensor") else g


def check_case(mesh, kind, group_options, steps=7):
    sharded = build(mesh, kind, group_options, sharded=True)
    reference = build(mesh, kind, group_options, sharded=False)
    expected = {GaLoreAdamW: ShardedGaLoreAdamW, NaturalGaLoreAdamW: ShardedNaturalGaLoreAdamW}[kind]
    assert type(sharded[2]) is expected
    for t in range(steps):
        for weights, bias, optimizer, problems in (sharded, reference):
            set_grads(weights, bias, problems, t, mesh)
            optimizer.step()
        for ws, wr in zip(sharded[0] + [sharded[1]], reference[0] + [reference[1]]):
            err = (full(ws).detach() - wr.detach()).abs().max().item()
            assert err < 1e-9, (kind.__name__, group_options, t, tuple(wr.shape), err)


def check_resume(mesh, kind, group_options, split=4, steps=7):
    """Save the sharded state mid-run (as local tensors), load it into a fresh optimizer, continue alike."""
    straight = build(mesh, kind, group_options, sharded=True)
    for t in range(split):
        set_grads(straight[0], straight[1], straight[3], t, mesh)
        straight[2].step()
    buffer = io.BytesIO()
    torch.save(ShardedOptimizerState(straight[2], mesh).state_dict(), buffer)
    resumed = build(mesh, kind, group_options, sharded=True)
    with torch.no_grad():
        for a, b in zip(resumed[0] + [resumed[1]], straight[0] + [straight[1]]):
            a.to_local().copy_(b.to_local())
    buffer.seek(0)
    ShardedOptimizerState(resumed[2], mesh).load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(split, steps):
        for weights, bias, optimizer, problems in (straight, resumed):
            set_grads(weights, bias, problems, t, mesh)
            optimizer.step()
    for a, b in zip(resumed[0] + [resumed[1]], straight[0] + [straight[1]]):
        assert torch.equal(a.to_local(), b.to_local()), (kind.__name__, group_options)


def check_frugal(mesh, selection, reset, steps=7):
    """ShardedFRUGAL (through shard_optimizer) against FRUGAL on the same gradients, subspaces changing every 2."""
    runs = []
    for sharded in (True, False):
        problems = [problem(s) for s in SHAPES]
        if sharded:
            weights = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w, _, _ in problems]
        else:
            weights = [torch.nn.Parameter(w.clone()) for w, _, _ in problems]
        optimizer = FRUGAL([{"params": weights, "projectable": True}], lr=0.02, weight_decay=0.05, density=0.5,
                           update_gap=2, selection=selection, reset_statistics=reset, block_order="random")
        runs.append((weights, shard_optimizer(optimizer) if sharded else optimizer, problems))
    assert type(runs[0][1]) is ShardedFRUGAL
    for t in range(steps):
        for weights, optimizer, problems in runs:
            for w, (_, a, b) in zip(weights, problems):
                g = gradient(full(w).detach(), t, a, b)
                w.grad = distribute_tensor(g, mesh, [Shard(0)]) if hasattr(w, "full_tensor") else g
            optimizer.step()
    for ws, wr in zip(runs[0][0], runs[1][0]):
        err = (full(ws).detach() - wr.detach()).abs().max().item()
        assert err < 1e-9, ("FRUGAL", selection, reset, tuple(wr.shape), err)


def check_frugal_refuses_uneven_selections(mesh):
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4, dtype=torch.float64), mesh, [Shard(0)]))
    for selection in ("rows", "randk"):
        try:
            shard_optimizer(FRUGAL([{"params": [weight], "projectable": True}], selection=selection))
        except UserError as error:
            assert "columns, svd or random" in str(error), error
        else:
            raise AssertionError(f"FRUGAL selection={selection} on FSDP2 shards was not refused")


def check_column_collectives(mesh):
    group = mesh.get_group()
    rank = dist.get_rank()
    low = torch.arange(3 * 7, dtype=torch.float64).view(3, 7) * (rank + 1)
    block = reduce_scatter_columns(low, group)
    total = torch.arange(3 * 7, dtype=torch.float64).view(3, 7) * 3  # ranks 1 and 2 times the same matrix
    padded = torch.cat([total, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert torch.equal(block, padded[:, rank * 4:(rank + 1) * 4])
    assert torch.equal(all_gather_columns(block, 7, group), total)


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    check_column_collectives(mesh)
    cases = 0
    for kind, proj_type, svd, switch in itertools.product((GaLoreAdamW, NaturalGaLoreAdamW),
                                                         ("std", "reverse_std", "full"),
                                                         ("exact", "randomized"), ("reset", "rotate")):
        options = dict(rank=3, update_proj_gap=3, scale=0.5, proj_type=proj_type, svd=svd, switch=switch)
        if kind is NaturalGaLoreAdamW:
            options["history"] = 3
        check_case(mesh, kind, options)
        cases += 1
    # keep across no refresh: the bases' signs cannot matter
    for kind in (GaLoreAdamW, NaturalGaLoreAdamW):
        check_case(mesh, kind, dict(rank=3, update_proj_gap=100, proj_type="std", switch="keep"))
        check_resume(mesh, kind, dict(rank=3, update_proj_gap=3, proj_type="std", switch="rotate"))
        cases += 2
    # svd with kept moments depends on the bases' signs (Gram eigenvectors against LAPACK's SVD): not compared
    for selection, reset in (("block", True), ("block", False), ("columns", True), ("columns", False),
                             ("svd", True), ("random", True), ("random", False)):
        check_frugal(mesh, selection, reset)
        cases += 1
    check_frugal_refuses_uneven_selections(mesh)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK {cases}", flush=True)
    dist.destroy_process_group()
    # Skip interpreter finalization: about one run in eight, gloo worker threads still holding DTensor
    # collectives' tensors abort there ("terminate called without an active exception", pytorch#179291).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
