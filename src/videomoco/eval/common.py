"""What every evaluation command shares: the config fields and flags, model and data loading, results files.

A command reads protocol -> data -> model -> loop -> metrics: `protocols.resolve` (run by the config) fills
the protocol's choices, `labeled_dataset` builds its views, `load_model` the encoder, the command's loop runs it
(micro-batches planned by `eval.planning`), `write_results` writes the metrics with the protocol's name.
"""

import argparse
import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from videomoco.data import augment
from videomoco.data.datasets import DataFailureError, LabeledDataset, clamp_workers
from videomoco.data.decode import VideoError
from videomoco.data.index import open_index
from videomoco.engine.checkpoint import (WRITE_ERRNOS, CheckpointError, WriteError, encoder_input_norm, load_checkpoint,
                                         load_encoder, resolve_encoder, write_error)
from videomoco.engine.config import check_output_dir, error_line, micro_batch_arg, resolve_device
from videomoco.engine.pretrain import AMP_DTYPES, resolve_precision
from videomoco.eval import planning, protocols
from videomoco.eval.features import extract_features
from videomoco.flags import (COUNT, FACTOR, MOMENTUM, NON_NEGATIVE, POSITIVE, POSITIVE_INT, RATIO, SEED, SHARED,
                             Number, config_from, defaults, fail)
from videomoco.models import build_encoder, list_encoders

log = logging.getLogger(__name__)

DATASETS = ("ucf101", "hmdb51", "folder")
PRECISIONS = ("auto", "fp32", "bf16")
SPLIT = Number(int, 1, 3)


@dataclass
class EvalConfig:
    """Fields shared by finetune / linear / knn / robustness; each command subclasses it."""

    data: str = ""
    dataset: str = "ucf101"  # ucf101 | hmdb51 | folder (folder: no official split, see `split`)
    split: int = 1  # official split 1-3
    pretrained: str = ""  # checkpoint for load_encoder; empty = random init (baseline)
    arch: str = ""  # empty = from the checkpoint (r3d_18 when there is none)
    width: int = 0  # 0 = from the checkpoint (64 when there is none)
    protocol: str = protocols.DEFAULT  # the preset (eval/protocols.py) that sets every field left at None
    input_norm: str | None = None  # checkpoint (the encoder's recorded statistics) | kinetics | imagenet
    frames: int | None = None  # frames per clip
    frame_stride: int | None = None
    crop: int | None = None
    num_clips: int | None = None  # test clips per video
    num_crops: int | None = None  # 1 = centre crop, 3 = along the long side
    batch_size: int = 16
    workers: int = 4
    device: str = "auto"  # resolved by `check_values`: cuda when a GPU is visible, else cpu
    precision: str = "auto"  # autocast dtype: auto = bf16 on a CUDA GPU with native bf16, else fp32
    seed: int = 0
    micro_batch: int | str = "auto"  # clips per forward / per fine-tuning micro-batch; auto: planned from memory
    memory_budget: str = ""  # what the planner may assume this process can use in all, e.g. 16GB
    out: str = "runs/eval"

    def __post_init__(self):
        check_values(self)


# field -> what its flag takes (and `check_config` enforces on any config); lists: every item
RANGES = {
    "split": SPLIT, "splits": SPLIT, "width": COUNT, "frames": POSITIVE_INT, "frame_stride": POSITIVE_INT,
    "crop": POSITIVE_INT, "num_clips": POSITIVE_INT, "batch_size": POSITIVE_INT, "chunk_size": POSITIVE_INT,
    "clips_per_video": POSITIVE_INT,
    "workers": COUNT, "seed": SEED, "seeds": SEED, "epochs": POSITIVE_INT, "finetune_epochs": COUNT,
    "lr": NON_NEGATIVE, "finetune_lr": NON_NEGATIVE, "lr_decay": FACTOR, "wp_lr": NON_NEGATIVE,
    "momentum": MOMENTUM, "weight_decay": NON_NEGATIVE, "schedule": COUNT, "num_classes": COUNT,
    "eval_every": COUNT, "classifier_batch_size": POSITIVE_INT, "ks": POSITIVE_INT, "temperature": POSITIVE,
    "ratios": RATIO,
}


def add_flag(parser, cfg_cls, name, help=None, **kwargs):
    """Add the flag of field `name`: its names (`flags.SHARED`, so every command spells a setting as pretrain
    does, else --name-with-dashes), default (from `cfg_cls`) and type (`RANGES`)."""
    if name in RANGES and "action" not in kwargs:
        kwargs.setdefault("type", RANGES[name])
    names = SHARED.get(name, (f"--{name.replace('_', '-')}",))
    # the field's default, not an instance's value: the fields a protocol owns stay None until the config is made
    parser.add_argument(*names, dest=name, default=defaults(cfg_cls)[name], help=help, **kwargs)


def add_common_arguments(parser, cfg_cls=EvalConfig, data=True):
    """The shared flags, with defaults from `cfg_cls` (so a command can change a default in its dataclass)."""
    if data:
        parser.add_argument("data", help="dataset root or index directory")
        add_flag(parser, cfg_cls, "dataset", "split-file layout", choices=DATASETS)
        add_flag(parser, cfg_cls, "split", "official split 1, 2 or 3")
    add_flag(parser, cfg_cls, "pretrained", "checkpoint (ours, the authors', exported, torchvision)")
    add_flag(parser, cfg_cls, "arch", "encoder; default: read from the checkpoint")
    add_flag(parser, cfg_cls, "width", "encoder width; default: from the checkpoint")
    add_flag(parser, cfg_cls, "protocol", "the evaluation protocol, by name (docs/eval.md); a flag given with it "
             "overrides that one choice, logged as a deviation", choices=list(protocols.PROTOCOLS))
    add_flag(parser, cfg_cls, "input_norm", "input mean/std: the checkpoint's recorded ones, or by name "
             "(default: the protocol's)", choices=list(protocols.INPUT_NORMS))
    add_flag(parser, cfg_cls, "frames", "frames per clip (default: the protocol's)")
    add_flag(parser, cfg_cls, "frame_stride", "take every N-th frame (default: the protocol's)")
    add_flag(parser, cfg_cls, "crop", "crop size in pixels (default: the protocol's)")
    add_flag(parser, cfg_cls, "num_clips", "clips per video at test time (default: the protocol's)")
    add_flag(parser, cfg_cls, "num_crops", "spatial crops per clip (default: the protocol's)", type=int, choices=[1, 3])
    add_flag(parser, cfg_cls, "batch_size", "videos (test: clips) per batch")
    add_flag(parser, cfg_cls, "workers", "data loading workers")
    add_flag(parser, cfg_cls, "device", "cpu, cuda or cuda:N")
    add_flag(parser, cfg_cls, "precision", "autocast dtype; auto: bf16 on a CUDA GPU with native bf16, else fp32",
             choices=list(PRECISIONS))
    add_flag(parser, cfg_cls, "seed")
    add_memory_arguments(parser, cfg_cls)
    add_flag(parser, cfg_cls, "out", "output directory (metrics.json, summary.md, ...)")


def add_memory_arguments(parser, cfg_cls=EvalConfig):
    """`--micro-batch` and `--memory-budget` (checked by `check_config`, so a bad value is one line)."""
    add_flag(parser, cfg_cls, "micro_batch", "clips per forward (fine-tuning: per micro-batch, gradients accumulated); "
             "auto: the most that fit this device's memory, measured before the first batch", type=micro_batch_arg)
    add_flag(parser, cfg_cls, "memory_budget", "memory the planner may assume this process can use in all, e.g. "
             "16GB (default: what it holds + what the device has free)")


def config_from_args(cfg_cls, args):
    """Build `cfg_cls` from the parsed flags (a Namespace or a dict) it has fields for."""
    return config_from(cfg_cls, args if isinstance(args, argparse.Namespace) else argparse.Namespace(**args))


def check_split(cfg):
    if cfg.dataset in ("ucf101", "hmdb51") and cfg.split not in (1, 2, 3):
        raise ValueError(f"--split must be 1, 2 or 3 for {cfg.dataset}, got {cfg.split}")


def check_values(cfg):
    """One-line `ValueError` for values no run can use; resolves `cfg.device` ("auto": cuda when a GPU is
    visible). Every config dataclass of the evaluations runs it in `__post_init__`."""
    if hasattr(cfg, "split"):
        check_split(cfg)
    if hasattr(cfg, "protocol"):
        protocols.resolve(cfg)
        if cfg.input_norm not in protocols.INPUT_NORMS:
            raise ValueError(f"--input-norm must be one of {', '.join(protocols.INPUT_NORMS)}, got {cfg.input_norm!r}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RANGES and value is not None:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                RANGES[f.name].check(item, f"--{f.name.replace('_', '-')}")
    if getattr(cfg, "precision", "auto") not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if getattr(cfg, "num_crops", 1) not in (1, 3):
        raise ValueError(f"--num-crops must be 1 or 3, got {cfg.num_crops}")
    if hasattr(cfg, "device"):
        cfg.device = resolve_device(cfg.device)
    if hasattr(cfg, "micro_batch"):
        cfg.micro_batch = planning.micro_batch(cfg)
    if getattr(cfg, "memory_budget", ""):
        planning.budget_limit(cfg)
    return cfg


def check_config(cfg):
    """`check_values`, then the paths: a one-line error before a worker or the index sees them."""
    check_values(cfg)
    data = getattr(cfg, "data", "")
    if data and not Path(data).exists():  # values first, then paths; both before the model is built and measured
        raise FileNotFoundError(f"{data} is neither an index (index.csv) nor a dataset directory")
    return cfg


# what bad input raises: a missing or corrupt file, a bad value, a dataset whose videos do not decode
USER_ERRORS = (ValueError, OSError, CheckpointError, DataFailureError, VideoError)


OUTPUT_FILES = ("extract", "export")  # commands whose --out names a file (prefix), not a directory


def check_inputs(cfg, command):
    """What a command checks before it reads a video or writes a file: a registered --arch, the weights it will
    load (readable, finite, fields sound, of --arch / --width: `checkpoint.resolve_encoder`), a --resume
    checkpoint, and that --out (and --cache-dir) can be written. One-line errors."""
    arch = getattr(cfg, "arch", "")
    if arch and arch not in list_encoders():
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(list_encoders())}")
    weights = getattr(cfg, "pretrained", "") or getattr(cfg, "checkpoint", "")
    if weights:
        resolve_encoder(weights, arch or None, getattr(cfg, "width", 0) or None)
    if getattr(cfg, "resume", ""):
        load_checkpoint(cfg.resume, resume=True)
    out = getattr(cfg, "out", "")
    if out:
        check_output_dir("--out", Path(out).parent if command in OUTPUT_FILES else out)
    if getattr(cfg, "cache_dir", ""):
        check_output_dir("--cache-dir", cfg.cache_dir)


def cli_main(command, run, cfg_cls, args):
    """Run a command from the CLI with `cfg_cls` built from `args`: bad input (a value, a path, a file) -> one
    line on stderr and exit code 2 before any work (`check_inputs`), no traceback; a file that cannot be written
    (a full disk) -> one line and exit code 1."""
    try:
        cfg = check_config(config_from_args(cfg_cls, args))
        check_inputs(cfg, command)
        run(cfg)
    except WriteError as err:
        return fail(command, err, code=1)
    except USER_ERRORS as err:
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:  # a full disk: our fault-free input, exit 1
            return fail(command, write_error(err.filename or "?", err), code=1)
        log.debug("%s failed", command, exc_info=True)
        return fail(command, error_line(err))
    except FloatingPointError as err:  # a diverged fine-tuning run
        return fail(command, err, code=1)
    return 0


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accelerate(cfg, model):
    """Set `model` up for speed on `cfg.device` as pretraining does: on CUDA, cudnn.benchmark and a
    channels_last_3d model (`features.device_layout` gives its inputs the same layout). Returns the autocast
    dtype of `cfg.precision` (None: fp32)."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last_3d)
    precision = resolve_precision(getattr(cfg, "precision", "auto"), device)
    return AMP_DTYPES[precision]


def input_stats(cfg, model):
    """The input normalisation `{"name", "mean", "std"}` an evaluation feeds `model`: the protocol's (or
    `--input-norm`'s) when it names one, else the one the checkpoint recorded (`model.preprocessing`); one log
    line when they differ from what the encoder was trained with."""
    recorded = encoder_input_norm(model)
    if cfg.input_norm == "checkpoint":
        return recorded
    used = augment.input_norm(cfg.input_norm)
    if used["name"] != recorded["name"]:
        log.warning("input normalisation: %s statistics (protocol %s%s) although the encoder was trained with %s "
                    "statistics", used["name"], cfg.protocol, ", --input-norm" if "input_norm" in
                    protocols.deviations(cfg) else "", recorded["name"])
    return used


def load_model(cfg, num_classes=None):
    """The encoder of `cfg.pretrained` (or a random-init `cfg.arch` baseline) with an optional fresh head."""
    if cfg.pretrained:
        return load_encoder(cfg.pretrained, arch=cfg.arch or None, width=cfg.width or None, num_classes=num_classes)
    log.warning("no --pretrained checkpoint: evaluating a randomly initialised %s", cfg.arch or "r3d_18")
    arch, width = cfg.arch or "r3d_18", cfg.width or 64
    model = build_encoder(arch, num_classes=num_classes or 1, width=width)
    if num_classes is None:
        model.fc = torch.nn.Identity()
    model.arch, model.width = arch, width
    return model


def open_split(cfg, subset):
    """The `subset` ("train" | "test") videos of `cfg.data` for `cfg.split`, as a VideoIndex.

    ucf101 / hmdb51: the official split files; folder: `DATA/{train,test or val}/<class>/<video>`.
    """
    check_config(cfg)
    layout = {"ucf101": "ucf101", "hmdb51": "hmdb51", "folder": "kinetics"}[cfg.dataset]
    index = open_index(cfg.data, layout=layout, asked=f"--dataset {cfg.dataset}")
    missing = index.meta.get("counts", {}).get("missing", 0)
    if missing:
        log.warning("%s: split files name %d videos that are not on disk (skipped)", cfg.data, missing)
    selected = index.select(subset, cfg.split)
    if cfg.dataset == "folder" and subset == "test" and not selected.records:
        selected = index.select("val")  # DATA/{train,val}/ (e.g. `videomoco synth`): val is the test set
    if not selected.records and cfg.dataset == "folder":
        raise ValueError(f"{cfg.data}: no {subset} videos (--dataset folder reads DATA/train/<class>/ and "
                         "DATA/test/ or DATA/val/)")
    if not selected.records:
        raise ValueError(f"{cfg.data}: no {subset} videos for split {cfg.split}")
    _log_split(cfg, subset, selected)
    return selected


_LOGGED_SPLITS = set()  # (data, subset, split) already reported: every command opens its splits more than once


def _log_split(cfg, subset, selected):
    """Log the size of a subset once per process, so every command reports its train and test sets."""
    key = (str(cfg.data), subset, cfg.split)
    if key not in _LOGGED_SPLITS:
        _LOGGED_SPLITS.add(key)
        classes = len({r.label for r in selected.records})
        split = f" (split {cfg.split})" if cfg.dataset in ("ucf101", "hmdb51") else ""
        log.info("%s %s: %d videos, %d classes%s", cfg.data, subset, len(selected), classes, split)


def labeled_dataset(cfg, subset, mode="test"):
    """`LabeledDataset` of one subset, with the views of `cfg.protocol`: test mode yields one item per (video,
    clip, crop), train mode `clips_per_video` random clips per video with the protocol's crop scale and ratio."""
    recipe = protocols.part(cfg, "finetune")
    return LabeledDataset(open_split(cfg, subset), cfg.frames, cfg.frame_stride, cfg.crop, mode=mode,
                          num_clips=cfg.num_clips, num_crops=cfg.num_crops, scale=recipe.train_scale,
                          ratio=recipe.train_ratio, clips_per_video=getattr(cfg, "clips_per_video", 1),
                          view=protocols.eval_view(cfg))


def make_loader(cfg, dataset):
    """An in-order loader for evaluation (every item once, last batch kept)."""
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=clamp_workers(cfg.workers),
                      pin_memory=str(cfg.device).startswith("cuda"))


def extract(cfg, encoder, subset, head=False, clip_fn=None, micro_batch=None, norm=None):
    """Clip-level features (or logits with `head=True`) of a subset, in test mode (no augmentation).

    micro_batch: clips per forward; None: `planning.plan_micro_batch` (measured once per encoder and settings).
    norm: `{"mean", "std"}` of the input; None: `input_stats(cfg, encoder)`."""
    loader = make_loader(cfg, labeled_dataset(cfg, subset, mode="test"))  # a bad split fails before the probe
    if micro_batch is None:
        micro_batch = planning.plan_micro_batch(cfg, encoder, cfg.batch_size, head=head)
    norm = norm or input_stats(cfg, encoder)
    return extract_features(encoder, loader, cfg.device, head=head, clip_fn=clip_fn, progress=True,
                            micro_batch=micro_batch, mean=norm["mean"], std=norm["std"],
                            amp_dtype=accelerate(cfg, encoder))


def class_names(dataset):
    """Class names of a dataset built by `labeled_dataset`, or None when the index has none."""
    names = getattr(dataset.index, "classes", None)
    return list(names) if names else None


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(cfg, command, metrics, table=None):
    """Write `metrics.json` (metrics + config) and `summary.md` into `cfg.out`; print the summary; return metrics.

    `table`: optional extra markdown appended to the summary (per-drop-ratio rows, ...).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: _jsonable(v) for k, v in metrics.items()}
    log.info("%s: %s", command, protocols.describe(cfg))
    record = {"command": command, "protocol": cfg.protocol, "deviations": protocols.deviations(cfg),
              "metrics": metrics, "config": dataclasses.asdict(cfg)}
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    lines = [f"# videomoco {command}", "", f"checkpoint: `{cfg.pretrained or 'random init'}`", "",
             f"{protocols.describe(cfg)}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    if table:
        lines += ["", table]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return metrics
