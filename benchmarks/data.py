"""Throughput of the pretraining data pipeline against the naive OpenCV loader, and worker memory.

    python -m benchmarks.data [--workers 0,1,2] [--sizes 171x128,320x240] [--clips 48] [--gop 25] [--rounds 2]
    python -m benchmarks.data --rss [--rss-clips 5000]
    python -m benchmarks.data --overhead [--workers 2] [--rounds 4]

Generates ~10 s, 25 fps H.264 videos at each size, indexes them, then runs for every worker count:
  - pipeline: `PretrainDataset` (seek + decode the clip's frames with PyAV, two random resized crops
    with one box per clip) through `build_loader`;
  - baseline: the authors' loader: OpenCV reads the WHOLE video (`baselines.read_video_cv2_whole`), the clip
    is sliced out and cropped the same way, through the same loader with the same worker count.
Reported per configuration: clips/s (one clip = one `(q, k)` item; best of `--rounds`, which
alternate between the two loaders), delivered frames/s, the speed-up over the baseline, and the
CPU time per clip of the workers and the main process together (lowest of the rounds) with its
speed-up: clips/s depend on other jobs on a shared machine, CPU time per clip hardly does.
`--baseline-threads 1` decodes the baseline single-threaded too (default: OpenCV's choice).
`--rss` runs >= 5,000 clips through a 2-worker loader and reports the workers' memory
(/proc/<pid>/status VmRSS and RssAnon) after the first batch, every 10% and at the end.
`--overhead` compares the loader's CPU time per item (workers and main process) with `dataset[i]`'s
in this process (one thread, as in a worker), in alternating rounds of `--clips` items each.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from benchmarks.baselines import read_video_cv2_whole
from videomoco.data.augment import crop_and_resize, random_resized_crop_box
from videomoco.data.datasets import PretrainDataset, build_loader, set_epoch
from videomoco.data.encode import write_video
from videomoco.data.index import build_index
from videomoco.data.sampling import random_clip_start


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="171x128,320x240", help="comma-separated WxH of the generated videos")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--videos", type=int, default=8, help="videos per size")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=25, help="keyframe interval of the generated videos (frames)")
    p.add_argument("--codec", default="h264", choices=["h264", "mpeg4", "vp9", "mjpeg"])
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clips", type=int, default=48, help="timed clips per round (after one warm-up batch)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per configuration; the best is reported")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the OpenCV baseline")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="OpenCV decoder threads of the baseline (default: OpenCV's own choice, as the authors ran it)")
    p.add_argument("--rss", action="store_true", help="measure worker memory over a long run instead")
    p.add_argument("--rss-clips", type=int, default=5000)
    p.add_argument("--overhead", action="store_true", help="the loader's CPU per item against dataset[i]'s instead")
    p.add_argument("--data-dir", default=None, help="where to write the videos (default: a temporary directory); existing ones are reused")
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.workers, args.videos, args.seconds = "64x48", "0,1", 2, 1.0
        args.frames, args.crop, args.batch, args.clips, args.rss_clips, args.rounds = 4, 32, 2, 4, 16, 1
    args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def make_frames(num_frames, width, height, seed):
    """A textured background with a moving bright square: compresses like real footage, not like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, 96)], -1).astype(np.uint8)
    background = background // 2 + rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0)
    side = height // 4
    for t in range(num_frames):
        x = int((width - side) * (0.5 + 0.5 * np.sin(t / 10 + seed)))
        y = int((height - side) * (0.5 + 0.5 * np.cos(t / 13 + seed)))
        frames[t, y : y + side, x : x + side] = (255, 200, 40)
    return frames


def make_dataset(root, size, args, epoch_items):
    """`args.videos` videos of `size` in a folder layout, indexed -> VideoIndex.

    The records are repeated to give epochs of at least `epoch_items` items, so that epoch
    boundaries (where the loader drains its prefetch) do not dominate the timing.
    """
    width, height = size
    data = Path(root) / f"{width}x{height}"
    num_frames = round(args.seconds * args.fps)
    for i in range(args.videos):
        path = data / "videos" / f"v{i:03d}.mp4"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, make_frames(num_frames, width, height, i), args.fps, args.codec, gop=args.gop)
    index = build_index(data / "videos", data / "index", workers=1, progress=False)
    return replace(index, records=index.records * math.ceil(epoch_items / len(index)))


class NaiveCv2Dataset(PretrainDataset):
    """The baseline: decode every frame with OpenCV, slice the clip, crop twice.

    `threads`: OpenCV's FFmpeg decoder threads (None: its default, as the authors ran it).
    """

    def __init__(self, *args, threads=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = threads

    def load(self, i, rng):
        video = read_video_cv2_whole(self.path(i), self.threads)
        start = random_clip_start(len(video), self.span, rng)
        clip = video[np.arange(start, start + self.span, self.frame_stride) % len(video)]
        h, w = clip.shape[1:3]
        return tuple(crop_and_resize(clip, random_resized_crop_box(h, w, self.scale, rng=rng), self.crop_size)
                     for _ in range(2))


def cpu_seconds(pids):
    """CPU time (user + system, all threads) used so far by the processes `pids` ("self": this one)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def throughput(loader, clips, batch):
    """(clips/s, CPU ms per clip) over `clips` clips after one warm-up batch (worker start-up excluded).

    The CPU time is that of the workers and this process together: unlike clips/s it hardly
    depends on what else runs on the machine, so it gives the speed-up on otherwise idle cores.
    """
    epoch, done, start, pids = 0, -batch, None, None
    while True:
        set_epoch(loader, epoch)
        for q, _ in loader:
            done += q.shape[0]
            if start is None:
                pids = ["self"] + [w.pid for w in getattr(loader._iterator, "_workers", [])]  # private, as in bench_rss
                cpu, start, done = cpu_seconds(pids), time.perf_counter(), 0
            elif done >= clips:
                return done / (time.perf_counter() - start), 1000 * (cpu_seconds(pids) - cpu) / done
        epoch += 1


def decode_threads(kind, workers, baseline_threads):
    """How each loader decodes, for the results table (the pipeline's default depends on `workers`)."""
    if kind == "pipeline":
        return "1 per worker" if workers else "FFmpeg auto"
    return "OpenCV default" if baseline_threads is None else str(baseline_threads)


def bench_throughput(index, size, args):
    """Best clips/s of `args.rounds` rounds per loader and worker count; rounds alternate between
    the pipeline and the baseline, so that load from other processes hits both alike."""
    kinds = {"pipeline": PretrainDataset}
    if args.baseline:
        kinds["opencv_whole"] = partial(NaiveCv2Dataset, threads=args.baseline_threads)
    rows = []
    for workers in args.workers:
        rates, cpu_ms = {kind: 0.0 for kind in kinds}, {kind: math.inf for kind in kinds}
        for _ in range(args.rounds):
            for kind, cls in kinds.items():
                loader = build_loader(cls(index, frames_per_clip=args.frames, crop_size=args.crop), args.batch, workers)
                rate, ms = throughput(loader, args.clips, args.batch)
                rates[kind], cpu_ms[kind] = max(rates[kind], rate), min(cpu_ms[kind], ms)
                del loader  # stops its workers before the next loader starts
        for kind, rate in rates.items():
            rows.append({
                "loader": kind, "video": f"{size[0]}x{size[1]}", "workers": workers, "clips_per_s": rate,
                "frames_per_s": rate * args.frames, "speedup": rate / rates["opencv_whole"] if args.baseline else None,
                "cpu_ms_per_clip": cpu_ms[kind],
                # CPU time is counted in clock ticks (10 ms): tiny runs (--quick) can read 0
                "cpu_speedup": cpu_ms["opencv_whole"] / cpu_ms[kind] if args.baseline and cpu_ms[kind] else None,
                "decode_threads": decode_threads(kind, workers, args.baseline_threads),
                "gop": args.gop, "codec": args.codec, "clip": f"{args.frames}x{args.crop}x{args.crop}",
                "load_avg_1min": os.getloadavg()[0],
            })
    return rows


def rss_mib(pid, key="VmRSS"):
    """A memory line of /proc/<pid>/status in MiB: VmRSS (all resident pages, including those
    shared with the parent after fork) or RssAnon (private anonymous memory: what a leak grows)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {key} for pid {pid}")


def bench_rss(index, size, args, samples=10):
    """Worker memory after the first batch, then every `rss_clips / samples` clips, 2 persistent workers.

    Reports VmRSS and RssAnon (max over the workers) at the start and the end, the growth over
    the whole run and over its second half (a plateau after warm-up has none), and the RssAnon trace.
    """
    dataset = PretrainDataset(index, frames_per_clip=args.frames, crop_size=args.crop)
    loader = build_loader(dataset, args.batch, 2, seed=0)
    done, epoch, pids, trace, t0 = 0, 0, None, [], time.perf_counter()

    def sample():
        trace.append({key: max(rss_mib(pid, key) for pid in pids) for key in ("VmRSS", "RssAnon")})

    while done < args.rss_clips:
        set_epoch(loader, epoch)
        for q, _ in loader:
            done += q.shape[0]
            if pids is None:
                pids = [w.pid for w in loader._iterator._workers]  # private, but the only way to the pids
                sample()
            elif done >= len(trace) * args.rss_clips / samples:
                sample()
        epoch += 1
    if len(trace) <= samples:
        sample()
    half = trace[len(trace) // 2]
    return [{
        "video": f"{size[0]}x{size[1]}", "workers": len(pids), "clips": done, "epochs": epoch,
        "seconds": time.perf_counter() - t0,
        "worker_rss_start_mib": trace[0]["VmRSS"], "worker_rss_end_mib": trace[-1]["VmRSS"],
        "worker_anon_start_mib": trace[0]["RssAnon"], "worker_anon_end_mib": trace[-1]["RssAnon"],
        "worker_anon_growth_mib": trace[-1]["RssAnon"] - trace[0]["RssAnon"],
        "worker_anon_growth_2nd_half_mib": trace[-1]["RssAnon"] - half["RssAnon"],
        "worker_anon_trace_mib": " ".join(f"{t['RssAnon']:.0f}" for t in trace),
        "main_rss_mib": rss_mib("self"),
    }]


def bench_overhead(index, size, args):
    """CPU ms per item of `dataset[i]` here and of the same items through the loader, alternating rounds."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []
    for workers in [w for w in args.workers if w > 0]:
        dataset = PretrainDataset(index, frames_per_clip=args.frames, crop_size=args.crop, threads=1)
        loader = build_loader(PretrainDataset(index, frames_per_clip=args.frames, crop_size=args.crop), args.batch, workers)
        set_epoch(loader, 0)
        batches = iter(loader)
        next(batches)  # workers started, first batch (excluded)
        pids = ["self"] + [w.pid for w in loader._iterator._workers]
        first, per_round = 0, args.clips // args.batch * args.batch
        item_ms, loader_ms, main_ms = [], [], []
        for _ in range(args.rounds):
            start = time.process_time()
            for i in range(first, first + per_round):
                dataset[i % len(dataset)]
            item_ms.append(1000 * (time.process_time() - start) / per_round)
            first += per_round
            before = [cpu_seconds([pid]) for pid in pids]
            for _ in range(per_round // args.batch):
                next(batches)
            after = [cpu_seconds([pid]) for pid in pids]
            loader_ms.append(1000 * (sum(after) - sum(before)) / per_round)
            main_ms.append(1000 * (after[0] - before[0]) / per_round)
        del batches, loader
        ratios = np.array(loader_ms) / np.array(item_ms)
        rows.append({
            "video": f"{size[0]}x{size[1]}", "workers": workers, "batch": args.batch, "rounds": args.rounds,
            "dataset_item_ms": float(np.median(item_ms)), "loader_item_ms": float(np.median(loader_ms)),
            "loader_main_process_ms": float(np.median(main_ms)), "loader_over_item": float(np.median(ratios)),
            "ratio_range": f"{ratios.min():.3f}-{ratios.max():.3f}", "clip": f"{args.frames}x{args.crop}x{args.crop}",
            "load_avg_1min": os.getloadavg()[0],
        })
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = common.command_line("benchmarks.data", argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        for size in args.sizes[:1] if args.rss else args.sizes:
            epoch_items = args.rss_clips // 10 if args.rss else (args.clips + 8 * args.batch) * (args.rounds + 1)
            index = make_dataset(root, size, args, epoch_items)
            bench = bench_rss if args.rss else bench_overhead if args.overhead else bench_throughput
            for row in bench(index, size, args):
                common.emit(row, command)
                rows.append(row)
    if args.record:
        name = ("data (worker RSS)" if args.rss else "data (loader CPU per item vs dataset[i])" if args.overhead
                else "data (clips/s: pipeline vs OpenCV whole-video baseline)")
        common.record(name, rows, command, path=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
