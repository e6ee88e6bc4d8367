"""GaLore's memory table beside ``leantrain estimate`` for the same settings.

    python benchmarks/galore_memory.py            # about a minute on 2 cores; no data, no weights allocated

The GaLore paper (Zhao et al. 2024, Table 2; shared/REFERENCE.md) gives a "memory estimate of BF16
weights plus optimizer states" for LLaMA 60M, 130M, 350M and 1B, full-rank (Adam) and GaLore at
ranks 128, 256, 256 and 512. For each, this script runs ``leantrain.trainer.estimate.estimate`` on
the preset (vocab 32000, untied head) with ``optim.name=adamw`` or ``optim.name=galore`` at the
paper's rank (scale 0.25, gap 200, ``proj_type=std``, the attention and MLP matrices projected;
embeddings, norms and head dense) and reports its ``bf16_weights_and_state``: 2 bytes times the
elements of every parameter and of every non-scalar optimizer state tensor (Adam's two moments; for
GaLore the low-rank moments, the projection bases and the dense parameters' moments), the same
accounting as the paper. leantrain itself keeps fp32 weights and state (4 bytes each); the full
plan of a run is ``leantrain estimate``'s other figures. G is 2^30 bytes (GiB); the 1e9 figure is
given too, since the paper does not say which it uses.
"""

import os
import platform
import sys

import torch

from leantrain.trainer.config import load_config
from leantrain.trainer.estimate import estimate

# preset -> (GaLore rank, paper full-rank G, paper GaLore G)
PAPER = {"60m": (128, 0.36, 0.24), "130m": (256, 0.76, 0.52), "350m": (256, 2.06, 1.22), "1b": (512, 7.80, 4.38)}
SETTINGS = ["model.vocab_size=32000", "data.seq_len=64", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
            "optim.scale=0.25", "optim.update_proj_gap=200", "optim.proj_type=std"]


def bf16_bytes(preset: str, optimizer: str, rank: int) -> tuple[int, int]:
    """(bf16 weights + state bytes, parameters) from leantrain's estimate of ``preset`` with ``optimizer``."""
    cfg = load_config("quickstart", [f"model.preset={preset}", f"optim.name={optimizer}", f"optim.rank={rank}",
                                     *SETTINGS])
    est = estimate(cfg)
    return est.bf16_weights_and_state["total"], est.run["parameters"]


def main() -> None:
    print(f"`python benchmarks/galore_memory.py`: torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| model | parameters | rank | full-rank: paper | full-rank: leantrain GiB (GB) "
          "| GaLore: paper | GaLore: leantrain GiB (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset, (rank, paper_full, paper_galore) in PAPER.items():
        full, params = bf16_bytes(preset, "adamw", rank)
        galore, _ = bf16_bytes(preset, "galore", rank)
        print(f"| {preset} | {params / 1e6:.1f}M | {rank} | {paper_full:.2f}G | {full / 2**30:.2f} ({full / 1e9:.2f}) "
              f"| {paper_galore:.2f}G | {galore / 2**30:.2f} ({galore / 1e9:.2f}) |", flush=True)
        print(f"{preset} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
