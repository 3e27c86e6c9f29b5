"""`read_clip` against the other readers installed here, side by side on the same generated videos.

    python -m benchmarks.decoders [--configs h264:340x256:25,mpeg4:320x240:12] [--clips 60] [--record]

For each configuration (codec:WxH:GOP, `--videos` videos of `--seconds` s at 25 fps, textured with a
moving square as in benchmarks.data) every reader reads the same `--clips` random 16-frame clips with
one decoding thread, each followed by the same random resized crop to `--crop` (the training item's
CPU work). The readers take turns in a new random order for every clip, so load from other processes
(and what one reader leaves running, e.g. a thread pool) hits them alike. Reported: CPU ms per clip (`time.process_time`, mean), its ratio to `read_clip`'s, and
how many clips were bit-identical to `read_clip`'s frames. `read_clip_v0` is `read_clip` before
issue 18 (benchmarks/baselines.py), so `read_clip / v0` is the speed-up of the new read path.
Peers that are not installed (`pip install -e .[bench]`) are listed with the reason and skipped.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import baselines, common
from benchmarks.data import make_frames
from videomoco.data import decode
from videomoco.data.augment import crop_and_resize, random_resized_crop_box
from videomoco.data.encode import write_video

DEFAULT_CONFIGS = "h264:171x128:25,h264:171x128:250,h264:340x256:25,h264:340x256:250,mpeg4:320x240:12,mpeg4:320x240:250"
EXTENSIONS = {"h264": "mp4", "mpeg4": "avi", "vp9": "webm", "mjpeg": "avi"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoders", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated codec:WxH:GOP")
    p.add_argument("--readers", default=None, help="comma-separated subset of the readers (default: all installed)")
    p.add_argument("--videos", type=int, default=2, help="videos per configuration")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clips", type=int, default=60, help="timed clips per configuration (each read by every reader)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="where to write the videos (default: a temporary directory); existing ones are reused")
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.videos, args.seconds, args.clips, args.frames, args.crop = "h264:64x48:12", 1, 1.0, 4, 4, 32
    args.configs = [parse_config(c) for c in args.configs.split(",")]
    return args


def parse_config(text):
    codec, size, gop = text.split(":")
    width, height = (int(v) for v in size.split("x"))
    return codec, width, height, int(gop)


def make_videos(root, config, args):
    """`args.videos` videos of one configuration (reused if present) -> list of paths."""
    codec, width, height, gop = config
    paths = []
    for i in range(args.videos):
        path = Path(root) / f"{codec}_{width}x{height}_gop{gop}_{args.seconds:g}s_{i}.{EXTENSIONS[codec]}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, make_frames(round(args.seconds * 25), width, height, i), 25, codec, gop=gop)
        paths.append(path)
    return paths


def readers(names=None):
    """`{name: read}` of read_clip and the installed peers, and `{name: why not}` for the others."""
    found = {"read_clip": lambda path, start, n, stride=1: decode.read_clip(path, start, n, stride, threads=1)}
    missing, versions = {}, {"read_clip": "this checkout"}
    for name, (module, read) in baselines.PEERS.items():
        if names and name not in names:
            continue
        version, why = baselines.peer_status(module)
        if why:
            missing[name] = why
        else:
            found[name], versions[name] = read, version
    return found, versions, missing


def bench_config(config, paths, found, args, rng):
    """CPU ms per clip of every reader on `args.clips` clips, in rotating order -> (ms dict, identical dict)."""
    num_frames = decode.probe(paths[0]).frames
    names = list(found)
    for path in paths:  # warm-up: libraries, page cache
        for read in found.values():
            read(path, 0, args.frames)
    total, identical = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    for c in range(args.clips):
        path = paths[c % len(paths)]
        start = int(rng.integers(0, num_frames - args.frames + 1))
        clips = {}
        for name in rng.permutation(names):  # a new order per clip: what one reader leaves behind hits all alike
            box_rng = np.random.default_rng([args.seed, c])  # the same crop for every reader
            t0 = time.process_time()
            clip = found[name](path, start, args.frames)
            crop_and_resize(clip, random_resized_crop_box(*clip.shape[1:3], rng=box_rng), args.crop)
            total[name] += time.process_time() - t0
            clips[name] = clip
        for name in names:
            identical[name] += int(clips[name].shape == clips["read_clip"].shape and np.array_equal(clips[name], clips["read_clip"]))
    return {name: 1000 * t / args.clips for name, t in total.items()}, identical


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = common.command_line("benchmarks.decoders", argv)
    torch.set_num_threads(1)  # one thread for the crop too, as in a DataLoader worker
    found, versions, missing = readers(args.readers.split(",") if args.readers else None)
    if "opencv" in found:
        import cv2

        cv2.setNumThreads(1)  # its colour conversion's thread pool would spin on the other readers' CPU time
    rng, rows = np.random.default_rng(args.seed), []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            paths = make_videos(args.data_dir or tmp, config, args)
            load_before = os.getloadavg()[0]
            ms, identical = bench_config(config, paths, found, args, rng)
            codec, width, height, gop = config
            for name in sorted(ms, key=ms.get):
                row = {
                    "video": f"{codec} {width}x{height} GOP {gop}", "reader": name, "version": versions[name],
                    "cpu_ms_per_clip": ms[name], "vs_read_clip": ms[name] / ms["read_clip"],
                    "identical": f"{identical[name]}/{args.clips}",
                    "read_clip_vs_v0": ms["read_clip"] / ms["read_clip_v0"] if "read_clip_v0" in ms else None,
                    "load_1min": f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}",
                }
                common.emit(row, command)
                rows.append(row)
    for name, why in missing.items():
        common.emit({"reader": name, "unavailable": why}, command)
    if args.record:
        note = (f"{args.clips} clips of {args.frames} frames per video configuration, each read by every reader in "
                f"a new random order and cropped to {args.crop}; one decoding thread; CPU time (process_time).")
        if missing:
            note += " Not installed here: " + "; ".join(f"{k} ({v})" for k, v in missing.items()) + "."
        common.record("decoders: read_clip vs the installed peers", rows, command, path=args.results, note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
