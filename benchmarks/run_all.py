"""Run every benchmark this machine can run, and rewrite their results in the README.

    python benchmarks/run_all.py                      # every benchmark that can run here
    python benchmarks/run_all.py --only throughput,moe
    python benchmarks/run_all.py --list               # what would run, with its command, and why not
    python benchmarks/run_all.py --quick --readme /tmp/README.md   # small sizes: a smoke test

Each benchmark is a script in this folder that prints its report (markdown tables and the lines
around them) on stdout and its progress on stderr. In the README, a benchmark's results live between
``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->``; this script replaces what is between
the markers of each benchmark it ran with the exact command, the machine, the date and the report,
and leaves every other part of the README alone, so results measured on another machine (the GPU
benchmarks) stay until a machine that can run them replaces them. A benchmark that fails keeps its
old results and makes the exit code non-zero.
"""

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    needs_cuda: bool = False
    min_memory_gb: float = 0.0
    """The machine memory the default arguments need."""


# The arguments that made the README's tables; quick_args shrink each to seconds for a smoke test.
BENCHMARKS = (
    Benchmark("throughput", "throughput.py", ("--preset", "60m", "--batch", "4", "--seq-len", "256"),
              ("--preset", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "1", "--repeats", "1")),
    Benchmark("cce", "cce.py", (), ("--tokens", "256", "--dim", "64", "--vocab", "1000", "--repeats", "1"),
              min_memory_gb=20),
    Benchmark("moe", "moe.py", (), ("--tokens", "256", "--dim", "64", "--intermediate", "128", "--repeats", "1",
                                    "--dtypes", "fp32", "--peak-size", "256", "--skip-balance")),
    Benchmark("optimizers", "optimizers.py", ("--rounds", "3"), ("--part", "state", "--layers", "1", "--ordinary", "1"),
              min_memory_gb=16),
    # 130m: every mode at once fits 24 GB; 350m needs about 40 GB (--preset 350m by hand).
    Benchmark("checkpoint", "checkpoint.py", ("--preset", "130m", "--repeats", "3"),
              ("--preset", "60m", "--batch", "1", "--seq-len", "32", "--steps", "1", "--repeats", "1",
               "--modes", "none,ours", "--ec-mb", "8"), min_memory_gb=20),
    # Ten training runs one after another (30-45 minutes on 2 cores); quick: a 64-wide model, a few steps.
    Benchmark("quality", "quality.py", (),
              ("--steps", "4", "--finetune-steps", "2", "--runs-dir", "runs/quality-quick", "--results",
               "runs/quality-quick/results", "--set", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
               "model.n_kv_heads=2", "model.intermediate_size=128", "data.seq_len=64", "trainer.global_batch_size=4",
               "trainer.micro_batch_size=4", "trainer.eval_batches=2")),
    Benchmark("galore_memory", "galore_memory.py", (), ()),
    # Three 200-step runs of the 60m preset (about 40 minutes on 2 loaded cores at these sizes).
    Benchmark("lowbit", "lowbit.py", ("--seq-len", "32", "--batch", "4"),
              ("--steps", "3", "--seq-len", "16", "--batch", "2", "--val-batches", "1")),
    Benchmark("cce_gpu", "cce_gpu.py", (), ("--shapes", "llama3", "--repeats", "2", "--warmup", "1"),
              needs_cuda=True),
    Benchmark("offload_gpu", "offload_gpu.py", (), ("--preset", "60m", "--steps", "2", "--warmup", "1"),
              needs_cuda=True),
)


def machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """What the README says a table ran on: CPU, cores, memory, GPU, torch."""
    parts = [f"{cpu_name()}, {os.cpu_count()} cores, {machine_memory_gb():.0f} GB"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def why_not(bench: Benchmark, quick: bool) -> str:
    """Empty if the benchmark can run here, else the reason it cannot."""
    if bench.needs_cuda and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not quick and machine_memory_gb() < bench.min_memory_gb:
        return f"needs {bench.min_memory_gb:.0f} GB of memory, this machine has {machine_memory_gb():.0f} GB"
    return ""


def command(bench: Benchmark, quick: bool) -> list[str]:
    return [sys.executable, str(HERE / bench.script), *(bench.quick_args if quick else bench.args)]


def shown_command(bench: Benchmark, quick: bool) -> str:
    return shlex.join(["python", f"benchmarks/{bench.script}", *(bench.quick_args if quick else bench.args)])


def as_markdown(report: str) -> str:
    """The report as README markdown: tables kept, headings made bold, other lines kept as separate lines."""
    lines = []
    for line in report.strip().splitlines():
        if not line.strip():
            lines.append("")
        elif line.lstrip().startswith("|"):
            if lines and lines[-1] and not lines[-1].lstrip().startswith("|"):
                lines.append("")  # a table needs a blank line before it
            lines.append(line.strip())
        else:
            if lines and lines[-1].lstrip().startswith("|"):
                lines.append("")
            if line.startswith("#"):  # a report's own heading must not become a README heading
                line = f"**{line.lstrip('#').strip()}**"
            lines.append(line.rstrip() + "  ")  # a hard line break: one report line, one README line
    return "\n".join(lines).strip()


def section(bench: Benchmark, quick: bool, report: str, seconds: float, load: tuple[float, float]) -> str:
    when = datetime.date.today().isoformat()
    return (f"`{shown_command(bench, quick)}` on {machine_description()}; {when}, {seconds:.0f} s, "
            f"load average {load[0]:.1f} before and {load[1]:.1f} after{' (quick sizes)' if quick else ''}:\n\n"
            f"{as_markdown(report)}")


def replace_section(readme: str, name: str, body: str) -> str:
    """``readme`` with the text between NAME's markers replaced by ``body``; the markers must exist."""
    pattern = re.compile(rf"(<!-- benchmark:{re.escape(name)} -->\n).*?(\n<!-- /benchmark:{re.escape(name)} -->)",
                         re.DOTALL)
    if not pattern.search(readme):
        raise SystemExit(f"README has no <!-- benchmark:{name} --> ... <!-- /benchmark:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), readme, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all that can run)")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the plumbing in seconds")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the README to rewrite")
    parser.add_argument("--list", action="store_true", help="print each benchmark's command and whether it can run")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    known = {b.name for b in BENCHMARKS}
    if unknown := sorted(set(names) - known):
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    chosen = [b for b in BENCHMARKS if not names or b.name in names]
    if args.list:
        for bench in chosen:
            reason = why_not(bench, args.quick)
            print(f"{bench.name:12s} {'skip: ' + reason if reason else 'runs'}: {shown_command(bench, args.quick)}")
        return 0
    readme_path = Path(args.readme)
    readme = readme_path.read_text()
    failed = []
    for bench in chosen:
        if reason := why_not(bench, args.quick):
            print(f"[{bench.name}] skipped: {reason}", flush=True)
            continue
        print(f"[{bench.name}] {shown_command(bench, args.quick)}", flush=True)
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        try:
            done = subprocess.run(command(bench, args.quick), cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"[{bench.name}] timed out after {args.timeout:.0f} s; its README section is unchanged", flush=True)
            failed.append(bench.name)
            continue
        seconds = time.monotonic() - start
        if done.returncode != 0:
            print(f"[{bench.name}] failed (exit {done.returncode}); its README section is unchanged", flush=True)
            failed.append(bench.name)
            continue
        body = section(bench, args.quick, done.stdout, seconds, (load_before, os.getloadavg()[0]))
        readme = replace_section(readme, bench.name, body)
        readme_path.write_text(readme)  # after each benchmark: a later failure loses nothing
        print(f"[{bench.name}] done in {seconds:.0f} s; README updated", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
