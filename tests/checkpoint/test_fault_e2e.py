"""Fault tolerance end to end: torchrun runs with snapshots every step, killed workers and lost nodes.

Every faulty run must finish with final weights bitwise identical to an uninterrupted run of the
same seed, and say in metrics.jsonl where it resumed from: its node's memory after a killed
worker, the peers' parity after a lost node, disk after more lost nodes than parity blocks.
Two "nodes" here are two torchrun agents on 127.0.0.1, each with its own keeper.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import free_port

pytestmark = pytest.mark.slow

STEPS, KILL_AT = 60, 25
LAZY = ["checkpoint.mode=lazy", "checkpoint.memory_interval=1", "checkpoint.interval=20",
        "checkpoint.keeper_idle_s=60", "checkpoint.keeper_timeout_s=30"]
# torch's shared rendezvous store cannot take a node that restarts alone (a fresh agent waits for a
# MASTER_ADDR the surviving agent never publishes again); without it each round gets a new store.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def overrides(tiny: list[str], run_dir: Path, *extra: str) -> list[str]:
    return [*tiny, f"trainer.run_dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.eval_interval=0",
            "logging.log_interval=1", *LAZY, *extra]


def agent(args: list[str], log: Path, nproc: int, port: int, nnodes: int = 1, node: int = 0,
          max_restarts: int = 1) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-conf=is_host={int(node == 0)}",
               "-m", "leantrain.train", "quickstart", *args]
    env = dict(ENV, LEANTRAIN_NODE_NAME=f"node{node}") if nnodes > 1 else ENV  # two "machines" on one host
    with open(log, "a") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def keeper_pid(run_dir: Path, node: int) -> int:
    return json.loads((run_dir / "keepers" / f"node{node}.json").read_text())["pid"]


def kill_node(process: subprocess.Popen, run_dir: Path, node: int) -> None:
    """SIGKILL a node's agent, its workers and its keeper at once, as when the machine goes down."""
    victims = [process.pid, *descendants(process.pid), keeper_pid(run_dir, node)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def wait_for_step(run_dir: Path, step: int, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        assert all(p.poll() is None for p in processes), "the run ended before the fault could be injected"
        time.sleep(0.005)
    raise TimeoutError(f"step {step} never came")


def finish(processes: list[subprocess.Popen], run_dir: Path, timeout: float = 150) -> None:
    for process in processes:
        code = process.wait(timeout=timeout)
        assert code == 0, f"torchrun exited with {code}; logs in {run_dir.parent}"


def resume_events(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "resume"]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = load_file(run_dir / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equal(want[name]), name


def assert_no_keeper_left(run_dir: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while list((run_dir / "keepers").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((run_dir / "keepers").glob("*.json")), "a keeper is still running"


@pytest.fixture
def launched(tmp_path):
    """Every agent started by a test; on the way out, whatever is left of them and of their keepers dies."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for record in tmp_path.rglob("keepers/*.json"):
        try:
            os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, ValueError, OSError):
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_glob, cache_dir) -> Path:
    """One uninterrupted two-rank run that every faulty run must match bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    tiny = _tiny(corpus_glob, cache_dir)
    process = agent(overrides(tiny, run_dir), run_dir.parent / "agent.log", nproc=2, port=free_port())
    assert process.wait(timeout=150) == 0, (run_dir.parent / "agent.log").read_text()[-3000:]
    assert not resume_events(run_dir)
    return run_dir


def _tiny(corpus_glob: str, cache_dir: Path) -> list[str]:
    """conftest's tiny model and data (its fixture is per test; the reference run is shared)."""
    return [
        "model.preset=tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.intermediate_size=128", "data.source=text", f"data.path={corpus_glob}", "data.vocab_size=512",
        "data.val_fraction=0.2", "data.seq_len=32", f"data.cache_dir={cache_dir}", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.dtype=fp32", "optim.warmup_steps=2", "logging.progress=false",
    ]


def test_killed_worker_resumes_from_its_nodes_memory(reference, corpus_glob, cache_dir, tmp_path, launched):
    run_dir = tmp_path / "run"
    process = agent(overrides(_tiny(corpus_glob, cache_dir), run_dir), tmp_path / "agent.log", nproc=2,
                    port=free_port())
    launched.append(process)
    wait_for_step(run_dir, KILL_AT, [process])
    workers = descendants(process.pid)
    rank_1 = [pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(rank_1) == 1
    os.kill(rank_1[0], signal.SIGKILL)
    finish([process], run_dir)
    events = resume_events(run_dir)
    assert len(events) == 1 and events[0]["source"] == "memory" and events[0]["step"] >= KILL_AT - 1, events
    assert_same_weights(run_dir, reference)
    assert_no_keeper_left(run_dir)


def test_lost_node_is_rebuilt_from_its_peers_parity(reference, corpus_glob, cache_dir, tmp_path, launched):
    run_dir = tmp_path / "run"
    # No periodic disk checkpoint: on a loaded machine parity may lag a few steps behind, and a newer
    # disk checkpoint would rightly win over it.
    args = overrides(_tiny(corpus_glob, cache_dir), run_dir, "checkpoint.ec.k=1", "checkpoint.ec.m=1",
                     "checkpoint.interval=0")
    port = free_port()
    nodes = [agent(args, tmp_path / "node0.log", nproc=1, port=port, nnodes=2, node=0, max_restarts=2)]
    time.sleep(0.5)  # node 0 hosts the rendezvous
    nodes.append(agent(args, tmp_path / "node1.log", nproc=1, port=port, nnodes=2, node=1))
    launched.extend(nodes)
    wait_for_step(run_dir, KILL_AT, nodes)
    kill_node(nodes[1], run_dir, node=1)
    nodes[1] = agent(args, tmp_path / "node1.log", nproc=1, port=port, nnodes=2, node=1)
    launched.append(nodes[1])
    finish(nodes, run_dir)
    events = resume_events(run_dir)
    assert len(events) == 1 and events[0]["source"] == "peer" and events[0]["step"] >= 5, events
    assert not (run_dir / "checkpoints" / "step_20").exists()
    assert_same_weights(run_dir, reference)
    assert_no_keeper_left(run_dir)


def test_more_lost_nodes_than_parity_resume_from_disk(reference, corpus_glob, cache_dir, tmp_path, launched):
    run_dir = tmp_path / "run"
    args = overrides(_tiny(corpus_glob, cache_dir), run_dir, "checkpoint.ec.k=1", "checkpoint.ec.m=1")
    port = free_port()
    nodes = [agent(args, tmp_path / "node0.log", nproc=1, port=port, nnodes=2, node=0)]
    time.sleep(0.5)
    nodes.append(agent(args, tmp_path / "node1.log", nproc=1, port=port, nnodes=2, node=1))
    launched.extend(nodes)
    wait_for_step(run_dir, KILL_AT, nodes)
    for node in (1, 0):  # two lost nodes, one parity block per stripe
        kill_node(nodes[node], run_dir, node)
    nodes = [agent(args, tmp_path / "node0.log", nproc=1, port=port, nnodes=2, node=0)]
    time.sleep(0.5)
    nodes.append(agent(args, tmp_path / "node1.log", nproc=1, port=port, nnodes=2, node=1))
    launched.extend(nodes)
    finish(nodes, run_dir)
    events = resume_events(run_dir)
    assert events == [{"event": "resume", "step": 20, "source": "disk"}], events
    assert_same_weights(run_dir, reference)
    assert_no_keeper_left(run_dir)
