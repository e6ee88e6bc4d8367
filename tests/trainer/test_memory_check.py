"""The trainer refuses, before building the model, a run whose memory plan exceeds the free memory."""

import pytest
import torch

from leantrain.trainer import estimate, train
from leantrain.trainer.cli import main
from leantrain.trainer.config import load_config
from leantrain.trainer.estimate import free_memory


def test_free_memory_of_the_host_is_meminfo_s_available():
    free = free_memory(torch.device("cpu"))
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < free <= total


def test_a_run_that_does_not_fit_exits_2_with_the_plan_before_building_the_model(tiny_overrides, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(estimate, "free_memory", lambda device: 1 << 20)
    # The data comes before the model: neither is built.
    monkeypatch.setattr(train, "build_data", lambda *args, **kwargs: built.append(args))
    assert main(["train", "quickstart", *tiny_overrides, "trainer.memory_check=true"]) == 2
    err = capsys.readouterr().err
    assert "memory plan needs" in err and "1.00 MiB" in err and "trainer.memory_check=false" in err
    assert "device at peak" in err and "weights" in err and "optimizer state" in err
    assert not built


def test_a_run_that_fits_trains(tiny_overrides, monkeypatch):
    checked = []
    monkeypatch.setattr(estimate, "free_memory", lambda device: checked.append(device) or 1 << 40)
    assert main(["train", "quickstart", *tiny_overrides, "trainer.memory_check=true", "trainer.max_steps=1",
                 "trainer.eval_interval=0"]) == 0
    assert checked


def test_the_check_can_be_turned_off(tiny_overrides, monkeypatch):
    monkeypatch.setattr(estimate, "free_memory", lambda device: 1 << 20)
    assert main(["train", "quickstart", *tiny_overrides, "trainer.memory_check=false", "trainer.max_steps=1",
                 "trainer.eval_interval=0"]) == 0


def test_a_plan_the_trace_cannot_follow_warns_and_runs_unchecked(tiny_overrides, monkeypatch):
    pytest.importorskip("apollo_torch")
    monkeypatch.setattr(estimate, "free_memory", lambda device: 1 << 20)
    cfg = load_config("quickstart", [*tiny_overrides, "optim.name=apollo"])
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert estimate.check_fits(cfg, 1, torch.device("cpu")) is None
