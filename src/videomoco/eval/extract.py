"""One feature vector per video (mean over N uniformly spaced centre-cropped clips), resumable.

    videomoco extract DATA --pretrained CKPT --out FEATS [--num-clips 10] [--chunk-size 512]

writes `FEATS.npy` `(V, D)` float32 and `FEATS.csv` (row, path, label, class_name) for every video
of DATA (a folder of videos, a dataset root, or an index directory). Work is done in chunks of
`--chunk-size` videos saved under `FEATS.parts/` as they finish; a rerun skips the finished
chunks, so an interrupted extraction continues where it stopped. Videos that fail to decode are
skipped with a warning and a count (`FEATS.json` lists them). The batch_size x num_clips clips of a
batch run through the encoder `--micro-batch` at a time (auto: planned from a measured forward).
"""

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from videomoco.data.augment import input_norm, normalize
from videomoco.data.datasets import DECODE_ERRORS, clamp_workers
from videomoco.data.index import open_index
from videomoco.eval import common, planning
from videomoco.eval.features import device_layout
from videomoco.flags import fail
from videomoco.transforms import crop_clips, read_clips

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    data: str = ""
    pretrained: str = ""
    out: str = "features"  # FEATS: writes FEATS.npy, FEATS.csv, FEATS.json
    layout: str = "auto"
    arch: str = ""
    width: int = 0
    frames: int = 16
    frame_stride: int = 1
    crop: int = 112
    num_clips: int = 10
    batch_size: int = 4  # videos per batch (each is num_clips clips)
    chunk_size: int = 512  # videos per saved chunk
    workers: int = 4
    device: str = "auto"  # resolved by `common.check_values`
    precision: str = "auto"  # autocast dtype: auto = bf16 on a CUDA GPU with native bf16, else fp32
    micro_batch: int | str = "auto"  # clips per forward; auto: planned from memory
    memory_budget: str = ""  # what the planner may assume this process can use in all, e.g. 16GB

    def __post_init__(self):
        common.check_values(self)


def add_arguments(parser):
    flag = partial(common.add_flag, parser, ExtractConfig)
    parser.add_argument("data", help="folder of videos, dataset root or index directory")
    flag("pretrained", "checkpoint (any format load_encoder reads)", required=True)
    flag("out", "output prefix FEATS: FEATS.npy, FEATS.csv, FEATS.json", required=True)
    flag("layout", "dataset layout of DATA", choices=["auto", "kinetics", "ucf101", "hmdb51", "folder"])
    flag("arch", "encoder; default: read from the checkpoint")
    flag("width", "encoder width; default: from the checkpoint")
    flag("frames", "frames per clip")
    flag("frame_stride", "take every N-th frame")
    flag("crop", "centre crop size in pixels")
    flag("num_clips", "clips averaged per video")
    flag("batch_size", "videos per batch")
    flag("chunk_size", "videos per resumable chunk")
    flag("workers", "data loading workers")
    flag("device", "cpu, cuda or cuda:N")
    flag("precision", "autocast dtype; auto: bf16 on a CUDA GPU with native bf16, else fp32",
         choices=list(common.PRECISIONS))
    common.add_memory_arguments(parser, ExtractConfig)


class VideoClips(Dataset):
    """Video i -> `(clips uint8 (N, 3, T, S, S), i, ok)`; a video that fails to decode gives zeros and ok=False."""

    def __init__(self, paths, frame_counts, cfg):
        self.paths, self.frame_counts, self.cfg = paths, frame_counts, cfg
        self.spec = {"frames": cfg.frames, "frame_stride": cfg.frame_stride}

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        cfg = self.cfg
        try:
            clips = read_clips(self.paths[i], self.spec, cfg.num_clips, num_frames=self.frame_counts[i])
            return crop_clips(clips, cfg.crop), i, True
        except DECODE_ERRORS as err:
            log.warning("skipping %s: %s", self.paths[i], " ".join(str(err).split()))
            return torch.zeros(cfg.num_clips, 3, cfg.frames, cfg.crop, cfg.crop, dtype=torch.uint8), i, False


def _save_chunk(path, features, rows, ok):
    """Atomically write one finished chunk (features of its ok videos + which rows they are)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=features, rows=rows, ok=ok)
    os.replace(tmp, path)


@torch.inference_mode()
def extract_chunk(encoder, dataset, rows, cfg, micro_batch=None, bar=None):
    """Video features `(len(rows), D)` (mean over clips) and ok flags of the videos `rows`.

    micro_batch: clips per forward; None: planned (once per encoder) for batches of batch_size x num_clips.
    bar: a progress bar counting videos, advanced after every batch."""
    if micro_batch is None:
        micro_batch = planning.plan_micro_batch(cfg, encoder, cfg.batch_size * cfg.num_clips)
    loader = DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=cfg.batch_size,
                        num_workers=clamp_workers(cfg.workers))
    # what the encoder was trained with (a random-init baseline has no record: Kinetics')
    norm = getattr(encoder, "preprocessing", {}).get("input_norm") or input_norm("kinetics")
    amp_dtype = common.accelerate(cfg, encoder)
    feats, oks = [], []
    for clips, _, ok in loader:
        b, n = clips.shape[:2]
        x = normalize(clips.flatten(0, 1).to(cfg.device), norm["mean"], norm["std"])  # (B*N, 3, T, S, S)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = torch.cat([encoder.forward_features(device_layout(part)).float() for part in x.split(micro_batch)])
        feats.append(out.float().view(b, n, -1).mean(1).cpu())  # (B, D)
        oks.append(ok)
        if bar is not None:
            bar.update(b)
    return torch.cat(feats).numpy(), torch.cat(oks).numpy()


def set_aside_other_settings(parts, settings):
    """A partial extraction in `parts` made with other `settings` (or unreadable ones) is moved, never deleted, to
    `parts.other-<time>/`, with a log line; one of the same settings stays, to be resumed."""
    if not parts.exists():
        return None
    try:
        same = json.loads((parts / "settings.json").read_text()) == settings
    except (OSError, ValueError):
        same = False
    if same:
        return None
    aside = parts.with_name(f"{parts.name}.other-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{parts.name}.other-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.replace(parts, aside)
    log.warning("%s held a partial extraction with other settings: moved to %s", parts, aside)
    return aside


def run(cfg):
    out = Path(cfg.out[: -len(".npy")] if cfg.out.endswith(".npy") else cfg.out)
    index = open_index(cfg.data, layout=cfg.layout)
    records = index.records
    if not records:
        raise ValueError(f"{cfg.data}: no usable videos")
    encoder = common.load_model(cfg).to(cfg.device).eval()  # refused weights leave nothing behind
    parts = Path(f"{out}.parts")
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("out", "batch_size", "workers", "device", "micro_batch", "memory_budget")}
    settings["videos"] = len(records)
    set_aside_other_settings(parts, settings)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")

    dataset = VideoClips([index.path(i) for i in range(len(records))], [r.frames for r in records], cfg)
    chunks = [list(range(s, min(s + cfg.chunk_size, len(records)))) for s in range(0, len(records), cfg.chunk_size)]
    done = sum((parts / f"chunk_{k:05d}.npz").is_file() for k in range(len(chunks)))
    if done:
        log.info("resuming: %d of %d chunks already done", done, len(chunks))
    with tqdm(total=len(records), desc="extract", unit="video", dynamic_ncols=True) as bar:
        for k, rows in enumerate(chunks):
            path = parts / f"chunk_{k:05d}.npz"
            if path.is_file():
                bar.update(len(rows))  # done before an interruption
            else:
                features, ok = extract_chunk(encoder, dataset, rows, cfg, bar=bar)
                _save_chunk(path, features, np.array(rows), ok)

    loaded = [np.load(parts / f"chunk_{k:05d}.npz") for k in range(len(chunks))]
    features = np.concatenate([c["features"] for c in loaded])
    ok = np.concatenate([c["ok"] for c in loaded]).astype(bool)
    failed = [records[i].path for i in np.flatnonzero(~ok)]
    if failed:
        log.warning("%d of %d videos failed to decode and were skipped (listed in %s.json)", len(failed), len(records), out)
    np.save(f"{out}.npy", features[ok].astype(np.float32))
    with open(f"{out}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path", "label", "class_name"])
        for row, i in enumerate(np.flatnonzero(ok)):
            writer.writerow([row, records[i].path, records[i].label, records[i].class_name])
    summary = {"videos": int(ok.sum()), "failed": failed, "feature_dim": int(features.shape[1]), "root": index.root,
               "config": asdict(cfg)}
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(parts)
    print(f"wrote {out}.npy ({int(ok.sum())} x {features.shape[1]}) and {out}.csv; {len(failed)} videos skipped")
    return {"features": f"{out}.npy", "csv": f"{out}.csv", "videos": int(ok.sum()), "failed": len(failed)}


def main(args):
    try:
        return common.cli_main("extract", run, ExtractConfig, args)
    except KeyboardInterrupt:  # Ctrl-C: the finished chunks stay for the rerun
        out = args.out[: -len(".npy")] if args.out.endswith(".npy") else args.out
        return fail("extract", f"interrupted; the finished chunks are kept in {out}.parts/: run the same command "
                    "again to resume", code=130)
