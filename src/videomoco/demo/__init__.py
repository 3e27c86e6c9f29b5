"""`videomoco demo`: the whole system on synthetic videos, on a CPU, in minutes, with no download.

    synth (videomoco.data.synthetic) -> index -> pretrain a shared plain MoCo start, then MoCo and VideoMoCo
      from it (videomoco.engine.pretrain, --monitor on the demo's labels) -> supervised reference
      (videomoco.eval.finetune) -> kNN / linear / robustness of random init, MoCo, VideoMoCo and supervised
      -> do the classes need time? -> report.md + PNGs in --out

`--quick` shrinks everything (used by the tests, about 15 seconds); `--ablation` runs, instead, MoCo, + each
form of the decay, + each generator and the best combination over paired seeds (`demo.ablation`), compared
with MoCo seed by seed (a paired t-test, `demo.stats`), with the robustness to dropped moving vs still frames
on the window scene. Every phase prints its elapsed time.
"""

import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from videomoco.data import synthetic
from videomoco.demo import ablation as ablation_runs
from videomoco.demo import report
from videomoco.demo.evaluate import KNN_K, evaluate, evaluate_window, time_baselines
from videomoco.engine.config import ConfigError, resolve_device
from videomoco.flags import COUNT, POSITIVE_INT, SEED, SHARED, config_from, fail
from videomoco.models import list_encoders

@dataclass(frozen=True)
class Budget:
    """How big each part of the demo is; `BUDGETS["default"]`: MoCo kNN >= 50% in at most 6 minutes on 2 CPU cores."""

    scene: str = "dots"  # videomoco.data.synthetic.SCENES; in "object" MoCo learns the object, not its motion
    train_per_class: int = 100
    test_per_class: int = 30  # rendered into val/, the held-out split
    video_frames: int = 24
    size: int = 32
    clip_frames: int = 8
    frame_stride: int = 1  # dots move about 1 px a frame
    crop: int = 32
    batch_size: int = 32
    epochs: int = 16
    adv_start_epoch: int = 8  # plain MoCo shared by both runs, then MoCo goes on and VideoMoCo adds decay and G
    # the plain heads let every embedding collapse onto one direction; with the BN head, lr 0.05, T 0.1,
    # key momentum 0.9 and views that share no frame, MoCo's kNN goes from 27 to 53-58 (docs/demo.md, "Tuning")
    lr: float = 0.05
    mlp_bn: bool = True
    queue: int = 128  # a fifth of the 600 train videos: a video's own older key is rarely a negative
    temperature: float = 0.1
    # the dots' palette (one of four) is what MoCo otherwise matches views by: grey views, half of them
    # negatives, take it away (kNN 31-34 -> 61-74 on seeds where it won); colour jitter slows motion learning
    # (docs/demo.md, "Tuning"); the classes are closed under the flip
    aug_jitter: float = 0.0
    aug_hue: float = 0.0
    aug_grayscale: float = 1.0
    aug_invert: float = 0.5
    aug_scale_min: float = 0.8
    key_momentum: float = 0.9  # 0.99 lags ~100 steps behind the query encoder (the run has 288)
    temporal_decay: float = 0.99  # per enqueue step; the paper's 0.99999 is for queues of 65536 keys
    views: str = "disjoint"  # clips that share frames share dots: a match that needs no motion
    monitor_every: int = 4  # epochs between the --monitor kNN checks of MoCo and VideoMoCo (0: none)
    supervised_epochs: int = 8
    supervised_lr: float = 0.05  # 0.01 reached 63% train clip accuracy in 8 epochs: underfit
    num_clips: int = 2  # test clips per video
    ratios: tuple = (0.0, 0.25, 0.5)
    generator: str = "motion"  # VideoMoCo's G: the one that reads the clip (docs/demo.md, "What the generator learns")
    # --ablation: paired seeds, and its own test set of the same scene (more videos: a tighter paired difference)
    ablation_seeds: int = 4  # 35 minutes on 2 idle cores; 5 would take about 42 of issue 24's 45 (docs/demo.md)
    ablation_test_per_class: int = 100
    window_videos: int = 360  # --ablation: window-scene clips for the kNN bank and the test, each


BUDGETS = {
    "default": Budget(),
    "quick": Budget(train_per_class=5, test_per_class=2, video_frames=12, size=32, clip_frames=4, batch_size=10,
                    epochs=2, adv_start_epoch=1, queue=40, supervised_epochs=1, num_clips=1, ratios=(0.0, 0.5),
                    ablation_seeds=2, ablation_test_per_class=2, window_videos=12),
}


class DemoError(RuntimeError):
    """A phase of the demo failed (one-line message)."""


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    quick: bool = False
    ablation: bool = False
    device: str = "auto"
    arch: str = "r3d_18"
    width: int = 8
    workers: int = 2
    seed: int = 0

    def __post_init__(self):
        """One-line `ValueError` (`ConfigError`) for a value the demo cannot use, before anything is rendered."""
        resolve_device(self.device)
        if self.arch not in list_encoders():
            raise ConfigError(f"--arch must be one of {', '.join(list_encoders())}, got {self.arch!r}")
        for name, number in (("width", POSITIVE_INT), ("workers", COUNT), ("seed", SEED)):
            number.check(getattr(self, name), f"--{name}")


class Timer:
    """Elapsed seconds per phase, printed as each phase ends."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, phase):
        print(f"[demo] {phase} ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - start
        print(f"[demo] {phase}: {self.seconds[phase]:.1f} s", flush=True)


def pretrain(cfg, budget, data, out, temporal_decay, adversarial, seed, resume="", max_steps=0, generator="",
             decay_unit="step", monitor=""):
    """One pretraining run (the `videomoco pretrain` entry point) -> its final checkpoint path.

    resume: a checkpoint to continue (the shared first epochs); max_steps: stop there; generator: its kind
    ("": the budget's); decay_unit: "step" (the authors' code) or "key" (the paper); monitor: a labelled root
    for `--monitor` every `budget.monitor_every` epochs ("": none)."""
    from videomoco.engine.config import PretrainConfig
    from videomoco.engine.pretrain import run as run_pretrain

    pcfg = PretrainConfig(
        data=str(data), arch=cfg.arch, width=cfg.width, workers=cfg.workers, epochs=budget.epochs,
        batch_size=budget.batch_size, crop_size=budget.crop, frame_per_clip=budget.clip_frames,
        frame_stride=budget.frame_stride, lr=budget.lr, cos=True, schedule=[], moco_k=budget.queue,
        moco_m=budget.key_momentum, moco_t=budget.temperature, mlp_bn=budget.mlp_bn,
        temporal_decay=temporal_decay, resume=resume, max_steps=max_steps,
        adv_start_epoch=budget.adv_start_epoch if adversarial else budget.epochs, views=budget.views,
        aug_jitter=budget.aug_jitter, aug_hue=budget.aug_hue, aug_grayscale=budget.aug_grayscale,
        aug_invert=budget.aug_invert, aug_scale_min=budget.aug_scale_min,
        print_freq=5, log_dir=str(out / "logs"), ckp_dir=str(out / "checkpoints"), save_every=budget.epochs,
        keep_last=1, image_every=1, device=cfg.device, seed=seed, generator=generator or budget.generator,
        monitor=str(monitor) if monitor and budget.monitor_every else "", monitor_every=budget.monitor_every or 1,
        **({"decay_unit": decay_unit} if decay_unit != "step" else {}))
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts clean: no old checkpoints, no appended logs
    result = run_pretrain(pcfg)
    expected = "max_steps" if max_steps else "done"
    if result.get("status") != expected or not result.get("checkpoint"):  # diverged, or stopped by a signal
        raise DemoError(f"pretraining in {out} {result.get('status', 'failed')}: {result.get('error', 'no checkpoint')}")
    return str(result["checkpoint"])


def shared_steps(budget, num_train):
    """The steps of the first `adv_start_epoch` epochs, which MoCo and VideoMoCo share (the loader drops the last
    partial batch)."""
    return num_train // budget.batch_size * budget.adv_start_epoch


def eval_config(cfg, budget, data, device, pretrained="", seed=0):
    from videomoco.eval.common import EvalConfig

    return EvalConfig(data=str(data), dataset="folder", pretrained=pretrained, arch=cfg.arch, width=cfg.width,
                      frames=budget.clip_frames, frame_stride=budget.frame_stride, crop=budget.crop,
                      num_clips=budget.num_clips, num_crops=1, batch_size=32, workers=cfg.workers, device=device,
                      seed=seed)


def supervised(cfg, budget, data, out, device):
    """The supervised reference: the same encoder trained on the train labels -> its checkpoint path."""
    from videomoco.eval.finetune import FinetuneConfig
    from videomoco.eval.finetune import run as run_finetune

    base = dataclasses.asdict(eval_config(cfg, budget, data, device, seed=cfg.seed))
    fcfg = FinetuneConfig(**{**base, "out": str(out)}, epochs=budget.supervised_epochs, lr=budget.supervised_lr,
                          cos=True, schedule=[], weight_decay=1e-4)
    fcfg.num_clips = 1  # its own test pass is not used: the demo evaluates every model the same way
    run_finetune(fcfg)
    return str(out / "checkpoint.pth")


def render(cfg, budget, out, test_per_class, timer):
    """Render the scene's videos into `out`/data and index its train split -> (synth result, index, train index
    directory, number of train videos); pretraining reads only the train index, never the test videos."""
    from videomoco.data.index import open_index

    data = out / "data"
    with timer("render the synthetic videos"):
        synth = synthetic.run(synthetic.SynthConfig(
            out=str(data), train_per_class=budget.train_per_class, val_per_class=test_per_class,
            frames=budget.video_frames, size=budget.size, seed=cfg.seed, workers=cfg.workers, scene=budget.scene))
    with timer("index"):
        index = open_index(data)
        train_split = index.select("train")
        train_index = train_split.save(out / "index_train")
    return synth, index, train_index, len(train_split)


def run_ablation(cfg, budget, out, device, timer):
    """`--ablation`: `demo.ablation.run` on the demo's recipe, `budget.ablation_seeds` paired seeds, evaluated on
    `budget.ablation_test_per_class` test videos per class of the demo's scene and on window-scene clips
    -> the summary written next to `report.md`."""
    import torch

    from videomoco.data.augment import normalize

    synth, _, train_index, num_train = render(cfg, budget, out, budget.ablation_test_per_class, timer)
    data, root = out / "data", out / "ablation"
    window = {}
    for split in ("train", "val"):  # clips as long as the videos: the window is where the clip moves
        x, labels, windows = synthetic.window_clips(cfg.seed, split, budget.window_videos, budget.clip_frames,
                                                    budget.crop)
        window[split] = (normalize(torch.from_numpy(x).permute(0, 4, 1, 2, 3)), labels, torch.from_numpy(windows))

    def train(variant, seed, tag, resume="", max_steps=0):
        return pretrain(cfg, budget, train_index, root / tag, variant.decay, bool(variant.generator), seed,
                        resume=resume, max_steps=max_steps, generator=variant.generator, decay_unit=variant.decay_unit)

    def measure(ckpt, seed):  # one clip per test video: about 20 s per run, two clips would double it
        ecfg = dataclasses.replace(eval_config(cfg, budget, data, device, ckpt, seed), num_clips=1)
        m = evaluate(ecfg, [0.0, *ablation_runs.RATIOS])
        rows = {r["ratio"]: r for r in m["robustness"] if r["dropper"] == "random"}
        w = {r["dropper"]: r for r in evaluate_window(ecfg, window["train"][:2], window["val"])}
        k = f"knn_top1_k{KNN_K}"
        return [m[k], m["linear_top1"], *(rows[r][key] for r in ablation_runs.RATIOS for key in (k, "cosine")),
                w["none"][k], w["moving"][k], w["still"][k], w["moving"]["cosine"], w["still"]["cosine"]]

    with timer("ablation"):
        result = ablation_runs.run(ablation_runs.fixed_variants(budget.temporal_decay), range(budget.ablation_seeds),
                                   shared_steps(budget, num_train), train, measure)
    summary = {"data": str(data), "classes": synth["classes"], "num_classes": len(synth["classes"]),
               "num_train": num_train, "num_test": len(synth["classes"]) * budget.ablation_test_per_class,
               "arch": cfg.arch, "width": cfg.width, "device": device, "budget": asdict(budget),
               "ablation": result, "seconds": timer.seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report.write_ablation_report(out, summary)
    return summary


def run(cfg):
    """The demo (or with `cfg.ablation` the ablation alone); returns the summary written next to `report.md`
    (`summary.json`)."""
    from videomoco.data.datasets import LabeledDataset

    budget = BUDGETS["quick" if cfg.quick else "default"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    timer = Timer()
    if cfg.ablation:
        summary = run_ablation(cfg, budget, out, device, timer)
        print(f"[demo] total {sum(timer.seconds.values()):.0f} s; report: {out / 'report.md'}", flush=True)
        return summary
    synth, index, train_index, num_train = render(cfg, budget, out, budget.test_per_class, timer)
    data = out / "data"
    checkpoints = {}
    with timer("pretrain the shared start (plain MoCo)"):  # the authors' recipe: MoCo first, then G joins
        start = pretrain(cfg, budget, train_index, out / "start", 1.0, False, cfg.seed,
                         max_steps=shared_steps(budget, num_train), monitor=data)
    for name, adversarial in (("MoCo", False), ("VideoMoCo", True)):
        with timer(f"pretrain {name}"):
            decay = budget.temporal_decay if adversarial else 1.0
            checkpoints[name] = pretrain(cfg, budget, train_index, out / name.lower(), decay, adversarial, cfg.seed,
                                         resume=start, monitor=data)
    with timer("train the supervised reference"):
        checkpoints["supervised"] = supervised(cfg, budget, data, out / "supervised", device)

    results = {}
    ratio = max(budget.ratios)
    for name, ckpt in (("random init", ""), *checkpoints.items()):
        with timer(f"evaluate {name}"):
            ecfg = eval_config(cfg, budget, data, device, ckpt, cfg.seed)
            results[name] = evaluate(ecfg, budget.ratios, ckpt if name == "VideoMoCo" else "")
    with timer("time baselines"):
        ecfg = eval_config(cfg, budget, data, device, checkpoints["supervised"], cfg.seed)
        baselines = time_baselines(ecfg, results["supervised"][f"knn_top1_k{KNN_K}"])
    with timer("plots"):
        log_dirs = {n: [out / "start" / "logs", out / n.lower() / "logs"] for n in ("MoCo", "VideoMoCo")}
        monitor = {n: report.monitor_curve(dirs) for n, dirs in log_dirs.items()}
        report.training_curves(log_dirs, out / "training_curves.png")
        report.accuracy_bars(results, out / "accuracy.png", chance=100 / len(synth["classes"]))
        report.robustness_curves(results, out / "robustness.png")
        test_set = LabeledDataset(index.select("val"), budget.clip_frames, budget.frame_stride, budget.crop,
                                  mode="test", num_clips=1)
        report.dropped_frames_strip(checkpoints["VideoMoCo"], test_set, out / "dropped_frames.png")
    summary = {
        "data": str(data), "classes": synth["classes"], "num_classes": len(synth["classes"]),
        "num_train": num_train, "num_test": len(index.select("val")),
        "arch": cfg.arch, "width": cfg.width, "device": device, "budget": asdict(budget),
        "checkpoints": checkpoints, "results": results, "baselines": baselines, "baseline_model": "supervised",
        "report_ratio": ratio, "monitor": monitor,
        "seconds": timer.seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report.write_report(out, summary)
    print(f"[demo] total {sum(timer.seconds.values()):.0f} s; report: {out / 'report.md'}", flush=True)
    return summary


def add_arguments(parser):
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output directory (data, checkpoints, report.md, PNGs)")
    parser.add_argument("--quick", action="store_true", help="a tiny run of every phase (about 15 seconds)")
    parser.add_argument("--ablation", action="store_true",
                        help="instead of the default demo: MoCo, + the decay (two forms), + each generator and the best "
                             "combination over paired seeds, each compared with MoCo seed by seed (about 35 minutes on 2 "
                             "idle cores)")
    parser.add_argument(*SHARED["device"], default=d.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument(*SHARED["arch"], default=d.arch, choices=list_encoders(), help="encoder from the registry")
    parser.add_argument(*SHARED["width"], type=POSITIVE_INT, default=d.width, help="encoder base width")
    parser.add_argument(*SHARED["workers"], type=COUNT, default=d.workers,
                        help="processes for rendering and data loading")
    parser.add_argument(*SHARED["seed"], type=SEED, default=d.seed)


def main(args):
    try:
        cfg = config_from(DemoConfig, args)
    except ValueError as e:
        return fail("demo", e)
    try:
        run(cfg)
    except DemoError as e:
        print(f"videomoco demo: error: {e}")
        return 1
    return 0
