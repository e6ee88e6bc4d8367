"""Two-rank gloo runs through the CLI: fsdp2 and DeepSpeed ZeRO-2/3 train as DDP does and resume exactly."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import run_leantrain

pytestmark = pytest.mark.slow

BACKENDS = {
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero2": ["parallel.backend=deepspeed", "parallel.deepspeed.zero_optimization.stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.deepspeed.zero_optimization.stage=3"],
}


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train(overrides: list[str], run_dir: Path) -> Path:
    result = run_leantrain(["quickstart", *overrides, f"trainer.run_dir={run_dir}"], torchrun_nproc=2, timeout=600)  # the first DeepSpeed run builds an op
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return run_dir


@pytest.fixture
def common(tiny_overrides) -> list[str]:
    # 2 accumulation steps per rank, and clipping that bites, so both paths are exercised.
    return [*tiny_overrides, "trainer.global_batch_size=16", "trainer.eval_interval=0", "trainer.grad_clip=0.5",
            "checkpoint.interval=5"]


def assert_close(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


_DDP_LOSSES: dict[int, float] = {}


def ddp_losses(common: list[str], directory: Path) -> dict[int, float]:
    """DDP's 10 logged losses for ``common``, run once for the module (the data cache is the session's)."""
    if not _DDP_LOSSES:
        _DDP_LOSSES.update(step_losses(train(common, directory / "ddp")))
    return _DDP_LOSSES


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_matches_ddp_and_resumes_exactly(backend, common, tmp_path):
    straight = train([*common, *BACKENDS[backend]], tmp_path / "straight")
    losses = step_losses(straight)
    assert_close(ddp_losses(common, tmp_path), losses, rel=1e-4)
    assert (straight / "final" / "model.safetensors").is_file()
    # Resume the same backend from the step-5 checkpoint in a new run directory: steps 6-10 bit for bit.
    step_5 = straight / "checkpoints" / "step_5"
    resumed = train([*common, *BACKENDS[backend], f"checkpoint.resume={step_5}"], tmp_path / "resumed")
    again = step_losses(resumed)
    assert sorted(again) == [6, 7, 8, 9, 10]
    assert {s: losses[s] for s in again} == again
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_galore_fsdp2_matches_galore_ddp(common, tmp_path):
    galore = ["optim.name=galore", "optim.rank=8", "optim.lr=0.01"]
    ddp = step_losses(train([*common, *galore], tmp_path / "ddp"))
    fsdp2 = step_losses(train([*common, *galore, "parallel.backend=fsdp2"], tmp_path / "fsdp2"))
    assert_close(ddp, fsdp2, rel=1e-4)


def test_moe_global_balance_on_fsdp2_and_zero3_matches_ddp(tiny_overrides, tmp_path):
    """MoE blocks with global-batch balancing: the loss and the balance loss agree across backends."""
    moe = [*tiny_overrides, "moe.num_experts=4", "moe.top_k=2", "moe.lbl_coef=0.5", "moe.balance=global",
           "trainer.max_steps=5", "trainer.micro_batch_size=2", "trainer.eval_interval=0"]
    records = {}
    for name, backend in (("ddp", []), ("fsdp2", BACKENDS["fsdp2"]), ("zero3", BACKENDS["zero3"])):
        run = train([*moe, *backend], tmp_path / name)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records[name] = {r["step"]: r for r in lines if "loss" in r}
    for name in ("fsdp2", "zero3"):
        for step in range(1, 6):
            for key in ("loss", "moe/lbl"):
                expected, got = records["ddp"][step][key], records[name][step][key]
                assert abs(expected - got) <= 1e-4 * abs(expected), (name, step, key, expected, got)


def test_fsdp2_galore_resumes_at_one_and_four_ranks(common, tmp_path):
    """Saved by 2 ranks at step 5, resumed by 1 and by 4: steps 6-25 as the 2-rank run's, within 1e-5.

    The global batch stays 16 sequences (4, 2 and 1 accumulation steps); GaLore's left and right
    projections refresh their bases at steps 10 and 20, after the resume.
    """
    run = [*common, "trainer.max_steps=25", "parallel.backend=fsdp2", "optim.name=galore", "optim.rank=8",
           "optim.update_proj_gap=10", "optim.lr=0.01", "checkpoint.keep=5"]
    straight = step_losses(train(run, tmp_path / "straight"))
    step_5 = tmp_path / "straight" / "checkpoints" / "step_5"
    for ranks in (1, 4):
        result = run_leantrain(["quickstart", *run, f"checkpoint.resume={step_5}",
                                f"trainer.run_dir={tmp_path / f'at_{ranks}'}"], torchrun_nproc=ranks, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
        assert f"world size changed from 2 to {ranks}: restoring from the disk checkpoint at step 5" in result.stderr
        resumed = step_losses(tmp_path / f"at_{ranks}")
        assert sorted(resumed) == list(range(6, 26))
        for step, loss in resumed.items():
            assert abs(loss - straight[step]) <= 1e-5, (ranks, step, loss, straight[step])


def test_layerwise_on_ddp_and_fsdp2_matches_one_process(tiny_overrides, tmp_path):
    """Per-layer GaLore with per-parameter clipping: 2 ranks x 2 accumulation steps against 1 process x 4."""
    layerwise = [*tiny_overrides, "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.max_steps=3",
                 "trainer.eval_interval=0",
                 "optim.name=galore", "optim.rank=8", "optim.update_proj_gap=2", "optim.switch=rotate",
                 "optim.lr=0.01", "optim.layerwise=true", "optim.layerwise_clip=0.5", "trainer.grad_clip=0",
                 "checkpoint.interval=2"]
    one = run_leantrain(["train", "quickstart", *layerwise, f"trainer.run_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-4000:]
    expected = step_losses(tmp_path / "one")
    for backend in ("ddp", "fsdp2"):
        losses = step_losses(train([*layerwise, f"parallel.backend={backend}"], tmp_path / backend))
        assert sorted(losses) == sorted(expected) == [1, 2, 3]
        for step in expected:
            assert abs(losses[step] - expected[step]) <= 1e-5 * expected[step], (backend, step, losses, expected)
