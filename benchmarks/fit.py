"""Does ``configs/galore_7b.yaml`` fit? Three real optimizer steps of it on the CPU, and their peak memory.

    python benchmarks/fit.py                 # the 7b preset: needs about 19 GiB free, 20-40 min on 2 cores
    python benchmarks/fit.py --preset 1b     # also the estimate against the measured peak (a few GiB)

The run is ``galore_7b`` (per-layer 8-bit GaLore at rank 1024, bf16 weights, activation checkpointing)
with ``trainer.device=cpu``, micro-batch 1 x 256 and the randomized subspace refresh
(``optim.svd=randomized``; an exact SVD of every matrix at the first step would take an hour here),
plus ``--preset`` and any ``key=value`` overrides. It goes through the trainer's own pieces: the
memory check that refuses a run whose plan exceeds MemAvailable, the model built on the meta device
and materialised in bf16, the loss, the engine and optimizer, and the loop's ``micro_batch`` and
``engine.step``, on random tokens (no corpus is tokenized). It prints each step's loss and the
process's peak resident set (VmHWM), with glibc set to give freed tensors back at once
(``--no-return-freed-memory`` keeps its default, whose cached frees add to the resident set). With ``--measure`` (the default for presets other than 7b) it
then runs ``leantrain estimate --measure``'s measurement (two more steps of a fresh model under the
profiler) and prints the estimate against it.
"""

import argparse
import platform
import resource
import time

import torch
from allocator import return_freed_memory

from leantrain.parallel.world import World
from leantrain.parallel.wrap import build_engine
from leantrain.nn.loss import LanguageModelLoss
from leantrain.optim.build import build_optimizer
from leantrain.trainer.config import load_config
from leantrain.trainer.estimate import check_fits, format_bytes, measure, vocab_size_of
from leantrain.trainer.train import build_model, materialize_model, micro_batch

SETTINGS = ["trainer.device=cpu", "trainer.micro_batch_size=1", "trainer.global_batch_size=1", "data.seq_len=256",
            "optim.svd=randomized"]
STEPS = 3


def peak_rss() -> int:
    """The process's peak resident set in bytes: VmHWM, else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="7b")
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure two steps under the profiler against the estimate (default: not for 7b)")
    parser.add_argument("--return-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc unmaps every freed allocation of 1 MiB or more (benchmarks/allocator.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.return_freed_memory:
        return_freed_memory()
    cfg = load_config("galore_7b", [*SETTINGS, f"model.preset={args.preset}", *args.overrides])
    print(f"`python benchmarks/fit.py --preset {args.preset}`: torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; galore_7b with {' '.join(SETTINGS + args.overrides)}", flush=True)

    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    torch.manual_seed(cfg.trainer.seed)
    start = time.perf_counter()
    est = check_fits(cfg, 1, world.device)  # the trainer's refusal: UserError with the plan when it does not fit
    print(f"estimate: {format_bytes(est.device_peak)} at {est.peak_phase} ({time.perf_counter() - start:.0f} s)",
          flush=True)

    start = time.perf_counter()
    model = build_model(cfg, vocab_size_of(cfg))
    loss_module = LanguageModelLoss(model, cfg.loss)
    engine = build_engine(loss_module, model, cfg.parallel, world, lambda: build_optimizer(cfg.optim, model, cfg.trainer.seed),
                          grad_clip=cfg.trainer.grad_clip, micro_batch_size=1, accumulation_steps=1,
                          materialize=lambda: materialize_model(cfg, model, world.device))
    print(f"model: {model.num_params() / 1e6:.1f}M parameters in {next(model.parameters()).dtype}, built in "
          f"{time.perf_counter() - start:.0f} s; peak RSS so far {format_bytes(peak_rss())}", flush=True)

    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    vocab = model.head_weight.shape[0]
    for step in range(1, STEPS + 1):
        start = time.perf_counter()
        tokens = torch.randint(vocab, (1, cfg.data.seq_len + 1), generator=generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss = micro_batch(cfg, engine, inputs, targets, None, 1.0 / targets.numel(), 1, is_last=True)
        engine.step()
        engine.zero_grad()
        mean = loss.item() / targets.numel()
        print(f"step {step}: loss {mean:.4f} ({'finite' if torch.isfinite(loss) else 'NOT FINITE'}), "
              f"{time.perf_counter() - start:.0f} s, peak RSS {format_bytes(peak_rss())}", flush=True)
    rss = peak_rss()
    print(f"peak RSS of {STEPS} steps: {format_bytes(rss)} ({rss / 2**30:.2f} GiB); estimate {format_bytes(est.device_peak)}")

    if args.measure if args.measure is not None else args.preset != "7b":
        del engine, loss_module, model
        measured = measure(cfg)
        print(f"measured peak (torch.profiler allocator events, 2 steps): {format_bytes(measured['peak'])}; "
              f"estimate / measured = {est.device_peak / measured['peak']:.3f}")


if __name__ == "__main__":
    main()
