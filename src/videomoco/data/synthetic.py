"""The synthetic motion dataset: procedurally rendered clips whose classes need time.

The class is a *motion*; the appearance is drawn from a random stream that never sees the class,
so a single frame carries (almost) no class information:

    appearance rng  -> palette / object's shape, colours, size, position; dot births; noise
    motion rng      -> speed, direction, rate ...   (its distribution depends on the class)

(In `dots`, the motion also sets how many dots are born and where, so that every motion covers the
frame with the same density.)

Three scenes:

- `dots` (default): a field of small dots with limited lifetimes (each dot lives LIFE frames, then
  reappears elsewhere), all following the class's motion: a random-dot kinematogram, the classic
  "motion without form" stimulus. Two clips of one video share no dots once they are LIFE frames
  apart, and the palette is one of a few (PALETTES), so nothing static tells one video from another:
  contrastive pretraining can only match two clips of a video by their motion. shrink and down are
  the time reversals of grow and up, so their single frames are distributed exactly alike.
- `object`: one object (box, ellipse or triangle, elongated so rotation shows) on a plain background;
  trajectories are centred on the middle frame and wrap around (a torus), so every class renders the
  same middle frame. Its shape, size, colour and position are static cues that identify a video.
- `window`: the `dots` of the same (seed, split, index), but they move (and are reborn) only during a
  window of W = max(1, round(WINDOW_FRACTION * T)) consecutive frames at a random start s in
  [1, T - W] (`motion_window`, from a third random stream that sees neither the class nor the
  appearance): frames s .. s+W-1 each differ from the frame before; every other frame repeats its
  predecessor up to the per-frame noise. Made for the question "does the generator find the frames
  that matter?" (benchmarks/generator_study.py): a video as long as the clip has its motion in a
  known quarter of it. Time reversals (shrink, down) keep the window where `motion_window` says.

Videos are written as real H.264 files in the Kinetics layout `OUT/{train,val}/<class>/<id>.mp4`
so the demo goes through the same decode/index/augment path as real data.
"""

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from videomoco.data.encode import write_video
from videomoco.flags import COUNT, CRF, POSITIVE_INT, SEED, SHARED, Number, config_from, fail

log = logging.getLogger(__name__)

# Every class is a motion; the appearance is independent of it. The set is closed under the
# horizontal flip that pretraining augmentation applies (left/right and the two rotation senses are
# one class each), so a flip never turns one class into another; up/down and grow/shrink are time
# reversals of each other, so a model that ignores frame order cannot tell them apart.
MOTIONS = (
    "up", "down", "horizontal",  # constant velocity; horizontal: left or right
    "spin",  # rotation in place, either sense
    "grow", "shrink",  # approach / retreat: the size changes exponentially, 2x over the video
)
SHAPES = ("box", "ellipse", "triangle")
SPLITS = {"train": 0, "val": 1}
HEADINGS = {"up": (270.0,), "down": (90.0,), "horizontal": (0.0, 180.0)}  # degrees, image coordinates (y down)
NOISE_STD = 6.0  # per-frame background noise (grey levels): no two frames are pixel-identical
SCENES = ("dots", "object", "window")
WINDOW_FRACTION = 0.25  # window scene: the fraction of the frames in which the dots move
LIFE = 8  # frames a dot lives before it reappears elsewhere
DOT_DENSITY = 0.065  # dots per pixel
# (background, dot) RGB: a few palettes, so colour is not an identity (each is shared by many videos)
PALETTES = (((150, 150, 150), (20, 20, 20)), ((105, 105, 105), (235, 235, 235)),
            ((140, 120, 100), (30, 60, 150)), ((100, 120, 140), (240, 220, 90)))
REVERSED = {"shrink": "grow", "down": "up"}  # dots: these classes are rendered as the time reversal of the other


@dataclass
class SynthConfig:
    out: str = "data/synthetic"
    train_per_class: int = 100
    val_per_class: int = 30
    frames: int = 24
    size: int = 32
    fps: int = 25
    seed: int = 0
    appearance_classes: bool = False  # object scene: classes become <shape>-<motion>
    scene: str = "dots"  # dots | object | window
    workers: int = 0  # 0: one per CPU core
    gop: int = 8  # short keyframe interval: cheap random access to clips
    crf: int = 10  # near-lossless: coarser H.264 leaves motion-dependent artefacts that one frame can read

    def __post_init__(self):
        """One-line `ValueError` for a config no render can use (the CLI and Python callers alike)."""
        for name, number in RANGES.items():
            number.check(getattr(self, name), "--" + name.replace("_", "-"))
        if self.scene not in SCENES:
            raise ValueError(f"--scene must be one of {', '.join(SCENES)}, got {self.scene!r}")
        if self.size % 2:
            raise ValueError(f"--size must be even (H.264 4:2:0), got {self.size}")
        if self.appearance_classes and self.scene != "object":
            raise ValueError("--appearance-classes needs --scene object")


# field -> what its flag takes; `SynthConfig` checks the same
RANGES = {"train_per_class": POSITIVE_INT, "val_per_class": COUNT, "frames": Number(int, 2), "size": Number(int, 16),
          "fps": POSITIVE_INT, "seed": SEED, "workers": COUNT, "gop": POSITIVE_INT, "crf": CRF}


def class_names(appearance_classes=False):
    """The class folder names, in label order."""
    if appearance_classes:
        return [f"{shape}-{motion}" for shape in SHAPES for motion in MOTIONS]
    return list(MOTIONS)


def draw_appearance(rng, size, frames):
    """Everything the viewer sees in one frame, plus the noise of every frame; drawn without knowing the class."""
    # a mid-grey, slightly tinted background: saturated random backgrounds put most of the input's
    # energy in a per-video constant that the encoder must first learn to ignore
    background = rng.uniform(100, 155) + rng.uniform(-12, 12, 3)
    colour = rng.uniform(0, 255, 3)
    for _ in range(50):  # keep the object visible against its background, in grayscale too
        if abs(colour.mean() - background.mean()) > 60:
            break
        colour = rng.uniform(0, 255, 3)
    half_long = rng.uniform(0.16, 0.24) * size
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": colour,
        "half": (half_long, half_long * rng.uniform(0.4, 0.6)),  # elongated, so rotation shows
        "pos": rng.uniform(0, size, 2),
        "angle": rng.uniform(0, 2 * np.pi),
        "background": background,
        "noise": rng.normal(0, NOISE_STD, (frames, size, size, 1)).astype(np.float32),
    }


def trajectory(motion, rng, frames, size):
    """Offsets `(T, 2)` in pixels, angles `(T,)` and size factors `(T,)`, all relative to frame T // 2."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    t = np.arange(frames, dtype=np.float64) - frames // 2
    offsets, angles, scales = np.zeros((frames, 2)), np.zeros(frames), np.ones(frames)
    if motion in HEADINGS:
        heading = np.deg2rad(rng.choice(HEADINGS[motion]) + rng.uniform(-15, 15))
        speed = rng.uniform(0.8, 1.2) * size / 32  # pixels per frame
        offsets = speed * t[:, None] * np.array([np.cos(heading), np.sin(heading)])
    elif motion == "spin":
        angles = rng.choice([-1, 1]) * np.deg2rad(rng.uniform(10, 15)) * t
    else:  # grow / shrink: exponential, so every step looks alike
        rate = np.log(rng.uniform(1.8, 2.2)) / max(frames - 1, 1)
        scales = np.exp((rate if motion == "grow" else -rate) * t)
    return offsets, angles, scales


def _coverage(shape, half, centre, angle, size):
    """Anti-aliased coverage `(N, H, W)` of a shape of half-lengths `half (2, N)` at `centre (N, 2)`,
    `angle (N,)`, wrapping around the frame."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    centre, angle = centre.astype(np.float32), np.asarray(angle, dtype=np.float32)
    dx = (coords[None, None, :] - centre[:, 0, None, None] + size / 2) % size - size / 2  # (N, 1, W)
    dy = (coords[None, :, None] - centre[:, 1, None, None] + size / 2) % size - size / 2  # (N, H, 1)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # (N, H, W) object coordinates
    a, b = (np.asarray(h, dtype=np.float32).reshape(-1, 1, 1) for h in half)
    if shape == "box":
        dist = np.maximum(np.abs(u) - a, np.abs(v) - b)
    elif shape == "ellipse":
        dist = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b
    elif shape == "triangle":  # apex at (a, 0), base at u = -a
        dist = np.maximum(-a - u, (b * (u - a) + 2 * a * np.abs(v)) / np.hypot(b, 2 * a))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - dist, 0.0, 1.0, out=dist)


def render(appearance, offsets, angles, scales, size):
    """Frames `(T, H, W, 3)` uint8 for one appearance and one trajectory."""
    centre = appearance["pos"][None] + offsets  # (T, 2)
    half = [h * scales for h in appearance["half"]]
    alpha = _coverage(appearance["shape"], half, centre, appearance["angle"] + angles, size)[..., None]
    background = appearance["background"].astype(np.float32) + appearance["noise"][: len(offsets)]
    frames = background + alpha * (appearance["colour"].astype(np.float32) - background)  # (T, H, W, 3)
    return (np.clip(frames, 0, 255) + 0.5).astype(np.uint8)


def dot_flow(motion, rng, size):
    """The class's flow and where its dots are born: `(flow, low, high, wrap, visible)`.

    `flow(p (N, 2), dt (N,)) -> (N, 2)` is where a dot born at p is dt frames later (about 1 px per
    frame at 32 px, at the typical radius for spin / grow). Births are uniform in the square
    [low, high)^2, chosen so that at every age the dots are uniform over the frame: translations wrap
    around the frame (a torus), a rotation is fed from the square around the disc that holds the frame,
    an expansion from the frame itself (its density then falls with age). `visible` is the expected
    fraction of the dots born in the square that are in the frame, over a dot's life. Wrapping a
    rotation or an expansion instead would fold the dots into a pattern that a single frame shows.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    centre = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
    if motion in HEADINGS:
        heading = np.deg2rad(rng.choice(HEADINGS[motion]) + rng.uniform(-15, 15))
        velocity = rng.uniform(0.8, 1.2) * size / 32 * np.array([np.cos(heading), np.sin(heading)])
        return (lambda p, dt: p + dt[:, None] * velocity), 0.0, float(size), True, 1.0
    if motion == "spin":
        omega = rng.choice([-1, 1]) * np.deg2rad(rng.uniform(6, 9))

        def rotate(p, dt):
            d, a = p - centre, omega * dt
            return centre + np.stack([np.cos(a) * d[:, 0] - np.sin(a) * d[:, 1],
                                      np.sin(a) * d[:, 0] + np.cos(a) * d[:, 1]], axis=1)
        half = np.abs(np.array([0.0, size])[:, None] - centre[None]).max() * np.sqrt(2)  # the disc holding the frame
        return rotate, centre - half, centre + half, False, size * size / (2 * half) ** 2
    rate = rng.uniform(0.07, 0.1) * (1 if motion == "grow" else -1)  # per frame: about 2x over a dot's life
    visible = min(1.0, float(np.mean(np.exp(-2 * rate * np.arange(LIFE)))))  # the frame's image grows as e^(rate t)
    return (lambda p, dt: centre + (p - centre) * np.exp(rate * dt)[:, None]), 0.0, float(size), False, visible


def render_dots(motion, appearance_rng, motion_rng, frames, size, times=None):
    """Frames `(T, H, W, 3)` uint8 of a random-dot kinematogram: every dot follows `motion` for LIFE
    frames (staggered phases), then reappears at a fresh random place; about DOT_DENSITY dots per pixel
    of the frame whatever the motion. `times` (T,) ints in [0, T): the time of the dots' world that
    frame t shows (default t; the window scene holds it still outside its window); the noise is per frame."""
    background, colour = (np.array(c, dtype=np.float32) for c in PALETTES[appearance_rng.integers(len(PALETTES))])
    flow, low, high, wrap, visible = dot_flow(motion, motion_rng, size)
    n = int(round(DOT_DENSITY * size * size / visible))  # about DOT_DENSITY dots per pixel in the frame
    phase = appearance_rng.integers(0, LIFE, n)
    births = low + (np.asarray(high) - np.asarray(low)) * appearance_rng.random((frames // LIFE + 2, n, 2))
    noise = appearance_rng.normal(0, NOISE_STD, (frames, size, size, 1)).astype(np.float32)
    coords = np.arange(size, dtype=np.float32) + 0.5
    radius = size / 32
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    times = np.arange(frames) if times is None else np.asarray(times, dtype=np.int64)
    for t in range(frames):
        age = times[t] + phase
        pos = flow(births[age // LIFE, np.arange(n)], (age % LIFE).astype(np.float64))
        pos = pos[np.all((pos > -radius - 1) & (pos < size + radius + 1), axis=1) | wrap].astype(np.float32)
        dx, dy = coords[None, :] - pos[:, :1], coords[None, :] - pos[:, 1:]  # (n, W), (n, H)
        if wrap:
            dx, dy = (dx + size / 2) % size - size / 2, (dy + size / 2) % size - size / 2
        dist = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)  # (n, H, W)
        alpha = np.clip(radius + 0.5 - dist, 0.0, 1.0).max(axis=0, initial=0.0)[..., None]  # anti-aliased discs
        frame = background + noise[t] + alpha * (colour - background - noise[t])
        out[t] = np.clip(frame, 0, 255) + 0.5
    return out


def _streams(seed, split, index):
    """The random streams of one video: appearance, motion and (window scene) the window's start."""
    return np.random.SeedSequence([seed, SPLITS[split], index]).spawn(3)  # the first two as spawn(2) gives


def motion_window(seed, split, index, frames):
    """Window scene: `(start, length)` of the frames that differ from their predecessor by more than the
    noise, start in [1, frames - length], length = max(1, round(WINDOW_FRACTION * frames)); the same for
    every class and palette of video `index`."""
    if frames < 2:
        raise ValueError(f"the window scene needs at least 2 frames, got {frames}")
    length = min(max(1, round(WINDOW_FRACTION * frames)), frames - 1)
    start = int(np.random.default_rng(_streams(seed, split, index)[2]).integers(1, frames - length + 1))
    return start, length


def window_times(start, length, frames):
    """The dots' time shown by each frame `(T,)`: still (0) before `start`, one step a frame inside the
    window, still (`length`) after it."""
    return np.clip(np.arange(frames) - start + 1, 0, length)


def make_video(label, seed, split, index, frames=24, size=32, appearance_classes=False, scene="dots"):
    """Frames `(T, H, W, 3)` uint8 of video `index` of `split` with class `label` (a class name)."""
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; expected one of {', '.join(SCENES)}")
    streams = _streams(seed, split, index)[:2]
    if scene in ("dots", "window"):
        if appearance_classes:
            raise ValueError("appearance classes need the object scene (--scene object)")
        rngs = [np.random.default_rng(s) for s in streams]
        times = None
        if scene == "window":
            start, length = motion_window(seed, split, index, frames)
            if label in REVERSED:  # rendered forwards, then reversed: where the window must start forwards
                start = frames - length + 1 - start
            times = window_times(start, length, frames)
        if label in REVERSED:
            return np.ascontiguousarray(render_dots(REVERSED[label], *rngs, frames, size, times)[::-1])
        return render_dots(label, *rngs, frames, size, times)
    appearance = draw_appearance(np.random.default_rng(streams[0]), size, frames)
    motion = label
    if appearance_classes:
        appearance["shape"], motion = label.split("-", 1)
    return render(appearance, *trajectory(motion, np.random.default_rng(streams[1]), frames, size), size)


def window_clips(seed, split, count, frames=8, size=32):
    """`count` window-scene videos as long as a clip, in memory: frames `(N, T, H, W, 3)` uint8, labels `(N,)`
    (indices into MOTIONS, class i % 6 for video i) and windows `(N, T)` bool (the frames that move)."""
    clips, windows = [], np.zeros((count, frames), bool)
    for i in range(count):
        clips.append(make_video(MOTIONS[i % len(MOTIONS)], seed, split, i, frames, size, scene="window"))
        start, length = motion_window(seed, split, i, frames)
        windows[i, start:start + length] = True
    return np.stack(clips), np.arange(count) % len(MOTIONS), windows


def _write_one(job):
    path, label, cfg, split, index = job
    frames = make_video(label, cfg.seed, split, index, cfg.frames, cfg.size, cfg.appearance_classes, cfg.scene)
    write_video(path, frames, fps=cfg.fps, codec="h264", gop=cfg.gop, crf=cfg.crf)
    return path


def run(cfg):
    """Render the whole dataset under `cfg.out`; reuse it when `synth.json` matches. Returns paths and counts."""
    out = Path(cfg.out)
    names = class_names(cfg.appearance_classes)
    meta = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}, "classes": names}
    meta_path = out / "synth.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        log.info("reusing the synthetic dataset at %s", out)
        return {"root": str(out), "classes": names, "reused": True, "seconds": 0.0}
    start = time.perf_counter()
    jobs = []
    for split, per_class in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        for index in range(per_class * len(names)):
            label = names[index % len(names)]  # interleaved, so any prefix of the set is balanced
            path = out / split / label / f"{index:05d}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((path, label, cfg, split, index))
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        list(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=8))
    meta_path.write_text(json.dumps(meta, indent=1))
    seconds = time.perf_counter() - start
    log.info("wrote %d videos (%d classes) to %s in %.1f s", len(jobs), len(names), out, seconds)
    return {"root": str(out), "classes": names, "reused": False, "seconds": seconds, "videos": len(jobs)}


def add_arguments(parser):
    d = SynthConfig()
    parser.add_argument("out", help="output root; videos go to OUT/{train,val}/<class>/<id>.mp4")
    parser.add_argument("--train-per-class", type=RANGES["train_per_class"], default=d.train_per_class)
    parser.add_argument("--val-per-class", type=RANGES["val_per_class"], default=d.val_per_class)
    parser.add_argument(*SHARED["frames"], type=RANGES["frames"], default=d.frames)
    parser.add_argument("--size", type=RANGES["size"], default=d.size, help="frame side in pixels (even)")
    parser.add_argument("--fps", type=RANGES["fps"], default=d.fps)
    parser.add_argument(*SHARED["seed"], type=RANGES["seed"], default=d.seed)
    parser.add_argument("--scene", choices=SCENES, default=d.scene,
                        help="dots: random-dot motion, nothing static tells videos apart; object: one moving object; "
                        "window: the dots move only in a random quarter of the frames")
    parser.add_argument("--appearance-classes", action="store_true",
                        help="object scene: classes are <shape>-<motion>, so both appearance and motion are needed")
    parser.add_argument(*SHARED["workers"], type=RANGES["workers"], default=d.workers, help="processes (0: one per core)")
    parser.add_argument("--gop", type=RANGES["gop"], default=d.gop, help="keyframe interval")
    parser.add_argument("--crf", type=RANGES["crf"], default=d.crf, help="H.264 quality, 0-51 (lower is better)")


def main(args):
    try:
        cfg = config_from(SynthConfig, args)
    except ValueError as e:
        return fail("synth", e)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        return fail("synth", f"OUT {cfg.out} is a file, not a directory")
    result = run(cfg)
    print(f"{result['root']}: {len(result['classes'])} classes, {'reused' if result['reused'] else 'written'}"
          f" in {result['seconds']:.1f} s")
    return 0
