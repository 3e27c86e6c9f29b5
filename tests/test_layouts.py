"""Layouts and split files in the official formats (UCF101, HMDB51, Kinetics), written here."""

import pytest

from videomoco.data.layouts import SplitFileError, detect_layout, find_videos, scan_layout

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
    assert layout.classes == ["javelin throw", "tying knot (not on a tie)"]
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
