"""bf16 weights end to end: 8-bit GaLore per layer trains, resumes bit for bit, and exports bf16 safetensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import run_leantrain

pytestmark = pytest.mark.slow

BF16 = ["model.param_dtype=bf16", "trainer.dtype=bf16", "optim.name=galore", "optim.rank=16", "optim.state_bits=8",
        "optim.update_proj_gap=4", "optim.layerwise=true", "trainer.grad_clip=0", "trainer.global_batch_size=4",
        "trainer.max_steps=8", "checkpoint.interval=4", "trainer.eval_interval=0"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_bf16_run_resumes_bitwise_and_exports_bf16(tiny_overrides, tmp_path):
    straight, split, export = tmp_path / "straight", tmp_path / "split", tmp_path / "export"
    common = [*tiny_overrides, *BF16]
    result = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={straight}"])
    assert result.returncode == 0, result.stderr
    first = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}", "trainer.stop_at_step=4"])
    assert first.returncode == 0, first.stderr
    second = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}"])
    assert second.returncode == 0, second.stderr
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in a.values())
    for name in a:
        assert a[name].equal(b[name]), name
    assert losses(straight) == losses(split) and all(map(torch.isfinite, map(torch.tensor, losses(straight).values())))

    exported = run_leantrain(["export", str(straight), "--out", str(export)])
    assert exported.returncode == 0, exported.stderr
    weights = load_file(export / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert weights["model.tok_embeddings.weight"].equal(a["tok_embeddings.weight"])
