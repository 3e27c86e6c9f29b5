"""`PretrainConfig`: every flag of `videomoco pretrain` (the authors' train.py flags plus ours).

Defaults live only in the dataclass. The argparse flags default to "not given", so that
`config_from_args` can layer: dataclass defaults < `--config FILE.yaml` < flags on the command line.
"""

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from videomoco.flags import (COUNT, FACTOR, MOMENTUM, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, RATIO, SEED,
                             SHARED, Number)
from videomoco.data.datasets import VIEWS
from videomoco.method.adversarial import G_GRADS, G_LOSSES
from videomoco.data.augment import AUG_DRAWS, AUGMENTATIONS
from videomoco.method.generator import FILL_MODES, GENERATORS
from videomoco.method.losses import DECAY_ON
from videomoco.method.moco import DECAY_UNITS, SHUFFLE_BN
from videomoco.models import list_encoders


class ConfigError(ValueError):
    """A bad value in a config file or flag combination (one-line message)."""


def micro_batch_arg(value):
    """`--micro_batch`: 'auto' or a number of clips >= 1."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        if isinstance(value, float) or int(value) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {value!r}") from None
    return int(value)


def error_line(err):
    """The one line to show a user for `err`.

    An error raised in a DataLoader worker is re-raised in the main process with a message of
    "Caught X in DataLoader worker process N" + the worker's traceback: its last line is the real one.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        prefix, sep, message = lines[-1].partition(": ")  # "videomoco.data.datasets.DataFailureError: ..."
        return message if sep and " " not in prefix else lines[-1]
    return lines[0]


@dataclass
class PretrainConfig:
    data: str = ""
    # --- the authors' train.py flags, same names, meanings and defaults ---
    arch: str = "r3d_18"
    workers: int = 32
    epochs: int = 200
    start_epoch: int = 0
    batch_size: int = 256  # total over all processes
    temporal_decay: float = 0.99999
    crop_size: int = 112
    frame_per_clip: int = 16
    step_between_clips: int = 1  # clip starts are multiples of it (the authors' -sbc)
    lr: float = 0.03
    lr_decay: float = 0.1
    warmup: bool = False
    wp_lr: float = 0.0025
    schedule: list = field(default_factory=lambda: [120, 160])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    print_freq: int = 10
    log_dir: str = "logs_moco"
    ckp_dir: str = ""  # empty: LOG_DIR/ckp, beside the logs (the authors' default is ./checkpoints_moco)
    resume: str = ""
    resumeG: str = ""
    world_size: int = -1
    rank: int = -1
    dist_url: str = "tcp://224.66.41.62:23456"
    dist_backend: str = "nccl"
    dist_timeout: float = 1800.0  # seconds a collective may wait for the slowest rank (torch's default)
    shuffle_bn: str = "all_to_all"  # all_to_all: a rank receives only the key clips it encodes; all_gather: authors'
    bucket_mb: float = 25.0  # gradient all-reduce in buckets of this size, during the backward; 0: per tensor after it
    seed: int | None = None
    gpu: int | None = None
    multiprocessing_distributed: bool = False
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    # --- ours ---
    mlp_bn: bool = False  # MLP head with BatchNorm (MoCo v3 style)
    decay_unit: str = "step"  # t**a, a = enqueue steps since written (authors' code) or "key": position in the queue
    decay_on: str = "logit"  # t**a multiplies the negative's logit (authors' code) or "exp": its exp(logit) (paper)
    aug: str = "ours"  # colour recipe: ours, authors (their MoCoAugment), authors_plus (MoCoAugmentV2)
    aug_draw: str = "auto"  # augmentation parameters per clip or per frame; auto: ours per clip, the authors' per frame
    shuffle_groups: int = 0  # key-encoder BN groups in one process without micro-batches; 0: 2 from 4 clips, else 1
    adv_optimizer: str = "carry"  # at --adv_start_epoch: carry the optimisers' momentum, or "fresh" (the authors')
    aug_flip: float = 0.5  # augmentation strengths (GpuAugment / PretrainDataset); the defaults are MoCo's
    aug_jitter: float = 0.4
    aug_hue: float = 0.1
    aug_grayscale: float = 0.2
    aug_invert: float = 0.0  # ours: probability of the negative image (not in MoCo's recipe)
    aug_scale_min: float = 0.2
    adv_start_epoch: int = 100
    # authors: the authors' design (per-frame CNN + a recurrence over time); motion: each frame scored from itself
    # and its difference to the previous one, no position (docs/method.md, "Does the generator read the clip?")
    generator: str = "authors"
    drop_ratio: float = 0.25
    fill: str = "mean"
    g_loss: str = "feature_l1"
    g_loss_weight: float = 100.0
    g_grad: str = "own"  # own: G learns from its loss only; authors: also from D's (their train loop)
    g_lr: float | None = None  # None: same as --lr (the authors use one rate for both)
    real_query_loss: bool = False
    precision: str = "auto"  # bf16 on a CUDA device with native bf16, else fp32 (pretrain.resolve_precision)
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    frame_stride: int = 1
    width: int = 64
    views: str = "same"  # the authors': two crops of one clip
    subset: str = "train"  # the authors read DATA/train
    clips_per_video: int = 1  # items per video per epoch (the authors' train.py: RandomClipSampler(..., 1))
    monitor: str = ""  # labelled DATA/train/<class>/ + DATA/test/<class>/: kNN top-1 of frozen features (engine.monitor)
    monitor_every: int = 10  # epochs between monitor evaluations (and one at the start and at the end)
    config: str = ""
    max_steps: int = 0  # 0: no limit
    save_every: int = 10
    save_every_steps: int = 0
    keep_last: int = 3  # with keep_every 100: 4 files of a 200-epoch run (~1.6 GB for r2plus1d_18)
    keep_every: int = 100  # epoch 100: where the authors' recipe starts the generator (--adv_start_epoch)
    image_every: int = 10
    device: str = "auto"
    deterministic: bool = False
    micro_batch: int | str = "auto"  # clips per micro-batch in each process; auto: planned from memory
    memory_budget: str = ""  # what the planner may assume this process can use in all, e.g. 16GB

    def __post_init__(self):
        self.ckp_dir = self.ckp_dir or os.path.join(self.log_dir, "ckp")
        _check(self)  # every way of making a config (flags, YAML, Python, the demo) gets the same one-line errors


# What `python train.py` (the authors' entry point) sets before the user's flags, where their train.py computes
# otherwise than our defaults: their augmentation and ImageNet statistics (moco/loader.py MoCoAugment), key
# BatchNorm over a process's whole batch (their one-GPU run), fresh optimisers at the phase boundary.
AUTHORS_DEFAULTS = {"aug": "authors", "shuffle_groups": 1, "adv_optimizer": "fresh"}


def authors_flags():
    """`AUTHORS_DEFAULTS` as flags, to go before the user's (which win)."""
    return [arg for dest, value in AUTHORS_DEFAULTS.items() for arg in (f"--{dest}", str(value))]


DIST_TIMEOUT = Number(float, 1, 7 * 24 * 3600)  # seconds: below 1 s no store connects; a week is beyond any step

# (flags, dest, help, extra argparse kwargs); order = order in --help. Every number is a `Number`, which
# parses it and checks it against its meaning; `_check` applies the same checks to config files.
_FLAGS = [
    (SHARED["arch"], "arch", "encoder architecture", {"choices": tuple(list_encoders())}),
    (SHARED["workers"], "workers", "data loading workers (total per node)", {"type": COUNT}),
    (SHARED["epochs"], "epochs", "number of total epochs to run", {"type": POSITIVE_INT}),
    (("--start_epoch",), "start_epoch", "manual epoch number (useful on restarts)", {"type": COUNT}),
    (SHARED["batch_size"], "batch_size", "total batch size over all processes", {"type": POSITIVE_INT}),
    (("-t", "--temporal_decay"), "temporal_decay", "temporal decay of queue keys", {"type": FACTOR}),
    (SHARED["crop"], "crop_size", "crop size of the clips", {"type": POSITIVE_INT}),
    (SHARED["frames"], "frame_per_clip", "frames per clip", {"type": POSITIVE_INT}),
    (("-sbc", "--step_between_clips"), "step_between_clips", "clip starts are drawn among frames 0, N, 2N, ... "
     "(the authors' flag: torchvision's VideoClips step)", {"type": POSITIVE_INT}),
    (SHARED["lr"], "lr", "initial learning rate", {"type": NON_NEGATIVE}),
    (SHARED["lr_decay"], "lr_decay", "learning rate decay factor", {"type": FACTOR}),
    (("--warmup",), "warmup", "linear warm-up over the first --schedule milestone", {"action": "store_true"}),
    (SHARED["wp_lr"], "wp_lr", "initial warm-up learning rate", {"type": NON_NEGATIVE}),
    (("--schedule",), "schedule", "epochs at which the lr drops by --lr_decay", {"type": COUNT, "nargs": "*"}),
    (SHARED["momentum"], "momentum", "SGD momentum", {"type": MOMENTUM}),
    (SHARED["weight_decay"], "weight_decay", "weight decay", {"type": NON_NEGATIVE}),
    (("-p", "--print_freq"), "print_freq", "log every N steps (the only host syncs)", {"type": POSITIVE_INT}),
    (("--log_dir",), "log_dir", "TensorBoard, metrics.jsonl and config.yaml", {}),
    (("--ckp_dir",), "ckp_dir", "checkpoint directory; empty: LOG_DIR/ckp", {}),
    (("--resume",), "resume", "checkpoint to resume from (ours or the authors'); 'auto' = newest in --ckp_dir", {}),
    (("--resumeG",), "resumeG", "the authors' generator checkpoint (not loadable: different architecture)", {}),
    (("--world_size",), "world_size", "number of nodes (with --multiprocessing_distributed)",
     {"type": Number(int, 1, special=(-1,))}),
    (("--rank",), "rank", "node rank (with --multiprocessing_distributed)", {"type": Number(int, 0, special=(-1,))}),
    (("--dist_url",), "dist_url", "url to set up distributed training (tcp://HOST:PORT, env://, file://PATH)", {}),
    (("--dist_backend",), "dist_backend", "distributed backend (gloo is used on CPU)",
     {"choices": ("nccl", "gloo", "mpi")}),
    (("--dist_timeout",), "dist_timeout", "seconds a collective waits for the slowest rank before the run stops "
     "with an error naming the ranks behind", {"type": DIST_TIMEOUT}),
    (("--shuffle_bn",), "shuffle_bn", "how key clips reach the rank that encodes them for shuffle-BN: all_to_all "
     "(each rank receives only its own) or all_gather (the authors': every rank receives all)",
     {"choices": SHUFFLE_BN}),
    (("--bucket_mb",), "bucket_mb", "gradient all-reduce in buckets of this many MB, launched as the backward "
     "produces them (DDP's bucket_cap_mb); 0: one call per tensor after the backward", {"type": NON_NEGATIVE}),
    (SHARED["seed"], "seed", "seed (drawn at random and recorded when not given)", {"type": SEED}),
    (("--gpu",), "gpu", "GPU id to use (single process)", {"type": COUNT}),
    (("--multiprocessing_distributed",), "multiprocessing_distributed", "one process per GPU via mp.spawn",
     {"action": "store_true"}),
    (("--moco-dim", "--moco_dim"), "moco_dim", "feature dimension", {"type": POSITIVE_INT}),
    (("--moco-k", "--moco_k"), "moco_k", "queue size (negative keys)", {"type": POSITIVE_INT}),
    (("--moco-m", "--moco_m"), "moco_m", "momentum of the key encoder", {"type": PROBABILITY}),
    (("--moco-t", "--moco_t"), "moco_t", "softmax temperature", {"type": POSITIVE}),
    (("--mlp",), "mlp", "MLP projection head", {"action": "store_true"}),
    (("--mlp_bn",), "mlp_bn", "MLP projection head with BatchNorm (MoCo v3 style): keeps the embeddings from "
     "collapsing on small or homogeneous data", {"action": "store_true"}),
    (("--aug_plus",), "aug_plus", "MoCo v2 augmentation (colour jitter, grayscale, blur); with --aug authors: "
     "authors_plus", {"action": "store_true"}),
    (("--aug",), "aug", "colour augmentation and normalisation: ours (per clip, Kinetics mean/std, --aug_* strengths), "
     "authors (their moco/loader.py MoCoAugment: grayscale p 0.2, then jitter 0.4/0.4/0.4 hue 0.4 always, flip; "
     "per frame; ImageNet mean/std; what train.py uses), authors_plus (their MoCoAugmentV2)",
     {"choices": tuple(AUGMENTATIONS)}),
    (("--aug_draw",), "aug_draw", "draw augmentation parameters per clip or per frame; auto: the recipe's own "
     "(ours per clip, the authors' per frame)", {"choices": AUG_DRAWS}),
    (("--cos",), "cos", "cosine lr schedule", {"action": "store_true"}),
    (("--aug_flip",), "aug_flip", "probability of a horizontal flip", {"type": PROBABILITY}),
    (("--aug_jitter",), "aug_jitter", "brightness / contrast / saturation jitter amount", {"type": PROBABILITY}),
    (("--aug_hue",), "aug_hue", "hue jitter amount (fraction of a turn, at most 0.5)", {"type": Number(float, 0, 0.5)}),
    (("--aug_grayscale",), "aug_grayscale", "probability of grayscale", {"type": PROBABILITY}),
    (("--aug_invert",), "aug_invert", "probability of the negative image (1 - x)", {"type": PROBABILITY}),
    (("--aug_scale_min",), "aug_scale_min", "smallest crop area (fraction of the frame)", {"type": FACTOR}),
    (("--adv_start_epoch",), "adv_start_epoch", "first epoch with the adversarial generator", {"type": COUNT}),
    (("--generator",), "generator", "frame-dropping generator: authors (per-frame CNN + BiGRU over time, the "
     "paper's design) or motion (each frame scored from itself and |x_t - x_{t-1}|, blind to its position)",
     {"choices": tuple(GENERATORS)}),
    (("--adv_optimizer",), "adv_optimizer", "at --adv_start_epoch the optimisers of D and G carry their momentum "
     "(carry) or start afresh (fresh: the authors' second phase, resumed without optimiser state)",
     {"choices": ("carry", "fresh")}),
    (("--decay_unit",), "decay_unit", "exponent a of the temporal decay t**a: step = enqueue steps since the key was "
     "written (the authors' code), key = the key's position in the queue from the newest (the paper's t^i; the same "
     "for any batch size, number of processes or micro-batches)", {"choices": DECAY_UNITS}),
    (("--decay_on",), "decay_on", "what t**a multiplies: the negative's logit (the authors' code) or exp(logit / T) "
     "(the paper's equation: adds a log t to the logit)", {"choices": DECAY_ON}),
    (("--shuffle_groups",), "shuffle_groups", "BatchNorm groups of the key encoder in one process without "
     "micro-batches (0: 2 from a batch of 4 clips, else 1; 1: BN over the whole batch, the authors' one-GPU run)",
     {"type": COUNT}),
    (("--drop_ratio",), "drop_ratio", "fraction of frames the generator drops", {"type": RATIO}),
    (("--fill",), "fill", "what replaces dropped frames", {"choices": FILL_MODES}),
    (("--g_loss",), "g_loss", "generator objective", {"choices": G_LOSSES}),
    (("--g_loss_weight",), "g_loss_weight", "weight of the generator loss", {"type": NON_NEGATIVE}),
    (("--g_grad",), "g_grad", "generator gradient: own (its loss only) or authors (its loss + D's loss, as "
     "their train loop accumulates it)", {"choices": G_GRADS}),
    (("--g_lr",), "g_lr", "generator learning rate (default: --lr)", {"type": NON_NEGATIVE}),
    (("--real_query_loss",), "real_query_loss", "also train on the un-dropped query", {"action": "store_true"}),
    (("--precision",), "precision", "autocast dtype; auto: bf16 on a CUDA GPU with native bf16, else fp32",
     {"choices": ("auto", "fp32", "bf16", "fp16")}),
    (("--channels_last",), "channels_last", "channels_last_3d model and inputs", {"action": "store_true"}),
    (("--compile",), "compile", "torch.compile the encoders", {"action": "store_true"}),
    (("--grad_checkpointing",), "grad_checkpointing",
     "activation checkpointing per residual block: less memory, ~33%% more FLOPs", {"action": "store_true"}),
    (SHARED["frame_stride"], "frame_stride", "take every N-th frame", {"type": POSITIVE_INT}),
    (SHARED["width"], "width", "encoder base width (64 = torchvision)", {"type": POSITIVE_INT}),
    (("--views",), "views", "query and key from the same clip, two clips, or two clips that share no frame",
     {"choices": VIEWS}),
    (("--subset",), "subset", "videos to pretrain on: the train subset (Kinetics train/, UCF101/HMDB51 split-1 "
     "train list), val, test or all", {"choices": ("train", "val", "test", "all")}),
    (("--clips_per_video",), "clips_per_video", "clips drawn from every video per epoch, each with its own start "
     "and crops (for a folder of fewer videos than a batch; PySlowFast's and the authors' eval use 1 to 10)",
     {"type": POSITIVE_INT}),
    (("--monitor",), "monitor", "labelled videos (DATA/train/<class>/ and DATA/test/<class>/, or a UCF101 / HMDB51 "
     "root): kNN top-1 of the encoder's frozen features at the start, every --monitor_every epochs and at the end, "
     "to TensorBoard and metrics.jsonl", {}),
    (("--monitor_every",), "monitor_every", "epochs between --monitor evaluations", {"type": POSITIVE_INT}),
    (("--max_steps",), "max_steps", "stop after N steps in total (0: no limit)", {"type": COUNT}),
    (("--save_every",), "save_every", "checkpoint every N epochs", {"type": POSITIVE_INT}),
    (("--save_every_steps",), "save_every_steps", "also checkpoint every N steps (0: off)", {"type": COUNT}),
    (("--keep_last",), "keep_last", "keep the newest N epoch checkpoints", {"type": POSITIVE_INT}),
    (("--keep_every",), "keep_every", "also keep every M-th epoch checkpoint (0: off)", {"type": COUNT}),
    (("--image_every",), "image_every", "log a dropped-frames image every N epochs (0: off)", {"type": COUNT}),
    (SHARED["device"], "device", "auto, cpu, cuda or cuda:N", {}),
    (("--micro_batch",), "micro_batch", "clips per micro-batch in each process (gradients accumulated, the "
     "semantics of a run on more GPUs); auto: the largest that fits this device's memory", {"type": micro_batch_arg}),
    (("--memory_budget",), "memory_budget", "memory the planner may assume this process can use in all, e.g. 16GB "
     "(default: what it holds plus what the device has free)", {}),
    (("--deterministic",), "deterministic", "deterministic algorithms (bitwise-reproducible on CPU)",
     {"action": "store_true"}),
]


def add_arguments(parser):
    """Add every `videomoco pretrain` flag; defaults are shown from `PretrainConfig`."""
    defaults = PretrainConfig()
    parser.add_argument("data", nargs="?", default=argparse.SUPPRESS, metavar="DATA",
                        help="dataset root, index directory or index.csv")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="YAML file of flag values (flags on the command line win)")
    for flags, dest, help_, kwargs in _FLAGS:
        default = getattr(defaults, dest)
        parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS,
                            help=f"{help_} (default: {default})", **kwargs)
    return parser


def _long_flag(flags):
    return next(f for f in flags if f.startswith("--"))


DATA_REQUIRED = "DATA is required (a positional argument or `data:` in --config)"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DIST_URL = re.compile(r"(tcp://\S+:\d+|env://|file://\S+)")


def _check(cfg):
    """Every value against its meaning (the flags' own `Number` / choices checks, which config files and
    Python callers skip), then the checks between values; `ConfigError` with one line."""
    for flags, dest, _, kwargs in _FLAGS:
        value = getattr(cfg, dest)
        if "choices" in kwargs and value not in kwargs["choices"]:
            raise ConfigError(f"{dest}={value!r} is not one of {', '.join(kwargs['choices'])}")
        number = kwargs.get("type")
        if isinstance(number, Number) and value is not None:
            for item in value if kwargs.get("nargs") else [value]:
                try:
                    number.check(item, _long_flag(flags))
                except ValueError as e:
                    raise ConfigError(str(e)) from None
    if cfg.aug_plus and cfg.aug == "authors":  # their train.py --aug_plus: MoCoAugmentV2
        cfg.aug = "authors_plus"
    if cfg.moco_k < cfg.batch_size:  # every step enqueues the keys of the whole (global) batch
        raise ConfigError(f"--moco-k {cfg.moco_k} must be at least the batch size {cfg.batch_size}")
    if cfg.g_grad == "authors" and cfg.g_loss == "contrastive":
        raise ConfigError("--g_grad authors adds D's loss to G's, which cancels --g_loss contrastive (-L_D)")
    if cfg.start_epoch >= cfg.epochs:
        raise ConfigError(f"--start_epoch {cfg.start_epoch} leaves nothing to train with --epochs {cfg.epochs}")
    if cfg.rank != -1 and cfg.rank >= max(cfg.world_size, 1):
        raise ConfigError(f"--rank {cfg.rank} needs a --world_size above it, got --world_size {cfg.world_size}")
    check_device_name(cfg.device)  # its availability: `check_paths`, before any work
    if not DIST_URL.fullmatch(str(cfg.dist_url)):
        raise ConfigError(f"--dist_url must be tcp://HOST:PORT, env:// or file://PATH, got {cfg.dist_url!r}")
    try:
        cfg.micro_batch = micro_batch_arg(cfg.micro_batch)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--micro_batch {e}") from None
    if cfg.memory_budget:
        from videomoco.engine.memory import parse_size

        try:
            parse_size(cfg.memory_budget)
        except ValueError as e:
            raise ConfigError(f"--memory_budget: {e}") from None
    return cfg


def check_device_name(device):
    """`device` as a str if it is auto, cpu, cuda or cuda:N, else `ConfigError` (one line)."""
    device = str(device)
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_device(device="auto"):
    """The device rule of every command: "auto" is "cuda" when a GPU is visible, else "cpu"; "cpu", "cuda" and
    "cuda:N" stay as given. `ConfigError` (one line) for another name, or for a CUDA device without CUDA."""
    import torch

    device = check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but CUDA is not available")
    return device


def check_output_dir(flag, path):
    """One-line `ConfigError` unless `path` is a directory this process can create or write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")


def check_paths(cfg):
    """What must exist and be writable before any work: DATA, --resume, --log_dir and --ckp_dir."""
    if not cfg.data:
        raise ConfigError(DATA_REQUIRED)
    if not Path(cfg.data).exists():
        raise ConfigError(f"DATA {cfg.data} does not exist")
    if cfg.resume not in ("", "auto") and Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume {cfg.resume} is a directory: give a checkpoint file in it, or --resume auto "
                          "with --ckp_dir")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume}: no such file")
    if cfg.monitor and not Path(cfg.monitor).is_dir():
        raise ConfigError(f"--monitor {cfg.monitor}: no such directory")
    check_output_dir("--log_dir", cfg.log_dir)
    check_output_dir("--ckp_dir", cfg.ckp_dir)
    resolve_device(cfg.device)
    return cfg


def load_yaml(path):
    """Read a config file into a dict (one-line `ConfigError` on a bad file or unknown key)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(k for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {', '.join(unknown)}")
    return {k.replace("-", "_"): _coerce(path, k.replace("-", "_"), v) for k, v in values.items()}


_KIND = {int: "an integer", float: "a number", micro_batch_arg: "'auto' or an integer >= 1"}


def _coerce(path, dest, value):
    """A YAML value converted as its flag would convert it (YAML reads `lr: 1e-3` as a string)."""
    kwargs = next((kw for _, d, _, kw in _FLAGS if d == dest), {})
    if value is None:
        return value
    if kwargs.get("action") == "store_true":
        if not isinstance(value, bool):
            raise ConfigError(f"config {path}: {dest}: {value!r} is not true or false")
        return value
    convert = kwargs.get("type")
    if convert is None:
        return value
    convert = convert.kind if isinstance(convert, Number) else convert  # the range is checked by _check
    items = value if kwargs.get("nargs") and isinstance(value, list) else [value]
    # no silent bool -> 1, 1.5 -> 1 or [8] -> error later
    if any(isinstance(v, (list, dict, bool)) or convert is int and isinstance(v, float) for v in items):
        raise ConfigError(f"config {path}: {dest}: {value!r} is not {_KIND[convert]}")
    try:
        items = [convert(v) for v in items]
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"config {path}: {dest}: {value!r} is not {_KIND[convert]}") from None
    return items if kwargs.get("nargs") else items[0]


def config_from_args(args):
    """`PretrainConfig` from parsed flags: dataclass defaults < `--config` YAML < command line."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values = load_yaml(given["config"]) if given.get("config") else {}
    values.update({k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(PretrainConfig)}})
    cfg = PretrainConfig(**values)  # values checked by __post_init__
    if not cfg.data:
        raise ConfigError(DATA_REQUIRED)
    return cfg


def save_config(cfg, path):
    """Write the resolved config as YAML (reloadable with `--config`)."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
