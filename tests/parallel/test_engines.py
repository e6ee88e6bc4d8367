"""Engine construction, DeepSpeed config handling and sharded checkpoint state, in one process."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from leantrain.errors import UserError
from leantrain.optim.galore import GaLoreAdamW
from leantrain.parallel.config import ParallelConfig
from leantrain.parallel.deepspeed_engine import (
    check_flat_optimizer,
    complete_config,
    load_deepspeed_config,
)
from leantrain.parallel.fsdp import from_local_state, to_local_state, transformer_blocks
from leantrain.parallel.world import World
from leantrain.parallel.wrap import BACKENDS, DataParallelEngine, build_engine

from support import free_port

WORKER = Path(__file__).with_name("sharded_lowrank_worker.py")


def test_backends_are_the_config_choices():
    assert BACKENDS == ("ddp", "fsdp2", "deepspeed")


def test_unknown_backend_names_the_key():
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(UserError, match="parallel.backend.*zero"):
        build_engine(nn.Linear(2, 2), nn.Linear(2, 2), ParallelConfig(backend="zero"), world, lambda: None,
                     grad_clip=1.0, micro_batch_size=1, accumulation_steps=1)


def test_single_process_engine_clips_like_torch_and_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    engine = DataParallelEngine(model, model, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip=0.01)
    with engine.micro_step(is_last=True):
        engine.backward(model(x).square().sum())
    norm = engine.step()
    twin(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert torch.equal(norm, expected) and norm > 0.01
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    replicated, per_rank = engine.checkpoint_states()
    assert set(replicated) == {"model", "optimizer"} and per_rank == {}


def test_deepspeed_config_inline_file_and_default(tmp_path):
    assert load_deepspeed_config(None) == {"zero_optimization": {"stage": 2}}
    inline = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert load_deepspeed_config(inline) == inline
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(inline))
    assert load_deepspeed_config(str(path)) == inline
    with pytest.raises(UserError, match="nope.json"):
        load_deepspeed_config(str(tmp_path / "nope.json"))
    path.write_text("{not json")
    with pytest.raises(UserError, match="ds.json"):
        load_deepspeed_config(str(path))


def test_deepspeed_config_takes_batch_and_clipping_from_the_trainer():
    done = complete_config({"zero_optimization": {"stage": 3}}, micro_batch_size=4, accumulation_steps=2,
                           world_size=2, grad_clip=0.5)
    assert done["train_batch_size"] == 16 and done["gradient_accumulation_steps"] == 2
    assert done["train_micro_batch_size_per_gpu"] == 4 and done["gradient_clipping"] == 0.5
    assert complete_config({}, micro_batch_size=1, accumulation_steps=1, world_size=1,
                           grad_clip=0.0)["zero_optimization"]["stage"] == 2
    with pytest.raises(UserError, match="parallel.deepspeed.optimizer.*optim"):
        complete_config({"optimizer": {"type": "Adam"}}, micro_batch_size=1, accumulation_steps=1, world_size=1,
                        grad_clip=0.0)
    with pytest.raises(UserError, match="train_batch_size.*trainer.global_batch_size"):
        complete_config({"train_batch_size": 8}, micro_batch_size=1, accumulation_steps=1, world_size=1,
                        grad_clip=0.0)
    with pytest.raises(UserError, match="stage=0"):
        complete_config({"zero_optimization": {"stage": 0}}, micro_batch_size=1, accumulation_steps=1,
                        world_size=1, grad_clip=0.0)


def test_deepspeed_refuses_low_rank_optimizers_naming_fsdp2():
    w = nn.Parameter(torch.randn(4, 3))
    check_flat_optimizer(torch.optim.AdamW([w]))
    with pytest.raises(UserError, match="GaLoreAdamW.*1-D partitions.*parallel.backend=fsdp2"):
        check_flat_optimizer(GaLoreAdamW([{"params": [w], "rank": 2}]))


def test_transformer_blocks_of_leantrain_and_gpt2_like_models():
    class Leantrain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    class Gpt2(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.h = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    assert len(transformer_blocks(Leantrain())) == 3
    assert len(transformer_blocks(Gpt2())) == 2
    assert transformer_blocks(nn.Linear(2, 2)) == []


@pytest.fixture
def one_rank_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_local_state_round_trips_dtensors_through_weights_only_load(one_rank_mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    sharded = distribute_tensor(torch.arange(12.0).view(4, 3), one_rank_mesh, [Shard(0)])
    replicated = distribute_tensor(torch.ones(2), one_rank_mesh, [Replicate()])
    tree = {"a": sharded, "b": [replicated, torch.zeros(1)], "step": 3}
    local = to_local_state(tree)
    assert not any(isinstance(v, DTensor) for v in (local["a"], *local["b"]))
    buffer = io.BytesIO()
    torch.save(local, buffer)
    buffer.seek(0)
    back = from_local_state(torch.load(buffer, weights_only=True), one_rank_mesh)
    assert isinstance(back["a"], DTensor) and back["a"].placements == (Shard(0),)
    assert back["b"][0].placements == (Replicate(),)
    assert torch.equal(back["a"].full_tensor(), sharded.full_tensor()) and back["step"] == 3


@pytest.mark.slow
def test_sharded_low_rank_optimizers_match_single_device_on_two_ranks():
    """GaLore, Natural GaLore and FRUGAL on 2 gloo ranks against the single-device optimizers (see the worker)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(WORKER)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK 35" in result.stdout


def test_reshard_local_states_cuts_this_ranks_part_of_the_old_shards(one_rank_mesh):
    from leantrain.parallel.fsdp import reshard_local_states

    whole = torch.arange(15.0).view(5, 3)
    saved = [{"w": {"__dtensor_local__": part, "placements": [["shard", 1]], "shape": [5, 3]},
              "b": {"__dtensor_local__": torch.ones(2), "placements": [["replicate"]], "shape": [2]},
              "step": torch.tensor(4.0), "lr": 0.1}
             for part in (whole[:, :2], whole[:, 2:])]
    tree = reshard_local_states(saved, one_rank_mesh)
    assert torch.equal(tree["w"]["__dtensor_local__"], whole) and tree["w"]["shape"] == [5, 3]
    assert torch.equal(tree["b"]["__dtensor_local__"], torch.ones(2)) and tree["lr"] == 0.1
    with pytest.raises(ValueError, match="global shape"):
        reshard_local_states([saved[0]], one_rank_mesh)


@pytest.mark.parametrize("kind", ["GaLoreAdamW", "NaturalGaLoreAdamW"])
def test_plain_galore_on_dtensor_parameters_names_shard_optimizer(one_rank_mesh, kind):
    from torch.distributed.tensor import Shard, distribute_tensor

    from leantrain import optim

    weight = nn.Parameter(distribute_tensor(torch.randn(6, 4), one_rank_mesh, [Shard(0)]))
    optimizer = getattr(optim, kind)([{"params": [weight], "rank": 2}])
    weight.grad = distribute_tensor(torch.randn(6, 4), one_rank_mesh, [Shard(0)])
    with pytest.raises(UserError, match=r"leantrain\.parallel\.shard_optimizer\(" + kind):
        optimizer.step()
    from leantrain.parallel import shard_optimizer

    shard_optimizer(optimizer).step()  # the way the message names


def test_sharded_galore_state_dict_places_split_state(one_rank_mesh):
    """Left projection: P and the column-split moments are Shard DTensors of global shape, Q-less counters plain."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from leantrain.optim.natural_galore import NaturalGaLoreAdamW
    from leantrain.parallel import shard_optimizer

    weight = nn.Parameter(distribute_tensor(torch.randn(4, 9), one_rank_mesh, [Shard(0)]))
    optimizer = shard_optimizer(NaturalGaLoreAdamW([{"params": [weight], "rank": 2}], history=3))
    weight.grad = distribute_tensor(torch.randn(4, 9), one_rank_mesh, [Shard(0)])
    optimizer.step()
    state = optimizer.state_dict()["state"][0]
    assert isinstance(state["proj_left"], DTensor) and state["proj_left"].placements == (Shard(0),)
    assert state["exp_avg"].shape == (2, 9) and state["exp_avg"].placements == (Shard(1),)
    assert state["history"].shape == (3, 2, 9) and state["history"].placements == (Shard(2),)
    assert not isinstance(state["step"], DTensor)
    before = {key: value.clone() for key, value in optimizer.state[weight].items()}
    optimizer.load_state_dict(optimizer.state_dict())
    assert all(torch.equal(optimizer.state[weight][key], value) for key, value in before.items())


@pytest.mark.slow
def test_optimizers_on_fsdp2_round_trip_through_dcp_and_reshard(tmp_path):
    """2 ranks: save, load, next 5 steps bit-equal; then the same checkpoint resumed at 1 rank (see the worker)."""
    worker = Path(__file__).with_name("dcp_worker.py")
    for nproc, mode in ((2, "save"), (1, "resume")):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(worker), mode, str(tmp_path)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-4000:]
        assert f"OK {mode} 12" in result.stdout


def test_shard_optimizer_refuses_8_bit_state_naming_the_key(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from leantrain.parallel import shard_optimizer

    weight = nn.Parameter(distribute_tensor(torch.randn(6, 4), one_rank_mesh, [Shard(0)]))
    with pytest.raises(UserError, match="optim.state_bits=8 cannot run on FSDP2"):
        shard_optimizer(GaLoreAdamW([{"params": [weight], "rank": 2}], state_bits=8))
