"""One run per run directory (leantrain.trainer.run_lock): the holder is named, a stale lock is taken over."""

import json
import os
import subprocess
import sys

import pytest

from leantrain.errors import UserError
from leantrain.trainer.run_lock import LOCK_FILE, RunLock

HOLD = "import sys, time; from leantrain.trainer.run_lock import RunLock; RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def hold_in_another_process(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(UserError, match=f"in use by another run: process {holder.pid} on host {os.uname().nodename}"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL leaves the lock behind
    with pytest.warns(UserWarning, match=f"taking over the stale lock .* of process {holder.pid}"):
        lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"process {os.getpid()}"):  # the same process cannot lock twice either
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "start_ticks": 1, "started": "x"}))
    with pytest.warns(UserWarning, match="stale lock"):  # our PID, but a process that started at another time
        RunLock.acquire(tmp_path).release()
    path.write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(UserError, match=f"process 4242 on host node-17.*if it is dead .* delete {path}"):
        RunLock.acquire(tmp_path)
    assert json.loads(path.read_text())["host"] == "node-17"  # left alone


def test_a_lock_whose_writer_died_mid_write_is_stale_after_a_while(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text("")
    with pytest.raises(UserError, match="being locked by another run right now"):
        RunLock.acquire(tmp_path)
    os.utime(path, (0, 0))
    with pytest.warns(UserWarning, match="died mid-write"):
        RunLock.acquire(tmp_path).release()


def test_an_earlier_round_of_the_same_torchrun_job_is_stale_wherever_it_ran(tmp_path, monkeypatch):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 4242, "host": "node-17", "job": "job-1", "restart": 0, "started": "x"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(UserError, match="node-17"):  # the same round: another live rank 0
        RunLock.acquire(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.warns(UserWarning, match="stale lock"):
        lock = RunLock.acquire(tmp_path)
    assert json.loads(path.read_text())["restart"] == 1
    lock.release()
