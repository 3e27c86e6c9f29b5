"""The frame-dropping generators: each scores every frame of a clip and drops the k highest.

Two kinds, one family (`DropGenerator`: the same per-frame CNN, fp32 scores, top-k drop and fill),
chosen by name with `build_generator(kind)` (`GENERATORS`, the `--generator` flag):

    "authors"  FrameDropGenerator: the authors' design, a per-frame CNN then a recurrence over time
      clip (B, C, T, H, W)
        -> per frame: adaptive avg pool to input_size^2, 3 strided convs, global pool   (B, T, hidden)
        -> bidirectional GRU over T                                                     (B, T, hidden)
        -> linear score per frame                                                       (B, T)
    "motion"   MotionDropGenerator: each frame scored from itself and |x_t - x_{t-1}|, no recurrence
      clip (B, C, T, H, W) -> [x_t, |x_t - x_{t-1}|] (B, 2C, T, H, W)   (frame 0: frame 1's)
        -> the same per-frame CNN                                                       (B, T, hidden)
        -> MLP score per frame                                                          (B, T)

    then: drop the k = round(drop_ratio * T) highest-scoring frames, fill them          (B, C, T, H, W)

The motion kind cannot tell where in the clip a frame is, only what it shows and how it changed: the
BiGRU's scores depend on the position from initialisation, and the straight-through gradient locks
those first drops in (docs/method.md, "Does the generator read the clip?").

Unlike the authors' `MaskGenerator` (32 frames and 112 px hard-coded in its layer sizes) these
work for any T, H, W. The drop is a hard top-k in the forward pass with a straight-through
gradient to the scores: keep = hard + (soft - soft.detach()), soft = 1 - k * softmax(scores).

Fill modes for a dropped frame:
- "mean": the frame's own mean over (C, H, W), one scalar per frame (the authors' choice);
- "zero": zeros;
- "hold": the previous kept frame (the first kept frame when the clip starts with drops).
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

FILL_MODES = ("mean", "zero", "hold")


def num_dropped(num_frames, drop_ratio):
    """Frames dropped from a clip of `num_frames`: Python round(drop_ratio * T) (half to even), at most T - 1."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    return min(round(drop_ratio * num_frames), num_frames - 1)


def _fill_value(clip, keep, fill):
    """The replacement for dropped frames. clip: (B, C, T, H, W), keep: (B, T) bool."""
    if fill == "mean":
        return clip.mean(dim=(1, 3, 4), keepdim=True)  # (B, 1, T, 1, 1)
    if fill == "zero":
        return torch.zeros_like(clip)
    # hold: index of the last kept frame at or before t, else the first kept frame
    b, _, t, _, _ = clip.shape
    steps = torch.arange(t, device=clip.device).expand(b, t)
    last_kept = torch.where(keep, steps, -1).cummax(dim=1).values  # (B, T)
    first_kept = keep.float().argmax(dim=1, keepdim=True)  # (B, 1)
    src = torch.where(last_kept >= 0, last_kept, first_kept)  # (B, T)
    return clip.gather(2, src[:, None, :, None, None].expand_as(clip))


def drop_frames(clip, scores, drop_ratio, fill="mean", hard_keep=None):
    """Drop the round(drop_ratio * T) highest-scoring frames of each clip and fill them.

    clip: (B, C, T, H, W); scores: (B, T). Returns (dropped clip (B, C, T, H, W), keep mask (B, T)
    float, 1 = kept). The mask is exactly 0/1 and carries a straight-through gradient to `scores`.
    `hard_keep` (B, T) 0/1 replays a decision made before instead of the top-k (precision analyses).
    """
    if fill not in FILL_MODES:
        raise ValueError(f"unknown fill {fill!r}; expected one of {', '.join(FILL_MODES)}")
    b, _, t, _, _ = clip.shape
    k = num_dropped(t, drop_ratio)
    if hard_keep is None:
        drop_idx = scores.detach().topk(k, dim=1).indices  # (B, k)
        hard_keep = torch.ones(b, t, device=scores.device).scatter(1, drop_idx, 0.0)  # (B, T)
    soft_keep = 1.0 - k * scores.float().softmax(dim=1)  # (B, T)
    keep = hard_keep + (soft_keep - soft_keep.detach())  # value exactly hard_keep
    fill_value = _fill_value(clip, hard_keep.bool(), fill)
    m = keep[:, None, :, None, None].to(clip.dtype)  # (B, 1, T, 1, 1)
    return clip * m + fill_value * (1.0 - m), keep


def random_drop(clip, drop_ratio, fill="mean", generator=None):
    """Drop round(drop_ratio * T) uniformly random frames per clip (baselines, robustness tests).

    clip: (B, C, T, H, W); generator: optional `torch.Generator` for reproducible drops.
    Returns (dropped clip, keep mask (B, T)) like `drop_frames`.
    """
    device = generator.device if generator is not None else clip.device
    scores = torch.rand(clip.shape[0], clip.shape[2], generator=generator, device=device)
    return drop_frames(clip, scores.to(clip.device), drop_ratio, fill)


def frame_cnn(in_channels, hidden):
    """The per-frame feature CNN of every generator: (N, in_channels, S, S) -> (N, hidden, 1, 1)."""
    c = hidden // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, c // 2, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
    )


class DropGenerator(nn.Module):
    """The family: per-frame inputs -> `frame_cnn` -> `score_frames` -> drop the top-k and fill.

    drop_ratio: fraction of frames dropped; fill: "mean" | "zero" | "hold"; hidden: feature width;
    input_size: frames are average-pooled to input_size x input_size first. Subclasses set `kind`,
    `frame_inputs` (what each frame shows the CNN) and `score_frames` (features -> scores).
    """

    kind = ""
    input_views = 1  # images per frame that `frame_inputs` stacks on the channels

    def __init__(self, drop_ratio=0.25, fill="mean", hidden=64, input_size=32, in_channels=3):
        super().__init__()
        num_dropped(2, drop_ratio)  # validate early
        if fill not in FILL_MODES:
            raise ValueError(f"unknown fill {fill!r}; expected one of {', '.join(FILL_MODES)}")
        self.drop_ratio, self.fill, self.input_size, self.hidden = drop_ratio, fill, input_size, hidden
        self.features = frame_cnn(in_channels * self.input_views, hidden)

    def frame_inputs(self, x):
        """x float (B, C, T, H, W) -> what the CNN sees of each frame, (B, input_views * C, T, H, W)."""
        return x

    def score_frames(self, x):
        """Per-frame features (B, T, hidden) -> scores (B, T)."""
        raise NotImplementedError

    def scores(self, clip):
        """Drop scores: clip (B, C, T, H, W) -> float32 (B, T); the highest are dropped.

        Always computed in float32, also under bf16/fp16 autocast: cuDNN's GRU autocasts to fp16 (whose
        gradients underflow without a GradScaler, and bf16 runs have none), and low-precision scores make
        top-k ties likely. G is under 0.1% of a full-size encoder's FLOPs (`generator_costs`).
        """
        b, _, t, h, w = clip.shape
        kind = clip.device.type  # "meta" (FLOP counts) has no autocast
        fp32 = torch.autocast(device_type=kind, enabled=False) if torch.amp.is_autocast_available(kind) else None
        with fp32 or nullcontext():
            x = self.frame_inputs(clip.float())
            frames = x.transpose(1, 2).reshape(b * t, x.shape[1], h, w)  # (B*T, C', H, W)
            frames = F.adaptive_avg_pool2d(frames, self.input_size)
            return self.score_frames(self.features(frames).flatten(1).view(b, t, -1))  # (B, T)

    def forward(self, clip):
        """clip (B, C, T, H, W) -> (dropped clip (B, C, T, H, W), keep mask (B, T) float, 1 = kept)."""
        return drop_frames(clip, self.scores(clip), self.drop_ratio, self.fill)


class FrameDropGenerator(DropGenerator):
    """The authors' kind: a per-frame CNN and a BiGRU over time (the position of a frame shapes its score)."""

    kind = "authors"

    def __init__(self, drop_ratio=0.25, fill="mean", hidden=64, input_size=32, in_channels=3):
        super().__init__(drop_ratio, fill, hidden, input_size, in_channels)
        self.rnn = nn.GRU(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1)

    def score_frames(self, x):
        x, _ = self.rnn(x)  # (B, T, hidden)
        return self.score(x).squeeze(-1)  # (B, T)


class MotionDropGenerator(DropGenerator):
    """Scores each frame from the frame and its absolute difference to the previous one, with no recurrence:
    it sees what a frame shows and how much it changed, never where in the clip it is."""

    kind = "motion"
    input_views = 2

    def __init__(self, drop_ratio=0.25, fill="mean", hidden=64, input_size=32, in_channels=3):
        super().__init__(drop_ratio, fill, hidden, input_size, in_channels)
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def frame_inputs(self, x):
        # frame 0 takes frame 1's difference: a zero difference would mark it as the first frame, a position cue
        # that G used to drop frame 0 in every clip (docs/method.md, "The motion generator")
        previous = torch.cat([x[:, :, 1:2], x[:, :, :-1]], dim=2)
        return torch.cat([x, (x - previous).abs()], dim=1)  # (B, 2C, T, H, W)

    def score_frames(self, x):
        return self.score(x).squeeze(-1)  # (B, T)


GENERATORS = {cls.kind: cls for cls in (FrameDropGenerator, MotionDropGenerator)}


def build_generator(kind="authors", drop_ratio=0.25, fill="mean", **kwargs):
    """The generator of `kind` (a key of `GENERATORS`)."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; expected one of {', '.join(GENERATORS)}")
    return GENERATORS[kind](drop_ratio=drop_ratio, fill=fill, **kwargs)


def generator_kind(state_dict):
    """The kind of generator a state dict was saved from (by its keys: only the authors' kind has a GRU)."""
    return "authors" if any(k.startswith("rnn.") for k in state_dict) else "motion"
