"""`videomoco.eval.common`: the checks and the one-line errors every evaluation command shares."""

import logging

import pytest
import torch

from videomoco.cli import main as cli
from videomoco.eval import common

from conftest import tree
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


# --- refused before any work (issue 27): weights, --arch, --out ---

def weights_commands(data, ckpt, out):
    """Every command that loads weights, with a tiny run's flags."""
    tiny = tiny_args(out)
    return {
        "knn": ["knn", data, "--pretrained", ckpt, *tiny], "linear": ["linear", data, "--pretrained", ckpt, *tiny],
        "finetune": ["finetune", data, "--pretrained", ckpt, *tiny], "robustness": ["robustness", data, "--pretrained", ckpt, *tiny],
        "evaluate": ["evaluate", "--ucf101", data, "--pretrained", ckpt, *tiny],
        "extract": ["extract", data, "--pretrained", ckpt, "--out", f"{out}/f", "--workers", "0", "--device", "cpu"],
        "export": ["export", ckpt, "--out", f"{out}/e.pth"],
    }


@pytest.mark.parametrize("command", ["knn", "linear", "finetune", "robustness", "evaluate", "extract", "export"])
def test_nonfinite_weights_are_refused_by_every_command_before_any_work(tmp_path, capsys, command):
    # regression: knn reported chance accuracy with exit 0, export wrote the NaNs, finetune blamed --lr
    root = tmp_path / "data"  # refused before the dataset is read: no videos needed
    root.mkdir()
    pretrain_checkpoint(tmp_path / "nan.pth")
    ckpt = torch.load(tmp_path / "nan.pth", weights_only=True)
    ckpt["state_dict"]["encoder_q.stem.0.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    before = tree(tmp_path)
    assert cli(weights_commands(str(root), str(tmp_path / "nan.pth"), str(tmp_path / "out"))[command]) == 2
    err = error(capsys)
    assert err.startswith(f"videomoco {command}: error: checkpoint {tmp_path / 'nan.pth'}: 1 tensors of its weights "
                          "are NaN/Inf, e.g. stem.0.weight")
    assert tree(tmp_path) == before  # no index, no --out


def test_an_unknown_arch_or_an_unwritable_out_is_refused_before_the_dataset_is_read(tmp_path, root, capsys,
                                                                                    read_only_dir):
    # regression: finetune --arch nope indexed the dataset first; knn --out RO/k failed after extracting features
    before = tree(tmp_path)
    assert cli(["finetune", str(root), *tiny_args(tmp_path / "o"), "--arch", "nope"]) == 2
    assert "--arch 'nope' is not one of" in error(capsys)
    assert cli(["knn", str(root), *tiny_args(read_only_dir / "k")]) == 2
    assert f"--out {read_only_dir / 'k'}: {read_only_dir} is not writable" in error(capsys)
    assert cli(["export", str(tmp_path / "c.pth"), "--out", str(read_only_dir / "e.pth")]) == 2
    assert error(capsys).startswith("videomoco export: error: checkpoint not found")
    pretrain_checkpoint(tmp_path / "c.pth")
    assert cli(["export", str(tmp_path / "c.pth"), "--out", str(read_only_dir / "e.pth")]) == 2
    assert f"--out {read_only_dir}: {read_only_dir} is not writable" in error(capsys)
    assert tree(tmp_path) == before | {"c.pth"}
