import json
import types

import numpy as np
import pytest

from videomoco.cli import main as cli
from videomoco.eval import suite

from eval_data import hmdb51_root, official_root, pretrain_checkpoint, ucf101_root

TINY = ["--width", "8", "--frames", "8", "--crop", "32", "--num-clips", "2", "--batch-size", "4", "--workers", "0",
        "--device", "cpu"]


def test_quick_suite_end_to_end(tmp_path, make_video):
    ucf = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=2, test=1)
    hmdb = hmdb51_root(tmp_path, make_video, train=2, test=1)
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "suite"
    assert cli(["evaluate", "--suite", "quick", "--ucf101", str(ucf), "--hmdb51", str(hmdb),
                "--pretrained", str(tmp_path / "ckpt.pth"), "--splits", "1", *TINY, "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert {(r["dataset"], r["task"]) for r in record["runs"]} == {
        (d, p) for d in ("ucf101", "hmdb51") for p in ("finetune", "linear", "knn")}
    assert record["protocol"] == "videomoco" and record["deviations"]["finetune"]["epochs"]["used"] == 1
    table = (out / "results.md").read_text()
    assert "| videomoco | ucf101 | finetune | video_top1 | 1 |" in table and "| videomoco | hmdb51 | knn | R@5 | 1 |" in table
    assert "protocol videomoco (quick)" in table and "epochs 1 (protocol: 100)" in table
    assert (out / "hmdb51" / "split1" / "finetune_seed0" / "confusion.png").is_file()
    assert (out / "ucf101" / "split1" / "linear_features" / "features_train.npy").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["videomoco", "authors", "authors-lincls", "vcop", "coclr", "slowfast"])
def test_every_protocol_end_to_end_on_the_official_layouts(tmp_path, make_video, official, protocol):
    """`videomoco evaluate --protocol P` on UCF101 and HMDB51 roots with the real split files (tiny videos of
    two classes, the rest of each split missing), tiny encoder: every task runs and reports under P."""
    ucf = official_root(tmp_path, make_video, official, "ucf101")
    hmdb = official_root(tmp_path, make_video, official, "hmdb51")
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "suite"
    tiny = ["--frames", "4", "--frame-stride", "2", "--crop", "24", "--batch-size", "4", "--micro-batch", "4"]
    assert cli(["evaluate", "--protocol", protocol, "--suite", "quick", "--ucf101", str(ucf), "--hmdb51", str(hmdb),
                "--pretrained", str(tmp_path / "ckpt.pth"), "--splits", "1", "--width", "8", "--workers", "0",
                "--device", "cpu", *tiny, "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["protocol"] == protocol and {r["protocol"] for r in record["table"]} == {protocol}
    assert {(r["dataset"], r["task"]) for r in record["runs"]} == {
        (d, t) for d in ("ucf101", "hmdb51") for t in ("finetune", "linear", "knn")}
    assert {"frames", "crop"} <= set(record["deviations"]["knn"])
    metrics = json.loads((out / "ucf101" / "split1" / "knn_seed0" / "metrics.json").read_text())
    assert metrics["protocol"] == protocol and metrics["metrics"]["num_test_videos"] == 4


def test_table_rows_per_split_and_the_mean_of_splits(tmp_path, monkeypatch):
    calls = []

    def fake(task):  # metrics that depend on split and seed, so the aggregate is checkable
        def run(cfg):
            calls.append((task, cfg.dataset, cfg.split, cfg.seed))
            return {m: float(10 * cfg.split + cfg.seed + i) for i, m in enumerate(suite.REPORTED[task])}
        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(suite, "TASKS", {t: fake(t) for t in suite.TASKS})
    monkeypatch.setattr(suite, "check_layout", lambda dataset, root: None)  # "U" and "H" are not on disk
    cfg = suite.SuiteConfig(ucf101="U", hmdb51="H", splits=[1, 2, 3], seeds=[0, 1, 2], out=str(tmp_path),
                            protocol="authors")
    record = suite.run(cfg)
    assert sum(c[0] == "finetune" for c in calls) == 2 * 3 * 3 and sum(c[0] == "knn" for c in calls) == 2 * 3
    for row in record["table"]:
        assert row["protocol"] == "authors"
        runs = [r for r in record["runs"] if r["dataset"] == row["dataset"] and r["task"] == row["task"]]
        if row["split"].startswith("mean"):  # the mean over splits of each split's seed mean; std over splits
            means = [np.mean([r["metrics"][row["metric"]] for r in runs if r["split"] == s]) for s in (1, 2, 3)]
            assert row["split"] == "mean 1,2,3" and row["n"] == 3
            assert row["mean"] == pytest.approx(np.mean(means)) and row["std"] == pytest.approx(np.std(means, ddof=1))
        else:  # one split: its seeds
            values = [r["metrics"][row["metric"]] for r in runs if r["split"] == int(row["split"])]
            assert row["n"] == len(values) == (1 if row["task"] == "knn" else 3)
            assert row["mean"] == pytest.approx(np.mean(values))
            assert row["std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    splits = {r["split"] for r in record["table"]}
    assert splits == {"1", "2", "3", "mean 1,2,3"}
    assert "| authors | ucf101 | finetune | video_top1 | 1 |" in (tmp_path / "results.md").read_text()


def test_suite_rejects_bad_split(tmp_path, capsys):
    assert cli(["evaluate", "--ucf101", str(tmp_path), "--splits", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videomoco evaluate: error: ") and "--splits: must be an integer in [1, 3]" in err and err.count("\n") == 1


def own_labels(tmp_path, make_video, train=2, test=1):
    """The layout for one's own labels: DIR/train/<class>/ and DIR/test/<class>/."""
    for subset, count in (("train", train), ("test", test)):
        for c, cls in enumerate(("cats", "dogs")):
            for i in range(count):
                make_video(f"mine/{subset}/{cls}/{i}.mp4", num_frames=12, size=40, seed=10 * c + i)
    return tmp_path / "mine"


def test_evaluate_takes_a_folder_of_ones_own_labels_with_a_gallery_caveat(tmp_path, make_video, capsys):
    mine = own_labels(tmp_path, make_video)
    out = tmp_path / "suite"
    assert cli(["evaluate", "--suite", "quick", "--folder", str(mine), "--tasks", "knn", *TINY,
                "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["split"], r["task"]) for r in record["runs"]] == [("folder", 1, "knn")]
    summary = (out / "folder" / "split1" / "knn_seed0" / "summary.md").read_text()
    assert "Caveat: k=20, R@5, R@10, R@20, R@50 not below the 4 train videos" in summary


def test_a_folder_given_as_ucf101_names_the_flag_evaluate_has(tmp_path, make_video, capsys):
    mine = own_labels(tmp_path, make_video, train=1, test=1)
    assert cli(["evaluate", "--ucf101", str(mine), *TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("videomoco evaluate: error: --ucf101 ") and "--dataset" not in err
    assert "is indexed as kinetics, not ucf101: give it as --folder" in err
