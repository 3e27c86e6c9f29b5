import json

import pytest
import torch

from videomoco.cli import main as cli
from videomoco.eval.robustness import load_generator
from videomoco.method.generator import FrameDropGenerator

from eval_data import pretrain_checkpoint, tiny_args, ucf101_root


def test_robustness_end_to_end_with_generator(tmp_path, make_video):
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"))
    ckpt = tmp_path / "ckpt.pth"
    pretrain_checkpoint(ckpt, generator=FrameDropGenerator(hidden=16))
    out = tmp_path / "rob"
    args = ["robustness", str(root), "--dataset", "ucf101", "--pretrained", str(ckpt), "--generator", str(ckpt),
            "--ratios", "0", "0.5", *tiny_args(out)]
    assert cli(args) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    rows = {(r["dropper"], r["ratio"]): r for r in m["rows"]}
    assert set(rows) == {(d, r) for d in ("random", "generator") for r in (0.0, 0.5)}
    for d in ("random", "generator"):
        assert rows[(d, 0.0)]["cosine"] == pytest.approx(1.0, abs=1e-5)  # nothing dropped: same features
        assert rows[(d, 0.5)]["cosine"] < rows[(d, 0.0)]["cosine"]
        assert all(0.0 <= r["knn_top1_k1"] <= 100.0 for r in m["rows"])
    assert (out / "robustness.png").stat().st_size > 0
    assert "| random | 0.500 |" in (out / "summary.md").read_text()


def test_generator_missing_is_a_clear_error(tmp_path):
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="no 'generator' state"):
        load_generator(tmp_path / "ckpt.pth")
    trained = FrameDropGenerator(hidden=16)
    pretrain_checkpoint(tmp_path / "with_g.pth", generator=trained)
    loaded = load_generator(tmp_path / "with_g.pth").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
