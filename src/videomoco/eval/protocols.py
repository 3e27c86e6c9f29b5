"""The field's evaluation protocols by name: one frozen record per preset of every choice that changes the number.

    videomoco finetune DATA --protocol authors          # the authors' eval.py (tinapan-pt/VideoMoCo aba3795)
    videomoco knn DATA --protocol vcop --crop 112       # a flag next to --protocol overrides that one choice

A command's config leaves the protocol's fields at None; `resolve(cfg)` (run by the configs' `__post_init__`)
fills them from `cfg.protocol`, and `deviations(cfg)` names those a flag changed, which the run logs and writes
into its results. Where a source defines no choice of a part (VCOP has no linear probe, CoCLR's recipe here is
its probe and retrieval), the preset takes `videomoco`'s: docs/eval.md gives the source file and line of every
choice and says which are inherited.
"""

import dataclasses
import logging
from dataclasses import dataclass

from videomoco.data.augment import NORMALIZATIONS
from videomoco.data.datasets import TestView

log = logging.getLogger(__name__)

INPUT_NORMS = ("checkpoint", *NORMALIZATIONS)  # "checkpoint": the statistics the encoder was trained with
AGGREGATIONS = ("softmax", "logits")  # what is averaged over a video's clips (and crops) at test time
BN_MODES = ("train", "eval")  # BatchNorm while fine-tuning: batch statistics, or frozen running statistics
TRAIN_LAYERS = ("all", "fc")  # fc: every layer but the classifier frozen (a linear probe, end to end)
REPORTS = ("last", "last+best")  # last+best: also the best epoch on the test split, labelled `best_on_test_*`
PROBE_FEATURES = ("clip", "video")  # the linear probe's rows: every test clip, or the mean over a video's clips
PROBE_OPTIMIZERS = ("adam", "sgd")  # adam: cosine schedule; sgd: momentum 0.9, steps at `schedule`


@dataclass(frozen=True)
class FinetuneRecipe:
    """`videomoco finetune`: training views, optimiser, schedule, test aggregation and what is reported."""

    epochs: int = 100
    batch_size: int = 16
    lr: float = 0.05
    lr_decay: float = 0.1
    schedule: tuple = (60, 80)
    cos: bool = False
    momentum: float = 0.9
    weight_decay: float = 0.0
    clips_per_video: int = 1  # random clips of each video per epoch
    train_scale: tuple = (0.5, 1.0)  # random resized crop: area share ...
    train_ratio: tuple = (3 / 4, 4 / 3)  # ... and aspect ratio, then resized to the crop size
    aggregation: str = "softmax"
    bn: str = "train"
    train_layers: str = "all"
    report: str = "last"


@dataclass(frozen=True)
class ProbeRecipe:
    """`videomoco linear`: a linear classifier on frozen features."""

    features: str = "clip"
    optimizer: str = "adam"
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 0.0
    schedule: tuple = ()  # sgd only
    classifier_batch_size: int = 1024
    l2_normalize: bool = True
    standardize: bool = True  # per-dimension train mean/std (this package's probe)
    final_bn: bool = False  # a BatchNorm1d before the linear layer (CoCLR's --final_bn)
    eval_every: int = 0  # evaluate on the test split every N epochs (best-on-test bookkeeping); 0: only at the end
    report: str = "last"


@dataclass(frozen=True)
class RetrievalRecipe:
    """`videomoco knn`: nearest-neighbour retrieval of test videos among train videos by cosine similarity."""

    center: bool = False  # subtract each set's mean feature before normalising (CoCLR)
    recall_ks: tuple = (1, 5, 10, 20, 50)


@dataclass(frozen=True)
class Protocol:
    """Every choice of one published evaluation that changes the number (docs/eval.md: the sources)."""

    name: str
    source: str  # the code it transcribes
    input_norm: str = "checkpoint"
    frames: int = 16
    frame_stride: int = 1
    crop: int = 112
    num_clips: int = 10  # test clips per video (rules that follow the video's length ignore it)
    num_crops: int = 1  # test crops per clip: 1 centre, 3 along the long side
    view: TestView = TestView()
    finetune: FinetuneRecipe = FinetuneRecipe()
    probe: ProbeRecipe = ProbeRecipe()
    retrieval: RetrievalRecipe = RetrievalRecipe()

    def __post_init__(self):
        checks = [(self.input_norm, INPUT_NORMS), (self.finetune.aggregation, AGGREGATIONS),
                  (self.finetune.bn, BN_MODES), (self.finetune.train_layers, TRAIN_LAYERS),
                  (self.finetune.report, REPORTS), (self.probe.report, REPORTS),
                  (self.probe.features, PROBE_FEATURES), (self.probe.optimizer, PROBE_OPTIMIZERS)]
        for value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"protocol {self.name}: {value!r} is not one of {', '.join(allowed)}")


PROTOCOLS = {}


def register(protocol):
    PROTOCOLS[protocol.name] = protocol
    return protocol


VIDEOMOCO = register(Protocol("videomoco", "this package's defaults (before presets, the only protocol)"))

register(Protocol(  # tinapan-pt/VideoMoCo eval.py at aba3795 (unchanged at 42e069a): what their 82.5 is
    "authors", "tinapan-pt/VideoMoCo eval.py @ aba3795 (= 42e069a), dataset/ucf101_eval.py, utils/train_utils.py",
    input_norm="imagenet", frames=32, frame_stride=1, crop=224, num_clips=10, num_crops=1,
    view=TestView(clips="torchvision", resize=0, side="crop", rounding="round"),
    finetune=FinetuneRecipe(epochs=10, batch_size=256, lr=0.005, lr_decay=0.1, schedule=(6, 8), cos=False,
                            momentum=0.9, weight_decay=1e-4, clips_per_video=10, train_scale=(0.08, 1.0),
                            train_ratio=(3 / 4, 4 / 3), aggregation="logits", bn="eval", report="last+best"),
))

register(Protocol(  # the same script at its first commit: the loop freezing all but fc is active (MoCo's lincls)
    "authors-lincls", "tinapan-pt/VideoMoCo eval.py @ 0ed0a13 (a linear probe, end to end)",
    input_norm="imagenet", frames=16, frame_stride=1, crop=112, num_clips=10, num_crops=1,
    view=TestView(clips="torchvision", resize=0, side="crop", rounding="round"),
    finetune=FinetuneRecipe(epochs=100, batch_size=256, lr=30.0, lr_decay=0.1, schedule=(60, 80), cos=False,
                            momentum=0.9, weight_decay=0.0, clips_per_video=10, train_scale=(0.08, 1.0),
                            train_ratio=(3 / 4, 4 / 3), aggregation="logits", bn="eval", train_layers="fc",
                            report="last+best"),
))

register(Protocol(  # VCOP's clip retrieval, which RSPNet and most retrieval tables follow
    "vcop", "xudejing/video-clip-order-prediction retrieve_clips.py, datasets/ucf101.py",
    frames=16, frame_stride=1, crop=112, num_clips=10, num_crops=1,
    view=TestView(clips="vcop", resize=(128, 171), side=112, rounding="round"),
))

register(Protocol(  # CoCLR's feature linear probe (README command) and nearest-neighbour retrieval
    "coclr", "TengdaHan/CoCLR eval/main_classifier.py (--retrieval), eval/feature_linear_probe.py, README.md",
    frames=32, frame_stride=1, crop=128, num_clips=10, num_crops=1,
    view=TestView(clips="coclr", resize=256, side=224, rounding="round"),
    probe=ProbeRecipe(features="video", optimizer="sgd", epochs=100, lr=1.0, weight_decay=1e-3, schedule=(60, 80),
                      classifier_batch_size=1024, l2_normalize=False, standardize=False, final_bn=True, eval_every=5,
                      report="last+best"),
    retrieval=RetrievalRecipe(center=True),
))

register(Protocol(  # PySlowFast's multi-view test (defaults.py): 10 temporal x 3 spatial views, softmax summed
    "slowfast", "facebookresearch/SlowFast slowfast/config/defaults.py, datasets/decoder.py, datasets/transform.py",
    frames=8, frame_stride=8, crop=256, num_clips=10, num_crops=3,
    view=TestView(clips="slowfast", resize="crop", side="crop", rounding="ceil"),
))

DEFAULT = VIDEOMOCO.name

# config field -> (protocol part, attribute): which of a command's fields a protocol sets
DATA_FIELDS = {name: (None, name) for name in ("input_norm", "frames", "frame_stride", "crop", "num_clips", "num_crops")}
PART_FIELDS = {
    "finetune": {name: ("finetune", name) for name in
                 ("epochs", "batch_size", "lr", "lr_decay", "schedule", "cos", "momentum", "weight_decay",
                  "clips_per_video", "aggregation", "bn", "train_layers")},
    "probe": {name: ("probe", name) for name in
              ("epochs", "lr", "weight_decay", "classifier_batch_size", "l2_normalize", "standardize", "features",
               "optimizer", "final_bn")},
    "retrieval": {"center": ("retrieval", "center")},
}


def get(name):
    """The preset `name`; ValueError (one line) naming the presets otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _value(protocol, part, attribute):
    value = getattr(getattr(protocol, part) if part else protocol, attribute)
    return list(value) if isinstance(value, tuple) else value


def owned_fields(cfg):
    """{config field: (part, attribute)} of the protocol's choices that `cfg`'s command has."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    mapping = {**DATA_FIELDS, **PART_FIELDS.get(getattr(cfg, "PROTOCOL_PART", None), {})}
    return {name: where for name, where in mapping.items() if name in fields}


def value(cfg, name):
    """`cfg.protocol`'s choice for `cfg`'s field `name`."""
    return _value(get(cfg.protocol), *owned_fields(cfg)[name])


def resolve(cfg):
    """Fill `cfg`'s protocol-owned fields left at None from `cfg.protocol`; returns `cfg`."""
    protocol = get(cfg.protocol)
    for name, where in owned_fields(cfg).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, _value(protocol, *where))
    return cfg


def deviations(cfg):
    """{field: {"protocol": value, "used": value}} for every choice of `cfg.protocol` that `cfg` overrides."""
    protocol = get(cfg.protocol)
    out = {}
    for name, where in owned_fields(cfg).items():
        expected, used = _value(protocol, *where), getattr(cfg, name)
        if (list(used) if isinstance(used, tuple) else used) != expected:
            out[name] = {"protocol": expected, "used": used}
    return out


def describe(cfg):
    """One line: the protocol and its deviations, for the log and the summaries."""
    dev = deviations(cfg)
    if not dev:
        return f"protocol {cfg.protocol} (no deviation)"
    changed = ", ".join(f"{k} {v['used']} (protocol: {v['protocol']})" for k, v in dev.items())
    return f"protocol {cfg.protocol}, deviations: {changed}"


def eval_view(cfg):
    """The `TestView` of `cfg.protocol`, its "crop" sizes made concrete with `cfg.crop`."""
    view = get(cfg.protocol).view
    concrete = {k: cfg.crop if v == "crop" else v for k, v in dataclasses.asdict(view).items()}
    return TestView(**concrete)


def part(cfg, name):
    """`cfg.protocol`'s recipe `name` ("finetune" | "probe" | "retrieval"): its choices without a flag."""
    return getattr(get(cfg.protocol), name)

