"""The `videomoco` command: one subcommand per job.

Each subcommand lives next to the code it drives, in a module that exposes
`add_arguments(parser)` and `main(args) -> int | None`. Modules are imported
only when their subcommand runs, so `videomoco --help` stays fast.
"""

import importlib
import sys

from videomoco import __version__
from videomoco.engine.logger import setup_logging
from videomoco.flags import Parser

# name -> (module, one-line help)
COMMANDS = {
    "models": ("videomoco.method.costs", "list the encoders and the generators with their parameters and FLOPs"),
    "index": ("videomoco.data.index", "scan a dataset root and write an index (quarantining broken videos)"),
    "transcode": ("videomoco.data.transcode", "re-encode a dataset for fast random access"),
    "synth": ("videomoco.data.synthetic", "render the synthetic motion dataset"),
    "pretrain": ("videomoco.engine.pretrain", "pretrain an encoder with VideoMoCo"),
    "finetune": ("videomoco.eval.finetune", "fine-tune a pretrained encoder on a labeled dataset"),
    "linear": ("videomoco.eval.linear", "linear probe on frozen features"),
    "knn": ("videomoco.eval.knn", "kNN classification and retrieval on frozen features"),
    "robustness": ("videomoco.eval.robustness", "feature stability under dropped frames"),
    "extract": ("videomoco.eval.extract", "extract one feature vector per video"),
    "export": ("videomoco.eval.export", "export the query encoder as torchvision-compatible weights"),
    "evaluate": ("videomoco.eval.suite", "the whole evaluation protocol in one table"),
    "demo": ("videomoco.demo", "the end-to-end demo on synthetic data (CPU, no download)"),
    "bench": ("videomoco.bench", "run a benchmark from benchmarks/"),
}


def build_parser(command=None):
    parser = Parser(prog="videomoco", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"videomoco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        args, unknown = build_parser(command).parse_known_args(argv)
    except SystemExit as e:  # a bad flag (one line, 2), --help or --version (0): a code, as from a command
        return e.code
    if unknown:  # said with the subcommand's name: it is the one that does not know them
        prog = f"videomoco {args.command}" if args.command else "videomoco"
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see --help)", file=sys.stderr)
        return 2
    if args.command is None:
        build_parser().print_help()
        return 1
    setup_logging()  # the commands' INFO lines (what was planned, read, skipped) on stderr
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
