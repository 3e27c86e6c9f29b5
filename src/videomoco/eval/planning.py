"""The evaluation's memory planning, the eval side of `videomoco.engine.memory` (pretraining's planner).

Before the first batch of a command, one forward (fine-tuning: one training step, on a copy) of 1 and 2
random clips is measured, and a loader batch that would not fit is run in micro-batches of clips:
`--micro-batch auto`. Inference is split after normalisation (BN in eval mode: the same features);
fine-tuning accumulates the gradients of the micro-batches into one update of the whole batch's mean loss.
When not even one clip fits, the command stops with one line naming the estimate and what to lower.
"""

import argparse
import copy
import dataclasses
import logging
import math
import weakref

import torch
import torch.nn.functional as F

from videomoco.engine import memory
from videomoco.engine.config import micro_batch_arg

log = logging.getLogger(__name__)


def micro_batch(cfg):
    try:
        return micro_batch_arg(cfg.micro_batch)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--micro-batch {e}") from None


def budget_limit(cfg):
    """`--memory-budget` in bytes, or None when not given."""
    if not getattr(cfg, "memory_budget", ""):
        return None
    try:
        return memory.parse_size(cfg.memory_budget)
    except ValueError as e:
        raise ValueError(f"--memory-budget: {e}") from None


_ESTIMATES = weakref.WeakKeyDictionary()  # model -> {(kind, head, clip, device): StepEstimate}: probed once


def _command(cfg):
    name = type(cfg).__name__
    return "eval" if name == "EvalConfig" else name.removesuffix("Config").lower()


def probe_estimate(model, clip, device, train=False, head=False, optimizer=None, momentum=0.9, per_input_clip=0):
    """`memory.StepEstimate` of a forward of `model` (train: a fine-tuning step) on clips (C, T, H, W).

    Inference runs `forward_features` (head: the full forward) under inference_mode in eval mode; a
    training step (forward, cross-entropy, backward, SGD step) runs on a copy of the model, whose bytes
    are subtracted, as are those of `optimizer`'s state (its copy stands in for it). The model's mode
    and the global RNG are left as they were.
    """
    device = torch.device(device)
    was_training = model.training
    with memory.probing(device):
        if train:
            probe = copy.deepcopy(model).train()
            opt = torch.optim.SGD(probe.parameters(), lr=1e-3, momentum=momentum)
            subtract = memory.tensor_bytes(probe.state_dict().values()) + memory.optimizer_bytes(optimizer)

            def step(m):
                logits = probe(torch.randn((m, *clip), device=device))
                F.cross_entropy(logits, torch.zeros(m, dtype=torch.long, device=device)).backward()
                opt.step()
        else:
            subtract = 0
            forward = model.eval() if head else model.eval().forward_features

            def step(m):
                with torch.inference_mode():
                    forward(torch.randn((m, *clip), device=device))

        try:
            return memory.measure_step(step, device, per_input_clip, subtract=subtract,
                                       smallest=memory.smallest_trainable(model) if train else 1)
        except ValueError:
            if not train:
                raise
            # BatchNorm cannot train on one clip whose feature map is 1x1x1: measure 2 and 4 clips instead
            return memory.measure_step(step, device, per_input_clip, subtract=subtract, smallest=2)
        finally:
            model.train(was_training)


def _fitting_options(cfg, estimate, usable, batch, clips_per_item):
    """What to change when one clip does not fit: smaller clips, a smaller batch, more memory."""
    hints = memory.fitting_hints(estimate, usable, batch, cfg.frames, cfg.crop, flags=("--frames", "--crop"))
    room = usable - estimate.fixed
    if room >= estimate.per_clip:
        clips = 1 + (room - estimate.per_clip) // max(estimate.per_input_clip, 1)
        if clips // clips_per_item >= 1:
            hints.append(f"--batch-size {int(clips // clips_per_item)}")
    hints.append("a larger --memory-budget" if cfg.memory_budget else "a device with more free memory")
    return ", ".join(hints)


def plan_micro_batch(cfg, model, clips_per_batch, train=False, head=False, optimizer=None, input_views=1, what=None):
    """Clips per forward (train: per fine-tuning micro-batch) for batches of `clips_per_batch` clips.

    `cfg.micro_batch` when it is a number (no probe); with 'auto', measured by `probe_estimate` (once per
    model and clip settings) and planned by `memory.plan_micro_batches` within `cfg.memory_budget` (or
    what the process holds + what the device has free), less the DataLoader workers' share on CPU.
    Logs one line; raises `memory.MemoryPlanError` (a ValueError, one line) when not even one clip fits.
    input_views: float copies of each clip of the batch held while a micro-batch is computed.
    """
    micro = micro_batch(cfg)
    device = torch.device(cfg.device)
    clip = (3, cfg.frames, cfg.crop, cfg.crop)
    b = max(int(clips_per_batch), 1)
    kind = "training" if train else "inference"
    what = what or f"{_command(cfg)} {kind}"
    if micro != "auto":
        if cfg.memory_budget:
            log.warning("--memory-budget %s is not used: --micro-batch %d sets the split (no planning)",
                        cfg.memory_budget, micro)
        log.info("%s: batch %d: %s (--micro-batch %d)", what, b, memory.split_text(math.ceil(b / min(micro, b)), b),
                 micro)
        return min(micro, b)
    per_input = memory.input_bytes_per_clip(clip, device, views=input_views)
    try:
        estimates = _ESTIMATES.setdefault(model, {})
    except TypeError:  # not weak-referenceable: probe every time
        estimates = {}
    probe_key = (kind, head, clip, str(device))
    if probe_key not in estimates:
        log.info("%s: --micro-batch auto: measuring a %s of 1 and 2 clips", what,
                 "training step" if train else "forward")
        estimates[probe_key] = probe_estimate(model, clip, device, train, head, optimizer,
                                              getattr(cfg, "momentum", 0.9), per_input)
    estimate = dataclasses.replace(estimates[probe_key], per_input_clip=per_input)
    budget = memory.budget_bytes(device, budget_limit(cfg))
    reserve = memory.worker_reserve(cfg.workers, b * math.prod(clip)) if device.type == "cpu" else 0
    shape = "x".join(map(str, clip))
    try:
        plan = memory.plan_micro_batches(estimate, b, budget, reserve,
                                         what=f"{'a training' if train else 'an inference'} batch of {b} clips of {shape}")
    except memory.MemoryPlanError as e:
        hints = _fitting_options(cfg, estimate, memory.usable_bytes(budget, reserve), b,
                                 max(1, b // max(cfg.batch_size, 1)))
        raise memory.MemoryPlanError(f"{e}; to fit, try {hints}") from None
    log.info("%s", memory.plan_line(plan, estimate, f"{what}: batch {b}", b))
    return plan.micro_batch
