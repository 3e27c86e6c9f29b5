"""What every evaluation command shares: the config fields and flags, model and data loading, results files."""

import argparse
import dataclasses
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from videomoco.data.datasets import DataFailureError, LabeledDataset
from videomoco.data.decode import VideoError
from videomoco.data.index import open_index
from videomoco.engine.checkpoint import CheckpointError
from videomoco.engine.config import error_line
from videomoco.eval.export import load_encoder
from videomoco.eval.features import extract_features
from videomoco.models import build_encoder

log = logging.getLogger(__name__)

DATASETS = ("ucf101", "hmdb51", "folder")


@dataclass
class EvalConfig:
    """Fields shared by finetune / linear / knn / robustness; each command subclasses it."""

    data: str = ""
    dataset: str = "ucf101"  # ucf101 | hmdb51 | folder (folder: no official split, see `split`)
    split: int = 1  # official split 1-3
    pretrained: str = ""  # checkpoint for load_encoder; empty = random init (baseline)
    arch: str = ""  # empty = from the checkpoint (r3d_18 when there is none)
    width: int = 0  # 0 = from the checkpoint (64 when there is none)
    frames: int = 16  # frames per clip
    frame_stride: int = 1
    crop: int = 112
    num_clips: int = 10  # uniformly spaced clips per video at test time
    num_crops: int = 1  # 1 = centre crop, 3 = left/centre/right
    batch_size: int = 16
    workers: int = 4
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    out: str = "runs/eval"


def add_common_arguments(parser, cfg_cls=EvalConfig, data=True):
    """The shared flags, with defaults from `cfg_cls` (so a command can change a default in its dataclass)."""
    d = cfg_cls()
    if data:
        parser.add_argument("data", help="dataset root or index directory")
        parser.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="split-file layout")
        parser.add_argument("--split", type=int, default=d.split, help="official split 1, 2 or 3")
    parser.add_argument("--pretrained", default=d.pretrained, help="checkpoint (ours, the authors', exported, torchvision)")
    parser.add_argument("--arch", default=d.arch, help="encoder; default: read from the checkpoint")
    parser.add_argument("--width", type=int, default=d.width, help="encoder width; default: from the checkpoint")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per clip")
    parser.add_argument("--frame-stride", type=int, default=d.frame_stride)
    parser.add_argument("--crop", type=int, default=d.crop, help="crop size in pixels")
    parser.add_argument("--num-clips", type=int, default=d.num_clips, help="clips per video at test time")
    parser.add_argument("--num-crops", type=int, choices=[1, 3], default=d.num_crops, help="spatial crops per clip")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--workers", type=int, default=d.workers, help="data loading workers")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out, help="output directory (metrics.json, summary.md, ...)")


def config_from_args(cfg_cls, args):
    """Build `cfg_cls` from the parsed flags it has fields for."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    return cfg_cls(**{k: v for k, v in values.items() if k in names})


def check_split(cfg):
    if cfg.dataset in ("ucf101", "hmdb51") and cfg.split not in (1, 2, 3):
        raise ValueError(f"--split must be 1, 2 or 3 for {cfg.dataset}, got {cfg.split}")


def check_config(cfg):
    """One-line `ValueError` for values no run can use (caught before a worker or the index sees them)."""
    if hasattr(cfg, "split"):
        check_split(cfg)
    for name in ("frames", "frame_stride", "crop", "num_clips", "batch_size", "chunk_size", "epochs"):
        if getattr(cfg, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if getattr(cfg, "workers", 0) < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    device = str(getattr(cfg, "device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for but CUDA is not available")
    return cfg


# what bad input raises: a missing or corrupt file, a bad value, a dataset whose videos do not decode
USER_ERRORS = (ValueError, OSError, CheckpointError, DataFailureError, VideoError)


def cli_main(command, run, cfg):
    """Run a command from the CLI: bad input -> one line on stderr and exit code 2, no traceback."""
    try:
        run(check_config(cfg))
    except USER_ERRORS as err:
        log.debug("%s failed", command, exc_info=True)
        print(f"videomoco {command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged fine-tuning run
        print(f"videomoco {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    index = open_index(cfg.data, layout=layout)
    if index.layout != layout:
        raise ValueError(f"{cfg.data} is indexed as {index.layout}, not {cfg.dataset}")
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
    return selected


def labeled_dataset(cfg, subset, mode="test"):
    """`LabeledDataset` of one subset; test mode yields one item per (video, clip, crop)."""
    return LabeledDataset(open_split(cfg, subset), cfg.frames, cfg.frame_stride, cfg.crop, mode=mode,
                          num_clips=cfg.num_clips, num_crops=cfg.num_crops)


def make_loader(cfg, dataset):
    """An in-order loader for evaluation (every item once, last batch kept)."""
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                      pin_memory=str(cfg.device).startswith("cuda"))


def extract(cfg, encoder, subset, head=False, clip_fn=None):
    """Clip-level features (or logits with `head=True`) of a subset, in test mode (no augmentation)."""
    loader = make_loader(cfg, labeled_dataset(cfg, subset, mode="test"))
    return extract_features(encoder, loader, cfg.device, head=head, clip_fn=clip_fn, progress=True)


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
    record = {"command": command, "metrics": metrics, "config": dataclasses.asdict(cfg)}
    (out / "metrics.json").write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    lines = [f"# videomoco {command}", "", f"checkpoint: `{cfg.pretrained or 'random init'}`", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    if table:
        lines += ["", table]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return metrics
