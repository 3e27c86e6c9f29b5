"""Where an autocast step's gradients leave the fp32 step's: per parameter, from the same state and inputs.

    python -m benchmarks.amp_layers --arch r2plus1d_18 --width 64 --frames 16 --crop 112 --batch 2 --precision bf16
    python -m benchmarks.amp_layers ... --record     # the summary into benchmarks/RESULTS.md

The state is `benchmarks.gpu`'s correctness check's (a queue filled with the keys of random clips, so that the
loss is a real contrast); the step is one adversarial VideoMoCo step (`--mode moco`: the MoCo step alone). The
generator's choice of frames is discrete: an autocast step may drop other frames than the fp32 step, and then
the two steps train on different clips. The report says whether the keep masks agree, and `--same_drops`
makes the autocast step drop what the fp32 step dropped, which separates that effect from rounding.
Per parameter: cosine and relative norm difference of the two gradients; the rows are in forward order.
"""

import argparse
import copy
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import common, train_step
from videomoco.method.generator import drop_frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.amp_layers", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r2plus1d_18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--moco-k", type=int, default=256)
    p.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--mode", choices=tuple(train_step.MODES), default="videomoco")
    p.add_argument("--same_drops", action="store_true", help="the autocast step drops the fp32 step's frames")
    p.add_argument("--rows", type=int, default=12, help="worst parameters listed")
    p.add_argument("--record", action="store_true")
    return p.parse_args(argv)


def cosine(a, b):
    """Cosine similarity of two flat tensors in float64 (nan when one is not finite); F.cosine_similarity
    sometimes returned 0.0 for vectors of a million elements on CPU (torch 2.13)."""
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm())) if torch.isfinite(a).all() and torch.isfinite(b).all() else math.nan


def step(args, state, precision, clips, device, keep=None, adversarial=True):
    """One step of `benchmarks.train_step`'s trainer (its parsed `args`) from `state` on `clips`, under
    `precision` -> (losses, {"d.name" | "g.name": fp32 gradient, flat}, the generator's keep mask or None).

    `keep` (B, T) replays a keep mask (the fp32 step's) instead of the generator's top-k.
    """
    args = copy.copy(args)
    args.precision = precision
    trainer, model = train_step.build_trainer(args, device)  # seeded: the generator starts alike too
    model.load_state_dict(state)
    if precision == "fp16":  # a lower first scale, so that the compared step is not skipped for an overflow
        trainer.scaler_d, trainer.scaler_g = (torch.amp.GradScaler(device.type, init_scale=2.0**8) for _ in range(2))
    masks, gen = [], trainer.generator

    def forward(clip):  # record (or replay) the frames the generator drops
        dropped, mask = drop_frames(clip, gen.scores(clip), gen.drop_ratio, gen.fill, hard_keep=keep)
        masks.append(mask.detach().clone())
        return dropped, mask

    gen.forward = forward
    out = trainer.step(*clips, adversarial=adversarial, shuffle_generator=torch.Generator().manual_seed(0))
    named = [(f"d.{n}", p) for n, p in model.named_parameters()] + [(f"g.{n}", p) for n, p in gen.named_parameters()]
    grads = {n: p.grad.float().flatten() for n, p in named if p.grad is not None}
    return {k: float(v) for k, v in out.items() if k in ("loss_d", "loss_g")}, grads, (masks[0] if masks else None)


def player_cosines(grads, ref):
    """{"d": cosine, "g": cosine} of each player's whole gradient (None for a player without gradients)."""
    names = {p: [n for n in ref if n.startswith(p + ".") and n in grads] for p in ("d", "g")}
    return {p: cosine(torch.cat([grads[n] for n in ns]), torch.cat([ref[n] for n in ns])) if ns else None
            for p, ns in names.items()}


def filled_state(args, device, batch, frames, crop, k):
    """A fresh model's state with its queue filled by the keys of random clips (a real contrast: with a random
    queue the positive wins by far and the loss is ~1e-4, all rounding) and two random clips (B, 3, T, H, W)."""
    _, model = train_step.build_trainer(args, device)
    shape = (batch, 3, frames, crop, crop)
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(max(1, k // batch)):
            model.enqueue(F.normalize(model.encoder_k(torch.randn(shape, device=device)).float(), dim=1))
    return copy.deepcopy(model.state_dict()), [torch.randn(shape, device=device) for _ in range(2)]


def compare(args):
    argv = ["--arch", args.arch, "--width", str(args.width), "--frames", str(args.frames), "--crop", str(args.crop),
            "--batch", str(args.batch), "--moco-k", str(args.moco_k), "--device", "cpu"]
    ts_args, device = train_step.parse_args(argv), torch.device("cpu")
    state, clips = filled_state(ts_args, device, args.batch, args.frames, args.crop, args.moco_k)
    adversarial = train_step.MODES[args.mode]
    ref_losses, ref, ref_keep = step(ts_args, state, "fp32", clips, device, adversarial=adversarial)
    losses, got, keep = step(ts_args, state, args.precision, clips, device, adversarial=adversarial,
                             keep=ref_keep if args.same_drops else None)
    rows = [{"parameter": name, "numel": g.numel(), "cosine": cosine(got[name], g),
             "rel_norm_diff": float((got[name].double() - g.double()).norm() / g.double().norm().clamp_min(1e-30))}
            for name, g in ref.items() if name in got]
    return {"losses_fp32": ref_losses, "losses": losses,
            "loss_rel_diff": {k: abs(losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in losses},
            "grad_cosine": player_cosines(got, ref),
            "same_keep_mask": None if ref_keep is None else bool(torch.equal(keep, ref_keep)), "rows": rows}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    result = compare(args)
    shape = f"{args.arch} width {args.width}, {args.frames}x{args.crop}x{args.crop}, batch {args.batch}"
    print(f"{shape}, {args.precision} vs fp32, {args.mode}{', same drops' if args.same_drops else ''}")
    print("loss rel diff", {k: f"{v:.2e}" for k, v in result["loss_rel_diff"].items()},
          "| grad cosine", {k: None if v is None else f"{v:.5f}" for k, v in result["grad_cosine"].items()},
          "| same keep mask:", result["same_keep_mask"])
    worst = sorted(result["rows"], key=lambda r: r["cosine"])[: args.rows]
    table = [{"parameter": r["parameter"], "numel": r["numel"], "cosine": f"{r['cosine']:.5f}",
              "rel norm diff": f"{r['rel_norm_diff']:.3g}"} for r in worst]
    print(common.markdown_table(table))
    order = [r["parameter"] for r in result["rows"]]
    first = next((r for r in result["rows"] if r["cosine"] < 0.99), None)
    print("first parameter (forward order) below cosine 0.99:", first and first["parameter"],
          f"({order.index(first['parameter']) + 1} of {len(order)})" if first else "")
    if args.record:
        summary = [{"config": shape, "precision": args.precision, "mode": args.mode, "same drops": args.same_drops,
                    "loss rel diff": " ".join(f"{k} {v:.2e}" for k, v in result["loss_rel_diff"].items()),
                    "grad cosine D / G": " / ".join("-" if v is None else f"{v:.4f}"
                                                   for v in result["grad_cosine"].values()),
                    "same keep mask": result["same_keep_mask"],
                    "worst parameter": f"{worst[0]['parameter']} {worst[0]['cosine']:.4f}" if worst else "-"}]
        common.record("autocast gradients against fp32, per parameter", summary,
                      common.command_line("benchmarks.amp_layers", sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
