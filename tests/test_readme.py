"""The README's pipelines run as written: "Day-to-day use" and "Your own videos", on tiny sizes.

Each `videomoco ...` line of those blocks runs in-process from a scratch directory that holds the data the
lines name (data/kinetics400, data/ucf101, data/hmdb51, my_videos, my_labels); only flags that make it tiny
are appended (argparse keeps the last value), and pretraining starts at epoch 199 so that it writes the
checkpoint_0200 the next lines read. The Python block of "Your own videos" then gives the row `extract` wrote.
("Quick start" is `make demo` / `make test`: tests/test_demo.py runs `videomoco demo --quick`.)
"""

import csv
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from videomoco.cli import main as cli
from videomoco.data.encode import write_video

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, moving_square_frames  # noqa: E402
from eval_data import hmdb51_root, ucf101_root  # noqa: E402

README = (REPO / "README.md").read_text()
CLIP = ["--frames", "8", "--crop", "32", "--workers", "0", "--device", "cpu"]
TINY = {  # per command: what makes it tiny (and fast) on a CPU
    "pretrain": ["--width", "8", "-fpc", "8", "-cs", "32", "-j", "0", "--start_epoch", "199", "--seed", "0",
                 "-p", "1"],
    "finetune": [*CLIP, "--num-clips", "2", "--batch-size", "4", "--epochs", "1", "--out", "runs/ft"],
    "evaluate": [*CLIP, "--num-clips", "2", "--batch-size", "4", "--width", "8", "--finetune_epochs", "1",
                 "--splits", "1"],
    "extract": CLIP,
    "transcode": ["--workers", "1"],
    "index": ["--workers", "1"],
}


def block(after, lang):
    """The first ```lang block after the text `after`."""
    return re.search(rf"```{lang}\n(.*?)```", README[README.index(after):], re.S).group(1)


def commands(text):
    text = text.replace("\\\n", " ")  # continued lines
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines() if line.startswith("videomoco ")]


def run_all(lines, extra=None):
    for argv in lines:
        argv = argv + TINY.get(argv[0], []) + (extra or {}).get(argv[0], [])
        assert cli(argv) == 0, f"videomoco {shlex.join(argv)}"


def videos(root, names, seed=0):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, moving_square_frames(12 + i, 40, seed=seed + i), fps=25, codec="h264")


@pytest.mark.slow
def test_day_to_day_pipeline_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    videos(tmp_path / "data" / "kinetics400", [f"train/{c}/{c}{i}.mp4" for c in ("run", "swim") for i in range(3)])
    frames = lambda label, n: moving_square_frames(12, 40, seed=10 * label + n)  # noqa: E731
    ucf101_root(tmp_path / "data", None, classes=("A", "B"), train=2, test=1, frames_fn=frames, name="ucf101")
    hmdb51_root(tmp_path / "data", None, train=2, test=1, frames_fn=frames, name="hmdb51")
    lines = commands(block("Day-to-day use:", "bash"))
    assert [argv[0] for argv in lines] == ["models", "index", "transcode", "pretrain", "finetune", "evaluate"]
    run_all(lines, {"pretrain": ["-b", "4", "--moco-k", "8", "--micro_batch", "4"],
                    "evaluate": ["--protocols", "knn", "linear"]})
    assert (tmp_path / "runs" / "k400" / "ckp" / "checkpoint_0200.pth.tar").is_file()
    assert (tmp_path / "runs" / "evaluate" / "results.md").is_file()


@pytest.mark.slow
def test_your_own_videos_runs_as_written_and_python_gives_extracts_features(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    videos(tmp_path / "my_videos", ["beach/day1.mp4", "beach/day 2.MP4", "city/a/b.mp4", "c.mp4", "d.mp4",
                                    "e.mp4", "f.mp4", "g.mp4", "h.mp4"])
    videos(tmp_path / "my_labels", [f"{s}/{c}/{i}.mp4" for s, n in (("train", 2), ("test", 1))
                                    for c in ("cats", "dogs") for i in range(n)], seed=50)
    lines = commands(block("## Your own videos", "bash"))
    assert [argv[0] for argv in lines] == ["index", "pretrain", "export", "extract", "evaluate", "evaluate"]
    run_all(lines, {"pretrain": ["--micro_batch", "8"]})
    namespace = {}
    exec(block("## Your own videos", "python"), namespace)  # the README's Python, as written
    with open(tmp_path / "runs" / "mine" / "features.csv") as f:
        row = next(int(r["row"]) for r in csv.DictReader(f) if r["path"] == "beach/day1.mp4")
    expected = np.load(tmp_path / "runs" / "mine" / "features.npy")[row]
    np.testing.assert_allclose(namespace["feature"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert namespace["enc"].preprocessing["frames"] == 8 and not namespace["enc"].training
    monitored = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in monitored if "knn_top1" in r] == [200]  # --monitor my_labels: at the end
    for run in ("eval", "eval_random"):
        assert (tmp_path / "runs" / "mine" / run / "results.md").is_file()
    assert torch.load(tmp_path / "runs" / "mine" / "ckp" / "checkpoint_0200.pth.tar", weights_only=True)["epoch"] == 200
