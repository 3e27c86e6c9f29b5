"""Video decoding with PyAV: probe a file's metadata and read clips of frames by index.

Frame indices are defined at the stream's nominal frame rate: a frame's index is
`round(time * fps)` of its presentation time, so variable-frame-rate videos read
as if resampled to their average rate (a gap repeats the next frame, a duplicate
index keeps the first frame). Clips that run past the end loop back to frame 0
(loop, not pad, so motion continues); a 3-frame video gives a 32-frame clip.
Rotation metadata (the display matrix) is applied, so frames come out upright.

Threads: by default a read decodes with one thread inside a DataLoader worker (the workers
already use every core; FFmpeg's frame threads would only compete with them) and with
FFmpeg's automatic threading in the main process; `threads=` overrides both.

An OpenCV backend with the same signature (`read_clip_cv2`) and the naive
read-everything baseline (`read_video_cv2_whole`) exist for comparison only.
"""

import os
import sys
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# PyAV raises FFmpegError subclasses, some of which are also OSError / ValueError.
AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


class VideoError(Exception):
    """A video that cannot be used; `reason` is one short line ("empty file", "no video stream", ...)."""

    def __init__(self, path, reason):
        super().__init__(str(path), reason)  # both in args, so it pickles across processes
        self.path, self.reason = str(path), reason

    def __str__(self):
        return f"{self.path}: {self.reason}"


@dataclass
class VideoInfo:
    """Container metadata of one video; width/height are after rotation (as `read_clip` returns frames)."""

    frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    rotation: int
    size: int
    mtime: float


def _reason(err):
    """One line from an FFmpeg/OS error, without the file name that PyAV appends."""
    msg = getattr(err, "strerror", None) or str(err)
    return msg.splitlines()[0].strip() if msg else type(err).__name__


def decoder_threads(threads=None):
    """Decoder threads for a read: `threads` if given, else 1 in a DataLoader worker, else 0 (FFmpeg picks)."""
    if threads is None:
        data = sys.modules.get("torch.utils.data")  # not imported: not in a worker (and no torch import here)
        return 1 if data is not None and data.get_worker_info() is not None else 0
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: one per CPU), got {threads}")
    return threads


def open_video(path, thread_type="AUTO", threads=0):
    """Open a container and its first video stream, or raise VideoError.

    `threads` is the decoder's thread count (0: FFmpeg's default); one thread turns threading off.
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise VideoError(path, f"cannot open: {_reason(err)}") from None
    if size == 0:
        raise VideoError(path, "empty file")
    try:
        container = av.open(str(path))
    except AV_ERRORS as err:
        raise VideoError(path, f"cannot open: {_reason(err)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "NONE" if threads == 1 else thread_type
    stream.codec_context.thread_count = threads
    return container, stream


def _fps(stream):
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 25.0


def probe(path):
    """Metadata of `path` as a VideoInfo, from the container plus one decoded frame.

    Decoding the first frame catches streams that open but do not decode; a sample table
    pointing past the end of the file catches truncated mp4/avi. Containers without a frame
    count (webm/mkv) get `frames = round(duration * fps)`.
    """
    container, stream = open_video(path, thread_type="SLICE")  # frame threads only delay a single frame
    with container:
        fps = _fps(stream)
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        frames = stream.frames or round(duration * fps)
        stat = os.stat(path)
        entries = stream.index_entries  # mp4/avi sample tables: where the last packet should be
        end = entries[len(entries) - 1].pos + entries[len(entries) - 1].size if len(entries) else 0
        if end > stat.st_size:
            raise VideoError(path, f"truncated: data should end at byte {end:,}, file has {stat.st_size:,}")
        try:
            first = next(container.decode(stream), None)
        except AV_ERRORS as err:
            raise VideoError(path, f"decode error: {_reason(err)}") from None
        if first is None:
            raise VideoError(path, "decode error: no frame decoded")
        rotation = int(first.rotation or 0) % 360 // 90 * 90
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        if not duration:
            duration = frames / fps
        return VideoInfo(
            frames=max(int(frames), 1), fps=fps, duration=duration, width=width, height=height,
            codec=stream.codec_context.name, rotation=rotation, size=stat.st_size, mtime=stat.st_mtime,
        )


class _Converter:
    """Decoded frames -> upright RGB `(H, W, 3)` uint8 arrays, short side resized in C by swscale.

    One swscale context for all frames of a read: `frame.to_ndarray(format=...)` would set up a
    new one per frame, which costs ~10x the conversion of a 171x128 frame.
    """

    def __init__(self, short_side, threads):
        self.short_side, self.threads = short_side, threads
        self.reformatter = VideoReformatter()

    def __call__(self, frame):
        width, height = frame.width, frame.height
        if self.short_side:
            scale = self.short_side / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        rgb = self.reformatter.reformat(frame, width, height, format="rgb24", threads=self.threads)
        array = rgb.to_ndarray()  # a view of rgb's buffer: the clip's np.stack is the only copy
        k = int(frame.rotation or 0) // 90  # display matrix angle is counter-clockwise, as np.rot90
        return np.rot90(array, k) if k % 4 else array


def _collect(container, stream, wanted, convert):
    """Decode once through the frames `wanted` (a set of indices) -> ({index: array}, last index seen).

    Seeks to the keyframe at or before the first wanted frame, stops after the last, and
    converts only the wanted frames with `convert` (a `_Converter`).
    """
    fps, start_pts = _fps(stream), stream.start_time or 0
    tb_num, tb_den = stream.time_base.numerator, stream.time_base.denominator
    first, last = min(wanted), max(wanted)
    if first > 0:
        container.seek(start_pts + int(first * tb_den / (fps * tb_num)), stream=stream, backward=True)
    pending = sorted(wanted)
    out, seen, count = {}, -1, 0
    for frame in container.decode(stream):
        if frame.pts is None:
            index = count if first == 0 else seen + 1
        else:  # integer products, not Fractions: exact, and no Python object churn per frame
            index = round((frame.pts - start_pts) * tb_num / tb_den * fps)
        count += 1
        if seen < 0 and index > first and first > 0:
            # the seek landed past the wanted frame (broken index): decode from the start instead
            container.seek(0, stream=stream, backward=True)
            return _collect_from_start(container, stream, wanted, convert)
        seen = max(seen, index)
        array = None
        while pending and pending[0] <= index:
            array = convert(frame) if array is None else array
            out[pending.pop(0)] = array
        if index >= last:
            break
    return out, seen


def _collect_from_start(container, stream, wanted, convert):
    """`_collect` without seeking, counting frames in decode order (fallback for bad seek tables)."""
    pending, out, index = sorted(wanted), {}, -1
    for index, frame in enumerate(container.decode(stream)):
        array = None
        while pending and pending[0] <= index:
            array = convert(frame) if array is None else array
            out[pending.pop(0)] = array
        if not pending:
            break
    return out, index


def _frame_indices(start_frame, num_frames, frame_stride, fps, src_fps):
    indices = [start_frame + i * frame_stride for i in range(num_frames)]
    if fps:  # indices are at the requested rate: map them to source frames
        indices = [round(i * src_fps / fps) for i in indices]
    return indices


def read_clips(path, starts, num_frames, frame_stride=1, short_side=None, fps=None, threads=None):
    """Several clips of one video, decoded in one pass -> list of uint8 `(T, H, W, 3)`.

    Clip j holds frames `starts[j] + i * frame_stride` (i < num_frames), counted at
    `fps` if given (else the video's own rate); frames past the end loop from frame 0.
    `threads`: decoder and swscale threads (None: 1 in a DataLoader worker, else FFmpeg's choice).
    """
    if num_frames < 1 or frame_stride < 1 or min(starts) < 0:
        got = f"{num_frames}, {frame_stride}, {min(starts)}"
        raise ValueError(f"need num_frames >= 1, frame_stride >= 1 and starts >= 0, got {got}")
    threads = decoder_threads(threads)
    convert = _Converter(short_side, threads)
    container, stream = open_video(path, threads=threads)
    with container:
        src_fps = _fps(stream)
        clips = [_frame_indices(s, num_frames, frame_stride, fps, src_fps) for s in starts]
        wanted = {i for clip in clips for i in clip}
        try:
            got, last = _collect(container, stream, wanted, convert)
            missing = wanted - got.keys()
            if missing and last < 0:  # seeked past the end (frame count overestimated): count from 0
                container.seek(0, stream=stream, backward=True)
                _, last = _collect_from_start(container, stream, {float("inf")}, convert)  # decodes all
            if missing and last < 0:
                raise VideoError(path, "decode error: no frame decoded")
            length = last + 1
            wrapped = {i % length for i in missing} - got.keys()
            if wrapped:
                container.seek(0, stream=stream, backward=True)
                more, _ = _collect(container, stream, wrapped, convert)
                got.update(more)
        except AV_ERRORS as err:
            raise VideoError(path, f"decode error: {_reason(err)}") from None
    try:
        return [np.stack([got[i] if i in got else got[i % length] for i in clip]) for clip in clips]
    except KeyError as err:
        raise VideoError(path, f"decode error: frame {err.args[0]} not decoded") from None


def read_clip(path, start_frame, num_frames, frame_stride=1, short_side=None, fps=None, threads=None):
    """Frames `start_frame + i * frame_stride` (i < num_frames) -> uint8 `(T, H, W, 3)` RGB.

    `short_side` resizes so the shorter side has that many pixels; `fps` counts frame
    indices at that rate instead of the video's. Past the end the video loops.
    `threads` as in `read_clips`.
    """
    return read_clips(path, [start_frame], num_frames, frame_stride, short_side, fps, threads)[0]


def _cv2_resize(cv2, frame, short_side):
    if not short_side:
        return frame
    height, width = frame.shape[:2]
    scale = short_side / min(width, height)
    return cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def read_clip_cv2(path, start_frame, num_frames, frame_stride=1, short_side=None, fps=None):
    """`read_clip` with OpenCV (`pip install videomoco[opencv]`), as the authors' loader did.

    Wraps indices by OpenCV's frame count (an estimate for some containers); no VFR
    handling and no rotation. For comparison and parity checks; PyAV is the default.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
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
