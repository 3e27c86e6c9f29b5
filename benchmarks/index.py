"""Indexing speed: videos probed per second by `build_index` on short H.264 files.

    python -m benchmarks.index --num-videos 100 1000 --workers 1 2

Generates, in a temporary directory, a folder of N short H.264 .mp4 files (16 frames,
64 px, 4 class folders), then times a fresh `build_index` (every file probed: container
metadata plus the first decoded frame) with each worker count, and a re-run that reuses
every row (stat only). Prints one JSON line per (N, workers) with videos/s and videos/s
per worker; the goal is at least 200 videos/s per core.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from videomoco.data.encode import write_video
from videomoco.data.index import build_index


def make_dataset(root, num_videos, frames=16, size=64, seed=0):
    """`num_videos` short H.264 files in 4 class folders under `root` (one clip encoded, copied)."""
    rng = np.random.default_rng(seed)
    clips = []
    for c in range(4):
        clip = rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)
        path = Path(root) / "proto" / f"{c}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        clips.append(write_video(path, clip, fps=25, codec="h264", gop=8).read_bytes())
    for i in range(num_videos):  # copies: generation stays fast, every file is still probed
        path = Path(root) / "data" / f"class{i % 4}" / f"{i:06d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(clips[i % 4])
    return Path(root) / "data"


def time_index(root, out, workers):
    start = time.perf_counter()
    index = build_index(root, out, workers=workers, progress=False)
    return time.perf_counter() - start, index


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.index", description=__doc__.splitlines()[0])
    p.add_argument("--num-videos", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.num_videos, args.workers = [20], [1]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = common.command_line("benchmarks.index", argv)
    rows = []
    for n in args.num_videos:
        with tempfile.TemporaryDirectory(prefix="videomoco-bench-index-") as tmp:
            root = make_dataset(tmp, n, args.frames, args.size)
            for workers in args.workers:
                out = Path(tmp) / f"index-w{workers}"
                seconds, index = time_index(root, out, workers)
                if len(index) != n:
                    raise RuntimeError(f"indexed {len(index)} of {n} videos: {index.quarantine[:3]}")
                rerun, _ = time_index(root, out, workers)
                row = {"benchmark": "index", "videos": n, "workers": workers, "seconds": round(seconds, 3),
                       "videos_per_s": round(n / seconds, 1), "videos_per_s_per_worker": round(n / seconds / workers, 1),
                       "rerun_seconds": round(rerun, 3)}
                common.emit(row, command)
                rows.append(row)
    if args.record:
        common.record("index: build_index on short H.264 files", rows, command, path=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
