"""Decoding: probe metadata, frame-exact seeking, looping, resizing, rotation, no leaked decoders."""

import os

import av
import numpy as np
import pytest
import torch
from conftest import moving_square_frames

from videomoco.data import decode
from videomoco.data.decode import (
    VideoError,
    decoder_threads,
    probe,
    read_clip,
    read_clip_cv2,
    read_clips,
    read_video_cv2_whole,
)
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


def test_cv2_backend_agrees(make_video):
    cv2 = pytest.importorskip("cv2")
    assert cv2 is not None
    path = make_video("c.avi", num_frames=24, codec="mjpeg")
    np.testing.assert_allclose(square_x(read_clip_cv2(path, 4, 6)), square_x(read_clip(path, 4, 6)), atol=1.0)
    assert read_clip_cv2(path, 20, 8).shape == (8, 64, 64, 3)  # loops too
    whole = read_video_cv2_whole(path)
    assert whole.shape == (24, 64, 64, 3)
    np.testing.assert_array_equal(read_video_cv2_whole(path, threads=1), whole)


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
