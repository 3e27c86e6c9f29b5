"""The shared command-line language: numbers checked against their meaning, one-line errors, one set of names.

The property tests draw values outside every numeric flag's range (from the flag's own `Number`) for
every command, and check each is refused with one line and exit code 2 before any work is done.
Set VIDEOMOCO_FLAGS_SEED to draw other values (a failure message names the seed and the arguments).
"""

import dataclasses
import math
import os
import random

import pytest
import torch
import yaml

from videomoco import cli
from videomoco.engine import checkpoint as ck
from videomoco.engine.config import (_FLAGS, DIST_TIMEOUT, ConfigError, PretrainConfig, _long_flag,
                                     config_from_args)
from videomoco.eval import common, finetune, knn, linear, robustness, suite
from videomoco.eval.extract import ExtractConfig
from videomoco.flags import SHARED, Number, canonical_flags

SEED = int(os.environ.get("VIDEOMOCO_FLAGS_SEED", "0"))
POSITIONALS = {  # enough for each command to parse: paths that do not exist (nothing may create them)
    "models": [], "index": ["ROOT"], "transcode": ["SRC", "DST"], "synth": ["OUT"], "pretrain": ["DATA"],
    "finetune": ["DATA"], "linear": ["DATA"], "knn": ["DATA"], "robustness": ["DATA"], "evaluate": [], "demo": [],
    "extract": ["DATA", "--pretrained", "P", "--out", "F"], "export": ["CKPT", "--out", "E"],
}


def invalid_values(number, rng):
    """Values outside `number`'s range, as text: non-finite, non-integer, below, above, an open end."""
    values = ["nan", "inf", "-inf", "ten"]
    if number.kind is int:
        values.append(f"{rng.randint(1, 9)}.5")
    step = (lambda: rng.randint(1, 10**rng.randint(0, 6))) if number.kind is int else (lambda: rng.uniform(1e-6, 1e6))
    for end, sign, is_open in ((number.low, -1, number.low_open), (number.high, 1, number.high_open)):
        if end is not None:
            values.append(str(end + sign * step()))
            if is_open:
                values.append(str(end))
    return [v for v in values if not number.accepts(_number_or_none(v, number.kind))]


def _number_or_none(text, kind):
    try:
        return kind(text)
    except ValueError:
        return None


def command_actions(command):
    """The argparse actions of one subcommand."""
    parser = cli.build_parser(command)
    return parser._subparsers._group_actions[0].choices[command]._actions


def spelled(flag, rng):
    """`flag` as a user may type it: `_` and `-` swapped at random in a long flag."""
    if flag.startswith("--") and rng.random() < 0.5:
        return "--" + flag[2:].translate(str.maketrans("_-", "-_"))
    return flag


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_every_number_flag_has_a_range(command):
    # a new `type=int` flag would accept -1 and nan: every number must say what it means
    raw = [a.option_strings for a in command_actions(command) if a.type in (int, float) and not a.choices]
    assert not raw, f"{command}: flags without a Number range: {raw}"


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_values_outside_every_range_are_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(f"{SEED}-{command}")
    checked = 0
    for action in command_actions(command):
        if not isinstance(action.type, Number):
            continue
        for value in invalid_values(action.type, rng):
            argv = [command, *POSITIONALS[command], f"{spelled(rng.choice(action.option_strings), rng)}={value}"]
            code = cli.main(argv)
            err = capsys.readouterr().err
            where = f"VIDEOMOCO_FLAGS_SEED={SEED}: videomoco {' '.join(argv)}"
            assert code == 2, where
            assert err.startswith(f"videomoco {command}: error: ") and err.count("\n") == 1, f"{where}: {err!r}"
            assert not os.listdir(tmp_path), f"{where} created {os.listdir(tmp_path)}"
            checked += 1
    assert checked or command in ("export",), f"{command} has no numeric flags to check"


def test_pretrain_config_file_values_outside_every_range(tmp_path):
    # config files skip argparse: the same Number checks run on their values
    rng = random.Random(f"{SEED}-yaml")
    path = tmp_path / "c.yaml"
    for flags, dest, _, kwargs in _FLAGS:
        number = kwargs.get("type")
        if not isinstance(number, Number):
            continue
        for text in invalid_values(number, rng):
            value = _number_or_none(text, float)
            if value is None:
                continue  # not a number at all: a YAML type error, tested in test_config
            value = int(value) if number.kind is int and math.isfinite(value) and value == int(value) else value
            path.write_text(yaml.safe_dump({"data": "d", dest: [value] if kwargs.get("nargs") else value}))
            with pytest.raises(ConfigError) as e:
                config_from_args({"config": str(path)})
            message = str(e.value)
            assert "\n" not in message and (_long_flag(flags) in message or dest in message), (dest, value, message)


@pytest.mark.parametrize("cfg_cls", [common.EvalConfig, finetune.FinetuneConfig, linear.LinearConfig, knn.KnnConfig,
                                     robustness.RobustnessConfig, suite.SuiteConfig, ExtractConfig])
def test_evaluation_configs_from_python_are_checked_like_flags(cfg_cls):
    rng = random.Random(f"{SEED}-{cfg_cls.__name__}")
    for f in dataclasses.fields(cfg_cls):
        number = common.RANGES.get(f.name)
        if number is None:
            continue
        for text in invalid_values(number, rng):
            value = _number_or_none(text, float)
            if value is None:
                continue
            value = int(value) if number.kind is int and math.isfinite(value) and value == int(value) else value
            bad = [value] if isinstance(getattr(cfg_cls(), f.name), list) else value
            with pytest.raises(ValueError, match=f"--{f.name.replace('_', '-')} must be"):
                common.check_config(cfg_cls(**{f.name: bad}))


def test_number_describes_and_accepts_its_range():
    decay = Number(float, 0, 1, low_open=True)
    assert decay.describe() == "a finite number in (0, 1]"
    assert [decay.accepts(v) for v in (0.0, 1e-9, 1.0, 1.5, math.nan)] == [False, True, True, False, False]
    world = Number(int, 1, special=(-1,))
    assert world.describe() == "-1 or an integer >= 1"
    assert [world.accepts(v) for v in (-1, 0, 1, 2.0, True)] == [True, False, True, False, False]
    assert world("-1") == -1 and decay("0.5") == 0.5


def test_long_flags_take_either_spelling():
    known = {"--frame_stride": None, "--lr-decay": None, "--x": None}
    assert canonical_flags(known, ["--frame-stride", "2", "--lr_decay=0.5", "--", "--frame-stride"]) == [
        "--frame_stride", "2", "--lr-decay=0.5", "--", "--frame-stride"]


PRETRAIN_SPELLING = ["-a", "mc3_18", "-fpc", "8", "-cs", "32", "-b", "4", "-j", "0", "--frame_stride", "2",
                     "--width", "8"]


@pytest.mark.parametrize("command", ["finetune", "linear", "knn", "robustness", "extract"])
def test_evaluation_commands_take_the_pretrain_flags(command):
    # regression: a user who had just pretrained typed the same flags and got "unrecognized arguments"
    parser = cli.build_parser(command)
    extra = ["--pretrained", "P", "--out", "F"] if command == "extract" else []
    args = parser.parse_args([command, "DATA", *extra, *PRETRAIN_SPELLING])
    assert (args.arch, args.frames, args.crop, args.batch_size, args.workers, args.frame_stride, args.width) == (
        "mc3_18", 8, 32, 4, 0, 2, 8)
    ours = parser.parse_args([command, "DATA", *extra, "--frames", "8", "--crop", "32", "--batch-size", "4",
                              "--frame-stride", "2"])
    assert (ours.frames, ours.crop, ours.batch_size, ours.frame_stride) == (8, 32, 4, 2)


def test_pretrain_takes_the_evaluation_spelling():
    args = cli.build_parser("pretrain").parse_args(["pretrain", "DATA", "--frames", "8", "--crop", "32",
                                                    "--batch-size", "4", "--frame-stride", "2", "--lr-decay", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.frame_per_clip, cfg.crop_size, cfg.batch_size, cfg.frame_stride, cfg.lr_decay) == (8, 32, 4, 2, 0.5)


def test_shared_names_are_spelled_alike_everywhere():
    # every command that has a shared setting accepts all of its names
    for command in POSITIONALS:
        strings = {s for a in command_actions(command) for s in a.option_strings}
        for name, flags in SHARED.items():
            if any(f in strings for f in flags):
                assert set(flags) <= strings, f"{command} spells {name} as only some of {flags}"


def test_pretrain_defaults_are_unchanged_by_the_types():
    assert config_from_args({"data": "d"}) == dataclasses.replace(PretrainConfig(data="d"), micro_batch="auto")


# --- values only a multi-process run uses, and the fields of a checkpoint (issue 27) ---

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_torchrun_only_values_are_refused_before_any_process_joins(tmp_path, capsys, monkeypatch):
    # regression: -b 7 on 2 ranks was a traceback on each rank, --dist_timeout 1e30 an OverflowError, 0.001 a line
    # buried in c10d's frames, --world_size -1 --rank 3 blamed DATA
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").mkdir()
    rng = random.Random(f"{SEED}-torchrun")
    cases = []
    for _ in range(5):
        world = rng.randint(2, 64)
        batch = world * rng.randint(1, 8) + rng.randint(1, world - 1)
        cases.append(({"RANK": str(rng.randrange(world)), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"}, ["-b", str(batch)],
                      f"--batch_size {batch} (the total over all processes) is not divisible by the world size {world} "
                      "(torchrun's WORLD_SIZE)"))
    for _ in range(3):
        world = rng.choice([-1, *range(1, 9)])
        rank = max(world, 1) + rng.randint(0, 100)
        cases.append(({}, ["--world_size", str(world), "--rank", str(rank)],
                      f"--rank {rank} needs a --world_size above it, got --world_size {world}"))
    cases.append(({"RANK": "0", "WORLD_SIZE": "two"}, [], "torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers"))
    cases += [({}, ["--dist_timeout", value], "--dist_timeout: must be a finite number in [1, 604800]")
              for value in invalid_values(DIST_TIMEOUT, rng)]
    for env, args, message in cases:
        for key in TORCHRUN_ENV:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        argv = ["pretrain", "DATA", "--device", "cpu", *args]
        code = cli.main(argv)
        err = capsys.readouterr().err
        where = f"VIDEOMOCO_FLAGS_SEED={SEED}: {env} videomoco {' '.join(argv)}"
        assert code == 2 and err.startswith("videomoco pretrain: error: ") and err.count("\n") == 1, f"{where}: {err!r}"
        assert message in err, f"{where}: {err!r}"
        assert os.listdir(tmp_path) == ["DATA"] and not os.listdir(tmp_path / "DATA"), where


BAD_FIELD_VALUES = ["ten", "", -5, -1, 2.5, math.nan, True, None, [], [1], {}, {"a": 1}]


def test_checkpoint_fields_outside_their_meaning_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # regression: 'epoch': 'ten' was a ValueError traceback, -5 failed at the first batch
    from test_pretrain import TINY, _resumable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").mkdir()
    rng = random.Random(f"{SEED}-fields")
    good = _resumable(tmp_path / "good.pth")
    for name, (what, ok) in ck.FIELDS.items():
        value = rng.choice([v for v in BAD_FIELD_VALUES if not ok(v)])
        torch.save({**good, name: value}, tmp_path / "c.pth")
        argv = ["pretrain", "DATA", *TINY, "--resume", "c.pth", "--log_dir", "L", "--ckp_dir", "C"]
        code = cli.main(argv)
        err = capsys.readouterr().err
        where = f"VIDEOMOCO_FLAGS_SEED={SEED}: {name!r}: {value!r}"
        assert code == 2 and err.count("\n") == 1, f"{where}: {err!r}"
        assert err.startswith(f"videomoco pretrain: error: checkpoint c.pth: field {name!r} must be {what}"), where
        assert sorted(os.listdir(tmp_path)) == ["DATA", "c.pth", "good.pth"], where
