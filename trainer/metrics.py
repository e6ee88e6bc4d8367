"""Where a run's numbers go: ``<run_dir>/metrics.jsonl``, wandb and the progress bar (rank 0 only)."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """online | offline | disabled."""
    project: str = "leantrain"
    """wandb project name."""
    name: str = ""
    """Run name; empty uses the run directory's name."""


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Write metrics every this many optimizer steps."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _trim_jsonl(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step``: a resumed run logs them again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to wandb and the bar."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, max_steps: int, start_step: int,
                 enabled: bool, run_config: dict[str, Any]):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        _trim_jsonl(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        if cfg.progress:
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.wandb.mode != "disabled":
            import wandb  # imported only when asked for: it is slow to import

            self.wandb_run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or run_dir.name,
                                        mode=cfg.wandb.mode, dir=str(run_dir), config=run_config,
                                        resume="allow", id=f"{run_dir.name}")

    def event(self, record: dict[str, Any]) -> None:
        """Record something that is not a step, e.g. ``{"event": "resume", "step": 10, "source": "disk"}``."""
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is not None:
            shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "val_loss" in record:
                shown["val"] = f"{record['val_loss']:.4f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(record["step"] - self.bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
