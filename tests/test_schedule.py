"""The LR schedule matches the authors' adjust_learning_rate rules."""

import math

import pytest
import torch

from videomoco.engine.schedule import learning_rate, set_lr


def test_step_decay_at_milestones():
    lrs = [learning_rate(e, 0.03, 200, [120, 160], 0.1) for e in (0, 119, 120, 159, 160, 199)]
    assert lrs[0] == lrs[1] == 0.03
    assert lrs[2] == pytest.approx(0.003) and lrs[3] == lrs[2]
    assert lrs[4] == pytest.approx(0.0003) and lrs[5] == lrs[4]


def test_cosine_starts_at_lr_and_halves_midway():
    assert learning_rate(0, 0.1, 100, cos=True) == pytest.approx(0.1)
    assert learning_rate(50, 0.1, 100, cos=True) == pytest.approx(0.05)
    assert learning_rate(99, 0.1, 100, cos=True) < 0.001


def test_warmup_linear_then_decay():
    lr, wp = 0.03, 0.0025
    assert learning_rate(0, lr, 200, [10, 160], warmup=True, wp_lr=wp) == pytest.approx(wp)
    assert learning_rate(5, lr, 200, [10, 160], warmup=True, wp_lr=wp) == pytest.approx(wp + (lr - wp) / 2)
    assert learning_rate(10, lr, 200, [10, 160], warmup=True, wp_lr=wp) == pytest.approx(lr)
    assert learning_rate(160, lr, 200, [10, 160], warmup=True, wp_lr=wp) == pytest.approx(lr * 0.1)


def test_warmup_needs_a_milestone():
    with pytest.raises(ValueError, match="milestone"):
        learning_rate(0, 0.1, 10, [], warmup=True)


def test_set_lr_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 1.0}], lr=0.5)
    set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]
    assert not math.isnan(opt.param_groups[0]["lr"])
