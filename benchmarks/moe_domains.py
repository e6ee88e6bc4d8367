"""Micro- against global-batch load balancing on two domains: train both, then tabulate validation and specialisation.

    OMP_NUM_THREADS=1 python benchmarks/moe_domains.py                     # both runs, one after the other
    python benchmarks/moe_domains.py --report runs/moe_domains_micro runs/moe_domains_global

Trains the bundled ``moe_domains`` config once with ``moe.balance=micro`` and once with ``moe.balance=global``
(same seed, data and steps; extra ``key=value`` overrides go to both), then prints a markdown table of each run's
last evaluation: validation loss overall and per domain, the routing concentration per domain (the share of the
domain's routed pairs taken by its top-k experts, averaged over MoE layers: k/E when spread evenly, 1 when the
domain always uses the same k experts) and the most used expert's load over both domains relative to a uniform
load (averaged over layers; 1 is perfect balance). The runs go one after the other, never at once.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("micro", "global")


def last_evaluation(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    if not evaluations:
        raise SystemExit(f"{run_dir}/metrics.jsonl holds no evaluation")
    return evaluations[-1]


def table(run_dirs: list[Path]) -> str:
    """Markdown: one row per run, with its balance mode, last step, and the validation figures."""
    rows = [(run_dir, last_evaluation(run_dir)) for run_dir in run_dirs]
    domains = sorted({key.split("/", 1)[1] for _, r in rows for key in r if key.startswith("val_loss/")})
    header = ["run", "step", "val loss"] + [f"val loss {d}" for d in domains]
    header += [f"concentration {d}" for d in domains] + ["max load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run_dir, r in rows:
        cells = [run_dir.name, str(r["step"]), f"{r['val_loss']:.4f}"]
        cells += [f"{r[f'val_loss/{d}']:.4f}" for d in domains]
        cells += [f"{r.get(f'val_moe/concentration/{d}', float('nan')):.3f}" for d in domains]
        cells.append(f"{r.get('val_moe/max_load', float('nan')):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", nargs="+", type=Path, metavar="RUN_DIR", help="only tabulate these runs")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent of the two run directories")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args()
    if args.report:
        print(table(args.report))
        return
    run_dirs = []
    for mode in MODES:
        run_dir = args.out / f"moe_domains_{mode}"
        command = [sys.executable, "-m", "leantrain", "train", "moe_domains", f"moe.balance={mode}",
                   f"trainer.run_dir={run_dir}", "logging.progress=false", *args.overrides]
        print("$", " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"{mode}: {time.perf_counter() - started:.0f} s", flush=True)
        run_dirs.append(run_dir)
    print(table(run_dirs))


if __name__ == "__main__":
    main()
