"""`videomoco models`: the encoders of the registry and the frame-dropping generators, with their costs.

    videomoco models [--width 64] [--num-classes 400] [--json]

One row per encoder (`models.registry`: parameters, feature dim, GFLOPs for one 3x16x112x112 clip),
then one row per generator kind (`method.generator.GENERATORS`) on the same clip: parameters, GFLOPs
and its share of a training step. The share counts G's forward and backward (3 x its forward) against
one forward and backward of the cheapest encoder at `--width` (3 x its forward), the least a step runs
(a step also encodes the keys and the real query): so it is G's forward over that encoder's forward.
"""

import json
from dataclasses import asdict

import torch

from videomoco.flags import config_from
from videomoco.method.generator import GENERATORS, build_generator
from videomoco.models import registry
from videomoco.models.registry import CLIP_SHAPE, ModelsConfig, count_flops, count_parameters

add_arguments = registry.add_arguments


def generator_rows(encoder_gflops, clip_shape=CLIP_SHAPE):
    """One row per generator kind: {"kind", "params", "gflops", "step_share"}, the share (%) of a training
    step of the cheapest encoder of `encoder_gflops` (GFLOPs per clip, the same `clip_shape`)."""
    cheapest = min(encoder_gflops)
    rows = []
    for kind in GENERATORS:
        with torch.device("meta"):
            generator = build_generator(kind)
        gflops = count_flops(generator, clip_shape) / 1e9
        rows.append({"kind": kind, "params": count_parameters(generator), "gflops": round(gflops, 4),
                     "step_share": 100.0 * gflops / cheapest})
    return rows


def run(cfg):
    """{"encoders": registry rows, "generators": `generator_rows` against those encoders}."""
    encoders = registry.run(cfg)["encoders"]
    exact = []
    for row in encoders:  # unrounded, for the share
        with torch.device("meta"):
            exact.append(count_flops(registry.build_encoder(row["name"], cfg.num_classes, cfg.width)) / 1e9)
    return {"encoders": encoders, "generators": generator_rows(exact)}


def format_generators(rows):
    """The rows of `generator_rows` as an aligned text table."""
    lines = [f"{'generator':<14}{'params':>14}{'GFLOPs':>10}{'% of step':>11}"]
    lines += [f"{r['kind']:<14}{r['params']:>14,}{r['gflops']:>10.4f}{r['step_share']:>11.3f}" for r in rows]
    return "\n".join(lines)


def main(args):
    cfg = config_from(ModelsConfig, args)
    result = run(cfg)
    if cfg.json:
        print(json.dumps({"config": asdict(cfg), **result}, indent=2))
        return 0
    print(f"width={cfg.width} num_classes={cfg.num_classes}; GFLOPs for one {'x'.join(map(str, CLIP_SHAPE))} clip")
    print(registry.format_table(result["encoders"]))
    print()
    print("frame-dropping generators (--generator); % of step: of the cheapest encoder's forward + backward")
    print(format_generators(result["generators"]))
    return 0
