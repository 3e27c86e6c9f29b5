"""Re-encode a dataset once for fast random access during training.

    videomoco transcode SRC DST [--short-side 128] [--gop 16] [--crf 23] [--workers N] [--follow-symlinks]

Every video under SRC becomes DST/<same relative path>.mp4: H.264 at the given short
side with a keyframe every `gop` frames, so a clip seek decodes at most `gop` extra frames.
Audio is dropped; rotation metadata is kept. Other files (split lists, annotations) are
copied alongside, so `videomoco index DST` sees the same layout (split files that say
`.avi` match the `.mp4` copies). Resumable: outputs that exist, decode and are newer
than their source are skipped; each output is written under a temporary name, then renamed.
Broken inputs are listed in DST/transcode_failures.csv and counted, never fatal.

Nothing outside SRC is read unless `--follow-symlinks`: a symlink (to a video or a directory)
is followed when it points inside SRC, each directory once, and one that points outside is
skipped and counted ("skipped 2 symlinks that point outside SRC (use --follow-symlinks)").
Non-video files are copied only when they are plain files: never through a symlink, with or
without the flag (a link `notes.txt -> /etc/passwd` must not land in DST).
"""

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import av
from tqdm import tqdm

from videomoco.data.decode import AV_ERRORS, VideoError, open_video, probe
from videomoco.data.index import write_csv, default_out
from videomoco.data.layouts import OUTSIDE_ROOT, VIDEO_EXTENSIONS, scan_tree
from videomoco.data.workers import process_pool
from videomoco.flags import COUNT, CRF, POSITIVE_INT, SHARED, config_from, defaults, fail

log = logging.getLogger(__name__)


def _even(x):
    return max(2, int(round(x / 2)) * 2)  # yuv420p needs even sizes


def transcode_video(src, dst, short_side=128, gop=16, crf=23):
    """Re-encode `src` to H.264 `dst` (.mp4) with short side `short_side` (None: keep) and keyframes every `gop`."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.tmp.mp4")  # hidden: never indexed
    dst.parent.mkdir(parents=True, exist_ok=True)
    container, stream = open_video(src)
    try:
        with container, av.open(str(tmp), mode="w") as out:
            rate = stream.average_rate or stream.guessed_rate or 25
            width, height = stream.codec_context.width, stream.codec_context.height
            scale = short_side / min(width, height) if short_side else 1.0
            encoder = out.add_stream("libx264", rate=rate)
            encoder.width, encoder.height, encoder.pix_fmt = _even(width * scale), _even(height * scale), "yuv420p"
            encoder.codec_context.gop_size = gop
            encoder.options = {"keyint_min": str(gop), "crf": str(crf), "preset": "veryfast", "threads": "1"}
            count = 0
            for frame in container.decode(stream):
                if count == 0 and frame.rotation:
                    encoder.set_display_rotation(frame.rotation)
                # constant frame rate out: frame i at i / rate, as the index counts frames
                resized = frame.reformat(encoder.width, encoder.height, "yuv420p")
                resized.pts, resized.time_base = count, 1 / rate
                resized.pict_type = 0  # NONE: an intra-only source (MJPEG) marks every frame I, which x264 obeys
                out.mux(encoder.encode(resized))
                count += 1
            if count == 0:
                raise VideoError(src, "decode error: no frame decoded")
            out.mux(encoder.encode(None))
        os.replace(tmp, dst)
    except AV_ERRORS as err:
        raise VideoError(src, f"decode error: {' '.join(str(err).split())}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _up_to_date(src, dst):
    """An existing output newer than its source that opens and decodes."""
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        return False
    try:
        probe(dst)
        return True
    except VideoError:
        return False


def _job(args):
    """('done' | 'skipped' | 'failed', relative path, reason): never raises, so a pool never dies."""
    src, dst, rel, short_side, gop, crf = args
    if _up_to_date(Path(src), Path(dst)):
        return "skipped", rel, ""
    try:
        transcode_video(src, dst, short_side, gop, crf)
        return "done", rel, ""
    except VideoError as err:
        return "failed", rel, err.reason
    except Exception as err:  # one bad file must not stop the dataset
        return "failed", rel, f"{type(err).__name__}: {' '.join(str(err).split())}"


def _copy_other_files(src, dst, exclude):
    """Copy the plain non-video files (split lists, annotations) that are missing or older in DST
    -> (copied, symlinks not followed)."""
    copied = links = 0
    for folder, dirs, files in os.walk(src):  # never into a linked directory
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in exclude]
        links += sum((Path(folder) / d).is_symlink() for d in dirs)
        for name in files:
            if name.startswith(".") or name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            source = Path(folder) / name
            if source.is_symlink():
                links += 1
                continue
            target = dst / source.relative_to(src)
            if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
                copied += 1
    return copied, links


@dataclass
class TranscodeConfig:
    src: str
    dst: str
    short_side: int = 128
    gop: int = 16
    crf: int = 23
    workers: int | None = None
    progress: bool = True
    follow_symlinks: bool = False


def run(cfg):
    """Transcode SRC into DST -> {"done", "skipped", "failed", "copied", "failures", "summary"}."""
    src, dst = Path(cfg.src).resolve(), Path(cfg.dst).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"source {src} is not a directory")
    if dst == src or src in dst.parents:
        raise ValueError(f"destination {dst} must not be inside the source {src}")
    exclude = {default_out(src).resolve(), dst}
    tree = scan_tree(src, exclude=exclude, follow_symlinks=cfg.follow_symlinks)
    videos, outside = tree.videos, tree.outside + sum(r == OUTSIDE_ROOT for r in tree.problems.values())
    if outside:
        log.warning("skipped %d symlinks that point outside %s (use --follow-symlinks)", outside, src)
    outputs = {}
    for rel in videos:
        outputs.setdefault(str(Path(rel).with_suffix(".mp4")), []).append(rel)
    clash = next((rels for rels in outputs.values() if len(rels) > 1), None)
    if clash:  # before any work: one output for two sources would hold either's content under one name
        n = sum(len(rels) > 1 for rels in outputs.values())
        raise ValueError(f"{' and '.join(sorted(clash))} in {src} would both become "
                         f"{dst / Path(clash[0]).with_suffix('.mp4')} ({n} such name clashes): rename one of each pair")
    jobs = [(str(src / rel), str(dst / out), rel, cfg.short_side, cfg.gop, cfg.crf) for out, (rel,) in outputs.items()]
    problems = [(rel, reason) for rel, reason in tree.problems.items() if reason != OUTSIDE_ROOT]
    workers = cfg.workers or os.cpu_count() or 1
    bar = dict(total=len(jobs), desc="transcoding", unit="video", disable=not cfg.progress, file=sys.stderr)
    if workers <= 1:
        results = [_job(job) for job in tqdm(jobs, **bar)]
    else:
        with process_pool(workers) as pool:
            results = list(tqdm(pool.map(_job, jobs, chunksize=1), **bar))
    dst.mkdir(parents=True, exist_ok=True)
    copied, links = _copy_other_files(src, dst, exclude)
    if links:
        log.warning("copied no non-video file through %d symlinks (only plain files under %s are copied)", links, src)
    failures = sorted([(rel, reason) for status, rel, reason in results if status == "failed"] + problems)
    write_csv(dst / "transcode_failures.csv", ("path", "reason"), failures)
    counts = {s: sum(r[0] == s for r in results) for s in ("done", "skipped")}
    line = f"transcoded {counts['done']:,} videos ({counts['skipped']:,} up to date), failed {len(failures):,}"
    if failures:
        line += f": see {dst / 'transcode_failures.csv'}"
    return dict(counts, failed=len(failures), copied=copied, failures=failures, summary=line)


def add_arguments(parser):
    d = defaults(TranscodeConfig)
    parser.add_argument("src", help="dataset root to read")
    parser.add_argument("dst", help="where to write the re-encoded dataset (same relative layout)")
    parser.add_argument("--short-side", type=COUNT, default=d["short_side"], help="short side in pixels (0: keep)")
    parser.add_argument("--gop", type=POSITIVE_INT, default=d["gop"], help="keyframe interval in frames")
    parser.add_argument("--crf", type=CRF, default=d["crf"], help="x264 quality, 0-51 (lower is better)")
    parser.add_argument(*SHARED["workers"], type=COUNT, default=d["workers"], help="processes (default or 0: all cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--follow-symlinks", action="store_true", help="also transcode videos linked from outside SRC")


def main(args):
    cfg = config_from(TranscodeConfig, args, short_side=args.short_side or None)
    try:
        print(run(cfg)["summary"])
    except (ValueError, OSError) as err:  # missing source, destination inside it: one line, no traceback
        return fail("transcode", err)
    return 0
