"""Helpers shared by tests: free ports, running leantrain as a user would, and shared float64 references."""

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_rank() -> None:
    """End a worker rank that finished without error, skipping interpreter finalization.

    About one run in eight, gloo's worker threads abort the process during finalization
    ("terminate called without an active exception", pytorch#179291) after the work and
    ``destroy_process_group`` succeeded. Call this only on the success path.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker: Callable[..., None], world_size: int, out_dir: Path) -> list[Any]:
    """Run ``worker(rank, world_size, port, out_dir)`` on spawned ranks; returns what each saved to ``rank{r}.pt``."""
    import torch
    import torch.multiprocessing as mp

    repo = str(Path(__file__).resolve().parents[1])  # spawned ranks import the test module by its package path
    sys.path.insert(0, repo)
    try:
        mp.start_processes(worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size,
                           start_method="spawn")
    finally:
        sys.path.remove(repo)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world_size)]


def run_rank_scripts(script: str, world_size: int, timeout: float = 120) -> None:
    """Run ``python SCRIPT RANK WORLD_SIZE PORT`` once per rank and assert that every rank succeeds.

    For test files whose ``__main__`` runs a gloo worker: pytest's importlib mode leaves a test
    module unimportable by name, so torch.multiprocessing.spawn could not unpickle its workers.
    """
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)  # one thread each; `support` importable
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, script, str(rank), str(world_size), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world_size)]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, output) in enumerate(zip(ranks, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output}"


def run_leantrain(args: list[str], cwd: Path | None = None, timeout: float = 300,
                  torchrun_nproc: int = 0) -> subprocess.CompletedProcess:
    """Run ``leantrain ARGS`` (or ``torchrun -m leantrain.train``) as a user would, capturing output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun_nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "leantrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "leantrain", *args]
    # A session of its own, so that a run that times out is killed with every worker it started.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def reference_quantize(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes and maxima in float64: per block of 256 the max |x|, the nearest entry (ties: lower)."""
    flat = x.reshape(-1).double()
    blocks = [flat[i:i + 256] for i in range(0, flat.numel(), 256)]
    absmax = torch.stack([b.abs().max() for b in blocks])
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).repeat_interleave(256)[: flat.numel()]
    # The implementation divides in float32 (correctly rounded); so does this, through float64.
    normalized = (flat / scale).float().double()
    codes = (normalized[:, None] - table.double()[None, :]).abs().argmin(dim=1)  # argmin: the first of ties
    return codes.to(torch.uint8).view(x.shape), absmax.float()
