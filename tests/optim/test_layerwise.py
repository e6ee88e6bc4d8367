"""Per-layer updates equal the ordinary step: with accumulation, a schedule, clipping, resume and DDP."""

import copy
import io
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint

from leantrain.errors import UserError
from leantrain.optim.build import build_optimizer
from leantrain.optim.config import DEFAULT_TARGET_MODULES, OptimConfig
from leantrain.optim.galore import GaLoreAdamW
from leantrain.optim.groups import low_rank_groups
from leantrain.optim.layerwise import LayerwiseOptimizer
from leantrain.optim.natural_galore import NaturalGaLoreAdamW
from support import exit_rank, free_port

VOCAB, DIM = 24, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attention = nn.Linear(DIM, DIM)
        self.feed_forward = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM))

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.feed_forward(x)


class Toy(nn.Module):
    def __init__(self, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpointing else layer(x)
        return self.output(x)


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batches(seed, steps=3, accum=3):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, VOCAB, (2, 6), generator=gen) for _ in range(accum)] for _ in range(steps)]


def train(model, optimizer, data, layerwise, sync=None, start=0):
    """The trainer's loop: accumulate, step, schedule, zero; the layer-wise optimizer is told the last micro-step."""
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (1 + start + step))
    for micro_batches in data:
        for i, tokens in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            if layerwise:
                optimizer.begin_micro_step(is_last)
            with sync() if (sync is not None and not is_last) else nullcontext():
                (loss_of(model, tokens) / len(micro_batches)).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def galore_groups(model):
    return low_rank_groups(model, DEFAULT_TARGET_MODULES, 0.01, {"rank": 3, "update_proj_gap": 2})


OPTIMIZERS = {
    "galore": (GaLoreAdamW, galore_groups, dict(lr=0.01)),
    "natural_galore": (NaturalGaLoreAdamW, galore_groups, dict(lr=0.01, history=2)),
    "adamw": (torch.optim.AdamW, lambda m: m.parameters(), dict(lr=0.01, weight_decay=0.1)),
    "sgd": (torch.optim.SGD, lambda m: m.parameters(), dict(lr=0.1, momentum=0.9)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_layerwise_with_accumulation_equals_the_plain_step(name):
    optimizer_class, groups_of, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    base = Toy()
    data = batches(1)
    plain_model, layer_model = copy.deepcopy(base), copy.deepcopy(base)
    expected = train(plain_model, optimizer_class(groups_of(plain_model), **kwargs), data, layerwise=False)
    got = train(layer_model, LayerwiseOptimizer(groups_of(layer_model), optimizer_class, **kwargs), data,
                layerwise=True)
    for e, g, p0 in zip(expected, got, base.parameters()):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(e, p0) for e, p0 in zip(expected, base.parameters()))


def test_layerwise_under_activation_checkpointing_equals_the_plain_step():
    """Recomputed blocks read their weights before the in-backward update changes them."""
    torch.manual_seed(0)
    base = Toy(checkpointing=True)
    data = batches(8, steps=2, accum=2)
    plain_model, layer_model = copy.deepcopy(base), copy.deepcopy(base)
    expected = train(plain_model, GaLoreAdamW(galore_groups(plain_model), lr=0.01), data, layerwise=False)
    got = train(layer_model, LayerwiseOptimizer(galore_groups(layer_model), GaLoreAdamW, lr=0.01), data,
                layerwise=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_build_with_stagger_matches_the_plain_optimizer():
    torch.manual_seed(0)
    base = Toy()
    data = batches(2, steps=4, accum=2)
    results = []
    for layerwise in (False, True):
        model = copy.deepcopy(base)
        cfg = OptimConfig(name="galore", lr=0.01, rank=3, update_proj_gap=2, stagger=True, layerwise=layerwise)
        results.append(train(model, build_optimizer(cfg, model), data, layerwise))
    for e, g in zip(*results):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_gradients_are_freed_and_parameters_updated_inside_backward():
    torch.manual_seed(0)
    model = Toy()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = LayerwiseOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01)
    tokens = batches(3, steps=1, accum=2)[0]
    optimizer.begin_micro_step(False)
    loss_of(model, tokens[0]).backward()
    assert all(p.grad is not None for p in model.parameters())  # accumulating: nothing stepped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.begin_micro_step(True)
    loss_of(model, tokens[1]).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    norm = optimizer.clip_grad_norm_(model.parameters(), float("inf"))  # where a loop clips, before step()
    optimizer.step()
    assert optimizer.grad_norm > 0 and torch.equal(norm, optimizer.grad_norm)
    with pytest.raises(UserError, match="optim.layerwise_clip"):
        optimizer.clip_grad_norm_(model.parameters(), 1.0)


def test_grad_norm_is_the_global_norm_before_clipping():
    torch.manual_seed(0)
    base = Toy()
    tokens = batches(9, steps=1, accum=1)[0][0]
    plain = copy.deepcopy(base)
    loss_of(plain, tokens).backward()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), float("inf"))
    layer = copy.deepcopy(base)
    optimizer = LayerwiseOptimizer(layer.parameters(), torch.optim.SGD, lr=0.1, clip_norm=0.01)
    loss_of(layer, tokens).backward()
    optimizer.step()
    torch.testing.assert_close(optimizer.grad_norm, expected)


def test_pre_hooks_run_once_before_the_first_update():
    torch.manual_seed(0)
    model = Toy()
    optimizer = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.detach().clone()
                                                                           for p in model.parameters()]))
    for step, micro_batches in enumerate(batches(4, steps=2, accum=1)):
        before = [p.detach().clone() for p in model.parameters()]
        loss_of(model, micro_batches[0]).backward()
        optimizer.step()
        assert len(seen) == step + 1
        assert all(torch.equal(s, b) for s, b in zip(seen[-1], before))


def test_per_parameter_clipping_matches_manual_clipping():
    torch.manual_seed(0)
    base = Toy()
    tokens = batches(5, steps=1, accum=1)[0][0]
    plain = copy.deepcopy(base)
    loss_of(plain, tokens).backward()
    for p in plain.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.05)
    torch.optim.SGD(plain.parameters(), lr=1.0).step()
    layer = copy.deepcopy(base)
    optimizer = LayerwiseOptimizer(layer.parameters(), torch.optim.SGD, lr=1.0, clip_norm=0.05)
    loss_of(layer, tokens).backward()
    optimizer.step()
    for e, g in zip(plain.parameters(), layer.parameters()):
        torch.testing.assert_close(g, e)


def test_state_dict_round_trip_and_resume():
    torch.manual_seed(0)
    base = Toy()
    data = batches(6, steps=6, accum=2)

    def make(model):
        return LayerwiseOptimizer(galore_groups(model), GaLoreAdamW, lr=0.01, switch="rotate")

    straight = copy.deepcopy(base)
    expected = train(straight, make(straight), data, layerwise=True)
    first = copy.deepcopy(base)
    first_opt = make(first)
    train(first, first_opt, data[:3], layerwise=True)
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = copy.deepcopy(first)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert {resumed_opt.state[p]["step"].item() for p in resumed.parameters()} == {3.0}
    assert all(resumed_opt.inner[p].state[p] is resumed_opt.state[p] for p in resumed.parameters())
    got = train(resumed, resumed_opt, data[3:], layerwise=True, start=3)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_misuse_raises_clear_errors():
    torch.manual_seed(0)
    model = Toy()
    optimizer = LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    tokens = batches(7, steps=1, accum=2)[0]
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(lambda: 0.0)
    loss_of(model, tokens[0]).backward()
    with pytest.raises(RuntimeError, match="begin_micro_step"):
        loss_of(model, tokens[1]).backward()  # a second backward without declaring accumulation
    optimizer.begin_micro_step(False)
    with pytest.raises(RuntimeError, match="accumulation window"):
        optimizer.step()
    with pytest.raises(UserError, match="clip_norm"):
        LayerwiseOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, clip_norm=-1.0)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        base = Toy()
        data = batches(10 + rank, steps=3, accum=2)  # each rank its own data
        results = {}
        for layerwise in (False, True):
            model = copy.deepcopy(base)
            ddp = DistributedDataParallel(model)
            cfg = OptimConfig(name="galore", lr=0.01, rank=3, update_proj_gap=2, layerwise=layerwise)
            optimizer = build_optimizer(cfg, ddp)  # a layer-wise optimizer attaches to DDP
            results[layerwise] = train(ddp, optimizer, data, layerwise, sync=ddp.no_sync)
        # The layer-wise steps happen inside backward (in DDP's communication hook), not in step().
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.begin_micro_step(True)
        loss_of(ddp, data[0][0]).backward()
        results["changed_in_backward"] = all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        optimizer.step()
        # Without attach_ddp the hooks would see local gradients: that must fail loudly.
        bare = copy.deepcopy(base)
        unattached = LayerwiseOptimizer(bare.parameters(), torch.optim.SGD, lr=0.1)
        try:
            loss_of(bare, data[0][0]).backward()
            results["unattached_error"] = ""
        except RuntimeError as exc:
            results["unattached_error"] = str(exc)
        unattached.remove_hooks()
        # FSDP2 parameters (DTensors) are rejected at construction.
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
        mesh = init_device_mesh("cpu", (world_size,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        try:
            LayerwiseOptimizer([sharded], torch.optim.SGD, lr=0.1)
            results["dtensor_error"] = ""
        except UserError as exc:
            results["dtensor_error"] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_layerwise_under_two_process_ddp_equals_plain_ddp(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned workers import this module
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for results in ranks:
        for e, g in zip(results[False], results[True]):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
        assert results["changed_in_backward"]
        assert "attach_ddp" in results["unattached_error"]
        assert "FSDP2" in results["dtensor_error"]
    for a, b in zip(ranks[0][True], ranks[1][True]):
        assert torch.equal(a, b)  # replicas stay identical: every rank stepped on the reduced gradient
