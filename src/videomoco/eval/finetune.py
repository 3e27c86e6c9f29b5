"""Full fine-tuning on UCF101 / HMDB51 (the authors' eval.py protocol), clip- and video-level accuracy.

    load_encoder(--pretrained) with a fresh fc = Linear(feature_dim, C) ~ N(0, 0.01)
    train: one random clip per video per epoch, random resized crop + horizontal flip, SGD momentum 0.9,
           step decay by --lr-decay at each --schedule milestone (the authors' adjust_learning_rate)
    test:  --num-clips uniformly spaced clips x --num-crops crops per video; clip level = every clip
           on its own, video level = softmax averaged over the clips (and crops) of the video

The authors' eval.py keeps BN in eval mode while training (a leftover of their linear-probe script);
we train BN (`model.train()`), the usual fine-tuning protocol. Checkpoints (`checkpoint.pth` in `--out`,
atomic, every epoch) hold the model in torchvision keys plus `arch`, `width`, `num_classes`, so
`load_encoder` reads them; `--resume` continues one and refuses a head of another class count.
A batch that does not fit the device's memory runs in micro-batches (`--micro-batch`, by default
planned from a measured step before the first batch): gradients are accumulated into one update of
the batch's mean loss, while BN normalises each micro-batch on its own.

    videomoco finetune DATA --dataset ucf101 --split 1 --pretrained CKPT --out runs/ft
"""

import logging
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from videomoco.data.augment import normalize
from videomoco.data.datasets import build_loader, set_epoch
from videomoco.engine.checkpoint import finetune_state, load_checkpoint, restore, save_checkpoint
from videomoco.engine.schedule import learning_rate
from videomoco.eval import common
from videomoco.eval.features import confusion_matrix, per_class_accuracy, topk_accuracy, video_scores
from videomoco.models import set_grad_checkpointing

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(common.EvalConfig):
    epochs: int = 100
    lr: float = 0.05
    lr_decay: float = 0.1
    schedule: list = field(default_factory=lambda: [60, 80])
    cos: bool = False
    warmup: bool = False
    wp_lr: float = 0.0025
    momentum: float = 0.9
    weight_decay: float = 0.0
    num_classes: int = 0  # 0 = from the dataset; else must match it
    eval_every: int = 0  # evaluate every N epochs as well as at the end (0: only at the end)
    resume: str = ""
    evaluate: bool = False  # only evaluate (the --pretrained or --resume model), no training
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    out: str = "runs/finetune"


def add_arguments(parser):
    common.add_common_arguments(parser, FinetuneConfig)
    flag = partial(common.add_flag, parser, FinetuneConfig)
    flag("epochs", "fine-tuning epochs")
    flag("lr", "SGD learning rate")
    flag("lr_decay", "factor at each --schedule milestone")
    flag("schedule", "epochs where the LR drops", nargs="*")
    flag("cos", "cosine LR schedule instead of steps", action="store_true")
    flag("warmup", "linear warm-up from --wp_lr to --lr until schedule[0]", action="store_true")
    flag("wp_lr", "initial warm-up learning rate")
    flag("momentum", "SGD momentum")
    flag("weight_decay", "weight decay")
    flag("num_classes", "expected class count, checked against the dataset (0: from the dataset)")
    flag("eval_every", "also evaluate every N epochs (0: only at the end)")
    flag("resume", "continue from a fine-tuning checkpoint.pth")
    flag("evaluate", "only evaluate the --pretrained / --resume model", action="store_true")
    flag("grad_checkpointing", "activation checkpointing of the encoder's blocks: less memory, more compute",
         action="store_true")


def flip(x, generator=None):
    """Horizontally flip a random half of the clips `(B, C, T, H, W)`."""
    mask = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else x.device) < 0.5
    return torch.where(mask.to(x.device)[:, None, None, None, None], x.flip(-1), x)


def train_one_epoch(model, loader, optimizer, device, generator=None, micro_batch=None):
    """One pass over `loader`; returns the mean loss and clip accuracy of the epoch.

    micro_batch: clips per forward/backward (None: the whole batch). The gradients of a batch's
    micro-batches, each loss weighted by its share of the batch, add up to those of the batch's mean
    loss: one optimizer step per batch. (BN in train mode normalises each micro-batch on its own.)
    """
    model.train()
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for clip, label, _ in loader:
        x = flip(normalize(clip.to(device, non_blocking=True)), generator)  # (B, 3, T, H, W), flips drawn per batch
        label = label.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(x.split(micro_batch), label.split(micro_batch))) if micro_batch else [(x, label)]
        for xs, ys in parts:
            logits = model(xs)  # (b, C)
            loss = F.cross_entropy(logits, ys)
            (loss * (len(ys) / len(label)) if len(parts) > 1 else loss).backward()
            total_loss += loss.detach() * len(ys)
            correct += (logits.argmax(1) == ys).sum()
        optimizer.step()
        seen += len(label)
    if not torch.isfinite(total_loss):
        raise FloatingPointError("fine-tuning loss is not finite; lower --lr")
    return float(total_loss) / max(seen, 1), 100.0 * float(correct) / max(seen, 1)


def evaluate(cfg, model, num_classes):
    """Clip- and video-level top-1/top-5, per-class accuracy and the video-level confusion matrix."""
    rows = common.extract(cfg, model, "test", head=True)
    logits, labels = rows["features"], rows["labels"]
    _, video_probs, video_labels = video_scores(logits, rows["video_ids"], labels)
    cm = confusion_matrix(video_probs.argmax(1), video_labels, num_classes)
    metrics = {f"clip_{k}": v for k, v in topk_accuracy(logits, labels).items()}
    metrics.update({f"video_{k}": v for k, v in topk_accuracy(video_probs, video_labels).items()})
    metrics.update(num_test_clips=len(labels), num_test_videos=len(video_labels))
    return metrics, cm


def plot_confusion(cm, path, names=None):
    """Save the row-normalised confusion matrix as a PNG."""
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.12 * len(cm), 24)
    fig = Figure(figsize=(size, size))  # no pyplot: no global state, no display backend
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if names and len(names) <= 60:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _resume(cfg, model, optimizer, num_classes):
    ckpt = load_checkpoint(cfg.resume, resume=True)  # fields and weights checked
    head = ckpt.get("num_classes")
    if head != num_classes:
        raise ValueError(f"{cfg.resume} has a {head}-class head but {cfg.data} ({cfg.dataset}) has {num_classes} classes")
    restore(cfg.resume, "state_dict", model.load_state_dict, ckpt["state_dict"])
    restore(cfg.resume, "optimizer", optimizer.load_state_dict, ckpt["optimizer"])
    return ckpt["epoch"]


def run(cfg):
    common.seed_everything(cfg.seed)
    train_set = common.labeled_dataset(cfg, "train", mode="train")
    names = common.class_names(train_set)
    num_classes = len(names) if names else int(train_set.labels.max()) + 1
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(f"--num-classes {cfg.num_classes} but {cfg.data} ({cfg.dataset}) has {num_classes} classes")
    if cfg.evaluate and not cfg.resume:  # a fine-tuned checkpoint: keep its head
        model = common.load_model(cfg)
        head = getattr(model.fc, "out_features", None)
        if head != num_classes:
            raise ValueError(f"{cfg.pretrained or 'random init'} has a {head}-class head but {cfg.data} has {num_classes} classes")
    elif cfg.resume and not cfg.pretrained:  # the fine-tuning checkpoint knows its arch and width
        model = common.load_model(replace(cfg, pretrained=cfg.resume), num_classes=num_classes)
    else:
        model = common.load_model(cfg, num_classes=num_classes)
    model = model.to(cfg.device)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = _resume(cfg, model, optimizer, num_classes) if cfg.resume else 0
    micro_batch = None
    if not cfg.evaluate and start < cfg.epochs:  # planned once, before the first batch
        micro_batch = common.plan_micro_batch(cfg, model, min(cfg.batch_size, len(train_set)), train=True,
                                              optimizer=optimizer)
    loader = build_loader(train_set, cfg.batch_size, cfg.workers, shuffle=True, drop_last=len(train_set) >= cfg.batch_size,
                          seed=cfg.seed, pin_memory=str(cfg.device).startswith("cuda"))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    out = Path(cfg.out)
    history = []
    for epoch in range(start, start if cfg.evaluate else cfg.epochs):
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.schedule, cfg.lr_decay, cfg.cos, cfg.warmup, cfg.wp_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_epoch(loader, epoch)
        loss, acc = train_one_epoch(model, loader, optimizer, cfg.device, generator, micro_batch)
        log.info("epoch %d/%d lr %.4g loss %.4f train clip acc %.2f", epoch + 1, cfg.epochs, lr, loss, acc)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_clip_top1": acc}
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            record.update(evaluate(cfg, model, num_classes)[0])
        history.append(record)
        save_checkpoint(finetune_state(model, optimizer, epoch + 1, num_classes, names), out / "checkpoint.pth")

    metrics, cm = evaluate(cfg, model, num_classes)
    per_class = per_class_accuracy(cm)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(cm, out / "confusion.png", names)
    np.save(out / "confusion.npy", cm)
    metrics.update(num_classes=num_classes, epochs=start if cfg.evaluate else cfg.epochs, history=history,
                   per_class_video_top1={(names[i] if names else str(i)): (None if np.isnan(a) else float(a))
                                         for i, a in enumerate(per_class)})
    return common.write_results(cfg, "finetune", metrics)


def main(args):
    return common.cli_main("finetune", run, FinetuneConfig, args)
