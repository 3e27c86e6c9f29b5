"""Shared test fixtures: small real videos made with PyAV, the torchvision reference fixtures, small and read-only
filesystems, what a refused command left on disk."""

import errno
import os
import shutil
import subprocess
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


def _mount_tmpfs(path, options):
    """Mount a tmpfs at `path` (root only) -> True, or False where mounting is not permitted."""
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """Factory: `small_fs(name, free)` -> a directory on its own tmpfs with about `free` bytes left (root), or
    None where no filesystem can be mounted (the test then patches a write to raise ENOSPC instead)."""
    mounted = []

    def _make(name="small", free=0):
        path = tmp_path / name
        path.mkdir()
        size = free + 64 * 1024
        if not _mount_tmpfs(path, f"size={size},mode=0777"):
            return None
        mounted.append(path)
        with open(path / ".filler", "wb") as f:  # leave `free` bytes
            f.write(bytes(max(0, shutil.disk_usage(path).free - free)))
        return path

    yield _make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written into: a read-only tmpfs as root, else mode 0555."""
    path = tmp_path / "ro"
    path.mkdir()
    if _mount_tmpfs(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def enospc(monkeypatch, after=0):
    """Make `torch.save` fail as on a full disk after `after` successful calls (where no tmpfs can be mounted)."""
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def tree(root):
    """Every path under `root` (relative), to compare before and after a refused command."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def error_lines(text):
    """The lines of `text` that report an error (ours: `videomoco CMD: error: ...`; logging's ERROR records)."""
    return [line for line in text.splitlines() if ": error: " in line or " ERROR " in line or "Traceback" in line]
