"""Tiny UCF101 / HMDB51 dataset roots with the real split-file formats, for the evaluation tests."""

import torch
import torch.nn as nn

from videomoco.data.encode import write_video
from videomoco.method.moco import mlp_head
from videomoco.models import build_encoder

CLASSES = ("ApplyEyeMakeup", "Biking", "Diving")


def _write(root, rel, make_video, frames_fn, label, n, num_frames, size):
    if frames_fn is None:  # the shared moving-square videos; the seed makes each video distinct
        path = make_video(f"{root.name}/{rel}", num_frames=num_frames, size=size, codec="mpeg4", seed=100 * label + n)
    else:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, frames_fn(label, n), fps=25, codec="mpeg4")
    return path


def ucf101_root(tmp_path, make_video, classes=CLASSES, train=2, test=2, num_frames=16, size=48, frames_fn=None,
                missing=0, name="UCF101"):
    """`ROOT/<Class>/v_<Class>_gXX_c01.avi` + `ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt`.

    Groups 1..train are train videos, the next `test` groups test videos; `missing` extra test
    lines name videos that are not on disk.
    """
    root = tmp_path / name
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    train_lines, test_lines = [], []
    for label, cls in enumerate(classes):
        for g in range(1, train + test + 1):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            _write(root, rel, make_video, frames_fn, label, g, num_frames, size)
            if g <= train:
                train_lines.append(f"{rel} {label + 1}")
            else:
                test_lines.append(rel)
    test_lines += [f"{classes[0]}/v_{classes[0]}_g9{i}_c01.avi" for i in range(missing)]
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)))
    (lists / "trainlist01.txt").write_text("\r\n".join(train_lines) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test_lines) + "\r\n")
    return root


def hmdb51_root(tmp_path, make_video, classes=("brush_hair", "cartwheel"), train=2, test=2, unused=1, num_frames=16,
                size=48, frames_fn=None, name="HMDB51"):
    """`ROOT/<class>/<video>.avi` + `testTrainMulti_7030_splits/<class>_test_split1.txt` ("<video>.avi 1|2|0")."""
    root = tmp_path / name
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for label, cls in enumerate(classes):
        lines = []
        for n in range(train + test + unused):
            video = f"{cls}_video_{n}.avi"
            _write(root, f"{cls}/{video}", make_video, frames_fn, label, n, num_frames, size)
            lines.append(f"{video} {1 if n < train else 2 if n < train + test else 0}")
        (splits / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_args(out, *extra):
    """Flags that keep every command tiny on CPU: width 8, 8 frames, 32 px, 2 clips, no workers."""
    return ["--arch", "r3d_18", "--width", "8", "--frames", "8", "--crop", "32", "--num-clips", "2",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


def pretrain_checkpoint(path, arch="r3d_18", width=8, mlp=False, generator=None, mlp_bn=False):
    """Our pretraining checkpoint layout with a distinct query and key encoder (and `generator`'s state)."""
    torch.manual_seed(0)
    q, k = build_encoder(arch, num_classes=16, width=width), build_encoder(arch, num_classes=16, width=width)
    if mlp:
        for enc in (q, k):
            enc.fc = nn.Sequential(nn.Linear(enc.feature_dim, enc.feature_dim), nn.ReLU(), nn.Linear(enc.feature_dim, 16))
    if mlp_bn:
        for enc in (q, k):
            enc.fc = mlp_head(enc.fc, bn=True)
    for m in q.modules():  # non-trivial BN statistics, so a wrong load shows up in the features
        if isinstance(m, (nn.BatchNorm3d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {"queue": torch.randn(16, 32), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    sd.update({f"encoder_q.{k_}": v for k_, v in q.state_dict().items()})
    sd.update({f"encoder_k.{k_}": v for k_, v in k.state_dict().items()})
    ckpt = {"format": "videomoco", "version": 1, "epoch": 1, "arch": arch,
            "config": {"width": width, "dim": 16, "mlp": mlp, "mlp_bn": mlp_bn}, "state_dict": sd}
    if generator is not None:
        ckpt["generator"] = generator.state_dict()
        ckpt["config"]["generator"] = generator.kind
    torch.save(ckpt, path)
    return q.eval()


def official_root(tmp_path, make_video, official, dataset, classes=2, per_subset=2, num_frames=20, size=40):
    """A UCF101 or HMDB51 root whose split files are the real ones (shared/fixtures/official_splits): tiny videos
    for the first `per_subset` train and test videos of split 1 of the first `classes` classes; every other
    video the split files name is missing (skipped with a warning, as on a partial download)."""
    import shutil

    root = tmp_path / dataset
    if dataset == "ucf101":
        shutil.copytree(official / "ucfTrainTestlist", root / "ucfTrainTestlist")
        lists = root / "ucfTrainTestlist"
        names = [line.split()[1] for line in (lists / "classInd.txt").read_text().splitlines()[:classes]]
        train = [line.split()[0] for line in (lists / "trainlist01.txt").read_text().splitlines() if line.strip()]
        test = [line.strip() for line in (lists / "testlist01.txt").read_text().splitlines() if line.strip()]
        pick = [v for c in names for subset in (train, test) for v in [v for v in subset if v.split("/")[0] == c][:per_subset]]
    else:
        shutil.copytree(official / "testTrainMulti_7030_splits", root / "testTrainMulti_7030_splits")
        names = sorted(p.name[: -len("_test_split1.txt")]
                       for p in (root / "testTrainMulti_7030_splits").glob("*_test_split1.txt"))[:classes]
        pick = []
        for c in names:
            rows = [line.split() for line in (root / "testTrainMulti_7030_splits" / f"{c}_test_split1.txt")
                    .read_text().splitlines() if line.strip()]
            for flag in ("1", "2"):
                pick += [f"{c}/{video}" for video, f in rows if f == flag][:per_subset]
    for n, rel in enumerate(pick):
        make_video(f"{dataset}/{rel}", num_frames=num_frames + 3 * n, size=size, codec="mpeg4", seed=n)
    return root
