"""Training throughput: leantrain's Transformer against HF transformers' LlamaForCausalLM.

Both models get the same shapes (a preset of leantrain.nn.model.PRESETS), the same random batch,
torch.optim.AdamW with the same settings, and the same autocast. Both run the same loss: a naive
cross-entropy on ``hidden @ head_weight.T`` (leantrain: ``model(tokens)`` and
``model.head_weight``; HF: ``model.model(input_ids).last_hidden_state`` and ``model.lm_head.weight``),
so both pay for the same loss and any difference comes from the decoders. HF runs with
``attn_implementation="sdpa"`` and ``use_cache=False``.

Each model does warmup steps, then timed repeats alternate between the two models (the order flips
every repeat) so that load from other processes falls on both alike. The table gives the median
tokens/s over the repeats; the ratio is the median of the per-repeat ratios, each taken between two
back-to-back measurements, which is the figure least moved by a busy machine.

    python benchmarks/throughput.py                       # 60m, batch 4 x 256, bf16: about 45 s on 2 cores
    python benchmarks/throughput.py --preset tiny --batch 8 --dtype fp32
"""

import argparse
import contextlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers

from leantrain.nn.config import ModelConfig
from leantrain.nn.model import PRESETS, Transformer, resolve_model_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="60m", choices=list(PRESETS))
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (presets without one)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model before timing")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="autocast dtype; fp32 disables autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """HF LLaMA with the same shapes as the resolved leantrain config (pre-norm, untied, no biases)."""
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        use_cache=False,
    )
    hf_config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_config)


def next_token_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ head_weight.T
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def make_step(model: torch.nn.Module, hidden_fn, head_fn, tokens: torch.Tensor, autocast):
    """One closure per model: zero grads, forward, loss, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = next_token_loss(hidden_fn(inputs), head_fn(), targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_steps(step, n: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "unknown cpu"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return (
        f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_model_config(ModelConfig(preset=args.preset), vocab_size=args.vocab, seq_len=args.seq_len)
    device = args.device
    dtype = DTYPES[args.dtype]
    device_type = torch.device(device).type

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    torch.manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    ours = Transformer(cfg).to(device)
    hf = build_hf_llama(cfg).to(device)
    ours.train()
    hf.train()
    if ours.num_params() != hf.num_parameters():
        raise RuntimeError(f"parameter counts differ: leantrain {ours.num_params()} vs HF {hf.num_parameters()}")

    steps = {
        "leantrain": make_step(ours, ours, lambda: ours.head_weight, tokens, autocast),
        "HF LlamaForCausalLM": make_step(
            hf, lambda x: hf.model(input_ids=x).last_hidden_state, lambda: hf.lm_head.weight, tokens, autocast
        ),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()

    tokens_per_step = args.batch * args.seq_len
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds = time_steps(steps[name], args.steps, device)
            rates[name].append(tokens_per_step * args.steps / seconds)

    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = statistics.median(a / b for a, b in zip(rates["leantrain"], rates["HF LlamaForCausalLM"]))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_line(device)}")
    print(
        f"model: preset {args.preset}, {ours.num_params() / 1e6:.1f}M parameters, dim {cfg.dim}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, vocab {cfg.vocab_size}; "
        f"batch {args.batch} x seq {args.seq_len}, {args.dtype}, {args.warmup} warmup + "
        f"{args.repeats} x {args.steps} timed steps each\n"
    )
    print("| model | tokens/s (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {median[name]:,.0f} | {min(r):,.0f} | {max(r):,.0f} |")
    print(f"\nratio leantrain / HF (median of per-repeat ratios): {ratio:.3f}")


if __name__ == "__main__":
    main()
