"""8-bit AdamW: bitsandbytes' AdamW8bit and leantrain's, side by side with 32-bit AdamW on the 60m preset.

    OMP_NUM_THREADS=2 python benchmarks/lowbit.py                 # about 12 minutes on 2 cores
    python benchmarks/lowbit.py --steps 20 --seq-len 64 --batch 4   # a smoke test

The same model (``model.preset=60m``, seed 0), the same data (the quickstart's corpus, the Python standard
library's source, 8192-token BPE, the same shuffled windows), the same schedule (lr 3e-3, betas (0.9, 0.95),
weight decay 0.1 on matrices, 10% warmup then cosine to 10%), bf16 autocast, fp32 weights, for each of:
  adamw32     torch.optim.AdamW (fused), what ``optim.name=adamw`` runs;
  bnb8        bitsandbytes.optim.AdamW8bit (blockwise 8-bit, its CPU kernels);
  leantrain8  leantrain.optim.AdamW8bit (the same algorithm in plain torch), what ``optim.state_bits=8`` runs.
Reported: the final training loss (mean of the last 10 steps) and the validation loss on fixed held-out
windows, their ratios to 32-bit AdamW and between the two 8-bit runs, the optimizer-state bytes against
32-bit (both 8-bit optimizers keep tensors under 4096 elements in 32 bits: the norms), and the time per
step, as markdown with the command and the machine. Expected: losses within 2%, state <= 0.27x.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

from leantrain.nn.loss import LanguageModelLoss
from leantrain.optim import AdamW8bit
from leantrain.optim.groups import count_state_bytes, decay_groups
from leantrain.trainer.config import load_config
from leantrain.trainer.data import build_data
from leantrain.trainer.schedule import build_scheduler
from leantrain.trainer.train import build_model

RUNS = ("adamw32", "bnb8", "leantrain8")
LR, BETAS, WEIGHT_DECAY, EPS = 3e-3, (0.9, 0.95), 0.1, 1e-8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated runs: {', '.join(RUNS)}")
    parser.add_argument("--results", default="", help="JSON file each run adds its result to (runs in separate "
                        "processes can share one); the report covers every run in it")
    return parser.parse_args(argv)


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = decay_groups(model.named_parameters(), WEIGHT_DECAY)
    if name == "adamw32":
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)
    if name == "bnb8":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=LR, betas=BETAS, eps=EPS)
    return AdamW8bit(groups, lr=LR, betas=BETAS, eps=EPS)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the moments and their block maxima (bitsandbytes also keeps its two 256-entry maps per tensor)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and not key.startswith("qmap"):
                total += value.numel() * value.element_size()
    return total


def run(name: str, args: argparse.Namespace) -> dict:
    cfg = load_config("quickstart", ["model.preset=60m", f"data.seq_len={args.seq_len}",
                                     f"trainer.micro_batch_size={args.batch}", f"trainer.global_batch_size={args.batch}",
                                     f"trainer.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 10)}",
                                     f"optim.lr={LR}"])
    data = build_data(cfg.data, cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, data.vocab_size)
    loss_module = LanguageModelLoss(model, cfg.loss)
    optimizer = make_optimizer(name, model)
    scheduler = build_scheduler(optimizer, cfg.optim, args.steps)
    loader = data.train_loader(args.batch)
    losses, seconds = [], 0.0
    for step in range(args.steps):
        inputs, targets = loader.next()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_module(inputs, targets) / targets.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"{name} step {step}: loss {losses[-1]:.4f} ({seconds / (step + 1):.2f} s/step)", file=sys.stderr,
                  flush=True)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for inputs, targets in data.val_batches(args.batch, args.val_batches):
            total += loss_module(inputs, targets).item()
            count += targets.numel()
    return {"final_loss": sum(losses[-10:]) / len(losses[-10:]), "val_loss": total / count,
            "state_bytes": state_bytes(optimizer), "counted_bytes": count_state_bytes(optimizer),
            "s_per_step": seconds / args.steps, "params": sum(p.numel() for p in model.parameters())}


def report(results: dict, args: argparse.Namespace) -> None:
    base = results.get("adamw32")
    print(f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/lowbit.py "
          f"{shlex.join(sys.argv[1:])}`: 60m preset ({next(iter(results.values()))['params'] / 1e6:.1f}M parameters), "
          f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, bf16 autocast, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.")
    print()
    print("| optimizer | final train loss | vs 32-bit | val loss | vs 32-bit | state | vs 32-bit | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rel = (lambda key: f"{r[key] / base[key]:.4f}") if base else (lambda key: "-")
        print(f"| {name} | {r['final_loss']:.4f} | {rel('final_loss')} | {r['val_loss']:.4f} | {rel('val_loss')} | "
              f"{r['state_bytes'] / 2**20:.1f} MiB | {rel('state_bytes')} | {r['s_per_step']:.2f} |")
    if "bnb8" in results and "leantrain8" in results:
        ours, bnb = results["leantrain8"], results["bnb8"]
        print()
        print(f"leantrain8 / bnb8: final train loss {ours['final_loss'] / bnb['final_loss']:.4f}, "
              f"val loss {ours['val_loss'] / bnb['val_loss']:.4f}, state {ours['state_bytes'] / bnb['state_bytes']:.4f}.")
    checks = []
    for name in ("bnb8", "leantrain8"):
        if base and name in results:
            r = results[name]
            checks.append(abs(r["val_loss"] / base["val_loss"] - 1) <= 0.02 and r["state_bytes"] <= 0.27 * base["state_bytes"])
    if checks:
        print()
        print("Within 2% of 32-bit AdamW with state <= 0.27x:", "yes" if all(checks) else "NO")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if "bnb8" in names:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            print(f"!!! bitsandbytes cannot be imported here ({e}): the bnb8 run is skipped !!!", file=sys.stderr)
            names.remove("bnb8")
    results = {}
    for name in names:
        results[name] = run(name, args)
        if args.results:  # merged with what other processes wrote, in RUNS order
            saved = json.loads(open(args.results).read()) if os.path.exists(args.results) else {}
            saved[name] = results[name]
            with open(args.results, "w") as f:
                json.dump(saved, f, indent=1)
            results = {n: saved[n] for n in RUNS if n in saved}
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
