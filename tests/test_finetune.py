import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from videomoco import load_encoder
from videomoco.cli import main as cli
from videomoco.data.augment import KINETICS_MEAN, KINETICS_STD
from videomoco.eval.finetune import FinetuneConfig, evaluate

from eval_data import pretrain_checkpoint, tiny_args, ucf101_root

REPO = Path(__file__).resolve().parents[1]
LEVELS = (30, 110, 190)  # grey level that encodes class c in the brightness-coded videos


def coded_frames(label, n, num_frames=16, size=32):
    """Frames whose grey level says `label` up to a cut, then the next class: odd videos cut early."""
    cut = 8 if n % 2 == 0 else 4
    levels = [LEVELS[label] if t < cut else LEVELS[(label + 1) % 3] for t in range(num_frames)]
    return np.stack([np.full((size, size, 3), v, dtype=np.uint8) for v in levels])


class BrightnessEncoder(nn.Module):
    """Fake classifier: the class whose grey level is nearest to the clip's FIRST frame, as 10 * one-hot."""

    feature_dim = 3

    def forward_features(self, x):
        first = x[:, 0, 0] * KINETICS_STD[0] + KINETICS_MEAN[0]  # (B, H, W) in [0, 1]
        level = first.mean(dim=(1, 2)) * 255
        cls = (level[:, None] - torch.tensor(LEVELS, dtype=level.dtype)).abs().argmin(1)
        return 10.0 * nn.functional.one_hot(cls, 3).float()

    def forward(self, x):
        return self.forward_features(x)


def test_video_level_averages_the_clips_of_each_video(tmp_path, make_video):
    root = ucf101_root(tmp_path, make_video, train=1, test=2, frames_fn=coded_frames)
    cfg = FinetuneConfig(data=str(root), dataset="ucf101", frames=8, crop=32, num_clips=3, batch_size=4, workers=0,
                         device="cpu", out=str(tmp_path / "out"))
    metrics, cm = evaluate(cfg, BrightnessEncoder(), num_classes=3)
    # clips start at frames 0, 4, 8: even videos are right on 2 of 3 clips, odd ones on 1 of 3
    test_videos = [(label, g) for label in range(3) for g in (2, 3)]  # groups 2, 3 are the test videos
    clip_right = [2 if g % 2 == 0 else 1 for _, g in test_videos]
    assert metrics["num_test_clips"] == 3 * len(test_videos)
    assert metrics["clip_top1"] == pytest.approx(100.0 * sum(clip_right) / (3 * len(test_videos)))
    assert metrics["video_top1"] == pytest.approx(100.0 * np.mean([r >= 2 for r in clip_right]))
    assert cm.sum() == len(test_videos) and np.trace(cm) == sum(r >= 2 for r in clip_right)


def test_finetune_end_to_end(tmp_path, make_video, caplog, capsys):
    root = ucf101_root(tmp_path, make_video, missing=2)
    ckpt = tmp_path / "pretrain.pth"
    pretrain_checkpoint(ckpt)
    out = tmp_path / "ft"
    args = ["finetune", str(root), "--dataset", "ucf101", "--split", "1", "--pretrained", str(ckpt),
            *tiny_args(out, "--epochs", "2", "--schedule", "1", "--lr", "0.01")]
    assert cli(args) == 0
    assert "split files name 2 videos that are not on disk" in caplog.text
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    for key in ("clip_top1", "clip_top5", "video_top1", "video_top5"):
        assert 0.0 <= m[key] <= 100.0
    assert m["num_test_videos"] == 6 and m["num_test_clips"] == 12
    assert set(m["per_class_video_top1"]) == {"ApplyEyeMakeup", "Biking", "Diving"}
    assert [h["lr"] for h in m["history"]] == pytest.approx([0.01, 0.001])
    assert record["config"]["pretrained"] == str(ckpt)
    assert (out / "confusion.png").stat().st_size > 0 and (out / "summary.md").is_file()
    model = load_encoder(out / "checkpoint.pth")  # the fine-tuned model reloads with its 3-way head
    assert model.fc.out_features == 3 and (model.arch, model.width) == ("r3d_18", 8)

    # resuming with a head of another class count is refused before any training
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    torch.save({**state, "num_classes": 5}, tmp_path / "other.pth")
    assert cli(args + ["--resume", str(tmp_path / "other.pth"), "--epochs", "3"]) == 2
    assert "5-class head" in capsys.readouterr().err


def test_split_out_of_range(tmp_path, make_video, capsys):
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1)
    assert cli(["finetune", str(root), "--dataset", "ucf101", "--split", "4", *tiny_args(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("videomoco finetune: error: argument --split: must be an integer in [1, 3], "
                                       "got '4' (see --help)\n")


def test_resume_without_pretrained_reads_arch_and_width_from_the_checkpoint(tmp_path, make_video):
    # regression: `eval.py --resume ft/checkpoint.pth -e` built a width-64 r3d_18 and failed in load_state_dict
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1)
    small = ["--frames", "8", "--crop", "32", "--num-clips", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    first = ["finetune", str(root), "--arch", "mc3_18", "--width", "8", "--epochs", "1", "--out", str(tmp_path / "ft")]
    assert cli(first + small) == 0
    again = ["finetune", str(root), "--resume", str(tmp_path / "ft" / "checkpoint.pth"), "--evaluate",
             "--out", str(tmp_path / "ev"), *small]
    assert cli(again) == 0
    before = json.loads((tmp_path / "ft" / "metrics.json").read_text())["metrics"]
    after = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert after["clip_top1"] == before["clip_top1"] and after["video_top1"] == before["video_top1"]
    assert after["epochs"] == 1  # the checkpoint's epochs, not the --epochs default


def authors_eval_py():
    spec = importlib.util.spec_from_file_location("authors_eval", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_root_eval_py_translates_the_authors_flags(tmp_path):
    module = authors_eval_py()
    argv = module.translate([str(tmp_path), "-a", "r2plus1d_18", "-fpc", "32", "-cs", "224", "-cpv", "5", "--lr", "0.1",
                             "--schedule", "10", "20", "--wd", "5e-4", "--pretrained", "ckpt.pth", "--cos", "-e",
                             "--multiprocessing-distributed", "--dist-url", "tcp://localhost:10001", "--gpu", "0"])
    assert argv[:8] == ["finetune", str(tmp_path), "--protocol", "authors", "--dataset", "ucf101", "--split", "1"]
    pairs = dict(zip(argv[8::1], argv[9::1]))
    assert pairs["--arch"] == "r2plus1d_18" and pairs["--frames"] == "32" and pairs["--crop"] == "224"
    assert pairs["--num-clips"] == "5" and pairs["--lr"] == "0.1" and float(pairs["--weight-decay"]) == 5e-4
    assert pairs["--device"] == "cuda:0" and "--cos" in argv and "--evaluate" in argv
    assert argv[argv.index("--schedule") + 1 : argv.index("--schedule") + 3] == ["10", "20"]
    assert "--dist-url" not in argv and "--lr-decay" not in argv  # ignored / not given


def test_root_eval_py_runs_on_the_authors_data_layout(tmp_path, make_video):
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1, name="data")
    shutil.move(str(root / "ucfTrainTestlist"), str(tmp_path / "anno"))  # DATA/data/<Class>/*.avi + DATA/anno/*.txt
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    out = tmp_path / "ft"
    argv = authors_eval_py().translate([str(tmp_path), "--pretrained", str(tmp_path / "ckpt.pth"), "--epochs", "1",
                                        "-fpc", "8", "-cs", "32", "-cpv", "2", "-b", "2", "-j", "0", "--ckp_dir", str(out)])
    assert cli(argv + ["--device", "cpu"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert m["num_test_videos"] == 2 and m["num_classes"] == 2
    # the authors' protocol: their flags given here are the deviations; the best epoch on the test split labelled
    assert record["protocol"] == "authors" and set(record["deviations"]) == {"epochs", "frames", "crop", "num_clips", "batch_size"}
    assert m["best_on_test_epoch"] == 1 and m["best_on_test_video_top1"] == m["video_top1"]
    assert record["config"]["bn"] == "eval" and record["config"]["aggregation"] == "logits"


def test_grad_checkpointing_flag_trains_the_same_model(tmp_path, make_video, monkeypatch):
    import videomoco.eval.finetune as finetune

    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1)
    enabled = []
    monkeypatch.setattr(finetune, "set_grad_checkpointing", lambda m: enabled.append(m.set_grad_checkpointing(True)))
    states = {}
    for flag in ([], ["--grad_checkpointing"]):
        out = tmp_path / f"ft{len(flag)}"
        assert cli(["finetune", str(root), *tiny_args(out, "--epochs", "1", "--num-clips", "1"), *flag]) == 0
        states[len(flag)] = torch.load(out / "checkpoint.pth", weights_only=True)["state_dict"]
    assert len(enabled) == 1 and enabled[0].grad_checkpointing
    assert list(states[1]) == list(states[0])
    for key, value in states[0].items():  # same weights and BN running stats after a checkpointed epoch
        torch.testing.assert_close(states[1][key], value, atol=1e-6, rtol=1e-5, msg=key)


class TinyNoBN(nn.Module):
    """Conv3d -> mean pool -> Linear, no BN: micro-batches change nothing but the float summation order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("micro_batch", [2, 3])
def test_micro_batches_accumulate_to_the_whole_batch_update(micro_batch):
    from videomoco.eval.finetune import train_one_epoch

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (10, 3, 4, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    loader = [(clips[:5], labels[:5], None), (clips[5:], labels[5:], None)]  # 5 clips: uneven micro-batches
    torch.manual_seed(0)
    ref = TinyNoBN()
    results = {}
    for micro in (None, micro_batch):
        model = TinyNoBN()
        model.load_state_dict(ref.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        stats = train_one_epoch(model, loader, opt, "cpu", torch.Generator().manual_seed(1), micro_batch=micro)
        results[micro] = stats, model.state_dict()
    (loss, acc), whole = results[None]
    (loss_mb, acc_mb), split = results[micro_batch]
    assert loss_mb == pytest.approx(loss, rel=1e-5) and acc_mb == acc
    for key, value in whole.items():
        assert not torch.equal(value, ref.state_dict()[key])  # the two steps moved every tensor
        torch.testing.assert_close(split[key], value, atol=1e-6, rtol=1e-5, msg=key)



def test_a_resume_with_a_malformed_field_is_one_line_before_any_work(tmp_path, capsys):
    # regression: 'epoch': 'ten' was `ValueError: invalid literal for int()`
    (tmp_path / "data").mkdir()
    pretrain_checkpoint(tmp_path / "p.pth")
    torch.save({"format": "videomoco-finetune", "epoch": "ten", "arch": "r3d_18", "width": 8, "num_classes": 2,
                "state_dict": {}, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "ft.pth")
    args = ["finetune", str(tmp_path / "data"), "--pretrained", str(tmp_path / "p.pth"), "--resume",
            str(tmp_path / "ft.pth"), *tiny_args(tmp_path / "out")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"videomoco finetune: error: checkpoint {tmp_path / 'ft.pth'}: "
                                                   "field 'epoch' must be an integer >= 0, got 'ten'; refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ft.pth", "p.pth"]
