"""The authors' `eval.py` command line (tinapan-pt/VideoMoCo), run as `videomoco finetune --protocol authors`.

    python eval.py DATA --pretrained checkpoint_0199.pth.tar -a r2plus1d_18

DATA is their layout (`DATA/data/<Class>/*.avi` + `DATA/anno/{classInd,trainlist01,testlist01}.txt`)
or a UCF101 root with `ucfTrainTestlist/`. The protocol `authors` is their current eval.py (aba3795, unchanged
at 42e069a): 32 frames, crop 224, ImageNet mean/std, 10 random clips per video per epoch, RandomResizedCrop
(0.08, 1) + flip, BN in eval mode, SGD lr 0.005 momentum 0.9 weight decay 1e-4, batch 256, 10 epochs with
steps at 6 and 8; at test 10 clips per video, a 224 centre crop of the raw frames, logits averaged; the last
epoch is reported and, labelled best_on_test_*, the best epoch on the test split (their best_acc1, the 82.5 of
their README). Their first eval.py (0ed0a13: lr 30, 100 epochs, steps 60 80, every layer but fc frozen) was a
linear probe: `videomoco finetune --protocol authors-lincls`. Only flags given on the command line are
forwarded; each overrides that one choice and is logged as a deviation. Distributed and logging flags are
accepted and ignored.
"""

import argparse
import sys
from pathlib import Path

from videomoco.flags import Parser  # one-line errors, `_` / `-` spellings

# authors' flag(s) -> our finetune flag; None: accepted and ignored
FLAGS = [
    (["-a", "--arch"], "--arch", str), (["--num_class"], "--num-classes", int), (["-j", "--workers"], "--workers", int),
    (["--epochs"], "--epochs", int), (["-b", "--batch-size"], "--batch-size", int),
    (["-cs", "--crop_size"], "--crop", int), (["-fpc", "--frame_per_clip"], "--frames", int),
    (["-cpv", "--clip_per_video"], "--num-clips", int), (["--lr", "--learning-rate"], "--lr", float),
    (["--lr_decay", "--learning-rate_decay"], "--lr-decay", float), (["--wp_lr", "--warmup_learning-rate"], "--wp-lr", float),
    (["--momentum"], "--momentum", float), (["--wd", "--weight-decay"], "--weight-decay", float),
    (["--ckp_dir"], "--out", str), (["--resume"], "--resume", str), (["--seed"], "--seed", int),
    (["--pretrained"], "--pretrained", str),
    (["--start-epoch"], None, int), (["-sbc", "--step_between_clips"], None, int), (["-p", "--print-freq"], None, int),
    (["--log_dir"], None, str), (["--world-size"], None, int), (["--rank"], None, int), (["--dist-url"], None, str),
    (["--dist-backend"], None, str),
]
SWITCHES = [(["--warmup"], "--warmup"), (["--cos"], "--cos"), (["-e", "--evaluate"], "--evaluate"),
            (["--multiprocessing-distributed"], None)]


def translate(argv):
    """The authors' eval.py arguments -> `videomoco finetune` arguments."""
    parser = Parser(prog="eval.py", description="the authors' eval.py flags, run by `videomoco finetune`")
    parser.add_argument("data", metavar="DIR")
    parser.add_argument("--dataset", default="ucf101", choices=["ucf101", "hmdb51"], help="(ours) split-file layout")
    parser.add_argument("--split", default="1", help="(ours) official split; eval.py always uses fold 1")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (else CPU, or cuda when available)")
    parser.add_argument("--schedule", type=int, nargs="*", default=argparse.SUPPRESS)
    for names, ours, type_ in FLAGS:
        parser.add_argument(*names, dest=names[-1].lstrip("-"), type=type_, default=argparse.SUPPRESS)
    for names, ours in SWITCHES:
        parser.add_argument(*names, dest=names[-1].lstrip("-"), action="store_true", default=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))

    data = Path(args.pop("data"))
    if (data / "data").is_dir() and (data / "anno").is_dir():  # their layout: index it with anno/ as split dir
        from videomoco.data.index import build_index

        data = Path(build_index(data / "data", layout=args["dataset"], split_dir=data / "anno").dir)
    out = ["finetune", str(data), "--protocol", "authors", "--dataset", args.pop("dataset"), "--split", args.pop("split")]
    gpu = args.pop("gpu")
    if gpu is not None:
        out += ["--device", f"cuda:{gpu}"]
    if "schedule" in args:
        out += ["--schedule", *map(str, args.pop("schedule"))]
    for names, ours, _ in FLAGS:
        key = names[-1].lstrip("-")
        if key in args and ours:
            out += [ours, str(args[key])]
    for names, ours in SWITCHES:
        if names[-1].lstrip("-") in args and ours:
            out.append(ours)
    return out


if __name__ == "__main__":
    from videomoco.cli import main

    sys.exit(main(translate(sys.argv[1:])))
