import subprocess
import sys

from videomoco import __version__
from videomoco.cli import COMMANDS, main


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "videomoco", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"videomoco {__version__}"


def test_help_lists_every_command(capsys):
    assert main([]) == 1
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text


def _defaults_cases():
    """(argv, dataclass, how the command builds it from the parsed flags) for every command with a config."""
    from videomoco.bench import BenchConfig
    from videomoco.data.index import IndexConfig
    from videomoco.data.synthetic import SynthConfig
    from videomoco.data.transcode import TranscodeConfig
    from videomoco.demo import DemoConfig
    from videomoco.engine.config import PretrainConfig, config_from_args
    from videomoco.eval import common, extract, finetune, knn, linear, robustness, suite
    from videomoco.eval.export import ExportConfig
    from videomoco.flags import config_from
    from videomoco.models.registry import ModelsConfig

    def evaluation(cls):
        return lambda args: common.config_from_args(cls, args)

    return [
        (["index", "R"], IndexConfig, lambda a: config_from(IndexConfig, a)),
        (["transcode", "S", "D"], TranscodeConfig, lambda a: config_from(TranscodeConfig, a)),
        (["synth", "O"], SynthConfig, lambda a: config_from(SynthConfig, a)),
        (["demo"], DemoConfig, lambda a: config_from(DemoConfig, a)),
        (["models"], ModelsConfig, lambda a: config_from(ModelsConfig, a)),
        (["export", "C", "--out", "x.pth"], ExportConfig, lambda a: config_from(ExportConfig, a)),
        (["bench", "data"], BenchConfig, lambda a: BenchConfig(a.name, list(a.args))),
        (["pretrain", "DATA"], PretrainConfig, config_from_args),
        (["linear", "DATA"], linear.LinearConfig, evaluation(linear.LinearConfig)),
        (["knn", "DATA"], knn.KnnConfig, evaluation(knn.KnnConfig)),
        (["finetune", "DATA"], finetune.FinetuneConfig, evaluation(finetune.FinetuneConfig)),
        (["robustness", "DATA"], robustness.RobustnessConfig, evaluation(robustness.RobustnessConfig)),
        (["extract", "DATA", "--pretrained", "P", "--out", "F"], extract.ExtractConfig, evaluation(extract.ExtractConfig)),
        (["evaluate", "--ucf101", "U"], suite.SuiteConfig, evaluation(suite.SuiteConfig)),
    ]


def test_every_command_with_a_config_is_covered():
    assert {argv[0] for argv, _, _ in _defaults_cases()} == set(COMMANDS)


def test_parsed_defaults_are_the_dataclass_defaults():
    """With only the required arguments, every command builds its config dataclass with the dataclass's own
    defaults: no flag repeats (and drifts from) a default."""
    import dataclasses

    from videomoco.cli import build_parser
    from videomoco.engine.config import resolve_device
    from videomoco.eval import protocols
    from videomoco.flags import defaults

    for argv, cls, build in _defaults_cases():
        cfg = build(build_parser(argv[0]).parse_args(argv))
        assert isinstance(cfg, cls)
        given = set(argv[1:])
        for name, default in defaults(cls).items():
            value = getattr(cfg, name)
            if isinstance(value, str) and value in given:
                continue  # a required argument of this argv
            if name == "device" and default == "auto" and value == resolve_device("auto"):
                continue  # the evaluations resolve "auto" when the config is made
            if name == "ckp_dir" and default == "" and value == f"{cfg.log_dir}/ckp":
                continue  # pretraining puts its checkpoints beside --log_dir when the config is made
            if default is None and name in protocols.owned_fields(cfg):
                default = protocols.value(cfg, name)  # left to the protocol, resolved when the config is made
            assert value == default, f"videomoco {argv[0]}: {name} parsed as {value!r}, the dataclass says {default!r}"
        assert {f.name for f in dataclasses.fields(cls)} >= set(defaults(cls))


def test_an_unrecognised_flag_is_named_with_the_subcommand(capsys):
    # regression: "videomoco: error: unrecognized arguments" did not say which command does not know it
    assert main(["knn", "DATA", "--nope", "3"]) == 2
    assert capsys.readouterr().err == "videomoco knn: error: unrecognized arguments: --nope 3 (see --help)\n"


def test_a_value_that_starts_with_a_dash_is_checked_as_a_value(capsys):
    # regression: --memory_budget -1GB said "expected one argument"
    assert main(["pretrain", "DATA", "--memory_budget", "-1GB"]) == 2
    assert capsys.readouterr().err.startswith("videomoco pretrain: error: --memory_budget: '-1GB' is not a size")
    assert main(["knn", "DATA", "--memory-budget", "-1GB"]) == 2
    assert "--memory-budget: '-1GB' is not a size" in capsys.readouterr().err
