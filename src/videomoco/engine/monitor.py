"""`--monitor DATA`: is pretraining learning? kNN top-1 of the query encoder's frozen features, every
`--monitor_every` epochs, on a small labelled set (solo-learn's online kNN; the InstDisc / MoCo vote).

    DATA/train/<class>/<video>   the gallery            (a UCF101 / HMDB51 root: split 1)
    DATA/test/<class>/<video>    the queries (or val/)

One centre clip per video at the run's frames and crop, normalised as training normalises, the encoder in
eval mode under no_grad (BatchNorm statistics untouched), then the weighted vote of the k nearest gallery
videos. `videomoco knn` uses the same vote (`knn_scores`).
"""

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from videomoco.data.datasets import LabeledDataset
from videomoco.data.index import open_index

log = logging.getLogger(__name__)

MONITOR_K, MONITOR_T = 20, 0.07


def neighbours(train_feats, test_feats, k, chunk=1024):
    """Top-k cosine similarities and indices `(N_test, k)` of test rows among train rows, in chunks."""
    train = F.normalize(torch.as_tensor(train_feats, dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(test_feats, dtype=torch.float32), dim=1)
    k = min(k, train.shape[0])
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk):
        s, i = (test[start : start + chunk] @ train.T).topk(k, dim=1)  # (n, k), sorted high to low
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def knn_scores(train_feats, train_labels, test_feats, k, num_classes, temperature=0.07):
    """Class scores `(N_test, C)` from the vote of the k nearest train rows, each weighted exp(sim / T)."""
    sims, idx = neighbours(train_feats, test_feats, k)
    neighbour_labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)[idx]  # (N, k)
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
    scores.scatter_add_(1, neighbour_labels, weights)
    return scores.numpy()


def monitor_subsets(data):
    """(gallery, queries) VideoIndex of a labelled layout; `ValueError` (one line) naming the layout it needs."""
    index = open_index(data)
    need = f"--monitor {data} needs DATA/train/<class>/ and DATA/test/<class>/ (or val/), or a UCF101 / HMDB51 root"
    if index.layout not in ("kinetics", "ucf101", "hmdb51"):
        raise ValueError(f"{need}; it is indexed as {index.layout}")
    train = index.select("train")
    test = index.select("test")
    if index.layout == "kinetics" and not test.records:
        test = index.select("val")
    if not train.records or not test.records:
        raise ValueError(f"{need}; it has {len(train)} train and {len(test)} test videos")
    return train, test


CACHE_BYTES = 2**30  # decoded clips up to this size are kept in memory: later evaluations only run the encoder


class Monitor:
    """kNN top-1 of an encoder's features on (gallery, queries); `__call__(encoder) -> {"knn_top1", "seconds"}`.

    The clips are fixed (centre clip, no augmentation), so they are decoded once (with `workers`) and kept while
    they fit `CACHE_BYTES`; larger sets are decoded at every evaluation."""

    def __init__(self, data, frames, frame_stride, crop, mean, std, device, batch_size=8, amp_dtype=None, workers=0):
        train, test = monitor_subsets(data)
        self.sets = [LabeledDataset(s, frames, frame_stride, crop, mode="test", num_clips=1) for s in (train, test)]
        self.num_classes = max(int(d.labels.max()) for d in self.sets) + 1
        self.mean, self.std = mean, std  # (1, 3, 1, 1) as GpuAugment holds them
        self.device, self.batch_size, self.amp_dtype, self.workers = device, batch_size, amp_dtype, workers
        self.cache = len(self) * 3 * frames * crop * crop <= CACHE_BYTES
        self.clips = [None, None]  # per set: [(uint8 (B, 3, T, S, S), labels (B,))] once decoded

    def __len__(self):
        return sum(d.num_videos for d in self.sets)

    def batches(self, which):
        """The decoded batches of set `which` (0: gallery, 1: queries), from the cache when it holds them."""
        if self.clips[which] is not None:
            return self.clips[which]
        loader = torch.utils.data.DataLoader(self.sets[which], batch_size=self.batch_size, num_workers=self.workers)
        batches = [(clip, label) for clip, label, _ in loader]
        if self.cache:
            self.clips[which] = batches
        return batches

    @torch.no_grad()
    def features(self, encoder, which):
        """`(V, D)` features and `(V,)` labels of set `which`: one centre clip per video."""
        feats, labels = [], []
        for clip, label in self.batches(which):
            x = (clip.to(self.device).float().div_(255) - self.mean.unsqueeze(2)) / self.std.unsqueeze(2)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                feats.append(encoder.forward_features(x).float().cpu())
            labels.append(label)
        return torch.cat(feats), torch.cat(labels).numpy()

    def __call__(self, encoder):
        start, was_training = time.perf_counter(), encoder.training
        encoder.eval()
        try:
            (train_x, train_y), (test_x, test_y) = (self.features(encoder, which) for which in (0, 1))
        finally:
            encoder.train(was_training)
        k = min(MONITOR_K, len(train_y))
        pred = knn_scores(train_x, train_y, test_x, k, self.num_classes, MONITOR_T).argmax(1)
        return {"knn_top1": float(100.0 * np.mean(pred == test_y)), "seconds": time.perf_counter() - start}
