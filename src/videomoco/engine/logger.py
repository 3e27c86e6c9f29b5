"""Run logging on rank 0: TensorBoard scalars and images, `metrics.jsonl`, environment versions,
and `drop_strip`, the picture of a clip with the frames the generator dropped marked in red."""

import json
import logging
import platform
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record is written (pytest, notebooks and
    the demo swap it; a handler bound to an old, closed stream would fail on every record)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank=0):
    """One-line records from the `videomoco` loggers on stderr; other ranks only log warnings."""
    logger = logging.getLogger("videomoco")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "videomoco", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        handler.videomoco = True
        logger.addHandler(handler)


def environment():
    """torch / CUDA / cuDNN / Python versions and the device names, as a dict of strings."""
    import torch  # here, not at the top: every command (`videomoco index` too) sets up logging from this module

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "None",
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
    }
    return env


def drop_strip(clip, keep_mask, border=2, mean=None, std=None):
    """One image of a clip's frames side by side; dropped frames get a red border, kept ones grey.

    clip: `(C, T, H, W)` uint8, or float (normalised with `mean`/`std` per channel, or in [0, 1]).
    keep_mask: `(T,)` bool/0-1, True where the generator kept the frame.
    Returns `(3, H + 2*border, T * (W + 2*border))` uint8 (TensorBoard's CHW; `.permute(1, 2, 0)` for a PNG).
    """
    import torch

    clip = clip.detach().cpu()
    if clip.dtype != torch.uint8:
        clip = clip.float()
        if mean is not None:
            clip = clip * torch.as_tensor(std).view(-1, 1, 1, 1) + torch.as_tensor(mean).view(-1, 1, 1, 1)
        clip = (clip.clamp(0, 1) * 255).round().to(torch.uint8)
    c, t, h, w = clip.shape
    if c == 1:
        clip = clip.expand(3, t, h, w)
    keep = torch.as_tensor(keep_mask).detach().cpu().bool().view(t)
    frames = torch.empty(3, t, h + 2 * border, w + 2 * border, dtype=torch.uint8)
    frames[:] = torch.tensor([128, 128, 128], dtype=torch.uint8).view(3, 1, 1, 1)
    frames[:, ~keep] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1, 1)
    frames[:, :, border:border + h, border:border + w] = clip[:3]
    # (3, T, H', W') -> (3, H', T * W')
    return frames.permute(0, 2, 1, 3).reshape(3, h + 2 * border, t * (w + 2 * border))


def _quiet_writer_threads():
    """TensorBoard's writer thread re-raises a failed write (a full disk) where Python prints its traceback, and
    again in the thread that writes next, where `MetricLogger` makes it one line: print it only there."""
    previous = threading.excepthook
    if getattr(previous, "videomoco", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.videomoco = True
    threading.excepthook = hook


class MetricLogger:
    """Scalars to TensorBoard and `metrics.jsonl` (one JSON object per logging step) in `log_dir`.

    A no-op on ranks other than 0, so call sites need no rank checks. Nothing is created before the first
    record (a run refused at its start leaves no log); a record that cannot be written (a full disk) raises
    `checkpoint.WriteError` (one line naming the file and the free space).
    """

    def __init__(self, log_dir, enabled=True):
        self.enabled, self.log_dir = enabled, Path(log_dir)
        self.writer = self.jsonl = None
        self.failed = False

    def _write(self, path, write, needed=0):
        """Run `write(writer, jsonl)`, opening both first if needed; a failed write is a `WriteError`."""
        if not self.enabled:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_writer_threads()
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(str(self.log_dir))
                self.jsonl = open(self.log_dir / "metrics.jsonl", "a")
            write(self.writer, self.jsonl)
        except (OSError, RuntimeError) as e:
            self._raise(path, e, needed)

    def _raise(self, path, err, needed=0):
        from videomoco.engine.checkpoint import write_error

        error = write_error(path, err, needed)
        if error is None:
            raise err
        self.failed = True
        raise error from None

    def scalars(self, step, values, prefix="train"):
        """Log a dict of floats at global `step`."""
        line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"

        def write(writer, jsonl):
            for name, value in values.items():
                writer.add_scalar(f"{prefix}/{name}", value, step)
            jsonl.write(line)
            jsonl.flush()

        self._write(self.log_dir / "metrics.jsonl", write, len(line))

    def image(self, tag, step, image):
        """Log a `(3, H, W)` uint8 image."""
        self._write(self.log_dir, lambda writer, _: writer.add_image(tag, image, step), image.numel())

    def text(self, tag, text):
        self._write(self.log_dir, lambda writer, _: writer.add_text(tag, text), len(text))

    def close(self):
        """Flush and close (a `WriteError` if that fails, unless a write failed before and said so)."""
        if self.writer is None:
            return
        writer, jsonl, self.writer, self.jsonl = self.writer, self.jsonl, None, None
        try:
            jsonl.close()
            writer.close()
        except (OSError, RuntimeError) as e:
            if not self.failed:
                self._raise(self.log_dir, e)
