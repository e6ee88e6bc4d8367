"""Low-rank optimizers side by side: state bytes and step time on 130m block weights; 350m step peak memory.

    python benchmarks/optimizers.py                      # both parts, 5-15 minutes on 2 cores
    python benchmarks/optimizers.py --part state         # or --part memory
    python benchmarks/optimizers.py --memory-rank 256 --json out.json

Part 1, one process: the 84 block weights of the 130m preset (12 layers x wq, wk, wv, wo 768x768,
w1, w3 2048x768, w2 768x2048), with the paper's 130m settings (rank 256, scale 0.25, gap 200) and
fixed random gradients. Optimizers: torch AdamW (foreach), galore-torch GaLoreAdamW, APOLLO
(apollo-torch, random projection, channel-wise scaling), ours with exact and with randomized SVD,
ours with randomized SVD and staggered refreshes, and Natural GaLore (randomized SVD, automatic
history).
- State bytes: exact, summed over every tensor in the optimizer state, including the projection
  matrices galore-torch and APOLLO keep inside projector objects.
- Step time: each optimizer owns a copy of the weights; after one untimed first step (state
  creation and first subspace), every round times ``--ordinary`` ordinary steps and one refresh
  step per optimizer, interleaved so that load from other processes falls on all alike, and the
  best round is kept. A refresh is forced by setting each matrix's step counter to a multiple of
  the gap (the counter every optimizer here tests); staggered, only one matrix refreshes (84
  matrices over a gap of 200: the most any step pays for). Amortized = (refresh + (gap - 1) x
  ordinary) / gap, computed from the two measured times rather than by running a whole gap.
Part 2, a fresh process per optimizer: the 350m preset (fp32 weights), one training step of batch
``--batch`` x ``--seq`` tokens under bf16 autocast with activation checkpointing (as the paper's
memory figures), otherwise as the trainer runs it: AdamW (fused, global clipping) against GaLore
with per-layer updates (``build_optimizer``, rank ``--memory-rank``, randomized SVD to keep the
first step short). Autocast's weight cache is off by default: with it the forward holds a bf16
copy of every weight (half the fp32 weights) until it ends, which under activation checkpointing
is the step's largest transient (``--autocast-cache`` shows it; ``--no-activation-checkpointing``
keeps every block's activations and bf16 weights for backward). Memory is the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during the second step, after a
warm-up step that creates the optimizer state. The target is checked on the step's memory: that
peak less the resident set before the model was built (Python and torch, the same in both); the
ratio of the raw peaks is printed too.

Targets (issue 3): with exact SVD our amortized step is no slower than galore-torch's; with
randomized SVD our refresh step is at most 0.2x galore-torch's and our amortized step at most 0.9x;
the per-layer GaLore step peaks at at most 0.5x AdamW's memory.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

from leantrain.optim.galore import GaLoreAdamW, stagger_offsets
from leantrain.optim.natural_galore import NaturalGaLoreAdamW

from allocator import keep_freed_memory

DIM, HIDDEN, LAYERS = 768, 2048, 12
RANK, SCALE, GAP = 256, 0.25, 200
TARGETS = {"exact_amortized": 1.0, "randomized_refresh": 0.2, "randomized_amortized": 0.9, "peak_memory": 0.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "state", "memory"), default="all")
    parser.add_argument("--layers", type=int, default=LAYERS, help="part 1: blocks of 130m weights (12 = all)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per optimizer, interleaved")
    parser.add_argument("--ordinary", type=int, default=3, help="ordinary steps timed per round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--memory-rank", type=int, default=128, help="GaLore rank of part 2 (optim.rank default)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="part 2: recompute each block in backward (model.activation_checkpointing)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="part 2: compute dtype, as trainer.dtype (bf16 autocast or plain fp32)")
    parser.add_argument("--autocast-cache", action=argparse.BooleanOptionalAction, default=False,
                        help="part 2: let autocast cache bf16 copies of the weights for the whole forward")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--device", default="cpu", help="part 1: where the weights, gradients and states live (cpu, cuda)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="part 1: glibc keeps freed memory for reuse, so no optimizer's step time depends on "
                             "the page faults its neighbours' frees leave it (see allocator.py)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--render", default="", help="print the tables of a --json file instead of measuring")
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def block_shapes(layers: int) -> list[tuple[int, int]]:
    layer = [(DIM, DIM)] * 4 + [(HIDDEN, DIM), (HIDDEN, DIM), (DIM, HIDDEN)]
    return layer * layers


def make_optimizers(params: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.optim.Optimizer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from apollo_torch import APOLLOAdamW
        from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW

    def group(name: str, **extra) -> list[dict]:
        return [{"params": params[name], "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": "std",
                 **extra}]

    return {
        "adamw": torch.optim.AdamW(params["adamw"], lr=1e-3, foreach=True),
        "galore-torch": ReferenceGaLoreAdamW(group("galore-torch"), lr=1e-3, no_deprecation_warning=True),
        "apollo": APOLLOAdamW(group("apollo", proj="random", scale_type="channel"), lr=1e-3),
        "ours-exact": GaLoreAdamW(group("ours-exact"), lr=1e-3),
        "ours-randomized": GaLoreAdamW(group("ours-randomized"), lr=1e-3, svd="randomized"),
        "ours-randomized-stagger": GaLoreAdamW(group("ours-randomized-stagger"), lr=1e-3, svd="randomized",
                                               stagger=True),
        "natural-galore": NaturalGaLoreAdamW(group("natural-galore"), lr=1e-3, svd="randomized"),
    }


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor reachable from an optimizer-state value (projector objects included)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if hasattr(value, "__dict__"):
        return [t for v in vars(value).values() for t in tensors_in(v)]
    return []


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for t in (t for v in state.values() for t in tensors_in(v)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def force_refresh(name: str, optimizer: torch.optim.Optimizer, round_index: int) -> None:
    """Set step counters to a multiple of the gap, so the next step recomputes the subspaces."""
    step = GAP * (round_index + 1)
    states = list(optimizer.state.values())
    if name == "ours-randomized-stagger":
        # One 768 x 2048 matrix, at its own phase: the most a step refreshes with 84 matrices over 200.
        states, step = states[6:7], step + stagger_offsets([GAP] * len(states), True)[6]
    for state in states:
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].fill_(float(step))
        elif "step" in state:
            state["step"] = step


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed_step(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(wall, CPU) seconds of one step; CPU time (all threads) is less sensitive to other processes' load.

    On CUDA the step is synchronized at both ends, so wall time includes the kernels it queued.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.step()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def state_and_time(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = block_shapes(args.layers)
    # Gradients with a decaying spectrum (as real ones have), shared read-only by every optimizer.
    grads = []
    for m, n in shapes:
        g = torch.randn(m, 64, generator=gen) @ torch.randn(64, n, generator=gen)
        grads.append((g + 0.1 * torch.randn(m, n, generator=gen)) * 1e-3)
    init = [torch.randn(m, n, generator=gen) * 0.02 for m, n in shapes]
    grads, init = [g.to(args.device) for g in grads], [x.to(args.device) for x in init]
    names = ["adamw", "galore-torch", "apollo", "ours-exact", "ours-randomized", "ours-randomized-stagger",
             "natural-galore"]
    params = {name: [torch.nn.Parameter(x.clone()) for x in init] for name in names}
    for plist in params.values():
        for p, g in zip(plist, grads):
            p.grad = g
    optimizers = make_optimizers(params)
    first = {}
    for name, opt in optimizers.items():
        first[name] = timed_step(opt)[0]  # creates the state and the first subspaces
        progress(f"{name}: first step {first[name]:.2f} s")
    ordinary = {name: [] for name in names}  # per round: (wall, cpu) of the fastest ordinary step
    refresh = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            opt = optimizers[name]
            ordinary[name].append(min(timed_step(opt) for _ in range(args.ordinary)))
            force_refresh(name, opt, r)
            refresh[name].append(timed_step(opt) if name != "adamw" else ordinary[name][-1])
            progress(f"round {r}, {name}: ordinary {ordinary[name][-1][0] * 1e3:.0f} ms, "
                     f"refresh {refresh[name][-1][0]:.2f} s (wall)")
    results = {}
    for name in names:
        row = {"state_bytes": state_bytes(optimizers[name]), "first_step_s": first[name]}
        for i, clock in enumerate(("wall", "cpu")):
            normal = min(t[i] for t in ordinary[name])
            full = min(t[i] for t in refresh[name])
            row[clock] = {"ordinary_s": normal, "refresh_s": full, "amortized_s": (full + (GAP - 1) * normal) / GAP}
        results[name] = row
    results["_weights_bytes"] = sum(m * n for m, n in shapes) * 4
    return results


class PeakMemory:
    """Peak resident set of this process over a block, and the resident set at its start (Linux)."""

    def __enter__(self):
        gc.collect()
        if platform.system() == "Linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, args: argparse.Namespace) -> dict:
    """One training step of the 350m preset with ``name`` (adamw | galore-layerwise), in a fresh process."""
    from leantrain.nn.config import ModelConfig
    from leantrain.nn.loss import LanguageModelLoss
    from leantrain.nn.model import Transformer, resolve_model_config
    from leantrain.optim.build import build_optimizer
    from leantrain.optim.config import OptimConfig
    from leantrain.optim.groups import count_state_bytes

    imports_rss = _status_bytes("VmRSS")
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset="350m", activation_checkpointing=args.activation_checkpointing),
                               vocab_size=32000, seq_len=args.seq)
    model = Transformer(cfg)
    loss_module = LanguageModelLoss(model)
    layerwise = name == "galore-layerwise"
    optim_cfg = (OptimConfig(name="galore", rank=args.memory_rank, svd="randomized", layerwise=True)
                 if layerwise else OptimConfig(name="adamw"))
    optimizer = build_optimizer(optim_cfg, model)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))

    def step() -> float:
        start = time.perf_counter()
        if layerwise:
            optimizer.begin_micro_step(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16",
                            cache_enabled=args.autocast_cache):
            loss = loss_module(tokens[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        if not layerwise:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warmup_s = step()
    with PeakMemory() as mem:
        step_s = step()
    return {"peak_bytes": mem.peak, "start_bytes": mem.start, "imports_bytes": imports_rss,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "state_bytes": count_state_bytes(optimizer), "warmup_s": warmup_s, "step_s": step_s}


def peak_memory(args: argparse.Namespace) -> dict:
    results = {}
    for name in ("adamw", "galore-layerwise"):
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch), "--seq", str(args.seq),
               "--memory-rank", str(args.memory_rank), "--threads", str(args.threads),
               "--activation-checkpointing" if args.activation_checkpointing else "--no-activation-checkpointing",
               "--autocast-cache" if args.autocast_cache else "--no-autocast-cache", "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def machine() -> dict:
    return {"command": f"python benchmarks/optimizers.py {' '.join(sys.argv[1:])}", "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_initialized() else "cpu",
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "arch": platform.machine(),
            "load_average": [round(x, 1) for x in os.getloadavg()]}


def report(state: dict | None, memory: dict | None, args: argparse.Namespace, meta: dict) -> dict:
    """Print markdown tables (command line and machine first) and the targets; return the checked ratios."""
    GiB, MiB = 2**30, 2**20
    checks = {}
    print(f"`{meta['command']}`: torch {meta['torch']}, {meta['threads']} threads, {meta['cpus']} CPUs "
          f"({meta['arch']}), load average {' '.join(map(str, meta['load_average']))} at the end"
          + (f"; part 1 on {meta['device']}" if meta.get("device", "cpu") != "cpu" else ""))
    if state:
        print(f"\n130m block weights ({state['_weights_bytes'] / MiB:.0f} MiB fp32), rank {RANK}, gap {GAP}; best of "
              f"{meta.get('rounds', args.rounds)} interleaved round(s), glibc allocator "
              f"{'keeping freed memory' if meta.get('keep_freed_memory') else 'defaults'}; amortized = (refresh + {GAP - 1} x ordinary) / {GAP}; "
              f"CPU = process CPU time over all threads, steadier than wall time when the machine is loaded\n")
        print("| optimizer | state MiB | ordinary ms | refresh s | amortized ms | ordinary CPU ms | refresh CPU s "
              "| amortized CPU ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in state.items():
            if name.startswith("_"):
                continue
            wall, cpu = r["wall"], r["cpu"]
            print(f"| {name} | {r['state_bytes'] / MiB:.1f} | {wall['ordinary_s'] * 1e3:.0f} | {wall['refresh_s']:.2f} "
                  f"| {wall['amortized_s'] * 1e3:.0f} | {cpu['ordinary_s'] * 1e3:.0f} | {cpu['refresh_s']:.2f} "
                  f"| {cpu['amortized_s'] * 1e3:.0f} |")
        for clock in ("wall", "cpu"):
            ref, exact, rand = (state[n][clock] for n in ("galore-torch", "ours-exact", "ours-randomized"))
            checks[f"exact_amortized ({clock})"] = exact["amortized_s"] / ref["amortized_s"]
            checks[f"randomized_refresh ({clock})"] = rand["refresh_s"] / ref["refresh_s"]
            checks[f"randomized_amortized ({clock})"] = rand["amortized_s"] / ref["amortized_s"]
    if memory:
        print(f"\n350m training step, batch {args.batch} x {args.seq} tokens, {args.dtype} compute, fp32 weights, "
              f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, autocast weight cache "
              f"{'on' if args.autocast_cache else 'off'}; peak resident set of a fresh process; step = peak less the "
              f"runtime (Python and torch before the model exists)\n")
        print("| optimizer | peak GiB | step GiB | runtime GiB | weights GiB | state GiB | step s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in memory.items():
            print(f"| {name} | {r['peak_bytes'] / GiB:.2f} | {(r['peak_bytes'] - r['imports_bytes']) / GiB:.2f} "
                  f"| {r['imports_bytes'] / GiB:.2f} | {r['weights_bytes'] / GiB:.2f} | {r['state_bytes'] / GiB:.2f} "
                  f"| {r['step_s']:.1f} |")
        galore, adamw = memory["galore-layerwise"], memory["adamw"]
        print(f"\nRatio of the raw peaks (runtime included): {galore['peak_bytes'] / adamw['peak_bytes']:.3f}x")
        checks["peak_memory"] = (galore["peak_bytes"] - galore["imports_bytes"]) / (adamw["peak_bytes"]
                                                                                    - adamw["imports_bytes"])
    print()
    for key, value in checks.items():
        target = TARGETS[key.split(" ")[0]]
        baseline = "AdamW" if key == "peak_memory" else "galore-torch"
        print(f"- {key}: {value:.3f}x {baseline} (target <= {target}x): {'ok' if value <= target else 'MISSED'}")
    return checks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return {}
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        report(saved["state_and_time"], saved["peak_memory"], args, saved["machine"])
        return saved
    # Part 2 measures fresh child processes, which keep glibc's defaults.
    if args.keep_freed_memory and args.part in ("all", "state"):
        keep_freed_memory()
    state = state_and_time(args) if args.part in ("all", "state") else None
    memory = peak_memory(args) if args.part in ("all", "memory") else None
    meta = {**machine(), "rounds": args.rounds, "keep_freed_memory": args.keep_freed_memory}
    checks = report(state, memory, args, meta)
    results = {"machine": meta, "state_and_time": state, "peak_memory": memory, "checks": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
