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
from leantrain.parallel.config import ParallelConfig
from leantrain.parallel.world import World
from leantrain.parallel.wrap import build_engine
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


def test_per_parameter_clipping_clips_the_accumulated_gradient():
    """Each parameter's gradient summed over the window is clipped alone, right before its step."""
    torch.manual_seed(0)
    base = Toy()
    window = batches(5, steps=1, accum=2)[0]
    plain = copy.deepcopy(base)
    for tokens in window:
        (loss_of(plain, tokens) / 2).backward()
    norms = [p.grad.norm() for p in plain.parameters()]
    assert min(norms) < 0.1 < max(norms)  # some clipped, some not
    for p in plain.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.1)
    torch.optim.SGD(plain.parameters(), lr=1.0).step()
    layer = copy.deepcopy(base)
    optimizer = LayerwiseOptimizer(layer.parameters(), torch.optim.SGD, lr=1.0, clip_norm=0.1)
    for i, tokens in enumerate(window):
        optimizer.begin_micro_step(i == 1)
        (loss_of(layer, tokens) / 2).backward()
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


class LossModule(nn.Module):
    """Model and loss in one module, as the trainer hands it to the engine (FSDP2's root)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return loss_of(self.model, tokens)


CLIP = 0.05  # below most parameters' gradient norms: the clipping bites
PARALLEL_CASES = [("ddp", "galore", 0.0), ("ddp", "galore", CLIP), ("ddp", "adamw", CLIP),
                  ("fsdp2", "adamw", 0.0), ("fsdp2", "adamw", CLIP), ("fsdp2", "galore", 0.0),
                  ("fsdp2", "galore", CLIP)]
RESUMED = [("ddp", "galore", CLIP), ("fsdp2", "galore", CLIP)]  # also resumed from a checkpoint of step 2
GLOBAL_ACCUM = 4


def make_engine(backend, name, clip, layerwise, world):
    torch.manual_seed(0)
    model = Toy()
    # FSDP2's exact bases come from the Gram matrix and may differ from LAPACK's SVD in the signs of
    # singular vectors; rotating the moments at the refresh makes the step independent of the signs.
    # GaLore staggers its refreshes: one param group per matrix, each converted to its sharded form.
    cfg = OptimConfig(name=name, lr=0.01, rank=3, update_proj_gap=2, switch="rotate", stagger=name == "galore", layerwise=layerwise,
                      layerwise_clip=clip)
    # DDP buckets of 0 MiB: from the second step on, each parameter is a bucket of its own, stepped
    # while the rest of backward still runs.
    engine = build_engine(LossModule(model), model, ParallelConfig(backend=backend, ddp_bucket_mb=0), world,
                          lambda: build_optimizer(cfg, model), grad_clip=0.0, micro_batch_size=2,
                          accumulation_steps=GLOBAL_ACCUM // world.world_size)
    return engine, LambdaLR(engine.optimizer, lambda step: 1.0 / (1 + step))


def saved_states(engine, scheduler):
    """What a checkpoint holds of the engine's states, through torch.save and a weights-only load."""
    replicated, per_rank = engine.checkpoint_states()
    buffer = io.BytesIO()
    torch.save({**{k: v.state_dict() for k, v in {**replicated, **per_rank}.items()},
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def restore_states(engine, scheduler, saved):
    replicated, per_rank = engine.checkpoint_states()
    for key, state in {**replicated, **per_rank}.items():
        state.load_state_dict(saved[key])
    scheduler.load_state_dict(saved["scheduler"])


def engine_train(backend, name, clip, layerwise, world, rank=0, resume=False):
    """The trainer's loop through an engine: 3 steps of GLOBAL_ACCUM micro-batches split over the ranks.

    Returns the final weights, the norms ``engine.step`` logged and whether the last window's
    backward already changed every weight and freed every gradient (before ``engine.step``). With
    ``resume``, also the final weights of a fresh engine resumed from the state after step 2.
    """
    engine, scheduler = make_engine(backend, name, clip, layerwise, world)
    accum = GLOBAL_ACCUM // world.world_size
    norms, saved = [], None

    def window(engine, scheduler, micro_batches):
        before = {k: v.clone() for k, v in engine.full_state_dict().items()}
        for i, tokens in enumerate(micro_batches[rank * accum:(rank + 1) * accum]):
            with engine.micro_step(is_last=i == accum - 1):
                engine.backward(engine.module(tokens) / accum)
        after = engine.full_state_dict()
        changed = all(not torch.equal(after[k], v) for k, v in before.items())
        # Under DDP every .grad left is a view into the reducer's buckets, not memory of its own.
        freed = all(p.grad is None or (backend == "ddp" and p.grad._base is not None)
                    for p in engine.model.parameters())
        norms.append(engine.step())
        scheduler.step()
        engine.zero_grad()
        return changed, freed

    data = batches(20, steps=3, accum=GLOBAL_ACCUM)
    for step, micro_batches in enumerate(data):
        if step == 2 and resume:
            saved = saved_states(engine, scheduler)
        in_backward, grads_freed = window(engine, scheduler, micro_batches)
    out = {"weights": engine.full_state_dict(), "norms": torch.stack(norms), "in_backward": in_backward,
           "grads_freed": grads_freed}
    if resume:
        resumed, resumed_scheduler = make_engine(backend, name, clip, layerwise, world)
        restore_states(resumed, resumed_scheduler, saved)
        window(resumed, resumed_scheduler, data[2])
        out["resumed"] = resumed.full_state_dict()
    return out


def _parallel_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        world = World(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
        results = {case: engine_train(*case, layerwise=True, world=world, rank=rank, resume=case in RESUMED)
                   for case in PARALLEL_CASES}
        # Built twice over one DDP model: the second takes the parameters over (DDP's one hook steps for it).
        cfg = OptimConfig(name="adamw", lr=0.01, layerwise=True)
        data = batches(30 + rank, steps=2, accum=2)
        for times in (1, 2):
            torch.manual_seed(0)
            ddp = DistributedDataParallel(Toy())
            optimizers = [build_optimizer(cfg, ddp) for _ in range(times)]
            results[f"built {times}x"] = train(ddp, optimizers[-1], data, layerwise=True, sync=ddp.no_sync)
        # Without attach_ddp the hooks would see local gradients: that must fail loudly.
        bare = Toy()
        unattached = LayerwiseOptimizer(bare.parameters(), torch.optim.SGD, lr=0.1)
        try:
            loss_of(bare, batches(0, steps=1, accum=1)[0][0]).backward()
            results["unattached_error"] = ""
        except RuntimeError as exc:
            results["unattached_error"] = str(exc)
        unattached.remove_hooks()
        # A replicated DTensor is no FSDP2 shard: summing its squares over the ranks would be wrong.
        from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
        replicated = nn.Parameter(distribute_tensor(torch.randn(4, 4), init_device_mesh("cpu", (world_size,)),
                                                    [Replicate()]))
        try:
            LayerwiseOptimizer([replicated], torch.optim.SGD, lr=0.1)
            results["replicated_error"] = ""
        except UserError as exc:
            results["replicated_error"] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_layerwise_on_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """DDP and FSDP2, AdamW and GaLore, with and without per-parameter clipping, 2 accumulation steps a rank.

    The reference is one process over the same global batch (4 accumulation steps); without
    clipping it is also the ordinary (not per-layer) optimizer's result.
    """
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned workers import this module
    mp.spawn(_parallel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    for case in PARALLEL_CASES:
        backend, name, clip = case
        expected = engine_train("ddp", name, clip, layerwise=True, world=one)
        if clip == 0.0:
            plain = engine_train("ddp", name, clip, layerwise=False, world=one)
            for key, value in plain["weights"].items():
                torch.testing.assert_close(expected["weights"][key], value, rtol=1e-6, atol=1e-7)
        for results in ranks:
            got = results[case]
            assert got["in_backward"], case
            assert got["grads_freed"], case
            torch.testing.assert_close(got["norms"], expected["norms"], rtol=1e-6, atol=0.0, msg=str(case))
            if case in RESUMED:
                assert all(torch.equal(got["resumed"][k], v) for k, v in got["weights"].items()), case
            for key, value in expected["weights"].items():
                torch.testing.assert_close(got["weights"][key], value, rtol=0.0, atol=1e-6,
                                           msg=lambda m: f"{case} {key}: {m}")
    for a, b in zip(*[r[PARALLEL_CASES[0]]["weights"].values() for r in ranks]):
        assert torch.equal(a, b)  # DDP replicas stay identical: every rank stepped on the reduced gradient
    assert all("attach_ddp" in r["unattached_error"] for r in ranks)
    assert all("FSDP2's 1-D sharding" in r["replicated_error"] for r in ranks)
    for results in ranks:
        assert all(torch.equal(a, b) for a, b in zip(results["built 1x"], results["built 2x"]))


def _copy_by_pickle(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_of", [copy.deepcopy, _copy_by_pickle], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])  # GaLoreAdamW's own copies: tests/optim/test_galore.py
def test_a_copy_mid_window_trains_as_the_original(name, copy_of):
    """Copied inside an accumulation window (a gradient held, not the last micro-step): both finish alike."""
    optimizer_class, groups_of, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = Toy()
    optimizer = LayerwiseOptimizer(groups_of(model), optimizer_class, clip_norm=0.5, **kwargs)
    data = batches(11, steps=4, accum=2)
    train(model, optimizer, data[:2], layerwise=True)
    optimizer.begin_micro_step(False)
    (loss_of(model, data[2][0]) / 2).backward()
    twin_model, twin = copy_of((model, optimizer))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        q.grad = p.grad.clone()  # torch copies a parameter without its .grad
    assert type(twin) is LayerwiseOptimizer and twin.optimizer_class is optimizer_class
    assert not twin._is_last_micro_step and twin.clip_norm == 0.5
    assert all(twin.inner[p].state[p] is twin.state[p] and twin.state[p] for p in twin_model.parameters())
    results = []
    for m, opt in ((model, optimizer), (twin_model, twin)):
        before = [p.detach().clone() for p in model.parameters()]
        opt.begin_micro_step(True)
        (loss_of(m, data[2][1]) / 2).backward()  # steps this copy's parameters only
        opt.step()
        opt.zero_grad(set_to_none=True)
        if m is twin_model:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        results.append(train(m, opt, data[3:], layerwise=True))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_second_optimizer_on_the_same_parameters_takes_them_over():
    """Built twice on one model (a re-run notebook cell, say): the newest steps each parameter, once."""
    torch.manual_seed(0)
    base = Toy()
    data = batches(12, steps=2, accum=2)
    cfg = OptimConfig(name="galore", lr=0.01, rank=3, update_proj_gap=2, layerwise=True, layerwise_clip=0.5)
    once = copy.deepcopy(base)
    once_result = train(once, build_optimizer(cfg, once), data, layerwise=True)
    twice = copy.deepcopy(base)
    first = build_optimizer(cfg, twice)
    second = build_optimizer(cfg, twice)
    got = train(twice, second, data, layerwise=True)
    for e, g in zip(once_result, got):
        assert torch.equal(e, g)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in twice.parameters())
    first.step()  # the first is detached: no gradient reaches it, nothing changes
    assert all(torch.equal(p, g) for p, g in zip(twice.parameters(), got))
