"""MoE through the trainer: global balancing gives the same loss on 2 ranks as on 1."""

import json

import pytest

from support import run_leantrain

pytestmark = pytest.mark.slow


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def test_global_balance_two_ranks_equal_one_rank_micro_does_not(tiny_overrides, tmp_path):
    moe = ["moe.num_experts=4", "moe.top_k=2", "moe.lbl_coef=0.5", "trainer.max_steps=5", "trainer.global_batch_size=8"]
    results = {}
    for balance in ("global", "micro"):
        one, two = tmp_path / f"{balance}1", tmp_path / f"{balance}2"
        r1 = run_leantrain(["train", "quickstart", *tiny_overrides, *moe, f"moe.balance={balance}",
                            "trainer.micro_batch_size=4", f"trainer.run_dir={one}"])
        assert r1.returncode == 0, r1.stderr
        r2 = run_leantrain(["quickstart", *tiny_overrides, *moe, f"moe.balance={balance}",
                            "trainer.micro_batch_size=2", f"trainer.run_dir={two}"], torchrun_nproc=2)
        assert r2.returncode == 0, r2.stderr
        results[balance] = (losses(one), losses(two))
    one, two = results["global"]
    for step in range(1, 6):
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5), step
        assert one[step]["moe/lbl"] == pytest.approx(two[step]["moe/lbl"], rel=1e-5), step
    one, two = results["micro"]
    assert any(abs(one[s]["loss"] - two[s]["loss"]) > 1e-5 * abs(one[s]["loss"]) for s in range(2, 6))
