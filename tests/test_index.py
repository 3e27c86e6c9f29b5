"""The index: a broken mix is quarantined, good videos indexed, re-runs probe only what changed."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from test_decode import audio_only

from videomoco import cli
from videomoco.data import index as index_mod
from videomoco.data.index import VideoIndex, VideoRecord, build_index, open_index, pretrain_subset

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
    assert lines[0].endswith(f"; index in {broken_mix / 'index'}")  # says where it wrote, inside the folder
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


def test_load_refuses_rows_outside_the_root(tmp_path, make_video):
    make_video("clips/a.mp4", num_frames=4, size=32)
    index = build_index(tmp_path / "clips", workers=1, progress=False)
    csv_path = tmp_path / "clips/index/index.csv"
    rows = read_csv(csv_path)
    rows += [dict(rows[0], path="../../etc/x"), dict(rows[0], path="/abs/y.mp4")]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError) as err:
        VideoIndex.load(csv_path)
    assert str(err.value) == f"{csv_path}: 2 rows point outside the dataset root {index.root}, e.g. '../../etc/x'"
    assert len(VideoIndex.load(csv_path, allow_outside=True)) == 3


def test_open_index_never_rebuilds_an_index_of_another_layout(tmp_path, make_video):
    make_video("hmdb/wave/w_0.avi", num_frames=4, size=32, codec="mpeg4")
    make_video("hmdb/wave/w_1.avi", num_frames=4, size=32, codec="mpeg4")
    root = tmp_path / "hmdb"
    (root / "testTrainMulti_7030_splits").mkdir()
    (root / "testTrainMulti_7030_splits/wave_test_split1.txt").write_text("w_0.avi 1 \nw_1.avi 2 \n")
    assert open_index(root, workers=1).layout == "hmdb51"
    before = (root / "index/index.csv").read_bytes(), (root / "index/meta.json").read_bytes()
    for data in (root, root / "index"):
        with pytest.raises(ValueError) as err:
            open_index(data, layout="kinetics", asked="--dataset folder")
        assert str(err.value) == (f"{root}/index is indexed as hmdb51; --dataset folder needs kinetics: use the "
                                  "matching --dataset, or index again with "
                                  f"`videomoco index {root} --layout kinetics --out OTHER_DIR`")
    assert ((root / "index/index.csv").read_bytes(), (root / "index/meta.json").read_bytes()) == before
    assert open_index(root).layout == open_index(root, layout="hmdb51").layout == "hmdb51"


def test_unusable_names_and_links_are_quarantined_not_fatal(tmp_path, make_video, capsys, caplog):
    make_video("data/a/x.mp4", num_frames=4, size=32)
    make_video("data/b/y.mp4", num_frames=4, size=32)
    make_video("outside/z.mp4", num_frames=4, size=32)
    root = tmp_path / "data"
    os.symlink("..", root / "a/loop")
    os.symlink(tmp_path / "outside", root / "ext")
    os.symlink(tmp_path / "outside/z.mp4", root / "b/link.mp4")
    os.symlink(tmp_path / "gone.mp4", root / "b/gone.mp4")
    fd = os.open(os.fsencode(root / "b") + b"/bad\xff.mp4", os.O_CREAT | os.O_WRONLY)
    os.write(fd, (root / "a/x.mp4").read_bytes())
    os.close(fd)
    (root / "index").mkdir()
    dead, alive = root / "index/.index.csv.999999999.tmp", root / f"index/.meta.json.{os.getppid()}.tmp"
    dead.write_text("left by a killed run")
    alive.write_text("another run, still writing")
    with caplog.at_level(logging.WARNING, logger="videomoco.data.index"):
        assert cli.main(["index", str(root), "--workers", "1", "--no-progress"]) == 0
    assert f"skipped 1 directory symlinks that point outside {root} (use --follow-symlinks)" in caplog.text
    assert capsys.readouterr().out.startswith("indexed 2 videos, quarantined 3: see ")
    (root / "index/index.csv").read_bytes().decode("utf-8")  # valid UTF-8
    assert [r["path"] for r in read_csv(root / "index/index.csv")] == ["a/x.mp4", "b/y.mp4"]
    reasons = {r["path"]: r["reason"] for r in read_csv(root / "index/quarantine.csv")}
    assert reasons == {"b/bad\\xff.mp4": "file name is not valid UTF-8", "b/gone.mp4": "dangling symlink",
                       "b/link.mp4": "symlink points outside the dataset root"}
    assert not dead.exists() and alive.exists()
    assert len(open_index(root)) == 2


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        index_mod._atomic_write(tmp_path / "index.csv", "bad\udcff.mp4\n")
    assert list(tmp_path.iterdir()) == []


def test_kinetics_labels_do_not_depend_on_what_is_downloaded(tmp_path, make_video, official):
    make_video("k400/val/--07WQ2iBlw_000001_000011.mp4", num_frames=4, size=32)
    make_video("k400/val/0wR5jVB-WPk_000417_000427.mp4", num_frames=4, size=32)
    csvs = [str(official / "kinetics-400_val.csv"), str(official / "kinetics-400_test.csv")]
    index = build_index(tmp_path / "k400", annotations=csvs, workers=1, progress=False)
    labels = {r.class_name: r.label for r in index.records}
    assert len(index.classes) == 400 and labels == {"javelin throw": 166, "abseiling": 0}
    assert labels["javelin throw"] == sorted(index.classes).index("javelin throw")


def _index(layout, columns):
    records = [VideoRecord(path=f"v{i}.mp4", label=0, **c) for i, c in enumerate(columns)]
    return VideoIndex("/data", layout, ["a"], records)


def test_pretrain_subset():
    kinetics = _index("kinetics", [{"subset": "train"}, {"subset": "train"}, {"subset": "val"}, {"subset": "test"}])
    train, line = pretrain_subset(kinetics)
    assert [r.path for r in train.records] == ["v0.mp4", "v1.mp4"] and line == "kinetics train: 2 of 4 videos"
    assert len(pretrain_subset(kinetics, "all")[0]) == 4
    ucf = _index("ucf101", [{"split1": "train"}, {"split1": "test"}, {"split1": "unused"}])
    assert [r.path for r in pretrain_subset(ucf, "test")[0].records] == ["v1.mp4"]
    assert pretrain_subset(ucf)[1] == "ucf101 train of split 1: 1 of 3 videos"
    assert len(pretrain_subset(ucf, "all")[0]) == 3
    with pytest.raises(ValueError, match=r"has no 'val' videos of split 1; it has test 1, train 1, unused 1 \("):
        pretrain_subset(ucf, "val")
    folder = _index("folder", [{}, {}])
    assert pretrain_subset(folder, "train") == (folder, "all 2 videos (a folder layout has no subsets)")
    assert len(pretrain_subset(_index("kinetics", []))[0]) == 0


def _children(pid):
    """Live processes whose parent is `pid` (from /proc; zombies count as gone)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if entry.isdigit() and int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_index_workers_die_with_their_parent(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.mp4").write_bytes(b"x")
    script = ("import sys, time\nfrom videomoco import cli\nfrom videomoco.data import decode\n"
              "decode.probe = lambda path: time.sleep(60)\n"  # workers busy until their parent is killed
              f"cli.main(['index', {str(tmp_path)!r}, '--workers', '2', '--no-progress'])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            workers = _children(parent.pid)
        assert len(workers) == 2, "the index never started its workers"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(workers) == []
    finally:
        parent.kill()
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)


def test_misleading_lines_name_the_real_fix(tmp_path):
    # regression: --subset val on a plain folder said "it has none 7"; after `pretrain EMPTY` indexed an empty root,
    # the evaluation commands advised `--layout ucf101`, which then failed on a missing classInd.txt
    plain = _index("kinetics", [{}] * 7)
    with pytest.raises(ValueError, match=r"has no 'val' videos: none of its 7 videos is in a subset \(use --subset all\)"):
        pretrain_subset(plain, "val")
    (tmp_path / "EMPTY").mkdir()
    open_index(tmp_path / "EMPTY")
    with pytest.raises(ValueError, match=rf"indexes no videos \({tmp_path / 'EMPTY'} had none when it was indexed\): "
                                         rf"put the videos there, then run `videomoco index {tmp_path / 'EMPTY'} "
                                         r"--layout ucf101`"):
        open_index(tmp_path / "EMPTY", layout="ucf101", asked="--dataset ucf101")
