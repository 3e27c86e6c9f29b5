"""The whole evaluation protocol in one table: fine-tune, linear probe and kNN/retrieval on UCF101 and
HMDB51, over splits and seeds, reported as mean +- std.

    videomoco evaluate --suite paper --ucf101 DIR --hmdb51 DIR --pretrained CKPT \
        [--splits 1 2 3] [--seeds 0 1 2] [--protocols finetune linear knn] --out runs/eval
    videomoco evaluate --folder MYDATA --pretrained CKPT ...    # your own labels: MYDATA/{train,test}/<class>/

Each run writes its own directory `OUT/<dataset>/split<k>/<protocol>_seed<n>/`; the table goes to
`OUT/results.md` and `OUT/results.json` (every run's metrics plus the aggregates). kNN has no
randomness, so it runs once per split; the linear probe shares one feature cache per split.
`--suite quick` shortens every schedule (1 fine-tuning epoch, 10 probe epochs) for smoke tests.
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
from videomoco.eval import common, finetune, knn, linear

log = logging.getLogger(__name__)

PROTOCOLS = {"finetune": finetune, "linear": linear, "knn": knn}
REPORTED = {  # protocol -> metrics in the table, in order
    "finetune": ("clip_top1", "clip_top5", "video_top1", "video_top5"),
    "linear": ("clip_top1", "video_top1"),
    "knn": ("knn_top1_k1", "knn_top1_k20", "R@1", "R@5", "R@10", "R@20", "R@50"),
}
PRESETS = {  # suite -> (fine-tuning epochs, LR milestones, linear-probe epochs)
    "paper": (100, [60, 80], 100),
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
    protocols: list = field(default_factory=lambda: ["finetune", "linear", "knn"])
    finetune_epochs: int = 0  # 0 = the suite's preset
    finetune_lr: float = 0.05
    out: str = "runs/evaluate"


def add_arguments(parser):
    common.add_common_arguments(parser, SuiteConfig, data=False)
    flag = partial(common.add_flag, parser, SuiteConfig)
    flag("suite", "paper schedules or a quick smoke test", choices=sorted(PRESETS))
    flag("ucf101", "UCF101 root (with ucfTrainTestlist/) or its index")
    flag("hmdb51", "HMDB51 root (with testTrainMulti_7030_splits/) or its index")
    flag("folder", "your own labelled videos: DIR/train/<class>/ and DIR/test/<class>/ (or DIR/val/<class>/)")
    flag("splits", "official splits (1 = authors' parity)", nargs="+")
    flag("seeds", "seeds of the fine-tuning and linear runs", nargs="+")
    flag("protocols", "protocols to run", nargs="+", choices=list(PROTOCOLS))
    flag("finetune_epochs", "override the suite's fine-tuning epochs (0: the preset's)")
    flag("finetune_lr", "fine-tuning learning rate")


LAYOUTS = {"ucf101": "ucf101", "hmdb51": "hmdb51", "folder": "kinetics"}  # flag -> the index layout it reads


def check_layout(dataset, root):
    """One line naming the right flag when `root` (given as --ucf101 / --hmdb51 / --folder) holds another layout;
    before any run, so no protocol's error names a flag that `evaluate` does not have."""
    index = open_index(root)
    if index.layout == LAYOUTS[dataset]:
        return
    if LAYOUTS[dataset] == "kinetics":
        raise ValueError(f"--folder {root} has no train/ and test/ (or val/) class folders ({index.layout} layout): "
                         "evaluation needs DIR/train/<class>/<video> and DIR/test/<class>/<video>")
    fix = next((f"give it as --{name} {root}" for name, layout in LAYOUTS.items() if layout == index.layout),
               "give your own labelled videos as --folder DIR (DIR/train/<class>/, DIR/test/<class>/)")
    raise ValueError(f"--{dataset} {root} is indexed as {index.layout}, not {dataset}: {fix}")


def protocol_config(cfg, protocol, dataset, root, split, seed):
    """The config of one run: the suite's shared fields plus the protocol's schedule."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(common.EvalConfig)}
    run_dir = Path(cfg.out) / dataset / f"split{split}"
    shared.update(data=root, dataset=dataset, split=split, seed=seed, out=str(run_dir / f"{protocol}_seed{seed}"))
    epochs, schedule, linear_epochs = PRESETS[cfg.suite]
    if protocol == "finetune":
        return finetune.FinetuneConfig(**shared, epochs=cfg.finetune_epochs or epochs, schedule=schedule, lr=cfg.finetune_lr)
    if protocol == "linear":
        return linear.LinearConfig(**shared, epochs=linear_epochs, cache_dir=str(run_dir / "linear_features"))
    return knn.KnnConfig(**shared)


def aggregate(runs):
    """`[{"dataset", "protocol", "metrics"}]` -> rows `{"dataset", "protocol", "metric", "mean", "std", "n"}`."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for protocol in PROTOCOLS:
            mine = [r["metrics"] for r in runs if r["dataset"] == dataset and r["protocol"] == protocol]
            for metric in REPORTED[protocol] if mine else ():
                values = np.array([m[metric] for m in mine], dtype=np.float64)
                std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                rows.append({"dataset": dataset, "protocol": protocol, "metric": metric,
                             "mean": float(values.mean()), "std": std, "n": len(values)})
    return rows


def results_table(rows):
    """The aggregated rows as markdown: one line per dataset, protocol and metric."""
    return "\n".join(markdown.table(["dataset", "protocol", "metric", "mean ± std (%)", "runs"],
                                    [[r["dataset"], r["protocol"], r["metric"], f"{r['mean']:.2f} ± {r['std']:.2f}",
                                      r["n"]] for r in rows]))


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
    runs = []
    for dataset, root in datasets.items():
        for split in cfg.splits if dataset != "folder" else cfg.splits[:1]:  # a folder has one train/test split
            for protocol in cfg.protocols:
                for seed in cfg.seeds[:1] if protocol == "knn" else cfg.seeds:  # kNN is deterministic
                    run_cfg = protocol_config(cfg, protocol, dataset, root, split, seed)
                    log.info("%s %s split %d seed %d -> %s", protocol, dataset, split, seed, run_cfg.out)
                    metrics = PROTOCOLS[protocol].run(run_cfg)
                    runs.append({"dataset": dataset, "protocol": protocol, "split": split, "seed": seed,
                                 "out": run_cfg.out, "metrics": {k: metrics[k] for k in REPORTED[protocol]}})
    rows = aggregate(runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows)
    header = f"# VideoMoCo evaluation ({cfg.suite})\n\ncheckpoint: `{cfg.pretrained or 'random init'}`, " \
             f"splits {cfg.splits}, seeds {cfg.seeds}\n\n"
    (out / "results.md").write_text(header + table + "\n")
    record = {"config": dataclasses.asdict(cfg), "runs": runs, "table": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(header + table)
    return record


def main(args):
    return common.cli_main("evaluate", run, SuiteConfig, args)
