"""The authors' `eval.py` command line (tinapan-pt/VideoMoCo), forwarded to `videomoco finetune`.

    python eval.py DATA --pretrained checkpoint_0199.pth.tar -a r2plus1d_18 -fpc 16 -cs 112 -cpv 10

DATA is their layout (`DATA/data/<Class>/*.avi` + `DATA/anno/{classInd,trainlist01,testlist01}.txt`)
or a UCF101 root with `ucfTrainTestlist/`. Only flags given on the command line are forwarded, so
`videomoco finetune`'s defaults apply otherwise: 16 frames, crop 112, 10 clips, 100 epochs, milestones
60 80, momentum 0.9, no weight decay, --lr 0.05, batch 16. Those are the defaults of the authors' first
release of eval.py (but their lr 30, a linear-probe leftover); their current eval.py defaults to 32 frames,
crop 224, lr 0.005, 10 epochs, milestones 6 8, weight decay 1e-4: pass them to get those. Distributed and
logging flags are accepted and ignored.
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
    out = ["finetune", str(data), "--dataset", args.pop("dataset"), "--split", args.pop("split")]
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
