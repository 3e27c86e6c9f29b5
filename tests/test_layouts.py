"""Layouts and split files in the official formats (UCF101, HMDB51, Kinetics): written here, and the
real files of shared/fixtures/official_splits unpacked the ways the official archives unpack."""

import os
import shutil

import pytest

from videomoco.data.layouts import SplitFileError, detect_layout, find_videos, scan_layout, scan_tree

UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]

def touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def write_lines(path, lines, crlf=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + ("\r\n" if crlf else "\n") for line in lines).encode())


def ucf101(root):
    """Two groups per class on disk; split 1 names one video that is not on disk."""
    videos = [f"{c}/v_{c.replace('Handstand', 'HandStand')}_g{g:02d}_c01.avi" for c in UCF_CLASSES for g in (1, 8)]
    touch(root, *videos)
    lists = root / "ucfTrainTestlist"
    write_lines(lists / "classInd.txt", [f"{i} {c}" for i, c in enumerate(UCF_CLASSES, 1)])
    for k in (1, 2, 3):
        train = [v for v in videos if ("_g08_" in v) == (k == 1)]
        test = [v for v in videos if v not in train]
        write_lines(lists / f"trainlist0{k}.txt", [f"{v} {UCF_CLASSES.index(v.split('/')[0]) + 1} " for v in train])
        write_lines(lists / f"testlist0{k}.txt", test + (["Archery/v_Archery_g25_c07.avi"] if k == 1 else []))
    return videos


def test_ucf101_official_format(tmp_path):
    videos = ucf101(tmp_path)
    touch(tmp_path, "notes.txt")  # not a video
    assert detect_layout(tmp_path) == "ucf101"
    layout = scan_layout(tmp_path)
    assert layout.name == "ucf101" and layout.classes == UCF_CLASSES
    assert sorted(layout.videos) == sorted(videos)
    first = layout.videos["Archery/v_Archery_g08_c01.avi"]
    assert (first["class_name"], first["split1"], first["split2"], first["split3"]) == ("Archery", "train", "test", "test")
    assert layout.videos["HandstandPushups/v_HandStandPushups_g01_c01.avi"]["split1"] == "test"
    assert layout.missing == 1


@pytest.mark.parametrize("file,line,bad", [
    ("classInd.txt", 2, "Archery"),  # no index
    ("trainlist01.txt", 1, "Bowling/v_Bowling_g01_c01.avi 4"),  # unknown class
    ("trainlist01.txt", 1, "Archery/v_Archery_g01_c01.avi 1"),  # label of another class
    ("testlist01.txt", 1, "Archery/v_Archery_g01_c01.avi 2 extra"),
])
def test_ucf101_malformed_split_file(tmp_path, file, line, bad):
    ucf101(tmp_path)
    path = tmp_path / "ucfTrainTestlist" / file
    lines = path.read_text().splitlines()
    lines[line - 1] = bad
    write_lines(path, lines)
    with pytest.raises(SplitFileError, match=rf"{file}:{line}: "):
        scan_layout(tmp_path)


def test_hmdb51_official_format(tmp_path):
    touch(tmp_path, "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair/Blonde_brush_hair_f_nm_np2_le_goo_1.avi",
          "cartwheel/Acrobacias_cartwheel_f_cm_np1_ba_bad_0.avi")
    splits = tmp_path / "testTrainMulti_7030_splits"
    for k in (1, 2, 3):
        write_lines(splits / f"brush_hair_test_split{k}.txt", ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 ",
                                                               f"Blonde_brush_hair_f_nm_np2_le_goo_1.avi {k - 1} "], crlf=False)
        write_lines(splits / f"cartwheel_test_split{k}.txt", ["Acrobacias_cartwheel_f_cm_np1_ba_bad_0.avi 2 ",
                                                              "Gone_cartwheel_f_cm_np1_ba_bad_1.avi 1 "], crlf=False)
    layout = scan_layout(tmp_path)
    assert layout.name == "hmdb51" and layout.classes == ["brush_hair", "cartwheel"]
    blonde = layout.videos["brush_hair/Blonde_brush_hair_f_nm_np2_le_goo_1.avi"]
    assert [blonde[f"split{k}"] for k in (1, 2, 3)] == ["unused", "train", "test"]
    assert layout.videos["cartwheel/Acrobacias_cartwheel_f_cm_np1_ba_bad_0.avi"]["split1"] == "test"
    assert layout.missing == 1  # the same missing video in three split files counts once
    write_lines(splits / "cartwheel_test_split2.txt", ["Acrobacias_cartwheel_f_cm_np1_ba_bad_0.avi 3"])
    with pytest.raises(SplitFileError, match="cartwheel_test_split2.txt:1: "):
        scan_layout(tmp_path)


def test_kinetics_folders(tmp_path):
    touch(tmp_path, "train/abseiling/a.mp4", "train/zumba/b.mp4", "val/zumba/c.webm", "test/d.mp4", "train/zumba/x.json")
    layout = scan_layout(tmp_path)
    assert layout.name == "kinetics" and layout.classes == ["abseiling", "zumba"]
    assert {v: (e["class_name"], e["subset"]) for v, e in layout.videos.items()} == {
        "train/abseiling/a.mp4": ("abseiling", "train"), "train/zumba/b.mp4": ("zumba", "train"),
        "val/zumba/c.webm": ("zumba", "val"), "test/d.mp4": ("", "test")}


def test_kinetics_csv_annotations(tmp_path):
    touch(tmp_path, "videos/--07WQ2iBlw_000001_000011.mp4", "videos/-0H3ZNR8EXo_000104_000114.mp4")
    csv_path = tmp_path / "kinetics400" / "train.csv"
    write_lines(csv_path, ["label,youtube_id,time_start,time_end,split,is_cc",
                           "javelin throw,--07WQ2iBlw,1,11,train,0",
                           '"tying knot (not on a tie)",-0H3ZNR8EXo,104,114,validate,0',
                           "zumba,notOnDisk123,0,10,train,0"], crlf=False)
    assert detect_layout(tmp_path) == "folder" and detect_layout(tmp_path, annotations=[csv_path]) == "kinetics"
    layout = scan_layout(tmp_path, annotations=csv_path)
    assert layout.classes == ["javelin throw", "tying knot (not on a tie)", "zumba"]  # all the CSV's labels
    assert layout.videos["videos/-0H3ZNR8EXo_000104_000114.mp4"] == {"class_name": "tying knot (not on a tie)", "subset": "val"}
    assert layout.missing == 1
    write_lines(csv_path, ["label,youtube_id,time_start,time_end,split", "zumba,abc,one,10,train"])
    with pytest.raises(SplitFileError, match="train.csv:2: "):
        scan_layout(tmp_path, annotations=csv_path)


def test_folder_layout_and_scan_rules(tmp_path):
    touch(tmp_path, "a/1.MP4", "a/b/2.mkv", "3.avi", ".hidden/4.mp4", "index/5.mp4", "6.txt")
    assert find_videos(tmp_path, exclude=[tmp_path / "index"]) == ["3.avi", "a/1.MP4", "a/b/2.mkv"]
    layout = scan_layout(tmp_path, exclude=[tmp_path / "index"])
    assert layout.name == "folder" and layout.classes == [] and layout.videos["a/1.MP4"]["class_name"] == ""
    touch(tmp_path / "classes", "jump/1.mp4", "run/2.mp4")
    assert scan_layout(tmp_path / "classes").classes == ["jump", "run"]
    with pytest.raises(ValueError, match="unknown layout"):
        scan_layout(tmp_path, layout="imagenet")


def test_cli_reports_a_bad_split_file_in_one_line(tmp_path, capsys):
    from videomoco import cli

    ucf101(tmp_path)
    write_lines(tmp_path / "ucfTrainTestlist/classInd.txt", ["1 ApplyEyeMakeup", "two Archery"])
    assert cli.main(["index", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videomoco index: ") and err.endswith('classInd.txt:2: expected "2 <ClassName>", got "two Archery"')
    assert "\n" not in err


def test_scan_tree_stays_inside_the_root_and_walks_each_directory_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root, "a/x.mp4", "b/y.mp4")
    touch(outside, "z.mp4")
    os.symlink("..", root / "a/loop")  # a loop: 2 videos, not hundreds of rows
    os.symlink(root / "a", root / "again")  # the same directory twice
    os.symlink(outside, root / "ext")  # a directory out of the root
    os.symlink(outside / "z.mp4", root / "b/link.mp4")
    os.symlink(root / "a/x.mp4", root / "b/alias.mp4")  # inside: followed
    os.symlink(tmp_path / "gone.mp4", root / "b/gone.mp4")
    os.close(os.open(os.fsencode(root / "b") + b"/bad\xff.mp4", os.O_CREAT | os.O_WRONLY))
    tree = scan_tree(root)
    assert tree.videos == ["a/x.mp4", "b/alias.mp4", "b/y.mp4"]
    assert tree.problems == {"b/bad\\xff.mp4": "file name is not valid UTF-8", "b/gone.mp4": "dangling symlink",
                             "b/link.mp4": "symlink points outside the dataset root"}
    assert tree.outside == 1
    followed = scan_tree(root, follow_symlinks=True)
    assert "ext/z.mp4" in followed.videos and "b/link.mp4" in followed.videos and followed.outside == 0


def _place(root, names):
    touch(root, *names)
    return names


UCF_NAMES = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi",
             "YoYo/v_YoYo_g01_c01.avi"]


@pytest.mark.parametrize("videos,splits", [("", ""), ("UCF-101/", ""), ("UCF101/UCF-101/", "UCF101/")])
def test_ucf101_as_unpacked_from_the_official_archives(tmp_path, official, videos, splits):
    shutil.copytree(official / "ucfTrainTestlist", tmp_path / splits / "ucfTrainTestlist")
    _place(tmp_path, [videos + name for name in UCF_NAMES])
    assert detect_layout(tmp_path) == "ucf101"
    layout = scan_layout(tmp_path)
    assert len(layout.classes) == 101 and layout.missing == 13320 - 3
    entries = {v[len(videos):]: e for v, e in layout.videos.items()}
    assert [entries[n]["class_name"] for n in UCF_NAMES] == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    assert [entries[n]["split1"] for n in UCF_NAMES] == ["train", "train", "test"]


@pytest.mark.parametrize("videos,splits", [("", ""), ("hmdb51_org/", ""), ("hmdb51_org/", "hmdb51_org/")])
def test_hmdb51_as_unpacked_from_the_official_archives(tmp_path, official, videos, splits):
    shutil.copytree(official / "testTrainMulti_7030_splits", tmp_path / splits / "testTrainMulti_7030_splits")
    names = ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
             "wave/20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0.avi"]
    _place(tmp_path, [videos + name for name in names])
    layout = scan_layout(tmp_path)
    assert layout.name == "hmdb51" and len(layout.classes) == 51 and layout.missing == 6766 - 2
    assert [layout.videos[videos + n]["class_name"] for n in names] == ["brush_hair", "wave"]
    assert [layout.videos[videos + n]["split1"] for n in names] == ["train", "test"]


def test_split_files_that_name_no_video_on_disk_say_what_was_expected(tmp_path, official):
    shutil.copytree(official / "ucfTrainTestlist", tmp_path / "ucfTrainTestlist")
    _place(tmp_path, ["all/v_ApplyEyeMakeup_g08_c01.avi", "all/v_YoYo_g01_c01.avi"])  # no class folders
    with pytest.raises(SplitFileError) as err:
        scan_layout(tmp_path)
    line = str(err.value)
    assert "\n" not in line and "the split files name 13,320 videos, none found under" in line
    assert f"expected {tmp_path}/<Class>/v_<Class>_gXX_cXX.avi (the UCF-101 folder" in line
    assert f"found e.g. {tmp_path}/all/v_ApplyEyeMakeup_g08_c01.avi" in line


def test_kinetics_classes_are_the_csv_labels_not_what_is_on_disk(tmp_path, official):
    touch(tmp_path, "val/--07WQ2iBlw_000001_000011.mp4", "val/0wR5jVB-WPk_000417_000427.mp4")
    csvs = [official / "kinetics-400_val.csv", official / "kinetics-400_test.csv"]  # test.csv has no labels
    layout = scan_layout(tmp_path, annotations=csvs)
    assert len(layout.classes) == 400 and layout.classes == sorted(layout.classes)
    assert layout.classes.index("javelin throw") == 166
    assert layout.videos["val/--07WQ2iBlw_000001_000011.mp4"] == {"class_name": "javelin throw", "subset": "val"}
