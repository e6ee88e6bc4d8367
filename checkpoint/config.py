"""Configuration of checkpointing (the ``checkpoint`` section)."""

from dataclasses import dataclass, field

MODES = ("sync", "lazy")
EC_LIBRARIES = ("zfec", "pyeclib")


@dataclass
class ErasureConfig:
    k: int = 0
    """lazy: data nodes per erasure-coding group (each group has k + m nodes); 0 disables erasure coding."""
    m: int = 0
    """lazy: parity per group: the snapshots of up to m lost nodes of a group are rebuilt from the others."""
    library: str = "zfec"
    """lazy: Reed-Solomon codec for m >= 2: zfec | pyeclib (ISA-L, Cauchy matrix); m = 1 is plain XOR."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many optimizer steps to <run_dir>/checkpoints/step_N; 0 disables periodic saves."""
    keep: int = 2
    """Number of newest checkpoints kept on disk."""
    resume: str = "auto"
    """auto (newest good checkpoint in run_dir, if any) | never (refuses a used run_dir) | PATH of a step_N dir."""
    mode: str = "sync"
    """sync (training waits for each disk save) | lazy (host-memory snapshots, disk saves streamed from them)."""
    memory_interval: int = 1
    """lazy: snapshot to host memory (level 1) every this many steps; interval must be a multiple of it."""
    host_buffer_mb: int = 0
    """lazy: host memory per rank for its snapshots, in MiB; 0 sizes it for 2 snapshots (3 with erasure coding)."""
    level3_dir: str = ""
    """lazy: also copy every disk checkpoint into this directory (shared storage), in the background; empty: off."""
    ec: ErasureConfig = field(default_factory=ErasureConfig)
    """lazy: erasure coding of the nodes' snapshots across nodes (REFT)."""
    keeper_idle_s: float = 300.0
    """lazy: a node's snapshot keeper exits after this many seconds without a trainer attached."""
    keeper_timeout_s: float = 120.0
    """lazy: how long trainers wait for their keeper, and keepers for their peers, before giving up."""
