"""Data parallelism: the process group, the DDP / FSDP2 / DeepSpeed engines, optimizers on sharded weights.

``shard_optimizer`` is the entry point for one's own FSDP2 loop: it turns a leantrain optimizer built
on ``fully_shard``'s DTensor parameters into the form that steps them.
"""

from .sharded_lowrank import shard_optimizer

__all__ = ["shard_optimizer"]
