"""Decoding: probe metadata, frame-exact seeking, looping, resizing, rotation, no leaked decoders,
and the fast paths of a read (no probe decode, skipped unused frames, re-seeks) against a plain decode."""

import bisect
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import moving_square_frames

from videomoco.data import decode
from videomoco.data.decode import VideoError, decoder_threads, open_video, probe, read_clip, read_clips
from videomoco.data.encode import write_video

CODECS = [("a.mp4", "h264"), ("a.avi", "mpeg4"), ("a.webm", "vp8"), ("b.webm", "vp9"), ("a.mkv", "vp9"), ("m.avi", "mjpeg")]


def level(i):
    """Grey level of frame i in `grey_video`: flat frames 7 levels apart survive lossy codecs."""
    return 10 + 7 * i % 230


def grey_video(path, num_frames, codec="h264", gop=None, size=32):
    frames = np.stack([np.full((size, size, 3), level(i), np.uint8) for i in range(num_frames)])
    return write_video(path, frames, fps=25, codec=codec, gop=gop)


def frame_levels(clip):
    return clip.reshape(len(clip), -1).mean(axis=1)


def square_x(clip, size=64):
    """Column centre of the bright square in each frame `(T,)` (background is < 80, the square >= 120)."""
    band = clip[:, size // 3 + 3 : size // 3 + size // 4 - 3].max(axis=-1) > 100  # (T, rows, W)
    cols = band.mean(axis=1) > 0.5
    return np.array([np.flatnonzero(c).mean() for c in cols])


@pytest.mark.parametrize("name,codec", CODECS)
def test_probe_values(make_video, name, codec):
    path = make_video(name, num_frames=32, codec=codec)
    info = probe(path)
    assert info.frames == 32
    assert info.fps == pytest.approx(25)
    assert info.duration == pytest.approx(32 / 25, abs=0.05)
    assert (info.width, info.height, info.rotation) == (64, 64, 0)
    assert info.codec == {"h264": "h264", "mpeg4": "mpeg4", "vp8": "vp8", "vp9": "vp9", "mjpeg": "mjpeg"}[codec]
    assert (info.size, info.mtime) == (path.stat().st_size, path.stat().st_mtime)


@pytest.mark.parametrize("name,codec", CODECS)
def test_read_clip_matches_source(make_video, name, codec):
    path = make_video(name, num_frames=32, codec=codec)
    expected = square_x(moving_square_frames(32, 64))
    for start, stride in [(0, 1), (5, 2), (20, 1)]:
        clip = read_clip(path, start, 8, stride)
        assert clip.shape == (8, 64, 64, 3) and clip.dtype == np.uint8
        np.testing.assert_allclose(square_x(clip), expected[start : start + 8 * stride : stride], atol=1.0)


@pytest.mark.parametrize("codec,name", [("h264", "long.mp4"), ("vp9", "long.webm"), ("mpeg4", "long.avi")])
def test_seek_is_frame_exact_on_long_gop(tmp_path, codec, name):
    path = grey_video(tmp_path / name, 120, codec=codec, gop=30)
    for start in (75, 31, 59, 90):
        got = frame_levels(read_clip(path, start, 3))
        np.testing.assert_allclose(got, [level(start + i) for i in range(3)], atol=2.5)


def test_loop_past_the_end_and_tiny_video(tmp_path):
    path = grey_video(tmp_path / "ten.mp4", 10)
    got = frame_levels(read_clip(path, 7, 6, frame_stride=2))  # frames 7, 9, 11, 13, ... loop to 1, 3, ...
    np.testing.assert_allclose(got, [level(i % 10) for i in range(7, 19, 2)], atol=2.5)
    tiny = grey_video(tmp_path / "three.webm", 3, codec="vp8")
    clip = read_clip(tiny, 0, 32)
    assert clip.shape[0] == 32
    np.testing.assert_allclose(frame_levels(clip), [level(i % 3) for i in range(32)], atol=2.5)


def test_start_beyond_metadata_count_loops(tmp_path):
    path = grey_video(tmp_path / "five.mkv", 5, codec="vp9")
    np.testing.assert_allclose(frame_levels(read_clip(path, 12, 2)), [level(2), level(3)], atol=2.5)


def test_short_side_and_fps(tmp_path):
    frames = np.zeros((20, 48, 80, 3), np.uint8) + np.arange(20, dtype=np.uint8)[:, None, None, None] * 10
    path = write_video(tmp_path / "wide.mp4", frames, fps=20)
    assert read_clip(path, 0, 2, short_side=24).shape == (2, 24, 40, 3)
    # at fps=10, index i is source frame 2i
    np.testing.assert_allclose(frame_levels(read_clip(path, 1, 3, fps=10)), [20, 40, 60], atol=1.0)


def test_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :32] = 200  # left half bright
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (90, 32, 64)
    clip = read_clip(path, 0, 2)
    assert clip.shape == (2, 64, 32, 3)
    # rotated counter-clockwise, the bright left half ends up at the bottom
    assert clip[0, 40:].mean() > 150 and clip[0, :24].mean() < 50


def test_read_clips_equals_read_clip(tmp_path):
    path = grey_video(tmp_path / "v.mp4", 40, gop=8)
    clips = read_clips(path, [30, 2, 17], 6, frame_stride=2)
    for start, clip in zip([30, 2, 17], clips):
        np.testing.assert_array_equal(clip, read_clip(path, start, 6, frame_stride=2))


def test_no_descriptor_leak(tmp_path):
    path = grey_video(tmp_path / "fd.mp4", 20)
    read_clip(path, 0, 2)  # warm up lazily opened libraries
    before = len(os.listdir("/proc/self/fd"))
    for i in range(200):
        read_clip(path, i % 20, 4)
    with pytest.raises(VideoError):
        for _ in range(20):
            probe(tmp_path / "missing.mp4")
    assert len(os.listdir("/proc/self/fd")) <= before


def audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp2", rate=44100)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_errors_have_short_reasons(tmp_path, make_video):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    good = make_video("good.mp4", num_frames=30)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {empty: "empty file", noise: "cannot open", audio_only(tmp_path / "a.mp4"): "no video stream",
             truncated: "cannot open"}
    for path, reason in cases.items():
        with pytest.raises(VideoError) as info:
            probe(path)
        assert info.value.reason.startswith(reason) and "\n" not in str(info.value)
        with pytest.raises(VideoError):
            read_clip(path, 0, 4)
    with pytest.raises(ValueError):
        read_clip(good, 0, 0)


def test_variable_frame_rate_maps_time_to_index(tmp_path):
    """Frames at irregular times: index i is the first frame whose time rounds to i or later."""
    from fractions import Fraction

    times = [0, 40, 80, 120, 160, 280, 320, 360, 400, 420, 440, 480, 520]  # ms: a gap, then doubled rate
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level(k), np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    fps = probe(path).fps
    slots = [round(t / 1000 * fps) for t in times]
    expected = [level(next(k for k, s in enumerate(slots) if s >= i)) for i in range(slots[-1] + 1)]
    np.testing.assert_allclose(frame_levels(read_clip(path, 0, len(expected))), expected, atol=2.5)


def test_video_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(VideoError("a.mp4", "empty file")))
    assert (err.path, err.reason, str(err)) == ("a.mp4", "empty file", "a.mp4: empty file")


@pytest.mark.parametrize("name,codec", [("t.mp4", "h264"), ("t.webm", "vp9")])
def test_thread_counts_give_identical_frames(make_video, name, codec):
    path = make_video(name, num_frames=40, codec=codec, gop=12)
    for short_side in (None, 48):
        reference = read_clips(path, [3, 25], 8, frame_stride=2, short_side=short_side, threads=1)
        for threads in (0, 2, None):
            clips = read_clips(path, [3, 25], 8, frame_stride=2, short_side=short_side, threads=threads)
            for got, want in zip(clips, reference):
                np.testing.assert_array_equal(got, want)


class _WorkerThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return decoder_threads()


def test_default_threads_one_per_dataloader_worker():
    assert decoder_threads() == 0  # main process: FFmpeg picks
    assert decoder_threads(3) == 3
    with pytest.raises(ValueError, match="threads must be >= 0"):
        decoder_threads(-1)
    loader = torch.utils.data.DataLoader(_WorkerThreads(), batch_size=None, num_workers=1)
    assert list(loader) == [1, 1]


def test_only_kept_frames_are_converted(tmp_path, monkeypatch):
    path = grey_video(tmp_path / "gop.mp4", 90, gop=30)
    converted, real = [], decode._Converter.__call__

    def spy(self, frame):
        converted.append(frame.pts)
        return real(self, frame)

    monkeypatch.setattr(decode._Converter, "__call__", spy)
    clip = read_clip(path, 50, 4, frame_stride=2)  # decodes from the keyframe at 30
    np.testing.assert_allclose(frame_levels(clip), [level(i) for i in (50, 52, 54, 56)], atol=2.5)
    assert len(converted) == 4


# --------------------------------------------------------------------------- fast paths vs a plain decode


def encode(path, frames, encoder, pix_fmt="yuv420p", gop=12, b_frames=None, options=None, start=0, audio=False):
    """Encode `frames` (T, H, W, 3) with PyAV's `encoder`; `start`: first pts (frames), `audio`: add an AAC track."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.codec_context.gop_size = pix_fmt, gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        stream.options = dict(options or {})
        sound, samples = (container.add_stream("aac", rate=8000) if audio else None), 0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = start + i, Fraction(1, 25)
            container.mux(stream.encode(frame))
            while sound is not None and samples < (i + 1) * 8000 // 25:
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 8000, samples
                container.mux(sound.encode(chunk))
                samples += 1024
        container.mux(stream.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return path


X264 = {"preset": "veryfast", "keyint_min": "12"}
ZOO = {  # name -> (file, encoder, encode() options): every decoder and container the fast paths touch
    "h264 B-frames": ("b.mp4", "libx264", {"options": X264}),
    "h264 no B-frames": ("nob.mp4", "libx264", {"options": {**X264, "bf": "0"}}),
    "h264 yuv444, audio, start 7": ("x444.mp4", "libx264", {"pix_fmt": "yuv444p", "options": X264, "start": 7, "audio": True}),
    "h264 mkv": ("h.mkv", "libx264", {"options": X264}),
    "hevc open GOP": ("h.mp4", "libx265", {"options": {"preset": "ultrafast", "x265-params": "log-level=error"}}),
    "mpeg4 B-frames": ("m4b.mp4", "mpeg4", {"b_frames": 2}),
    "mpeg4 avi": ("m4.avi", "mpeg4", {}),
    "mjpeg": ("j.avi", "mjpeg", {"pix_fmt": "yuvj420p"}),
    "vp8": ("v8.webm", "libvpx", {"options": {"deadline": "realtime", "cpu-used": "8"}}),
    "vp9": ("v9.webm", "libvpx-vp9", {"options": {"deadline": "realtime", "cpu-used": "8"}}),
    "vp9 mkv": ("v9.mkv", "libvpx-vp9", {"options": {"deadline": "realtime", "cpu-used": "8"}}),
}
ZOO_FRAMES = 40
# (starts, stride): mid-GOP, strided 2-4, the start, the end, looping past it, starting past it,
# clips far apart (a re-seek) and clips sharing GOPs
READS = [([0], 1), ([5], 2), ([13], 3), ([21], 4), ([30], 1), ([33], 2), ([44], 1), ([1, 29], 1), ([3, 9, 26], 2)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    frames = moving_square_frames(ZOO_FRAMES, 64)
    return {name: encode(root / file, frames, encoder, **kw) for name, (file, encoder, kw) in ZOO.items()}


def plain_decode(path):
    """Every frame of a plain decode (normal open, no seek, no skipping) -> {index: RGB}, first frame per index."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate)
        start, tb = stream.start_time or 0, stream.time_base
        frames = {}
        for frame in container.decode(stream):
            frames.setdefault(round((frame.pts - start) * tb.numerator / tb.denominator * fps), frame.to_ndarray(format="rgb24"))
    return frames


def reference_clip(frames, start, num_frames, stride):
    """Index i is the first decoded frame at or after i; past the last frame the video loops."""
    indices = sorted(frames)
    length = indices[-1] + 1
    picks = [i % length if i >= length else i for i in range(start, start + num_frames * stride, stride)]
    return np.stack([frames[indices[bisect.bisect_left(indices, i)]] for i in picks])


@pytest.mark.parametrize("name", list(ZOO))
def test_reads_equal_a_plain_decode(zoo, name):
    """The fast open, skipped frames, draining and re-seeks change no frame: bit-identical on every codec."""
    frames = plain_decode(zoo[name])
    assert len(frames) == ZOO_FRAMES
    for starts, stride in READS:
        for threads in (1, 0) if starts == [13] else (1,):
            clips = read_clips(zoo[name], starts, 8, stride, threads=threads)
            for start, clip in zip(starts, clips):
                np.testing.assert_array_equal(clip, reference_clip(frames, start, 8, stride), err_msg=f"{starts} {stride}")


def test_b_frame_zoo_has_b_frames(zoo):
    """The reads above test frame skipping only if the encoders made B-frames (and the no-B one did not)."""
    for name, expected in [("h264 B-frames", True), ("h264 no B-frames", False), ("mpeg4 B-frames", True)]:
        container, stream = open_video(zoo[name])
        with container:
            assert bool(stream.codec_context.has_b_frames) == expected, name


def test_unused_frames_are_skipped(zoo, monkeypatch):
    """Mid-GOP clips of B-frame H.264 skip non-reference frames before the clip and in a stride's gaps; MJPEG
    skips whole frames; MPEG-4 without B-frames and VP9 feed every packet as usual."""
    states, real = [], decode._Skipper.feed

    def spy(self, packet):
        real(self, packet)
        states.append(self.state)

    monkeypatch.setattr(decode._Skipper, "feed", spy)
    for name, start, stride, level in [("h264 B-frames", 9, 2, "NONREF"), ("hevc open GOP", 3, 3, "NONREF"),
                                       ("mpeg4 B-frames", 9, 2, "NONREF"), ("mjpeg", 9, 3, "ALL"),
                                       ("mpeg4 avi", 9, 2, None), ("vp9", 9, 2, None)]:
        states.clear()
        read_clip(zoo[name], start, 8, stride, threads=1)
        if level is None:
            assert states == [], name
        else:
            assert states.count(level) >= 3 and "DEFAULT" in states, (name, states)


def test_fast_open_keeps_what_a_read_uses(zoo):
    """mp4/webm open without the probe decode and report the same timing as a normal open; H.264 in
    matroska lacks a start time without it and is opened again normally."""
    for name in ZOO:
        normal, stream = open_video(zoo[name])
        fast, fast_stream = open_video(zoo[name], fast=True)
        with normal, fast:
            expect_fast = zoo[name].suffix in (".mp4", ".webm")
            assert fast.options == (decode.FAST_OPEN if expect_fast else {}), name
            for key in ("start_time", "average_rate", "guessed_rate", "time_base"):
                assert getattr(fast_stream, key) == getattr(stream, key), (name, key)
            assert fast_stream.codec_context.has_b_frames == stream.codec_context.has_b_frames, name
    assert decode.FAST_OPEN_SUFFIXES and ".mkv" not in decode.FAST_OPEN_SUFFIXES


def test_clips_far_apart_reseek_and_equal_separate_reads(zoo, monkeypatch):
    runs, real = [], decode._segment_ends
    monkeypatch.setattr(decode, "_segment_ends", lambda *a: runs.append(real(*a)) or runs[-1])
    path = zoo["h264 B-frames"]
    clips = read_clips(path, [1, 29], 6)
    assert runs == [[6, 34]]  # two runs: the second clip has its own keyframe (GOP 12)
    for start, clip in zip([1, 29], clips):
        np.testing.assert_array_equal(clip, read_clip(path, start, 6))
    runs.clear()
    read_clips(path, [1, 4], 6)
    assert runs == [[9]]  # overlapping clips: one run


def test_drained_without_a_wanted_frame_decodes_on(zoo, monkeypatch):
    """If a frame is missing when the decoder is drained (a frame that failed to decode), the read
    decodes again without draining: simulated by skipping everything in the first run."""
    runs, real = [], decode._Skipper.feed

    def broken_first_run(self, packet):
        real(self, packet)
        if self not in runs:
            runs.append(self)
        if self is runs[0]:
            self.ctx.skip_frame = self.state = "ALL"

    monkeypatch.setattr(decode._Skipper, "feed", broken_first_run)
    path = zoo["h264 B-frames"]
    frames = plain_decode(path)
    np.testing.assert_array_equal(read_clip(path, 14, 6, threads=1), reference_clip(frames, 14, 6, 1))
    assert [(run.drained, run.drain) for run in runs] == [(True, True), (False, False)]


def test_one_clip_in_order_is_returned_without_a_copy(zoo):
    clip = read_clip(zoo["h264 B-frames"], 3, 6)
    assert clip.flags.c_contiguous and clip.flags.owndata and clip.shape == (6, 64, 64, 3)
    shared = read_clips(zoo["h264 B-frames"], [3, 5], 4)
    np.testing.assert_array_equal(shared[0][2:], shared[1][:2])  # frames 5 and 6 serve both clips
