"""The whole evaluation in one table, under one protocol: fine-tune, linear probe and kNN/retrieval on UCF101
and HMDB51, per split (mean +- std over seeds) and as the mean over splits.

    videomoco evaluate --protocol authors --ucf101 DIR --hmdb51 DIR --pretrained CKPT \
        [--splits 1 2 3] [--seeds 0 1 2] [--tasks finetune linear knn] --out runs/eval
    videomoco evaluate --folder MYDATA --pretrained CKPT ...    # your own labels: MYDATA/{train,test}/<class>/

`--protocol` (eval/protocols.py, docs/eval.md) sets every choice of every task; a flag next to it overrides
that one choice (a deviation, written with the results). Each run writes its own directory
`OUT/<dataset>/split<k>/<task>_seed<n>/`; the table goes to `OUT/results.md` and `OUT/results.json` (every
run's metrics, the protocol and its deviations, and the rows). Papers report split 1 or the mean of the three
splits: both are rows of their own, and the seeds of a split give its mean +- std (n = seeds). kNN has no
randomness, so it runs once per split; the linear probe shares one feature cache per split.
`--suite quick` shortens every schedule (1 fine-tuning epoch, 10 probe epochs) for smoke tests: deviations.
"""

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from videomoco import markdown
from videomoco.data.index import open_index
from videomoco.eval import common, finetune, knn, linear, protocols

log = logging.getLogger(__name__)

TASKS = {"finetune": finetune, "linear": linear, "knn": knn}
REPORTED = {  # task -> metrics in the table, in order
    "finetune": ("clip_top1", "clip_top5", "video_top1", "video_top5"),
    "linear": ("clip_top1", "video_top1"),
    "knn": ("knn_top1_k1", "knn_top1_k20", "R@1", "R@5", "R@10", "R@20", "R@50"),
}
BEST = "best_on_test_video_top1"  # reported too, labelled, where the protocol keeps the best epoch on the test split
PRESETS = {  # suite -> overrides of the protocol's schedules (fine-tuning epochs, LR milestones, probe epochs)
    "paper": (None, None, None),
    "quick": (1, [], 10),
}


@dataclass
class SuiteConfig(common.EvalConfig):
    suite: str = "paper"
    ucf101: str = ""
    hmdb51: str = ""
    folder: str = ""  # one's own labelled videos: DIR/train/<class>/ and DIR/test/<class>/ (or val/)
    splits: list = field(default_factory=lambda: [1, 2, 3])
    seeds: list = field(default_factory=lambda: [0])
    tasks: list = field(default_factory=lambda: ["finetune", "linear", "knn"])
    batch_size: int | None = None  # None: the fine-tuning protocol's, and 16 for the probes
    finetune_epochs: int = 0  # 0 = the protocol's (or the quick suite's)
    finetune_lr: float | None = None  # None = the protocol's
    out: str = "runs/evaluate"


def add_arguments(parser):
    common.add_common_arguments(parser, SuiteConfig, data=False)
    flag = partial(common.add_flag, parser, SuiteConfig)
    flag("suite", "paper: the protocol's schedules; quick: a smoke test", choices=sorted(PRESETS))
    flag("ucf101", "UCF101 root (with ucfTrainTestlist/) or its index")
    flag("hmdb51", "HMDB51 root (with testTrainMulti_7030_splits/) or its index")
    flag("folder", "your own labelled videos: DIR/train/<class>/ and DIR/test/<class>/ (or DIR/val/<class>/)")
    flag("splits", "official splits (papers: 1, or the mean of 1 2 3)", nargs="+")
    flag("seeds", "seeds of the fine-tuning and linear runs", nargs="+")
    parser.add_argument("--tasks", "--protocols", dest="tasks", nargs="+", choices=list(TASKS),
                        default=SuiteConfig().tasks, help="evaluations to run (--protocols: the former spelling)")
    flag("finetune_epochs", "override the protocol's fine-tuning epochs (0: the protocol's)")
    flag("finetune_lr", "override the protocol's fine-tuning learning rate")


LAYOUTS = {"ucf101": "ucf101", "hmdb51": "hmdb51", "folder": "kinetics"}  # flag -> the index layout it reads


def check_layout(dataset, root):
    """One line naming the right flag when `root` (given as --ucf101 / --hmdb51 / --folder) holds another layout;
    before any run, so no task's error names a flag that `evaluate` does not have."""
    index = open_index(root)
    if index.layout == LAYOUTS[dataset]:
        return
    if LAYOUTS[dataset] == "kinetics":
        raise ValueError(f"--folder {root} has no train/ and test/ (or val/) class folders ({index.layout} layout): "
                         "evaluation needs DIR/train/<class>/<video> and DIR/test/<class>/<video>")
    fix = next((f"give it as --{name} {root}" for name, layout in LAYOUTS.items() if layout == index.layout),
               "give your own labelled videos as --folder DIR (DIR/train/<class>/, DIR/test/<class>/)")
    raise ValueError(f"--{dataset} {root} is indexed as {index.layout}, not {dataset}: {fix}")


def task_config(cfg, task, dataset, root, split, seed):
    """The config of one run: the suite's shared fields (those left at None: the protocol's) and the suite's
    schedule overrides."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(common.EvalConfig)}
    shared = {k: v for k, v in shared.items() if v is not None}
    run_dir = Path(cfg.out) / dataset / f"split{split}"
    shared.update(data=root, dataset=dataset, split=split, seed=seed, out=str(run_dir / f"{task}_seed{seed}"))
    epochs, schedule, linear_epochs = PRESETS[cfg.suite]
    if task == "finetune":
        return finetune.FinetuneConfig(**shared, epochs=cfg.finetune_epochs or epochs, schedule=schedule,
                                       lr=cfg.finetune_lr)
    if task == "linear":
        return linear.LinearConfig(**shared, epochs=linear_epochs, cache_dir=str(run_dir / "linear_features"))
    return knn.KnnConfig(**shared)


def _stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(runs, protocol):
    """`[{"dataset", "task", "split", "seed", "metrics"}]` -> rows `{"protocol", "dataset", "task", "metric",
    "split", "mean", "std", "n"}`: one per split (over its seeds, n = seeds) and, with several splits, one for
    the mean over the splits of their means (`split` "mean 1,2,3", std over splits, n = splits)."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for task in TASKS:
            mine = [r for r in runs if r["dataset"] == dataset and r["task"] == task]
            metrics = [m for m in REPORTED[task] + (BEST,) if mine and all(m in r["metrics"] for r in mine)]
            splits = sorted({r["split"] for r in mine})
            for metric in metrics:
                means = []
                for split in splits:
                    stats = _stats([r["metrics"][metric] for r in mine if r["split"] == split])
                    means.append(stats["mean"])
                    rows.append({"protocol": protocol, "dataset": dataset, "task": task, "metric": metric,
                                 "split": str(split), **stats})
                if len(splits) > 1:
                    rows.append({"protocol": protocol, "dataset": dataset, "task": task, "metric": metric,
                                 "split": "mean " + ",".join(map(str, splits)), **_stats(means)})
    return rows


def results_table(rows):
    """The aggregated rows as markdown: one line per dataset, task, metric and split (or mean of splits)."""
    return "\n".join(markdown.table(
        ["protocol", "dataset", "task", "metric", "split", "mean ± std (%)", "n"],
        [[r["protocol"], r["dataset"], r["task"], r["metric"], r["split"], f"{r['mean']:.2f} ± {r['std']:.2f}",
          f"{r['n']} {'splits' if r['split'].startswith('mean') else 'seeds'}"] for r in rows]))


def run(cfg):
    datasets = {name: getattr(cfg, name) for name in LAYOUTS if getattr(cfg, name)}
    if not datasets:
        raise ValueError("give --ucf101 DIR, --hmdb51 DIR and/or --folder DIR (your own DIR/train/<class>/ and "
                         "DIR/test/<class>/)")
    bad = [s for s in cfg.splits if s not in (1, 2, 3)]
    if bad:
        raise ValueError(f"--splits must be 1, 2 or 3, got {bad[0]}")
    for dataset, root in datasets.items():
        check_layout(dataset, root)
    runs, deviations = [], {}
    for dataset, root in datasets.items():
        for split in cfg.splits if dataset != "folder" else cfg.splits[:1]:  # a folder has one train/test split
            for task in cfg.tasks:
                for seed in cfg.seeds[:1] if task == "knn" else cfg.seeds:  # kNN is deterministic
                    run_cfg = task_config(cfg, task, dataset, root, split, seed)
                    log.info("%s %s split %d seed %d -> %s", task, dataset, split, seed, run_cfg.out)
                    metrics = TASKS[task].run(run_cfg)
                    deviations[task] = protocols.deviations(run_cfg)
                    kept = [m for m in REPORTED[task] + (BEST,) if m in metrics]
                    runs.append({"protocol": cfg.protocol, "dataset": dataset, "task": task, "split": split,
                                 "seed": seed, "out": run_cfg.out, "metrics": {k: metrics[k] for k in kept}})
    rows = aggregate(runs, cfg.protocol)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    changed = "; ".join(f"{task}: " + ", ".join(f"{k} {v['used']} (protocol: {v['protocol']})" for k, v in dev.items())
                        for task, dev in deviations.items() if dev) or "none"
    header = (f"# VideoMoCo evaluation, protocol {cfg.protocol} ({cfg.suite})\n\ncheckpoint: "
              f"`{cfg.pretrained or 'random init'}`, splits {cfg.splits}, seeds {cfg.seeds}\n\n"
              f"deviations from the protocol: {changed}\n\n"
              f"`{BEST}`: the best epoch chosen on the test split itself (what the source reports), not a "
              "held-out choice.\n\n")
    (out / "results.md").write_text(header + table + "\n")
    record = {"protocol": cfg.protocol, "deviations": deviations, "config": dataclasses.asdict(cfg), "runs": runs,
              "table": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(header + table)
    return record


def main(args):
    return common.cli_main("evaluate", run, SuiteConfig, args)
