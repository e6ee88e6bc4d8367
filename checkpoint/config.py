"""Configuration of checkpointing (the ``checkpoint`` section)."""

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many optimizer steps to <run_dir>/checkpoints/step_N; 0 disables periodic saves."""
    keep: int = 2
    """Number of newest checkpoints kept on disk."""
    resume: str = "auto"
    """auto (newest good checkpoint in run_dir, if any) | never (refuses a used run_dir) | PATH of a step_N dir."""
