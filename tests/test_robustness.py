import json

import pytest
import torch

from videomoco.cli import main as cli
from videomoco.eval.robustness import load_generator, mask_drop, still_frames, window_rows
from videomoco.method.generator import FrameDropGenerator, build_generator
from videomoco.models import build_encoder

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


@pytest.mark.parametrize("kind", ["authors", "motion"])
def test_load_generator_of_its_kind_and_missing_is_a_clear_error(tmp_path, kind):
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="no 'generator' state"):
        load_generator(tmp_path / "ckpt.pth")
    trained = build_generator(kind, hidden=16)
    pretrain_checkpoint(tmp_path / "with_g.pth", generator=trained)
    loaded = load_generator(tmp_path / "with_g.pth")
    assert loaded.kind == kind and loaded.hidden == 16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_window_rows_drop_the_moving_or_as_many_still_frames():
    torch.manual_seed(0)
    encoder = build_encoder("r3d_18", num_classes=4, width=4)
    encoder.fc = torch.nn.Identity()
    x, labels = torch.randn(6, 3, 8, 16, 16), torch.arange(6) % 3
    windows = torch.zeros(6, 8, dtype=torch.bool)
    windows[torch.arange(6), torch.arange(6)] = windows[torch.arange(6), torch.arange(6) + 1] = True
    still = still_frames(windows, seed=1)
    assert torch.equal(still.sum(1), windows.sum(1)) and not (still & windows).any()
    dropped = mask_drop(x, windows)
    for i in range(6):  # the window's frames are mean-filled, the others untouched
        for t in range(8):
            assert torch.equal(dropped[i, :, t], x[i, :, t]) != bool(windows[i, t])
    rows = {r["dropper"]: r for r in window_rows(encoder, (x, labels), (x, labels), windows, ks=(1,))}
    assert set(rows) == {"none", "moving", "still"}
    assert rows["none"]["cosine"] == pytest.approx(1.0) and rows["none"]["knn_top1_k1"] == 100.0  # its own bank
    assert rows["moving"]["cosine"] < 1.0 and rows["still"]["cosine"] < 1.0