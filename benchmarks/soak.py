"""Soak: 300 steps of the smallest preset with a lazy memory snapshot every step; the trainer's RSS must not grow.

Runs ``leantrain train quickstart`` (preset tiny) as a user would, with ``checkpoint.mode=lazy``,
``checkpoint.memory_interval=1`` (a snapshot into the keeper's shared memory at every step) and a
disk checkpoint every 50 steps, and reads the trainer's resident memory (/proc/PID/status) when
metrics.jsonl reports step 50 and step 300. Growth from 50 to 300 above 2% fails (exit 1): it would
mean every snapshot leaks something (mappings, pinned buffers, copier jobs, tensors).

    OMP_NUM_THREADS=1 python benchmarks/soak.py            # about 2 minutes on 2 cores
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT = 0.02


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and its anonymous and shared-memory parts, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


def newest_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--first", type=int, default=50, help="the step of the first measurement")
    parser.add_argument("--run-dir", default="", help="default: a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run_dir or Path(scratch) / "soak")
        overrides = [
            "model.preset=tiny", "data.seq_len=128", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
            f"trainer.max_steps={args.steps + 10}", "trainer.eval_interval=0", "trainer.dtype=fp32",
            "logging.progress=false", f"trainer.run_dir={run_dir}", "checkpoint.mode=lazy",
            "checkpoint.memory_interval=1", "checkpoint.interval=50", "checkpoint.keep=1", "checkpoint.keeper_idle_s=5",
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen([sys.executable, "-m", "leantrain", "train", "quickstart", *overrides], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: dict[int, dict[str, int]] = {}
        started = time.perf_counter()
        while len(samples) < 2 and proc.poll() is None:
            step = newest_step(run_dir / "metrics.jsonl")
            for wanted in (args.first, args.steps):
                if step >= wanted and wanted not in samples:
                    samples[wanted] = memory_kib(proc.pid) | {"at": step}
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        _, stderr = proc.communicate()
        if len(samples) < 2 or proc.returncode != 0:
            print(f"the run failed (exit {proc.returncode}):\n{stderr}", file=sys.stderr)
            return 1
    first, last = samples[args.first], samples[args.steps]
    growth = (last["VmRSS"] - first["VmRSS"]) / first["VmRSS"]
    print(f"soak: preset tiny, {args.steps} steps, lazy snapshot every step, {elapsed:.0f} s")
    for name, sample in ((f"step {args.first}", first), (f"step {args.steps}", last)):
        print(f"  {name:>9} (read at step {sample['at']}): RSS {sample['VmRSS'] / 1024:7.1f} MiB "
              f"(anonymous {sample['RssAnon'] / 1024:.1f}, shared memory {sample['RssShmem'] / 1024:.1f})")
    print(f"  RSS growth {args.first} -> {args.steps}: {growth:+.2%} (limit {LIMIT:.0%})")
    return 0 if growth < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
