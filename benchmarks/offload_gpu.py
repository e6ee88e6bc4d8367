"""Interleaved optimizer offload against DeepSpeed ZeRO-Offload on one CUDA GPU: step times side by side.

One training step (forward, backward, clip, AdamW update) of a leantrain Transformer (the ``1b``
preset by default: 1.3B parameters; ``--dim``/``--layers`` for up to 3B) on random tokens, for each
configuration, each in its own process so that peak memory is its own:

  gpu-adamw            no offload: fp32 weights, AdamW state on the GPU (the reference)
  ours-cpu             OffloadOptimizer(mode="cpu"): bf16 weights on the GPU, fp32 masters and AdamW
                       state in pinned host memory, every subgroup updated by the host threads
  ours-interleaved     OffloadOptimizer(mode="interleaved"): the same, with the subgroups the planner
                       picks updated on the GPU (state prefetched on a side stream)
  zero2-offload        DeepSpeed ZeRO-2, offload_optimizer: cpu (ZeRO-Offload, DeepSpeedCPUAdam), bf16
  zero3-offload        DeepSpeed ZeRO-3, offload_optimizer: cpu
  zero3-offload-ratio  DeepSpeed ZeRO-3, offload_optimizer: cpu with ``ratio`` (partial offload: that
                       fraction of the optimizer state on the host, the rest updated on the GPU)

Printed: median step time over ``--steps`` timed steps after ``--warmup``, peak GPU memory, and for
ours the planner's share of parameters updated on the GPU, its measured rates and predicted time.
The table is markdown, ready for the README (with the GPU model in its header line).

    python benchmarks/offload_gpu.py
    python benchmarks/offload_gpu.py --dim 2560 --layers 32 --configs ours-interleaved,zero2-offload
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("gpu-adamw", "ours-cpu", "ours-interleaved", "zero2-offload", "zero3-offload", "zero3-offload-ratio")
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.95), 1e-8, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--preset", default="1b", help="leantrain model preset (tiny with --allow-cpu)")
    parser.add_argument("--dim", type=int, default=0, help="hidden size (0: the preset's)")
    parser.add_argument("--layers", type=int, default=0, help="blocks (0: the preset's)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (LLaMA's, as the presets)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (JIT builds, planner measurements)")
    parser.add_argument("--subgroup-size", type=int, default=100_000_000, help="parameters per offload subgroup")
    parser.add_argument("--ratio", type=float, default=0.5, help="zero3-offload-ratio: offloaded fraction")
    parser.add_argument("--cpu-threads", type=int, default=0, help="ours: host update threads (0: automatic)")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the plumbing on the CPU (tiny model)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # run one configuration in this process
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device):
    from leantrain.nn.config import ModelConfig
    from leantrain.nn.loss import LanguageModelLoss
    from leantrain.nn.model import Transformer, resolve_model_config

    cfg = ModelConfig(preset=args.preset, dim=args.dim, n_layers=args.layers)
    cfg = resolve_model_config(cfg, vocab_size=args.vocab, seq_len=args.seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    return model, LanguageModelLoss(model)


def batch(args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), device=device)
    return tokens[:, :-1], tokens[:, 1:]


def run_ours(args: argparse.Namespace, device: torch.device, name: str) -> dict:
    from leantrain.optim.groups import decay_groups
    from leantrain.optim.offload import OffloadOptimizer

    model, loss_module = build_model(args, device)
    if name == "gpu-adamw":
        optimizer = torch.optim.AdamW(decay_groups(model.named_parameters(), 0.0), lr=LR, betas=BETAS, eps=EPS,
                                      fused=True)
    else:
        model.to(torch.bfloat16)  # bf16 weights on the GPU, fp32 masters on the host, as ZeRO-Offload keeps them
        optimizer = OffloadOptimizer(decay_groups(model.named_parameters(), 0.0), torch.optim.AdamW,
                                     mode=name.split("-")[1], subgroup_numel=args.subgroup_size,
                                     cpu_threads=args.cpu_threads, lr=LR, betas=BETAS, eps=EPS, fused=True)
    inputs, targets = batch(args, model.cfg.vocab_size, device)
    offload = hasattr(optimizer, "placement")

    def step() -> None:
        if offload:
            optimizer.begin_micro_step(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_module(inputs, targets) / targets.numel()
        loss.backward()
        if offload:
            optimizer.clip_grad_norm_(model.parameters(), CLIP)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = time_steps(args, device, step)
    result["params"] = model.num_params()
    result["weights"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if offload:
        on_device = sum(c.numel for c, d in zip(optimizer.costs, optimizer.placement) if d)
        result["on_gpu"] = on_device / sum(c.numel for c in optimizer.costs)
        result["predicted_s"] = optimizer.predicted_step_s
        result["rates"] = vars(optimizer.rates)
        optimizer.close()
    return result


def run_deepspeed(args: argparse.Namespace, device: torch.device, name: str) -> dict:
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    model, loss_module = build_model(args, device)
    offload = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if name == "zero3-offload-ratio":
        offload["ratio"] = args.ratio
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "gradient_clipping": CLIP, "steps_per_print": 2**31 - 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 2 if name.startswith("zero2") else 3, "offload_optimizer": offload,
                              "sub_group_size": args.subgroup_size},
    }
    engine, *_ = deepspeed.initialize(model=loss_module, model_parameters=loss_module.parameters(), config=config)
    inputs, targets = batch(args, model.cfg.vocab_size, device)

    def step() -> None:
        loss = engine(inputs, targets) / targets.numel()
        engine.backward(loss)
        engine.step()

    result = time_steps(args, device, step)
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    result["weights"] = "bfloat16"
    return result


def time_steps(args: argparse.Namespace, device: torch.device, step) -> dict:
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(args: argparse.Namespace) -> None:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    runner = run_deepspeed if args.only.startswith("zero") else run_ours
    print("RESULT " + json.dumps(runner(args, device, args.only)), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only:
        run_child(args)
        return
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("offload_gpu.py needs a CUDA GPU (it compares host-device offload schemes); "
                 "--allow-cpu only smoke-tests the plumbing with a tiny model")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke test)"
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for name in configs:
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--only", name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            rows.append((name, None, " / ".join(tail)))
        else:
            rows.append((name, json.loads(lines[-1][len("RESULT "):]), ""))
        print(f"{name}: done", file=sys.stderr, flush=True)
    report(args, gpu, rows)


def report(args: argparse.Namespace, gpu: str, rows: list) -> None:
    params = next((r["params"] for _, r, _ in rows if r), 0)
    print(f"\n{gpu}, {params / 1e9:.2f}B parameters, micro-batch {args.micro_batch} x {args.seq_len} tokens, "
          f"torch {torch.__version__}\n")
    print("| configuration | weights on GPU | step (s) | peak GPU memory (GiB) | notes |")
    print("|---|---|---|---|---|")
    reference = next((r["step_s"] for n, r, _ in rows if r and n == "zero2-offload"), None)
    for name, r, error in rows:
        if r is None:
            print(f"| {name} | | failed | | {error} |")
            continue
        notes = []
        if reference and name != "zero2-offload":
            notes.append(f"{reference / r['step_s']:.2f}x ZeRO-Offload's speed")
        if name == "ours-interleaved":
            rates = r["rates"]
            notes.append(f"{100 * r['on_gpu']:.0f}% of parameters updated on the GPU; planner predicted "
                         f"{r['predicted_s']:.3f} s; link {rates['h2d_bytes_per_s'] / 1e9:.1f} GB/s, host "
                         f"{rates['cpu_params_per_s'] / 1e9:.2f} G params/s, GPU "
                         f"{rates['device_params_per_s'] / 1e9:.1f} G params/s")
        if name == "zero3-offload-ratio":
            notes.append(f"ratio {args.ratio}")
        print(f"| {name} | {r['weights']} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
