"""Faults during saves and resumes (leantrain.checkpoint): a full disk, denied permissions, a changed model,
a killed keeper, a killed lazy run's leftovers."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from leantrain.checkpoint import disk
from leantrain.checkpoint.config import CheckpointConfig
from leantrain.checkpoint.disk import CheckpointError, find_checkpoints, latest_good_checkpoint
from leantrain.checkpoint.keeper import record_path
from leantrain.checkpoint.keeper_client import node_name
from leantrain.checkpoint.manager import Checkpointer
from leantrain.checkpoint.multilevel import NodeLayout
from leantrain.errors import UserError

FINGERPRINT = {"model": {"dim": 4}}


class Blob:
    """Per-rank state whose size the test chooses (to make one save larger than the disk allows)."""

    def __init__(self) -> None:
        self.data = torch.zeros(4)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data = state["data"]


class Toy:
    def __init__(self, seed: int = 0, width: int = 3) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, width)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.blob = Blob()

    def step(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.ones(2, 4)).square().mean().backward()
        self.optimizer.step()

    def replicated(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer}

    def per_rank(self) -> dict:
        return {"blob": self.blob}


def sync(run_dir: Path, **changes) -> Checkpointer:
    return Checkpointer(CheckpointConfig(interval=2, keep=5, **changes), run_dir, FINGERPRINT)


def lazy(run_dir: Path, **changes) -> Checkpointer:
    settings = {"mode": "lazy", "interval": 2, "keep": 5, "keeper_idle_s": 20.0, "keeper_timeout_s": 20.0, **changes}
    return Checkpointer(CheckpointConfig(**settings), run_dir, FINGERPRINT,
                        layout=NodeLayout(node=0, nnodes=1, local_rank=0, local_world_size=1, name="solo"))


def steps(toy: Toy, checkpointer: Checkpointer, first: int, last: int) -> None:
    for step in range(first, last + 1):
        checkpointer.wait_before_step()
        toy.step()
        checkpointer.after_step(step, toy.replicated(), toy.per_rank())


def disk_full(monkeypatch) -> None:
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk._HashingWriter, "write", write)


def permission_denied(monkeypatch) -> None:
    def open_staging(directory, step, tag=""):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))

    monkeypatch.setattr("leantrain.checkpoint.manager.open_staging", open_staging)


@pytest.mark.parametrize("fault", [disk_full, permission_denied], ids=["disk_full", "permission_denied"])
def test_a_failed_sync_save_names_the_fault_keeps_latest_and_resume_works(tmp_path, monkeypatch, fault):
    toy = Toy()
    checkpointer = sync(tmp_path)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    steps(toy, checkpointer, 1, 2)
    with monkeypatch.context() as patch:
        fault(patch)
        toy.step()
        with pytest.raises(CheckpointError) as raised:
            checkpointer.after_step(4, toy.replicated(), toy.per_rank())
    message = str(raised.value)
    assert "step 4" in message and os.strerror(errno.ENOSPC if fault is disk_full else errno.EACCES) in message
    assert f"{tmp_path / 'checkpoints' / 'step_2'} and latest are kept" in message
    directory = tmp_path / "checkpoints"
    assert (directory / "latest").read_text().strip() == "step_2"
    assert [p.name for p in directory.iterdir()] == ["step_2", "latest"] or \
        sorted(p.name for p in directory.iterdir()) == ["latest", "step_2"]
    resumed = Toy(seed=5)
    assert sync(tmp_path).restore(resumed.replicated(), resumed.per_rank()) == 2


def test_a_changed_model_is_refused_naming_every_differing_key_and_loads_nothing(tmp_path):
    toy = Toy()
    checkpointer = sync(tmp_path)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    steps(toy, checkpointer, 1, 2)
    wider = Toy(seed=3, width=5)  # same fingerprint (as if the config check were bypassed): the states differ
    wider.model.register_buffer("extra", torch.zeros(1))
    before = {k: v.clone() for k, v in wider.model.state_dict().items()}
    with pytest.raises(UserError) as raised:
        sync(tmp_path).restore(wider.replicated(), wider.per_rank())
    message = str(raised.value)
    assert "nothing was loaded" in message
    assert "model.weight: shape [3, 4] in the checkpoint, [5, 4] here" in message
    assert "model.bias: shape [3]" in message and "model.extra: missing from the checkpoint" in message
    assert all(torch.equal(before[k], v) for k, v in wider.model.state_dict().items())
    assert wider.blob.data.shape == (4,) and not wider.optimizer.state


def test_a_different_optimizer_layout_is_refused_before_loading(tmp_path):
    toy = Toy()
    checkpointer = sync(tmp_path)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    steps(toy, checkpointer, 1, 2)
    other = Toy(seed=1)
    other.optimizer = torch.optim.AdamW([{"params": [other.model.weight]}, {"params": [other.model.bias]}])
    weight = other.model.weight.detach().clone()
    with pytest.raises(UserError, match=r"optimizer: parameter groups of sizes \[2\] in the checkpoint, \[1, 1\] here"):
        sync(tmp_path).restore(other.replicated(), other.per_rank())
    assert torch.equal(other.model.weight, weight)


def keeper_pid(run_dir: Path, name: str = "solo") -> int:
    return json.loads(record_path(run_dir, name).read_text())["pid"]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def limit_file_size(pid: int, nbytes: int) -> None:
    """Limit the size of files process ``pid`` writes: past it writes fail with EFBIG (Python ignores
    SIGXFSZ), as they fail on a full disk. Its existing shared-memory slots are not affected."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_failed_lazy_disk_save_warns_training_goes_on_and_resume_works(tmp_path):
    toy = Toy()
    toy.blob.data = torch.zeros(1 << 18)  # 1 MiB of rank state
    checkpointer = lazy(tmp_path)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    directory, log = tmp_path / "checkpoints", record_path(tmp_path, "solo").with_suffix(".log")
    try:
        steps(toy, checkpointer, 1, 2)
        checkpointer.flush()  # step 2 is on disk
        limit_file_size(keeper_pid(tmp_path), 1 << 16)
        steps(toy, checkpointer, 3, 4)
        checkpointer._lazy._settle_pending()  # step 4 is complete: its disk save starts now, and fails
        deadline = time.monotonic() + 20
        while "saving step 4 to disk failed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert (directory / "latest").read_text().strip() == "step_2"
        limit_file_size(keeper_pid(tmp_path), resource.RLIM_INFINITY)
        with pytest.warns(UserWarning, match="disk checkpoint of step 4: .*File too large.*training goes on"):
            steps(toy, checkpointer, 5, 6)  # the failure is reported with the next snapshot
        checkpointer.flush()
        assert sorted(p.name for p in find_checkpoints(directory)) == ["step_2", "step_6"]
        assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
    finally:
        checkpointer.close(shutdown_keeper=True)
    resumed = Toy(seed=9)
    assert sync(tmp_path).restore(resumed.replicated(), resumed.per_rank()) == 6


def test_a_killed_keeper_stops_the_run_clearly_instead_of_hanging(tmp_path):
    toy = Toy()
    checkpointer = lazy(tmp_path)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    steps(toy, checkpointer, 1, 2)
    checkpointer.flush()
    pid = keeper_pid(tmp_path)
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="snapshot keeper of node solo is gone"):
        steps(toy, checkpointer, 3, 6)
    assert time.monotonic() - started < 10
    resumed = Toy(seed=9)
    assert sync(tmp_path).restore(resumed.replicated(), resumed.per_rank()) == 2


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_lazy_run_leaves_no_shared_memory_segment_and_no_keeper(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    before = shm_entries()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trainer = subprocess.Popen([sys.executable, "-m", "leantrain", "train", "quickstart", *tiny_overrides,
                                "trainer.max_steps=100000", "trainer.eval_interval=0", "checkpoint.mode=lazy",
                                "checkpoint.interval=2", "checkpoint.keeper_idle_s=2"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_2").is_dir():
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()
        time.sleep(0.05)
    keeper = keeper_pid(run, node_name())
    assert alive(keeper) and processes_naming(str(run))
    trainer.kill()
    trainer.wait()
    # The keeper outlives its trainer on purpose (a restarted trainer resumes from its memory), for
    # checkpoint.keeper_idle_s; then it exits, and its memfd slots go with it.
    deadline = time.monotonic() + 30
    while alive(keeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(keeper), "the keeper outlived keeper_idle_s"
    assert processes_naming(str(run)) == []
    assert shm_entries() - before == set(), "a shared-memory segment was left in /dev/shm"
    assert not record_path(run, node_name()).exists()


def test_save_now_in_lazy_mode_writes_the_snapshot_taken_or_a_new_one(tmp_path):
    """What a stop signal does in lazy mode: the step already snapshotted to memory only goes to disk too."""
    toy = Toy()
    checkpointer = lazy(tmp_path, interval=4)
    checkpointer.restore(toy.replicated(), toy.per_rank())
    directory = tmp_path / "checkpoints"
    try:
        steps(toy, checkpointer, 1, 3)  # step 3: a memory snapshot only
        checkpointer.save_now(3, toy.replicated(), toy.per_rank())
        assert (directory / "latest").read_text().strip() == "step_3"
        toy.step()  # step 4 ran, no snapshot of it yet
        checkpointer.save_now(4, toy.replicated(), toy.per_rank())
        assert (directory / "latest").read_text().strip() == "step_4"
        weight = toy.model.weight.detach().clone()
    finally:
        checkpointer.close(shutdown_keeper=True)
    resumed = Toy(seed=9)
    assert sync(tmp_path).restore(resumed.replicated(), resumed.per_rank()) == 4
    assert torch.equal(resumed.model.weight, weight)
