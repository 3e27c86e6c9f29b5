import json

import numpy as np
import pytest
import torch

from videomoco.cli import main as cli_main
from videomoco.data.synthetic import MOTIONS
from videomoco.demo import BUDGETS, Budget
from videomoco.demo.evaluate import shuffle_frames, single_frame


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[demo] pretrain VideoMoCo:" in printed and "report:" in printed

    report = (out / "report.md").read_text()
    assert "| model | kNN top-1 (k=20) |" in report
    for name in ("random init", "MoCo", "VideoMoCo", "supervised"):
        assert f"| {name} |" in report
    for png in ("accuracy.png", "training_curves.png", "robustness.png", "dropped_frames.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"random init", "MoCo", "VideoMoCo", "supervised"}
    for metrics in summary["results"].values():
        assert 0.0 <= metrics["knn_top1_k20"] <= 100.0 and 0.0 <= metrics["linear_top1"] <= 100.0
    droppers = {r["dropper"] for r in summary["results"]["VideoMoCo"]["robustness"]}
    assert droppers == {"random", "generator"}  # VideoMoCo's own generator is evaluated too
    assert "kNN, shuffled frames" in summary["baselines"]
    # the pretraining saw only the train split
    index = (out / "index_train" / "index.csv").read_text()
    assert "train/" in index and "val/" not in index
    # MoCo and VideoMoCo share their first epochs (one start run) and the monitor's curve starts there
    budget = BUDGETS["quick"]
    assert "[demo] pretrain the shared start (plain MoCo):" in printed
    for name in ("MoCo", "VideoMoCo"):
        curve = summary["monitor"][name]
        assert set(curve) == {"0", str(budget.epochs)}, curve  # the start's epoch 0 and the run's last epoch
        assert curve["0"] == summary["monitor"]["MoCo"]["0"]
    assert "(`--monitor`)" in report

    # benchmarks.drop_shift reads the finished demo: one row per encoder and ratio, every test video placed
    from benchmarks import drop_shift

    capsys.readouterr()
    assert drop_shift.main(["--demo", str(out), "--quick"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["encoder"] for r in rows] == ["MoCo", "VideoMoCo", "supervised"]
    for r in rows:
        assert sum(r["nearest_classes"]) == summary["num_test"] and -1 <= r["shift_cosine"] <= 1
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["knn_centred"] <= 100 and r["shift_over_mean"] > 0


def test_quick_ablation_end_to_end(tmp_path, capsys):
    """`demo --ablation` alone: its own render, a shared start per seed, every variant measured, the report."""
    from videomoco.demo.ablation import METRICS

    out = tmp_path / "ablation"
    assert cli_main(["demo", "--quick", "--ablation", "--out", str(out), "--workers", "1"]) == 0
    assert "[demo] pretrain MoCo" not in capsys.readouterr().out  # the default demo's runs are not repeated
    budget = BUDGETS["quick"]
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["ablation"]["runs"]
    assert len(runs) == 6 and all(len(r) == budget.ablation_seeds for r in runs.values())
    assert all(len(values) == len(METRICS) for r in runs.values() for values in r)
    starts = sorted(p.name for p in (out / "ablation").glob("start_seed*"))
    assert starts == [f"start_seed{s}" for s in range(budget.ablation_seeds)]
    report = (out / "report.md").read_text()
    assert "## Ablation" in report and "Resolution: the paired std" in report


def test_budgets_are_consistent():
    for budget in BUDGETS.values():
        assert budget.adv_start_epoch < budget.epochs  # VideoMoCo's generator actually runs
        assert budget.clip_frames * budget.frame_stride <= budget.video_frames
        assert budget.queue >= budget.batch_size
        assert budget.batch_size <= budget.train_per_class * len(MOTIONS)  # one batch of train videos at least
    assert Budget() == BUDGETS["default"]


def test_time_baseline_transforms_remove_order_and_motion():
    x = torch.arange(2 * 1 * 6, dtype=torch.float32).view(2, 1, 6, 1, 1).expand(2, 3, 6, 2, 2)
    shuffled = shuffle_frames(x, seed=1)
    assert torch.equal(shuffled.sort(dim=2).values, x)  # the same frames ...
    assert not torch.equal(shuffled, x)  # ... in another order
    single = single_frame(x)
    assert torch.equal(single, x[:, :, 3:4].expand_as(x))


def test_ablation_shares_the_first_epochs_of_each_decay_and_pairs_the_seeds():
    from videomoco.demo import ablation
    from videomoco.demo.report import ablation_lines

    variants, calls = ablation.fixed_variants(0.99), []

    def train(variant, seed, tag, resume="", max_steps=0):
        calls.append((variant, seed, tag, resume, max_steps))
        return f"{tag}.pth"

    def measure(ckpt, seed):  # the motion generator +5 kNN on every seed, the paper's decay +1 on even seeds
        knn = 40.0 + seed + 5.0 * ("motion" in ckpt) + 1.0 * ("key" in ckpt and seed % 2 == 0)
        return [knn, 20.0 + seed, *[0.5] * (len(ablation.METRICS) - 2)]

    result = ablation.run(variants, [0, 1, 2], 9, train, measure)
    combination = ablation.Variant("best: decay (paper) + motion generator", 0.99, "key", "motion")
    assert list(result["runs"]) == [v.name for v in variants] + [combination.name]
    assert result["variants"][combination.name] == vars(combination)
    assert all(len(runs) == 3 for runs in result["runs"].values()) and result["seeds"] == [0, 1, 2]
    starts = [c for c in calls if c[4]]
    assert [c[1] for c in starts] == [0, 1, 2]  # one start per seed, shared by every variant
    assert all(c[4] == 9 and c[0] == ablation.Variant("start") for c in starts)  # plain MoCo: no decay, no G
    for variant in [*variants, combination]:  # every run resumes its seed's start
        for seed in range(3):
            run = next(c for c in calls if c[0] == variant and c[1] == seed)
            assert run[3] == f"start_seed{seed}.pth" and not run[4]
    assert len(calls) == 3 + 6 * 3

    text = "\n".join(ablation_lines(result, ablation.GROUPS))
    assert "| + motion generator | +5.0 ± 0.0 (p 0.00) | +0.0 ± 0.0 (p 1.00) |" in text  # resolved, every seed
    assert "| + decay (paper) | +0.7 ± 0.6 (p 0.18) |" in text  # +1 on two seeds of three: not resolved
    assert "### the window scene: moving vs still frames dropped" in text
    assert "so 3 seeds resolve a mean difference of" in text and "+ motion generator: kNN top-1 +5.0" in text


def test_the_smallest_resolvable_difference():
    from videomoco.demo.stats import paired_test, resolvable, t_critical

    assert t_critical(4) == pytest.approx(2.776, abs=1e-3) and t_critical(9) == pytest.approx(2.262, abs=1e-3)
    diff = resolvable(3.0, 10)  # a mean difference this large, with this std, has p = 0.05 exactly
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(10)
    noise = (noise - noise.mean()) / noise.std(ddof=1) * 3.0
    assert paired_test(diff + noise, np.zeros(10))["p"] == pytest.approx(0.05, abs=1e-6)
