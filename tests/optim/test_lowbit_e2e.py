"""optim.state_bits=8 through the CLI: a GaLore run with 8-bit moments resumes bit for bit from its checkpoint."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import run_leantrain

pytestmark = pytest.mark.slow


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def test_8bit_galore_run_resumes_bitwise(tiny_overrides, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*tiny_overrides, "optim.name=galore", "optim.rank=16", "optim.update_proj_gap=4",
              "optim.state_bits=8", "trainer.max_steps=10", "checkpoint.interval=5"]
    assert run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={straight}"]).returncode == 0
    first = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}", "trainer.stop_at_step=5"])
    assert first.returncode == 0, first.stderr
    second = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}"])
    assert second.returncode == 0, second.stderr
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    losses = step_losses(straight)
    assert losses == step_losses(split) and len(losses) == 10
