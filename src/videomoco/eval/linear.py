"""Linear probe: a linear classifier on frozen, pooled encoder features, under an evaluation protocol.

The encoder runs once per subset, in eval mode (BN uses its running statistics and never updates
them) and without gradients; its clip features are cached in `--out` (`features_train.npy`,
`labels_train.npy`, `video_ids_train.npy`, same for test) and the classifier trains on that cache
in seconds. After training we check that no encoder weight or BN statistic changed.

The classifier sees the features standardised with the train set's per-dimension mean and standard
deviation (a BatchNorm without affine, as in MAE's and MoCo v3's probes; folded into the returned
classifier). Pooled post-ReLU features share a large common component; after L2 normalisation
the class signal is a few hundredths per dimension, and a probe on them underfits (loss near ln C)
even where the classes are linearly separable (tests/test_linear.py).

The protocol (`--protocol`) sets the probe: `videomoco` trains on every clip's L2-normalised, standardised
feature with Adam and a cosine schedule; `coclr` (their feature_linear_probe.py and README command) on
video-level features (the mean over a video's clips) with a BatchNorm1d before the layer, SGD lr 1.0, weight
decay 1e-3, steps at 60 and 80, and also reports, labelled `best_on_test_*`, the best of its evaluations every
5 epochs.

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

from videomoco.eval import common, protocols
from videomoco.eval.features import topk_accuracy, video_average, video_scores

log = logging.getLogger(__name__)

CACHE_KEYS = ("features", "labels", "video_ids")
CACHE_FIELDS = ("data", "dataset", "split", "pretrained", "arch", "width", "protocol", "input_norm", "frames",
                "frame_stride", "crop", "num_clips", "num_crops")


@dataclass
class LinearConfig(common.EvalConfig):
    PROTOCOL_PART = "probe"  # the fields left at None come from the protocol's ProbeRecipe

    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    classifier_batch_size: int | None = None
    l2_normalize: bool | None = None
    standardize: bool | None = None  # per-dimension train mean/std, folded into the classifier
    features: str | None = None  # clip | video: a row per clip, or the mean of a video's clips
    optimizer: str | None = None  # adam (cosine schedule) | sgd (momentum 0.9, steps at the protocol's schedule)
    final_bn: bool | None = None  # a BatchNorm1d before the linear layer
    cache_dir: str = ""  # where the feature cache lives; empty = --out
    out: str = "runs/linear"


def add_arguments(parser):
    common.add_common_arguments(parser, LinearConfig)
    flag = partial(common.add_flag, parser, LinearConfig)
    flag("epochs", "classifier epochs over the cached features")
    flag("lr", "learning rate of the classifier")
    flag("weight_decay", "weight decay of the classifier")
    flag("classifier_batch_size", "features per classifier step")
    flag("features", "a row per clip, or the mean of each video's clips", choices=list(protocols.PROBE_FEATURES))
    flag("optimizer", "adam (cosine) or sgd (momentum 0.9, the protocol's steps)", choices=list(protocols.PROBE_OPTIMIZERS))
    flag("final_bn", "a BatchNorm1d before the linear layer", action="store_const", const=True)
    parser.add_argument("--no-l2-normalize", dest="l2_normalize", action="store_const", const=False, default=None,
                        help="train on raw features instead of L2-normalised ones (default: the protocol's)")
    parser.add_argument("--no-standardize", dest="standardize", action="store_const", const=False, default=None,
                        help="do not standardise the features per dimension (train mean and std) for the classifier "
                             "(default: the protocol's)")
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
    """`clf` (a `classifier`) trained on `(x - mean) / std`, rewritten to take `x` (the same logits)."""
    with torch.no_grad():
        if isinstance(clf, nn.Linear):
            weight = clf.weight / std  # (C, D)
            clf.bias.sub_(weight @ mean)
            clf.weight.copy_(weight)
        else:  # BatchNorm1d first: its running statistics absorb the standardisation
            bn = clf[0]
            bn.running_var.copy_(std**2 * (bn.running_var + bn.eps) - bn.eps)
            bn.running_mean.copy_(mean + std * bn.running_mean)
    return clf


def classifier(dim, num_classes, final_bn=False, generator=None):
    """`nn.Linear(dim, C)` with its init drawn from `generator` (the same probe whatever ran before it); with
    `final_bn` (CoCLR's LP) a `BatchNorm1d(dim)` before it and N(0, 0.01) weights, zero bias."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        if final_bn:
            linear.weight.normal_(0.0, 0.01, generator=generator)
            linear.bias.zero_()
            return nn.Sequential(nn.BatchNorm1d(dim), linear)
        bound = dim ** -0.5
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    return linear


def train_classifier(x, y, num_classes, epochs=100, lr=0.01, weight_decay=0.0, batch_size=1024, seed=0,
                     standardize=True, optimizer="adam", schedule=(), final_bn=False, after_epoch=None):
    """Fit a `classifier` on features `x (N, D)` / labels `y (N,)` with cross-entropy.

    standardize: train on `(x - mean) / std` per dimension (the train set's), returned folded into the
    classifier, so it applies to features as `x` comes. optimizer "adam": Adam with a cosine schedule; "sgd":
    SGD momentum 0.9, the lr times 0.1 from each epoch of `schedule` (CoCLR's adjust_learning_rate).
    `after_epoch(epoch, predict)` (0-based) runs after every epoch with `predict(x) -> logits` in eval mode.
    Returns `(classifier in eval mode, last batch's loss)`.
    """
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    mean, std = standardizer(x) if standardize else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    z = (x - mean) / std
    clf = classifier(x.shape[1], num_classes, final_bn, g)
    if optimizer == "sgd":
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.1 ** sum(e >= m for m in schedule))
    else:
        opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for epoch in range(epochs):
        clf.train()
        for idx in torch.randperm(len(z), generator=g).split(batch_size):
            if final_bn and len(idx) < 2:  # BatchNorm cannot train on one row
                continue
            loss = F.cross_entropy(clf(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch(epoch, lambda t: clf.eval()((torch.as_tensor(t) - mean) / std))
    return fold_standardization(clf.eval(), mean, std), float(loss.detach())


def _prepare(x, l2_normalize):
    x = torch.as_tensor(x, dtype=torch.float32)
    return F.normalize(x, dim=1) if l2_normalize else x


def rows(cached, features):
    """The probe's rows of a subset: every clip (`features="clip"`) or each video's mean clip feature ("video")."""
    if features == "clip":
        return cached
    ids, mean, labels = video_average(cached["features"], cached["video_ids"], cached["labels"])
    return {"features": mean, "labels": labels, "video_ids": ids}


def probe_metrics(logits, test):
    """Clip-level (one row per clip; for video rows, the video itself) and video-level top-1/top-5 (softmax
    averaged over a video's rows)."""
    _, video_probs, video_labels = video_scores(logits, test["video_ids"], test["labels"])
    metrics = {f"clip_{k}": v for k, v in topk_accuracy(logits, test["labels"]).items()}
    metrics.update({f"video_{k}": v for k, v in topk_accuracy(video_probs, video_labels).items()})
    return metrics, len(video_labels)


def run(cfg):
    common.seed_everything(cfg.seed)
    encoder = common.load_model(cfg).to(cfg.device).eval().requires_grad_(False)
    before = snapshot(encoder)
    train = rows(cached_features(cfg, encoder, "train"), cfg.features)
    test = rows(cached_features(cfg, encoder, "test"), cfg.features)
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    recipe = protocols.part(cfg, "probe")
    test_x = _prepare(test["features"], cfg.l2_normalize)
    evaluations = []  # (epoch, video top-1) every recipe.eval_every epochs (CoCLR: `epoch % eval_freq == 0`)

    def after_epoch(epoch, predict):
        if recipe.eval_every and epoch % recipe.eval_every == 0:
            evaluations.append((epoch + 1, probe_metrics(predict(test_x).numpy(), test)[0]))

    clf, loss = train_classifier(_prepare(train["features"], cfg.l2_normalize), train["labels"], num_classes,
                                 cfg.epochs, cfg.lr, cfg.weight_decay, cfg.classifier_batch_size, cfg.seed,
                                 cfg.standardize, cfg.optimizer, recipe.schedule, cfg.final_bn, after_epoch)
    with torch.no_grad():
        logits = clf(test_x).numpy()
    changed = changed_tensors(encoder, before)
    if changed:
        raise RuntimeError(f"linear probe changed {len(changed)} encoder tensors (e.g. {changed[0]}); the encoder must stay frozen")

    scores, num_videos = probe_metrics(logits, test)
    metrics = {"num_train_rows": len(train["labels"]), "num_test_rows": len(test["labels"]),
               "num_test_videos": num_videos, "final_train_loss": loss, "encoder_unchanged": True, **scores}
    if recipe.report == "last+best" and evaluations:  # chosen on the test split (CoCLR's `val_acc >= best_acc`)
        epoch, best = max(reversed(evaluations), key=lambda e: e[1]["video_top1"])
        metrics.update(best_on_test_video_top1=best["video_top1"], best_on_test_epoch=epoch)
    return common.write_results(cfg, "linear", metrics)


def main(args):
    return common.cli_main("linear", run, LinearConfig, args)
