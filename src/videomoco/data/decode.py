"""Video decoding with PyAV: probe a file's metadata and read clips of frames by index.

Frame indices are defined at the stream's nominal frame rate: a frame's index is
`round(time * fps)` of its presentation time, so variable-frame-rate videos read
as if resampled to their average rate (a gap repeats the next frame, a duplicate
index keeps the first frame). Clips that run past the end loop back to frame 0
(loop, not pad, so motion continues); a 3-frame video gives a 32-frame clip.
Rotation metadata (the display matrix) is applied, so frames come out upright.

A read decodes only what its frames need, and the frames are those of a plain decode:

    open (no probe decode) -> seek to the keyframe before the first wanted frame
      -> feed packets, skipping frames that nothing uses and nothing references (SKIP_UNUSED),
         and drain the decoder once no later packet can fill a wanted index
      -> convert only the wanted frames, into one slab; re-seek for a later frame with its own keyframe

Threads: by default a read decodes with one thread inside a DataLoader worker (the workers
already use every core; FFmpeg's frame threads would only compete with them) and with
FFmpeg's automatic threading in the main process; `threads=` overrides both.
"""

import bisect
import os
import sys
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# PyAV raises FFmpegError subclasses, some of which are also OSError / ValueError.
AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)

# What a decoder may skip of a frame the read does not use (AVCodecContext.skip_frame) without changing
# any other frame: H.264/HEVC non-reference pictures, MPEG-4 Part 2 B-frames; MJPEG frames stand alone.
SKIP_UNUSED = {"h264": "NONREF", "hevc": "NONREF", "mpeg4": "NONREF", "mjpeg": "ALL"}

# av.open options for reads: the decoder that avformat_find_stream_info opens skips pixel decoding, and a
# placeholder pixel format stops it reading on for the real one (the read's decoder finds that). mp4/mov/webm
# headers hold everything else a read uses; `probe` opens normally.
FAST_OPEN = {"skip_frame": "all", "pixel_format": "yuv420p"}
FAST_OPEN_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm")

# A re-seek between two wanted frames must skip at least this many frames (a seek costs about one).
RESEEK_MIN_FRAMES = 4


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


def open_video(path, thread_type="AUTO", threads=0, fast=False):
    """Open a container and its first video stream, or raise VideoError.

    `threads` is the decoder's thread count (0: FFmpeg's default); one thread turns threading off.
    `fast` opens without decoding a frame to fill in stream parameters (`FAST_OPEN`: ~2 ms of a
    340x256 H.264 or VP9 read) when the file's name says mp4/mov/webm; a file whose header then
    lacks the start time or frame rate (H.264 in matroska) is opened again normally.
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise VideoError(path, f"cannot open: {_reason(err)}") from None
    if size == 0:
        raise VideoError(path, "empty file")
    fast = fast and str(path).lower().endswith(FAST_OPEN_SUFFIXES)
    try:
        container = av.open(str(path), options=FAST_OPEN if fast else None)
        video = container.streams.video
        if fast and video and (video[0].start_time is None or not video[0].average_rate):  # left to the probe
            container.close()
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
    """Decoded frames -> rows of one uint8 slab `(count, H, W, 3)`: upright RGB, short side resized by swscale.

    One swscale context per read (`frame.to_ndarray(format=...)` sets one up per frame, ~10x the
    conversion at 171x128) and one allocation: a frame is copied into the slab at once, so swscale's
    buffer is reused, not fresh pages per frame (a page fault each: 40% of a 340x256 read).
    """

    def __init__(self, short_side, threads, count):
        self.short_side, self.threads, self.count = short_side, threads, count
        self.reformatter, self.slab, self.rows = VideoReformatter(), None, 0  # rows used

    def __call__(self, frame):
        """Convert `frame` into the next row -> its row number."""
        width, height = frame.width, frame.height
        if self.short_side:
            scale = self.short_side / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        rgb = self.reformatter.reformat(frame, width, height, format="rgb24", threads=self.threads)
        array = rgb.to_ndarray()  # a view of rgb's buffer
        k = int(frame.rotation or 0) // 90  # display matrix angle is counter-clockwise, as np.rot90
        array = np.rot90(array, k) if k % 4 else array
        if self.slab is None:
            self.slab = np.empty((self.count,) + array.shape, np.uint8)
        elif self.rows == len(self.slab):  # a fallback decoded the frames again
            self.slab = np.concatenate([self.slab, np.empty_like(self.slab)])
        self.slab[self.rows] = array
        self.rows += 1
        return self.rows - 1


class _Timeline:
    """Frame index <-> timestamp of a stream at its nominal rate: index = round((pts - start) * time_base * fps)."""

    def __init__(self, stream):
        self.fps, self.start = _fps(stream), stream.start_time or 0
        self.num, self.den = stream.time_base.numerator, stream.time_base.denominator

    def index(self, pts):  # integer products, not Fractions: exact, and no Python object churn per frame
        return round((pts - self.start) * self.num / self.den * self.fps)

    def pts(self, index):
        return self.start + int(index * self.den / (self.fps * self.num))


class _Skipper:
    """Feeds packets to the decoder, skipping what the wanted `frames` (sorted) cannot need.

    A frame fills the wanted indices in (previous frame's index, its own], so it is unused if it comes
    before the first, or if a packet fed earlier lies in [largest wanted index <= its index, its index)
    (`low[j]`: lowest index fed in [frames[j], frames[j + 1])); unused frames get SKIP_UNUSED's level.
    Once a packet's decode time reaches `tail`, the earliest presentation time fed at or after the last
    wanted index, no later packet can fill anything (pts >= dts, dts grow): the decoder is drained.
    """

    def __init__(self, ctx, time, frames, drain=True):
        self.ctx, self.time, self.frames, self.drain = ctx, time, frames, drain
        self.level = SKIP_UNUSED.get(ctx.name)
        if ctx.name == "mpeg4" and not ctx.has_b_frames:
            self.level = None  # every frame is a reference and none is held back: plain decoding
        self.low, self.tail = [float("inf")] * len(frames), float("inf")
        self.state, self.skipped, self.drained = None, -1, False  # skipped: max index fed as unused

    def frames_from(self, container, stream):
        """Decoded frames from the current position (all of them, or until the decoder was drained)."""
        for packet in container.demux(stream):
            if self.drain and packet.dts is not None and packet.dts >= self.tail and packet.pts != self.tail:
                self.drained = True
                yield from self.ctx.decode(None)
                return
            self.feed(packet)
            yield from packet.decode()

    def feed(self, packet):
        unused = False
        if packet.pts is not None:
            k = self.time.index(packet.pts)
            j = bisect.bisect_right(self.frames, k) - 1
            unused = j < 0 or (self.frames[j] != k and self.low[j] < k)
            if j >= 0:
                self.low[j] = min(self.low[j], k)
            if j == len(self.frames) - 1:
                self.tail = min(self.tail, packet.pts)
            if unused:
                self.skipped = max(self.skipped, k)
        state = self.level if unused else "DEFAULT"
        if state != self.state:
            self.ctx.skip_frame = self.state = state


def _segment_ends(stream, time, frames):
    """Last frame of each run of `frames` (sorted) that one seek serves: a run ends before a frame whose keyframe
    lies more than RESEEK_MIN_FRAMES past the previous frame (index times are decode times: errs to one run)."""
    entries, ends = stream.index_entries, []
    for a, b in zip(frames, frames[1:]):
        if b - a > RESEEK_MIN_FRAMES and len(entries):
            i = entries.search_timestamp(time.pts(b), backward=True)
            if i >= 0 and time.index(entries[i].timestamp) > a + RESEEK_MIN_FRAMES:
                ends.append(a)
    return ends + [frames[-1]]


def _collect(container, stream, wanted, convert):
    """Decode the frames `wanted` (a set of indices) -> ({index: row of convert.slab}, last index seen).

    Seeks to the keyframe before the first wanted frame, and again before a later one with a keyframe of its
    own (clips far apart); skips what no wanted index uses (`_Skipper`); converts only the wanted frames.
    """
    time, ctx = _Timeline(stream), stream.codec_context
    pending = sorted(wanted)
    first = target = pending[0]
    ends, drain, out, seen, count = None, True, {}, -1, 0
    while True:
        if target > 0 or ends is not None:
            container.seek(time.pts(target), stream=stream, backward=True)
        if ends is None:  # after the first seek: matroska reads its index then
            ends = _segment_ends(stream, time, pending)
        end, restart = next(e for e in ends if e >= pending[0]), None
        skip = _Skipper(ctx, time, [f for f in pending if f <= end], drain)
        fresh = target > 0  # no frame since the seek
        for frame in skip.frames_from(container, stream) if skip.level else container.decode(stream):
            pts = frame.pts
            index = (count if first == 0 else seen + 1) if pts is None else time.index(pts)
            count += 1
            if fresh and index > pending[0]:  # the seek landed past the wanted frame (open GOP, broken index)
                if target == first:  # decode from the start instead
                    container.seek(0, stream=stream, backward=True)
                    return _collect_from_start(container, stream, wanted, convert)
                restart, ends = first, [pending[-1]]  # a later run's seek: decode on from the first one's
                break
            fresh, seen = False, max(seen, index)
            row = None
            while pending and pending[0] <= index:
                row = convert(frame) if row is None else row
                out[pending.pop(0)] = row
            if not pending:
                return out, seen
            if index >= end:
                break  # the rest lies in a later run: seek there
        else:
            if not skip.drained:  # end of the stream; skipped frames count as seen, as if decoded
                return out, max(seen, skip.skipped)
            if pending[0] <= end:  # drained without a wanted frame (it failed to decode): go on without draining
                drain, ends = False, [pending[-1]]
        target = pending[0] if restart is None else restart


def _collect_from_start(container, stream, wanted, convert):
    """`_collect` without seeking, counting frames in decode order (fallback for bad seek tables)."""
    stream.codec_context.skip_frame = "DEFAULT"  # count every frame
    pending, out, index = sorted(wanted), {}, -1
    for index, frame in enumerate(container.decode(stream)):
        row = None
        while pending and pending[0] <= index:
            row = convert(frame) if row is None else row
            out[pending.pop(0)] = row
        if not pending:
            break
    return out, index


def _frame_indices(start_frame, num_frames, frame_stride, fps, src_fps):
    indices = [start_frame + i * frame_stride for i in range(num_frames)]
    if fps:  # indices are at the requested rate: map them to source frames
        indices = [round(i * src_fps / fps) for i in indices]
    return indices


def read_clips(path, starts, num_frames, frame_stride=1, short_side=None, fps=None, threads=None):
    """Several clips of one video from one open -> list of uint8 `(T, H, W, 3)`.

    Clip j holds frames `starts[j] + i * frame_stride` (i < num_frames), counted at
    `fps` if given (else the video's own rate); frames past the end loop from frame 0.
    Clips that share a GOP are decoded in one pass; the decoder re-seeks to a later clip's own keyframe.
    `threads`: decoder and swscale threads (None: 1 in a DataLoader worker, else FFmpeg's choice).
    """
    if num_frames < 1 or frame_stride < 1 or min(starts) < 0:
        got = f"{num_frames}, {frame_stride}, {min(starts)}"
        raise ValueError(f"need num_frames >= 1, frame_stride >= 1 and starts >= 0, got {got}")
    return read_frame_lists(path, lambda src_fps: [_frame_indices(s, num_frames, frame_stride, fps, src_fps)
                                                   for s in starts], short_side, threads)


def read_frame_lists(path, clips, short_side=None, threads=None):
    """Clips of given source frame indices of one video, decoded in one pass -> list of uint8 `(T, H, W, 3)`.

    `clips`: a list of index lists, or a function of the video's frame rate returning one. Indices past the
    end loop from frame 0, as in `read_clips`.
    """
    threads = decoder_threads(threads)
    container, stream = open_video(path, threads=threads, fast=True)
    with container:
        clips = clips(_fps(stream)) if callable(clips) else [list(map(int, c)) for c in clips]
        if not clips or min(min(c) for c in clips) < 0:
            raise ValueError(f"need non-negative frame indices, got {clips}")
        wanted = {i for clip in clips for i in clip}
        convert = _Converter(short_side, threads, len(wanted))
        try:
            got, last = _collect(container, stream, wanted, convert)  # index -> row of convert.slab
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
        rows = [[got[i] if i in got else got[i % length] for i in clip] for clip in clips]
    except KeyError as err:
        raise VideoError(path, f"decode error: frame {err.args[0]} not decoded") from None
    if len(rows) == 1 and rows[0] == list(range(len(convert.slab))):
        return [convert.slab]  # one clip, its frames in order: the slab is the clip
    return [convert.slab[r] for r in rows]


def read_clip(path, start_frame, num_frames, frame_stride=1, short_side=None, fps=None, threads=None):
    """Frames `start_frame + i * frame_stride` (i < num_frames) -> uint8 `(T, H, W, 3)` RGB.

    `short_side` resizes so the shorter side has that many pixels; `fps` counts frame
    indices at that rate instead of the video's. Past the end the video loops.
    `threads` as in `read_clips`.
    """
    return read_clips(path, [start_frame], num_frames, frame_stride, short_side, fps, threads)[0]
