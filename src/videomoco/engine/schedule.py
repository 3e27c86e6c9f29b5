"""Learning-rate schedule of the authors' train.py: step decay, linear warm-up, or cosine.

The rate is a pure function of the epoch, so a checkpoint only needs the epoch to restore the
schedule position; `schedule_state` records it (and the rate) for the record.
"""

import math


def learning_rate(epoch, lr, epochs, schedule=(120, 160), lr_decay=0.1, cos=False, warmup=False, wp_lr=0.0025):
    """Learning rate for `epoch` (0-based), exactly as `adjust_learning_rate` in the authors' code.

    - `cos`: `lr * 0.5 * (1 + cos(pi * epoch / epochs))`.
    - `warmup`: linear from `wp_lr` to `lr` over the first `schedule[0]` epochs, then decay by
      `lr_decay` at each later milestone.
    - otherwise: multiply by `lr_decay` at each milestone in `schedule`.
    """
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    milestones = list(schedule)
    if warmup:
        if not milestones:
            raise ValueError("--warmup needs at least one --schedule milestone (the warm-up length)")
        if epoch < milestones[0]:
            return wp_lr + (lr - wp_lr) / milestones[0] * epoch
        milestones = milestones[1:]
    for milestone in milestones:
        if epoch >= milestone:
            lr *= lr_decay
    return lr


def lr_for(cfg, epoch, base_lr=None):
    """`learning_rate` with the schedule flags of a `PretrainConfig`; `base_lr` overrides `cfg.lr`."""
    return learning_rate(
        epoch,
        cfg.lr if base_lr is None else base_lr,
        cfg.epochs,
        cfg.schedule,
        cfg.lr_decay,
        cfg.cos,
        cfg.warmup,
        cfg.wp_lr,
    )


def set_lr(optimizer, lr):
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_state(cfg, epoch):
    """What a checkpoint stores about the schedule (plain types)."""
    return {"epoch": int(epoch), "lr": float(lr_for(cfg, epoch)), "cos": bool(cfg.cos), "warmup": bool(cfg.warmup)}
