"""The checkpoints of a run in `--ckp_dir`: their names, the newest good one, retention, and what a
restarted or rolled-back run sets aside. The files themselves (writing, reading, formats) are
`videomoco.engine.checkpoint`.

Names:
- `checkpoint_{E:04d}.pth.tar`: after E completed epochs (`ckpt["epoch"] == E`, the epoch to start from).
  The authors name theirs after the 0-based index of the last epoch (their `checkpoint_0099` holds epoch 100).
- `checkpoint_{E:04d}_step{S:08d}.pth.tar`: mid-epoch (E epochs done, global step S), from
  `--save_every_steps` or a SIGTERM/SIGINT; only the newest is kept.
- `superseded-<time>/`: the checkpoints newer than where a run started (a rollback, or a fresh run), set aside.
- `.checkpoint_*.pth.tar.<pid>.<random>.tmp`: a write in progress (or killed: the next run removes it).
"""

import logging
import os
import re
import time
from pathlib import Path

from videomoco.data.workers import pid_alive
from videomoco.engine.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_(\d{4,})(?:_step(\d+))?\.pth\.tar$")
_TEMP = re.compile(r"^\.checkpoint_.*\.pth\.tar\.(?:(\d+)\.)?\w+\.tmp$")  # older temp names have no pid


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


def latest_checkpoint(ckp_dir, map_location="cpu"):
    """(path, checkpoint) of the newest good checkpoint in `ckp_dir`, skipping (with a warning) those that
    `load_checkpoint(resume=True)` refuses (unreadable, malformed, non-finite weights); or (None, None)."""
    for path in reversed(list_checkpoints(ckp_dir)):
        try:
            ckpt = load_checkpoint(path, map_location, resume=True)
        except CheckpointError as e:  # unreadable, fields of the wrong type, non-finite weights
            log.warning("skipping %s", e)
            continue
        return path, ckpt
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
