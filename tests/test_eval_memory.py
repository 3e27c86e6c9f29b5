"""Memory planning of the evaluation commands (`videomoco.eval.planning.plan_micro_batch`)."""

import json
import re

import pytest
import torch

from videomoco.cli import main as cli
from videomoco.engine import memory
from videomoco.eval import common, planning
from videomoco.eval.finetune import FinetuneConfig
from videomoco.models import build_encoder

from eval_data import tiny_args, ucf101_root

MB = 2**20


def one_line(capsys, command):
    """The one error line on stderr (log records, when logging is set up by an earlier test, aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"videomoco {command}: error: "), err
    return lines[0]


def fake_probe(monkeypatch, fixed=100 * MB, per_clip=50 * MB):
    calls = []

    def probe(model, clip, device, train=False, head=False, optimizer=None, momentum=0.9, per_input_clip=0):
        calls.append((train, head))
        return memory.StepEstimate(fixed, per_clip, per_input_clip)

    monkeypatch.setattr(planning, "probe_estimate", probe)
    return calls


def test_plan_splits_a_batch_that_does_not_fit_and_refuses_one_clip_that_does_not(monkeypatch):
    calls = fake_probe(monkeypatch)
    model = torch.nn.Linear(1, 1)
    cfg = FinetuneConfig(frames=16, crop=112, batch_size=8, workers=0, device="cpu", memory_budget="400MB")
    # usable 320 MB: 8 clips need 100 + 8 x 50 MB; 4 clips + 4 waiting inputs (~2.9 MB each) fit
    assert planning.plan_micro_batch(cfg, model, 8, train=True) == 4
    assert planning.plan_micro_batch(cfg, model, 8, train=True) == 4 and len(calls) == 1  # planned once
    cfg.memory_budget = "135MB"  # usable 108 MB: room for 0.11 of a clip beside the fixed 100 MB
    with pytest.raises(memory.MemoryPlanError) as err:
        planning.plan_micro_batch(cfg, model, 8, train=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("a training batch of 8 clips of 3x16x112x112: one clip needs ~")
    assert "to fit, try --frames 1, --crop 37, a larger --memory-budget" in msg
    cfg.micro_batch = 3  # given: no probe
    assert planning.plan_micro_batch(cfg, model, 8, train=True) == 3
    assert planning.plan_micro_batch(cfg, torch.nn.Linear(1, 1), 8, train=True) == 3 and len(calls) == 1


def test_the_probes_leave_the_model_and_the_rng_as_they_were():
    torch.manual_seed(0)
    model = build_encoder("r3d_18", num_classes=3, width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for train in (True, False):
        estimate = planning.probe_estimate(model, (3, 2, 16, 16), "cpu", train=train, optimizer=opt, per_input_clip=1)
        assert estimate.fixed > 0 and estimate.per_clip >= 1
    assert torch.equal(torch.get_rng_state(), rng) and model.training and not opt.state
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_knn_in_micro_batches_and_a_budget_too_small(tmp_path, make_video, monkeypatch, capsys):
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1)
    probes = []
    real = planning.probe_estimate
    monkeypatch.setattr(planning, "probe_estimate", lambda *a, **k: probes.append(a) or real(*a, **k))
    metrics = {}
    for flags in ([], ["--micro-batch", "1"]):
        out = tmp_path / f"knn{len(flags)}"
        assert cli(["knn", str(root), *tiny_args(out, *flags)]) == 0
        metrics[len(flags)] = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics[0] == metrics[2] and len(probes) == 1  # auto: one probe for train and test features
    capsys.readouterr()
    assert cli(["knn", str(root), *tiny_args(tmp_path / "o", "--memory-budget", "64MB")]) == 2
    err = one_line(capsys, "knn")
    assert "an inference batch of 4 clips of 3x8x32x32: one clip needs ~" in err and "--memory-budget" in err


@pytest.mark.parametrize("command", ["finetune", "linear", "knn", "robustness", "extract", "evaluate"])
@pytest.mark.parametrize("flag, value, message", [("--micro-batch", "0", "--micro-batch: must be 'auto' or an integer >= 1"),
                                                   ("--micro_batch", "two", "--micro-batch: must be 'auto' or an integer"),
                                                   ("--memory-budget", "lots", "--memory-budget: 'lots' is not a size")])
def test_bad_memory_flags_are_one_line_exit_2(tmp_path, capsys, command, flag, value, message):
    data = [] if command == "evaluate" else [str(tmp_path / "nope")]
    extra = ["--pretrained", "x.pth"] if command == "extract" else []
    args = [command, *data, "--out", str(tmp_path / "o"), "--device", "cpu", *extra, flag, value]
    assert cli(args) == 2
    assert message in one_line(capsys, command)
