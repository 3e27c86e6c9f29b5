"""Checkpoint files, every format: atomic save, one safe reader (`weights_only=True` or safetensors, one
error type), the pretraining and fine-tuning states, the authors' format, and `load_encoder`.

Accepted files (always read with `torch.load(weights_only=True)` or safetensors):

    ours, pretraining     {"format": "videomoco", "arch", "config": {"width", ...}, "state_dict": {"encoder_q.*", ...}}
    ours, exported        torchvision-key state_dict (.pth or .safetensors) + optional JSON sidecar FILE.json
    authors', pretraining {"epoch", "arch", "state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}
    authors', eval.py     {"epoch", "arch", "state_dict": {"module.<torchvision key>", ...}, "best_acc1", "optimizer"}
    torchvision           the raw state_dict, e.g. r2plus1d_18-91a641e6.pth
    ours, fine-tuned      {"format": "videomoco-finetune", "epoch", "arch", "width", "num_classes", "state_dict", "optimizer"}

The rule is the authors' eval.py one: strip `module.`, keep `encoder_q.*` when present and strip that too.
The arch comes from the file, or else from the key/shape signature; the width from the shapes.

Which files a run keeps in `--ckp_dir`, and their names: `videomoco.engine.retention`.
"""

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from videomoco.data.augment import AUGMENTATIONS, NORMALIZATIONS, input_norm
from videomoco.data.augment import input_norm as input_norm_record  # where a parameter is named input_norm
from videomoco.method.generator import GENERATORS
from videomoco.method.moco import mlp_head
from videomoco.models import build_encoder, list_encoders

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one-line message)."""


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _space(n):
    """Bytes of disk space for a message: `512 bytes`, `16.4 kB`, `2.1 MB`."""
    return f"{n} bytes" if n < 1e4 else f"{n / 1e3:.1f} kB" if n < 1e5 else _size(n)


class WriteError(OSError):
    """A file that could not be written (a full disk, a read-only target): one line naming the path, the reason
    and the free space (with what was needed when known). The target is left as it was."""

    def __str__(self):
        return self.args[0]


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # the disk, not the input


def _os_error(err):
    """The OSError that `err` is or was raised from (torch wraps a failed write in a RuntimeError), or None."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def free_bytes(path):
    """Free bytes on the filesystem of `path` (or of its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(path, err, needed=None):
    """`WriteError` for `err`, raised while writing `path`, if it is (or wraps) an OSError, else None."""
    cause = _os_error(err)
    if cause is None:
        return None
    reason = os.strerror(cause.errno).lower() if cause.errno else (str(cause).splitlines() or ["error"])[0]
    free = free_bytes(path)
    space = [f"needs about {_space(needed)}"] if needed else []
    space += [f"{_space(free)} free there"] if free is not None else []
    error = WriteError(f"cannot write {path}: {reason}" + (f" ({', '.join(space)})" if space else ""))
    error.errno, error.filename = cause.errno, str(path)
    return error


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write, needed=None):
    """Write `path` atomically with `write(binary file)`: temp file in the same dir (mode 0666 less the umask, as
    `open` gives), fsync, `os.replace`, fsync the dir. A crash or a full disk mid-write leaves any previous file at
    `path` intact and no temp file behind (a kill -9 leaves one, named with the writer's pid, for
    `remove_stale_temp_files`); a failed write raises `WriteError` (one line; `needed`: the bytes it would take).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = write_error(path, e, needed) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def state_bytes(obj):
    """Bytes of the tensors in a nested dict / list `obj`: about the size of its checkpoint file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, path):
    """Write `state` to `path` with `atomic_write` (`WriteError` on a full disk, naming the space it needs)."""
    return atomic_write(path, lambda f: torch.save(state, f), needed=state_bytes(state))


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


def load_checkpoint(path, map_location="cpu", resume=False):
    """Load a VideoMoCo checkpoint (ours or the authors') with `safe_load` -> dict, refusing (`CheckpointError`, one
    line) an unreadable file, fields of the wrong type (`check_fields`) and weights that are not finite.
    `resume`: also require the fields that resuming a checkpoint of its format reads."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a VideoMoCo checkpoint (no 'state_dict')")
    check_fields(ckpt, path)
    check_finite(ckpt, path)
    if resume:
        check_fields(ckpt, path, RESUME_FIELDS.get(ckpt.get("format"), ("epoch",)))
    return ckpt


# --- what a checkpoint is trusted for: its fields' types, finite weights ---

def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _optimizer(v):
    return isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)


# field -> (what it must be, test); a field that a checkpoint has is checked whatever its format
FIELDS = {
    "format": ("a string", lambda v: isinstance(v, str)),
    "epoch": ("an integer >= 0", _count),
    "step": ("an integer >= 0", _count),
    "batch_in_epoch": ("an integer >= 0", _count),
    "arch": ("an encoder name", lambda v: isinstance(v, str) and bool(v)),
    "width": ("an integer >= 1", lambda v: _count(v) and v >= 1),
    "num_classes": ("an integer >= 1", lambda v: _count(v) and v >= 1),
    "classes": ("a list of class names", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "state_dict": ("a dict of tensors", lambda v: isinstance(v, dict)),
    "generator": ("a dict of tensors", lambda v: isinstance(v, dict)),
    "config": ("a dict", lambda v: isinstance(v, dict)),
    "optimizer": ("an optimizer state dict", _optimizer),
    "optimizer_g": ("an optimizer state dict", _optimizer),
    "scaler": ("a dict", lambda v: isinstance(v, dict)),
    "scheduler": ("a dict", lambda v: isinstance(v, dict)),
    "sampler": ("a dict", lambda v: isinstance(v, dict)),
    "rng": ("a dict of RNG states (python, numpy, torch)",
            lambda v: isinstance(v, dict) and {"python", "numpy", "torch"} <= set(v)),
}
# what resuming reads, by format: ours (engine.pretrain), a fine-tuning run's (eval.finetune), the authors' (None)
RESUME_FIELDS = {
    "videomoco": ("epoch", "step", "arch", "config", "state_dict", "generator", "optimizer", "optimizer_g", "sampler",
                  "rng"),
    "videomoco-finetune": ("epoch", "arch", "width", "num_classes", "state_dict", "optimizer"),
}


def check_fields(ckpt, path, required=()):
    """`CheckpointError` (one line naming the field) if a field of `ckpt` is not what `FIELDS` says it must be,
    or one of `required` is missing."""
    for name, (what, ok) in FIELDS.items():
        if name in ckpt and not ok(ckpt[name]):
            value = repr(ckpt[name]) if not isinstance(ckpt[name], (dict, list)) else type(ckpt[name]).__name__
            raise CheckpointError(f"checkpoint {path}: field {name!r} must be {what}, got {value[:60]}; refused")
    for name in required:
        if name not in ckpt:
            raise CheckpointError(f"checkpoint {path}: field {name!r} is missing; refused")


def check_finite(ckpt, path):
    """`CheckpointError` (one line naming the tensors) if `ckpt`'s weights (`nonfinite_tensors`) hold NaN or Inf."""
    bad = nonfinite_tensors(ckpt)
    if bad:
        raise CheckpointError(f"checkpoint {path}: {len(bad)} tensors of its weights are NaN/Inf, e.g. "
                              f"{', '.join(bad[:3])} (a diverged run?); refused")


def restore(path, name, load, value):
    """`load(value)` of field `name` of checkpoint `path`; an error is `CheckpointError` naming the field."""
    try:
        return load(value)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: field {name!r} does not fit this run: {reason}") from None


def pretrain_state(config, *, epoch, step, batch_in_epoch, model, generator, optimizer, optimizer_g, scheduler,
                   sampler, scaler_d=None, scaler_g=None):
    """The pretraining checkpoint after `epoch` epochs and `batch_in_epoch` batches of the next (`step` steps
    in all): D and G with their optimisers and fp16 scalers, the config (a plain dict, with the decay's form), the
    input normalisation of its `aug` recipe (`input_norm`), the schedule's and the sampler's state dicts, and this
    process's RNG states (docs/ARCHITECTURE.md)."""
    return {
        "format": "videomoco", "version": 1,
        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
        "arch": config["arch"], "config": config, "input_norm": input_norm(AUGMENTATIONS[config.get("aug", "ours")]),
        "state_dict": model.state_dict(), "generator": generator.state_dict(),
        "optimizer": optimizer.state_dict(), "optimizer_g": optimizer_g.state_dict(),
        "scaler": {"d": scaler_d.state_dict(), "g": scaler_g.state_dict()} if scaler_d is not None else {},
        "scheduler": scheduler, "sampler": sampler,
        "rng": rng_state(),
    }


def finetune_state(model, optimizer, epoch, num_classes, classes=None, input_norm=None):
    """The fine-tuning checkpoint after `epoch` epochs: the whole classifier (`load_encoder` reads it with its
    head), its optimiser, what `--resume` checks (arch, width, the class count and names) and the input
    normalisation it was trained with (`input_norm`; default: the model's recorded one)."""
    norm = input_norm or encoder_input_norm(model)
    return {"format": "videomoco-finetune", "epoch": epoch, "arch": model.arch, "width": model.width,
            "num_classes": num_classes, "classes": list(classes or []), "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "input_norm": dict(norm)}


def save_export(model, out, fmt="pth", source=""):
    """The export format: `model`'s backbone (torchvision keys, no `fc.*`) as `.pth` or `.safetensors` at `out`,
    and a JSON sidecar (`format`, `arch`, `width`, `feature_dim`, `source`, and the input the encoder takes:
    `frames`, `frame_stride`, `crop`, `input_norm`, from `model.preprocessing`) that `load_encoder` reads back; both
    written atomically (`WriteError` on a full disk). Returns {"weights", "sidecar", "num_tensors", and the
    sidecar's fields}."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    out = Path(out)
    meta = {"format": "export", "arch": model.arch, "width": model.width, "feature_dim": model.feature_dim,
            **getattr(model, "preprocessing", {})}
    if fmt == "safetensors":
        from safetensors.torch import save

        metadata = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in meta.items()}
        atomic_write(out, lambda f: f.write(save(sd, metadata=metadata)), needed=state_bytes(sd))
    else:
        atomic_write(out, lambda f: torch.save(sd, f), needed=state_bytes(sd))
    sidecar = out.with_suffix(".json")
    text = json.dumps({**meta, "source": str(source), "num_tensors": len(sd)}, indent=2) + "\n"
    atomic_write(sidecar, lambda f: f.write(text.encode()), needed=len(text))
    return {"weights": str(out), "sidecar": str(sidecar), "num_tensors": len(sd), **meta}


def nonfinite_tensors(ckpt):
    """Names of the floating tensors with a NaN or Inf in `ckpt["state_dict"]` and `ckpt["generator"]`
    (prefixed `generator.`): the weights of a diverged run."""
    named = [(prefix + k, v) for prefix, part in (("", "state_dict"), ("generator.", "generator"))
             if isinstance(ckpt.get(part), dict) for k, v in ckpt[part].items()
             if torch.is_tensor(v) and v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist() if named else []  # one host sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


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


def encoder_input_norm(model):
    """The input normalisation `{"name", "mean", "std"}` an encoder from `load_encoder` was trained with (its
    `.preprocessing["input_norm"]`); Kinetics' for a model that records none (a random init)."""
    recorded = (getattr(model, "preprocessing", None) or {}).get("input_norm")
    return dict(recorded) if recorded else input_norm_record("kinetics")


def checkpoint_input_norm(ckpt):
    """The input normalisation `ckpt`'s encoder was trained with, as {"name", "mean", "std"}.

    Recorded as `input_norm` by ours (pretraining, export sidecar, fine-tuning); files that predate the field
    and torchvision's weights were trained on Kinetics statistics; the authors' files (format-less dicts with
    `module.` keys) on ImageNet statistics (their moco/loader.py and eval.py).
    """
    recorded = ckpt.get("input_norm")
    recorded = recorded.get("name") if isinstance(recorded, dict) else recorded  # a name: safetensors metadata
    if isinstance(recorded, str) and recorded in NORMALIZATIONS:
        return input_norm(recorded)
    if ckpt.get("format") is None and any(k.startswith("module.") for k in ckpt.get("state_dict") or {}):
        return input_norm("imagenet")
    return input_norm("kinetics")



def checkpoint_generator_kind(ckpt):
    """The kind of frame-dropping generator (`method.generator.GENERATORS`) `ckpt` was trained with: its config's
    `generator` if recorded, else "authors" (our files that predate the choice, and the authors' own)."""
    config = ckpt.get("config")
    recorded = config.get("generator") if isinstance(config, dict) else None
    return recorded if recorded in GENERATORS else "authors"


def generator_trained(ckpt):
    """Whether the generator of our pretraining checkpoint `ckpt` has taken a step: its run had reached its
    `adv_start_epoch` (a checkpoint written at that epoch's start has not)."""
    adv = int(ckpt["config"].get("adv_start_epoch", 0))
    epoch, batch = int(ckpt["epoch"]), int(ckpt.get("batch_in_epoch", 0))
    return epoch > adv or (epoch == adv and batch > 0)


def checkpoint_decay(ckpt):
    """The temporal decay's form a pretraining checkpoint was trained with: {"unit", "on"} (`decay_unit`,
    `decay_on`). The authors' files and ours from before the choice: their code's, {"unit": "step", "on": "logit"}."""
    config = ckpt.get("config") or {}
    return {"unit": config.get("decay_unit", "step"), "on": config.get("decay_on", "logit")}


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


# --- the query encoder of any checkpoint ---

def read_checkpoint(path):
    """The raw object of a `.pth`/`.pth.tar`/`.safetensors` file (a dict), read without unpickling code:
    the one reader of every format. `FileNotFoundError` if there is no file, else `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, **(f.metadata() or {})}
    return safe_load(path)  # weights_only=True, deflate bombs refused


def encoder_state(path):
    """`(state_dict with torchvision keys incl. fc.* when stored, info dict)` of the query encoder in `path`.

    `info` holds what the file says: `arch`, `width`, `format` (videomoco / export / authors / torchvision) and
    `input_norm` (`checkpoint_input_norm`: the statistics its encoder was trained with).
    """
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(obj).__name__})")
    info = {}
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        info.update({k: config[k] for k in ("width", "dim", "mlp") if k in config})
        info.update({ours: config[theirs] for theirs, ours in PRETRAIN_CLIP.items() if theirs in config})
        for key in ("arch", "width", "format", "feature_dim", *CLIP_DEFAULTS):
            if isinstance(obj.get(key), (str, int)):
                info[key] = obj[key]
        info["input_norm"] = checkpoint_input_norm(_parsed(obj, "input_norm"))
        info.setdefault("format", "authors")
    else:  # a bare state_dict: ours (exported, with its sidecar) or torchvision's
        sidecar = Path(path).with_suffix(".json")
        if sidecar.is_file():
            info.update(_sidecar(sidecar))
        sd, info["format"] = obj, info.get("format", "torchvision")
        info["input_norm"] = checkpoint_input_norm(info)
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith("encoder_q.") for k in sd):
        sd = {k[len("encoder_q.") :]: v for k, v in sd.items() if k.startswith("encoder_q.")}
    if not sd:
        raise CheckpointError(f"{path}: no encoder weights found")
    for key in ("width", "feature_dim", *CLIP_DEFAULTS):
        if key in info:
            try:
                info[key] = int(info[key])
                if info[key] < 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise CheckpointError(f"checkpoint {path}: field {key!r} must be an integer >= 1, "
                                      f"got {info[key]!r}; refused") from None
    check_finite({"state_dict": sd}, path)
    return sd, info


def _parsed(obj, key):
    """`obj` with `obj[key]` decoded when it is JSON text (safetensors metadata holds strings only)."""
    if isinstance(obj.get(key), str):
        try:
            return {**obj, key: json.loads(obj[key])}
        except json.JSONDecodeError:
            pass
    return obj


def preprocessing(info):
    """What the encoder described by `info` (from `encoder_state`) takes: {"frames", "frame_stride", "crop",
    "input_norm"}; a file that does not record the clip size gets torchvision's and the authors' 16 x 112."""
    return {**{k: info.get(k, v) for k, v in CLIP_DEFAULTS.items()}, "input_norm": info["input_norm"]}


# The clip an encoder takes (`load_encoder(...).preprocessing`, the export sidecar): the fields and their defaults
# for files that do not say, and where our pretraining config records them.
CLIP_DEFAULTS = {"frames": 16, "frame_stride": 1, "crop": 112}
PRETRAIN_CLIP = {"frame_per_clip": "frames", "frame_stride": "frame_stride", "crop_size": "crop"}


def _sidecar(path):
    """The JSON sidecar of an exported file, as a dict (`CheckpointError` if it is not one)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"sidecar {path}: not readable JSON ({(str(e).splitlines() or ['?'])[0]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"sidecar {path}: not a JSON object")
    return meta


def _reference(arch, width):
    """Shapes of the backbone (no fc) of `arch` at `width`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_encoder(arch, num_classes=1, width=width)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _infer_width(arch, sd):
    """The width whose stage-1 channel count the checkpoint has (the first tensor with 64 rows at width 64)."""
    for key, shape in _reference(arch, 64).items():
        if len(shape) >= 1 and shape[0] == 64 and key in sd:
            return int(sd[key].shape[0])
    return None


def _mismatch(arch, width, sd):
    """None if the backbone keys and shapes of `sd` are those of `arch` at `width`, else a one-line reason."""
    ref = _reference(arch, width)
    backbone = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    missing = [k for k in ref if k not in backbone]
    unexpected = [k for k in backbone if k not in ref]
    if missing or unexpected:
        return f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
    for k, shape in ref.items():
        if backbone[k] != shape:
            return f"{k} has shape {list(backbone[k])}, {arch} width {width} expects {list(shape)}"
    return None


def _infer_arch(sd):
    """The registered encoder whose backbone signature matches `sd`, with its width."""
    matches = []
    for arch in list_encoders():
        width = _infer_width(arch, sd)
        if width and _mismatch(arch, width, sd) is None:
            matches.append((arch, width))
    if len(matches) != 1:
        found = "no" if not matches else "several"
        raise CheckpointError(f"cannot tell the architecture from the weights ({found} registered encoder matches); pass arch=")
    return matches[0]


def _head(sd):
    """The pretraining / fine-tuning head stored under `fc.*`: Linear, MLP (fc.0, fc.2), MLP with
    BatchNorm (fc.0, fc.1, fc.3, fc.4; `mlp_head(bn=True)`) or None."""
    if "fc.weight" in sd:
        out_dim, in_dim = sd["fc.weight"].shape
        return nn.Linear(in_dim, out_dim), {k[len("fc.") :]: sd[k] for k in ("fc.weight", "fc.bias")}
    if "fc.0.weight" in sd and "fc.3.weight" in sd:
        hidden, in_dim = sd["fc.0.weight"].shape
        head = mlp_head(nn.Linear(hidden, sd["fc.3.weight"].shape[0]), bn=True)
        return head, {k[len("fc.") :]: v for k, v in sd.items() if k.startswith("fc.")}
    if "fc.0.weight" in sd and "fc.2.weight" in sd:
        hidden, in_dim = sd["fc.0.weight"].shape
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, sd["fc.2.weight"].shape[0]))
        return head, {k[len("fc.") :]: v for k, v in sd.items() if k.startswith("fc.")}
    return None, None


def resolve_encoder(path, arch=None, width=None):
    """`(backbone state dict, info, arch, width)` of the query encoder in `path` (`info`: `encoder_state`'s),
    checked against `arch` / `width` when given: everything `load_encoder` refuses (`CheckpointError`, one line),
    without building the model."""
    sd, info = encoder_state(path)
    stored_arch, stored_width = info.get("arch"), info.get("width")
    if arch and stored_arch and arch != stored_arch:
        raise CheckpointError(f"{path} holds a {stored_arch} encoder, not {arch}")
    if width and stored_width and width != stored_width:
        raise CheckpointError(f"{path} holds a width-{stored_width} encoder, not width {width}")
    arch = arch or stored_arch
    if arch is None:
        arch, inferred = _infer_arch(sd)
        width = width or stored_width or inferred
    elif arch not in list_encoders():
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; known: {', '.join(list_encoders())}")
    width = width or stored_width or _infer_width(arch, sd) or 64
    reason = _mismatch(arch, width, sd)
    if reason:
        raise CheckpointError(f"{path} does not match {arch} (width {width}): {reason}")
    return sd, info, arch, width


def load_encoder(path, arch=None, width=None, num_classes=None):
    """The query encoder stored in `path`, in eval mode, ready for `forward_features(x (B, 3, T, H, W)) -> (B,
    feature_dim)`; `.preprocessing` says what x is (`videomoco.transforms.preprocess` makes it from frames).

    `fc` is the head stored in the file (the pretraining projection, Linear or MLP; a fine-tuned classifier),
    or `nn.Identity()` when the file has none. `num_classes=N` replaces it by a fresh `nn.Linear(feature_dim, N)`
    (N(0, 0.01) weights, zero bias, as the authors' eval.py). Raises `ValueError` on any arch/width/key mismatch.
    """
    sd, info, arch, width = resolve_encoder(path, arch, width)
    model = build_encoder(arch, num_classes=1, width=width)
    model.fc = nn.Identity()
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    if num_classes is not None:
        model.fc = nn.Linear(model.feature_dim, num_classes)
        nn.init.normal_(model.fc.weight, 0.0, 0.01)
        nn.init.zeros_(model.fc.bias)
    else:
        head, head_sd = _head(sd)
        if head is not None:
            head.load_state_dict(head_sd)
            model.fc = head
    model.arch, model.width = arch, width
    model.preprocessing = preprocessing(info)  # what `videomoco.transforms.preprocess` turns frames into
    return model.eval()  # BatchNorm with its running statistics: `.train()` to fine-tune
