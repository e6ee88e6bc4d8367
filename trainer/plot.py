"""``leantrain plot RUN_DIR ... --out FILE.png``: loss curves of several runs side by side."""

import argparse
import json
from pathlib import Path

import yaml

from ..errors import UserError


def run_label(run_dir: Path) -> str:
    """The run's optimizer and its distinguishing settings, read from its config.yaml."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return run_dir.name
    cfg = yaml.safe_load(config_path.read_text())
    optim = cfg.get("optim", {})
    name = optim.get("name", "?")
    details = [f"lr={optim.get('lr')}"]
    if name in ("galore", "natural_galore", "apollo"):
        details.append(f"rank={optim.get('rank')}")
    if name in ("galore", "natural_galore") and optim.get("svd", "exact") != "exact":
        details.append(f"svd={optim['svd']}")
    if name == "frugal":
        frugal = optim.get("frugal", {})
        details.append(f"{frugal.get('selection')}, density={frugal.get('density')}")
    if name == "lisa":
        details.append(f"blocks={optim.get('lisa', {}).get('n_layers')}")
    if cfg.get("model", {}).get("hf"):
        details.append(Path(cfg["model"]["hf"]).name)
    return f"{run_dir.name}: {name} ({', '.join(details)})"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; is it a leantrain run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return [r for r in records if "step" in r and "event" not in r]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Training and validation loss against steps and against tokens, one colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("leantrain plot needs matplotlib: pip install 'leantrain[dev]' or pip install matplotlib") from None
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        color = f"C{index % 10}"
        label = run_label(run_dir)
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        tokens_at = {r["step"]: r["tokens_seen"] for r in train}
        tokens_at.setdefault(0, 0)
        for axis, x_of in ((by_step, lambda r: r["step"]), (by_tokens, lambda r: tokens_at.get(r["step"], 0))):
            axis.plot([x_of(r) for r in train], [r["loss"] for r in train], color=color, alpha=0.6, lw=1,
                      label=f"{label} train")
            axis.plot([x_of(r) for r in val], [r["val_loss"] for r in val], color=color, marker="o", ms=4, lw=2,
                      ls="--", label=f"{label} val")
    by_step.set_xlabel("optimizer step")
    by_tokens.set_xlabel("tokens seen")
    for axis in (by_step, by_tokens):
        axis.set_ylabel("loss (nats per token)")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="leantrain plot", description="Plot the loss curves of runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir}: no such run directory")
    print(plot_runs(args.run_dirs, args.out))
    return 0
