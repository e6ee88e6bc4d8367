"""Cut cross-entropy on CPU: peak extra memory and time of forward + backward, against the naive loss.

Three losses on the same inputs, in one process: the naive loss ``F.cross_entropy(e @ c.T, t)``,
``torch.compile`` of it, and ``leantrain.nn.linear_cross_entropy`` (impl ``torch``). Default shape:
N = 8192 tokens, D = 2048, V = 128256 (Llama 3's vocabulary), fp32.

Memory is the process's peak resident set during one forward + backward (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) minus the resident set just before it; freed memory
is handed back to the OS first (``malloc_trim``). This counts every byte the step touches, BLAS
workspaces included. "Beyond the gradients" subtracts the N x D and V x D gradient buffers that any
method must return. Timed repeats alternate between the losses so that load from other processes
falls on all alike; the table gives the fastest repeat (wall clock) and its CPU time. The compiled
loss gets one untimed warm-up step (compilation); the others need none.

Targets (issue 5): ours uses at most 2% of the naive loss's memory beyond the gradients, and at most
1.15x its time.

    python benchmarks/cce.py                          # full size: several minutes per step on 2 cores
    python benchmarks/cce.py --tokens 1024 --vocab 32000 --methods naive,ours
"""

import argparse
import ctypes
import gc
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from leantrain.nn.cut_ce import DEFAULT_CHUNK_BYTES, linear_cross_entropy

METHODS = ("naive", "compiled", "ours")
MEMORY_TARGET = 0.02
TIME_TARGET = 1.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per loss, interleaved")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="budget of ours")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def naive_loss(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(e @ c.T, targets)


class PeakMemory:
    """Peak resident set of this process over a block, above the resident set at its start (Linux)."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None

    def __enter__(self):
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra = _status_bytes("VmHWM") - self.start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    torch.manual_seed(args.seed)
    n, d, v = args.tokens, args.dim, args.vocab
    e = torch.randn(n, d).requires_grad_()
    c = (torch.randn(v, d) * d**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    grad_bytes = (e.numel() + c.numel()) * 4
    compiled = torch.compile(naive_loss)
    losses = {
        "naive": naive_loss,
        "compiled": compiled,
        "ours": lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch", chunk_bytes=args.chunk_bytes),
    }

    def step(name: str) -> tuple[float, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = losses[name](e, c, targets)
        loss.backward()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return float(loss.detach()), wall, cpu

    if "compiled" in methods:
        step("compiled")  # compilation, untimed
        e.grad = c.grad = None
    results = {m: {"wall": [], "cpu": [], "extra": [], "loss": None} for m in methods}
    for r in range(args.repeats):
        for name in (methods if r % 2 == 0 else methods[::-1]):
            with PeakMemory() as mem:  # entered with no gradients allocated
                loss, wall, cpu = step(name)
            e.grad = c.grad = None
            res = results[name]
            res["wall"].append(wall)
            res["cpu"].append(cpu)
            res["extra"].append(mem.extra)
            res["loss"] = loss
            print(f"repeat {r} {name:9s} loss {loss:.6f}  {wall:7.2f} s wall  {cpu:7.2f} s cpu  "
                  f"peak extra {mem.extra / 2**20:9.1f} MiB", file=sys.stderr, flush=True)

    summary = {"shape": {"tokens": n, "dim": d, "vocab": v, "dtype": "fp32"}, "threads": torch.get_num_threads(),
               "grad_bytes": grad_bytes, "methods": {}}
    for name, res in results.items():
        best = min(range(len(res["wall"])), key=res["wall"].__getitem__)
        extra = max(res["extra"])
        summary["methods"][name] = {"wall_s": res["wall"][best], "cpu_s": res["cpu"][best], "peak_extra_bytes": extra,
                                    "beyond_grads_bytes": extra - grad_bytes, "loss": res["loss"]}
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def print_table(summary: dict) -> None:
    s = summary["shape"]
    print(f"\nN={s['tokens']}, D={s['dim']}, V={s['vocab']}, {s['dtype']}, forward + backward, "
          f"{summary['threads']} threads ({platform.processor() or platform.machine()})\n")
    rows = summary["methods"]
    naive = rows.get("naive")
    print("| loss | peak extra (MiB) | beyond gradients (MiB) | vs naive | time (s) | CPU time (s) | vs naive |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        mem_ratio = f"{m['beyond_grads_bytes'] / naive['beyond_grads_bytes']:.2%}" if naive else "-"
        time_ratio = f"{m['wall_s'] / naive['wall_s']:.2f}x" if naive else "-"
        print(f"| {name} | {m['peak_extra_bytes'] / 2**20:.0f} | {m['beyond_grads_bytes'] / 2**20:.0f} | {mem_ratio} "
              f"| {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {time_ratio} |")
    if naive and "ours" in rows:
        ours = rows["ours"]
        mem_ok = ours["beyond_grads_bytes"] <= MEMORY_TARGET * naive["beyond_grads_bytes"]
        time_ok = ours["wall_s"] <= TIME_TARGET * naive["wall_s"]
        print(f"\nmemory beyond gradients <= {MEMORY_TARGET:.0%} of naive: {'PASS' if mem_ok else 'FAIL'}; "
              f"time <= {TIME_TARGET}x naive: {'PASS' if time_ok else 'FAIL'}")


if __name__ == "__main__":
    main()
