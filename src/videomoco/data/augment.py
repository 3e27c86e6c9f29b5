"""Clip augmentation: geometric crops on the CPU (in the dataset), colour on the model's device.

CPU side (per item, in DataLoader workers): one crop box per clip, applied to every frame, then
resize to `size x size`:

    frames uint8 (T, H, W, 3) --crop box--> (T, h, w, 3) --resize--> uint8 (3, T, S, S)

Device side (per batch, after the transfer): `GpuAugment` turns uint8 `(B, 3, T, H, W)` into
normalised float with colour jitter, grayscale, blur and flip. Parameters are drawn per CLIP and
shared by its T frames, so the augmentation changes appearance but never adds flicker that the
network could use to tell frames apart; `per_frame=True` reproduces the authors' per-frame draw.

Recipes by name (`videomoco pretrain --aug`, `build_augment`): "ours" (per clip, Kinetics statistics,
strengths from the --aug_* flags), "authors" and "authors_plus" (the authors' MoCoAugment and
MoCoAugmentV2, tinapan-pt/VideoMoCo moco/loader.py: per frame, ImageNet statistics).
"""

import functools
import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Kinetics-400 statistics used by torchvision's video models.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
# ImageNet statistics: what the authors' loader and eval.py normalise with (tinapan-pt/VideoMoCo moco/loader.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The input normalisations an encoder can be trained with, by name: the one source for the checkpoint field
# `input_norm` = {"name", "mean", "std"} (pretraining checkpoints, exports' sidecars, fine-tuned checkpoints).
NORMALIZATIONS = {"kinetics": (KINETICS_MEAN, KINETICS_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


# `--aug` recipe -> the normalisation it ends with (the checkpoint's `input_norm`)
AUGMENTATIONS = {"ours": "kinetics", "authors": "imagenet", "authors_plus": "imagenet"}
AUG_DRAWS = ("auto", "clip", "frame")  # parameters per clip or per frame; auto: the recipe's own


def input_norm(name):
    """The checkpoint record of the normalisation `name` ("kinetics" | "imagenet"): {"name", "mean", "std"}."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {name!r}; choose from {', '.join(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[name]
    return {"name": name, "mean": list(mean), "std": list(std)}


# --------------------------------------------------------------------------- CPU side: crops


def random_resized_crop_box(h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), rng=None):
    """A random box `(top, left, height, width)` covering `scale` of the area with aspect in `ratio`.

    The Inception-style crop: 10 tries at a random area and log-uniform aspect ratio, then a
    central crop with the ratio clamped to `ratio` as a fallback.
    """
    rng = np.random.default_rng() if rng is None else rng
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def square_boxes(h, w, num_crops=1):
    """`num_crops` in {1, 3} boxes of side min(h, w): centre, or start/centre/end along the long side."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    side = min(h, w)
    offsets = [(max(h, w) - side) // 2] if num_crops == 1 else [0, (max(h, w) - side) // 2, max(h, w) - side]
    if h > w:
        return [(o, 0, side, side) for o in offsets]
    return [(0, o, side, side) for o in offsets]


def resized_size(h, w, resize):
    """The frame size after a test-time resize: `0` keeps `(h, w)`, an int scales the short side to it (the long
    side floored, as PySlowFast's and CoCLR's resizes), a pair `(h, w)` is that size (VCOP's fixed 128 x 171)."""
    if not resize:
        return h, w
    if isinstance(resize, (tuple, list)):
        return int(resize[0]), int(resize[1])
    if h <= w:
        return int(resize), int(math.floor(w / h * resize))
    return int(math.floor(h / w * resize)), int(resize)


_ROUND = {"floor": lambda x: int(math.floor(x)), "round": lambda x: int(round(x)), "ceil": lambda x: int(math.ceil(x))}


def view_boxes(h, w, side=0, num_crops=1, rounding="floor"):
    """`num_crops` in {1, 3} square boxes `(top, left, side, side)` in an `h x w` frame: the centre one, or the
    start / centre / end ones along the long side (PySlowFast's `uniform_crop`). `side=0` (or larger than the
    frame) takes the short side. `rounding` of the centre offset: floor (ours), round (torchvision's
    `CenterCrop`, half to even), ceil (PySlowFast)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    side = min(h, w) if not side else min(int(side), h, w)
    centre = (_ROUND[rounding]((h - side) / 2), _ROUND[rounding]((w - side) / 2))
    if num_crops == 1:
        return [(*centre, side, side)]
    if h > w:
        return [(top, centre[1], side, side) for top in (0, centre[0], h - side)]
    return [(centre[0], left, side, side) for left in (0, centre[1], w - side)]


def resize_frames(frames, size):
    """uint8 `(T, H, W, 3)` -> uint8 tensor `(T, h, w, 3)` at `size = (h, w)` (bilinear, antialiased)."""
    clip = torch.as_tensor(frames)
    if tuple(clip.shape[1:3]) == tuple(size):
        return clip
    clip = clip.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    clip = F.interpolate(clip, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return clip.permute(0, 2, 3, 1)


def crop_and_resize(frames, box, size):
    """Crop `box = (top, left, height, width)` from every frame and resize to `size x size`.

    frames: uint8 `(T, H, W, 3)` (numpy or tensor) -> uint8 tensor `(3, T, size, size)`.
    """
    top, left, ch, cw = box
    clip = torch.as_tensor(frames)[:, top : top + ch, left : left + cw]  # (T, h, w, 3)
    clip = clip.permute(0, 3, 1, 2)  # (T, 3, h, w), a channels-last view
    if (ch, cw) != (size, size):
        # uint8 bilinear+antialias has a fast channels-last CPU kernel; no float copy of the clip
        clip = F.interpolate(clip.contiguous(memory_format=torch.channels_last), size=(size, size),
                             mode="bilinear", antialias=True, align_corners=False)
    return clip.permute(1, 0, 2, 3).contiguous()  # (3, T, S, S)


def center_crop(frames, size):
    """The central square of every frame resized to `size`: uint8 `(T, H, W, 3)` -> `(3, T, S, S)`."""
    return crop_and_resize(frames, square_boxes(*frames.shape[1:3])[0], size)


def three_crops(frames, size):
    """Three squares along the long side (start, centre, end), each `(3, T, S, S)` uint8."""
    return [crop_and_resize(frames, box, size) for box in square_boxes(*frames.shape[1:3], num_crops=3)]


# --------------------------------------------------------------------------- device side: colour


def _to_unit_float(clips):
    if clips.dtype == torch.uint8:
        return clips.float().div_(255)
    if not clips.is_floating_point():
        raise TypeError(f"clips must be uint8 or float, got {clips.dtype}")
    return clips.float()


def _check_clips(clips):
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be (B, 3, T, H, W), got {tuple(clips.shape)}")


@functools.lru_cache(maxsize=32)
def _channel_stats(values, device):
    """`values` (3 floats) as a (1, 3, 1, 1, 1) float32 tensor on `device`, built once per device (a host
    to device copy per batch waits for the queued kernels)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)


def normalize(clips, mean=KINETICS_MEAN, std=KINETICS_STD):
    """uint8 (or [0, 1] float) `(B, 3, T, H, W)` -> normalised float32, no augmentation (evaluation)."""
    _check_clips(clips)
    x = _to_unit_float(clips)
    mean = _channel_stats(tuple(float(v) for v in mean), x.device)
    std = _channel_stats(tuple(float(v) for v in std), x.device)
    return (x - mean) / std


def gaussian_blur(x, kernel_size, sigma):
    """Separable Gaussian blur with one sigma per image, reflect borders; no host syncs.

    x: float (N, C, H, W); kernel_size: odd int; sigma: (N,) positive, the same along H and W.
    Numerically kornia's `gaussian_blur2d(x, kernel_size, sigma[:, None].expand(-1, 2))`, which
    checks `bool((sigma > 0).all())` on the tensor's device (a host sync per call on a GPU).
    """
    n, c, h, w = x.shape
    r = kernel_size // 2
    dist = (torch.arange(kernel_size, device=x.device, dtype=x.dtype) - r).pow(2.0)  # (k,) offsets squared
    kernel = torch.exp(-dist / (2 * sigma.to(x.dtype)[:, None].pow(2.0)))  # (N, k)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k), per channel
    x = F.pad(x, (r, r, 0, 0), mode="reflect").reshape(1, n * c, h, w + 2 * r)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W
    x = F.pad(x.view(n, c, h, w), (0, 0, r, r), mode="reflect").reshape(1, n * c, h + 2 * r, w)
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H
    return x.view(n, c, h, w)


class GpuAugment(nn.Module):
    """Batched colour augmentation + flip + normalisation on whatever device the clips are on.

    forward(clips uint8/float `(B, 3, T, H, W)`) -> float32 normalised `(B, 3, T, H, W)`.
    Each random decision and factor is drawn once per clip and repeated for its T frames
    (`per_frame=False`), or drawn per frame (`per_frame=True`, the authors' behaviour, which
    breaks temporal consistency). `aug_plus=False` switches to the MoCo v1 recipe (jitter
    always, no blur). `invert_p`: probability of the photographic negative (1 - x), before the rest: with
    a few palettes shared by many videos (the demo's dots) it takes away the palette, which contrastive
    learning otherwise matches views by (docs/demo.md, "Tuning"); 0 (the default) draws nothing, so the
    other draws are those of a GpuAugment without it. `grayscale_first`: grayscale before the jitter (the
    authors' MoCoAugment), not after (MoCo v2's order). `forward(clips, generator)` accepts a
    `torch.Generator` on the clips' device for reproducible draws.
    """

    def __init__(self, color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                 blur_sigma=(0.1, 2.0), flip_p=0.5, mean=KINETICS_MEAN, std=KINETICS_STD,
                 per_frame=False, aug_plus=True, invert_p=0.0, grayscale_first=False):
        super().__init__()
        self.invert_p = invert_p
        if not aug_plus:
            jitter_p, blur_p = 1.0, 0.0
        self.brightness, self.contrast, self.saturation, self.hue = color_jitter
        self.jitter_p, self.grayscale_p, self.blur_p, self.flip_p = jitter_p, grayscale_p, blur_p, flip_p
        if blur_p > 0 and not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}")
        self.blur_sigma = blur_sigma
        self.per_frame, self.grayscale_first = per_frame, grayscale_first
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self):
        return (f"jitter={self.brightness, self.contrast, self.saturation, self.hue} p={self.jitter_p}, "
                f"grayscale_p={self.grayscale_p}, blur_p={self.blur_p}, flip_p={self.flip_p}, invert_p={self.invert_p}, "
                f"per_frame={self.per_frame}, grayscale_first={self.grayscale_first}")

    def describe(self):
        """The colour ops in their order with their parameters, and the draw (per clip / per frame): one line."""
        jitter = (f"colour jitter {self.brightness:g}/{self.contrast:g}/{self.saturation:g} hue {self.hue:g} "
                  f"(p {self.jitter_p:g})")
        gray = f"grayscale p {self.grayscale_p:g}"
        ops = [gray, jitter] if self.grayscale_first else [jitter, gray]
        if self.blur_p > 0:
            ops.append(f"blur p {self.blur_p:g} sigma {self.blur_sigma[0]:g}-{self.blur_sigma[1]:g}")
        ops.append(f"flip p {self.flip_p:g}")
        if self.invert_p > 0:
            ops.insert(0, f"invert p {self.invert_p:g}")
        return " -> ".join(ops) + f"; drawn per {'frame' if self.per_frame else 'clip'}"

    @torch.no_grad()
    def forward(self, clips, generator=None):
        _check_clips(clips)
        b, _, t, h, w = clips.shape
        x = _to_unit_float(clips).transpose(1, 2).reshape(b * t, 3, h, w)  # (B*T, 3, H, W)
        device = x.device

        def uniform(low, high):
            """One value per clip repeated T times (or one per frame): shape (B*T,)."""
            n = b * t if self.per_frame else b
            u = torch.rand(n, device=device, generator=generator) * (high - low) + low
            return u if self.per_frame else u.repeat_interleave(t)

        def chance(p):
            return uniform(0.0, 1.0) < p

        def grayscale(x):
            gray = chance(self.grayscale_p).view(-1, 1, 1, 1)
            return torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)

        # Every op runs on the whole batch and torch.where picks per sample: no host syncs on the GPU.
        if self.invert_p > 0:
            x = torch.where(chance(self.invert_p).view(-1, 1, 1, 1), 1.0 - x, x)
        if self.grayscale_first:
            x = grayscale(x)
        x = self._jitter(x, chance(self.jitter_p), uniform, generator)
        if not self.grayscale_first:
            x = grayscale(x)
        if self.blur_p > 0:
            blur = chance(self.blur_p).view(-1, 1, 1, 1)
            sigma = uniform(*self.blur_sigma)  # (B*T,), positive (checked in __init__, not on the device)
            kernel = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)  # ~10% of the side, odd, as in MoCo v2
            x = torch.where(blur, gaussian_blur(x, kernel, sigma), x)
        flip = chance(self.flip_p).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        x = (x - self.mean.to(device)) / self.std.to(device)
        return x.reshape(b, t, 3, h, w).transpose(1, 2)  # (B, 3, T, H, W)

    def _jitter(self, x, apply, uniform, generator):
        """torchvision-style ColorJitter with per-sample factors; unselected samples get neutral factors.

        The order of the four adjustments is drawn once per batch (as kornia does), not per clip.
        """
        adjustments = [  # (amount, neutral factor, kornia op taking one factor per image)
            (self.brightness, 1.0, kornia.enhance.adjust_brightness_accumulative),
            (self.contrast, 1.0, kornia.enhance.adjust_contrast_with_mean_subtraction),
            (self.saturation, 1.0, kornia.enhance.adjust_saturation_with_gray_subtraction),
            (self.hue, 0.0, lambda im, f: kornia.enhance.adjust_hue(im, f * 2 * math.pi)),  # turns -> radians
        ]
        cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
        for i in torch.randperm(4, generator=cpu_generator).tolist():
            amount, neutral, op = adjustments[i]
            if amount > 0:
                f = uniform(max(0.0, neutral - amount), neutral + amount)
                x = op(x, torch.where(apply, f, torch.full_like(f, neutral))).clamp_(0, 1)
        return x


def build_augment(recipe="ours", draw="auto", *, jitter=0.4, hue=0.1, grayscale_p=0.2, flip_p=0.5, aug_plus=False,
                  invert_p=0.0):
    """The `GpuAugment` of an `--aug` recipe (AUGMENTATIONS); draw: "clip", "frame" or "auto" (the recipe's own:
    ours per clip, the authors' per frame). jitter / hue / grayscale_p / flip_p / aug_plus / invert_p set "ours"
    only.

    The authors' numbers (tinapan-pt/VideoMoCo 42e069a, moco/loader.py): MoCoAugment (lines 25-33): ImageNet
    mean/std, RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) (kornia's default p=1: always),
    RandomHorizontalFlip() (p=0.5). MoCoAugmentV2 (lines 51-62): ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
    RandomGrayscale(p=0.2), GaussianBlur sigma [0.1, 2] with p=0.5 (kernel int(0.1 * crop) // 2 * 2 + 1, line
    13), flip, the same mean/std. Both view the batch as B*T images (lines 39-41), so every frame draws its own.
    One difference is left: V2's torchvision RandomApply (lines 56, 60) jitters or blurs the whole batch or
    none of it, with one sigma per batch (line 16); "authors_plus" decides per frame (or clip).
    """
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {recipe!r}; choose from {', '.join(AUGMENTATIONS)}")
    if draw not in AUG_DRAWS:
        raise ValueError(f"unknown augmentation draw {draw!r}; choose from {', '.join(AUG_DRAWS)}")
    per_frame = recipe != "ours" if draw == "auto" else draw == "frame"
    mean, std = NORMALIZATIONS[AUGMENTATIONS[recipe]]
    if recipe == "authors":
        return GpuAugment(color_jitter=(0.4, 0.4, 0.4, 0.4), grayscale_p=0.2, flip_p=0.5, mean=mean, std=std,
                          per_frame=per_frame, aug_plus=False, grayscale_first=True)
    if recipe == "authors_plus":
        return GpuAugment(color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                          blur_sigma=(0.1, 2.0), flip_p=0.5, mean=mean, std=std, per_frame=per_frame)
    return GpuAugment(color_jitter=(jitter,) * 3 + (hue,), grayscale_p=grayscale_p, flip_p=flip_p, mean=mean,
                      std=std, per_frame=per_frame, aug_plus=aug_plus, invert_p=invert_p)
