import math

import pytest
import torch

from leantrain.optim.config import OptimConfig
from leantrain.trainer.schedule import build_scheduler, lr_multiplier


def test_cosine_closed_form():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    cfg = OptimConfig(schedule="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_multiplier(79, cfg, 100) == 1.0
    assert lr_multiplier(80, cfg, 100) == pytest.approx(1.0)
    assert lr_multiplier(90, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr_and_round_trips():
    param = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=0.5, schedule="constant", warmup_steps=4)
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    state = sched.state_dict()
    fresh = build_scheduler(torch.optim.SGD([param], lr=cfg.lr), cfg, 10)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == sched.last_epoch
