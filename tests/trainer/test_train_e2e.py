"""End-to-end runs through the CLI, as a user launches them."""

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import run_leantrain

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its content hash, to prove nothing was touched."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_clean_failure(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("leantrain: error")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_writes_config_metrics_checkpoints_and_final(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    result = run_leantrain(["train", "quickstart", *tiny_overrides, "checkpoint.interval=5"])
    assert result.returncode == 0, result.stderr
    records = metrics(run)
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 11))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "optim_state_bytes"):
        assert key in logged[-1]
    # AdamW: two fp32 moments per parameter, plus a 4-byte step counter per tensor.
    n_params = int(re.search(r"([\d,]+) parameters", result.stdout).group(1).replace(",", ""))
    assert all(8 * n_params < r["optim_state_bytes"] < 8 * n_params + 4 * 100 for r in logged)
    assert logged[-1]["tokens_seen"] == 10 * 8 * 32
    assert "val_loss" in logged[4] and "val_loss" in logged[9]
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "step_10").is_dir() and (run / "checkpoints" / "step_5").is_dir()
    assert "model.safetensors" in {p.name for p in (run / "final").iterdir()}


def test_progress_bar_and_offline_wandb(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    result = run_leantrain(["train", "quickstart", *tiny_overrides, "trainer.max_steps=3", "logging.progress=true",
                            "logging.wandb.mode=offline"])
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr and "3/3" in result.stderr
    assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert (run / "tokenizer.json").is_file()


def test_resume_is_bitwise_identical(tiny_overrides, tmp_path):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    common = [*tiny_overrides, "trainer.max_steps=20", "checkpoint.interval=5"]
    assert run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={straight}"]).returncode == 0
    first = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}", "trainer.stop_at_step=10"])
    assert first.returncode == 0, first.stderr
    assert not (split / "final").exists()
    second = run_leantrain(["train", "quickstart", *common, f"trainer.run_dir={split}"])
    assert second.returncode == 0, second.stderr
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
    assert step_losses(straight) == step_losses(split)
    assert {"event": "resume", "step": 10, "source": "disk"} in metrics(split)


def assert_two_ranks_match_one(common: list[str], two_rank_micro_batch: int, one: Path, two: Path,
                               steps: int) -> None:
    """Train ``common`` in one process (micro-batch 8) and on 2 ranks; the logged losses agree to 1e-5."""
    r1 = run_leantrain(["train", "quickstart", *common, "trainer.micro_batch_size=8", f"trainer.run_dir={one}"])
    assert r1.returncode == 0, r1.stderr
    r2 = run_leantrain(["quickstart", *common, f"trainer.micro_batch_size={two_rank_micro_batch}",
                        f"trainer.run_dir={two}"], torchrun_nproc=2)
    assert r2.returncode == 0, r2.stderr + r2.stdout
    l1, l2 = step_losses(one), step_losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    for step in l1:
        assert abs(l1[step] - l2[step]) <= 1e-5 * abs(l1[step]), (step, l1[step], l2[step])


def test_ddp_two_ranks_match_one_rank_with_double_micro_batch(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "trainer.max_steps=5", "trainer.global_batch_size=8"]
    assert_two_ranks_match_one(common, 4, tmp_path / "one", tmp_path / "two", steps=5)


def test_unknown_key_in_file_fails_cleanly(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  rnak: 8\n")
    assert_clean_failure(run_leantrain(["train", str(config)]), "optim.rnak", str(config))


def test_wrong_type_fails_cleanly(tiny_overrides):
    assert_clean_failure(run_leantrain(["train", "quickstart", *tiny_overrides, "optim.lr=fast"]),
                         "optim.lr", "command line")


def test_missing_data_fails_cleanly(tiny_overrides, tmp_path):
    result = run_leantrain(["train", "quickstart", *tiny_overrides, f"data.path={tmp_path}/nothing/*.txt"])
    assert_clean_failure(result, "data.path")
    assert not (tmp_path / "run").exists()


def test_other_runs_checkpoints_are_refused_and_untouched(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    assert run_leantrain(["train", "quickstart", *tiny_overrides, "checkpoint.interval=5"]).returncode == 0
    before = snapshot(run)
    result = run_leantrain(["train", "quickstart", *tiny_overrides, "checkpoint.interval=5", "optim.lr=0.05"])
    assert_clean_failure(result, "optim.lr", str(run))
    assert snapshot(run) == before


def test_truncated_checkpoint_fails_cleanly_and_untouched(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    common = [*tiny_overrides, "checkpoint.interval=5", "checkpoint.keep=1", "trainer.max_steps=20"]
    assert run_leantrain(["train", "quickstart", *common, "trainer.stop_at_step=5"]).returncode == 0
    step = run / "checkpoints" / "step_5"
    shard = max((p for p in step.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(run)
    result = run_leantrain(["train", "quickstart", *common, f"checkpoint.resume={step}"])
    assert_clean_failure(result, shard.name)
    assert snapshot(run) == before
    result = run_leantrain(["train", "quickstart", *common])  # auto: no good checkpoint left to resume from
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert snapshot(run) == before


def test_hf_llama_trains_resumes_and_exports(tiny_overrides, tmp_path):
    from transformers import LlamaConfig

    hf_dir = tmp_path / "llama"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(hf_dir)
    run = tmp_path / "run"
    common = ["train", "quickstart", *tiny_overrides, f"model.hf={hf_dir}", "trainer.max_steps=6",
              "checkpoint.interval=3"]
    first = run_leantrain([*common, "trainer.stop_at_step=3"])
    assert first.returncode == 0, first.stderr
    second = run_leantrain(common)
    assert second.returncode == 0, second.stderr
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    exported = tmp_path / "export"
    result = run_leantrain(["export", str(run), "--out", str(exported)])
    assert result.returncode == 0, result.stderr
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    final = load_file(run / "final" / "model.safetensors")
    state = model.state_dict()
    for name, tensor in final.items():
        assert torch.equal(state[name], tensor), name


def test_plot_two_runs(tiny_overrides, tmp_path):
    runs = []
    for lr in ("1e-3", "3e-3"):
        run = tmp_path / f"lr{lr}"
        assert run_leantrain(["train", "quickstart", *tiny_overrides, f"optim.lr={lr}", "trainer.max_steps=5",
                              f"trainer.run_dir={run}"]).returncode == 0
        runs.append(str(run))
    out = tmp_path / "plots" / "loss.png"
    result = run_leantrain(["plot", *runs, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    missing = run_leantrain(["plot", str(tmp_path / "nope"), "--out", str(out)])
    assert_clean_failure(missing, "nope")


def test_lisa_under_ddp_matches_one_rank(tiny_overrides, tmp_path):
    """LISA freezes blocks between switches: DDP must skip their gradients and keep both ranks identical.

    The logged loss sums both ranks' halves of the batch, so a rank whose weights drifted (a re-enabled
    block reduced on one rank only, say) would show in it; rank 0's final weights are compared as well.
    """
    from leantrain.optim.lisa import sample_layers

    one, two = tmp_path / "one", tmp_path / "two"
    common = [*tiny_overrides, "model.n_layers=4", "optim.name=lisa", "optim.lisa.n_layers=1", "optim.lisa.interval=2",
              "trainer.max_steps=6", "trainer.global_batch_size=8", "trainer.eval_interval=0", "trainer.seed=0"]
    assert len({tuple(sample_layers(4, 1, 0, k)) for k in range(3)}) > 1, "the active block never changes"
    # Micro-batches of 2 on 2 ranks: 2 accumulation steps, so no_sync windows are crossed as well.
    assert_two_ranks_match_one(common, 2, one, two, steps=6)
    a = load_file(one / "final" / "model.safetensors")
    b = load_file(two / "final" / "model.safetensors")
    for name in a:  # Adam's normalised step can turn the reduction's rounding into a sliver of one lr step
        assert (a[name] - b[name]).abs().max() <= 1e-4, name
    # The state follows the active block: freed at each switch (steps 2, 4, 6), rebuilt at the next step.
    state = {r["step"]: r["optim_state_bytes"] for r in metrics(two) if "loss" in r}
    assert state == {r["step"]: r["optim_state_bytes"] for r in metrics(one) if "loss" in r}
    assert state[2] < state[1] and state[3] == state[1]


@pytest.mark.parametrize("optimizer", [
    ["optim.name=galore", "optim.rank=8", "optim.update_proj_gap=2"],
    ["optim.name=natural_galore", "optim.rank=8", "optim.update_proj_gap=2"],
    pytest.param(["optim.name=apollo", "optim.rank=8", "optim.update_proj_gap=2", "checkpoint.interval=3"],
                 marks=pytest.mark.skipif(importlib.util.find_spec("apollo_torch") is None,
                                          reason="apollo-torch (the dev extra) is not installed"), id="apollo"),
    ["optim.name=galore", "optim.rank=8", "optim.layerwise=true", "optim.layerwise_clip=1.0", "trainer.grad_clip=0"],
    ["optim.name=frugal", "optim.frugal.update_gap=2"],
    ["optim.name=lisa", "optim.lisa.n_layers=1", "optim.lisa.interval=2"],
    ["optim.name=adamw", "optim.offload=interleaved", "optim.offload_subgroup_size=5000"],
], ids=["galore", "natural_galore", "apollo", "galore_layerwise", "frugal", "lisa", "offload"])
def test_every_optimizer_trains_through_the_cli(tiny_overrides, tmp_path, optimizer):
    result = run_leantrain(["train", "quickstart", *tiny_overrides, *optimizer, "trainer.max_steps=6",
                            "optim.lr=3e-3", "trainer.eval_interval=0"])
    assert result.returncode == 0, result.stderr
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    assert all(r["optim_state_bytes"] > 0 for r in metrics(tmp_path / "run") if "loss" in r)
