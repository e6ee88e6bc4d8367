"""Save schedule, exact resume and resume policy of leantrain.checkpoint.manager.Checkpointer."""

import contextlib
import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from leantrain.checkpoint.config import CheckpointConfig
from leantrain.checkpoint.disk import CheckpointError, find_checkpoints
from leantrain.checkpoint.manager import Checkpointer
from leantrain.errors import UserError
from support import exit_rank, free_port

FINGERPRINT = {"model": {"dim": 4, "layers": 1}, "optim": {"lr": 0.01}}


class GeneratorState:
    """The run's random stream, as a Stateful."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class DataPosition:
    def __init__(self) -> None:
        self.index = 0

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


class ToyRun:
    """A tiny model trained with AdamW and a warm-up schedule on noise drawn from its own generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=self.generator))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / 3))
        self.data = DataPosition()

    def step(self) -> None:
        inputs = torch.randn(8, 4, generator=self.generator) + self.data.index
        loss = self.model(inputs).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.data.index += 1

    def replicated(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule}

    def per_rank(self) -> dict:
        return {"rng": GeneratorState(self.generator), "data": self.data}


def checkpointer(run_dir: Path, interval: int = 2, keep: int = 2, resume: str = "auto", **kwargs) -> Checkpointer:
    config = CheckpointConfig(interval=interval, keep=keep, resume=resume)
    return Checkpointer(config, run_dir, kwargs.pop("fingerprint", FINGERPRINT), **kwargs)


def train(run: ToyRun, ckpt: Checkpointer, first: int, last: int) -> None:
    for step in range(first, last + 1):
        ckpt.wait_before_step()
        run.step()
        ckpt.after_step(step, run.replicated(), run.per_rank())


def flat_state(run: ToyRun) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in run.model.parameters()]
    for state in run.optimizer.state.values():
        tensors += [state[key].clone() for key in ("exp_avg", "exp_avg_sq", "step")]
    return tensors


def test_interrupted_run_resumes_bitwise_exactly(tmp_path):
    reference = ToyRun(seed=0)
    for _ in range(5):
        reference.step()

    first = ToyRun(seed=0)
    train(first, checkpointer(tmp_path), 1, 3)  # saves step 2; step 3 is lost in the "crash"

    resumed = ToyRun(seed=99)
    ckpt = checkpointer(tmp_path)
    assert ckpt.restore(resumed.replicated(), resumed.per_rank()) == 2
    train(resumed, ckpt, 3, 5)

    for got, want in zip(flat_state(resumed), flat_state(reference), strict=True):
        assert torch.equal(got, want)
    assert resumed.schedule.get_last_lr() == reference.schedule.get_last_lr()
    assert resumed.data.index == reference.data.index == 5
    assert torch.equal(resumed.generator.get_state(), reference.generator.get_state())


def test_save_schedule_force_and_keep(tmp_path):
    run = ToyRun(seed=0)
    ckpt = checkpointer(tmp_path, interval=3, keep=2)
    saved = []
    for step in range(1, 9):
        run.step()
        saved.append(ckpt.after_step(step, run.replicated(), run.per_rank()))
    assert saved == [False, False, True, False, False, True, False, False]
    assert ckpt.after_step(8, run.replicated(), run.per_rank(), force=True)
    assert not ckpt.after_step(8, run.replicated(), run.per_rank(), force=True)
    assert [p.name for p in find_checkpoints(tmp_path / "checkpoints")] == ["step_8", "step_6"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_8"

    again = checkpointer(tmp_path, interval=3)
    assert again.restore(run.replicated(), run.per_rank()) == 8
    assert not again.after_step(8, run.replicated(), run.per_rank(), force=True)


def test_disabled_interval_saves_only_when_forced(tmp_path):
    run = ToyRun(seed=0)
    ckpt = checkpointer(tmp_path, interval=0)
    assert not any(ckpt.after_step(step, run.replicated(), run.per_rank()) for step in range(1, 5))
    assert ckpt.after_step(4, run.replicated(), run.per_rank(), force=True)
    assert not ckpt.after_step(0, run.replicated(), run.per_rank(), force=True)


def test_different_configuration_is_refused(tmp_path):
    run = ToyRun(seed=0)
    train(run, checkpointer(tmp_path), 1, 2)
    changed = {"model": {"dim": 4, "layers": 2}, "optim": {"lr": 0.01}, "seed": 1}
    with pytest.raises(UserError) as raised:
        checkpointer(tmp_path, fingerprint=changed).restore(run.replicated(), run.per_rank())
    message = str(raised.value)
    assert "model.layers: 1 -> 2" in message and "seed: (absent) -> 1" in message
    assert str(tmp_path) in message and "optim.lr" not in message


def test_resume_never_refuses_a_used_run_dir(tmp_path):
    run = ToyRun(seed=0)
    fresh = checkpointer(tmp_path, resume="never")
    assert fresh.restore(run.replicated(), run.per_rank()) == 0
    train(run, fresh, 1, 2)
    with pytest.raises(UserError, match=r"checkpoint.resume=never.*checkpoints"):
        checkpointer(tmp_path, resume="never").restore(run.replicated(), run.per_rank())
    assert [p.name for p in find_checkpoints(tmp_path / "checkpoints")] == ["step_2"]


def test_finished_run_dir_is_not_trained_over(tmp_path):
    run = ToyRun(seed=0)
    ckpt = checkpointer(tmp_path, interval=0)
    train(run, ckpt, 1, 2)
    ckpt.save_final(run.model.state_dict())
    for resume in ("auto", "never"):
        with pytest.raises(UserError, match="final"):
            checkpointer(tmp_path, interval=0, resume=resume).restore(run.replicated(), run.per_rank())


def test_resume_from_path_into_a_new_run_dir(tmp_path):
    run = ToyRun(seed=0)
    ckpt = checkpointer(tmp_path / "a", interval=2, keep=3)
    train(run, ckpt, 1, 2)
    at_step_2 = flat_state(run)
    train(run, ckpt, 3, 4)

    other = ToyRun(seed=5)
    source = tmp_path / "a" / "checkpoints" / "step_2"
    assert checkpointer(tmp_path / "b", resume=str(source)).restore(other.replicated(), other.per_rank()) == 2
    for got, want in zip(flat_state(other), at_step_2, strict=True):
        assert torch.equal(got, want)

    (source / "rank_0.pt").write_bytes((source / "rank_0.pt").read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="rank_0.pt is truncated"):
        checkpointer(tmp_path / "b", resume=str(source)).restore(other.replicated(), other.per_rank())
    with pytest.raises(UserError, match="checkpoint.resume=.*step_7: no such directory"):
        checkpointer(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step_7")).restore({}, {})


def test_damaged_newest_falls_back_and_all_damaged_is_refused(tmp_path):
    run = ToyRun(seed=0)
    train(run, checkpointer(tmp_path, keep=3), 1, 4)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_4" / "replicated.pt").write_bytes(b"\0" * 10)

    with pytest.warns(UserWarning, match="step_4"):
        assert checkpointer(tmp_path).restore(run.replicated(), run.per_rank()) == 2
    (checkpoints / "step_2" / "rank_0.pt").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="every checkpoint .* is damaged"):
        checkpointer(tmp_path).restore(run.replicated(), run.per_rank())


def test_bad_settings_name_their_key(tmp_path):
    with pytest.raises(UserError, match="checkpoint.interval"):
        checkpointer(tmp_path, interval=-1)
    with pytest.raises(UserError, match="checkpoint.keep"):
        checkpointer(tmp_path, keep=0)
    with pytest.raises(UserError, match="checkpoint.resume"):
        checkpointer(tmp_path, resume=" ")


def test_changed_set_of_states_is_refused(tmp_path):
    run = ToyRun(seed=0)
    train(run, checkpointer(tmp_path), 1, 2)
    replicated = run.replicated()
    del replicated["schedule"]
    with pytest.raises(UserError, match="replicated state"):
        checkpointer(tmp_path).restore(replicated, run.per_rank())


def run_ranks(world_size: int, work) -> list:
    """Run ``work(rank, barrier)`` on threads standing in for ranks; returns results or exceptions."""
    barrier = threading.Barrier(world_size, timeout=30)
    results: list = [None] * world_size

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, barrier.wait)
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class Tensors:
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, state: dict) -> None:
        self.tensors = dict(state)


def test_ranks_write_and_restore_their_own_state(tmp_path):
    def save(rank, barrier):
        ckpt = checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier)
        shared, mine = Tensors(w=torch.arange(3.0)), Tensors(r=torch.full((2,), float(rank)))
        return ckpt.after_step(2, {"model": shared}, {"rng": mine})

    assert run_ranks(2, save) == [True, True]
    step_dir = tmp_path / "checkpoints" / "step_2"
    assert sorted(p.name for p in step_dir.iterdir()) == ["meta.json", "rank_0.pt", "rank_1.pt", "replicated.pt"]
    assert json.loads((step_dir / "meta.json").read_text())["meta"]["world_size"] == 2

    def restore(rank, barrier):
        ckpt = checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier)
        shared, mine = Tensors(), Tensors()
        step = ckpt.restore({"model": shared}, {"rng": mine})
        return step, shared.tensors["w"], mine.tensors["r"]

    for rank, (step, shared, mine) in enumerate(run_ranks(2, restore)):
        assert step == 2 and torch.equal(shared, torch.arange(3.0))
        assert torch.equal(mine, torch.full((2,), float(rank)))
    assert not (tmp_path / ".checkpoint-restore.json").exists()

    with pytest.raises(UserError, match="saved by 2 ranks and this run has 1"):
        checkpointer(tmp_path).restore({"model": Tensors()}, {"rng": Tensors()})

    def refused(rank, barrier):
        changed = {**FINGERPRINT, "seed": 3}
        ckpt = checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier, fingerprint=changed)
        return ckpt.restore({"model": Tensors()}, {"rng": Tensors()})

    errors = run_ranks(2, refused)
    assert all(isinstance(error, UserError) and "seed" in str(error) for error in errors)


class Shards(Tensors):
    """A per-rank state that takes its part of the concatenated shards of any number of saved ranks."""

    def __init__(self, rank: int, world_size: int, **tensors: torch.Tensor) -> None:
        super().__init__(**tensors)
        self.rank, self.world_size = rank, world_size

    def load_state_dicts(self, states: list[dict]) -> None:
        whole = torch.cat([state["x"] for state in states])
        self.tensors = {"x": whole.chunk(self.world_size)[self.rank]}


def test_resume_at_another_world_size_hands_every_rank_all_saved_states(tmp_path):
    def save(rank, barrier):
        ckpt = checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier)
        x = torch.arange(6.0).chunk(2)[rank]
        return ckpt.after_step(2, {"model": Tensors(w=torch.ones(1))}, {"shards": Shards(rank, 2, x=x)})

    assert run_ranks(2, save) == [True, True]

    def restore(rank, barrier):
        ckpt = checkpointer(tmp_path, rank=rank, world_size=3, barrier=barrier)
        shards = Shards(rank, 3)
        with pytest.warns(UserWarning, match="world size changed from 2 to 3: restoring from the disk checkpoint "
                                             "at step 2") if rank == 0 else contextlib.nullcontext():
            step = ckpt.restore({"model": Tensors()}, {"shards": shards})
        return step, shards.tensors["x"]

    for rank, (step, x) in enumerate(run_ranks(3, restore)):
        assert step == 2 and torch.equal(x, torch.arange(6.0).chunk(3)[rank])
    # A per-rank state without load_state_dicts still refuses another world size, naming itself.
    with pytest.raises(UserError, match=r"saved by 2 ranks and this run has 1: its per-rank state \['shards'\]"):
        checkpointer(tmp_path).restore({"model": Tensors()}, {"shards": Tensors()})


def test_save_final_writes_safetensors_on_rank_0_only(tmp_path):
    weight = torch.randn(5, 3)
    state = {"embed.weight": weight, "head.weight": weight}

    def save(rank, barrier):
        ckpt = checkpointer(tmp_path, rank=rank, world_size=2, barrier=barrier)
        return ckpt.save_final(state if rank == 0 else {}, {"step": "7"})

    assert run_ranks(2, save) == [tmp_path / "final" / "model.safetensors", None]
    loaded = load_file(tmp_path / "final" / "model.safetensors")
    assert torch.equal(loaded["embed.weight"], weight) and torch.equal(loaded["head.weight"], weight)


def gloo_worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        config = CheckpointConfig(interval=1, keep=1)
        shared, mine = Tensors(w=torch.arange(4.0)), Tensors(r=torch.full((3,), 10.0 + rank))
        assert Checkpointer(config, Path(run_dir), FINGERPRINT, rank, world_size).restore(
            {"model": shared}, {"rng": mine}
        ) == 0
        Checkpointer(config, Path(run_dir), FINGERPRINT, rank, world_size, barrier=dist.barrier).after_step(
            1, {"model": shared}, {"rng": mine}
        )
        restored_shared, restored_mine = Tensors(), Tensors()
        ckpt = Checkpointer(config, Path(run_dir), FINGERPRINT, rank, world_size)
        assert ckpt.restore({"model": restored_shared}, {"rng": restored_mine}) == 1
        assert torch.equal(restored_shared.tensors["w"], torch.arange(4.0))
        assert torch.equal(restored_mine.tensors["r"], torch.full((3,), 10.0 + rank))
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_two_processes_with_gloo(tmp_path, monkeypatch):
    # Spawned children import this module by its pytest name (tests.checkpoint...) from the repo root.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.spawn(gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "step_1").iterdir())
    assert names == ["meta.json", "rank_0.pt", "rank_1.pt", "replicated.pt"]
