"""`videomoco.transforms` with `load_encoder`: from a video file to the features `videomoco extract` writes."""

import json

import numpy as np
import pytest
import torch

import videomoco
from videomoco.cli import main as cli
from videomoco.data.augment import input_norm

from eval_data import pretrain_checkpoint


def recorded_checkpoint(path, frames=4, crop=32, frame_stride=2):
    """A pretraining checkpoint whose config records the clip it was trained on."""
    pretrain_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(frame_per_clip=frames, crop_size=crop, frame_stride=frame_stride)
    torch.save(ckpt, path)
    return path


def test_load_encoder_is_in_eval_mode_with_what_it_takes(tmp_path):
    enc = videomoco.load_encoder(recorded_checkpoint(tmp_path / "ckpt.pth"))
    assert not enc.training and not any(m.training for m in enc.modules())
    assert enc.preprocessing == {"frames": 4, "frame_stride": 2, "crop": 32, "input_norm": input_norm("kinetics")}
    # BatchNorm statistics do not move under a forward, as a user's no_grad call would otherwise change them
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        enc.forward_features(torch.randn(2, 3, 4, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_sidecar_records_the_input(tmp_path, fmt):
    out = tmp_path / f"encoder.{fmt}"
    assert cli(["export", str(recorded_checkpoint(tmp_path / "ckpt.pth")), "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    expected = {"frames": 4, "frame_stride": 2, "crop": 32, "input_norm": input_norm("kinetics")}
    assert meta == {**meta, **expected}
    out.with_suffix(".json").unlink()  # a .safetensors file carries it in its own metadata too
    if fmt == "safetensors":
        assert videomoco.load_encoder(out).preprocessing == expected
    else:  # a bare torchvision state_dict without its sidecar: torchvision's clip and Kinetics statistics
        assert videomoco.load_encoder(out).preprocessing == {"frames": 16, "frame_stride": 1, "crop": 112,
                                                              "input_norm": input_norm("kinetics")}


def test_preprocess_shapes_and_normalisation():
    spec = {"crop": 8, "input_norm": input_norm("imagenet")}
    grey = np.full((5, 10, 12, 3), 128, dtype=np.uint8)  # (T, H, W, 3)
    x = videomoco.preprocess(grey, spec)
    assert x.shape == (1, 3, 5, 8, 8) and x.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(spec["input_norm"]["mean"])) / torch.tensor(spec["input_norm"]["std"])
    torch.testing.assert_close(x[0, :, 0, 0, 0], expected)
    assert videomoco.transforms.preprocess(np.stack([grey] * 3), spec).shape == (3, 3, 5, 8, 8)
    with pytest.raises(ValueError, match="uint8 RGB"):
        videomoco.preprocess(grey.astype(np.float32) / 255, spec)


def test_read_clips_preprocess_equals_extract(tmp_path, make_video):
    for i in range(2):
        make_video(f"videos/v{i}.mp4", num_frames=30 + 7 * i, size=48, seed=i)
    ckpt = recorded_checkpoint(tmp_path / "ckpt.pth", frames=4, crop=32, frame_stride=2)
    assert cli(["extract", str(tmp_path / "videos"), "--pretrained", str(ckpt), "--out", str(tmp_path / "f"),
                "--frames", "4", "--frame_stride", "2", "--crop", "32", "--num-clips", "3", "--workers", "0",
                "--device", "cpu"]) == 0
    enc = videomoco.load_encoder(ckpt)
    with torch.no_grad():
        ours = [enc.forward_features(videomoco.preprocess(videomoco.read_clips(tmp_path / "videos" / f"v{i}.mp4",
                                                                               enc, num_clips=3), enc)).mean(0)
                for i in range(2)]
    np.testing.assert_allclose(torch.stack(ours).numpy(), np.load(tmp_path / "f.npy"), rtol=1e-5, atol=1e-6)
