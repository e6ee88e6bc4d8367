"""Checkpointing: atomic disk saves, lazy host-memory snapshots, per-node keepers and erasure coding.

``Checkpointer`` (manager.py) is what the trainer drives: ``restore`` at start, ``wait_before_step``
before each optimizer step, ``after_step`` after it. ``checkpoint.mode: sync`` writes to disk while
training waits; ``lazy`` snapshots to host memory in the background (DataStates-LLM), streams the
snapshots to disk and optionally a second directory, and protects them across nodes with erasure
coding (REFT). What is saved is any dict of objects with ``state_dict``/``load_state_dict``.
"""

from .config import CheckpointConfig, ErasureConfig
from .disk import CheckpointError
from .manager import Checkpointer

__all__ = ["Checkpointer", "CheckpointConfig", "ErasureConfig", "CheckpointError"]
