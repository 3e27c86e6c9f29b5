import av
import numpy as np
import pytest

from videomoco.cli import main as cli_main
from videomoco.data import synthetic
from videomoco.data.synthetic import MOTIONS, SynthConfig, class_names, make_video, run


def test_same_seed_gives_identical_frames_and_other_seeds_differ():
    a = make_video("spin", seed=3, split="train", index=7, frames=8, size=32)
    b = make_video("spin", seed=3, split="train", index=7, frames=8, size=32)
    c = make_video("spin", seed=4, split="train", index=7, frames=8, size=32)
    assert a.dtype == np.uint8 and a.shape == (8, 32, 32, 3)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_appearance_draw_ignores_the_class():
    # the appearance stream never sees the class: every motion passes through the same frame T // 2
    clips = [make_video(m, seed=0, split="train", index=5, frames=7, size=32, scene="object") for m in MOTIONS]
    for clip in clips[1:]:
        assert np.array_equal(clip[3], clips[0][3])
    assert len({c.tobytes() for c in clips}) == len(MOTIONS)  # but the motions differ around it


def test_motion_classes_move_as_named():
    for motion in MOTIONS:  # every class moves something between consecutive frames
        frames = make_video(motion, seed=1, split="train", index=0, frames=4, size=64, scene="object")
        assert not np.array_equal(frames[1], frames[0]), motion
    rng = np.random.default_rng
    up, _, _ = synthetic.trajectory("up", rng(0), 10, 64)
    assert up[-1, 1] - up[0, 1] < -5 and abs(up[-1, 0] - up[0, 0]) < abs(up[-1, 1] - up[0, 1])  # y points down
    down, _, _ = synthetic.trajectory("down", rng(0), 10, 64)
    assert down[-1, 1] - down[0, 1] > 5
    side, _, _ = synthetic.trajectory("horizontal", rng(0), 10, 64)
    assert abs(side[-1, 0] - side[0, 0]) > abs(side[-1, 1] - side[0, 1])
    spin_offsets, spin, spin_scales = synthetic.trajectory("spin", rng(0), 10, 64)
    assert np.all(spin_offsets == 0) and np.all(spin_scales == 1) and abs(spin[-1] - spin[0]) > np.deg2rad(40)
    for motion, sign in (("grow", 1), ("shrink", -1)):
        offsets, angles, scales = synthetic.trajectory(motion, rng(0), 10, 64)
        assert np.all(offsets == 0) and np.all(angles == 0)
        assert np.all(sign * np.diff(scales) > 0) and 1.7 < (scales[-1] / scales[0]) ** sign < 2.3


def test_background_is_plain_so_only_the_object_identifies_a_video():
    # no texture or distractors: away from the object, a frame is one colour plus mild noise
    frames = make_video("spin", seed=0, split="train", index=2, frames=4, size=32, scene="object").astype(float)
    background = np.median(frames.reshape(-1, 3), axis=0)
    far = np.abs(frames - background).sum(-1) < 60  # (T, H, W): pixels that are not the object
    assert far.mean() > 0.6
    assert frames[far].std(0).max() < 2 * synthetic.NOISE_STD
    assert not np.array_equal(frames[0][far[0] & far[1]], frames[1][far[0] & far[1]])  # fresh noise per frame


@pytest.mark.parametrize("scene", synthetic.SCENES)
def test_a_frame_statistic_does_not_separate_classes(scene):
    # per-video mean colour of a frame, averaged within each class: class means lie within
    # sampling noise of each other, whichever frame is taken (positions wrap around the frame)
    n = 24
    for t in (0, 7):
        stats = np.array([[make_video(m, 0, "train", i, frames=8, size=32, scene=scene)[t].mean((0, 1))
                           for i in range(n)]
                          for m in ("up", "down", "spin")])  # (classes, videos, 3)
        spread = stats.std(1).mean() / np.sqrt(n)
        class_means = stats.mean(1)
        assert np.abs(class_means - class_means.mean(0)).max() < 4 * spread


def test_appearance_classes_fix_the_shape():
    names = class_names(appearance_classes=True)
    assert len(names) == len(synthetic.SHAPES) * len(MOTIONS)
    assert names[0] == f"{synthetic.SHAPES[0]}-{MOTIONS[0]}"
    a = make_video(f"box-{MOTIONS[0]}", 0, "train", 0, frames=4, size=32, appearance_classes=True, scene="object")
    b = make_video(f"ellipse-{MOTIONS[0]}", 0, "train", 0, frames=4, size=32, appearance_classes=True, scene="object")
    assert not np.array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="object scene"):
        make_video(f"box-{MOTIONS[0]}", 0, "train", 0, frames=4, size=32, appearance_classes=True)


def test_dots_reversed_classes_are_time_reversals_of_their_partners():
    # so a single frame of shrink / down is distributed exactly like one of grow / up
    for motion, partner in synthetic.REVERSED.items():
        a = make_video(motion, 0, "train", 3, frames=10, size=32)
        b = make_video(partner, 0, "train", 3, frames=10, size=32)
        assert np.array_equal(a, b[::-1])


def test_dots_palette_is_one_of_a_few_and_ignores_the_class():
    palette = np.array([bg for bg, _ in synthetic.PALETTES], dtype=float)
    used = set()
    for index in range(12):
        medians = [np.median(make_video(m, 0, "train", index, frames=2, size=32).reshape(-1, 3), axis=0)
                   for m in MOTIONS]  # the background colour, give or take the noise
        distance = np.abs(palette[None] - np.array(medians)[:, None]).max(-1)  # (classes, palettes)
        assert distance.min(1).max() <= 8  # the palettes are 40+ grey levels apart
        nearest = set(distance.argmin(1))
        assert len(nearest) == 1  # every class of video `index` has the same palette
        used |= nearest
    assert len(used) > 1


def _global_shift(frames):
    """The (dy, dx) in [-2, 2] that best maps each frame onto the next (cross-correlation)."""
    v = frames.astype(float).mean(-1)
    v -= v.mean()
    scores = {(dy, dx): sum(np.sum(np.roll(v[t], (dy, dx), (0, 1)) * v[t + 1]) for t in range(len(v) - 1))
              for dy in range(-2, 3) for dx in range(-2, 3)}
    return max(scores, key=scores.get)


def test_dots_move_as_named():
    assert _global_shift(make_video("up", 0, "train", 0, frames=12, size=32)) == (-1, 0)  # image y points down
    assert _global_shift(make_video("down", 0, "train", 0, frames=12, size=32)) == (1, 0)
    assert _global_shift(make_video("horizontal", 0, "train", 0, frames=12, size=32)) in ((0, 1), (0, -1))
    # spin keeps each dot's distance to the centre, grow / shrink scale it up / down; the centre is the
    # first draw of the motion stream, so a long contraction with the same stream finds it
    rng = np.random.default_rng
    p, dt = rng(0).uniform(8, 24, (50, 2)), np.full(50, 4.0)
    centre = synthetic.dot_flow("shrink", rng(1), 32)[0](p[:1], np.full(1, 1e4))[0]
    for motion, ratio in (("spin", (0.999, 1.001)), ("grow", (1.2, 2.0)), ("shrink", (0.5, 0.8))):
        moved = synthetic.dot_flow(motion, rng(1), 32)[0](p, dt)
        r = np.linalg.norm(moved - centre, axis=1) / np.linalg.norm(p - centre, axis=1)
        assert np.all((ratio[0] < r) & (r < ratio[1])) and not np.allclose(moved, p), motion


def test_unknown_motion_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown motion"):
        synthetic.trajectory("sideways", np.random.default_rng(0), 4, 32)
    with pytest.raises(ValueError, match="unknown motion"):
        make_video("sideways", 0, "train", 0, frames=4, size=32)
    with pytest.raises(ValueError, match="unknown scene"):
        make_video("up", 0, "train", 0, frames=4, size=32, scene="sky")


def test_run_writes_kinetics_layout_of_decodable_videos(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "synth"), train_per_class=2, val_per_class=1, frames=6, size=32, workers=1)
    result = run(cfg)
    root = tmp_path / "synth"
    assert result["classes"] == list(MOTIONS) and not result["reused"]
    for split, per_class in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(MOTIONS)
        for motion in MOTIONS:
            assert len(list((root / split / motion).glob("*.mp4"))) == per_class
    path = next((root / "val" / "spin").glob("*.mp4"))
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (32, 32, 3)
    # lossy (4:2:0 chroma blurs one-pixel dots), but the luma is close to the rendered frames
    index = int(path.stem)
    rendered = make_video("spin", cfg.seed, "val", index, cfg.frames, cfg.size)
    assert np.abs(np.stack(decoded).astype(float).mean(-1) - rendered.mean(-1)).mean() < 8
    assert run(cfg)["reused"]


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli_main(["synth", str(out), "--train-per-class", "1", "--val-per-class", "1",
                     "--frames", "4", "--size", "32", "--workers", "2"]) == 0
    assert len(list(out.glob("*/*/*.mp4"))) == 2 * len(MOTIONS)
    assert f"{len(MOTIONS)} classes" in capsys.readouterr().out
    capsys.readouterr()
    assert cli_main(["synth", str(out), "--size", "33"]) == 2  # regression: exited 1 without the error prefix
    assert capsys.readouterr().err == "videomoco synth: error: --size must be even (H.264 4:2:0), got 33\n"


def test_dots_cover_the_frame_evenly_whatever_the_motion():
    # wrapping a rotation or an expansion around the frame would fold the dots into a pattern that
    # one frame shows; every class must cover every part of the frame alike, with the same density
    coverage = {}
    for motion in ("horizontal", "spin", "grow"):
        frames = np.stack([make_video(motion, 0, "train", i, frames=8, size=32) for i in range(24)]).astype(float)
        background = np.median(frames, axis=(2, 3), keepdims=True)
        dots = (np.abs(frames - background).sum(-1) > 90).mean((0, 1))  # (H, W) fraction of frames with a dot
        blocks = dots.reshape(4, 8, 4, 8).mean((1, 3))  # 4x4 blocks of 8x8 pixels
        assert blocks.std() / blocks.mean() < 0.15, (motion, blocks.round(3))
        coverage[motion] = dots.mean()
    assert max(coverage.values()) / min(coverage.values()) < 1.15, coverage


def _changed_pixels(frames):
    """(T,) pixels of frame t that differ from frame t-1 by more than 10 noise std (0 for frame 0)."""
    diff = np.abs(np.diff(frames.astype(float), axis=0)).max(-1)  # (T-1, H, W)
    return np.r_[0, (diff > 10 * synthetic.NOISE_STD).sum((1, 2))]


@pytest.mark.parametrize("frames", [8, 16])
def test_window_scene_moves_only_inside_its_window(frames):
    starts = set()
    for index in range(8):
        start, length = synthetic.motion_window(0, "val", index, frames)
        assert length == round(synthetic.WINDOW_FRACTION * frames) and 1 <= start <= frames - length
        starts.add(start)
        inside = np.zeros(frames, bool)
        inside[start:start + length] = True
        for motion in MOTIONS:  # the reversed classes keep the window where motion_window says
            video = make_video(motion, 0, "val", index, frames=frames, size=32, scene="window")
            changed = _changed_pixels(video)
            assert changed[inside].min() > 50 and changed[~inside].max() == 0, (motion, index, changed)
            still = next(t for t in range(1, frames) if not inside[t])
            assert not np.array_equal(video[still], video[still - 1])  # a still frame has fresh noise
        assert make_video("up", 0, "val", index, frames, 32, scene="window").tobytes() == \
            make_video("up", 0, "val", index, frames, 32, scene="window").tobytes()
    assert len(starts) > 2  # the window moves from video to video


def test_window_scene_is_the_dots_scene_held_still():
    # the same dots and noise as `dots`: frame 0 is identical, and the last frame of the window shows the
    # dots' world `length` steps on, as frame `length` of the dots video does, up to that frame's noise
    start, length = synthetic.motion_window(0, "train", 4, 8)
    dots = make_video("up", 0, "train", 4, frames=8, size=32, scene="dots")
    window = make_video("up", 0, "train", 4, frames=8, size=32, scene="window")
    assert np.array_equal(dots[0], window[0])
    assert np.array_equal(synthetic.window_times(start, length, 8), np.clip(np.arange(8) - start + 1, 0, length))
    assert _global_shift(window[start - 1:start + length]) == (-1, 0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        synthetic.motion_window(0, "train", 0, 1)
