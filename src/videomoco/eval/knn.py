"""kNN classification and nearest-neighbour retrieval on frozen, video-level features.

kNN follows the InstDisc / MoCo monitor: cosine similarity to every train video, the top-k neighbours
vote for their class with weight `exp(sim / T)` (T = 0.07); k = 1 is plain nearest neighbour.
Retrieval (VCOP / RSPNet / CoCLR): a test video is a hit at k when any of its k nearest train videos shares
its class; a video's feature is the mean of its test clips' (the protocol's clips and crops), and with
`--center` (protocol `coclr`) each set's mean feature is subtracted before the cosine similarity.

    videomoco knn DATA --dataset ucf101 --split 1 --pretrained CKPT --out runs/knn
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from videomoco.engine.monitor import knn_scores, neighbours  # the vote pretraining's --monitor uses too
from videomoco.eval import common, features, protocols

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10, 20, 50)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks=(1, 20), temperature=0.07):
    """Top-1 kNN accuracy (%) for each k: `{"knn_top1_k1": .., "knn_top1_k20": ..}`."""
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    out = {}
    for k in ks:
        pred = knn_scores(train_feats, train_labels, test_feats, k, num_classes, temperature).argmax(1)
        out[f"knn_top1_k{k}"] = float(100.0 * np.mean(pred == np.asarray(test_labels)))
    return out


def retrieval_recall(train_feats, train_labels, test_feats, test_labels, ks=RECALL_KS):
    """Recall@k (%): the share of test rows with a same-class train row among their k nearest."""
    _, idx = neighbours(train_feats, test_feats, max(ks))
    same = np.asarray(train_labels)[idx.numpy()] == np.asarray(test_labels)[:, None]  # (N, k)
    return {f"R@{k}": float(100.0 * np.mean(same[:, :k].any(axis=1))) for k in ks}


@dataclass
class KnnConfig(common.EvalConfig):
    PROTOCOL_PART = "retrieval"  # the fields left at None come from the protocol's RetrievalRecipe

    ks: list = field(default_factory=lambda: [1, 20])
    temperature: float = 0.07
    center: bool | None = None  # subtract each set's mean feature (CoCLR's retrieval)
    out: str = "runs/knn"


def add_arguments(parser):
    common.add_common_arguments(parser, KnnConfig)
    common.add_flag(parser, KnnConfig, "ks", "k values for kNN", nargs="+")
    common.add_flag(parser, KnnConfig, "temperature", "vote weight exp(sim / T)")
    common.add_flag(parser, KnnConfig, "center", "subtract each set's mean feature before the cosine similarity "
                    "(default: the protocol's)", action="store_const", const=True)


def centered(feats):
    """`feats (N, D)` minus their mean row (CoCLR's retrieval, per set)."""
    feats = np.asarray(feats, dtype=np.float32)
    return feats - feats.mean(axis=0, keepdims=True)


def video_features(cfg, encoder, subset, clip_fn=None):
    """Video-level features `(V, D)` and labels `(V,)` of one subset: the mean over each video's clips."""
    rows = common.extract(cfg, encoder, subset, clip_fn=clip_fn)
    _, feats, labels = features.video_average(rows["features"], rows["video_ids"], rows["labels"])
    return feats, labels


def run(cfg):
    common.seed_everything(cfg.seed)
    encoder = common.load_model(cfg).to(cfg.device)
    train_x, train_y = video_features(cfg, encoder, "train")
    test_x, test_y = video_features(cfg, encoder, "test")
    if cfg.center:
        train_x, test_x = centered(train_x), centered(test_x)
    metrics = {"num_train_videos": len(train_y), "num_test_videos": len(test_y)}
    metrics.update(knn_accuracy(train_x, train_y, test_x, test_y, cfg.ks, cfg.temperature))
    recall_ks = protocols.part(cfg, "retrieval").recall_ks
    metrics.update(retrieval_recall(train_x, train_y, test_x, test_y, recall_ks))
    return common.write_results(cfg, "knn", metrics, table=gallery_caveat(cfg.ks, len(train_y), recall_ks))


def gallery_caveat(ks, gallery, recall_ks=RECALL_KS):
    """A warning (logged, and returned for the summary) when a k of the kNN vote or of R@k is not below the
    `gallery` of train videos: such a k takes the whole gallery (R@k is then 100% for every class it holds)."""
    vote = [f"k={k}" for k in ks if k >= gallery]
    recall = [f"R@{k}" for k in recall_ks if k >= gallery]
    if not vote + recall:
        return None
    text = (f"Caveat: {', '.join(vote + recall)} not below the {gallery} train videos: they take every train video, "
            "so they measure the class balance, not the features; give more train videos, or read the smaller k.")
    log.warning("%s", text)
    return text


def main(args):
    return common.cli_main("knn", run, KnnConfig, args)
