"""The divergence guard and the checks of a resumed run, in process: non-finite steps skipped and counted,
a diverged run stopped without saving it, a changed model or optimizer refused naming what changed."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantrain.checkpoint.disk import find_checkpoints, load_checkpoint
from leantrain.errors import UserError
from leantrain.trainer import train as train_module
from leantrain.trainer.config import load_config
from leantrain.trainer.divergence import DivergenceError
from leantrain.trainer.run_lock import RunLock


def poison_steps(monkeypatch, bad: set[int] | int, accum: int = 2) -> None:
    """Make the gradients of the given steps (or of every step from ``bad`` on) NaN, as a diverging run's are."""
    calls = {"n": 0}
    original = train_module.micro_batch

    def micro_batch(cfg, engine, inputs, targets, balance, scale, *args, **kwargs):
        step = calls["n"] // accum + 1
        calls["n"] += 1
        if (step in bad) if isinstance(bad, set) else step >= bad:
            scale = scale * float("nan")
        return original(cfg, engine, inputs, targets, balance, scale, *args, **kwargs)

    monkeypatch.setattr(train_module, "micro_batch", micro_batch)


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


def all_finite(checkpoint: Path) -> bool:
    _, payloads = load_checkpoint(checkpoint)
    model = payloads["replicated"]["model"]
    return all(bool(torch.isfinite(t).all()) for t in model.values())


@pytest.mark.parametrize("extra", [[], ["optim.layerwise=true", "trainer.grad_clip=0"], ["optim.offload=cpu"]],
                         ids=["global", "layerwise", "offload"])
def test_bad_steps_are_skipped_counted_and_never_checkpointed(tiny_overrides, tmp_path, monkeypatch, one_thread,
                                                              extra):
    run = tmp_path / "run"
    cfg = load_config("quickstart", [*tiny_overrides, "trainer.max_steps=6", "trainer.eval_interval=0",
                                     "checkpoint.interval=1", "checkpoint.keep=10", *extra])
    poison_steps(monkeypatch, {3, 4})
    last = train_module.train(cfg)
    assert last["bad_steps"] == 2 and math.isfinite(last["loss"])
    assert [e["step"] for e in events(run, "bad_step")] == [3, 4]
    assert sorted(int(p.name[5:]) for p in find_checkpoints(run / "checkpoints")) == [1, 2, 5, 6]
    _, payloads = load_checkpoint(run / "checkpoints" / "step_2")
    # Steps 3 and 4 changed nothing: step 5 started from step 2's weights (its checkpoint would differ otherwise).
    assert all(torch.isfinite(t).all() for t in load_file(run / "final" / "model.safetensors").values())
    assert payloads["replicated"]["progress"]["bad_steps"] == 0
    _, payloads = load_checkpoint(run / "checkpoints" / "step_5")
    assert payloads["replicated"]["progress"]["bad_steps"] == 2


def test_skipped_steps_leave_the_weights_as_they_were(tiny_overrides, tmp_path, monkeypatch, one_thread):
    run = tmp_path / "run"
    cfg = load_config("quickstart", [*tiny_overrides, "trainer.max_steps=4", "trainer.eval_interval=0",
                                     "checkpoint.interval=1", "checkpoint.keep=10"])
    poison_steps(monkeypatch, {3, 4})
    train_module.train(cfg)
    before = load_checkpoint(run / "checkpoints" / "step_2")[1]["replicated"]["model"]
    after = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in after)


def test_a_diverged_run_stops_after_max_bad_steps_without_saving(tiny_overrides, tmp_path, monkeypatch, one_thread):
    run = tmp_path / "run"
    cfg = load_config("quickstart", [*tiny_overrides, "trainer.max_steps=20", "trainer.eval_interval=0",
                                     "checkpoint.interval=1", "checkpoint.keep=10", "trainer.max_bad_steps=3"])
    poison_steps(monkeypatch, 4)
    with pytest.raises(DivergenceError, match=r"steps 4 to 6 .*trainer.max_bad_steps=3"):
        train_module.train(cfg)
    assert [e["step"] for e in events(run, "bad_step")] == [4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert all(all_finite(path) for path in find_checkpoints(run / "checkpoints"))
    assert not (run / "final").exists() and not (run / "leantrain.lock").exists()


@pytest.mark.parametrize("change, named", [("model.dim=96", "model.dim: 64 -> 96"),
                                           ("optim.name=galore", 'optim.name: "adamw" -> "galore"')])
def test_a_changed_model_or_optimizer_is_refused_naming_the_key(tiny_overrides, tmp_path, one_thread, change, named):
    common = [*tiny_overrides, "trainer.max_steps=4", "trainer.eval_interval=0", "checkpoint.interval=2"]
    train_module.train(load_config("quickstart", [*common, "trainer.stop_at_step=2"]))
    with pytest.raises(UserError) as raised:
        train_module.train(load_config("quickstart", [*common, change]))
    assert named in str(raised.value)


def test_a_run_directory_in_use_is_refused(tiny_overrides, tmp_path, one_thread):
    with RunLock.acquire(tmp_path / "run"):
        with pytest.raises(UserError, match="in use by another run"):
            train_module.train(load_config("quickstart", [*tiny_overrides, "trainer.max_steps=1"]))
