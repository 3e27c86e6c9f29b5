"""`videomoco.eval.common`: the checks and the one-line errors every evaluation command shares."""

import logging

import pytest

from videomoco.cli import main as cli
from videomoco.eval import common

from eval_data import pretrain_checkpoint, tiny_args, ucf101_root


@pytest.fixture
def root(tmp_path, make_video):
    return ucf101_root(tmp_path, make_video, classes=("A", "B"), train=1, test=1)


def error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["finetune", "linear", "knn", "robustness"])
def test_missing_data_is_one_line_exit_2(tmp_path, capsys, command):
    # regression: these commands ended with a traceback and exit code 1
    assert cli([command, str(tmp_path / "nope"), *tiny_args(tmp_path / "o")]) == 2
    err = error(capsys)
    assert err.startswith(f"videomoco {command}: error: ") and "nope is neither an index" in err


def test_corrupt_checkpoint_and_missing_files_are_one_line(tmp_path, root, capsys):
    (tmp_path / "corrupt.pth").write_bytes(b"\x01\x02 random bytes")
    assert cli(["knn", str(root), "--pretrained", str(tmp_path / "corrupt.pth"), *tiny_args(tmp_path / "o")]) == 2
    assert "not a PyTorch checkpoint" in error(capsys)
    assert cli(["export", str(tmp_path / "corrupt.pth"), "--out", str(tmp_path / "e.pth")]) == 2
    assert error(capsys).startswith("videomoco export: error: cannot read checkpoint")
    assert cli(["extract", str(tmp_path / "nope"), "--pretrained", str(tmp_path / "c.pth"), "--out", str(tmp_path / "f"),
                "--workers", "0", "--device", "cpu"]) == 2
    assert error(capsys).startswith("videomoco extract: error: ")


def test_checkpoint_of_another_arch_is_one_line(tmp_path, root, capsys):
    pretrain_checkpoint(tmp_path / "r3d.pth", arch="r3d_18")
    args = ["linear", str(root), "--pretrained", str(tmp_path / "r3d.pth"), *tiny_args(tmp_path / "o"), "--arch", "mc3_18"]
    assert cli(args) == 2
    assert "r3d_18 encoder, not mc3_18" in error(capsys)


@pytest.mark.parametrize("flag, value", [("-fpc", "0"), ("-cs", "0"), ("-b", "0"), ("-j", "-1")])
def test_bad_values_fail_before_any_video_is_read(tmp_path, root, capsys, flag, value):
    # regression: --frames 0 put a healthy video into quarantine.csv ("training-time decode error")
    assert cli(["finetune", str(root), *tiny_args(tmp_path / "o"), flag, value]) == 2
    assert error(capsys).startswith(f"videomoco finetune: error: argument {flag}")
    quarantine = root / "index" / "quarantine.csv"
    assert not quarantine.exists() or len(quarantine.read_text().splitlines()) <= 1


def test_open_split_logs_each_subset_once(tmp_path, make_video, caplog):
    # regression: finetune never reported its train-set size
    root = ucf101_root(tmp_path, make_video, classes=("A", "B"), train=2, test=1)
    cfg = common.EvalConfig(data=str(root), dataset="ucf101", device="cpu")
    with caplog.at_level(logging.INFO, logger="videomoco.eval.common"):
        for _ in range(2):
            common.open_split(cfg, "train")
            common.open_split(cfg, "test")
    lines = [r.getMessage() for r in caplog.records if r.name == "videomoco.eval.common" and "videos," in r.getMessage()]
    assert lines == [f"{root} train: 4 videos, 2 classes (split 1)", f"{root} test: 2 videos, 2 classes (split 1)"]
