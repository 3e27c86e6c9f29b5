"""Crops (CPU) and the batched colour augmentation (device): shapes, dtypes, per-clip parameters."""

import numpy as np
import pytest
import torch

from videomoco.data import augment
from videomoco.data.augment import GpuAugment, normalize


def static_clips(b=4, t=4, size=32, seed=0):
    """`(B, 3, T, H, W)` uint8 clips whose T frames are identical copies of one random image."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, 1, size, size), dtype=torch.uint8, generator=g)
    return image.expand(-1, -1, t, -1, -1).contiguous()


@pytest.mark.parametrize("h,w", [(128, 171), (240, 320), (64, 40), (10, 200)])
def test_random_resized_crop_box_fits_and_respects_scale(h, w):
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, ch, cw = augment.random_resized_crop_box(h, w, (0.2, 1.0), rng=rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_random_resized_crop_box_is_reproducible_and_varies():
    boxes = [augment.random_resized_crop_box(128, 171, rng=np.random.default_rng(s)) for s in (1, 1, 2)]
    assert boxes[0] == boxes[1] and boxes[0] != boxes[2]
    areas = [augment.random_resized_crop_box(128, 171, (0.2, 0.3), rng=np.random.default_rng(s)) for s in range(20)]
    assert all(0.15 * 128 * 171 <= ch * cw <= 0.35 * 128 * 171 for _, _, ch, cw in areas)


def test_crop_and_resize_uses_one_box_for_every_frame():
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    frames[3] = frames[1]
    out = augment.crop_and_resize(frames, (4, 8, 40, 40), 20)
    assert out.shape == (3, 5, 20, 20) and out.dtype == torch.uint8
    assert torch.equal(out[:, 1], out[:, 3]) and not torch.equal(out[:, 0], out[:, 1])
    # without resizing it is an exact crop, channels first
    exact = augment.crop_and_resize(frames, (4, 8, 20, 20), 20)
    assert torch.equal(exact, torch.from_numpy(frames[:, 4:24, 8:28]).permute(3, 0, 1, 2))


@pytest.mark.parametrize("h,w", [(48, 64), (64, 48)])
def test_center_and_three_crops_run_along_the_long_side(h, w):
    ramp = np.linspace(0, 255, max(h, w)).astype(np.uint8)  # brightness grows along the long side
    ramp = ramp[:, None] if h > w else ramp[None, :]
    frames = np.broadcast_to(ramp[None, :, :, None], (2, h, w, 3)).copy()
    crops = augment.three_crops(frames, 16)
    assert len(crops) == 3 and all(c.shape == (3, 2, 16, 16) for c in crops)
    means = [c.float().mean().item() for c in crops]
    assert means[0] < means[1] < means[2]  # start, centre, end along the ramp
    assert torch.equal(augment.center_crop(frames, 16), crops[1])
    with pytest.raises(ValueError, match="num_crops"):
        augment.square_boxes(h, w, num_crops=2)


def test_normalize_uses_kinetics_statistics():
    clips = torch.full((2, 3, 2, 4, 4), 255, dtype=torch.uint8)
    out = normalize(clips)
    assert out.dtype == torch.float32 and out.shape == clips.shape
    expected = (1 - torch.tensor(augment.KINETICS_MEAN)) / torch.tensor(augment.KINETICS_STD)
    assert torch.allclose(out[0, :, 0, 0, 0], expected)
    assert torch.allclose(normalize(clips.float() / 255), out)  # float input in [0, 1] is accepted
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        normalize(torch.zeros(3, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        normalize(torch.zeros(1, 3, 2, 4, 4, dtype=torch.int32))


def test_gpu_augment_output_shape_dtype_device():
    clips = static_clips()
    out = GpuAugment()(clips)
    assert out.shape == clips.shape and out.dtype == torch.float32 and out.device == clips.device
    assert torch.isfinite(out).all()


def test_identity_settings_reduce_to_normalize():
    aug = GpuAugment(color_jitter=(0, 0, 0, 0), grayscale_p=0, blur_p=0, flip_p=0)
    clips = static_clips()
    assert torch.allclose(aug(clips), normalize(clips), atol=1e-6)


def test_invert_gives_the_negative_and_draws_nothing_when_off():
    clips = static_clips(b=8)
    off = dict(color_jitter=(0, 0, 0, 0), grayscale_p=0, blur_p=0)
    assert torch.allclose(GpuAugment(**off, flip_p=0, invert_p=1.0)(clips), normalize(255 - clips), atol=1e-5)
    half = GpuAugment(**off, flip_p=0, invert_p=0.5)(clips, generator=torch.Generator().manual_seed(0))
    negative = torch.tensor([torch.allclose(h, n, atol=1e-5) for h, n in zip(half, normalize(255 - clips))])
    assert 0 < negative.sum() < len(clips)  # a draw per clip
    # invert_p=0 leaves the other draws as they were: the same flips as an augmentation without the argument
    flips = [GpuAugment(**off, **kw)(clips, generator=torch.Generator().manual_seed(1)) for kw in ({}, {"invert_p": 0})]
    assert torch.equal(*flips)


@pytest.mark.parametrize("aug_plus", [True, False])
def test_frames_of_a_clip_share_parameters(aug_plus):
    """Identical input frames stay identical; the clips (and two calls, i.e. two views) differ."""
    clips = static_clips(b=6)
    aug = GpuAugment(aug_plus=aug_plus)
    g = torch.Generator().manual_seed(0)
    out = aug(clips, generator=g)
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-5)
    base = normalize(clips)
    change = (out - base).abs().mean(dim=(1, 2, 3, 4))  # (B,)
    assert change.std() > 0  # clips got different parameters
    again = aug(clips, generator=g)
    assert not torch.allclose(out, again)  # a second view is augmented differently


def test_jitter_ratio_to_original_is_constant_over_frames():
    # brightness only: every frame is multiplied by the same per-clip factor
    aug = GpuAugment(color_jitter=(0.4, 0, 0, 0), jitter_p=1.0, grayscale_p=0, blur_p=0, flip_p=0,
                     mean=(0, 0, 0), std=(1, 1, 1))
    clips = static_clips(b=3, t=5).clamp(10, 180)  # away from the clamp at 1.0
    ratio = aug(clips).mean(dim=(1, 3, 4)) / (clips.float() / 255).mean(dim=(1, 3, 4))  # (B, T)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    assert ((ratio - 1).abs() > 1e-3).any() and (ratio[:, 0].std() > 0)


def test_per_frame_draws_break_temporal_consistency():
    clips = static_clips(b=2, t=8)
    out = GpuAugment(per_frame=True)(clips, generator=torch.Generator().manual_seed(0))
    frame_diff = (out - out[:, :, :1]).abs().amax(dim=(0, 1, 3, 4))  # (T,)
    assert (frame_diff[1:] > 1e-3).any()


def test_generator_makes_it_reproducible():
    clips = static_clips()
    aug = GpuAugment()
    a = aug(clips, generator=torch.Generator().manual_seed(3))
    b = aug(clips, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.cuda
def test_gpu_augment_runs_on_cuda():
    clips = static_clips().cuda()
    out = GpuAugment().cuda()(clips)
    assert out.is_cuda and torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-5)


@pytest.mark.parametrize("n, c, h, w, k", [(4, 3, 16, 24, 3), (3, 3, 32, 32, 5), (2, 1, 20, 12, 7)])
def test_gaussian_blur_matches_kornia(n, c, h, w, k):
    import kornia

    torch.manual_seed(0)
    x = torch.rand(n, c, h, w)
    sigma = torch.rand(n) * 1.9 + 0.1  # GpuAugment's (0.1, 2.0)
    expected = kornia.filters.gaussian_blur2d(x, k, sigma[:, None].expand(-1, 2))
    torch.testing.assert_close(augment.gaussian_blur(x, k, sigma), expected, rtol=1e-5, atol=1e-6)


class HostReads:
    """Counts the Python-level reads of tensor values (each a host sync when the tensor is on a GPU)."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, _name=name, **kwargs):
                self.reads.append((_name, t.device.type, t.dtype))
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_gpu_augment_and_normalize_read_no_tensor_values(monkeypatch):
    """The CPU stand-in for a sync check: no bool()/item() on the clips' device (kornia's blur had two).

    The one read left is the jitter order, `randperm(4).tolist()` of a CPU generator (no device sync)."""
    clips = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    aug = GpuAugment(blur_p=1.0)
    normalize(clips)  # build the cached statistics
    host = HostReads(monkeypatch)
    aug(clips)
    normalize(clips)
    assert host.reads == [("tolist", "cpu", torch.int64)]


def test_normalize_builds_its_statistics_once_per_device():
    clips = torch.randint(0, 256, (1, 3, 2, 4, 4), dtype=torch.uint8)
    normalize(clips)
    before = augment._channel_stats.cache_info()
    out = normalize(clips)
    after = augment._channel_stats.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 2
    mean = torch.tensor(augment.KINETICS_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(augment.KINETICS_STD).view(1, 3, 1, 1, 1)
    assert torch.equal(out, (clips.float() / 255 - mean) / std)


def test_blur_sigma_is_checked_at_construction():
    with pytest.raises(ValueError, match="blur_sigma"):
        GpuAugment(blur_sigma=(0.0, 2.0))
    GpuAugment(blur_sigma=(0.0, 2.0), aug_plus=False)  # no blur: not checked


def test_authors_recipes_have_their_loaders_numbers():
    """tinapan-pt/VideoMoCo 42e069a moco/loader.py: MoCoAugment lines 25-33 (ImageNet mean/std, RandomGrayscale
    p=0.2, then ColorJitter(0.4, 0.4, 0.4, 0.4) with kornia's p=1, RandomHorizontalFlip p=0.5); MoCoAugmentV2
    lines 51-62 (ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, GaussianBlur [0.1, 2] p=0.5, flip);
    lines 39-41 view the batch as B*T images: per-frame draws."""
    theirs = augment.build_augment("authors")
    assert (theirs.brightness, theirs.contrast, theirs.saturation, theirs.hue) == (0.4, 0.4, 0.4, 0.4)
    assert (theirs.jitter_p, theirs.grayscale_p, theirs.blur_p, theirs.flip_p) == (1.0, 0.2, 0.0, 0.5)
    assert theirs.grayscale_first and theirs.per_frame
    plus = augment.build_augment("authors_plus")
    assert (plus.brightness, plus.contrast, plus.saturation, plus.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (plus.jitter_p, plus.grayscale_p, plus.blur_p, plus.blur_sigma, plus.flip_p) == (0.8, 0.2, 0.5, (0.1, 2.0), 0.5)
    assert not plus.grayscale_first and plus.per_frame
    for aug in (theirs, plus):
        torch.testing.assert_close(aug.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
        torch.testing.assert_close(aug.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    ours = augment.build_augment("ours")
    assert (ours.hue, ours.jitter_p, ours.blur_p, ours.grayscale_first, ours.per_frame) == (0.1, 1.0, 0.0, False, False)
    torch.testing.assert_close(ours.mean.flatten(), torch.tensor(augment.KINETICS_MEAN))
    assert not augment.build_augment("authors", draw="clip").per_frame and augment.build_augment("ours", "frame").per_frame
    assert augment.AUGMENTATIONS == {"ours": "kinetics", "authors": "imagenet", "authors_plus": "imagenet"}
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.build_augment("simclr")


def test_authors_grayscale_comes_before_the_jitter():
    """With grayscale always on, their recipe is the jitter of the gray clip (same draws); jittering first and
    graying after (ours, MoCo v2's order) gives another clip."""
    clips = static_clips(b=3, t=2)
    kw = dict(color_jitter=(0.4, 0.4, 0.4, 0.4), flip_p=0, mean=(0, 0, 0), std=(1, 1, 1), aug_plus=False)
    seed = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    gray_first = GpuAugment(grayscale_p=1.0, grayscale_first=True, **kw)(clips, seed())
    frames = (clips.float() / 255).transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W)
    gray = augment.kornia.color.rgb_to_grayscale(frames).view(3, 2, 1, 32, 32).transpose(1, 2)  # (B, 1, T, H, W)
    jitter_of_gray = GpuAugment(grayscale_p=0.0, grayscale_first=True, **kw)(gray.expand(-1, 3, -1, -1, -1), seed())
    torch.testing.assert_close(gray_first, jitter_of_gray, atol=1e-6, rtol=0)
    gray_after = GpuAugment(grayscale_p=1.0, grayscale_first=False, **kw)(clips, seed())
    assert (gray_after - gray_first).abs().max() > 1e-2
    described = augment.build_augment("authors").describe()
    assert described.index("grayscale p 0.2") < described.index("colour jitter 0.4/0.4/0.4 hue 0.4 (p 1)")
    assert described.endswith("drawn per frame")


def test_authors_recipe_draws_per_frame_and_ours_per_clip():
    clips = static_clips(b=2, t=8)
    for recipe, draw, per_frame in (("authors", "auto", True), ("ours", "auto", False), ("authors", "clip", False)):
        out = augment.build_augment(recipe, draw)(clips, generator=torch.Generator().manual_seed(0))
        frame_diff = (out - out[:, :, :1]).abs().amax()
        assert (frame_diff > 1e-3) == per_frame, (recipe, draw)
