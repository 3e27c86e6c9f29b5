"""Linear probe: a linear classifier on frozen, pooled encoder features.

The encoder runs once per subset, in eval mode (BN uses its running statistics and never updates
them) and without gradients; its clip features are cached in `--out` (`features_train.npy`,
`labels_train.npy`, `video_ids_train.npy`, same for test) and the classifier trains on that cache
in seconds. After training we check that no encoder weight or BN statistic changed.

The classifier sees the features standardised with the train set's per-dimension mean and standard
deviation (a BatchNorm without affine, as in MAE's and MoCo v3's probes; folded into the returned
`nn.Linear`). Pooled post-ReLU features share a large common component; after L2 normalisation
the class signal is a few hundredths per dimension, and a probe on them underfits (loss near ln C)
even where the classes are linearly separable (tests/test_linear.py).

    videomoco linear DATA --dataset ucf101 --split 1 --pretrained CKPT --out runs/linear
"""

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from videomoco.eval import common
from videomoco.eval.features import topk_accuracy, video_scores

log = logging.getLogger(__name__)

CACHE_KEYS = ("features", "labels", "video_ids")
CACHE_FIELDS = ("data", "dataset", "split", "pretrained", "arch", "width", "frames", "frame_stride", "crop",
                "num_clips", "num_crops")


@dataclass
class LinearConfig(common.EvalConfig):
    epochs: int = 100
    lr: float = 0.01
    weight_decay: float = 0.0
    classifier_batch_size: int = 1024
    l2_normalize: bool = True
    standardize: bool = True
    cache_dir: str = ""  # where the feature cache lives; empty = --out
    out: str = "runs/linear"


def add_arguments(parser):
    common.add_common_arguments(parser, LinearConfig)
    flag = partial(common.add_flag, parser, LinearConfig)
    flag("epochs", "classifier epochs over the cached features")
    flag("lr", "Adam learning rate of the classifier")
    flag("weight_decay", "weight decay of the classifier")
    flag("classifier_batch_size", "features per classifier step")
    parser.add_argument("--no-l2-normalize", dest="l2_normalize", action="store_false",
                        help="train on raw features instead of L2-normalised ones")
    parser.add_argument("--no-standardize", dest="standardize", action="store_false",
                        help="do not standardise the features per dimension (train mean and std) for the classifier")
    flag("cache_dir", "feature cache directory (default: --out)")


def snapshot(model):
    """A detached copy of every parameter and buffer (BN running stats and counters included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(model, before):
    """Names of the state_dict entries of `model` that differ (bit for bit) from `snapshot` `before`."""
    after = model.state_dict()
    return [k for k, v in before.items() if k not in after or not torch.equal(after[k].cpu(), v.cpu())]


def cached_features(cfg, encoder, subset):
    """Clip features of `subset`, from the cache (`cfg.cache_dir` or `cfg.out`) when made with the same settings."""
    out = Path(cfg.cache_dir or cfg.out)
    files = {k: out / f"{k}_{subset}.npy" for k in CACHE_KEYS}
    meta_file = out / f"features_{subset}.json"
    meta = {k: getattr(cfg, k) for k in CACHE_FIELDS}
    if all(f.is_file() for f in files.values()) and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        log.info("reusing cached %s features from %s", subset, out)
        return {k: np.load(f) for k, f in files.items()}
    rows = common.extract(cfg, encoder, subset)
    out.mkdir(parents=True, exist_ok=True)
    for k, f in files.items():
        np.save(f, rows[k])
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return rows


def standardizer(x, eps=1e-6):
    """Per-dimension `(mean (D,), std (D,))` of features `x (N, D)`; `eps` keeps constant dimensions finite."""
    return x.mean(0), x.std(0, unbiased=False) + eps


def fold_standardization(clf, mean, std):
    """`clf` trained on `(x - mean) / std`, rewritten as one `nn.Linear` on `x` (the same logits)."""
    with torch.no_grad():
        weight = clf.weight / std  # (C, D)
        clf.bias.sub_(weight @ mean)
        clf.weight.copy_(weight)
    return clf


def train_classifier(x, y, num_classes, epochs=100, lr=0.01, weight_decay=0.0, batch_size=1024, seed=0,
                     standardize=True):
    """Fit `nn.Linear(D, C)` on features `x (N, D)` / labels `y (N,)` with Adam and cross-entropy.

    standardize: train on `(x - mean) / std` per dimension (the train set's), returned folded into the
    `nn.Linear`, so it applies to features as `x` comes. Returns `(classifier, last batch loss)`."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    mean, std = standardizer(x) if standardize else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    z = (x - mean) / std
    clf = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # nn.Linear's init, drawn from `seed`: the same probe whatever ran before it
        bound = x.shape[1] ** -0.5
        clf.weight.uniform_(-bound, bound, generator=g)
        clf.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for _ in range(epochs):
        for idx in torch.randperm(len(z), generator=g).split(batch_size):
            loss = F.cross_entropy(clf(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return fold_standardization(clf, mean, std), float(loss.detach())


def _prepare(x, l2_normalize):
    x = torch.as_tensor(x, dtype=torch.float32)
    return F.normalize(x, dim=1) if l2_normalize else x


def run(cfg):
    common.seed_everything(cfg.seed)
    encoder = common.load_model(cfg).to(cfg.device).eval().requires_grad_(False)
    before = snapshot(encoder)
    train = cached_features(cfg, encoder, "train")
    test = cached_features(cfg, encoder, "test")
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1

    clf, loss = train_classifier(_prepare(train["features"], cfg.l2_normalize), train["labels"], num_classes,
                                 cfg.epochs, cfg.lr, cfg.weight_decay, cfg.classifier_batch_size, cfg.seed,
                                 cfg.standardize)
    with torch.no_grad():
        logits = clf(_prepare(test["features"], cfg.l2_normalize)).numpy()
    changed = changed_tensors(encoder, before)
    if changed:
        raise RuntimeError(f"linear probe changed {len(changed)} encoder tensors (e.g. {changed[0]}); the encoder must stay frozen")

    _, video_probs, video_labels = video_scores(logits, test["video_ids"], test["labels"])
    metrics = {"num_train_clips": len(train["labels"]), "num_test_clips": len(test["labels"]),
               "num_test_videos": len(video_labels), "final_train_loss": loss, "encoder_unchanged": True}
    metrics.update({f"clip_{k}": v for k, v in topk_accuracy(logits, test["labels"]).items()})
    metrics.update({f"video_{k}": v for k, v in topk_accuracy(video_probs, video_labels).items()})
    return common.write_results(cfg, "linear", metrics)


def main(args):
    return common.cli_main("linear", run, LinearConfig, args)
