"""Fine-tuning on UCF101 / HMDB51 under an evaluation protocol (`--protocol`, eval/protocols.py), clip- and
video-level accuracy.

    load_encoder(--pretrained) with a fresh fc = Linear(feature_dim, C) ~ N(0, 0.01)
    train: --clips-per-video random clips per video per epoch, random resized crop (the protocol's scale and
           ratio) + horizontal flip, SGD momentum, step decay by --lr-decay at each --schedule milestone (the
           authors' adjust_learning_rate) or cosine; BN in train or eval mode (--bn); all layers or only fc
    test:  the protocol's test clips x --num-crops crops per video; clip level = every clip on its own,
           video level = the softmax or the logits (--aggregation) averaged over the clips of the video

The protocol `videomoco` (the default) trains BN; `authors` (their eval.py at aba3795) keeps it in eval mode,
averages logits and also reports, labelled `best_on_test_*`, the best epoch on the test split (what their
eval.py keeps as best_acc1). Inputs are normalised with the checkpoint's recorded statistics unless the
protocol names others. Checkpoints (`checkpoint.pth` in `--out`, atomic, every epoch) hold the model in
torchvision keys plus `arch`, `width`, `num_classes`, `input_norm`, so `load_encoder` reads them; `--resume`
continues one and refuses a head of another class count.
A batch that does not fit the device's memory runs in micro-batches (`--micro-batch`, by default
planned from a measured step before the first batch): gradients are accumulated into one update of
the batch's mean loss, while BN in train mode normalises each micro-batch on its own.

    videomoco finetune DATA --dataset ucf101 --split 1 --pretrained CKPT --protocol authors --out runs/ft
"""

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from videomoco.data.augment import normalize
from videomoco.data.datasets import build_loader, set_epoch
from videomoco.engine.checkpoint import (checkpoint_input_norm, encoder_input_norm, finetune_state, load_checkpoint,
                                         restore, save_checkpoint)
from videomoco.engine.schedule import learning_rate
from videomoco.eval import common, planning, protocols
from videomoco.eval.features import confusion_matrix, device_layout, per_class_accuracy, topk_accuracy, video_scores
from videomoco.models import set_grad_checkpointing

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(common.EvalConfig):
    PROTOCOL_PART = "finetune"  # the fields left at None come from the protocol's FinetuneRecipe

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay: float | None = None
    schedule: list | None = None
    cos: bool | None = None
    warmup: bool = False
    wp_lr: float = 0.0025
    momentum: float | None = None
    weight_decay: float | None = None
    clips_per_video: int | None = None  # random training clips per video per epoch
    aggregation: str | None = None  # softmax | logits: what is averaged over a video's test clips
    bn: str | None = None  # train | eval: BatchNorm's statistics while fine-tuning
    train_layers: str | None = None  # all | fc (every layer but the classifier frozen: a linear probe)
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
    flag("cos", "cosine LR schedule instead of steps", action="store_const", const=True)
    flag("warmup", "linear warm-up from --wp_lr to --lr until schedule[0]", action="store_true")
    flag("wp_lr", "initial warm-up learning rate")
    flag("momentum", "SGD momentum")
    flag("weight_decay", "weight decay")
    flag("clips_per_video", "random training clips per video per epoch")
    flag("aggregation", "averaged over a video's test clips", choices=list(protocols.AGGREGATIONS))
    flag("bn", "BatchNorm while fine-tuning: batch statistics (train) or frozen running ones (eval)",
         choices=list(protocols.BN_MODES))
    flag("train_layers", "train every layer, or only the classifier (fc: a linear probe)",
         choices=list(protocols.TRAIN_LAYERS))
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


def train_one_epoch(model, loader, optimizer, device, generator=None, micro_batch=None, norm=None, bn="train",
                    amp_dtype=None):
    """One pass over `loader`; returns the mean loss and clip accuracy of the epoch.

    micro_batch: clips per forward/backward (None: the whole batch). The gradients of a batch's
    micro-batches, each loss weighted by its share of the batch, add up to those of the batch's mean
    loss: one optimizer step per batch. (BN in train mode normalises each micro-batch on its own.)
    norm: `{"mean", "std"}` of the input (None: Kinetics'); bn="eval" keeps BN's running statistics (the
    authors' eval.py), so micro-batches change nothing. amp_dtype: autocast dtype of the forward (bf16 needs no
    loss scaling; None: fp32).
    """
    model.train(bn == "train")
    stats = (norm["mean"], norm["std"]) if norm else ()
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for clip, label, _ in loader:
        x = flip(normalize(clip.to(device, non_blocking=True), *stats), generator)  # (B, 3, T, H, W), flips per batch
        label = label.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(x.split(micro_batch), label.split(micro_batch))) if micro_batch else [(x, label)]
        for xs, ys in parts:
            with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(device_layout(xs)).float()  # (b, C)
            loss = F.cross_entropy(logits, ys)
            (loss * (len(ys) / len(label)) if len(parts) > 1 else loss).backward()
            total_loss += loss.detach() * len(ys)
            correct += (logits.argmax(1) == ys).sum()
        optimizer.step()
        seen += len(label)
    if not torch.isfinite(total_loss):
        raise FloatingPointError("fine-tuning loss is not finite; lower --lr")
    return float(total_loss) / max(seen, 1), 100.0 * float(correct) / max(seen, 1)


def evaluate(cfg, model, num_classes, norm=None):
    """Clip- and video-level top-1/top-5, per-class accuracy and the video-level confusion matrix (the video's
    score: `cfg.aggregation` of its clips' logits)."""
    rows = common.extract(cfg, model, "test", head=True, norm=norm)
    logits, labels = rows["features"], rows["labels"]
    _, video_probs, video_labels = video_scores(logits, rows["video_ids"], labels, cfg.aggregation)
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
    """Load `cfg.resume` into `model` and `optimizer` (and its recorded input normalisation); its epoch."""
    ckpt = load_checkpoint(cfg.resume, resume=True)  # fields and weights checked
    head = ckpt.get("num_classes")
    if head != num_classes:
        raise ValueError(f"{cfg.resume} has a {head}-class head but {cfg.data} ({cfg.dataset}) has {num_classes} classes")
    restore(cfg.resume, "state_dict", model.load_state_dict, ckpt["state_dict"])
    restore(cfg.resume, "optimizer", optimizer.load_state_dict, ckpt["optimizer"])
    recorded = checkpoint_input_norm(ckpt)
    if recorded["name"] != encoder_input_norm(model)["name"]:
        log.info("--resume %s was fine-tuned on %s-normalised inputs: using them", cfg.resume, recorded["name"])
    model.preprocessing = {**getattr(model, "preprocessing", {}), "input_norm": recorded}
    return ckpt["epoch"]


def _optimizer(cfg, model):
    """SGD over the trained parameters: all, or with `train_layers="fc"` the classifier's (the rest frozen)."""
    if cfg.train_layers == "fc":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("fc."))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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
    optimizer = _optimizer(cfg, model)
    start = _resume(cfg, model, optimizer, num_classes) if cfg.resume else 0
    norm = common.input_stats(cfg, model)
    amp_dtype = common.accelerate(cfg, model)
    best_each_epoch = protocols.part(cfg, "finetune").report == "last+best"
    micro_batch = None
    if not cfg.evaluate and start < cfg.epochs:  # planned once, before the first batch
        micro_batch = planning.plan_micro_batch(cfg, model, min(cfg.batch_size, len(train_set)), train=True,
                                              optimizer=optimizer)
    loader = build_loader(train_set, cfg.batch_size, cfg.workers, shuffle=True, drop_last=len(train_set) >= cfg.batch_size,
                          seed=cfg.seed, pin_memory=str(cfg.device).startswith("cuda"))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    out = Path(cfg.out)
    history, best = [], None
    for epoch in range(start, start if cfg.evaluate else cfg.epochs):
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.schedule, cfg.lr_decay, cfg.cos, cfg.warmup, cfg.wp_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_epoch(loader, epoch)
        loss, acc = train_one_epoch(model, loader, optimizer, cfg.device, generator, micro_batch, norm, cfg.bn,
                                    amp_dtype)
        log.info("epoch %d/%d lr %.4g loss %.4f train clip acc %.2f", epoch + 1, cfg.epochs, lr, loss, acc)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_clip_top1": acc}
        last = epoch + 1 == cfg.epochs
        if not last and (best_each_epoch or cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            record.update(evaluate(cfg, model, num_classes, norm)[0])
            best = _better(best, record)
        history.append(record)
        save_checkpoint(finetune_state(model, optimizer, epoch + 1, num_classes, names, norm), out / "checkpoint.pth")

    metrics, cm = evaluate(cfg, model, num_classes, norm)
    if best_each_epoch:  # what the authors' eval.py keeps (best_acc1): chosen on the test split, so labelled
        best = _better(best, {"epoch": start if cfg.evaluate else cfg.epochs, **metrics})
        metrics.update(best_on_test_video_top1=best["video_top1"], best_on_test_video_top5=best["video_top5"],
                       best_on_test_epoch=best["epoch"])
    per_class = per_class_accuracy(cm)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(cm, out / "confusion.png", names)
    np.save(out / "confusion.npy", cm)
    metrics.update(num_classes=num_classes, epochs=start if cfg.evaluate else cfg.epochs, history=history,
                   per_class_video_top1={(names[i] if names else str(i)): (None if np.isnan(a) else float(a))
                                         for i, a in enumerate(per_class)})
    return common.write_results(cfg, "finetune", metrics)


def _better(best, record):
    """The record with the higher video top-1, the earlier on a tie (the authors' `acc1 > best_acc1`)."""
    return record if best is None or record["video_top1"] > best["video_top1"] else best


def main(args):
    return common.cli_main("finetune", run, FinetuneConfig, args)
