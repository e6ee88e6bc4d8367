"""Optimizer quality on the embedded corpus: validation loss and optimizer-state bytes, one after another.

    python benchmarks/quality.py                       # 30-45 minutes on 2 cores
    python benchmarks/quality.py --only galore,apollo --reuse   # rerun some; --reuse keeps finished runs

Every run is ``leantrain train quickstart`` in a subprocess, run one at a time: the tiny preset on the
Python standard library's source, sequences of 256 tokens, batches of 16, bf16 autocast, cosine schedule
with 10% warmup, seed 0, so the model, data order, steps and validation set are the same for all.

Pretraining (issues 3 and 4), ``--steps`` each:
  adamw           the quickstart's AdamW: lr 3e-3, betas (0.9, 0.95), weight decay 0.1.
  adamw_lr0.01    a control: AdamW at the low-rank runs' lr and weight decay (they train the embedding, head
                  and norms with AdamW at that lr, so part of any difference to adamw is the lr).
  apollo          apollo-torch's APOLLO through the trainer with its documented defaults (random projection,
                  channel-wise scaling, scale 1) at GaLore's rank and lr.
  galore          GaLore's reference settings (lr 0.01, scale 0.25, no weight decay), rank d/4 (as the paper's
                  350m and 1b); exact SVD. The reference gap of 200 steps is for 10k-step runs: a short run
                  refreshes every steps/3 (--gap) so that it still sees three subspaces.
  galore_rsvd     the same, subspaces from a randomized SVD.
  natural_galore  the same with Natural GaLore's preconditioner (history chosen per matrix, damping 1e-3).
  frugal_block, frugal_svd
                  FRUGAL with AdamW's settings, signSGD on the rest, the same gap; whole-tensor blocks
                  (descending) or the SVD subspace. Same optimizer-state budget as GaLore: the density rho is
                  the share of the projected matrices' entries whose Adam moments GaLore keeps,
                  rho = sum(r x max(m, n)) / sum(m x n) over the matrices GaLore projects.
Fine-tuning (issue 4): the AdamW run's final weights, exported with ``leantrain export``, are fine-tuned
through ``model.hf`` on another domain, the standard library's own test suite (``test/test_[a-c]*.py``,
tokenized with the pretrained tokenizer), for ``--finetune-steps``, by LISA (1 of the 4 blocks at a time,
switching every 20 steps, as LMFlow's scripts) and by full AdamW, with the same lr and schedule.

Reported: the final validation loss and perplexity, the optimizer-state bytes (the largest value the trainer
logged: LISA's and FRUGAL's change as their active parts move) and the wall time of each run, as markdown
on stdout with the command and the machine; progress on stderr; JSON and two loss plots (``leantrain plot``).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.optim.config import DEFAULT_TARGET_MODULES
from leantrain.optim.groups import low_rank_groups
from leantrain.trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ("adamw", "adamw_lr0.01", "apollo", "galore", "galore_rsvd", "natural_galore", "frugal_block", "frugal_svd")
FINETUNE = ("finetune_full", "finetune_lisa")
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each pretraining run")
    parser.add_argument("--finetune-steps", type=int, default=50, help="optimizer steps of each fine-tuning run")
    parser.add_argument("--gap", type=int, default=0, help="GaLore/APOLLO/FRUGAL subspace gap; 0: steps // 3")
    parser.add_argument("--rank", type=int, default=0, help="GaLore/APOLLO rank; 0: model dim // 4")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "quality", help="where the runs go")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where quality.json and the plots go")
    parser.add_argument("--only", default="", help=f"comma-separated runs (default all): {', '.join(PRETRAIN + FINETUNE)}")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished instead of rerunning")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. model.dim=64 for a smoke test")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def leantrain(args: list[str], log_file: Path) -> float:
    """Run ``leantrain ARGS`` to the end, its output in ``log_file``; the wall time in seconds."""
    start = time.monotonic()
    with open(log_file, "w") as out:
        done = subprocess.run([sys.executable, "-m", "leantrain", *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-20:])
        raise SystemExit(f"leantrain {shlex.join(args)} failed (exit {done.returncode}):\n{tail}")
    return time.monotonic() - start


def model_shapes(overrides: list[str], rank: int) -> dict:
    """The model's size, the matrices GaLore projects, and FRUGAL's density at GaLore's budget.

    The density is the share of the projected matrices' entries whose Adam moments GaLore keeps
    (r x the longer side of each). ``dense_state_bytes`` is AdamW's state for everything else
    (embedding, head, norms), which every optimizer here keeps in full.
    """
    cfg = load_config("quickstart", overrides)
    model = Transformer(resolve_model_config(cfg.model, cfg.data.vocab_size, cfg.data.seq_len))
    projected = low_rank_groups(model, DEFAULT_TARGET_MODULES, 0.0, {})[0]["params"]
    kept = sum(min(rank, min(p.shape)) * max(p.shape) for p in projected)
    n_projected = sum(p.numel() for p in projected)
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, "matrices": len(projected), "density": kept / n_projected,
            "dense_state_bytes": 8 * (n_params - n_projected), "n_layers": len(model.layers)}


def pretraining_runs(rank: int, gap: int, density: float) -> dict[str, list[str]]:
    """Each run's optimizer overrides on top of the quickstart (whose optim section is AdamW's)."""
    low_rank = ["optim.lr=0.01", "optim.weight_decay=0", f"optim.rank={rank}", f"optim.update_proj_gap={gap}"]
    galore = [*low_rank, "optim.scale=0.25"]
    frugal = ["optim.name=frugal", "optim.lr=3e-3", "optim.weight_decay=0.1", f"optim.frugal.density={density:.4f}",
              f"optim.frugal.update_gap={gap}"]
    return {
        "adamw": ["optim.name=adamw", "optim.lr=3e-3", "optim.weight_decay=0.1"],
        # A control: the low-rank runs train the embedding and head with AdamW at their own lr.
        "adamw_lr0.01": ["optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0"],
        "apollo": ["optim.name=apollo", *low_rank],
        "galore": ["optim.name=galore", *galore],
        "galore_rsvd": ["optim.name=galore", *galore, "optim.svd=randomized"],
        "natural_galore": ["optim.name=natural_galore", *galore],
        "frugal_block": [*frugal, "optim.frugal.selection=block"],
        "frugal_svd": [*frugal, "optim.frugal.selection=svd"],
    }


def finetuning_runs(pretrained: Path, steps: int) -> dict[str, list[str]]:
    tests = Path(sysconfig.get_paths()["stdlib"]) / "test"
    common = [f"model.hf={pretrained}", "data.source=text", f"data.path={tests}/test_[a-c]*.py",
              f"data.tokenizer={pretrained / 'tokenizer.json'}", "data.val_fraction=0.1", "optim.lr=1e-3",
              "optim.weight_decay=0", f"optim.warmup_steps={max(1, steps // 10)}", f"trainer.max_steps={steps}",
              f"trainer.eval_interval={max(1, steps // 4)}"]
    return {"finetune_full": [*common, "optim.name=adamw"],
            "finetune_lisa": [*common, "optim.name=lisa", "optim.lisa.n_layers=1", "optim.lisa.interval=20"]}


def finished(run_dir: Path, steps: int) -> bool:
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return (run_dir / "final" / "model.safetensors").is_file() and any(r.get("step") == steps for r in records)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train(name: str, overrides: list[str], common: list[str], steps: int, args: argparse.Namespace) -> dict:
    """One run (or its finished predecessor with --reuse): final validation loss, state bytes, seconds."""
    run_dir = args.runs_dir / name
    timing = args.runs_dir / f"{name}.timing.json"  # wall time and load of the invocation that ran it
    if args.reuse and finished(run_dir, steps):
        log(f"[{name}] reusing the finished run in {run_dir}")
        run = json.loads(timing.read_text()) if timing.is_file() else {"seconds": None, "load_average_after": None}
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        command = ["train", "quickstart", *overrides, *common, f"trainer.run_dir={run_dir}"]
        log(f"[{name}] leantrain {shlex.join(command)}")
        run = {"seconds": leantrain(command, args.runs_dir / f"{name}.log"), "load_average_after": os.getloadavg()[0]}
        timing.write_text(json.dumps(run) + "\n")
    seconds = run["seconds"]
    records = read_metrics(run_dir)
    val = [r for r in records if "val_loss" in r]
    state = [r["optim_state_bytes"] for r in records if "optim_state_bytes" in r]
    shown_dir = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir
    result = {"run_dir": str(shown_dir), "overrides": overrides, "val_loss_start": val[0]["val_loss"],
              "val_loss": val[-1]["val_loss"], "val_ppl": val[-1]["val_ppl"], "train_loss": records[-1]["loss"],
              "optim_state_bytes": max(state), "optim_state_bytes_final": state[-1], **run}
    shown = f"{seconds:.0f} s" if seconds is not None else "time unknown"
    log(f"[{name}] val loss {result['val_loss']:.4f}, state {max(state) / MiB:.2f} MiB, {shown}")
    return result


def plot(runs: list[Path], out: Path) -> None:
    """``leantrain plot``, then the PNG reduced to a 64-colour palette (a few times smaller, same look)."""
    subprocess.run([sys.executable, "-m", "leantrain", "plot", *map(str, runs), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    from PIL import Image  # matplotlib's own dependency

    with Image.open(out) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(out, optimize=True)


def machine() -> dict:
    return {"command": shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]]), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def seconds_cell(r: dict) -> str:
    return f"{r['seconds']:.0f}" if r["seconds"] is not None else "?"


def state_cells(r: dict, baseline: int | None, dense: int) -> str:
    """Total state, the part for the block matrices (total less AdamW's dense part), both against the baseline."""
    total, blocks = r["optim_state_bytes"], r["optim_state_bytes"] - dense
    if not baseline:
        return f"{total / MiB:.2f} | {blocks / MiB:.2f} | - | -"
    return (f"{total / MiB:.2f} | {blocks / MiB:.2f} | {total / baseline:.2f} "
            f"| {blocks / (baseline - dense):.2f}")


def report(results: dict, meta: dict, setup: dict) -> None:
    """The markdown tables, with the command line and the machine first."""
    loads = [meta["load_start"][0]] + [r["load_average_after"] for r in results.values()
                                       if r["load_average_after"] is not None]
    print(f"`{meta['command']}`: torch {meta['torch']}, {meta['cpus']} CPUs, {meta['threads']} threads; load average "
          f"{meta['load_start'][0]:.1f} at the start, {meta['load_end'][0]:.1f} at the end, {min(loads):.1f} to "
          f"{max(loads):.1f} between runs (a shared machine: times are indicative, losses are not affected)")
    pre = {k: v for k, v in results.items() if k in PRETRAIN}
    if pre:
        print(f"\nPretraining: {setup['steps']} steps of {setup['batch']} x {setup['seq_len']} tokens on the stdlib "
              f"corpus, tiny preset "
              f"({setup['params']:,} parameters), seed 0; rank {setup['rank']} and gap {setup['gap']} for the low-rank "
              f"optimizers; FRUGAL density {setup['density']:.3f} (GaLore's budget over its {setup['matrices']} "
              f"matrices). State: the largest optimizer state the trainer logged; \"blocks\": less AdamW's state "
              f"for the embedding, head and norms ({setup['dense_state_bytes'] / MiB:.2f} MiB), which all keep\n")
        adamw = pre.get("adamw", {}).get("optim_state_bytes")
        print("| optimizer | settings | val loss | val ppl | state MiB | blocks MiB | state vs AdamW "
              "| blocks vs AdamW | time s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in pre.items():
            settings = " ".join(o.split(".", 1)[1] for o in r["overrides"] if not o.startswith("optim.name"))
            print(f"| {name} | {settings} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} "
                  f"| {state_cells(r, adamw, setup['dense_state_bytes'])} | {seconds_cell(r)} |")
    fine = {k: v for k, v in results.items() if k in FINETUNE}
    if fine:
        print(f"\nFine-tuning the AdamW run on the stdlib's test suite (test/test_[a-c]*.py): "
              f"{setup['finetune_steps']} steps, lr 1e-3, same data and seed for both\n")
        full = fine.get("finetune_full", {}).get("optim_state_bytes")
        print("| fine-tuning | val loss before | val loss after | val ppl | state MiB | blocks MiB | state vs full "
              "| blocks vs full | time s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in fine.items():
            label = ("full (AdamW)" if name == "finetune_full"
                     else f"LISA (1 of {setup['n_layers']} blocks, switching every 20 steps)")
            print(f"| {label} | {r['val_loss_start']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} "
                  f"| {state_cells(r, full, setup['dense_state_bytes'])} | {seconds_cell(r)} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = set(args.only.split(",")) - {""} or set(PRETRAIN + FINETUNE)
    if unknown := wanted - set(PRETRAIN + FINETUNE):
        raise SystemExit(f"--only: unknown run(s) {', '.join(sorted(unknown))}")
    args.runs_dir = args.runs_dir.resolve()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "load_start": os.getloadavg()}
    base = ["logging.progress=false", "checkpoint.interval=0", "trainer.seed=0", f"trainer.max_steps={args.steps}",
            f"optim.warmup_steps={max(1, args.steps // 10)}", f"trainer.eval_interval={max(1, args.steps // 6)}",
            *args.set]
    cfg = load_config("quickstart", base)
    rank = args.rank or max(1, resolve_model_config(cfg.model, cfg.data.vocab_size, cfg.data.seq_len).dim // 4)
    gap = args.gap or max(1, args.steps // 3)
    setup = {"steps": args.steps, "finetune_steps": args.finetune_steps, "rank": rank, "gap": gap,
             "batch": cfg.trainer.global_batch_size, "seq_len": cfg.data.seq_len, **model_shapes(base, rank)}
    results: dict[str, dict] = {}
    for name, overrides in pretraining_runs(rank, gap, setup["density"]).items():
        if name in wanted:
            results[name] = train(name, overrides, base, args.steps, args)
    if wanted & set(FINETUNE):
        if not finished(args.runs_dir / "adamw", args.steps):
            raise SystemExit("fine-tuning starts from the adamw run, which has not finished: run it first")
        pretrained = args.runs_dir / "pretrained_adamw"
        shutil.rmtree(pretrained, ignore_errors=True)
        leantrain(["export", str(args.runs_dir / "adamw"), "--out", str(pretrained)], args.runs_dir / "export.log")
        fine_base = [o for o in base if not o.startswith(("trainer.max_steps", "optim.warmup", "trainer.eval_interval"))]
        for name, overrides in finetuning_runs(pretrained, args.finetune_steps).items():
            if name in wanted:
                results[name] = train(name, overrides, fine_base, args.finetune_steps, args)
    meta["load_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    pre_runs = [args.runs_dir / n for n in PRETRAIN if n in results]
    fine_runs = [args.runs_dir / n for n in FINETUNE if n in results]
    if pre_runs:
        plot(pre_runs, args.results / "quality_pretraining.png")
    if fine_runs:
        plot(fine_runs, args.results / "quality_lisa.png")
    (args.results / "quality.json").write_text(json.dumps({"machine": meta, "setup": setup, "runs": results},
                                                          indent=1))
    report(results, meta, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
