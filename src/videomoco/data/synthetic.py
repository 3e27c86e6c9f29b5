"""The synthetic motion dataset: procedurally rendered clips whose classes need time.

Each video shows one moving object over a textured background with static distractors.
The class is the object's *motion*; its appearance (shape, colour, size, orientation,
start position, background, distractors) is drawn from a random stream that never sees
the class, so a single frame carries no class information:

    appearance rng  -> shape, colours, size, start position/angle, background, distractors
    motion rng      -> speed, direction, radius ...   (its distribution depends on the class)

Positions wrap around the frame (a torus), so at every frame the object's position is
uniform whatever the motion; with the same seed, every class renders the same first frame.
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

log = logging.getLogger(__name__)

# Every class is a motion; the appearance is independent of it. The set is closed under the
# horizontal flip that pretraining augmentation applies (left/right and the two rotation senses are
# one class each), so a flip never turns one class into another; up/down and accelerate/decelerate
# are time reversals of each other, so a model that ignores frame order cannot tell them apart.
MOTIONS = (
    "up", "down", "horizontal",  # constant velocity; horizontal: left or right
    "spin", "wobble",  # rotation in place: one way round (either sense), or back and forth
    "accelerate", "decelerate",  # straight line in a random direction, speed ramps up or down
    "circle", "zigzag", "bounce",  # trajectory shapes in a random direction
)
SHAPES = ("box", "ellipse", "triangle")
SPLITS = {"train": 0, "val": 1}
HEADINGS = {"up": (270.0,), "down": (90.0,), "horizontal": (0.0, 180.0)}  # degrees, image coordinates (y down)


@dataclass
class SynthConfig:
    out: str = "data/synthetic"
    train_per_class: int = 100
    val_per_class: int = 30
    frames: int = 32
    size: int = 64
    fps: int = 25
    seed: int = 0
    appearance_classes: bool = False  # classes become <shape>-<motion>: appearance and motion both matter
    workers: int = 0  # 0: one per CPU core
    gop: int = 8  # short keyframe interval: cheap random access to clips


def class_names(appearance_classes=False):
    """The class folder names, in label order."""
    if appearance_classes:
        return [f"{shape}-{motion}" for shape in SHAPES for motion in MOTIONS]
    return list(MOTIONS)


def draw_appearance(rng, size):
    """Everything the viewer sees in one frame; drawn without knowing the class."""
    scale = size / 64.0
    bg_a = rng.uniform(0, 255, 3)
    bg_b = np.clip(bg_a + rng.uniform(-70, 70, 3), 0, 255)  # a subtle texture: the object stands out
    colour = rng.uniform(0, 255, 3)
    for _ in range(50):  # keep the object visible against its background
        if np.abs(colour - (bg_a + bg_b) / 2).sum() > 200:
            break
        colour = rng.uniform(0, 255, 3)
    half_long = rng.uniform(10, 15) * scale
    distractors = []
    for _ in range(rng.integers(0, 3)):
        distractors.append({
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": rng.uniform(0, 255, 3),
            "half": (rng.uniform(3, 6) * scale, rng.uniform(2, 3) * scale),
            "pos": rng.uniform(0, size, 2),
            "angle": rng.uniform(0, 2 * np.pi),
        })
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": colour,
        "half": (half_long, half_long * rng.uniform(0.45, 0.65)),  # elongated, so rotation shows
        "pos": rng.uniform(0, size, 2),
        "angle": rng.uniform(0, 2 * np.pi),
        "grid": int(rng.integers(3, 9)),
        "texture": rng.uniform(0, 1, (9, 9)),
        "bg": (bg_a, bg_b),
        "distractors": distractors,
    }


def _triangle_wave(t, period):
    """A triangle wave `(T,)` in [-1, 1] that starts at 0 going up."""
    return 1.0 - 2.0 * np.abs((t / period + 0.25) % 1.0 - 0.5) * 2.0


def trajectory(motion, rng, frames, size):
    """Offsets `(T, 2)` in pixels from the start position and angles `(T,)` from the start angle."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    t = np.arange(frames, dtype=np.float64)
    scale = size / 64.0
    if motion in HEADINGS:
        heading = np.deg2rad(rng.choice(HEADINGS[motion]) + rng.uniform(-20, 20))
    else:
        heading = rng.uniform(0, 2 * np.pi)
    unit = np.array([np.cos(heading), np.sin(heading)])
    normal = np.array([-unit[1], unit[0]])
    speed = rng.uniform(1.5, 2.5) * scale  # pixels per frame
    offsets, angles = np.zeros((frames, 2)), np.zeros(frames)
    if motion in HEADINGS:
        offsets = speed * t[:, None] * unit
    elif motion == "spin":
        angles = rng.choice([-1, 1]) * np.deg2rad(rng.uniform(8, 15)) * t
    elif motion == "wobble":
        angles = np.deg2rad(rng.uniform(30, 50)) * _triangle_wave(t, rng.uniform(10, 16))
    elif motion in ("accelerate", "decelerate"):
        ramp = np.linspace(0.2, 4.0, frames) * scale
        velocity = ramp if motion == "accelerate" else ramp[::-1]
        offsets = np.concatenate([[0.0], np.cumsum(velocity[:-1])])[:, None] * unit
    elif motion == "circle":
        radius = rng.uniform(8, 14) * scale
        omega = rng.choice([-1, 1]) * speed / radius
        phase = rng.uniform(0, 2 * np.pi)
        ring = np.stack([np.cos(phase + omega * t), np.sin(phase + omega * t)], 1)
        offsets = radius * (ring - ring[:1])
    elif motion == "zigzag":
        wave = _triangle_wave(t, rng.uniform(8, 12))
        offsets = 0.6 * speed * t[:, None] * unit + rng.uniform(6, 10) * scale * wave[:, None] * normal
    else:  # bounce: back and forth along a line
        offsets = rng.uniform(10, 16) * scale * _triangle_wave(t, rng.uniform(12, 20))[:, None] * unit
    return offsets, angles


def _coverage(shape, half, centre, angle, size):
    """Anti-aliased coverage `(N, H, W)` of a shape at `centre (N, 2)`, `angle (N,)`, wrapping around the frame."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    centre, angle = centre.astype(np.float32), np.asarray(angle, dtype=np.float32)
    dx = (coords[None, None, :] - centre[:, 0, None, None] + size / 2) % size - size / 2  # (N, 1, W)
    dy = (coords[None, :, None] - centre[:, 1, None, None] + size / 2) % size - size / 2  # (N, H, 1)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # (N, H, W) object coordinates
    a, b = np.float32(half[0]), np.float32(half[1])
    if shape == "box":
        dist = np.maximum(np.abs(u) - a, np.abs(v) - b)
    elif shape == "ellipse":
        dist = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b
    elif shape == "triangle":  # apex at (a, 0), base at u = -a
        dist = np.maximum(-a - u, (b * (u - a) + 2 * a * np.abs(v)) / np.hypot(b, 2 * a))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - dist, 0.0, 1.0, out=dist)


def render(appearance, offsets, angles, size):
    """Frames `(T, H, W, 3)` uint8 for one appearance and one trajectory."""
    grid = appearance["grid"]
    texture = appearance["texture"][:grid, :grid]
    # bilinear upsampling of a coarse random grid: a smooth, per-video background
    idx = np.linspace(0, grid - 1, size)
    lo = np.minimum(idx.astype(int), grid - 2)
    w = (idx - lo)[:, None]
    rows = texture[lo] * (1 - w) + texture[lo + 1] * w  # (H, grid)
    smooth = rows[:, lo] * (1 - w.T) + rows[:, lo + 1] * w.T  # (H, W)
    bg_a, bg_b = appearance["bg"]
    background = bg_a * (1 - smooth[..., None]) + bg_b * smooth[..., None]  # (H, W, 3)
    for d in appearance["distractors"]:
        alpha = _coverage(d["shape"], d["half"], d["pos"][None], np.array([d["angle"]]), size)[0]
        background = background * (1 - alpha[..., None]) + d["colour"] * alpha[..., None]
    background = background.astype(np.float32)
    centre = appearance["pos"][None] + offsets  # (T, 2)
    alpha = _coverage(appearance["shape"], appearance["half"], centre, appearance["angle"] + angles, size)
    colour = appearance["colour"].astype(np.float32)
    frames = background + alpha[..., None] * (colour - background)  # (T, H, W, 3), within [0, 255]
    return (frames + 0.5).astype(np.uint8)


def make_video(label, seed, split, index, frames=32, size=64, appearance_classes=False):
    """Frames `(T, H, W, 3)` uint8 of video `index` of `split` with class `label` (a class name)."""
    streams = np.random.SeedSequence([seed, SPLITS[split], index]).spawn(2)
    appearance = draw_appearance(np.random.default_rng(streams[0]), size)
    motion = label
    if appearance_classes:
        appearance["shape"], motion = label.split("-", 1)
    offsets, angles = trajectory(motion, np.random.default_rng(streams[1]), frames, size)
    return render(appearance, offsets, angles, size)


def _write_one(job):
    path, label, cfg, split, index = job
    frames = make_video(label, cfg.seed, split, index, cfg.frames, cfg.size, cfg.appearance_classes)
    write_video(path, frames, fps=cfg.fps, codec="h264", gop=cfg.gop)
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
    parser.add_argument("--train-per-class", type=int, default=d.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=d.val_per_class)
    parser.add_argument("--frames", type=int, default=d.frames)
    parser.add_argument("--size", type=int, default=d.size, help="frame side in pixels")
    parser.add_argument("--fps", type=int, default=d.fps)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--appearance-classes", action="store_true",
                        help="classes are <shape>-<motion>, so both appearance and motion are needed")
    parser.add_argument("--workers", type=int, default=d.workers, help="processes (0: one per core)")
    parser.add_argument("--gop", type=int, default=d.gop, help="keyframe interval")


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.frames < 2 or args.size < 16 or args.size % 2:
        raise SystemExit(f"synth: need --frames >= 2 and an even --size >= 16, got {args.frames}, {args.size}")
    cfg = SynthConfig(**{k: getattr(args, k) for k in asdict(SynthConfig()) if hasattr(args, k)})
    result = run(cfg)
    print(f"{result['root']}: {len(result['classes'])} classes, {'reused' if result['reused'] else 'written'}"
          f" in {result['seconds']:.1f} s")
    return 0
