"""Lazy multi-level checkpointing through real keeper processes (ranks are threads here).

Each test starts one keeper per simulated node, crashes trainers (their connection drops, as when
the process dies) or whole nodes (SIGKILL of the keeper), and restores: from memory, from the
peers' parity, or from disk, always bit-exact. Damaged snapshots and shards are skipped with a
warning naming them. No keeper survives a test.
"""

import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from leantrain.checkpoint.config import CheckpointConfig, ErasureConfig
from leantrain.checkpoint.disk import find_checkpoints, latest_good_checkpoint
from leantrain.checkpoint.keeper import record_path
from leantrain.checkpoint.keeper_client import KeeperClient
from leantrain.checkpoint.manager import Checkpointer
from leantrain.checkpoint.multilevel import NodeLayout
from leantrain.errors import UserError

FINGERPRINT = {"model": {"dim": 8}, "seed": 0}
_GLOBAL_RNG = threading.Lock()


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class Generator:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class Rank:
    """One data-parallel rank of a toy run: replicated model and AdamW, its own generator and counter."""

    def __init__(self, rank: int, seed: int = 0, extra: int = 0, device: str = "cpu") -> None:
        with _GLOBAL_RNG:  # ranks are threads here: module initialisation draws from the global generator
            torch.manual_seed(seed)
            self.model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 4))
            if extra:
                self.model.register_parameter("big", torch.nn.Parameter(torch.randn(extra)))
        self.device = device
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / 3))
        self.shared = Generator(1234)  # the same batches on every rank keep the replicas identical
        self.own = Generator(100 + rank)
        self.counter = Counter()

    def step(self, checkpointer: Checkpointer) -> None:
        inputs = torch.randn(8, 6, generator=self.shared.generator).to(self.device)
        loss = self.model(inputs).square().mean()
        if "big" in dict(self.model.named_parameters()):
            loss = loss + self.model.big.square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        checkpointer.wait_before_step()
        self.optimizer.step()
        self.schedule.step()
        torch.randn(3, generator=self.own.generator)
        self.counter.value += 1

    def replicated(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule, "shared": self.shared}

    def per_rank(self) -> dict:
        return {"own": self.own, "counter": self.counter}

    def flat(self) -> list[torch.Tensor]:
        tensors = [p.detach().clone() for p in self.model.parameters()]
        for state in self.optimizer.state.values():
            tensors += [state[key].clone() for key in ("exp_avg", "exp_avg_sq", "step")]
        return tensors + [self.own.generator.get_state(), self.shared.generator.get_state(),
                          torch.tensor(self.counter.value)]


def reference(steps: int, rank: int = 0, extra: int = 0) -> list[torch.Tensor]:
    run = Rank(rank, extra=extra)
    stub = Checkpointer(CheckpointConfig(), Path("/nonexistent"), FINGERPRINT)
    for _ in range(steps):
        run.step(stub)
    return run.flat()


def assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def crash(checkpointer: Checkpointer) -> None:
    """What the keeper sees when a trainer process dies: its connection drops, nothing is flushed."""
    lazy = checkpointer._lazy
    if lazy._pending is not None:
        lazy._pending.wait_complete()
    lazy.keeper.close()


def kill_keeper(run_dir: Path, name: str) -> None:
    """A lost node: its keeper dies at once, with every snapshot and parity block it held."""
    pid = json.loads(record_path(run_dir, name).read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    """True while any thread of ``pid`` still runs (a zombie leader may wait for its threads to exit)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        except FileNotFoundError:
            continue
    return False


@pytest.fixture(autouse=True)
def no_keeper_survives(tmp_path):
    yield
    leftovers = []
    for record in tmp_path.rglob("keepers/*.json"):
        try:
            pid = json.loads(record.read_text())["pid"]
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            leftovers.append(pid)
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"keepers still running after the test: {leftovers}"


def run_ranks(layouts: list[NodeLayout], work) -> list:
    """Run ``work(rank, layout, barrier)`` on one thread per rank; returns results, raises the first error."""
    barrier = threading.Barrier(len(layouts), timeout=60)
    results: list = [None] * len(layouts)

    def target(rank: int) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[rank] = (work(rank, layouts[rank], barrier.wait), [str(w.message) for w in caught])
        except BaseException as error:  # noqa: BLE001 - handed to the test
            barrier.abort()
            results[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(len(layouts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # the first cause, not the broken barriers it left behind
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def layouts(nnodes: int, per_node: int) -> list[NodeLayout]:
    return [NodeLayout(node=r // per_node, nnodes=nnodes, local_rank=r % per_node, local_world_size=per_node,
                       name=f"node{r // per_node}") for r in range(nnodes * per_node)]


def config(**changes) -> CheckpointConfig:
    settings = {"mode": "lazy", "interval": 2, "keep": 3, "keeper_idle_s": 20.0, "keeper_timeout_s": 20.0, **changes}
    return CheckpointConfig(**settings)


def single(name: str = "solo") -> NodeLayout:
    return NodeLayout(node=0, nnodes=1, local_rank=0, local_world_size=1, name=name)


def test_restart_resumes_from_memory_bit_exactly_and_disk_has_the_interval_steps(tmp_path):
    run = Rank(0)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(run.replicated(), run.per_rank()) == 0 and checkpointer.restore_source is None
    for step in range(1, 6):
        run.step(checkpointer)
        assert checkpointer.after_step(step, run.replicated(), run.per_rank())
    assert checkpointer.stats.snapshots == 5
    crash(checkpointer)

    resumed = Rank(0, seed=99)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 5
    assert checkpointer.restore_source == "memory"
    for step in range(6, 9):
        resumed.step(checkpointer)
        checkpointer.after_step(step, resumed.replicated(), resumed.per_rank(), force=step == 8)
    assert_equal(resumed.flat(), reference(8))
    assert [p.name for p in find_checkpoints(tmp_path / "checkpoints")] == ["step_8", "step_6", "step_4"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_8"
    checkpointer.save_final(resumed.model.state_dict())
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_optimizer_pre_hook_waits_even_without_wait_before_step(tmp_path):
    run = Rank(0, extra=1 << 20)
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    stub = Checkpointer(CheckpointConfig(), tmp_path / "unused", FINGERPRINT)
    for step in range(1, 4):
        run.step(stub)  # never calls the lazy checkpointer's wait_before_step: the hook must
        checkpointer.after_step(step, run.replicated(), run.per_rank())
    crash(checkpointer)
    resumed = Rank(0, seed=5, extra=1 << 20)
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 3
    assert_equal(resumed.flat(), reference(3, extra=1 << 20))
    checkpointer.close(shutdown_keeper=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_snapshot_restores_its_own_step_while_the_next_one_runs(tmp_path, device):
    """The snapshot is copied while the next step runs (on CUDA: on a side stream, into pinned slots);
    it restores, bit for bit, the state of its own step, not what the optimizer wrote after it."""
    run = Rank(0, extra=1 << 20, device=device)
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    for step in range(1, 4):
        run.step(checkpointer)
        assert checkpointer.after_step(step, run.replicated(), run.per_rank())
    assert checkpointer._lazy._pending._cuda == (device == "cuda")  # step 3's copies: the CUDA side stream
    at_step_3 = run.flat()
    run.step(checkpointer)  # the optimizer overwrites weights and moments as soon as their copies are done
    crash(checkpointer)
    resumed = Rank(0, seed=5, extra=1 << 20, device=device)
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 3
    assert checkpointer.restore_source == "memory"
    assert all(p.device.type == device for p in resumed.model.parameters())
    assert_equal(resumed.flat(), at_step_3)
    checkpointer.close(shutdown_keeper=True)


def test_damaged_memory_snapshot_is_skipped_with_a_warning(tmp_path):
    run = Rank(0)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    for step in range(1, 6):
        run.step(checkpointer)
        checkpointer.after_step(step, run.replicated(), run.per_rank())
    checkpointer._lazy._pending.wait_complete()
    settle_keeper(tmp_path)
    # Flip one bit in every slot (what a faulty DIMM or a stray write would do).
    for memory in checkpointer._lazy.keeper._mappings.values():
        memory[1000] ^= 0x04
    crash(checkpointer)
    resumed = Rank(0, seed=3)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 4
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages
    for step, message in zip((4, 5), messages):
        assert f"memory snapshot of step {step} of local rank 0 (slot" in message and "checksum" in message
    assert checkpointer.restore_source == "disk"
    assert_equal(resumed.flat(), reference(4))
    checkpointer.close(shutdown_keeper=True)


def test_damaged_shards_are_skipped_at_levels_2_and_3(tmp_path):
    level3 = tmp_path / "shared"
    run = Rank(0)
    checkpointer = Checkpointer(config(level3_dir=str(level3)), tmp_path / "run", FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    for step in range(1, 7):
        run.step(checkpointer)
        checkpointer.after_step(step, run.replicated(), run.per_rank(), force=step == 6)
    checkpointer.close(shutdown_keeper=True)  # memory is gone: only disk is left
    level2 = tmp_path / "run" / "checkpoints"
    assert find_checkpoints(level2)[0].name == find_checkpoints(level3)[0].name == "step_6"

    truncated = level2 / "step_6" / "replicated.pt"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = level3 / "step_6" / "rank_0.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    resumed = Rank(0, seed=4)
    checkpointer = Checkpointer(config(level3_dir=str(level3)), tmp_path / "run", FINGERPRINT, layout=single())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 4
    messages = " | ".join(str(w.message) for w in caught)
    assert str(truncated) in messages and "truncated" in messages
    assert str(flipped) in messages and "corrupt" in messages
    assert checkpointer.restore_source == "disk"
    assert_equal(resumed.flat(), reference(4))
    checkpointer.close(shutdown_keeper=True)

    import shutil

    shutil.rmtree(level2)  # a lost local disk: the shared copy still has a good checkpoint
    again = Rank(0, seed=5)
    checkpointer = Checkpointer(config(level3_dir=str(level3)), tmp_path / "run", FINGERPRINT, layout=single())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert checkpointer.restore(again.replicated(), again.per_rank()) == 4
    assert_equal(again.flat(), reference(4))
    checkpointer.close(shutdown_keeper=True)


def test_keeper_killed_in_the_middle_of_a_disk_write_leaves_the_previous_checkpoint(tmp_path):
    size = 4 << 20  # 48 MB with its AdamW state: the write lasts long enough to be caught in the middle
    run = Rank(0, extra=size)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    for step in range(1, 5):
        run.step(checkpointer)
        checkpointer.after_step(step, run.replicated(), run.per_rank())
    directory = tmp_path / "checkpoints"
    settle_keeper(tmp_path)  # step 2 is on disk
    checkpointer._lazy._settle_pending()  # step 4 is complete everywhere: its disk save starts now
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".tmp-step_4") for p in directory.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.001)
    kill_keeper(tmp_path, "solo")
    assert not (directory / "step_4").exists(), "the save finished before the keeper could be killed"
    assert (directory / "latest").read_text().strip() == "step_2"
    assert latest_good_checkpoint(directory).name == "step_2"
    checkpointer._lazy.keeper.close()

    resumed = Rank(0, seed=8, extra=size)
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(resumed.replicated(), resumed.per_rank()) == 2
    assert checkpointer.restore_source == "disk"
    assert not any(p.name.startswith(".tmp-") for p in directory.iterdir())
    assert_equal(resumed.flat(), reference(2, extra=size))
    checkpointer.close(shutdown_keeper=True)


def train_three_steps_then_crash(tmp_path: Path):
    """A rank's work: three steps with a memory snapshot each, then a crash that leaves the keepers running."""

    def train(rank, layout, barrier):
        run = Rank(rank)
        checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, rank, 2, barrier, layout=layout)
        checkpointer.restore(run.replicated(), run.per_rank())
        for step in range(1, 4):
            run.step(checkpointer)
            checkpointer.after_step(step, run.replicated(), run.per_rank())
        crash(checkpointer)

    return train


def resume_from_fresh_state(tmp_path: Path, seed: int):
    """A rank's work: restore into states drawn from ``seed`` + rank; returns (step, source, restored states)."""

    def resume(rank, layout, barrier):
        run = Rank(rank, seed=seed + rank)
        checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, rank, 2, barrier, layout=layout)
        step = checkpointer.restore(run.replicated(), run.per_rank())
        flat = run.flat()
        checkpointer.close(shutdown_keeper=True)
        return step, checkpointer.restore_source, flat

    return resume


def test_local_ranks_share_the_replicated_state_and_restore_their_own(tmp_path):
    run_ranks(layouts(1, 2), train_three_steps_then_crash(tmp_path))
    for rank, ((step, source, flat), _) in enumerate(run_ranks(layouts(1, 2), resume_from_fresh_state(tmp_path, 50))):
        assert (step, source) == (3, "memory")
        assert_equal(flat, reference(3, rank))


def test_ranks_that_changed_nodes_get_their_own_state(tmp_path):
    """A node restarted alone may get another group rank from torchrun: ranks then swap nodes."""
    run_ranks(layouts(2, 1), train_three_steps_then_crash(tmp_path))
    swapped = [NodeLayout(node=r, nnodes=2, local_rank=0, local_world_size=1, name=f"node{1 - r}") for r in range(2)]
    for rank, ((step, source, flat), _) in enumerate(run_ranks(swapped, resume_from_fresh_state(tmp_path, 40))):
        assert (step, source) == (3, "memory")
        assert_equal(flat, reference(3, rank))


def settle_keeper(run_dir: Path) -> None:
    """Until node 0's keeper has saved the disk checkpoints it was given and checksummed every snapshot."""
    client, _ = KeeperClient.attach(run_dir, "solo", 99, False, "127.0.0.1", 20.0, 20.0)
    client.call("flush")
    client.call("inventory")
    client.close()


def wait_protected(run_dir: Path, nodes: int, step: int) -> None:
    """Until every keeper reports ``step`` protected by parity."""
    deadline = time.monotonic() + 30
    for node in range(nodes):
        client, _ = KeeperClient.attach(run_dir, f"node{node}", 99, False, "127.0.0.1", 20.0, 20.0)
        try:
            while client.call("inventory")[0]["protected"] != step:
                assert time.monotonic() < deadline, f"node {node} never protected step {step}"
                time.sleep(0.05)
        finally:
            client.close()


@pytest.mark.parametrize("k,m,lost,source", [(1, 1, [1], "peer"), (2, 1, [0], "peer"), (2, 1, [0, 2], "disk")])
def test_lost_nodes_are_rebuilt_from_the_parity_of_their_group(tmp_path, k, m, lost, source):
    nnodes = k + m
    ec = ErasureConfig(k=k, m=m)

    def train(rank, layout, barrier):
        run = Rank(rank)
        checkpointer = Checkpointer(config(ec=ec), tmp_path, FINGERPRINT, rank, nnodes, barrier, layout=layout)
        checkpointer.restore(run.replicated(), run.per_rank())
        for step in range(1, 6):
            run.step(checkpointer)
            checkpointer.after_step(step, run.replicated(), run.per_rank())
        checkpointer._lazy.flush()  # every rank has step 5 (the candidate for parity); step 4 is on disk
        return checkpointer

    trainers = [result for result, _ in run_ranks(layouts(nnodes, 1), train)]
    wait_protected(tmp_path, nnodes, 5)
    for checkpointer in trainers:
        crash(checkpointer)
    for node in lost:
        kill_keeper(tmp_path, f"node{node}")

    def resume(rank, layout, barrier):
        run = Rank(rank, seed=70 + rank)
        checkpointer = Checkpointer(config(ec=ec), tmp_path, FINGERPRINT, rank, nnodes, barrier, layout=layout)
        step = checkpointer.restore(run.replicated(), run.per_rank())
        flat = run.flat()
        checkpointer.close(shutdown_keeper=True)
        return step, checkpointer.restore_source, flat

    expected_step = 5 if source == "peer" else 4
    for rank, ((step, got_source, flat), _) in enumerate(run_ranks(layouts(nnodes, 1), resume)):
        assert (step, got_source) == (expected_step, source)
        assert_equal(flat, reference(expected_step, rank))


def test_bad_lazy_settings_name_their_key(tmp_path):
    with pytest.raises(UserError, match="checkpoint.mode"):
        Checkpointer(CheckpointConfig(mode="eager"), tmp_path, FINGERPRINT)
    with pytest.raises(UserError, match="checkpoint.memory_interval"):
        Checkpointer(config(memory_interval=0), tmp_path, FINGERPRINT)
    with pytest.raises(UserError, match="checkpoint.interval=5 must be a multiple of checkpoint.memory_interval=2"):
        Checkpointer(config(interval=5, memory_interval=2), tmp_path, FINGERPRINT)
    with pytest.raises(UserError, match="checkpoint.ec"):
        Checkpointer(config(ec=ErasureConfig(k=1, m=0)), tmp_path, FINGERPRINT)
    with pytest.raises(UserError, match="checkpoint.ec.*divide"):
        Checkpointer(config(ec=ErasureConfig(k=1, m=1)), tmp_path, FINGERPRINT)
    with pytest.raises(UserError, match="checkpoint.ec.library"):
        Checkpointer(config(ec=ErasureConfig(k=1, m=1, library="raid")), tmp_path, FINGERPRINT,
                     layout=NodeLayout(node=0, nnodes=2, local_rank=0, local_world_size=1, name="a"))
    run = Rank(0)
    checkpointer = Checkpointer(config(host_buffer_mb=1), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), run.per_rank())
    big = Rank(0, extra=1 << 18)
    with pytest.raises(UserError, match="checkpoint.host_buffer_mb=1"):
        checkpointer.after_step(1, big.replicated(), big.per_rank())
    checkpointer.close(shutdown_keeper=True)


class Growing:
    """A state that grows between snapshots (as LISA's or FRUGAL's optimizer state can)."""

    def __init__(self) -> None:
        self.values = torch.zeros(0)

    def state_dict(self) -> dict:
        return {"values": self.values}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].clone()


def test_slots_grow_with_the_state(tmp_path):
    run, growing = Rank(0), Growing()
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    checkpointer.restore(run.replicated(), {"growing": growing})
    for step in range(1, 5):
        growing.values = torch.arange(float(step * (600_000 if step > 2 else 10)))  # 2.4 MB then 9.6 MB
        run.step(checkpointer)
        checkpointer.after_step(step, run.replicated(), {"growing": growing})
    crash(checkpointer)
    restored = Growing()
    checkpointer = Checkpointer(config(interval=0), tmp_path, FINGERPRINT, layout=single())
    assert checkpointer.restore(Rank(0, seed=9).replicated(), {"growing": restored}) == 4
    assert torch.equal(restored.values, torch.arange(float(4 * 600_000)))
    checkpointer.close(shutdown_keeper=True)


class GlobalCounter(Counter):
    """A per-rank state that may resume at another world size: every rank holds the same value."""

    def load_state_dicts(self, states: list[dict]) -> None:
        self.load_state_dict(states[0])


def test_another_world_size_skips_the_memory_snapshots_for_the_disk_level(tmp_path):
    """2 ranks snapshot steps 1-3 (disk: step 2); resumed by 1 rank, memory holds the old ranks' shards."""

    def train(rank, layout, barrier):
        run, counter = Rank(rank), GlobalCounter()
        checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, rank, 2, barrier, layout=layout)
        checkpointer.restore(run.replicated(), {"counter": counter})
        for step in range(1, 4):
            run.step(checkpointer)
            counter.value = step
            checkpointer.after_step(step, run.replicated(), {"counter": counter})
        checkpointer.flush()
        crash(checkpointer)

    run_ranks(layouts(1, 2), train)
    run, counter = Rank(0, seed=7), GlobalCounter()
    checkpointer = Checkpointer(config(), tmp_path, FINGERPRINT, layout=layouts(1, 1)[0])
    with pytest.warns(UserWarning, match="world size changed from 2 to 1: restoring from the disk checkpoint at "
                                         "step 2 .*memory snapshots hold the old ranks' shards"):
        assert checkpointer.restore(run.replicated(), {"counter": counter}) == 2
    assert checkpointer.restore_source == "disk" and counter.value == 2
    assert_equal(run.flat()[:-3], reference(2)[:-3])  # the model and its optimizer state
    checkpointer.close(shutdown_keeper=True)
