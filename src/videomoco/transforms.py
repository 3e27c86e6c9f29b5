"""From a video file or decoded frames to what a loaded encoder takes, exactly as `videomoco extract` does.

    enc = videomoco.load_encoder("encoder.pth")        # eval mode; enc.preprocessing: frames, frame_stride, crop,
                                                       # input_norm (mean, std), as recorded at pretraining
    clips = read_clips("video.mp4", enc)               # uint8 (10, T, H, W, 3): 10 evenly spaced clips
    x = preprocess(clips, enc)                         # float (10, 3, T, S, S): centre square, resized, normalised
    with torch.no_grad():
        feature = enc.forward_features(x).mean(0)      # (feature_dim,): the row `videomoco extract` writes

`preprocess` also takes frames decoded any other way: uint8 RGB `(T, H, W, 3)` (one clip) or `(B, T, H, W, 3)`.
"""

import torch

from videomoco.data.augment import center_crop, normalize
from videomoco.data.decode import probe
from videomoco.data.decode import read_clips as _read_clips
from videomoco.data.sampling import clip_span, uniform_clip_starts

__all__ = ["read_clips", "crop_clips", "preprocess"]


def _spec(spec):
    """The preprocessing record of an encoder from `load_encoder` (its `.preprocessing`), or the record itself."""
    return getattr(spec, "preprocessing", spec)


def read_clips(path, spec, num_clips=10, num_frames=None):
    """The `num_clips` evenly spaced clips of `spec["frames"]` frames (every `spec["frame_stride"]`-th) of the
    video at `path`, from its first to its last possible start (a short video loops) -> uint8 `(N, T, H, W, 3)`.
    `num_frames`: the video's frame count when known (an index row), else probed from the file."""
    spec = _spec(spec)
    num_frames = probe(path).frames if num_frames is None else num_frames
    starts = uniform_clip_starts(int(num_frames), clip_span(spec["frames"], spec["frame_stride"]), num_clips)
    unique = sorted(set(starts))
    by_start = dict(zip(unique, _read_clips(path, unique, spec["frames"], spec["frame_stride"])))
    return torch.stack([torch.as_tensor(by_start[s]) for s in starts])


def crop_clips(frames, crop):
    """uint8 `(T, H, W, 3)` or `(B, T, H, W, 3)` -> uint8 `(1|B, 3, T, crop, crop)`: the central square of every
    frame resized to `crop` (what every evaluation's test clips take)."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim not in (4, 5) or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 RGB (T, H, W, 3) or (B, T, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    return torch.stack([center_crop(clip, crop) for clip in frames.reshape(-1, *frames.shape[-4:])])


def preprocess(frames, spec, device=None):
    """Decoded uint8 RGB frames `(T, H, W, 3)` or `(B, T, H, W, 3)` -> the encoder's input, float32
    `(1|B, 3, T, S, S)`: `crop_clips` at `spec["crop"]`, scaled to [0, 1] and normalised with
    `spec["input_norm"]`'s mean and std. `spec`: an encoder from `load_encoder` or its `.preprocessing`."""
    spec = _spec(spec)
    clips = crop_clips(frames, spec["crop"])
    clips = clips.to(device) if device is not None else clips
    return normalize(clips, spec["input_norm"]["mean"], spec["input_norm"]["std"])
