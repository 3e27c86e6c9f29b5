"""`videomoco bench NAME [ARGS...]`: run `benchmarks/<NAME>.py` from the repository checkout.

The benchmarks live next to the package, not inside it, so this command finds the checkout
(the repository that holds this editable install, else the current directory), puts it on
`sys.path` and calls `benchmarks.<NAME>.main(ARGS)`. From a wheel there is no checkout: it says so.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from videomoco.flags import fail


class BenchmarkNotFound(RuntimeError):
    """No benchmarks/ checkout, or no benchmark of that name in it."""


@dataclass
class BenchConfig:
    name: str
    args: list[str] = field(default_factory=list)


def find_benchmarks_root():
    """The directory that holds `benchmarks/__init__.py`: the repo of this install, else the cwd."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file():
            return root
    raise BenchmarkNotFound(
        "benchmarks/ not found: run `videomoco bench` from a source checkout (it is not part of the wheel)"
    )


def list_benchmarks(root=None):
    """Names of the runnable benchmarks (every `benchmarks/*.py` except `common` and private files)."""
    root = root or find_benchmarks_root()
    return sorted(p.stem for p in (root / "benchmarks").glob("*.py") if p.stem != "common" and not p.stem.startswith("_"))


def load_benchmark(name):
    """Import `benchmarks.<name>` from the checkout and return the module."""
    root = find_benchmarks_root()
    available = list_benchmarks(root)
    if name not in available:
        raise BenchmarkNotFound(f"unknown benchmark {name!r}; available: {', '.join(available) or 'none'}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{name}")
    # Another installed top-level `benchmarks` package would shadow ours: refuse rather than run it.
    if Path(module.__file__).resolve().parent != (root / "benchmarks").resolve():
        raise BenchmarkNotFound(f"`benchmarks` resolves to {module.__file__}, not the checkout at {root}")
    return module


def run(cfg):
    """Run one benchmark; returns `{"name", "returncode"}`."""
    returncode = load_benchmark(cfg.name).main(list(cfg.args))
    return {"name": cfg.name, "returncode": returncode or 0}


def add_arguments(parser):
    parser.add_argument("name", help="benchmark module in benchmarks/, e.g. train_step, data, index")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (try --help)")


def main(args):
    try:
        return run(BenchConfig(args.name, list(args.args)))["returncode"]
    except BenchmarkNotFound as e:
        return fail("bench", e)
