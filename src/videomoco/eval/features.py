"""Feature extraction and the clip -> video aggregation shared by every protocol.

A labeled test loader yields one item per (video, clip): `(clip uint8 (B, 3, T, H, W), label (B,), video_id (B,))`.
Everything here works on those flat clip-level rows and groups them by `video_id` afterwards, so the
order of the loader and the batch size never matter.
"""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from videomoco.data.augment import KINETICS_MEAN, KINETICS_STD, normalize


def device_layout(x):
    """`x (B, C, T, H, W)` in channels_last_3d on CUDA (where `common.accelerate` puts the model), else as is."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.is_cuda else x


@torch.inference_mode()
def extract_features(encoder, loader, device="cpu", head=False, clip_fn=None, progress=False, micro_batch=None,
                     mean=KINETICS_MEAN, std=KINETICS_STD, amp_dtype=None):
    """Run `encoder` over `loader`; returns clip-level rows as numpy arrays.

    `head=False` gives `forward_features` (pooled, pre-head `(N, feature_dim)`), `head=True` the full
    forward (logits). `clip_fn(x) -> x` is applied to the normalised float clip (robustness drops), on
    the whole loader batch. `micro_batch`: clips per forward (None: the whole batch); BN is in eval
    mode, so the split does not change the features. `mean`, `std`: the input normalisation; `amp_dtype`:
    the autocast dtype of the forward (None: fp32); features come back in float32 either way.
    Returns `{"features": (N, D) float32, "labels": (N,) int64, "video_ids": (N,) int64}`.
    """
    encoder.eval()
    forward = encoder if head else encoder.forward_features
    feats, labels, ids = [], [], []
    for clip, label, video_id in tqdm(loader, disable=not progress, desc="features", leave=False):
        x = normalize(clip.to(device, non_blocking=True), mean, std)  # (B, 3, T, H, W) float
        if clip_fn is not None:
            x = clip_fn(x)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            feats += [forward(device_layout(part)).float().cpu()
                      for part in (x.split(micro_batch) if micro_batch else (x,))]
        labels.append(torch.as_tensor(label).view(-1).cpu())
        ids.append(torch.as_tensor(video_id).view(-1).cpu())
    if not feats:
        raise ValueError("no clips to extract features from (empty split?)")
    return {
        "features": torch.cat(feats).numpy(),
        "labels": torch.cat(labels).long().numpy(),
        "video_ids": torch.cat(ids).long().numpy(),
    }


def video_average(values, video_ids, labels=None):
    """Average clip rows `(N, D)` per video, in order of first appearance.

    Returns `(ids (V,), mean (V, D), labels (V,) or None)`. Raises if clips of one video disagree on the label.
    """
    values, video_ids = np.asarray(values), np.asarray(video_ids)
    ids, first, inverse = np.unique(video_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts ids; keep the loader's order instead
    sums = np.zeros((len(ids), values.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse.reshape(-1), values.astype(np.float64))
    counts = np.bincount(inverse.reshape(-1), minlength=len(ids))[:, None]
    mean = (sums / counts).astype(np.float32)[order]
    if labels is None:
        return ids[order], mean, None
    labels = np.asarray(labels)
    video_labels = labels[first]
    if np.any(labels != video_labels[inverse.reshape(-1)]):
        raise ValueError("clips of the same video carry different labels")
    return ids[order], mean, video_labels[order]


def video_scores(logits, video_ids, labels, aggregation="softmax"):
    """Video-level prediction from clip logits `(N, C)`: their softmax (`aggregation="softmax"`) or the logits
    themselves ("logits", the authors' eval.py) averaged over the clips of each video."""
    if aggregation not in ("softmax", "logits"):
        raise ValueError(f"aggregation must be softmax or logits, got {aggregation!r}")
    scores = torch.as_tensor(logits, dtype=torch.float64)
    scores = F.softmax(scores, dim=1) if aggregation == "softmax" else scores
    return video_average(scores.numpy(), video_ids, labels)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percentage of rows whose label is among the `k` highest scores, for each k (capped at C)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return {f"top{k}": float(100.0 * np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1))) for k in ks}


def confusion_matrix(pred, labels, num_classes):
    """`(C, C)` int64 counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(pred)), 1)
    return cm


def per_class_accuracy(cm):
    """Recall of every class from a confusion matrix (NaN for classes absent from the test set)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.diag(cm) / totals
