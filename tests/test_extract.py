import csv
import json

import numpy as np
import pytest

from videomoco.cli import main as cli
from videomoco.eval import extract

from conftest import error_lines, tree
from eval_data import pretrain_checkpoint


@pytest.fixture
def folder(tmp_path, make_video):
    for i, name in enumerate(["cats/a.mp4", "cats/b.mp4", "dogs/c.mp4", "dogs/d.mp4", "dogs/e.mp4"]):
        make_video(f"videos/{name}", num_frames=12, size=40, seed=i)
    (tmp_path / "videos" / "dogs" / "broken.mp4").write_bytes(b"not a video")
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    return tmp_path / "videos"


def args(folder, out):
    return ["extract", str(folder), "--pretrained", str(folder.parent / "ckpt.pth"), "--out", str(out),
            "--frames", "4", "--crop", "32", "--num-clips", "3", "--batch-size", "2", "--chunk-size", "2",
            "--workers", "0", "--device", "cpu"]


def test_extract_writes_features_and_paths(tmp_path, folder, capsys):
    assert cli(args(folder, tmp_path / "feats")) == 0
    assert "6/6" in capsys.readouterr().err  # the bar counts videos (the broken one is counted, then skipped), not chunks
    feats = np.load(tmp_path / "feats.npy")
    with open(tmp_path / "feats.csv") as f:
        rows = list(csv.DictReader(f))
    assert feats.shape == (5, 64) and np.isfinite(feats).all()  # width 8 -> 64-d; the broken file is quarantined
    assert [r["path"] for r in rows] == ["cats/a.mp4", "cats/b.mp4", "dogs/c.mp4", "dogs/d.mp4", "dogs/e.mp4"]
    assert [r["class_name"] for r in rows] == ["cats", "cats", "dogs", "dogs", "dogs"]
    assert json.loads((tmp_path / "feats.json").read_text())["videos"] == 5
    assert not (tmp_path / "feats.parts").exists()
    # 2 videos x 3 clips per batch, 4 clips per forward: the same features
    assert cli(args(folder, tmp_path / "split") + ["--micro-batch", "4"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "split.npy"), feats, rtol=1e-5, atol=1e-6)


def test_extract_resumes_after_an_interruption(tmp_path, folder, monkeypatch, capsys):
    assert cli(args(folder, tmp_path / "ref")) == 0
    real_save, saved = extract._save_chunk, []

    def crash_after_first(path, *a):
        if saved:
            raise KeyboardInterrupt  # what Ctrl-C raises
        saved.append(path)
        real_save(path, *a)

    monkeypatch.setattr(extract, "_save_chunk", crash_after_first)
    capsys.readouterr()
    assert cli(args(folder, tmp_path / "feats")) == 130  # regression: a traceback
    assert error_lines(capsys.readouterr().err) == [
        f"videomoco extract: error: interrupted; the finished chunks are kept in {tmp_path / 'feats'}.parts/: run the "
        "same command again to resume"]
    assert (tmp_path / "feats.parts" / "chunk_00000.npz").is_file() and not (tmp_path / "feats.npy").exists()

    computed = []
    real_chunk = extract.extract_chunk
    monkeypatch.setattr(extract, "_save_chunk", real_save)
    monkeypatch.setattr(extract, "extract_chunk", lambda enc, ds, rows, cfg, **kw: computed.append(rows) or real_chunk(enc, ds, rows, cfg, **kw))
    assert cli(args(folder, tmp_path / "feats")) == 0
    assert computed == [[2, 3], [4]]  # only the chunks that were not saved
    assert np.allclose(np.load(tmp_path / "feats.npy"), np.load(tmp_path / "ref.npy"), atol=1e-6)


def test_a_partial_extraction_of_other_settings_is_moved_aside_not_deleted(tmp_path, folder, caplog):
    # regression: a refused run left FEATS.parts/, and the next correct one refused "other settings"
    (tmp_path / "bad.pth").write_bytes(b"junk")
    before = tree(tmp_path)
    refused = args(folder, tmp_path / "feats")
    refused[refused.index("--pretrained") + 1] = str(tmp_path / "bad.pth")
    assert cli(refused) == 2
    assert tree(tmp_path) == before  # refused before anything is created
    parts = tmp_path / "feats.parts"
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"frames": 99}))
    (parts / "chunk_00000.npz").write_bytes(b"theirs")
    assert cli(args(folder, tmp_path / "feats")) == 0
    aside = list(tmp_path.glob("feats.parts.other-*"))
    assert len(aside) == 1 and (aside[0] / "chunk_00000.npz").read_bytes() == b"theirs"
    assert any(f"moved to {aside[0]}" in r.getMessage() for r in caplog.records)
    assert np.load(tmp_path / "feats.npy").shape == (5, 64)
