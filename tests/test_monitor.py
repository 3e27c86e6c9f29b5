"""`--monitor`: kNN top-1 of frozen features during pretraining (engine.monitor), and through the CLI."""

import json
import sys
from pathlib import Path

import pytest
import torch

from videomoco.data.augment import KINETICS_MEAN, KINETICS_STD
from videomoco.engine.monitor import Monitor
from videomoco.models import build_encoder

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import TINY, videos  # noqa: E402,F401  (the module's 8 tiny videos)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """DATA/train/<class>/ (2 per class) and DATA/test/<class>/ (1 per class)."""
    from conftest import moving_square_frames
    from videomoco.data.encode import write_video

    root = tmp_path_factory.mktemp("labelled")
    for subset, count in (("train", 2), ("test", 1)):
        for c, cls in enumerate(("left", "right")):
            for i in range(count):
                path = root / subset / cls / f"{i}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_video(path, moving_square_frames(12, 40, seed=10 * c + i), fps=25, codec="h264")
    return root


def test_monitor_leaves_the_encoder_as_it_was(labelled):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (KINETICS_MEAN, KINETICS_STD))
    monitor = Monitor(labelled, 4, 1, 32, mean, std, torch.device("cpu"))
    encoder = build_encoder("r3d_18", num_classes=4, width=4).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = monitor(encoder)
    assert len(monitor) == 6 and 0.0 <= result["knn_top1"] <= 100.0 and result["seconds"] > 0
    assert encoder.training and all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert monitor.clips[0] is not None and monitor(encoder)["knn_top1"] == result["knn_top1"]  # decoded once


def test_pretrain_monitor_logs_knn_at_start_every_n_epochs_and_its_cost(videos, labelled, tmp_path):  # noqa: F811
    from videomoco import cli

    out = tmp_path / "run"
    assert cli.main(["pretrain", str(videos), *TINY, "--log_dir", str(out), "--epochs", "2", "--micro_batch", "4",
                     "--monitor", str(labelled), "--monitor_every", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in monitored] == [0, 1, 2]
    assert "cost_epochs" not in monitored[0] and all(r["cost_epochs"] > 0 for r in monitored[1:])
    assert (out / "ckp" / "checkpoint_0002.pth.tar").is_file()


def test_a_monitor_folder_without_labels_is_one_line(videos, tmp_path, capsys):  # noqa: F811
    from videomoco import cli

    code = cli.main(["pretrain", str(videos), *TINY, "--log_dir", str(tmp_path / "run"), "--monitor", str(videos)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("videomoco pretrain: error: --monitor ")
    assert "needs DATA/train/<class>/ and DATA/test/<class>/" in err
