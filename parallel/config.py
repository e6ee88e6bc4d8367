"""Configuration of data parallelism (the ``parallel`` section)."""

from dataclasses import dataclass
from typing import Any


@dataclass
class ParallelConfig:
    backend: str = "ddp"
    """Data-parallel engine: ddp | fsdp2 | deepspeed (a single process runs ddp unwrapped)."""
    ddp_bucket_mb: int = 25
    """ddp: gradient bucket size in MiB."""
    fsdp_reshard_after_forward: bool = True
    """fsdp2: free each block's gathered weights after its forward (ZeRO-3); false keeps them (ZeRO-2)."""
    fsdp_cpu_offload: bool = False
    """fsdp2: keep sharded weights, gradients and optimizer state in host memory; the step runs on the CPU."""
    param_dtype: str = "fp32"
    """fsdp2: dtype of the gathered weights in forward and backward: fp32 (as stored) | bf16 (shards stay as stored)."""
    reduce_dtype: str = "fp32"
    """fsdp2: dtype of the gradient reduce-scatter: fp32 | bf16."""
    deepspeed: Any = None
    """deepspeed: DeepSpeed config as an inline mapping or the path of a JSON file; empty: ZeRO stage 2."""
