"""Run logging on rank 0: TensorBoard scalars and images, `metrics.jsonl`, environment versions,
and `drop_strip`, the picture of a clip with the frames the generator dropped marked in red."""

import json
import logging
import platform
import sys
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


class MetricLogger:
    """Scalars to TensorBoard and `metrics.jsonl` (one JSON object per logging step) in `log_dir`.

    A no-op on ranks other than 0, so call sites need no rank checks. The files are opened at the first
    write, so a run that fails before it logs anything leaves no empty TensorBoard run behind.
    """

    def __init__(self, log_dir, enabled=True):
        self.enabled, self.log_dir = enabled, Path(log_dir)
        self._writer = None
        self.jsonl = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir))
            self.jsonl = open(self.log_dir / "metrics.jsonl", "a")
        return self._writer

    def scalars(self, step, values, prefix="train"):
        """Log a dict of floats at global `step`."""
        if not self.enabled:
            return
        writer = self.writer  # opens metrics.jsonl too
        for name, value in values.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def image(self, tag, step, image):
        """Log a `(3, H, W)` uint8 image."""
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def text(self, tag, text):
        if self.enabled:
            self.writer.add_text(tag, text)

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self.jsonl.close()
