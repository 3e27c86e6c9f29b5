"""The readers `read_clip` is measured against: its own previous version, OpenCV, naive PyAV and peers.

    python -m benchmarks.baselines      # which peers are importable here, and why not

Every reader has `read(path, start, num_frames, stride) -> uint8 (T, H, W, 3) RGB` with one decoding
thread (as in a DataLoader worker), for clips that lie inside the video (no looping):

- `read_clip_v0`: `decode.read_clip` as it was before issue 18 (normal open with the probe decode,
  one pass, every frame decoded, converted frames kept apart and stacked), for the old-vs-new ratio;
- `read_clip_cv2` / `read_video_cv2_whole`: OpenCV, as the authors' loader did (the data benchmark's
  baseline); `read_clip_pyav_naive`: decode from the first frame, `frame.to_ndarray` per kept frame;
- decord and torchcodec (exact and approximate seeking), when installed (`pip install -e .[bench]`).
"""

import importlib
import json
import sys

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from videomoco.data.decode import (AV_ERRORS, VideoError, _collect_from_start, _fps, _frame_indices, _reason,
                                   open_video)  # the no-seek fallback is unchanged since (it only pins skip_frame)

# --------------------------------------------------------------------------- read_clip before issue 18


def _convert_v0(reformatter, frame):
    rgb = reformatter.reformat(frame, frame.width, frame.height, format="rgb24", threads=1)
    array = rgb.to_ndarray()
    k = int(frame.rotation or 0) // 90
    return np.rot90(array, k) if k % 4 else array


def _collect_v0(container, stream, wanted, convert):
    fps, start_pts = _fps(stream), stream.start_time or 0
    tb_num, tb_den = stream.time_base.numerator, stream.time_base.denominator
    first, last = min(wanted), max(wanted)
    if first > 0:
        container.seek(start_pts + int(first * tb_den / (fps * tb_num)), stream=stream, backward=True)
    pending, out, seen, count = sorted(wanted), {}, -1, 0
    for frame in container.decode(stream):
        index = (count if first == 0 else seen + 1) if frame.pts is None else round(
            (frame.pts - start_pts) * tb_num / tb_den * fps)
        count += 1
        if seen < 0 and index > first and first > 0:
            container.seek(0, stream=stream, backward=True)
            return _collect_from_start(container, stream, wanted, convert)
        seen, array = max(seen, index), None
        while pending and pending[0] <= index:
            array = convert(frame) if array is None else array
            out[pending.pop(0)] = array
        if index >= last:
            break
    return out, seen


def read_clips_v0(path, starts, num_frames, frame_stride=1):
    """`decode.read_clips` before issue 18 (one decoding thread, no resize) -> list of `(T, H, W, 3)`."""
    reformatter = VideoReformatter()
    container, stream = open_video(path, threads=1)
    with container:
        clips = [_frame_indices(s, num_frames, frame_stride, None, _fps(stream)) for s in starts]
        wanted = {i for clip in clips for i in clip}
        try:
            got, last = _collect_v0(container, stream, wanted, lambda f: _convert_v0(reformatter, f))
            missing = wanted - got.keys()
            if missing and last < 0:
                container.seek(0, stream=stream, backward=True)
                _, last = _collect_from_start(container, stream, {float("inf")}, None)
            length = last + 1
            wrapped = {i % length for i in missing} - got.keys()
            if wrapped:
                container.seek(0, stream=stream, backward=True)
                got.update(_collect_v0(container, stream, wrapped, lambda f: _convert_v0(reformatter, f))[0])
        except AV_ERRORS as err:
            raise VideoError(path, f"decode error: {_reason(err)}") from None
    return [np.stack([got[i] if i in got else got[i % length] for i in clip]) for clip in clips]


def read_clip_v0(path, start, num_frames, stride=1):
    return read_clips_v0(path, [start], num_frames, stride)[0]


# --------------------------------------------------------------------------- OpenCV and naive PyAV


def _cv2_resize(cv2, frame, short_side):
    if not short_side:
        return frame
    height, width = frame.shape[:2]
    scale = short_side / min(width, height)
    return cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def read_clip_cv2(path, start_frame, num_frames, frame_stride=1, short_side=None, fps=None, threads=None):
    """`read_clip` with OpenCV (`pip install videomoco[opencv]`), as the authors' loader did.

    Wraps indices by OpenCV's frame count (an estimate for some containers); no VFR handling and
    no rotation. `threads`: FFmpeg decoder threads (None: OpenCV's default).
    """
    import cv2

    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    try:
        length = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        if length <= 0:
            raise VideoError(path, "cannot open: OpenCV found no frames")
        src_fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        indices = [i % length for i in _frame_indices(start_frame, num_frames, frame_stride, fps, src_fps)]
        out, position = {}, -1
        for index in sorted(set(indices)):
            if position < 0 or index - position > 16:  # grabbing is cheaper than seeking for short jumps
                cap.set(cv2.CAP_PROP_POS_FRAMES, index)
                position = index
            while position < index and cap.grab():
                position += 1
            ok, frame = cap.read()
            if not ok:
                raise VideoError(path, f"decode error: OpenCV could not read frame {index}")
            position += 1
            out[index] = _cv2_resize(cv2, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), short_side)
        return np.stack([out[i] for i in indices])
    finally:
        cap.release()


def read_video_cv2_whole(path, threads=None):
    """The naive baseline: every frame of the video with OpenCV -> uint8 `(N, H, W, 3)` RGB.

    `threads`: FFmpeg decoder threads (None: OpenCV's default, as the authors' loader ran).
    """
    import cv2

    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise VideoError(path, "decode error: OpenCV read no frame")
    return np.stack(frames)


def read_clip_pyav_naive(path, start, num_frames, stride=1):
    """The common PyAV recipe: decode from the first frame, `frame.to_ndarray(format="rgb24")` per kept frame."""
    wanted = range(start, start + num_frames * stride, stride)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "NONE", 1
        out = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    return np.stack([out[i] for i in wanted])


# --------------------------------------------------------------------------- peers


def read_clip_decord(path, start, num_frames, stride=1):
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return reader.get_batch(list(range(start, start + num_frames * stride, stride))).asnumpy()


def _torchcodec(seek_mode):
    def read(path, start, num_frames, stride=1):
        from torchcodec.decoders import VideoDecoder

        decoder = VideoDecoder(str(path), seek_mode=seek_mode, num_ffmpeg_threads=1, dimension_order="NHWC")
        return decoder.get_frames_at(indices=list(range(start, start + num_frames * stride, stride))).data.numpy()

    return read


# name -> (module whose import must work, reader); read_clip itself is added by benchmarks.decoders
PEERS = {
    "read_clip_v0": ("av", read_clip_v0),
    "decord": ("decord", read_clip_decord),
    "torchcodec_exact": ("torchcodec.decoders", _torchcodec("exact")),
    "torchcodec_approx": ("torchcodec.decoders", _torchcodec("approximate")),
    "opencv": ("cv2", lambda path, start, n, stride=1: read_clip_cv2(path, start, n, stride, threads=1)),
    "pyav_naive": ("av", read_clip_pyav_naive),
}


def peer_status(module):
    """`(version, None)` if `module` imports, else `(None, one line saying why)`."""
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # a broken wheel raises OSError / RuntimeError, not only ImportError
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    top = sys.modules[module.split(".")[0]]
    return getattr(top, "__version__", getattr(imported, "__version__", "?")), None


def main(argv=None):
    for name, (module, _) in PEERS.items():
        version, why = peer_status(module)
        print(json.dumps({"reader": name, "module": module, "version": version, "unavailable": why}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
