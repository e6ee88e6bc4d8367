"""Cut cross-entropy on a CUDA GPU: ours (Triton and torch paths) against Apple's cut-cross-entropy.

For each shape (Gemma 2 2B: N=8192, D=2304, V=256000; Llama 3: N=8192, D=2048, V=128256; bf16) and
each loss, one forward + backward: the peak of ``torch.cuda.max_memory_allocated`` above the memory
held before the step (inputs only), the same minus the two gradient buffers any method returns, the
median time over repeats (CUDA events, after warm-up steps that include compilation), and the largest
error of dC against the naive loss's, relative to its largest entry.

Losses: the naive ``F.cross_entropy((e @ c.T).float(), t)``; ours with ``impl="triton"`` (exact, and
with ``filter_eps="auto"``) and ``impl="torch"``; torch's ``F.linear_cross_entropy`` with its chunked
``LinearCrossEntropyOptions()``, where this torch has it; Apple's ``cut_cross_entropy.linear_cross_entropy``
with ``impl="cce"`` (filtering on, its default) and ``"cce_kahan_full_c"``, when that package is
installed (``pip install cut-cross-entropy``). The paper's A100 figures for the Gemma shape are in
shared/REFERENCE.md: CCE 1164 MB / 135 ms, naive 28000 MB / 207 ms.

    python benchmarks/cce_gpu.py
    python benchmarks/cce_gpu.py --shapes llama3 --repeats 20
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from leantrain.nn.cut_ce import linear_cross_entropy

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 2048, 128256)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gemma2,llama3", help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per loss")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per loss (compilation, autotuning)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def naive_loss(e, c, t):
    return F.cross_entropy((e @ c.T).float(), t)


def losses() -> dict:
    table = {
        "naive": naive_loss,
        "ours triton": lambda e, c, t: linear_cross_entropy(e, c, t, impl="triton"),
        "ours triton, filter auto": lambda e, c, t: linear_cross_entropy(e, c, t, impl="triton", filter_eps="auto"),
        "ours torch": lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch"),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        # torch's own: chunked over the rows (options given), the logits never whole.
        table["torch F.linear_cross_entropy, chunked"] = lambda e, c, t: F.linear_cross_entropy(
            e, c, t, options=torch.nn.LinearCrossEntropyOptions())
    else:
        print(f"torch {torch.__version__} has no chunked torch.nn.functional.linear_cross_entropy: its row is left out")
    try:
        from cut_cross_entropy import linear_cross_entropy as apple_lce
    except ImportError:
        print("cut_cross_entropy is not installed: Apple's rows are left out (pip install cut-cross-entropy)")
        return table
    table["apple cce"] = lambda e, c, t: apple_lce(e, c, t, impl="cce")
    table["apple cce_kahan_full_c"] = lambda e, c, t: apple_lce(e, c, t, impl="cce_kahan_full_c")
    return table


def measure(loss_fn, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Peak extra memory and median time of forward + backward; the last step's dC."""
    for _ in range(warmup):
        e.grad = c.grad = None
        loss_fn(e, c, targets).backward()
    times = []
    peak = 0
    for _ in range(repeats):
        e.grad = c.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = loss_fn(e, c, targets)
        loss.backward()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
    dc = c.grad
    e.grad = c.grad = None
    return {"ms": statistics.median(times), "peak": peak, "loss": loss.item(), "dc": dc}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cce_gpu.py needs a CUDA GPU; use benchmarks/cce.py on CPU")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    table = losses()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, forward + backward, "
          f"median of {args.repeats}\n")
    print("| shape | loss | peak extra (MB) | beyond gradients (MB) | time (ms) | dC error vs naive |")
    print("|---|---|---|---|---|---|")
    for shape in [s for s in args.shapes.split(",") if s]:
        n, d, v = SHAPES[shape]
        torch.manual_seed(args.seed)
        e = (torch.randn(n, d, device="cuda") * d**-0.25).to(dtype).requires_grad_()
        c = (torch.randn(v, d, device="cuda") * d**-0.25).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device="cuda")
        grad_bytes = (e.numel() + c.numel()) * e.element_size()
        reference = None
        for name, loss_fn in table.items():
            try:
                r = measure(loss_fn, e, c, targets, args.warmup, args.repeats)
            except torch.cuda.OutOfMemoryError:
                print(f"| {shape} | {name} | out of memory | | | |")
                torch.cuda.empty_cache()
                continue
            except Exception as error:  # noqa: BLE001 - one loss failing (a kernel that does not compile) keeps the others
                print(f"| {shape} | {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} | | | |",
                      flush=True)
                e.grad = c.grad = None
                torch.cuda.empty_cache()
                continue
            if name == "naive":
                reference = r["dc"].float()
            err = "-" if reference is None else \
                f"{((r['dc'].float() - reference).abs().max() / reference.abs().max()).item():.1e}"
            print(f"| {shape} | {name} | {r['peak'] / 1e6:.0f} | {(r['peak'] - grad_bytes) / 1e6:.0f} | {r['ms']:.1f} "
                  f"| {err} |", flush=True)
            del r
            torch.cuda.empty_cache()
        del e, c, targets, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
