"""The command-line language every `videomoco` command shares.

- `Number`: an argparse `type` that parses a finite int or float and checks it against its meaning
  (`Number(int, low=1)`, `Number(float, 0, 1)`); the same object validates config files and dataclass
  values (`check`), and its bounds are attributes, so a test can draw values outside them.
- `SHARED`: the names of the flags several commands have (`-a/--arch`, `-fpc/--frames`, `-b`, `-j`, ...),
  so that the flags a user pretrained with are accepted by every evaluation command too.
- `Parser`: bad flags are one line, `videomoco CMD: error: ...`, exit 2 (no usage dump), and every long flag
  is accepted with `_` or `-` (`--frame_stride` = `--frame-stride`).

This module imports nothing of videomoco: every layer (data, engine, eval) may use it.
"""

import argparse
import dataclasses
import math
import sys


class Number:
    """A finite number of `kind` (int or float) in [low, high] (an end excluded when open), or one of `special`."""

    def __init__(self, kind=float, low=None, high=None, low_open=False, high_open=False, special=()):
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open, self.special = low_open, high_open, tuple(special)

    def describe(self):
        """'an integer >= 1', 'a number in (0, 1]', '-1 or an integer >= 0', ..."""
        noun = "an integer" if self.kind is int else "a finite number"
        low, high = (None if v is None else f"{v:g}" for v in (self.low, self.high))
        if low is not None and high is not None:
            text = f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {low}"
        elif high is not None:
            text = f"{noun} {'<' if self.high_open else '<='} {high}"
        else:
            text = noun
        return " or ".join([*map(str, self.special), text])

    def accepts(self, value):
        """True if `value` (already a number) is valid."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.special:
            return True
        if self.kind is int and not isinstance(value, int) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return self.high is None or not (value > self.high or self.high_open and value == self.high)

    def check(self, value, name):
        """`value` if valid, else `ValueError("NAME must be ..., got VALUE")` (config files, dataclasses)."""
        if not self.accepts(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def __call__(self, text):
        """Parse a flag's text (argparse calls this)."""
        try:
            value = self.kind(str(text).strip())
        except ValueError:
            value = None
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self):
        return f"Number({self.describe()})"


POSITIVE_INT = Number(int, 1)
COUNT = Number(int, 0)  # 0 allowed (workers: 0 = in the main process; steps: 0 = off)
SEED = Number(int, 0, 2**31 - 1)
REAL = Number(float)
NON_NEGATIVE = Number(float, 0.0)
POSITIVE = Number(float, 0.0, low_open=True)
PROBABILITY = Number(float, 0.0, 1.0)
MOMENTUM = Number(float, 0.0, 1.0, high_open=True)
FACTOR = Number(float, 0.0, 1.0, low_open=True)  # a decay factor, a crop's smallest area
RATIO = Number(float, 0.0, 1.0, high_open=True)  # a fraction of frames dropped
CRF = Number(int, 0, 51)  # x264's quality scale

# canonical name -> the option strings every command that has the setting accepts (the authors' short
# flags first); a command adds its own dest, default and help
SHARED = {
    "arch": ("-a", "--arch"),
    "frames": ("-fpc", "--frame_per_clip", "--frames"),
    "crop": ("-cs", "--crop_size", "--crop"),
    "batch_size": ("-b", "--batch_size"),
    "workers": ("-j", "--workers"),
    "frame_stride": ("--frame_stride",),
    "lr": ("--lr", "--learning-rate"),
    "lr_decay": ("--lr_decay", "--learning-rate_decay"),
    "wp_lr": ("--wp_lr", "--warmup_learning-rate"),
    "weight_decay": ("--wd", "--weight_decay"),
    "momentum": ("--momentum",),
    "epochs": ("--epochs",),
    "seed": ("--seed",),
    "device": ("--device",),
    "width": ("--width",),
}


def canonical_flags(known, args):
    """`args` with each `--long_flag` not in `known` replaced by the spelling in `known` that differs only in
    `_` / `-` (`--frame-stride=2` -> `--frame_stride=2`); nothing after a `--` separator is touched."""
    spellings = {flag.replace("_", "-"): flag for flag in known if flag.startswith("--")}
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name not in known:
            arg = spellings.get(name.replace("_", "-"), name) + sep + value
        out.append(arg)
    return out


def attach_dash_values(known, args):
    """`args` with a value that starts with `-` joined to the flag before it (`--memory_budget -1GB` ->
    `--memory_budget=-1GB`) when that flag takes one value and the value is no flag: argparse would report
    "expected one argument" instead of checking the value."""
    out = list(args)
    for i in range(len(out) - 1):
        if out[i] == "--":
            break
        action = known.get(out[i])
        value = out[i + 1]
        takes_one = action is not None and action.nargs is None and isinstance(action, argparse._StoreAction)
        if takes_one and value.startswith("-") and value != "--" and value.split("=")[0] not in known:
            out[i], out[i + 1] = f"{out[i]}={value}", None
    return [a for a in out if a is not None]


def defaults(cls):
    """The defaults of dataclass `cls` by field name (fields without one are left out): what a
    command's `add_arguments` passes as `default=`, so that defaults live only in the dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def config_from(cls, args, **overrides):
    """Dataclass `cls` built by keyword from the parsed `args` (the attributes named like its fields),
    with `overrides` for the values a command converts."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(given | overrides))


def fail(command, message, code=2):
    """Print `videomoco COMMAND: error: MESSAGE` (one line) on stderr; returns `code` (2: bad input)."""
    print(f"videomoco {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors (exit 2) and `_` / `-` spellings of every long flag."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        args = attach_dash_values(self._option_string_actions, canonical_flags(self._option_string_actions, args))
        return super().parse_known_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
