"""Checkpointing every step: what it costs the training loop, for torch.save, DCP async_save and leantrain.

One model (a preset of leantrain.nn.model.PRESETS, vocabulary 32000) trains with torch.optim.AdamW
on CPU on a fixed random batch. Each way of checkpointing gets a segment of timed steps with a
checkpoint after every step, and the segments alternate over the repeats, so that load from other
processes falls on all of them alike:

- ``none``: no checkpoint, the throughput reference;
- ``torch.save``: model and optimizer state dicts to one file, synchronously;
- ``dcp-thread`` / ``dcp-process``: ``torch.distributed.checkpoint.async_save`` (thread and
  process executors): it stages a copy of the state in host memory, then writes in the background;
  a save still running when the next one is due is waited for;
- ``ours``: ``checkpoint.mode=lazy``, a snapshot into the node keeper's host memory every step
  (level 1); ``ours+disk`` also streams every snapshot to disk (level 2) from the keeper.

The stall of a checkpoint is the time the training thread spends in the checkpoint calls (for ours:
``after_step``, ``wait_before_step`` and the optimizer's pre-hook), per checkpoint. Throughput is
tokens per second over the timed steps, checkpoint costs included; the work still in flight after
a segment's last step (which a longer run would overlap with its next steps) finishes untimed, for
every mode alike. Then the erasure-coding encode rate (GB/s of snapshot encoded, one thread) of
ours, zfec and pyeclib (ISA-L, Cauchy) on the same snapshot bytes, for m = 1 (ours: XOR) and m > 1.

Memory: the training state, plus per checkpointing mode one or two copies of the model + AdamW
state (4.4 GB at 350m): all modes at 350m need about 40 GB; ``--modes`` runs a subset.

    python benchmarks/checkpoint.py                    # 350m, every mode
    python benchmarks/checkpoint.py --preset 130m --modes none,torch.save,dcp-thread,dcp-process,ours
"""

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from leantrain.checkpoint.config import CheckpointConfig
from leantrain.checkpoint.erasure import make_codec
from leantrain.checkpoint.manager import Checkpointer
from leantrain.checkpoint.parity import encode_stripe, fragment
from leantrain.checkpoint.snapshot import flatten, plan_snapshot
from leantrain.nn.config import ModelConfig
from leantrain.nn.loss import LanguageModelLoss
from leantrain.nn.model import PRESETS, Transformer, resolve_model_config

MODES = ("none", "torch.save", "dcp-thread", "dcp-process", "ours", "ours+disk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="350m", choices=[p for p in PRESETS if p != "tiny"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per segment")
    parser.add_argument("--repeats", type=int, default=2, help="segments per mode, interleaved")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dir", default="", help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--ec-k", type=int, default=4)
    parser.add_argument("--ec-m", type=int, default=2)
    parser.add_argument("--ec-mb", type=int, default=1024, help="encode at most this many MB of the snapshot")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    return parser.parse_args(argv)


class Training:
    """The model, AdamW and one batch; ``step`` is forward, backward, checkpoint wait, optimizer step."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        cfg = resolve_model_config(ModelConfig(preset=args.preset), 32000, args.seq_len)
        self.model = Transformer(cfg)
        self.loss = LanguageModelLoss(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.tokens = self.targets.numel()
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16"
                         else contextlib.nullcontext())
        self.step_count = 0

    def step(self, wait) -> None:
        with self.autocast:
            loss = self.loss(self.inputs, self.targets) / self.tokens
        loss.backward()
        wait()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

    def state_bytes(self) -> int:
        _, tensors = flatten({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        return sum(t.nbytes for t in tensors)


class NoCheckpoint:
    def __init__(self, training: Training, directory: Path) -> None:
        self.training = training

    def wait(self) -> None:
        pass

    def save(self) -> None:
        pass

    def finish(self) -> None:
        pass


class TorchSave(NoCheckpoint):
    def __init__(self, training: Training, directory: Path) -> None:
        super().__init__(training, directory)
        self.path = directory / "torch_save.pt"

    def save(self) -> None:
        t = self.training
        torch.save({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict()}, self.path)


class DcpAsync(NoCheckpoint):
    """DCP async_save into two alternating directories; at most one save in flight."""

    def __init__(self, training: Training, directory: Path, executor: str) -> None:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        super().__init__(training, directory)
        self.kind = AsyncCheckpointerType(executor)
        self.directory = directory / f"dcp_{executor}"
        self.future = None

    def save(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.future is not None:
            self.future.result()
        model_state, optimizer_state = get_state_dict(self.training.model, self.training.optimizer)
        target = self.directory / f"slot_{self.training.step_count % 2}"
        self.future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target,
                                     async_checkpointer_type=self.kind)

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None


class Ours(NoCheckpoint):
    """checkpoint.mode=lazy: a snapshot into the keeper's memory every step; to disk too if ``disk``."""

    def __init__(self, training: Training, directory: Path, disk: bool) -> None:
        super().__init__(training, directory)
        cfg = CheckpointConfig(mode="lazy", memory_interval=1, interval=1 if disk else 0, keep=1,
                               keeper_idle_s=60.0, keeper_timeout_s=600.0)
        self.checkpointer = Checkpointer(cfg, directory / ("ours_disk" if disk else "ours"), {"benchmark": 1})
        self.states = {"model": training.model, "optimizer": training.optimizer}
        self.checkpointer.restore(self.states, {})

    @property
    def stall_s(self) -> float:
        return self.checkpointer.stats.stall_s

    def wait(self) -> None:
        self.checkpointer.wait_before_step()

    def save(self) -> None:
        self.checkpointer.after_step(self.training.step_count, self.states, {})

    def finish(self) -> None:
        self.checkpointer.flush()

    def close(self) -> None:
        self.checkpointer.close(shutdown_keeper=True)


def run_segment(training: Training, mode: NoCheckpoint, steps: int) -> tuple[float, float]:
    """(tokens/s, stall per checkpoint in s) over ``steps`` steps with a checkpoint after each.

    As in a long run, each checkpoint overlaps with the steps after it and any wait for the one
    before is counted; what is still in flight after the last timed step is finished untimed.
    """
    ours = isinstance(mode, Ours)
    stall, ours_before = 0.0, mode.stall_s if ours else 0.0
    started = time.perf_counter()
    for _ in range(steps):
        training.step(mode.wait)
        saving = time.perf_counter()
        mode.save()
        stall += time.perf_counter() - saving
    elapsed = time.perf_counter() - started
    if ours:  # after_step, wait_before_step and the optimizer hook, as the checkpointer measured them
        stall = mode.stall_s - ours_before
    mode.finish()
    return training.tokens * steps / elapsed, stall / steps


def snapshot_bytes(training: Training, limit: int) -> bytearray:
    """The model and optimizer state laid out as one rank's snapshot (what the keeper encodes)."""
    flat = {"replicated": flatten({"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict()}),
            "per_rank": flatten({})}
    held = {"replicated": [True] * len(flat["replicated"][1]), "per_rank": []}
    plan = plan_snapshot(training.step_count, {"rank": 0}, flat, held)
    buffer = bytearray(plan.nbytes)
    view = torch.frombuffer(buffer, dtype=torch.uint8)
    view[: len(plan.prefix)] = torch.frombuffer(bytearray(plan.prefix), dtype=torch.uint8)
    for source, offset in plan.copies:
        view[offset : offset + source.nbytes].view(source.dtype).view(source.shape).copy_(source)
    return buffer[:limit] if limit < len(buffer) else buffer


def encode_rates(blob: bytearray, k: int, m: int) -> dict[str, float]:
    """GB/s of ``blob`` encoded into m parity blocks of its k fragments: ours, zfec, pyeclib."""
    import zfec
    from pyeclib.ec_iface import ECDriver

    data = [fragment(blob, k, index) for index in range(k)]
    total = sum(len(block) for block in data)
    codec = make_codec(k, m, "zfec")
    encoder = zfec.Encoder(k, k + m)
    driver = ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
    joined = b"".join(data)
    runs = {
        "ours": lambda: encode_stripe(codec, data),
        "zfec": lambda: encoder.encode(data, list(range(k, k + m))),
        "pyeclib isa_l_rs_cauchy": lambda: driver.encode(joined),
    }
    rates = {}
    for name, run in runs.items():
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        rates[name] = total / best / 1e9
    return rates


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        sys.exit(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    directory = Path(args.dir or tempfile.mkdtemp(prefix="leantrain-ckpt-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    if any(m.startswith("dcp") for m in modes):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)

    training = Training(args)
    training.step(lambda: None)  # AdamW state exists from here on
    state_gb = training.state_bytes() / 1e9
    print(f"leantrain checkpoint benchmark: {args.preset}, {sum(p.numel() for p in training.model.parameters()):,} "
          f"parameters, model + AdamW state {state_gb:.2f} GB, batch {args.batch} x {args.seq_len}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    factories = {
        "none": lambda: NoCheckpoint(training, directory),
        "torch.save": lambda: TorchSave(training, directory),
        "dcp-thread": lambda: DcpAsync(training, directory, "thread"),
        "dcp-process": lambda: DcpAsync(training, directory, "process"),
        "ours": lambda: Ours(training, directory, disk=False),
        "ours+disk": lambda: Ours(training, directory, disk=True),
    }
    built = {name: factories[name]() for name in modes}
    for name in modes:  # untimed steps first: first-call costs (DCP's process, first touch of the keeper's slots)
        run_segment(training, built[name], 2)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for repeat in range(args.repeats):
        order = modes if repeat % 2 == 0 else list(reversed(modes))
        for name in order:
            results[name].append(run_segment(training, built[name], args.steps))
            detail = ""
            if isinstance(built[name], Ours):
                stats = built[name].checkpointer.stats
                detail = (f" (so far: waits {stats.wait_s:.2f} s, settling {stats.settle_s:.2f} s, "
                          f"backpressure {stats.backpressure_s:.2f} s)")
            print(f"  repeat {repeat}: {name:12s} {results[name][-1][0]:9.1f} tokens/s, "
                  f"stall {results[name][-1][1] * 1e3:9.1f} ms{detail}", file=sys.stderr, flush=True)

    # Throughput against no checkpoint: the median of per-repeat ratios, each between segments run
    # back to back, moves least with the load of a shared machine.
    print(f"\n| checkpoint every step | stall per checkpoint (ms) | tokens/s | vs no checkpoint |")
    print("|---|---|---|---|")
    for name in modes:
        speed = statistics.median(r[0] for r in results[name])
        stall = statistics.median(r[1] for r in results[name])
        ratio = (statistics.median(r[0] / n[0] for r, n in zip(results[name], results["none"]))
                 if "none" in results else float("nan"))
        print(f"| {name} | {stall * 1e3:.1f} | {speed:.1f} | {ratio:.1%} |")
    if "ours" in results:
        ours = statistics.median(r[1] for r in results["ours"])
        for other in ("torch.save", "dcp-thread", "dcp-process"):
            if other in results:
                ratio = statistics.median(r[1] for r in results[other]) / max(ours, 1e-9)
                print(f"ours stalls {ratio:.0f}x less than {other}")
    for mode in built.values():
        if isinstance(mode, Ours):
            mode.close()

    blob = snapshot_bytes(training, args.ec_mb << 20)
    print(f"\nerasure-coding encode of {len(blob) / 1e9:.2f} GB of the snapshot, one thread (GB/s)")
    print("| k, m | ours (XOR for m = 1, else zfec) | zfec | pyeclib isa_l_rs_cauchy |")
    print("|---|---|---|---|")
    for k, m in ((args.ec_k, 1), (args.ec_k, args.ec_m)):
        rates = encode_rates(blob, k, m)
        print(f"| {k}, {m} | " + " | ".join(f"{rate:.2f}" for rate in rates.values()) + " |")
    if dist.is_initialized():
        dist.destroy_process_group()
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
