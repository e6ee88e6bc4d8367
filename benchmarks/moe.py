"""MoE layer throughput against HF's MixtralSparseMoeBlock, and the cost of global balancing.

    python benchmarks/moe.py
    python benchmarks/moe.py --tokens 4096 --dim 512 --intermediate 1408 --experts 8 --top-k 2

Part 1, one process: forward+backward tokens/s of our MoELayer (each dispatch implementation)
and of HF's block under each of its experts implementations, with the same weights, in fp32 and
bf16 (parameters and activations), plus ours under bf16 autocast with fp32 parameters. The
experts' matmul FLOP/s (18 * top_k * dim * intermediate per token, forward and backward) is
quoted as a fraction of the peak of a plain square matmul measured in the same run. Runs are
interleaved and the best of ``--repeats`` is kept, so other load on the machine biases every
row alike; on a busy machine ``--threads 1 --clock cpu`` (process CPU time) is steadier. HF's
``batched_mm`` is left out: it gathers one weight matrix per (token, expert) pair, 47 GB here.
HF's ``grouped_mm_fallback`` row is its grouped_mm path with the torch._grouped_mm check forced
off, i.e. the per-expert loop HF falls back to where torch._grouped_mm cannot run.

Part 2, two processes (gloo): the step time of a small MoE model trained with ``micro`` and with
``global`` balancing, alternating every step on the same model so that both see the same load.
"""

import argparse
import contextlib
import os
import statistics
import time
from copy import deepcopy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leantrain.moe.balance import BalanceCollector
from leantrain.moe.config import MoEConfig
from leantrain.moe.layer import MoELayer

from allocator import keep_freed_memory


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def hf_block(layer: MoELayer, impl: str):
    """HF's MixtralSparseMoeBlock with the weights of ``layer`` and the given experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    e, d, h2 = layer.experts.gate_up.shape
    config = MixtralConfig(hidden_size=d, intermediate_size=h2 // 2, num_local_experts=e,
                           num_experts_per_tok=layer.top_k, router_jitter_noise=0.0)
    config._experts_implementation = "grouped_mm" if impl == "grouped_mm_fallback" else impl
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.down.transpose(1, 2))
    return block


@contextlib.contextmanager
def _forced_fallback():
    """Within the context, HF's grouped_mm experts take their loop fallback instead of torch._grouped_mm."""
    import transformers.integrations.moe as hf_moe
    saved = hf_moe._can_use_grouped_mm
    hf_moe._can_use_grouped_mm = lambda *args: False
    try:
        yield
    finally:
        hf_moe._can_use_grouped_mm = saved


def layer_throughput(args) -> None:
    clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    tokens = args.tokens
    seq = min(tokens, 1024)
    flops = 18 * args.top_k * args.dim * args.intermediate * tokens
    print(f"\n# Part 1: forward+backward of one MoE layer: {tokens} tokens, dim {args.dim}, intermediate "
          f"{args.intermediate}, {args.experts} experts, top-{args.top_k}")
    base = MoELayer(args.dim, args.intermediate, MoEConfig(num_experts=args.experts, top_k=args.top_k))
    x = torch.randn(tokens // seq, seq, args.dim)
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        square = torch.randn(args.peak_size, args.peak_size, dtype=dtype)
        peak_time = float("inf")
        cases = {}
        for impl in ("loop", "grouped_mm"):
            cases[f"leantrain {impl}"] = (_with_impl(base, impl).to(dtype), contextlib.nullcontext, dtype)
        if dtype != torch.float32:
            cases["leantrain auto, autocast, fp32 params"] = (
                _with_impl(base, "auto"), lambda: torch.autocast("cpu", dtype), torch.float32)
        for impl in ("eager", "grouped_mm", "grouped_mm_fallback"):
            context = _forced_fallback if impl == "grouped_mm_fallback" else contextlib.nullcontext
            cases[f"HF Mixtral {impl}"] = (hf_block(base, impl).to(dtype), context, dtype)
        best = {name: float("inf") for name in cases}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            elapsed = min(_timed(lambda: square @ square, clock) for _ in range(3))
            peak_time = min(peak_time, elapsed) if round_ else peak_time
            for name, (module, context, input_dtype) in cases.items():
                xin = x.to(input_dtype).requires_grad_(True)
                with context():
                    elapsed = _timed(lambda: module(xin).float().square().mean().backward(), clock)
                module.zero_grad(set_to_none=True)
                if round_:
                    best[name] = min(best[name], elapsed)
        peak = 2 * args.peak_size**3 / peak_time
        print(f"\n{dtype_name}: plain {args.peak_size}^2 matmul peak {peak / 1e9:.0f} GFLOP/s")
        print(f"| {'implementation':44s} | tokens/s | expert matmul GFLOP/s | of peak |")
        print(f"|{'-' * 46}|---------:|----------------------:|--------:|")
        for name, elapsed in sorted(best.items(), key=lambda item: item[1]):
            print(f"| {name:44s} | {tokens / elapsed:8.0f} | {flops / elapsed / 1e9:21.1f} | {flops / elapsed / peak:7.1%} |")


def _with_impl(layer: MoELayer, impl: str) -> MoELayer:
    copy = deepcopy(layer)
    copy.experts.impl = impl
    return copy


class _MoELanguageModel(torch.nn.Module):
    """Embedding, MoE layers with residuals, output head: just enough model for the balancing cost."""

    def __init__(self, vocab: int, dim: int, hidden: int, layers: int, cfg: MoEConfig):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.moes = torch.nn.ModuleList(MoELayer(dim, hidden, cfg, layer_id=i) for i in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, collector: BalanceCollector) -> torch.Tensor:
        h = self.embed(tokens)
        for moe in self.moes:
            h = h + moe(h, collector)
        return self.head(h)


def _balance_worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    vocab = 1024
    cfgs = {mode: MoEConfig(num_experts=args.experts, top_k=args.top_k, balance=mode) for mode in ("micro", "global")}
    model = _MoELanguageModel(vocab, args.dim // 2, args.intermediate // 2, 2, cfgs["global"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    collectors = {mode: BalanceCollector(cfg, group=dist.group.WORLD) for mode, cfg in cfgs.items()}
    gen = torch.Generator().manual_seed(rank)
    times, loss_times = [], []
    for step in range(2 * (args.balance_steps + 1)):
        collector = collectors[("micro", "global")[step % 2]]
        tokens = torch.randint(0, vocab, (args.accumulation, args.balance_batch, 257), generator=gen)
        dist.barrier()
        start, in_loss = time.perf_counter(), 0.0
        for micro in range(args.accumulation):
            with contextlib.nullcontext() if micro == args.accumulation - 1 else ddp.no_sync():
                logits = ddp(tokens[micro, :, :-1], collector)
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[micro, :, 1:].flatten())
                loss_start = time.perf_counter()
                aux = collector.loss()
                in_loss += time.perf_counter() - loss_start
                ((ce + aux) / args.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        collector.reset()
        dist.barrier()
        times.append(time.perf_counter() - start)
        loss_times.append(in_loss)
    if rank == 0:
        out.put((times[2:], loss_times[2:]))  # the first pair warms up
    dist.barrier()
    dist.destroy_process_group()


def balance_overhead(args) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_balance_worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
    times, loss_times = out.get()
    micro, glob = times[0::2], times[1::2]
    paired = statistics.median(g / m - 1 for m, g in zip(micro, glob))
    loss_micro, loss_glob = statistics.median(loss_times[0::2]), statistics.median(loss_times[1::2])
    print(f"\n# Part 2: step time of a 2-layer MoE model (dim {args.dim // 2}, {args.experts} experts), 2 processes "
          f"(gloo), micro-batch {args.balance_batch} x 256 tokens, {args.accumulation} micro-steps per step; "
          f"{args.balance_steps} steps of each, alternating")
    print(f"  micro   {statistics.median(micro) * 1e3:8.1f} ms/step, {loss_micro * 1e3:6.2f} ms in collector.loss() (medians)")
    print(f"  global  {statistics.median(glob) * 1e3:8.1f} ms/step, {loss_glob * 1e3:6.2f} ms in collector.loss() (medians)")
    print(f"  global over micro: {paired:+.2%} (median over consecutive pairs of steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--balance-steps", type=int, default=30)
    parser.add_argument("--balance-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="cpu: process CPU time, which time other processes take does not inflate "
                             "(use with --threads 1 on a busy machine)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: no per-allocation mmap, no trimming (see keep_freed_memory)")
    parser.add_argument("--skip-layer", action="store_true", help="skip part 1")
    parser.add_argument("--skip-balance", action="store_true", help="skip part 2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    print(f"{torch.get_num_threads()} threads, {args.clock} clock, glibc allocator "
          f"{'keeping freed memory' if args.keep_freed_memory else 'defaults'}")
    if not args.skip_layer:
        layer_throughput(args)
    if not args.skip_balance:
        balance_overhead(args)


if __name__ == "__main__":
    main()
