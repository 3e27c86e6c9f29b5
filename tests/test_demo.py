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


def test_ablation_shares_the_first_epochs_of_each_decay_and_pairs_the_seeds(tmp_path, monkeypatch):
    import videomoco.demo as demo
    from videomoco.demo.report import ablation_lines

    budget, calls = BUDGETS["quick"], []

    def fake_pretrain(cfg, budget, data, out, decay, adversarial, seed, resume="", max_steps=0):
        calls.append((out.name, decay, adversarial, seed, resume, max_steps))
        return f"{out.name}.pth"

    def fake_evaluate(ecfg, ratios, generator_ckpt=""):
        bonus = 5.0 * ("VideoMoCo" in ecfg.pretrained)  # one variant better on every seed
        return {"knn_top1_k20": 40.0 + ecfg.seed + bonus, "linear_top1": 20.0 + ecfg.seed, "robustness": [
            {"dropper": "random", "ratio": r, "cosine": 0.9, "knn_top1_k20": 30.0 + ecfg.seed} for r in ratios]}

    monkeypatch.setattr(demo, "pretrain", fake_pretrain)
    monkeypatch.setattr(demo, "evaluate", fake_evaluate)
    # 30 train videos, batch 10: 3 steps per epoch
    result = demo.ablation(demo.DemoConfig(), budget, "data", "index_train", 30, tmp_path, "cpu", 0.5)
    variants = demo.ablation_variants(budget)
    assert list(result["runs"]) == list(variants) and result["seeds"] == list(demo.ABLATION_SEEDS)
    assert all(len(runs) == len(demo.ABLATION_SEEDS) for runs in result["runs"].values())
    decays = {decay for decay, _ in variants.values()}
    starts = [c for c in calls if c[5]]
    assert len(starts) == len(decays) * len(demo.ABLATION_SEEDS)  # one shared start per decay and seed
    assert all(c[5] == 3 * budget.adv_start_epoch and not c[2] for c in starts)  # no generator before it starts
    for name, (decay, adversarial) in variants.items():  # every variant resumes its decay's start, same seed
        for seed in demo.ABLATION_SEEDS:
            branch = next(c for c in calls if not c[5] and c[1] == decay and c[2] == adversarial and c[3] == seed)
            assert branch[4] == f"t{decay:g}_seed{seed}_start.pth"
    text = "\n".join(ablation_lines(result))
    assert "| VideoMoCo | +5.0 ± 0.0 (p 0.00) |" in text  # the same +5 on every seed: resolved
    assert "| + generator | +0.0 ± 0.0 (p 1.00) |" in text
