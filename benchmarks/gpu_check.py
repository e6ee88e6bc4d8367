"""One unattended pass over every CUDA path: the CUDA tests, then the GPU benchmarks, in 8 minutes.

    make gpu-check                                   # what a session lent a GPU runs (README: GPU check)
    python3 benchmarks/gpu_check.py --list           # the steps, their commands and time budgets
    python3 benchmarks/gpu_check.py --only tests,cce --budget 300

It runs under the machine's own python3 and never installs torch: the wheels carried in ``.whl/``
(``benchmarks/gpu_wheels.py`` fetches them) are installed with ``--no-deps`` into a scratch
directory, and ``import leantrain`` works through a scratch directory holding a ``leantrain`` link
to this repository. Each step then runs in its own process group with its own time budget, inside
an overall one; a step that fails, runs out of time or cannot run here is recorded with its reason
and output and the next one runs, so one crash loses no other figure. Results go to
``$OUT/gpu-check/`` when ``$OUT`` is set (the device tool brings back what is written there), else
to ``gpu-check/``: ``results.json`` (every figure and error) and ``results.md`` (one table, then each
benchmark's own report), both rewritten after every step. Without a CUDA device it says so and
exits 0. The exit code is 1 when a step failed or ran out of time.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUDGET_S = 480.0
"""All steps together, wheels included: the GPU machine is lent for 15 minutes, start-up included."""
CAP_GIB = 24
"""The memory a 7B GaLore run must fit: a 24 GiB consumer card, as the GaLore paper's 7B claim."""
CAPPED_STEPS = 3
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): nothing to check"

# Dense bf16 tensor-core peaks (NVIDIA datasheets, no sparsity), matched against the device name in order.
BF16_PEAK_FLOPS = (("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                   ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
                   ("L4", 121e12), ("A10", 125e12))


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    """After the python executable, from the repository root; ``{out}`` is the results directory."""
    budget_s: float
    what: str
    needs_modules: tuple[str, ...] = ()
    needs_files: tuple[str, ...] = ()


STEPS = (
    Step("tests", ("-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "--junitxml", "{out}/pytest.xml", "tests"), 150,
         "the CUDA tests (pytest -m cuda): Triton CCE, checkpoint copy stream, offload, 8-bit states and bf16 "
         "rounding, estimate"),
    Step("throughput", ("benchmarks/throughput.py", "--preset", "350m", "--batch", "8", "--seq-len", "1024",
                        "--steps", "5", "--repeats", "3", "--warmup", "2", "--dtype", "bf16", "--device", "cuda"), 70,
         "training tokens/s and MFU, leantrain against HF LlamaForCausalLM, 350m, bf16 autocast",
         needs_modules=("transformers",)),
    Step("cce", ("benchmarks/cce_gpu.py", "--shapes", "llama3", "--repeats", "5", "--warmup", "2"), 70,
         "cut cross-entropy against naive and torch.nn.functional.linear_cross_entropy, N=8192 D=2048 V=128256"),
    Step("galore_step", ("benchmarks/optimizers.py", "--part", "state", "--device", "cuda", "--rounds", "2",
                         "--json", "{out}/optimizers.json"), 75,
         "GaLore optimizer step against galore-torch on 130m block weights, on the GPU",
         needs_modules=("galore_torch", "apollo_torch")),
    Step("fit_7b", ("benchmarks/gpu_check.py", "--capped-measure", str(CAP_GIB), "galore_7b"), 120,
         f"configs/galore_7b.yaml: {CAPPED_STEPS} training steps under a {CAP_GIB} GiB memory cap "
         "(torch.cuda.set_per_process_memory_fraction), estimate beside the measured peak",
         needs_files=("configs/galore_7b.yaml",)),
)


# ---- running steps -----------------------------------------------------------------------------------------


def run_process(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """(exit code or None when out of time, stdout, stderr); the whole process group goes at the timeout."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.001))
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # benchmarks start children of their own
        out, err = proc.communicate()
        return None, out, err


def why_not(step: Step, have_module: Callable[[str], bool] = lambda m: importlib.util.find_spec(m) is not None) -> str:
    """Empty when ``step`` can run here, else why not."""
    for path in step.needs_files:
        if not (ROOT / path).is_file():
            return f"{path} does not exist here"
    missing = [m for m in step.needs_modules if not have_module(m)]
    if missing:
        return f"needs {', '.join(missing)} (not installed, and no wheel of it in .whl/)"
    return ""


def tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def run_steps(steps: list[Step], budget_s: float, out_dir: Path, env: dict[str, str] | None = None,
              python: str = sys.executable, on_result: Callable[[dict], None] = lambda r: None,
              clock: Callable[[], float] = time.monotonic, why: Callable[[Step], str] = why_not) -> list[dict]:
    """Run each step within its budget and what is left of ``budget_s``; every step gets a result."""
    start = clock()
    results = []
    for step in steps:
        argv = [python, *(a.format(out=out_dir) for a in step.argv)]
        result = {"name": step.name, "what": step.what, "command": shlex.join(["python", *argv[1:]]),
                  "budget_s": step.budget_s, "status": "skipped", "seconds": 0.0, "reason": "", "returncode": None,
                  "stdout": "", "output_tail": ""}
        left = budget_s - (clock() - start)
        if reason := why(step):
            result["reason"] = reason
        elif left < 5:
            result["reason"] = f"the overall budget of {budget_s:.0f} s was spent before this step"
        else:
            timeout = min(step.budget_s, left)
            began = clock()
            try:
                code, out, err = run_process(argv, timeout, env)
            except Exception as error:  # noqa: BLE001 - recorded; the other steps still run
                code, out, err = 1, "", f"{type(error).__name__}: {error}"
            result["seconds"] = round(clock() - began, 1)
            result["returncode"] = code
            result["stdout"] = out
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            (out_dir / "logs" / f"{step.name}.log").write_text(f"$ {result['command']}\n{out}\n--- stderr ---\n{err}")
            if code is None:
                result["status"] = "timeout"
                result["reason"] = f"ran out of its {timeout:.0f} s"
            elif code != 0:
                result["status"] = "failed"
                result["reason"] = f"exit code {code}"
            else:
                result["status"] = "ok"
            if code != 0:
                result["output_tail"] = tail(out + "\n--- stderr ---\n" + err)
            try:  # a failed step may still have figures (pytest's counts); a partial report may not parse
                result["figures"] = FIGURES.get(step.name, lambda r, d: {})(result, out_dir)
            except Exception as error:  # noqa: BLE001 - a report we cannot read is recorded, not fatal
                result["figures"] = {"error": f"reading the figures: {type(error).__name__}: {error}"} \
                    if code == 0 else {}
        results.append(result)
        on_result(result)
        print(f"[{step.name}] {result['status']}{' (' + result['reason'] + ')' if result['reason'] else ''}, "
              f"{result['seconds']:.0f} s", flush=True)
    return results


# ---- reading the steps' figures ------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as rows of {header: cell}."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip().strip("|").split("|")))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, None for a card not in BF16_PEAK_FLOPS."""
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in device_name), None)


def throughput_figures(result: dict, out_dir: Path, device_name: str | None = None) -> dict:
    """tokens/s of both models, their ratio and MFU: 6 (N - V d) + 12 L d T FLOPs a token (PaLM, appendix B)."""
    text = result["stdout"]
    model = re.search(r"model: preset (\S+), ([\d.]+)M parameters, dim (\d+), (\d+) layers, .*vocab (\d+); "
                      r"batch (\d+) x seq (\d+)", text)
    if not model:
        return {}
    params = float(model[2]) * 1e6
    dim, layers, vocab, seq = int(model[3]), int(model[4]), int(model[5]), int(model[7])
    flops_per_token = 6 * (params - vocab * dim) + 12 * layers * dim * seq  # the embedding lookup is no matmul
    name = device_name if device_name is not None else _device_name()
    peak = bf16_peak(name)
    figures = {"preset": model[1], "parameters": params, "flops_per_token": flops_per_token,
               "bf16_peak_flops": peak, "device": name, "tokens_per_s": {}, "mfu": {}}
    for row in markdown_tables(text)[0]:
        rate = float(row["tokens/s (median)"].replace(",", ""))
        figures["tokens_per_s"][row["model"]] = rate
        figures["mfu"][row["model"]] = rate * flops_per_token / peak if peak else None
    if ratio := re.search(r"ratio leantrain / HF .*: ([\d.]+)", text):
        figures["ratio"] = float(ratio[1])
    return figures


def cce_figures(result: dict, out_dir: Path) -> dict:
    tables = markdown_tables(result["stdout"])
    return {"rows": tables[0] if tables else [], "notes": [line for line in result["stdout"].splitlines()
                                                          if line and not line.startswith("|")]}


def galore_figures(result: dict, out_dir: Path) -> dict:
    saved = json.loads((out_dir / "optimizers.json").read_text())
    return {"checks": saved["checks"], "state_and_time": saved["state_and_time"]}


def capped_figures(result: dict, out_dir: Path) -> dict:
    lines = [line for line in result["stdout"].splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def tests_figures(result: dict, out_dir: Path) -> dict:
    """Counts and the failures from pytest's junit XML."""
    report = out_dir / "pytest.xml"
    if not report.is_file():
        return {}
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            if (node := case.find(kind)) is not None:
                problems.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                 "message": (node.get("message") or "")[:500]})
    return {**counts, "problems": problems}


FIGURES: dict[str, Callable[[dict, Path], dict]] = {
    "tests": tests_figures, "throughput": throughput_figures, "cce": cce_figures, "galore_step": galore_figures,
    "fit_7b": capped_figures,
}


# ---- the report --------------------------------------------------------------------------------------------


def summary(result: dict) -> str:
    """One cell of the table for ``result``: why it did not run or failed, then its figures."""
    figures = figures_summary(result)
    if result["status"] == "ok":
        return figures
    return result["reason"] + (f"; {figures}" if figures and figures != "see below" else "")


def figures_summary(result: dict) -> str:
    f = result.get("figures") or {}
    if not f:
        return "see below" if result["status"] == "ok" else ""
    if "error" in f:
        return f["error"]
    name = result["name"]
    if name == "tests" and "tests" in f:
        text = f"{f['passed']} passed, {f['failures']} failed, {f['errors']} errors, {f['skipped']} skipped"
        return text + "".join(f"; {p['kind']}: {p['test']}" for p in f["problems"][:5])
    if name == "throughput" and f.get("tokens_per_s"):
        parts = []
        for model, rate in f["tokens_per_s"].items():
            mfu = f["mfu"].get(model)
            parts.append(f"{model} {rate:,.0f} tokens/s" + (f" (MFU {100 * mfu:.1f}%)" if mfu is not None else ""))
        return "; ".join(parts) + (f"; ratio {f['ratio']:.3f}" if "ratio" in f else "")
    if name == "cce" and f.get("rows"):
        return "; ".join(f"{r.get('loss')}: {r.get('time (ms)')} ms, {r.get('peak extra (MB)')} MB" for r in f["rows"])
    if name == "galore_step" and f.get("checks"):
        return "; ".join(f"{k} {v:.2f}x galore-torch" for k, v in f["checks"].items() if "(wall)" in k)
    if name == "fit_7b" and f:
        return (f"{f['steps']} steps, peak {f['measured_gib']:.1f} GiB measured, {f['estimated_gib']:.1f} GiB "
                f"estimated, under a {f['cap_gib']} GiB cap; {f['seconds']:.0f} s")
    return "see below"


def render_markdown(machine: dict, results: list[dict], budget_s: float) -> str:
    spent = sum(r["seconds"] for r in results)
    lines = [f"**GPU check**: {machine.get('device')} ({machine.get('memory_gib', 0):.0f} GiB), torch "
             f"{machine.get('torch')}, CUDA {machine.get('cuda')}, triton {machine.get('triton')}, Python "
             f"{machine.get('python')}; {machine.get('date')}; {spent:.0f} s of a {budget_s:.0f} s budget", "",
             "| step | status | s | result |", "|---|---|---:|---|"]
    for r in results:
        cell = summary(r).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {cell} |")
    for r in results:
        if r["name"] != "tests" and r["status"] == "ok" and r["stdout"].strip():
            lines += ["", f"**{r['name']}** (`{r['command']}`): {r['what']}", "", r["stdout"].strip()]
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    triton = importlib.util.find_spec("triton")
    return {"device": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": __import__("triton").__version__ if triton else None, "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


# ---- the environment of the steps ---------------------------------------------------------------------------


def prepare_environment(scratch: Path, wheel_dir: Path) -> tuple[dict[str, str], dict]:
    """The steps' environment: carried wheels installed (no dependencies, never torch), leantrain importable."""
    site, shim = scratch / "site", scratch / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "leantrain").symlink_to(ROOT, target_is_directory=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    record: dict = {"dir": str(wheel_dir), "wheels": [w.name for w in wheels]}
    if not wheels:
        record["note"] = f"no wheels in {wheel_dir}: steps needing omegaconf, deepspeed, galore-torch ... fail or skip"
    else:
        code, out, err = run_process([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                      "--disable-pip-version-check", "--target", str(site), *map(str, wheels)], 120)
        record["returncode"] = code
        if code != 0:  # no pip, or one it refuses: unpack them, as an installer would, minus the scripts
            record["error"] = tail(out + err, 2000)
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(site)
            record["unpacked"] = True
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), str(site), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(site / "bin"), env.get("PATH", "")))  # ninja, for DeepSpeed's JIT ops
    env.setdefault("LEANTRAIN_CACHE", str(scratch / "cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(scratch / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env, record


def capped_measure(cap_gib: float, config: str, overrides: list[str]) -> None:
    """A child step: the memory estimate of ``config``, then its training steps under a ``cap_gib`` cap."""
    import torch

    from leantrain.trainer import estimate as plan
    from leantrain.trainer.config import load_config

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    cfg = load_config(config, overrides)
    est = plan.estimate(cfg)
    print(f"estimated peak {est.device_peak / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    # measure() runs the trainer's own step (forward, backward, optimizer) SIMULATED_STEPS times on one
    # batch of random tokens, without data, checkpoints or the final save of 7B weights.
    plan.SIMULATED_STEPS = CAPPED_STEPS
    start = time.perf_counter()
    measured = plan.measure(cfg)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "config": config, "overrides": overrides, "steps": CAPPED_STEPS, "cap_gib": cap_gib, "seconds": seconds,
        "measured_gib": measured["peak"] / 2**30, "estimated_gib": est.device_peak / 2**30,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "parameters": est.run["parameters"], "optimizer": est.run["optimizer"]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated steps (default all: {', '.join(s.name for s in STEPS)})")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything (default 480)")
    parser.add_argument("--out", default="", help="results directory (default $OUT/gpu-check, else gpu-check/)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels to install (default .whl/)")
    parser.add_argument("--list", action="store_true", help="print the steps, their budgets and commands")
    parser.add_argument("--capped-measure", nargs=2, metavar=("GIB", "CONFIG"), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.capped_measure:
        capped_measure(float(args.capped_measure[0]), args.capped_measure[1], overrides)
        return 0
    if overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    names = [n for n in args.only.split(",") if n]
    if unknown := sorted(set(names) - {s.name for s in STEPS}):
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    steps = [s for s in STEPS if not names or s.name in names]
    if args.list:
        for step in steps:
            print(f"{step.name:12s} {step.budget_s:4.0f} s  {step.what}\n{'':19s}python {shlex.join(step.argv)}")
        return 0
    try:
        import torch
    except ImportError:
        print(f"no CUDA device: {sys.executable} cannot import torch; nothing to check", flush=True)
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA, flush=True)
        return 0
    begin = time.monotonic()
    out_dir = Path(args.out or (Path(os.environ["OUT"]) / "gpu-check" if os.environ.get("OUT") else ROOT / "gpu-check"))
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    env, wheels = prepare_environment(Path(tempfile.mkdtemp(prefix="leantrain-gpu-check-")), Path(args.wheels))
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)[:2]  # so why_not sees the carried modules too
    importlib.invalidate_caches()
    print(f"{machine['device']}, torch {machine['torch']}, CUDA {machine['cuda']}; {len(wheels['wheels'])} wheels "
          f"installed{' with an error: ' + wheels['error'] if 'error' in wheels else ''}; results in {out_dir}",
          flush=True)
    done: list[dict] = []

    def save(result: dict) -> None:  # after every step: a later crash loses nothing
        done.append(result)
        data = {"schema": 1, "machine": machine, "budget_s": args.budget, "wheels": wheels, "steps": done}
        (out_dir / "results.json").write_text(json.dumps(data, indent=1))
        (out_dir / "results.md").write_text(render_markdown(machine, done, args.budget))

    results = run_steps(steps, args.budget - (time.monotonic() - begin), out_dir, env, on_result=save)
    print((out_dir / "results.md").read_text(), flush=True)
    return 1 if any(r["status"] in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
