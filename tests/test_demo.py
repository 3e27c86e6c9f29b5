import json

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
