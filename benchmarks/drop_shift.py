"""Why kNN on clips with dropped frames can fall below chance: where the dropped clips' features go.

    python -m benchmarks.drop_shift --demo runs/demo

For each encoder of a finished `videomoco demo` (MoCo, VideoMoCo, supervised) and each random-drop ratio,
the demo's own evaluation (clean train videos as the kNN bank, test clips with frames dropped and
mean-filled): kNN top-1 (k=20), how far the dropped features move together (the norm of their mean shift
over the norm of the mean clean feature, and each clip's shift's cosine with the mean shift), kNN after
centring the bank and the queries on their own means, and the classes the nearest neighbour predicts.
docs/demo.md, "Below chance under dropped frames", has one run.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from videomoco.demo import BUDGETS, DemoConfig, eval_config
from videomoco.eval import common, robustness
from videomoco.eval.features import video_average
from videomoco.eval.knn import knn_accuracy

K = 20


def shift_rows(ecfg, ratios):
    """One row per ratio for the encoder `ecfg.pretrained` (see the module docstring)."""
    common.seed_everything(ecfg.seed)
    encoder = common.load_model(ecfg).eval()
    train = common.extract(ecfg, encoder, "train")
    _, bank_x, bank_y = video_average(train["features"], train["video_ids"], train["labels"])
    rcfg = robustness.RobustnessConfig(**dataclasses.asdict(ecfg))
    rcfg.ratios = [0.0, *ratios]
    loader = common.make_loader(rcfg, common.labeled_dataset(rcfg, "test", mode="test"))
    clean, dropped, labels, ids = robustness.dropped_features(rcfg, encoder, loader, robustness.droppers(rcfg))
    _, clean_x, _ = video_average(clean, ids, labels)
    rows = []
    for (_, ratio), feats in dropped.items():
        if ratio == 0.0:
            continue
        _, x, y = video_average(feats, ids, labels)
        shift = x - clean_x  # (videos, D)
        mean_shift = shift.mean(0)
        nearest = bank_y[(F.normalize(torch.as_tensor(x), dim=1) @ F.normalize(torch.as_tensor(bank_x), dim=1).T)
                         .argmax(1).numpy()]
        rows.append({
            "ratio": ratio, "knn_top1": knn_accuracy(bank_x, bank_y, x, y, (K,))[f"knn_top1_k{K}"],
            "shift_over_mean": float(np.linalg.norm(mean_shift) / np.linalg.norm(clean_x.mean(0))),
            "shift_cosine": float(F.cosine_similarity(torch.as_tensor(shift), torch.as_tensor(mean_shift)[None]).mean()),
            "knn_centred": knn_accuracy(bank_x - bank_x.mean(0), bank_y, x - x.mean(0), y, (K,))[f"knn_top1_k{K}"],
            "nearest_classes": np.bincount(nearest, minlength=int(bank_y.max()) + 1).tolist(),
        })
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.drop_shift", description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo", help="the --out of a finished `videomoco demo`")
    p.add_argument("--quick", action="store_true", help="the demo was a `videomoco demo --quick`")
    args = p.parse_args(argv)
    demo, budget = Path(args.demo), BUDGETS["quick" if args.quick else "default"]
    checkpoints = json.loads((demo / "summary.json").read_text())["checkpoints"]
    for name, ckpt in checkpoints.items():
        ecfg = eval_config(DemoConfig(), budget, demo / "data", "cpu", ckpt, 0)
        for row in shift_rows(ecfg, [r for r in budget.ratios if r > 0]):
            print(json.dumps({"encoder": name, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
