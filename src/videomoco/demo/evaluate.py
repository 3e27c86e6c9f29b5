"""Evaluate one encoder of the demo: kNN, linear probe, robustness to dropped frames, and the time baselines.

The protocols are those of `videomoco knn / linear / robustness` (their functions, on their data path),
but one feature pass over the train videos and one over the test videos (clean and dropped clips in
the same pass) serve all three, so four encoders are evaluated in about a minute on a CPU:

    train videos --extract--> clip features --video mean--> kNN bank, linear-probe training rows
    test videos  --dropped_features--> clean features (kNN, linear) + per (dropper, ratio) features
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from videomoco.eval import common, robustness
from videomoco.eval.features import topk_accuracy, video_average, video_scores
from videomoco.eval.knn import knn_accuracy
from videomoco.eval.linear import train_classifier

KNN_K = 20  # the kNN column of the report (k = 1 is kept too)
# the linear probes' classifier: batches of 128 give 1,000 Adam steps on the demo's 1,200 train clips; batches
# of 1,024 (2 steps an epoch) left it underfit, 10 points below (docs/demo.md, "The linear probe")
PROBE = {"epochs": 100, "lr": 0.01, "batch_size": 128}


def _knn(train_x, train_y, test_x, test_y):
    return knn_accuracy(train_x, train_y, test_x, test_y, ks=(1, KNN_K))


def _linear(train, test_clips, test_ids, test_labels, num_classes, seed):
    """Linear probe on L2-normalised clip features (standardised per dimension inside `train_classifier`);
    accuracy of the softmax averaged per test video."""
    x = F.normalize(torch.as_tensor(train["features"]), dim=1)
    clf, _ = train_classifier(x, train["labels"], num_classes, seed=seed, **PROBE)
    with torch.no_grad():
        logits = clf(F.normalize(torch.as_tensor(test_clips), dim=1)).numpy()
    _, probs, labels = video_scores(logits, test_ids, test_labels)
    return topk_accuracy(probs, labels, ks=(1,))["top1"]


def evaluate(ecfg, ratios, generator_ckpt=""):
    """kNN, linear and robustness of the encoder `ecfg.pretrained` ("" = random init of `ecfg.arch`).

    Returns `{"knn_top1_k1", "knn_top1_k20", "linear_top1", "robustness": [{"dropper", "ratio",
    "cosine", "knn_top1_k20"}, ...]}`; the generator of `generator_ckpt` adds a "generator" dropper.
    """
    common.seed_everything(ecfg.seed)
    encoder = common.load_model(ecfg).to(ecfg.device).eval()
    train = common.extract(ecfg, encoder, "train")
    _, train_x, train_y = video_average(train["features"], train["video_ids"], train["labels"])

    rcfg = robustness.RobustnessConfig(**dataclasses.asdict(ecfg))
    rcfg.ratios = [float(r) for r in ratios]
    generator = robustness.load_generator(generator_ckpt).to(ecfg.device) if generator_ckpt else None
    loader = common.make_loader(rcfg, common.labeled_dataset(rcfg, "test", mode="test"))
    clean, dropped, labels, ids = robustness.dropped_features(rcfg, encoder, loader,
                                                              robustness.droppers(rcfg, generator))
    _, test_x, test_y = video_average(clean, ids, labels)
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    metrics = _knn(train_x, train_y, test_x, test_y)
    metrics["linear_top1"] = _linear(train, clean, ids, labels, num_classes, ecfg.seed)
    metrics["robustness"] = robustness.robustness_rows(clean, dropped, labels, ids, train_x, train_y, ks=(KNN_K,))
    return metrics


def evaluate_window(ecfg, train, test):
    """`robustness.window_rows` of the encoder `ecfg.pretrained`: train = (clips, labels), test = (clips, labels,
    windows), normalised window-scene clips as long as the encoder's clips."""
    common.seed_everything(ecfg.seed)
    encoder = common.load_model(ecfg).to(ecfg.device).eval()
    return robustness.window_rows(encoder, train, test[:2], test[2], ks=(KNN_K,), seed=ecfg.seed)


def shuffle_frames(x, seed=0):
    """The frames of every clip `(B, C, T, H, W)` in a random order (one permutation per clip)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(x.shape[2], generator=g) for _ in range(x.shape[0])]).to(x.device)
    return x.gather(2, order[:, None, :, None, None].expand_as(x))


def single_frame(x):
    """Every clip `(B, C, T, H, W)` replaced by its middle frame repeated T times: no motion left."""
    return x[:, :, x.shape[2] // 2 : x.shape[2] // 2 + 1].expand_as(x).contiguous()


def pixel_features(ecfg, subset):
    """Per video, the middle frame's pixels at 8x8 (192 numbers): what one frame shows, nothing more."""
    loader = common.make_loader(ecfg, common.labeled_dataset(ecfg, subset, mode="test"))
    feats, labels, ids = [], [], []
    for clip, label, video_id in loader:
        frame = clip[:, :, clip.shape[2] // 2].float() / 255  # (B, 3, H, W)
        feats.append(F.adaptive_avg_pool2d(frame, 8).flatten(1))
        labels.append(label)
        ids.append(video_id)
    return video_average(torch.cat(feats).numpy(), torch.cat(ids).numpy(), torch.cat(labels).numpy())


def time_baselines(ecfg, ordered_knn):
    """Do the classes need time? kNN of `ecfg.pretrained` on shuffled and single-frame clips (next to
    `ordered_knn`, its kNN on the real clips), and kNN / linear of raw single-frame pixels. -> `{name: top-1 %}`."""
    encoder = common.load_model(ecfg).to(ecfg.device).eval()
    out = {"kNN, ordered frames": ordered_knn}
    for name, fn in (("shuffled frames", shuffle_frames), ("single frame", single_frame)):
        feats = {}
        for subset in ("train", "test"):
            rows = common.extract(ecfg, encoder, subset, clip_fn=fn)
            feats[subset] = video_average(rows["features"], rows["video_ids"], rows["labels"])[1:]
        out[f"kNN, {name}"] = _knn(*feats["train"], *feats["test"])[f"knn_top1_k{KNN_K}"]
    (_, train_x, train_y), (_, test_x, test_y) = pixel_features(ecfg, "train"), pixel_features(ecfg, "test")
    out["kNN, one frame's pixels"] = _knn(train_x, train_y, test_x, test_y)[f"knn_top1_k{KNN_K}"]
    num_classes = int(train_y.max()) + 1
    clf, _ = train_classifier(F.normalize(torch.as_tensor(train_x), dim=1), train_y, num_classes, seed=ecfg.seed,
                              **PROBE)
    with torch.no_grad():
        pred = clf(F.normalize(torch.as_tensor(test_x), dim=1)).argmax(1).numpy()
    out["linear, one frame's pixels"] = float(100.0 * np.mean(pred == test_y))
    return out
