"""How stable are the features when frames are dropped? (the property VideoMoCo's generator trains for)

For each drop ratio (default 0, 0.1, ..., 0.5) and each dropper (random frames, `random_drop`; and the
trained generator of a pretraining checkpoint, `--generator`, when given), on the test clips:

    cosine   mean cos(f(clip), f(clip with frames dropped)) over the test clips
    kNN      top-1 of test videos whose features come from dropped clips, against clean train features

One decoding pass over the test set computes the clean and all dropped features together.
Writes `metrics.json`, `summary.md` (a markdown table) and `robustness.png`.

    videomoco robustness DATA --dataset ucf101 --pretrained CKPT [--generator CKPT] --out runs/robust
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from videomoco import markdown
from videomoco.data.augment import normalize
from videomoco.engine.checkpoint import (CheckpointError, check_finite, checkpoint_generator_kind, read_checkpoint,
                                         restore)
from videomoco.eval import common, planning
from videomoco.eval.features import device_layout, video_average
from videomoco.eval.knn import knn_accuracy
from videomoco.method.generator import FILL_MODES, build_generator, drop_frames, random_drop


@dataclass
class RobustnessConfig(common.EvalConfig):
    ratios: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    fill: str = "mean"
    generator: str = ""  # our pretraining checkpoint holding a "generator" state
    ks: list = field(default_factory=lambda: [1, 20])
    num_clips: int = 2
    out: str = "runs/robustness"


def add_arguments(parser):
    common.add_common_arguments(parser, RobustnessConfig)
    flag = partial(common.add_flag, parser, RobustnessConfig)
    flag("ratios", "fractions of frames dropped", nargs="+")
    flag("fill", "what replaces a dropped frame", choices=FILL_MODES)
    flag("generator", "pretraining checkpoint whose trained generator drops frames")
    flag("ks", "k values for kNN", nargs="+")


def load_generator(path, fill="mean"):
    """The generator stored under "generator" in our pretraining checkpoint `path`, of the kind it records."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("generator") if isinstance(ckpt, dict) else None
    if not state:
        raise CheckpointError(f"{path} has no 'generator' state (only our pretraining checkpoints carry one)")
    check_finite({"generator": state}, path)
    kind = checkpoint_generator_kind(ckpt)
    generator = restore(path, "generator", lambda s: build_generator(kind, fill=fill, hidden=s["features.4.weight"].shape[0]),
                        state)  # hidden: the CNN's last conv, (hidden, hidden / 2, 3, 3)
    restore(path, "generator", generator.load_state_dict, state)
    return generator.eval()


def droppers(cfg, generator=None):
    """name -> fn(x (B, C, T, H, W), ratio) -> dropped x; random drops are seeded by `cfg.seed`."""
    rng = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    out = {"random": lambda x, r: random_drop(x, r, cfg.fill, generator=rng)[0]}
    if generator is not None:
        out["generator"] = lambda x, r: drop_frames(x, generator.scores(x), r, cfg.fill)[0]
    return out


@torch.inference_mode()
def dropped_features(cfg, encoder, loader, drop_fns, micro_batch=None):
    """Clean features `(N, D)` and, per (dropper, ratio), the features of the dropped clips, in one pass.

    Frames are dropped on the whole loader batch, the encoder runs on `micro_batch` clips at a time
    (None: planned once per encoder, for the clean and one dropped copy of the batch)."""
    if micro_batch is None:
        micro_batch = planning.plan_micro_batch(cfg, encoder, cfg.batch_size, input_views=2)
    encoder.eval()
    norm = common.input_stats(cfg, encoder)
    amp_dtype = common.accelerate(cfg, encoder)

    def features(x):
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return torch.cat([encoder.forward_features(device_layout(part)).float().cpu() for part in x.split(micro_batch)])

    clean, dropped, labels, ids = [], {}, [], []
    for clip, label, video_id in tqdm(loader, desc="robustness", leave=False):
        x = normalize(clip.to(cfg.device), norm["mean"], norm["std"])  # (B, 3, T, H, W)
        clean.append(features(x))
        for name, fn in drop_fns.items():
            for r in cfg.ratios:
                dropped.setdefault((name, r), []).append(features(fn(x, r)))
        labels.append(label.view(-1))
        ids.append(video_id.view(-1))
    return _cat(clean), {k: _cat(v) for k, v in dropped.items()}, _cat(labels), _cat(ids)


def robustness_rows(clean, dropped, labels, ids, train_x, train_y, ks):
    """Per (dropper, ratio) of `dropped_features`' output: the mean cosine between the clean and dropped
    clip features, and the kNN top-1 of the dropped test videos against the bank (train_x, train_y)
    for each k in `ks` -> `[{"dropper", "ratio", "cosine", "knn_top1_k<k>", ...}, ...]`."""
    rows = []
    for (name, ratio), feats in dropped.items():
        cosine = F.cosine_similarity(torch.as_tensor(clean), torch.as_tensor(feats), dim=1).mean().item()
        _, test_x, test_y = video_average(feats, ids, labels)
        rows.append({"dropper": name, "ratio": ratio, "cosine": cosine,
                     **knn_accuracy(train_x, train_y, test_x, test_y, ks)})
    return rows


def mask_drop(clip, drops, fill="mean"):
    """Drop the frames marked True in `drops` (N, T) bool (the same count in every row) from `clip`
    (N, C, T, H, W) and fill them -> the dropped clip."""
    k = int(drops[0].sum())
    return drop_frames(clip, drops.float(), k / drops.shape[1], fill)[0]  # the True frames score highest


def still_frames(windows, seed=0):
    """(N, T) bool: as many random frames outside each row's window as the window has (`windows` (N, T) bool)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(windows.shape, generator=g) - 2.0 * windows.float()  # still frames first
    k = int(windows[0].sum())
    return torch.zeros_like(windows).scatter(1, scores.topk(k, dim=1).indices, True)


@torch.inference_mode()
def window_rows(encoder, train, test, windows, fill="mean", ks=(20,), batch=64, seed=0):
    """Robustness where dropping removes information: test clips whose motion is confined to a known window.

    train: (normalised clips (N, C, T, H, W), labels (N,)), the kNN bank; test: the same for the test clips,
    windows: (M, T) bool, the frames of each test clip that move. Drops the moving frames, or as many still
    frames (`still_frames`), and compares with the clean clips -> `[{"dropper": "none" | "moving" | "still",
    "cosine", "knn_top1_k<k>", ...}]` (cosine with the clean clip's feature; kNN against the clean bank)."""
    encoder.eval()
    device = next(encoder.parameters()).device

    def features(x):
        return torch.cat([encoder.forward_features(part.to(device)).float().cpu() for part in x.split(batch)])

    bank = features(train[0]).numpy()
    x, labels = test
    clean = features(x)
    rows = []
    for name, drops in (("none", None), ("moving", windows), ("still", still_frames(windows, seed))):
        feats = clean if drops is None else features(mask_drop(x, drops, fill))
        cosine = F.cosine_similarity(clean, feats, dim=1).mean().item()
        rows.append({"dropper": name, "cosine": cosine,
                     **knn_accuracy(bank, np.asarray(train[1]), feats.numpy(), np.asarray(labels), ks)})
    return rows


def _cat(tensors):
    return torch.cat(tensors).numpy()


def plot(rows, names, ks, path):
    """Cosine similarity and kNN top-1 against the drop ratio, one line per dropper."""
    fig = Figure(figsize=(9, 3.5))
    ax_cos, ax_knn = fig.subplots(1, 2)
    for name in names:
        mine = [r for r in rows if r["dropper"] == name]
        ratios = [r["ratio"] for r in mine]
        ax_cos.plot(ratios, [r["cosine"] for r in mine], marker="o", label=name)
        for k in ks:
            ax_knn.plot(ratios, [r[f"knn_top1_k{k}"] for r in mine], marker="o", label=f"{name}, k={k}")
    ax_cos.set(xlabel="drop ratio", ylabel="cosine(clean, dropped)", title="feature similarity")
    ax_knn.set(xlabel="drop ratio", ylabel="kNN top-1 (%)", title="kNN on dropped test clips")
    ax_cos.legend()
    ax_knn.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(cfg):
    common.seed_everything(cfg.seed)
    encoder = common.load_model(cfg).to(cfg.device).eval()
    generator = load_generator(cfg.generator, cfg.fill).to(cfg.device) if cfg.generator else None
    rows = common.extract(cfg, encoder, "train")
    _, train_x, train_y = video_average(rows["features"], rows["video_ids"], rows["labels"])
    fns = droppers(cfg, generator)
    loader = common.make_loader(cfg, common.labeled_dataset(cfg, "test", mode="test"))
    clean, dropped, labels, ids = dropped_features(cfg, encoder, loader, fns)
    table = robustness_rows(clean, dropped, labels, ids, train_x, train_y, cfg.ks)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(table, list(fns), cfg.ks, out / "robustness.png")
    header = ["dropper", "ratio", "cosine"] + [f"knn_top1_k{k}" for k in cfg.ks]
    lines = markdown.table(header, [[f"{r[h]:.3f}" if isinstance(r[h], float) else r[h] for h in header]
                                    for r in table])
    metrics = {"num_test_clips": len(labels), "droppers": list(fns), "rows": table}
    return common.write_results(cfg, "robustness", metrics, table="\n".join(lines))


def main(args):
    return common.cli_main("robustness", run, RobustnessConfig, args)
