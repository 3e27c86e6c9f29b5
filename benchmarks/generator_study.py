"""Does the generator read the clip? (issue 15): where a trained G drops frames, and what its loss rewards.

    python -m benchmarks.generator_study --variants baseline frame_mlp --seeds 0 1 --record

Data: the `window` scene of `videomoco.data.synthetic` with videos as long as the clip (8 or 16
frames), so the dots move in a known W = T/4 frames of each clip (`motion_window`) and are still,
up to the noise, in the others. A G that reads the clip should drop frames inside the window more
often than uniform random drops do (W / T = 25%).

Per variant and seed:
1. pretrain tiny VideoMoCo on the train videos (`videomoco.engine.pretrain.run`, the demo's recipe:
   r3d_18 width 8, 32 px, batch 32, views `same` since a video is one clip; G from `--adv-start`);
2. on held-out clips rendered in memory (`make_video`, split val), G's drops: the fraction inside
   the window (mean and std over clips) and the fraction of clips in which each position is dropped;
   the same for G as the run initialised it, how many clips keep G's initial drops, and how much of
   the spread of G's scores is position (the mean score of each position) and how much content;
3. what the objective rewards, whatever G learned: the feature L1 |q(dropped) - q(real)| (G's
   loss is -100 x its batch mean) of the trained encoder and of a random-init one, when the window's
   frames are dropped, the last k, the first k, k random still frames, or G's choice; the encoders
   run in train mode (batch statistics, batches of 32) as in pretraining. For 8-frame clips (k = 2,
   28 pairs) it also finds, per clip, the pair of frames that maximises the loss when the whole batch
   drops that pair ("oracle"), and how often that pair is in the window or is the last two frames;
   and which way G's straight-through gradient pushes the scores of dropped / kept, window / still
   frames (`st_gradient`).

Variants (one change each against `baseline`, the library's G: per-frame CNN + BiGRU, mean fill,
feature_l1, g_lr = lr): `frame_mlp` scores each frame on its own (no GRU: no position, no motion);
`diff_mlp` scores each frame from itself and |x_t - x_{t-1}| (no position, sees motion); `g_lr_x10`
/ `g_lr_x0.1`; `frames16`; `contrastive` (`g_loss contrastive`); `hold` (a dropped frame repeats the
previous kept one, so dropping a still frame costs nothing); `authors_grad` (`g_grad authors`, when the
config has it); `replicate_pad` (the encoder's convolutions pad by replicating the edge instead of zeros);
`explore` (while training, G drops the top-k of its scores plus Gumbel noise: k frames sampled from
softmax(scores), so other drop sets get tried); `explore_hold` and `diff_hold` (those with hold fill);
`frames16_diff` (`diff_mlp` on 16-frame clips).
G and the encoder variants are swapped in for the run with `swap` (the pretraining code builds
`videomoco.method.generator.GENERATORS["authors"]` / `videomoco.method.VideoMoCo` by name). `diff_mlp` is the
design of the library's `--generator motion` (`MotionDropGenerator`). `--reuse` analyses the checkpoints of
an earlier run again; `--quick` is the smoke test (12 videos, 2 steps, a few seconds).
"""

import argparse
import copy
import itertools
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common
from videomoco import method
from videomoco.data import synthetic
from videomoco.data.augment import normalize
from videomoco.method.generator import GENERATORS, FrameDropGenerator, drop_frames, num_dropped
from videomoco.method.moco import VideoMoCo

VARIANTS = {
    "baseline": {},
    "frame_mlp": {"scorer": "frame"},
    "diff_mlp": {"scorer": "diff"},
    "g_lr_x10": {"g_lr_scale": 10.0},
    "g_lr_x0.1": {"g_lr_scale": 0.1},
    "frames16": {"frames": 16},
    "contrastive": {"g_loss": "contrastive"},
    "hold": {"fill": "hold"},
    "authors_grad": {"g_grad": "authors"},
    "replicate_pad": {"pad": "replicate"},
    "explore": {"explore": 1.0},
    "explore_hold": {"explore": 1.0, "fill": "hold"},
    "diff_hold": {"scorer": "diff", "fill": "hold"},
    "frames16_diff": {"frames": 16, "scorer": "diff"},
}
LR = 0.01  # the demo's
DROP_RATIO = 0.25


class FrameScorer(FrameDropGenerator):
    """G without the GRU: a frame's score depends on that frame only (`diff`: and on |x_t - x_{t-1}|,
    zero for frame 0), so it cannot know where in the clip the frame is."""

    def __init__(self, drop_ratio=0.25, fill="mean", hidden=64, input_size=32, in_channels=3, diff=False):
        super().__init__(drop_ratio, fill, hidden, input_size, in_channels * (2 if diff else 1))
        del self.rnn
        self.diff = diff
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def scores(self, clip):
        b, _, t, h, w = clip.shape
        x = clip.float()  # (B, C, T, H, W)
        if self.diff:
            x = torch.cat([x, (x - torch.cat([x[:, :, :1], x[:, :, :-1]], 2)).abs()], 1)  # (B, 2C, T, H, W)
        frames = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b * t, -1, h, w), self.input_size)
        return self.score(self.features(frames).flatten(1)).view(b, t)  # (B, T)


def exploring(cls, scale):
    """`cls` whose training-mode drops are the top-k of scores + `scale` x Gumbel noise: at scale 1, k frames
    sampled without replacement from softmax(scores), the distribution the straight-through soft mask uses;
    in eval mode the plain top-k."""

    class Exploring(cls):
        def forward(self, clip):
            scores = self.scores(clip)
            if self.training:
                u = torch.rand_like(scores).clamp_(1e-6, 1 - 1e-6)
                scores = scores + scale * -torch.log(-torch.log(u))  # the noise carries no gradient
            return drop_frames(clip, scores, self.drop_ratio, self.fill)

    return Exploring


class DiffScorer(FrameScorer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, diff=True)


def generator_class(spec):
    cls = {None: FrameDropGenerator, "frame": FrameScorer, "diff": DiffScorer}[spec.get("scorer")]
    return exploring(cls, spec["explore"]) if spec.get("explore") else cls


def replicate_padding(model):
    """Every Conv3d with padding pads by replicating its input's edge frames / pixels instead of zeros."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d) and any(p > 0 for p in m.padding):
            m.padding_mode = "replicate"  # Conv3d then pads with F.pad(mode="replicate") and convolves unpadded
    return model


def model_class(spec):
    if spec.get("pad") != "replicate":
        return VideoMoCo
    return lambda *a, **k: replicate_padding(VideoMoCo(*a, **k))


@contextmanager
def swap(spec):
    """Pretraining builds `videomoco.method.generator.GENERATORS["authors"](drop_ratio, fill)` (`--generator
    authors`) and `videomoco.method.VideoMoCo(...)`: the variant's classes stand in for them during the run."""
    saved = GENERATORS["authors"], method.VideoMoCo
    GENERATORS["authors"], method.VideoMoCo = generator_class(spec), model_class(spec)
    try:
        yield
    finally:
        GENERATORS["authors"], method.VideoMoCo = saved


def pretrain(args, spec, data, out, seed):
    """One tiny VideoMoCo pretraining -> (checkpoint path, seconds)."""
    from videomoco.engine.config import PretrainConfig
    from videomoco.engine.pretrain import run

    frames = spec.get("frames", args.frames)
    extra = {"g_grad": spec["g_grad"]} if "g_grad" in spec else {}
    cfg = PretrainConfig(
        data=str(data), arch="r3d_18", width=8, workers=args.workers, epochs=args.epochs,
        batch_size=args.batch, crop_size=32, frame_per_clip=frames, frame_stride=1, lr=LR, cos=True, schedule=[],
        moco_k=args.queue, moco_m=0.99, moco_t=0.2, mlp_bn=True, temporal_decay=0.99,
        adv_start_epoch=args.adv_start, views="same", aug_jitter=0.0, aug_hue=0.0, aug_grayscale=0.0,
        aug_scale_min=0.8, drop_ratio=DROP_RATIO, fill=spec.get("fill", "mean"),
        g_loss=spec.get("g_loss", "feature_l1"), g_lr=LR * spec.get("g_lr_scale", 1.0), print_freq=10,
        log_dir=str(out / "logs"), ckp_dir=str(out / "checkpoints"), save_every=args.epochs, keep_last=1,
        image_every=0, device="cpu", seed=seed, micro_batch=args.batch, **extra)
    previous = sorted((out / "checkpoints").glob("checkpoint_*.pth.tar"))
    if args.reuse and previous:  # analyse an earlier run of the same variant again
        return str(previous[-1]), float("nan")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with swap(spec):
        result = run(cfg)
    if result.get("status") != "done" or not result.get("checkpoint"):
        raise RuntimeError(f"pretraining {out}: {result}")
    return str(result["checkpoint"]), time.perf_counter() - start


def test_clips(seed, frames, count):
    """Held-out window-scene clips, normalised `(N, 3, T, 32, 32)`, and their windows `(N, T)` bool."""
    clips, windows = [], np.zeros((count, frames), bool)
    for i in range(count):
        clips.append(synthetic.make_video(synthetic.MOTIONS[i % len(synthetic.MOTIONS)], seed, "val", i, frames, 32,
                                          scene="window"))
        start, length = synthetic.motion_window(seed, "val", i, frames)
        windows[i, start:start + length] = True
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W) uint8
    return normalize(x), torch.from_numpy(windows)


def load_players(checkpoint, spec):
    """(VideoMoCo, G) of a pretraining checkpoint, rebuilt with the variant's classes."""
    from videomoco.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    model = model_class(spec)(cfg["arch"], cfg["moco_dim"], cfg["moco_k"], cfg["moco_m"], cfg["moco_t"], cfg["mlp"],
                              cfg["temporal_decay"], cfg["width"], mlp_bn=cfg["mlp_bn"])
    model.load_state_dict(ckpt["state_dict"])
    generator = generator_class(spec)(cfg["drop_ratio"], cfg["fill"])
    generator.load_state_dict(ckpt["generator"])
    return model, generator.eval(), initial_generator(cfg, spec)


def initial_generator(cfg, spec):
    """G as the run initialised it: pretraining seeds torch, builds VideoMoCo, then G (`pretrain.Run`)."""
    torch.manual_seed(cfg["seed"])
    model_class(spec)(cfg["arch"], cfg["moco_dim"], cfg["moco_k"], cfg["moco_m"], cfg["moco_t"], cfg["mlp"],
                      cfg["temporal_decay"], cfg["width"], mlp_bn=cfg["mlp_bn"])
    return generator_class(spec)(cfg["drop_ratio"], cfg["fill"]).eval()


@torch.no_grad()
def generator_drops(generator, x, k):
    """(boolean `(N, T)`: the frames G drops (its top-k scores), the scores `(N, T)`)."""
    scores = torch.cat([generator.scores(chunk) for chunk in x.split(64)])
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True), scores


def score_spread(scores):
    """How much of G's score variation is position (the mean score of each position over clips) and how
    much is content (the rest): their standard deviations."""
    position = scores.mean(0)  # (T,)
    return {"score_std_position": position.std().item(), "score_std_content": (scores - position).std().item()}


def drop_stats(drops, windows):
    """In-window fraction of the drops (mean, std over clips) and the per-position drop rate."""
    inside = (drops & windows).sum(1).float() / drops.sum(1).float()  # (N,)
    return {"in_window": inside.mean().item(), "in_window_std": inside.std().item(),
            "positions": drops.float().mean(0).tolist()}


@torch.no_grad()
def feature_l1(model, x, drop_sets, fill, batch=32):
    """`(N, S)`: per clip, mean |q(x with drop set s (N, T) bool filled) - q(x)| for each of the S sets,
    the encoder in train mode (batch statistics over `batch` clips, as in pretraining; on a copy, so the
    running statistics stay as they are)."""
    model = copy.deepcopy(model).train()
    out = []
    for i in range(0, len(x), batch):
        xs = x[i:i + batch]
        real = model.encode_query(xs)  # (b, dim)
        cols = []
        for drops in drop_sets:
            dropped, _ = drop_frames(xs, drops[i:i + batch].float(), DROP_RATIO, fill)  # True frames score highest
            cols.append((model.encode_query(dropped) - real).abs().mean(1))
        out.append(torch.stack(cols, 1))
    return torch.cat(out)


def st_gradient(model, x, windows, fill, seed=0, batch=32):
    """What G's straight-through gradient tells it, for uniformly random drop sets: how much one descent
    step on G's loss (-100 x feature L1) raises each frame's score (the negative gradient), averaged over
    dropped / kept frames inside / outside the window, and the fraction of dropped frames it raises."""
    model = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(seed)
    raises, dropped = [], []
    for xs in x.split(batch):
        scores = torch.rand(xs.shape[0], xs.shape[2], generator=g).requires_grad_()
        with torch.no_grad():
            real = model.encode_query(xs)
        out, keep = drop_frames(xs, scores, DROP_RATIO, fill)
        (-100 * (model.encode_query(out) - real).abs().mean()).backward(inputs=[scores])
        raises.append(-scores.grad)
        dropped.append(keep.detach() == 0)
    r, d, w = torch.cat(raises), torch.cat(dropped), windows
    return {"st_dropped_raised": (r[d] > 0).float().mean().item(),
            "st_raise_dropped_window": r[d & w].mean().item(), "st_raise_dropped_still": r[d & ~w].mean().item(),
            "st_raise_kept_window": r[~d & w].mean().item(), "st_raise_kept_still": r[~d & ~w].mean().item()}


def fixed(n, t, positions):
    d = torch.zeros(n, t, dtype=torch.bool)
    d[:, list(positions)] = True
    return d


def random_still(windows, k, seed):
    """k random frames outside each clip's window."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(windows.shape, generator=g) - 2.0 * windows.float()
    return torch.zeros_like(windows).scatter(1, scores.topk(k, dim=1).indices, True)


def objective(model, x, windows, fill, g_drops=None, oracle=True):
    """What feature L1 rewards: its mean over clips for several drop sets, and the per-clip best pair."""
    n, t = windows.shape
    k = num_dropped(t, DROP_RATIO)
    sets = {"window": windows if int(windows[0].sum()) == k else None, "last": fixed(n, t, range(t - k, t)),
            "first": fixed(n, t, range(k)), "still": random_still(windows, k, 0)}
    if g_drops is not None:
        sets["G"] = g_drops
    sets = {name: d for name, d in sets.items() if d is not None}
    l1 = feature_l1(model, x, list(sets.values()), fill).mean(0)
    out = {f"l1_{name}": value.item() for name, value in zip(sets, l1)} | st_gradient(model, x, windows, fill)
    if oracle and k == 2:
        pairs = list(itertools.combinations(range(t), 2))
        l1 = feature_l1(model, x, [fixed(n, t, p) for p in pairs], fill)  # (N, pairs)
        best = [pairs[i] for i in l1.argmax(1).tolist()]
        out["oracle_in_window"] = float(np.mean([windows[i, list(p)].float().mean().item()
                                                 for i, p in enumerate(best)]))
        out["oracle_is_last"] = float(np.mean([p == (t - 2, t - 1) for p in best]))
        counts = np.zeros(t)
        for p in best:
            counts[list(p)] += 1
        out["oracle_positions"] = (counts / n).tolist()
        out["best_fixed_pair"] = list(pairs[int(l1.mean(0).argmax())])  # a content-blind G's best choice
        by_pair = l1.mean(0)
        out["l1_by_position"] = [by_pair[[j for j, p in enumerate(pairs) if i in p]].mean().item() for i in range(t)]
    return out


def random_model(spec, seed, queue):
    torch.manual_seed(seed)
    return model_class(spec)("r3d_18", 128, queue, 0.99, 0.2, False, 0.99, 8, mlp_bn=True)


def percent(values):
    return " ".join(f"{100 * v:.0f}" for v in values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.generator_study", description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["baseline"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--frames", type=int, default=8, help="clip = video length (frames16 uses 16)")
    p.add_argument("--train-per-class", type=int, default=50, help="train videos per class (6 classes)")
    p.add_argument("--test-videos", type=int, default=120)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--adv-start", type=int, default=4, help="first epoch with the generator")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--queue", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="loader processes")
    p.add_argument("--no-random-init", action="store_true", help="skip the objective of the random-init encoder")
    p.add_argument("--out", default="/tmp/generator_study")
    p.add_argument("--reuse", action="store_true", help="analyse the checkpoints of an earlier run in --out again")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the run (0: as they are; --quick: 1, which a shared 2-core machine needs)")
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.train_per_class, args.test_videos, args.epochs, args.adv_start = 2, 12, 1, 0
        args.batch, args.queue, args.workers = 6, 12, 0
        args.threads = args.threads or 1
    return args


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return study(args, common.command_line("benchmarks.generator_study",
                                               list(argv if argv is not None else sys.argv[1:])))
    finally:
        torch.set_num_threads(threads)


def study(args, command):
    out = Path(args.out)
    rows, objective_rows = [], []
    data_seed = 0  # the same videos for every run: the seeds vary the training only
    for frames in sorted({VARIANTS[v].get("frames", args.frames) for v in args.variants}):
        k = num_dropped(frames, DROP_RATIO)
        x, windows = test_clips(data_seed, frames, args.test_videos)
        variants = [v for v in args.variants if VARIANTS[v].get("frames", args.frames) == frames]
        for name, spec in (("random init", {}), ("random init, replicate pad", {"pad": "replicate"})):
            if (args.no_random_init and not spec) or (spec and not any("pad" in VARIANTS[v] for v in variants)):
                continue
            for fill in ("mean",) if args.quick else ("mean", "hold"):
                res = objective(random_model(spec, 0, args.queue), x, windows, fill)
                objective_rows.append({"encoder": name, "frames": frames, "fill": fill, **res})
                common.emit(objective_rows[-1], command)
        data = synthetic.run(synthetic.SynthConfig(
            out=str(out / f"data_T{frames}"), train_per_class=args.train_per_class, val_per_class=0, frames=frames,
            size=32, seed=data_seed, scene="window", workers=1))["root"]
        for variant in variants:
            spec = VARIANTS[variant]
            for seed in args.seeds:
                ckpt, seconds = pretrain(args, spec, data, out / f"{variant}_seed{seed}", seed)
                model, generator, initial = load_players(ckpt, spec)
                drops, scores = generator_drops(generator, x, k)
                drops0, scores0 = generator_drops(initial, x, k)
                row = {"variant": variant, "seed": seed, "frames": frames, "pretrain_s": round(seconds, 1),
                       "random_baseline": windows.float().mean().item(), **drop_stats(drops, windows),
                       **score_spread(scores), **{f"init_{k}": v for k, v in score_spread(scores0).items()},
                       "init_in_window": drop_stats(drops0, windows)["in_window"],
                       "init_positions": drop_stats(drops0, windows)["positions"],
                       "same_drops_as_init": (drops == drops0).all(1).float().mean().item(),
                       "score_change": ((scores - scores0).norm() / scores0.norm()).item()}
                fill = spec.get("fill", "mean")
                res = objective(model, x, windows, fill, drops, oracle=variant in ("baseline", "hold", "frames16"))
                rows.append(row)
                objective_rows.append({"encoder": f"trained ({variant}, seed {seed})", "frames": frames, "fill": fill,
                                       **res})
                common.emit(row | res, command)
    if args.record:
        record(rows, objective_rows, command, args)
    return 0


def _mean(runs, key, scale=1.0, fmt=".0f"):
    return f"{scale * np.mean([r[key] for r in runs]):{fmt}}"


def record(rows, objective_rows, command, args):
    """Append two tables to `args.results`: where G drops (per variant, over seeds) and what feature L1 rewards."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        inside = 100 * np.array([r["in_window"] for r in runs])
        spread = f" ± {inside.std():.1f}" if len(runs) > 1 else ""
        reused = any(np.isnan(r["pretrain_s"]) for r in runs)
        table.append({
            "variant": variant, "frames": runs[0]["frames"], "seeds": len(runs),
            "in-window drops (%)": f"{inside.mean():.1f}{spread}",
            "per-clip std (%)": _mean(runs, "in_window_std", 100),
            "random (%)": _mean(runs, "random_baseline", 100),
            "drop rate per position (%)": percent(np.mean([r["positions"] for r in runs], 0)),
            "at init: in-window (%)": _mean(runs, "init_in_window", 100, ".1f"),
            "clips with G's init drops (%)": _mean(runs, "same_drops_as_init", 100),
            "score std: position / content": f"{_mean(runs, 'score_std_position', 1, '.3g')} / "
                                             f"{_mean(runs, 'score_std_content', 1, '.3g')}",
            "the same at init": f"{_mean(runs, 'init_score_std_position', 1, '.3g')} / "
                                f"{_mean(runs, 'init_score_std_content', 1, '.3g')}",
            "pretrain s": "reused" if reused else _mean(runs, "pretrain_s")})
    note = (f"{args.train_per_class * 6} train videos of the window scene, {args.test_videos} held-out clips, "
            f"{args.epochs} epochs, G from epoch {args.adv_start}, batch {args.batch}, queue {args.queue}. "
            "± is the spread (std) over seeds; 'per-clip std' the std over test clips of one run.")
    common.record("generator_study: where G drops frames", table, command, path=args.results, note=note)
    obj = []
    for r in objective_rows:
        row = {"encoder": r["encoder"], "frames": r["frames"], "fill": r["fill"]}
        row |= {key: f"{r[key]:.4f}" for key in ("l1_window", "l1_last", "l1_first", "l1_still", "l1_G") if key in r}
        row["ST raise, dropped: window / still"] = f"{1e3 * r['st_raise_dropped_window']:.2f} / " \
                                                   f"{1e3 * r['st_raise_dropped_still']:.2f}"
        row["ST raise, kept: window / still"] = f"{1e3 * r['st_raise_kept_window']:.2f} / " \
                                                f"{1e3 * r['st_raise_kept_still']:.2f}"
        if "oracle_in_window" in r:
            row["oracle in window"] = f"{100 * r['oracle_in_window']:.0f}%"
            row["oracle = last two"] = f"{100 * r['oracle_is_last']:.0f}%"
            row["best fixed pair"] = " ".join(map(str, r["best_fixed_pair"]))
            row["L1 per position (x 1e-3)"] = " ".join(f"{1e3 * v:.1f}" for v in r["l1_by_position"])
        obj.append(row)
    keys = list(dict.fromkeys(key for r in obj for key in r))
    obj = [{key: r.get(key, "") for key in keys} for r in obj]
    note = ("Train-mode BN over batches of 32; k = T / 4 frames dropped. 'ST raise' (x 1e-3): how much one descent "
            "step on G's loss raises a frame's score through the straight-through mask, for random drop sets, over "
            "dropped / kept frames inside / outside the window. 'L1 per position': the mean over the pairs holding "
            "that frame.")
    common.record("generator_study: what feature L1 rewards (mean |q(dropped) - q(real)|)", obj, command,
                  path=args.results, note=note)


if __name__ == "__main__":
    raise SystemExit(main())
