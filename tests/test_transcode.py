"""Transcoding a small UCF101-style mix: H.264 outputs, short keyframe interval, split files kept, resumable."""

import logging
import os

import av
import numpy as np
import pytest
from test_decode import square_x

from videomoco import cli
from videomoco.data import transcode as transcode_mod
from videomoco.data.decode import probe, read_clip
from videomoco.data.index import build_index
from videomoco.data.transcode import TranscodeConfig, run


@pytest.fixture
def ucf_mix(tmp_path, make_video):
    make_video("src/Archery/v_Archery_g01_c01.avi", num_frames=40, size=64, codec="mpeg4")
    make_video("src/Bowling/v_Bowling_g01_c01.webm", num_frames=12, size=64, codec="vp8", seed=1)
    src = tmp_path / "src"
    (src / "Bowling/v_Bowling_g02_c01.avi").write_bytes(b"not a video at all" * 10)
    lists = src / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\r\n2 Bowling\r\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01.avi 1\r\n")
    (lists / "testlist01.txt").write_text("Bowling/v_Bowling_g01_c01.avi\r\n")
    return src


def test_transcode_mix(ucf_mix, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert cli.main(["transcode", str(ucf_mix), str(dst), "--short-side", "32", "--gop", "8", "--workers", "2",
                     "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("transcoded 2 videos (0 up to date), failed 1: see ")
    out = dst / "Archery/v_Archery_g01_c01.mp4"
    info = probe(out)
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 32, 32, 40)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        keys = [e.timestamp for e in stream.index_entries if e.flags & 1]
    frame_ticks = 1 / (stream.time_base * stream.average_rate)
    assert max(np.diff(keys)) <= 8 * frame_ticks
    # same content, at half the size
    source = read_clip(ucf_mix / "Archery/v_Archery_g01_c01.avi", 5, 8)
    np.testing.assert_allclose(square_x(read_clip(out, 5, 8, short_side=64)), square_x(source), atol=1.5)
    assert (dst / "ucfTrainTestlist/classInd.txt").read_bytes() == (ucf_mix / "ucfTrainTestlist/classInd.txt").read_bytes()
    assert "v_Bowling_g02_c01.avi" in (dst / "transcode_failures.csv").read_text()
    assert not [p for p in dst.rglob(".*")]  # no temporary files left
    # the copy indexes with the same splits although the lists say .avi
    index = build_index(dst, workers=1, progress=False)
    assert index.layout == "ucf101" and index.meta["counts"]["missing"] == 0
    assert [r.path for r in index.select("train").records] == ["Archery/v_Archery_g01_c01.mp4"]


def test_transcode_resumes(ucf_mix, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    cfg = TranscodeConfig(str(ucf_mix), str(dst), short_side=32, workers=1, progress=False)
    assert run(cfg)["done"] == 2
    calls = []
    real = transcode_mod.transcode_video
    monkeypatch.setattr(transcode_mod, "transcode_video", lambda src, *a: calls.append(src) or real(src, *a))
    again = run(cfg)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 2, 1)
    assert [os.path.basename(c) for c in calls] == ["v_Bowling_g02_c01.avi"]  # only the broken one is retried
    calls.clear()
    # a newer source and a broken output are redone
    src = ucf_mix / "Archery/v_Archery_g01_c01.avi"
    os.utime(src, (src.stat().st_atime, src.stat().st_mtime + 100))
    (dst / "Bowling/v_Bowling_g01_c01.mp4").write_bytes(b"partial")
    third = run(cfg)
    assert third["done"] == 2 and sorted(os.path.basename(c) for c in calls) == ["v_Archery_g01_c01.avi", "v_Bowling_g01_c01.webm",
                                                                                     "v_Bowling_g02_c01.avi"]
    assert probe(dst / "Bowling/v_Bowling_g01_c01.mp4").frames == 12


def test_transcode_refuses_dst_inside_src(ucf_mix):
    with pytest.raises(ValueError, match="must not be inside"):
        run(TranscodeConfig(str(ucf_mix), str(ucf_mix / "out"), progress=False))


def test_transcode_reads_nothing_outside_src(tmp_path, make_video, caplog):
    make_video("src/a/x.mp4", num_frames=4, size=32)
    make_video("outside/z.mp4", num_frames=4, size=32)
    src, outside, dst = tmp_path / "src", tmp_path / "outside", tmp_path / "dst"
    (outside / "secret.txt").write_text("not for DST")
    os.symlink(outside, src / "ext")  # a directory out of SRC
    os.symlink(outside / "z.mp4", src / "a/link.mp4")  # a video out of SRC
    os.symlink(outside / "secret.txt", src / "notes.txt")  # a non-video file out of SRC
    os.symlink(src / "a/x.mp4", src / "a/alias.mp4")  # inside SRC: followed
    os.symlink("..", src / "a/loop")  # walked once
    cfg = TranscodeConfig(str(src), str(dst), short_side=32, workers=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="videomoco.data.transcode"):
        result = run(cfg)
    assert f"skipped 2 symlinks that point outside {src} (use --follow-symlinks)" in caplog.text
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "a/alias.mp4", "a/x.mp4", "transcode_failures.csv"]
    assert (result["done"], result["failed"]) == (2, 0)
    followed = run(TranscodeConfig(str(src), str(dst), short_side=32, workers=1, progress=False, follow_symlinks=True))
    assert followed["done"] == 2 and (dst / "ext/z.mp4").is_file() and (dst / "a/link.mp4").is_file()
    assert not (dst / "notes.txt").exists() and not (dst / "ext/secret.txt").exists()  # never copied through a link


def test_two_sources_for_one_output_are_refused_before_any_work(tmp_path, make_video, capsys):
    # regression: b.AVI and b.mp4 were both written to b.mp4: one reported failed, the output held the other
    make_video("src/b.AVI", codec="mpeg4")
    make_video("src/b.mp4", seed=1)
    assert cli.main(["transcode", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress", "-j", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"videomoco transcode: error: b.AVI and b.mp4 in {tmp_path / 'src'} "
                                                   f"would both become {tmp_path / 'dst' / 'b.mp4'} (1 such name clashes)")
    assert not (tmp_path / "dst").exists()


def test_gop_applies_to_intra_only_sources(tmp_path, make_video):
    # regression: an MJPEG source came out with every frame a keyframe (x264 obeys the decoded frames' I type)
    src = make_video("m.avi", num_frames=48, codec="mjpeg")
    transcode_mod.transcode_video(src, tmp_path / "m.mp4", short_side=None, gop=16)
    with av.open(str(tmp_path / "m.mp4")) as c:
        keyframes = [p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size]
    assert len(keyframes) == 48 and sum(keyframes) == 3
