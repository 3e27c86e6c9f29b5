"""Checkpoints: atomic save, safe load (`weights_only=True`), the authors' format, rotation, RNG state.

Names (in `--ckp_dir`):
- `checkpoint_{E:04d}.pth.tar`: after E completed epochs (`ckpt["epoch"] == E`, the epoch to start from).
  The authors name theirs after the 0-based index of the last epoch (their `checkpoint_0099` holds epoch 100).
- `checkpoint_{E:04d}_step{S:08d}.pth.tar`: mid-epoch (E epochs done, global step S), from
  `--save_every_steps` or a SIGTERM/SIGINT; only the newest is kept.
- `superseded-<time>/`: the checkpoints newer than where a run started (a rollback, or a fresh run), set aside.
- `.checkpoint_*.pth.tar.<pid>.<random>.tmp`: a write in progress (or killed: the next run removes it).
"""

import logging
import os
import random
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from videomoco.data.workers import pid_alive

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_(\d{4,})(?:_step(\d+))?\.pth\.tar$")
_TEMP = re.compile(r"^\.checkpoint_.*\.pth\.tar\.(?:(\d+)\.)?\w+\.tmp$")  # older temp names have no pid


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model (one-line message)."""


def checkpoint_name(epoch, step=None):
    return f"checkpoint_{epoch:04d}.pth.tar" if step is None else f"checkpoint_{epoch:04d}_step{step:08d}.pth.tar"


def _order(path):
    """Sort key, oldest first: a mid-epoch checkpoint of epoch E is newer than the end of epoch E."""
    m = _NAME.match(path.name)
    return (int(m.group(1)), m.group(2) is not None, int(m.group(2) or 0))


def list_checkpoints(ckp_dir):
    """Our checkpoint files in `ckp_dir`, oldest first."""
    d = Path(ckp_dir)
    return sorted((p for p in d.glob("checkpoint_*.pth.tar") if _NAME.match(p.name)), key=_order) if d.is_dir() else []


def save_checkpoint(state, path):
    """Write `state` to `path` atomically: temp file in the same dir, fsync, `os.replace`, fsync the dir.

    A crash or a full disk mid-write leaves any previous file at `path` intact and no temp file behind
    (a kill -9 leaves one, named with the writer's pid, for `remove_stale_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_error_reason(path, err):
    """A one-line reason why `torch.load(path, weights_only=True)` raised `err`.

    torch's own messages are unhelpful here: random bytes give a paragraph about the weights_only
    default, a truncated file gives "[Errno 22] Invalid argument", so look at the file's first bytes.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "truncated or corrupt file (incomplete zip archive)"
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a legacy pickle
        return "not a PyTorch checkpoint (corrupt file?)"
    text = str(err)
    if text.startswith("Weights only load failed"):  # torch advises weights_only=False: never for an unknown file
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"Python objects (e.g. GLOBAL {found.group(1)})" if found else "Python objects"
        return (f"refused to load: the file contains {what} that could run code; only tensors and plain types are "
                "loaded (weights_only=True). Do not load it with weights_only=False unless you trust its source.")
    return (text.strip().splitlines() or [type(err).__name__])[0]


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_inflation(path):
    """Refuse (`CheckpointError`) a zip whose entries inflate far beyond its size on disk, before reading any.

    torch stores its entries uncompressed, so a real checkpoint inflates to about its file size, where a
    deflate bomb of 2 MB takes GBs of memory. The sizes come from the zip's directory, which bounds what torch
    reads, so the bound below also bounds the memory of any compressed entry.
    """
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError):  # not a zip (a legacy pickle), truncated, missing: torch.load says which
        return
    size = os.path.getsize(path)
    if total > 2 * size + 64 * 2**20:
        raise CheckpointError(f"checkpoint {path} would inflate to {_size(total)} from {_size(size)} on disk "
                              f"(compression ratio {total / max(size, 1):.0f}:1); refused")


def safe_load(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)` after `check_inflation`: how every user-given file is read.
    `CheckpointError` (one line) if it is missing, unreadable or refused."""
    try:
        check_inflation(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a file") from None
    except CheckpointError:
        raise
    except Exception as e:  # a truncated zip, a pickle of custom classes, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error_reason(path, e)}") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a VideoMoCo checkpoint (ours or the authors') with `safe_load` -> dict; `CheckpointError` if unreadable."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a VideoMoCo checkpoint (no 'state_dict')")
    return ckpt


def nonfinite_tensors(ckpt):
    """Names of the floating tensors with a NaN or Inf in `ckpt["state_dict"]` and `ckpt["generator"]`
    (prefixed `generator.`): the weights of a diverged run."""
    named = [(prefix + k, v) for prefix, part in (("", "state_dict"), ("generator.", "generator"))
             if isinstance(ckpt.get(part), dict) for k, v in ckpt[part].items()
             if torch.is_tensor(v) and v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist() if named else []  # one host sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


def latest_checkpoint(ckp_dir, map_location="cpu"):
    """(path, checkpoint) of the newest good checkpoint in `ckp_dir`, skipping (with a warning) unreadable
    ones and those with non-finite weights; or (None, None)."""
    for path in reversed(list_checkpoints(ckp_dir)):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        bad = nonfinite_tensors(ckpt)
        if not bad:
            return path, ckpt
        log.warning("skipping checkpoint %s: %d tensors of its weights are NaN/Inf, e.g. %s", path, len(bad), bad[0])
    return None, None


def set_aside_newer(ckp_dir, start=None):
    """Move the checkpoints newer than a run's start into `ckp_dir/superseded-<time>/` (never deleted), so that
    `--resume auto` (which reads only the top level) continues this run and rotation spares its files.

    `start`: (epoch, step, mid_epoch) of the checkpoint the run started from; None for a fresh run (all are
    newer). Returns (folder or None, how many were moved).
    """
    if start is not None:
        epoch, step, mid_epoch = start
        start = (epoch, bool(mid_epoch), step if mid_epoch else 0)  # as `_order` sorts names
    newer = [p for p in list_checkpoints(ckp_dir) if start is None or _order(p) > start]
    if not newer:
        return None, 0
    base = Path(ckp_dir) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():  # two runs started within a second
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir()
    for p in newer:
        os.replace(p, folder / p.name)
    return folder, len(newer)


def remove_stale_temp_files(ckp_dir):
    """Delete the temp files of killed checkpoint writes: their writer's pid is gone (or is this process,
    which is not writing). Returns how many."""
    removed = 0
    for p in Path(ckp_dir).glob(".checkpoint_*.tmp"):
        m = _TEMP.match(p.name)
        if m and (m.group(1) is None or int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def prepare_ckp_dir(ckp_dir, start=None, start_epoch=0):
    """Before a run's first save: remove killed writes' temp files and `set_aside_newer` (a fresh run starts
    at `start_epoch`, step 0), logging each."""
    removed = remove_stale_temp_files(ckp_dir)
    if removed:
        log.info("removed %d temp files of killed checkpoint writes from %s", removed, ckp_dir)
    folder, n = set_aside_newer(ckp_dir, start)
    if n:
        epoch, step = start[:2] if start else (start_epoch, 0)
        log.info("--ckp_dir %s holds %d checkpoints newer than this run's start (epoch %d, step %d): moved to %s/ "
                 "so that --resume auto continues this run", ckp_dir, n, epoch, step, folder)


def rotate_checkpoints(ckp_dir, keep_last=20, keep_every=0, protect=None):
    """Delete old checkpoints: keep the newest `keep_last` epoch checkpoints, every `keep_every`-th
    epoch, only the newest mid-epoch checkpoint if it is newer than the newest epoch checkpoint, and
    always `protect` (the checkpoint just written)."""
    paths = list_checkpoints(ckp_dir)
    epochs = [p for p in paths if _NAME.match(p.name).group(2) is None]
    steps = [p for p in paths if _NAME.match(p.name).group(2) is not None]
    keep = set(epochs[-keep_last:]) if keep_last > 0 else set(epochs)
    keep |= {p for p in epochs if keep_every > 0 and int(_NAME.match(p.name).group(1)) % keep_every == 0}
    if steps and (not epochs or _order(steps[-1]) > _order(epochs[-1])):
        keep.add(steps[-1])
    keep |= {p for p in paths if protect is not None and p.name == Path(protect).name}
    for p in paths:
        if p not in keep:
            p.unlink(missing_ok=True)


# --- the model state dict: ours, the authors', mismatches ---

def model_state_dict(state_dict, queue_size=None):
    """Normalise a checkpoint's model state dict to `VideoMoCo` keys: strip `module.`, add a zero
    `queue_age` (the authors' checkpoints have none), drop the authors' generator keys."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("mask_generator."):
            out[key] = value
    if "queue_age" not in out and "queue" in out:
        out["queue_age"] = torch.zeros(out["queue"].shape[1] if queue_size is None else queue_size)
    return out


def _width(state_dict):
    w = state_dict.get("encoder_q.layer1.0.conv1.1.weight")
    return "?" if w is None else w.shape[0]


def check_compatible(model_sd, ckpt_sd, ckpt_arch="?", model_arch="?"):
    """Raise `CheckpointError` (one line) if the keys or shapes differ, naming both sides."""
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shapes = [k for k in model_sd if k in ckpt_sd and tuple(model_sd[k].shape) != tuple(ckpt_sd[k].shape)]
    if not (missing or unexpected or shapes):
        return
    msg = (f"checkpoint is {ckpt_arch} (width {_width(ckpt_sd)}) but the model is {model_arch} "
           f"(width {_width(model_sd)}): {len(missing)} keys missing, {len(unexpected)} unexpected, "
           f"{len(shapes)} shape mismatches")
    if shapes:
        k = shapes[0]
        msg += f" e.g. {k} {list(ckpt_sd[k].shape)} vs {list(model_sd[k].shape)}"
    elif missing or unexpected:
        msg += f" e.g. {(missing or unexpected)[0]}"
    raise CheckpointError(msg)


def is_official(ckpt):
    """True for the authors' `{'epoch', 'arch', 'state_dict'}` checkpoints."""
    return ckpt.get("format") != "videomoco"


# --- RNG state, stored as plain types so that weights_only=True loads it ---

def rng_state():
    py = random.getstate()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], torch.tensor(py[1], dtype=torch.int64), py[2]],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if _cuda_in_use():
        # this process's device only: a checkpoint written on 8 GPUs must resume on 1 (and vice versa),
        # and reading every GPU's state would start a CUDA context on each of them from every rank
        device = torch.cuda.current_device()
        state["cuda"] = {"device": int(device), "state": torch.cuda.get_rng_state(device)}
    return state


def _cuda_in_use():
    """CUDA RNG states matter only in a process that has started CUDA (a `--device cpu` run never does)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _set_cuda_rng_state(saved):
    """Restore the CUDA state of this process's device from a checkpoint; never raises on a GPU count change.

    `saved`: ours, `{"device": i, "state": ByteTensor}` (the saving process's device; it goes to this
    process's device, as every rank resumes rank 0's CPU states too), or an older checkpoint's list of
    every device's state (`get_rng_state_all`): the entry of this process's device if it has one.
    """
    device = torch.cuda.current_device()
    if isinstance(saved, dict):
        value = saved.get("state")
    elif isinstance(saved, (list, tuple)):
        value = saved[device] if device < len(saved) else None
    else:
        value = None
    if not isinstance(value, torch.Tensor):
        log.warning("checkpoint has no CUDA RNG state for cuda:%d; keeping the current one", device)
        return
    torch.cuda.set_rng_state(value, device)


def set_rng_state(state):
    version, keys, gauss_next = state["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss_next))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and _cuda_in_use():
        _set_cuda_rng_state(state["cuda"])
