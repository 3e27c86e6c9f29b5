"""Shared test fixtures: small real videos made with PyAV, the torchvision reference fixtures."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from videomoco.data.encode import write_video

torch.set_num_threads(min(2, os.cpu_count() or 1))
# deterministic cuBLAS for the `cuda` tests, as `--deterministic` sets it: read when CUDA creates its handle
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where there is no CUDA device (run them on a GPU with `-m cuda`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

REPO = Path(__file__).resolve().parents[1]
TORCHVISION_FIXTURES = REPO.parent / "shared" / "fixtures" / "torchvision_video_resnet"
OFFICIAL_SPLITS = REPO.parent / "shared" / "fixtures" / "official_splits"


def moving_square_frames(num_frames=32, size=64, seed=0):
    """`(T, H, W, 3)` uint8 frames of a coloured square moving across a textured background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    colour = rng.integers(120, 256, size=3, dtype=np.uint8)
    side = size // 4
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        x = int((size - side) * t / max(1, num_frames - 1))
        frames[t, size // 3 : size // 3 + side, x : x + side] = colour
    return frames


@pytest.fixture
def make_video(tmp_path):
    """Factory: `make_video("a/b.mp4", num_frames=32, size=64, codec="h264", fps=25, seed=0)` -> Path."""

    def _make(name="clip.mp4", num_frames=32, size=64, codec="h264", fps=25, seed=0, gop=None):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, moving_square_frames(num_frames, size, seed), fps=fps, codec=codec, gop=gop)
        return path

    return _make


@pytest.fixture(scope="session")
def torchvision_fixtures():
    if not TORCHVISION_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {TORCHVISION_FIXTURES}")
    return TORCHVISION_FIXTURES


@pytest.fixture
def official():
    """The real UCF101 / HMDB51 split files and Kinetics-400 CSVs (shared/fixtures/official_splits)."""
    if not OFFICIAL_SPLITS.is_dir():
        pytest.skip(f"official split files not found at {OFFICIAL_SPLITS}")
    return OFFICIAL_SPLITS
