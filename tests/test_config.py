"""Flags, YAML layering and validation of `videomoco pretrain`."""

import argparse
import dataclasses
import os
import re

import pytest
import yaml

from videomoco.engine.config import (ConfigError, PretrainConfig, add_arguments, check_paths, config_from_args,
                                     error_line, save_config)
from videomoco.flags import Parser


def parse(argv):
    return config_from_args(add_arguments(Parser()).parse_args(argv))


def test_authors_defaults():
    cfg = parse(["data"])
    assert (cfg.arch, cfg.workers, cfg.epochs, cfg.batch_size) == ("r3d_18", 32, 200, 256)
    assert (cfg.temporal_decay, cfg.crop_size, cfg.frame_per_clip, cfg.step_between_clips) == (0.99999, 112, 16, 1)
    assert (cfg.lr, cfg.lr_decay, cfg.wp_lr, cfg.schedule) == (0.03, 0.1, 0.0025, [120, 160])
    assert (cfg.momentum, cfg.weight_decay, cfg.print_freq) == (0.9, 1e-4, 10)
    assert (cfg.log_dir, cfg.ckp_dir, cfg.dist_backend) == ("logs_moco", os.path.join("logs_moco", "ckp"), "nccl")
    assert (cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t) == (128, 65536, 0.999, 0.07)
    assert (cfg.world_size, cfg.rank, cfg.seed, cfg.gpu) == (-1, -1, None, None)
    assert not (cfg.mlp or cfg.aug_plus or cfg.cos or cfg.warmup or cfg.multiprocessing_distributed)


def test_checkpoints_go_beside_the_logs_unless_given():
    assert parse(["d", "--log_dir", "runs/mine"]).ckp_dir == os.path.join("runs/mine", "ckp")
    assert parse(["d", "--log_dir", "runs/mine", "--ckp_dir", "elsewhere"]).ckp_dir == "elsewhere"
    # the resolved config (config.yaml) reloads to the same place
    assert PretrainConfig(**dataclasses.asdict(parse(["d", "--log_dir", "L"]))).ckp_dir == os.path.join("L", "ckp")


def test_authors_short_flags():
    cfg = parse(["d", "-a", "r2plus1d_18", "--lr", "0.005", "-fpc", "32", "-b", "32", "-j", "128",
                 "--schedule", "120", "160", "-t", "0.9", "-cs", "64", "-sbc", "2", "--wd", "0.001",
                 "--moco-k", "1024", "--mlp", "--multiprocessing_distributed", "--world_size", "1", "--rank", "0"])
    assert (cfg.arch, cfg.lr, cfg.frame_per_clip, cfg.batch_size, cfg.workers) == ("r2plus1d_18", 0.005, 32, 32, 128)
    assert (cfg.temporal_decay, cfg.crop_size, cfg.step_between_clips, cfg.weight_decay) == (0.9, 64, 2, 0.001)
    assert cfg.moco_k == 1024 and cfg.mlp and cfg.multiprocessing_distributed and cfg.world_size == 1


def test_yaml_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": "from_yaml", "lr": 0.5, "epochs": 7, "moco-k": 512}))
    cfg = parse(["--config", str(path), "--lr", "0.25"])
    assert (cfg.data, cfg.lr, cfg.epochs, cfg.moco_k) == ("from_yaml", 0.25, 7, 512)


def test_saved_config_round_trips(tmp_path):
    cfg = parse(["d", "--epochs", "3", "--schedule", "1", "2", "--seed", "5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert dataclasses.asdict(again) == {**dataclasses.asdict(cfg), "config": str(tmp_path / "config.yaml")}


@pytest.mark.parametrize("content, match", [
    ({"data": "d", "not_a_flag": 1}, "unknown keys not_a_flag"),
    ({"data": "d", "precision": "fp8"}, "precision='fp8' is not one of"),
    ({"lr": 0.1}, "DATA is required"),
])
def test_bad_yaml_is_a_one_line_error(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=match) as e:
        parse(["--config", str(path)])
    assert "\n" not in str(e.value)


def test_bad_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["d", "--precision", "fp8"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_dataclass_defaults_match_help():
    help_text = " ".join(add_arguments(argparse.ArgumentParser()).format_help().split())
    assert f"(default: {PretrainConfig().adv_start_epoch})" in help_text
    assert "--temporal_decay" in help_text and "--moco-k" in help_text


def test_yaml_values_are_converted_like_flags(tmp_path):
    # regression: YAML reads `lr: 1e-3` as a string, and `lr: abc` crashed deep in the optimiser
    path = tmp_path / "c.yaml"
    path.write_text("data: d\nlr: 1e-3\nschedule: [3, 4]\nmlp: true\nseed: null\nepochs: 2\n")
    cfg = parse(["--config", str(path)])
    assert (cfg.lr, cfg.schedule, cfg.mlp, cfg.seed, cfg.epochs) == (0.001, [3, 4], True, None, 2)
    bad = [("lr: abc", "lr: 'abc' is not a number"), ("epochs: 1.5", "epochs: 1.5 is not an integer"),
           ("mlp: maybe", "mlp: 'maybe' is not true or false"), ("width: [8]", "width: \\[8\\] is not an integer"),
           ("schedule: [a]", "schedule: \\['a'\\] is not an integer")]
    for line, match in bad:
        path.write_text(f"data: d\n{line}\n")
        with pytest.raises(ConfigError, match=match):
            parse(["--config", str(path)])


def test_error_line_unwraps_dataloader_worker_errors():
    wrapped = RuntimeError("Caught DataFailureError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\n    raise X\n"
                           "videomoco.data.datasets.DataFailureError: 3 of 9 videos failed to decode\n")
    assert error_line(wrapped) == "3 of 9 videos failed to decode"
    assert error_line(ValueError("first line\nsecond")) == "first line"
    assert error_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("flags, match", [
    (["-cs", "0"], "-cs/--crop_size/--crop: must be an integer >= 1, got '0'"),
    (["--frame_stride", "0"], "--frame_stride: must be an integer >= 1"),
    (["--width", "0"], "--width: must be an integer >= 1"), (["-j", "-1"], "--workers: must be an integer >= 0"),
    (["-t", "1.5"], "--temporal_decay: must be a finite number in \\(0, 1\\]"),
    (["--lr", "-1"], "--lr/--learning-rate: must be a finite number >= 0"),
    (["--lr", "nan"], "must be a finite number >= 0, got 'nan'"), (["--wd", "inf"], "got 'inf'"),
    (["--save_every", "0"], "--save_every: must be an integer >= 1"), (["--epochs", "1.5"], "must be an integer"),
    (["--world_size", "0"], "--world_size: must be -1 or an integer >= 1"),
])
def test_bad_numbers_are_one_line_parse_errors(capsys, flags, match):
    # regression: -cs 0 / --frame_stride 0 failed in the data workers and quarantined healthy videos;
    # --lr nan trained and saved NaN weights; --save_every 0 failed after a full epoch
    with pytest.raises(SystemExit) as e:
        parse(["d", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert re.search(match, err), err


@pytest.mark.parametrize("values, match", [
    ({"lr": float("nan")}, "--lr must be a finite number >= 0, got nan"),
    ({"moco_k": 3, "batch_size": 4}, "--moco-k 3 must be at least the batch size 4"),
    ({"start_epoch": 5, "epochs": 1}, "--start_epoch 5 leaves nothing to train with --epochs 1"),
    ({"dist_url": "junk://x"}, "--dist_url must be tcp://HOST:PORT"), ({"device": "gpu0"}, "--device must be"),
    ({"schedule": [10, -1]}, "--schedule must be an integer >= 0, got -1"),
    ({"g_grad": "authors", "g_loss": "contrastive"}, "--g_grad authors adds D's loss to G's"),
])
def test_config_values_are_checked_like_flags(tmp_path, values, match):
    # config files and Python callers get the flags' checks, and the checks between values
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": "d", **values}))
    with pytest.raises(ConfigError, match=match):
        parse(["--config", str(path)])


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = parse([str(tmp_path), "--ckp_dir", str(tmp_path / "file")])
    with pytest.raises(ConfigError, match="--ckp_dir .*file is a file, not a directory"):
        check_paths(cfg)
    cfg = parse([str(tmp_path), "--log_dir", str(tmp_path / "file" / "sub")])
    with pytest.raises(ConfigError, match="--log_dir .*file is a file, not a directory"):
        check_paths(cfg)
    with pytest.raises(ConfigError, match="--resume .*nope.pth.tar: no such file"):
        check_paths(parse([str(tmp_path), "--resume", str(tmp_path / "nope.pth.tar")]))
    with pytest.raises(ConfigError, match="DATA .*missing does not exist"):
        check_paths(parse([str(tmp_path / "missing")]))
    assert check_paths(parse([str(tmp_path), "--ckp_dir", str(tmp_path / "a" / "b")]))


def test_non_utf8_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data: d\nlr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config .*utf-8"):
        parse(["--config", str(path)])


def test_augmentation_strength_flags():
    cfg = parse(["d"])
    strengths = lambda cfg: (cfg.aug_flip, cfg.aug_jitter, cfg.aug_hue, cfg.aug_grayscale, cfg.aug_scale_min)  # noqa
    assert strengths(cfg) == (0.5, 0.4, 0.1, 0.2, 0.2)
    cfg = parse(["d", "--aug_flip", "0", "--aug_jitter", "0", "--aug_hue", "0.5", "--aug_grayscale", "0.5",
                 "--aug_scale_min", "0.6"])
    assert strengths(cfg) == (0.0, 0.0, 0.5, 0.5, 0.6)
    with pytest.raises(SystemExit):
        parse(["d", "--aug_hue", "0.7"])


@pytest.mark.parametrize("flag", ["--ckp_dir", "--log_dir"])
def test_pretrain_refuses_an_output_path_that_is_a_file_before_any_work(tmp_path, capsys, flag):
    # regression: a --ckp_dir / --log_dir naming a file failed with FileExistsError after a full epoch
    from videomoco import cli

    (tmp_path / "data").mkdir()
    (tmp_path / "taken").write_text("x")
    others = {"--ckp_dir": tmp_path / "ckp", "--log_dir": tmp_path / "log"}
    others[flag] = tmp_path / "taken"
    code = cli.main(["pretrain", str(tmp_path / "data"), *(str(x) for kv in others.items() for x in kv)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"videomoco pretrain: error: {flag} {tmp_path / 'taken'} is a file, not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "taken"]  # no index, no log, no checkpoint


def test_recipe_choices_and_the_authors_defaults():
    cfg = parse(["d"])
    assert (cfg.aug, cfg.aug_draw, cfg.decay_unit, cfg.decay_on) == ("ours", "auto", "step", "logit")
    assert (cfg.shuffle_groups, cfg.adv_optimizer) == (0, "carry")
    from videomoco.engine.config import authors_flags

    theirs = parse([*authors_flags(), "d"])  # what train.py parses
    assert (theirs.aug, theirs.shuffle_groups, theirs.adv_optimizer) == ("authors", 1, "fresh")
    assert parse([*authors_flags(), "d", "--aug_plus"]).aug == "authors_plus"  # their --aug_plus: MoCoAugmentV2
    assert parse([*authors_flags(), "d", "--aug", "ours", "--shuffle_groups", "0"]).shuffle_groups == 0  # flags win
    assert parse(["d", "--decay_unit", "key", "--decay_on", "exp"]).decay_unit == "key"
    with pytest.raises(ConfigError, match="decay_unit='age' is not one of step, key"):
        PretrainConfig(data="d", decay_unit="age")
