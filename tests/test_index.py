"""The index: a broken mix is quarantined, good videos indexed, re-runs probe only what changed."""

import csv
import json
import os

import av
import numpy as np
import pytest
from test_decode import audio_only

from videomoco import cli
from videomoco.data import index as index_mod
from videomoco.data.index import VideoIndex, build_index, open_index

GOOD = [("train/run/a.mp4", "h264"), ("train/run/b.avi", "mpeg4"), ("train/walk/c.webm", "vp8"),
        ("val/walk/d.webm", "vp9"), ("val/run/e.mkv", "vp9"), ("val/walk/f.avi", "mjpeg")]


@pytest.fixture
def broken_mix(tmp_path, make_video):
    """A Kinetics-style root with a good video in every codec and every kind of broken file."""
    for name, codec in GOOD:
        make_video(f"data/{name}", num_frames=8, size=32, codec=codec)
    make_video("data/train/walk/tiny.mp4", num_frames=3, size=32)
    root = tmp_path / "data"
    (root / "train/run/zero.mp4").touch()
    good = (root / "train/run/a.mp4").read_bytes()
    (root / "train/run/half.mp4").write_bytes(good[: len(good) // 2])
    (root / "val/run/noise.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    audio_only(root / "val/run/audio.mp4")
    # an avi whose packets are zeroed: the container opens, the first frame does not decode
    with av.open(str(root / "train/run/b.avi")) as container:
        entries = container.streams.video[0].index_entries
        first, last = entries[0].pos + 8, entries[len(entries) - 1].pos + entries[len(entries) - 1].size
    body = bytearray((root / "train/run/b.avi").read_bytes())
    body[first:last] = bytes(last - first)
    (root / "val/walk/garbled.avi").write_bytes(body)
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_indexes_good_and_quarantines_broken(broken_mix, capsys):
    assert cli.main(["index", str(broken_mix), "--workers", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {r["path"]: r for r in read_csv(broken_mix / "index/index.csv")}
    reasons = {r["path"]: r["reason"] for r in read_csv(broken_mix / "index/quarantine.csv")}
    assert len(lines) == 1 and lines[0].startswith(f"indexed {len(rows)} videos, quarantined {len(reasons)}: see ")
    assert {name for name, _ in GOOD} | {"train/walk/tiny.mp4"} <= set(rows)
    assert rows["train/walk/tiny.mp4"]["frames"] == "3"
    assert {rows[name]["codec"] for name, _ in GOOD} == {"h264", "mpeg4", "vp8", "vp9", "mjpeg"}
    assert rows["val/walk/d.webm"]["label"] == "1" and rows["val/walk/d.webm"]["subset"] == "val"
    assert reasons["train/run/zero.mp4"] == "empty file"
    assert reasons["train/run/half.mp4"].startswith(("cannot open", "truncated"))
    assert reasons["val/run/noise.mp4"].startswith("cannot open")
    assert reasons["val/run/audio.mp4"] == "no video stream"
    assert reasons["val/walk/garbled.avi"].startswith("decode error")
    assert set(rows) | set(reasons) == set(name for name in _all_videos(broken_mix))
    meta = json.loads((broken_mix / "index/meta.json").read_text())
    assert meta["layout"] == "kinetics" and meta["classes"] == ["run", "walk"]
    assert meta["counts"]["videos"] == len(rows) and meta["counts"]["quarantined"] == len(reasons)


def _all_videos(root):
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
            if not d.startswith(str(root / "index"))]


def test_rerun_probes_only_new_or_changed(broken_mix, make_video, monkeypatch):
    first = build_index(broken_mix, workers=1, progress=False)
    probed = []
    real_probe = index_mod.decode.probe
    monkeypatch.setattr(index_mod.decode, "probe", lambda path: probed.append(path) or real_probe(path))
    build_index(broken_mix, workers=1, progress=False)
    assert probed == []  # nothing changed: good rows and quarantine entries are reused
    make_video("data/train/run/new.mp4", num_frames=5, size=32)
    make_video("data/train/run/a.mp4", num_frames=6, size=32, seed=3)  # changed
    os.remove(broken_mix / "val/walk/f.avi")  # removed
    again = build_index(broken_mix, workers=1, progress=False)
    assert sorted(os.path.basename(p) for p in probed) == ["a.mp4", "new.mp4"]
    paths = {r.path: r for r in again.records}
    assert "val/walk/f.avi" not in paths and paths["train/run/a.mp4"].frames == 6
    assert len(again) == len(first) and len(again.quarantine) == len(first.quarantine)
    assert again.meta["counts"]["probed"] == 2


def test_video_index_api(broken_mix):
    index = build_index(broken_mix, workers=1, progress=False)
    train = index.select("train")
    assert {r.subset for r in train.records} == {"train"} and 0 < len(train) < len(index)
    assert os.path.isfile(train.path(0)) and train.path(0).startswith(str(broken_mix))
    with pytest.raises(ValueError):
        index.select("fold1")
    # a file that fails at training time: appended, and dropped from the index on load
    index.add_quarantine(index.path(0), "decode error: at training time")
    loaded = VideoIndex.load(broken_mix / "index" / "index.csv")
    assert index.records[0].path not in {r.path for r in loaded.records}
    assert (index.records[0].path, "decode error: at training time") in loaded.quarantine
    assert len(loaded) == len(index) - 1 and loaded.classes == index.classes
    # and it stays quarantined when the index is rebuilt, while the file is unchanged
    rebuilt = build_index(broken_mix, workers=1, progress=False)
    assert index.records[0].path not in {r.path for r in rebuilt.records}


def test_open_index_accepts_root_dir_or_csv(tmp_path, make_video, monkeypatch):
    for i in range(3):
        make_video(f"clips/{i}.mp4", num_frames=4, size=32)
    root = tmp_path / "clips"
    built = open_index(root, workers=1)
    assert built.layout == "folder" and len(built) == 3 and (root / "index/index.csv").is_file()
    monkeypatch.setattr(index_mod.decode, "probe", lambda path: pytest.fail("open_index re-probed"))
    for data in (root, root / "index", root / "index" / "index.csv"):
        assert [r.path for r in open_index(data).records] == [r.path for r in built.records]
    with pytest.raises(FileNotFoundError):
        open_index(tmp_path / "nowhere")


def test_ucf101_index_with_splits_and_missing(tmp_path, make_video, capsys):
    for c, g in [("Archery", 1), ("Archery", 8), ("Bowling", 1)]:
        make_video(f"ucf/{c}/v_{c}_g{g:02d}_c01.avi", num_frames=4, size=32, codec="mpeg4")
    lists = tmp_path / "ucf/ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\r\n2 Bowling\r\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\r\nBowling/v_Bowling_g09_c01.avi 2\r\n")
    (lists / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\r\nBowling/v_Bowling_g01_c01.avi\r\n")
    assert cli.main(["index", str(tmp_path / "ucf"), "--workers", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("; split files name 1 videos that are not on disk")
    index = open_index(tmp_path / "ucf")
    assert [r.path for r in index.select("train").records] == ["Archery/v_Archery_g08_c01.avi"]
    assert [r.label for r in index.select("test").records] == [0, 1]
    assert index.meta["counts"]["missing"] == 1


def test_index_benchmark_quick_run(capsys):
    from benchmarks import index as bench_index

    assert bench_index.main(["--quick"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["videos"] == 20 and row["videos_per_s"] > 0 and "cpu" in row["machine"]
