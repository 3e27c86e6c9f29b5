"""Checkpoints: atomic save, safe load (`weights_only=True`), the authors' format, rotation, RNG state.

Names (in `--ckp_dir`):
- `checkpoint_{E:04d}.pth.tar`: after E completed epochs (`ckpt["epoch"] == E`, the epoch to start from).
  The authors name theirs after the 0-based index of the last epoch (their `checkpoint_0099` holds epoch 100).
- `checkpoint_{E:04d}_step{S:08d}.pth.tar`: mid-epoch (E epochs done, global step S), from
  `--save_every_steps` or a SIGTERM/SIGINT; only the newest is kept.
"""

import logging
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_(\d{4,})(?:_step(\d+))?\.pth\.tar$")


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

    A crash or a full disk mid-write leaves any previous file at `path` intact and no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    if "WeightsUnpickler error:" in text:  # an object weights_only=True refuses, e.g. a custom class
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        return f"refused by weights_only=True: {rest.splitlines()[0].split('. ')[0]}"
    return (text.strip().splitlines() or [type(err).__name__])[0]


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with `weights_only=True` -> dict; `CheckpointError` if unreadable."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a file") from None
    except Exception as e:  # a truncated zip, a pickle of custom classes, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error_reason(path, e)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a VideoMoCo checkpoint (no 'state_dict')")
    return ckpt


def latest_checkpoint(ckp_dir, map_location="cpu"):
    """(path, checkpoint) of the newest readable checkpoint in `ckp_dir`, skipping corrupt ones; or (None, None)."""
    for path in reversed(list_checkpoints(ckp_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping %s", e)
    return None, None


def rotate_checkpoints(ckp_dir, keep_last=20, keep_every=0):
    """Delete old checkpoints: keep the newest `keep_last` epoch checkpoints, every `keep_every`-th
    epoch, and only the newest mid-epoch checkpoint if it is newer than the newest epoch checkpoint."""
    paths = list_checkpoints(ckp_dir)
    epochs = [p for p in paths if _NAME.match(p.name).group(2) is None]
    steps = [p for p in paths if _NAME.match(p.name).group(2) is not None]
    keep = set(epochs[-keep_last:]) if keep_last > 0 else set(epochs)
    keep |= {p for p in epochs if keep_every > 0 and int(_NAME.match(p.name).group(1)) % keep_every == 0}
    if steps and (not epochs or _order(steps[-1]) > _order(epochs[-1])):
        keep.add(steps[-1])
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
