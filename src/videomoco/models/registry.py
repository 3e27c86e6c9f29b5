"""The encoder registry and the encoder table of `videomoco models` (the command: `videomoco.method.costs`).

Each architecture registers its constructor once with `@register_encoder`; everything else
(VideoMoCo, evaluation, the CLI, the tests) builds encoders by name through `build_encoder`.

    videomoco models [--width 64] [--num-classes 400] [--json]

prints one row per encoder: parameters, feature dim and GFLOPs for one 3x16x112x112 clip.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory, no
compute), and are true FLOPs: one multiply-add counts 2.
"""

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from videomoco.flags import POSITIVE_INT

_ENCODERS = {}

CLIP_SHAPE = (3, 16, 112, 112)  # (C, T, H, W) of the clip the FLOPs are reported for


def register_encoder(fn):
    """Decorator: register `fn(num_classes=400, width=64, **kw) -> nn.Module` under `fn.__name__`."""
    if fn.__name__ in _ENCODERS:
        raise ValueError(f"encoder {fn.__name__!r} is already registered")
    _ENCODERS[fn.__name__] = fn
    return fn


def list_encoders():
    """Names of the registered encoders, sorted."""
    return sorted(_ENCODERS)


def build_encoder(name, num_classes=400, width=64, **kw):
    """Build encoder `name`: input (B, 3, T, H, W), `.feature_dim`, `.forward_features`, head `.fc`."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    return _ENCODERS[name](num_classes=num_classes, width=width, **kw)


def count_parameters(model, trainable_only=False):
    """Number of parameter elements (all of them, as torchvision reports, or only trainable ones)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def set_grad_checkpointing(model, enable=True):
    """Turn activation checkpointing of `model`'s stages on or off; returns `model`.

    Every registered encoder has `model.set_grad_checkpointing(enable)`; any other model is a ValueError.
    """
    method = getattr(model, "set_grad_checkpointing", None)
    if not callable(method):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing "
                         "(no set_grad_checkpointing method)")
    method(enable)
    return model


def count_flops(model, clip_shape=CLIP_SHAPE):
    """FLOPs of one forward pass on one clip `(C, T, H, W)` (a multiply-add counts 2).

    Pass a model built on the meta device to count without allocating or computing anything.
    """
    device = next(model.parameters()).device
    x = torch.empty(1, *clip_shape, device=device)
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops()


@dataclass
class ModelsConfig:
    width: int = 64
    num_classes: int = 400
    json: bool = False


def run(cfg):
    """One row per encoder: {"name", "params", "feature_dim", "gflops"}; returns {"encoders": rows}."""
    rows = []
    for name in list_encoders():
        with torch.device("meta"):
            model = build_encoder(name, num_classes=cfg.num_classes, width=cfg.width)
        rows.append(
            {
                "name": name,
                "params": count_parameters(model),
                "feature_dim": model.feature_dim,
                "gflops": round(count_flops(model) / 1e9, 3),
            }
        )
    return {"encoders": rows}


def format_table(rows):
    """The rows of `run` as an aligned text table."""
    lines = [f"{'name':<14}{'params':>14}{'feature_dim':>13}{'GFLOPs':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<14}{r['params']:>14,}{r['feature_dim']:>13}{r['gflops']:>10.2f}")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--width", type=POSITIVE_INT, default=ModelsConfig.width,
                        help="base channels (64 = the published networks)")
    parser.add_argument("--num-classes", type=POSITIVE_INT, default=ModelsConfig.num_classes, help="outputs of the fc head")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

