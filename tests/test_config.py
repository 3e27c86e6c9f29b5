"""Flags, YAML layering and validation of `videomoco pretrain`."""

import argparse
import dataclasses

import pytest
import yaml

from videomoco.engine.config import (ConfigError, PretrainConfig, add_arguments, config_from_args, error_line,
                                     save_config)


def parse(argv):
    return config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_authors_defaults():
    cfg = parse(["data"])
    assert (cfg.arch, cfg.workers, cfg.epochs, cfg.batch_size) == ("r3d_18", 32, 200, 256)
    assert (cfg.temporal_decay, cfg.crop_size, cfg.frame_per_clip, cfg.step_between_clips) == (0.99999, 112, 16, 1)
    assert (cfg.lr, cfg.lr_decay, cfg.wp_lr, cfg.schedule) == (0.03, 0.1, 0.0025, [120, 160])
    assert (cfg.momentum, cfg.weight_decay, cfg.print_freq) == (0.9, 1e-4, 10)
    assert (cfg.log_dir, cfg.ckp_dir, cfg.dist_backend) == ("logs_moco", "checkpoints_moco", "nccl")
    assert (cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t) == (128, 65536, 0.999, 0.07)
    assert (cfg.world_size, cfg.rank, cfg.seed, cfg.gpu) == (-1, -1, None, None)
    assert not (cfg.mlp or cfg.aug_plus or cfg.cos or cfg.warmup or cfg.multiprocessing_distributed)


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
    (["-cs", "0"], "--crop_size must be >= 1"), (["--frame_stride", "0"], "--frame_stride must be >= 1"),
    (["--width", "0"], "--width must be >= 1"), (["-j", "-1"], "--workers must be >= 0"),
    (["--moco-k", "3", "-b", "4"], "--moco-k 3 must be at least the batch size 4"),
    (["-t", "1.5"], "--temporal_decay must be in"), (["--lr", "-1"], "--lr and --g_lr must be >= 0"),
])
def test_values_that_would_fail_in_workers_are_config_errors(flags, match):
    # regression: -cs 0 / --frame_stride 0 failed in the data workers and quarantined healthy videos;
    # --moco-k < batch, --width 0, -t 1.5, --lr -1 ended in tracebacks
    with pytest.raises(ConfigError, match=match):
        parse(["d", *flags])


def test_augmentation_strength_flags():
    cfg = parse(["d"])
    assert (cfg.aug_flip, cfg.aug_jitter, cfg.aug_hue, cfg.aug_grayscale, cfg.aug_scale_min) == (0.5, 0.4, 0.1, 0.2, 0.2)
    cfg = parse(["d", "--aug_flip", "0", "--aug_jitter", "0", "--aug_hue", "0.5", "--aug_grayscale", "0.5",
                 "--aug_scale_min", "0.6"])
    assert (cfg.aug_flip, cfg.aug_jitter, cfg.aug_hue, cfg.aug_grayscale, cfg.aug_scale_min) == (0.0, 0.0, 0.5, 0.5, 0.6)
    with pytest.raises(ConfigError, match="--aug_hue"):
        parse(["d", "--aug_hue", "0.7"])
