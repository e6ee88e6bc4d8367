"""Configuration of data parallelism (the ``parallel`` section)."""

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    backend: str = "ddp"
    """Data-parallel engine: ddp. Single-process runs use no wrapper."""
    ddp_bucket_mb: int = 25
    """DDP gradient bucket size in MiB."""
