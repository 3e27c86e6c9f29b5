"""The memory planner: sizes, the fit from a probe, the plan and its one-line refusal."""

import sys

import pytest
import torch

from videomoco.engine import memory
from videomoco.engine.memory import StepEstimate, plan_micro_batches

MB = 2**20


@pytest.mark.parametrize("text, expected", [("16GB", 16 * 2**30), ("512m", 512 * MB), ("1.5 GiB", 3 * 2**29),
                                            ("2000000B", 2_000_000), ("64kb", 65536)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "1.2.3G", "nan", "inf", "16", "2000000"])
def test_parse_size_rejects_junk(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


def test_plan_takes_the_fewest_micro_batches_that_fit():
    est = StepEstimate(fixed=1000 * MB, per_clip=100 * MB, per_input_clip=10 * MB)
    assert est.peak(4, 32) == 1000 * MB + 400 * MB + 280 * MB
    budget = int((1000 + 800 + 240) * MB / (1 - memory.MARGIN)) + MB  # room for micro-batches of 8
    plan = plan_micro_batches(est, 32, budget)
    assert (plan.micro_batches, plan.micro_batch) == (4, 8)
    assert plan.needed == est.peak(32, 32) and plan.peak == est.peak(8, 32) <= plan.budget
    assert plan_micro_batches(est, 32, 10**15).micro_batches == 1
    # 3 micro-batches of at most 11 when 11 fit but 16 do not
    budget = int((1000 + 1100 + 210) * MB / (1 - memory.MARGIN)) + MB
    assert (plan_micro_batches(est, 32, budget).micro_batches, plan_micro_batches(est, 32, budget).micro_batch) == (3, 11)


def test_plan_leaves_the_reserve_and_refuses_when_one_clip_does_not_fit():
    est = StepEstimate(fixed=1000 * MB, per_clip=100 * MB, per_input_clip=10 * MB)
    budget = int((1000 + 100 + 310) * MB / (1 - memory.MARGIN)) + MB  # exactly one clip at a time
    assert plan_micro_batches(est, 32, budget).micro_batches == 32
    assert plan_micro_batches(est, 32, budget + 500 * MB, reserve=500 * MB).micro_batches == 32
    with pytest.raises(memory.MemoryPlanError, match=r"^batch 32: one clip needs ~1.4 GiB, 1.2 GiB usable of 1.5 GiB$"):
        plan_micro_batches(est, 32, budget - 200 * MB, what="batch 32")


def test_split_text():
    assert memory.split_text(1, 32) == "1 micro-batch of 32"
    assert memory.split_text(8, 32) == "8 micro-batches of 4"
    assert memory.split_text(3, 32) == "3 micro-batches of at most 11"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_measure_step_fits_the_cost_per_clip():
    # a probe that holds 24 MB per clip at its peak: the fit finds about that, whatever the process holds
    held = []

    def probe(m):
        held.append(torch.ones(m * 24 * MB // 4))  # written, so resident
        held.clear()

    est = memory.measure_step(probe, "cpu", per_input_clip=MB)
    assert 20 * MB <= est.per_clip <= 28 * MB
    assert est.fixed > 0 and est.per_input_clip == MB
    assert memory.measure_step(lambda m: None, "cpu", per_input_clip=MB).per_clip == MB  # never below the inputs


def test_budget_is_what_is_held_plus_what_is_free():
    held, free = memory.memory_in_use("cpu"), memory.memory_available("cpu")
    assert held > 0 and free > 0
    assert memory.budget_bytes("cpu", limit=123) == 123
    assert memory.budget_bytes("cpu") >= held
    assert memory.worker_reserve(2, 10 * MB) == 2 * (memory.WORKER_BYTES + memory.PREFETCH * 10 * MB)


def test_a_model_with_batchnorm1d_is_planned_in_micro_batches_of_two_or_more():
    est = StepEstimate(fixed=1000 * MB, per_clip=100 * MB, per_input_clip=10 * MB)
    budget = int((1000 + 100 + 310) * MB / (1 - memory.MARGIN)) + MB  # one clip at a time would fit
    with pytest.raises(memory.MemoryPlanError, match="2 clips need"):
        plan_micro_batches(est, 32, budget, smallest=2)
    plan = plan_micro_batches(est, 32, budget + 200 * MB, smallest=2)
    assert 32 // plan.micro_batches >= 2
    assert memory.smallest_trainable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))) == 2
    assert memory.smallest_trainable(torch.nn.Conv3d(3, 3, 1)) == 1


def test_a_restart_reuses_the_measured_step_and_another_configuration_measures_again(tmp_path, caplog):
    """memory_plan.json of the first run: the same configuration and device reuse its estimate, no probe."""
    import json

    from test_pretrain import TINY, moving_square_frames
    from videomoco import cli
    from videomoco.data.encode import write_video
    from videomoco.engine.config import PretrainConfig

    (tmp_path / "v").mkdir()
    for i in range(4):
        write_video(tmp_path / "v" / f"{i}.mp4", moving_square_frames(12, 40, seed=i), fps=25, codec="h264")
    caplog.set_level("INFO")
    argv = ["pretrain", str(tmp_path / "v"), *TINY, "--log_dir", str(tmp_path / "log"), "--resume", "auto"]
    assert cli.main([*argv, "--epochs", "1"]) == 0
    first = json.loads((tmp_path / "log" / "memory_plan.json").read_text())
    assert not first["reused"] and "measuring a" in caplog.text
    caplog.clear()
    assert cli.main([*argv, "--epochs", "2"]) == 0  # the restart: no probe
    second = json.loads((tmp_path / "log" / "memory_plan.json").read_text())
    assert second["reused"] and "reusing the step measured" in caplog.text and "measuring a" not in caplog.text
    assert [second[k] for k in ("fixed", "per_clip", "micro_batches")] == [first[k] for k in
                                                                         ("fixed", "per_clip", "micro_batches")]
    cfg = PretrainConfig(**{**{k: first["probe_key"][k] for k in memory.STEP_FIELDS}, "data": "x",
                            "moco_k": 64, "log_dir": str(tmp_path / "log")})  # another queue: measure again
    key = memory.probe_key(cfg, "cpu", 1, first["probe_key"]["adversarial"])
    assert memory.saved_estimate(tmp_path / "log", key) is None
    assert memory.saved_estimate(tmp_path / "log", first["probe_key"]) == StepEstimate(
        first["fixed"], first["per_clip"], first["per_input_clip"])


def test_a_budget_is_a_cap_and_is_said_to_be_unused_with_a_fixed_micro_batch(caplog):
    # regression: 1000TB was planned as 819200 GiB available; --micro_batch N ignored the budget without a word
    there = memory.memory_in_use("cpu") + memory.memory_available("cpu")
    caplog.set_level("INFO")
    assert memory.budget_bytes("cpu", limit=memory.parse_size("1000TB")) <= there * 1.01
    assert "is more than the" in caplog.text

    class Trainer:
        model = torch.nn.Linear(1, 1)
        micro_batches = 1

    from videomoco.engine.config import PretrainConfig

    cfg = PretrainConfig(data="d", batch_size=4, moco_k=16, micro_batch=2, memory_budget="16GB")
    assert memory.plan_training_step(Trainer, cfg, torch.device("cpu"), 4, 1, 0, 0)["micro_batches"] == 2
    assert "--memory_budget 16GB is not used: --micro_batch 2 sets the split (no planning)" in caplog.text
