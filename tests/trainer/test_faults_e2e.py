"""Stop signals, end to end: SIGTERM to one rank of a torchrun job, SIGINT to a single process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import free_port, run_leantrain

pytestmark = pytest.mark.slow


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def launch(args: list[str], torchrun_nproc: int = 0) -> subprocess.Popen:
    """``leantrain ARGS`` (or torchrun) in the background, in a session of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun_nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "leantrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "leantrain", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step and "loss" in r for r in records(run_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached step {step}"
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the run did not stop:\n{err}") from None
    return proc.returncode, out, err


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker ``rank`` (its environment says RANK=rank)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"leantrain.train" in cmdline and \
                    f"TORCHELASTIC_RUN_ID".encode() in b"".join(environ) and _descends(int(entry.name), launcher):
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_the_resume_loses_none(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "trainer.max_steps=40", "trainer.eval_interval=0"]
    straight = tmp_path / "straight"
    # One process with the whole batch per micro-batch: the same global batch as two ranks (see test_train_e2e).
    assert run_leantrain(["train", "quickstart", *common, "trainer.micro_batch_size=8",
                          f"trainer.run_dir={straight}"]).returncode == 0
    run = tmp_path / "run"
    proc = launch(["quickstart", *common, f"trainer.run_dir={run}"], torchrun_nproc=2)
    rank1 = worker_pid(proc.pid, 1)
    wait_for_step(proc, run, 3)
    os.kill(rank1, signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 0, err
    stopped = [r for r in records(run) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "on another rank", records(run)  # rank 0 logs
    step = stopped[0]["step"]
    assert 3 <= step < 40 and f"stopped after step {step}" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    assert max(losses(run)) == step and not (run / "final").exists()

    resumed = run_leantrain(["quickstart", *common, f"trainer.run_dir={run}"], torchrun_nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    got, want = losses(run), losses(straight)
    assert sorted(got) == list(range(1, 41))
    for s in range(1, 41):
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])
    assert records(run)[-1]["tokens_seen"] == records(straight)[-1]["tokens_seen"]


def test_sigint_saves_the_finished_step_and_the_resume_is_bitwise(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "trainer.max_steps=40", "trainer.eval_interval=0"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={straight}"]).returncode == 0
    proc = launch(["train", "quickstart", *common, f"trainer.run_dir={run}"])
    wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 0, err
    step = next(r["step"] for r in records(run) if r.get("event") == "stopped")
    assert (run / "checkpoints" / f"step_{step}").is_dir() and max(losses(run)) == step
    assert not (run / "leantrain.lock").exists()
    assert run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={run}"]).returncode == 0
    assert losses(run) == losses(straight)
