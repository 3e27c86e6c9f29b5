import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from videomoco import load_encoder
from videomoco.cli import main as cli
from videomoco.models import build_encoder

from conftest import enospc
from eval_data import pretrain_checkpoint


def tiny_input(seed=0):
    return torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_load_pretrain_checkpoint_returns_query_encoder_and_head(tmp_path):
    ref = pretrain_checkpoint(tmp_path / "ckpt.pth")
    model = load_encoder(tmp_path / "ckpt.pth").eval()
    x = tiny_input()
    assert torch.equal(model.forward_features(x), ref.forward_features(x))
    assert torch.equal(model(x), ref(x))  # fc = the pretraining projection head
    assert (model.arch, model.width) == ("r3d_18", 8)
    fresh = load_encoder(tmp_path / "ckpt.pth", num_classes=5)
    assert fresh.fc.out_features == 5


@pytest.mark.parametrize("head", ["mlp", "mlp_bn"])
@torch.no_grad()
def test_mlp_head_is_restored(tmp_path, head):
    ref = pretrain_checkpoint(tmp_path / "ckpt.pth", **{head: True})
    model = load_encoder(tmp_path / "ckpt.pth").eval()
    x = tiny_input()
    assert isinstance(model.fc, nn.Sequential)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@torch.no_grad()
def test_export_then_load_reproduces_features(tmp_path, fmt):
    ref = pretrain_checkpoint(tmp_path / "ckpt.pth", arch="r2plus1d_18")
    out = tmp_path / f"encoder.{fmt}"
    assert cli(["export", str(tmp_path / "ckpt.pth"), "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == {**meta, "arch": "r2plus1d_18", "width": 8, "feature_dim": 64}
    model = load_encoder(out).eval()
    assert isinstance(model.fc, nn.Identity)
    x = tiny_input(1)
    assert torch.equal(model.forward_features(x), ref.forward_features(x))
    # a torchvision-style model (400-way head) takes the export with only fc.* missing
    tv = build_encoder("r2plus1d_18", num_classes=400, width=8)
    sd = torch.load(out, weights_only=True) if fmt == "pth" else load_file(out)
    result = tv.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys


@torch.no_grad()
def test_bare_state_dict_infers_arch_and_width(tmp_path):
    torch.manual_seed(1)
    for arch in ("r3d_18", "mc3_18", "r2plus1d_18"):
        ref = build_encoder(arch, num_classes=400, width=8).eval()
        torch.save(ref.state_dict(), tmp_path / f"{arch}.pth")
        model = load_encoder(tmp_path / f"{arch}.pth").eval()
        assert (model.arch, model.width) == (arch, 8)
        x = tiny_input()
        assert torch.equal(model(x), ref(x))


def authors_checkpoint(path, torchvision_keys, width=64):
    """The authors' pretraining layout (module.queue, module.encoder_q.*, module.encoder_k.*) from fixture keys."""
    sd = {"module.queue": torch.randn(128, 8), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        for entry in torchvision_keys:
            shape = entry["shape"]
            if entry["key"].startswith("fc."):  # the projection head: Linear(512, dim=128)
                shape = [128, 512] if entry["key"] == "fc.weight" else [128]
            value = torch.zeros(shape, dtype=torch.long) if entry["dtype"] == "int64" else torch.randn(shape) * 0.01
            if entry["key"].endswith("running_var"):
                value = value.abs() + 1.0
            sd[prefix + entry["key"]] = value
    torch.save({"epoch": 200, "arch": "r3d_18", "state_dict": sd}, path)
    return sd


@torch.no_grad()
def test_authors_checkpoint_layout_loads(tmp_path, torchvision_fixtures):
    layout = json.loads((torchvision_fixtures / "r3d_18.json").read_text())
    keys = layout["state_dict"]
    assert len(keys) == 122
    sd = authors_checkpoint(tmp_path / "checkpoint_0200.pth.tar", keys)
    model = load_encoder(tmp_path / "checkpoint_0200.pth.tar", num_classes=101)
    # the eval.py rule: module.encoder_q.* minus fc, prefix stripped; fc = fresh 101-way
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, sd["module.encoder_q." + key]), key
    assert model.fc.out_features == 101 and model.width == 64


def test_mismatched_arch_is_a_one_line_error(tmp_path):
    pretrain_checkpoint(tmp_path / "ckpt.pth", arch="r3d_18")
    with pytest.raises(ValueError, match="r3d_18 encoder, not r2plus1d_18"):
        load_encoder(tmp_path / "ckpt.pth", arch="r2plus1d_18")
    torch.save(build_encoder("mc3_18", width=8).state_dict(), tmp_path / "mc3.pth")
    with pytest.raises(ValueError, match="does not match r3d_18") as err:
        load_encoder(tmp_path / "mc3.pth", arch="r3d_18")
    assert "\n" not in str(err.value)
    torch.save({"stem.0.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="cannot tell the architecture"):
        load_encoder(tmp_path / "junk.pth")


def test_unreadable_file_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"definitely not a zip")
    with pytest.raises(ValueError, match="cannot read checkpoint") as err:
        load_encoder(tmp_path / "bad.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "absent.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, small_fs, monkeypatch, capsys, fmt):
    # regression: RuntimeError: [enforce fail at inline_container.cc] ... (a full or read-only target)
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    disk = small_fs("disk", free=16 * 1024)  # the width-8 backbone takes ~0.5 MB
    if disk is None:
        disk = tmp_path / "disk"
        enospc(monkeypatch)
        if fmt == "safetensors":
            pytest.skip("the ENOSPC patch replaces torch.save only")
    out = disk / f"e.{fmt}"
    assert cli(["export", str(tmp_path / "ckpt.pth"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(rf"videomoco export: error: cannot write {re.escape(str(out))}: no space "
                                             r"left on device \(needs about [\d.]+ MB, [\d.]+ kB free there\)", err), err
    assert [p.name for p in disk.iterdir() if p.name != ".filler"] == []
