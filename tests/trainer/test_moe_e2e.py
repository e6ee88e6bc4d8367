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


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["leantrain", "hf_qwen2_moe"])
def test_domains_report_specialisation_and_two_ranks_equal_one(model, tiny_overrides, prose_glob, tmp_path):
    """Global balancing of our MoE model or a model.hf Qwen2-MoE on two domains: the balance metrics every step,
    per-domain validation loss and routing concentration at each evaluation, the same on 2 ranks as on 1."""
    from transformers import Qwen2MoeConfig

    corpus = next(o for o in tiny_overrides if o.startswith("data.path=")).split("=", 1)[1]
    overrides = [o for o in tiny_overrides if not o.startswith("data.path=")]
    overrides += [f"data.domains.code={corpus}", f"data.domains.prose={prose_glob}", "moe.balance=global",
                  "moe.lbl_coef=0.5", "trainer.max_steps=4", "trainer.eval_interval=2"]
    if model == "hf_qwen2_moe":
        hf_dir = tmp_path / "qwen2_moe"
        Qwen2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64).save_pretrained(hf_dir)
        overrides.append(f"model.hf={hf_dir}")
    else:
        overrides += ["moe.num_experts=4", "moe.top_k=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_leantrain(["train", "quickstart", *overrides, "trainer.micro_batch_size=4", f"trainer.run_dir={one}"])
    assert r1.returncode == 0, r1.stderr
    r2 = run_leantrain(["quickstart", *overrides, "trainer.micro_batch_size=2", f"trainer.run_dir={two}"],
                       torchrun_nproc=2)
    assert r2.returncode == 0, r2.stderr

    logged = records(one)
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"moe/lbl", "moe/z_loss", "moe/layer0/lbl", "moe/layer1/lbl", "moe/layer1/max_load"} <= r.keys()
        assert r["moe/lbl"] == pytest.approx((r["moe/layer0/lbl"] + r["moe/layer1/lbl"]) / 2)
    evals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        # Each domain gets the same batches, hence the same tokens: the overall loss is the mean of the two.
        assert r["val_loss"] == pytest.approx((r["val_loss/code"] + r["val_loss/prose"]) / 2)
        for domain in ("code", "prose"):
            per_layer = [r[f"val_moe/layer{i}/concentration/{domain}"] for i in (0, 1)]
            assert all(0.5 <= c <= 1 for c in per_layer)  # top-2 of 4 experts: 0.5 when spread evenly
            assert r[f"val_moe/concentration/{domain}"] == pytest.approx(sum(per_layer) / 2)

    for a, b in zip(logged, records(two)):
        assert a.keys() == b.keys()
        # moe/z_loss is rank 0's own micro-batches'; the LBL, loads and every validation figure are global.
        for key in a.keys() - {"lr", "grad_norm", "tokens_per_s", "optim_state_bytes", "moe/z_loss"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
