"""Collectives per training step and rank: calls and bytes, by scheme, in real gloo processes.

    python -m benchmarks.comm --procs 2 4 --record

Spawns N CPU processes (gloo) per entry of `--procs`, builds the same VideoMoCo on each (by default
tiny: r3d_18 width 8, 8x32x32 clips, `--batch` clips per rank; `--arch r2plus1d_18 --width 64
--frames 16 --crop 112` is the real encoder) and runs adversarial steps under a
`CommCounter`, which wraps the `torch.distributed` collectives and counts, per call, the bytes this
rank sends and receives: all_to_all and all_gather exactly (its own segment excluded), broadcast
as sent by the source, all_reduce as a ring moves them (2 (N - 1) / N of the tensor each way). Two
schemes in the same run:

- `authors`: `--shuffle_bn all_gather --bucket_mb 0`, the authors' shuffle-BN (every rank receives
  every rank's key clips) and one all-reduce per gradient tensor after the backward;
- `new`: the defaults, `--shuffle_bn all_to_all --bucket_mb 25` (each key clip goes only to the
  rank that encodes it; gradients in 25 MB buckets launched during the backward), also with 2
  micro-batches to show that a step reduces once, not once per micro-batch.

`--record` adds the scaling table of the recipe (r2plus1d_18, 32x112x112, 32 clips per GPU, 1 to 256
GPUs) computed from the measured per-clip and per-parameter multiples, with its assumptions labelled.
"""

import argparse
import json
import math
import socket
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import common

SCHEMES = {"authors": {"shuffle_bn": "all_gather", "bucket_mb": 0.0},
           "new": {"shuffle_bn": "all_to_all", "bucket_mb": 25.0}}


def _nbytes(t):
    return t.numel() * t.element_size()


class CommCounter:
    """Counts the collectives this process calls, with the bytes it sends and receives, while installed.

    `calls` / `sent` / `received`: Counters keyed `name/Nd` (the collective and its tensor's rank, so
    that 5-d clips and 2-d keys or 1-d gradients are told apart). Wraps the functions of
    `torch.distributed` (the code under test calls them as `dist.<name>`), async calls counted at launch.
    """

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "broadcast", "barrier",
             "reduce_scatter_tensor")

    def __init__(self):
        self.calls, self.sent, self.received = Counter(), Counter(), Counter()
        self.originals = {}

    def traffic(self, name, args, kwargs):
        """(sent, received) bytes of one call on this rank."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if name == "all_reduce":
            moved = 2 * (world - 1) / world * _nbytes(args[0])
            return moved, moved
        if name in ("all_gather", "all_gather_into_tensor"):
            part = _nbytes(args[1])
            return (world - 1) * part, (world - 1) * part
        if name == "reduce_scatter_tensor":
            part = _nbytes(args[0])
            return (world - 1) * part, (world - 1) * part
        if name == "all_to_all_single":
            out, inp = args[0], args[1]
            out_splits = args[2] if len(args) > 2 else kwargs.get("output_split_sizes")
            in_splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            row_out, row_in = _nbytes(out) / max(out.shape[0], 1), _nbytes(inp) / max(inp.shape[0], 1)
            out_splits = out_splits or [out.shape[0] // world] * world
            in_splits = in_splits or [inp.shape[0] // world] * world
            return (sum(in_splits) - in_splits[rank]) * row_in, (sum(out_splits) - out_splits[rank]) * row_out
        if name == "broadcast":
            src = args[1] if len(args) > 1 else kwargs.get("src", 0)
            return ((world - 1) * _nbytes(args[0]), 0) if rank == src else (0, _nbytes(args[0]))
        return 0, 0

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            sent, received = self.traffic(name, args, kwargs)
            tensor = args[-1] if name == "all_gather" else args[0] if args else None
            key = f"{name}/{tensor.dim()}d" if isinstance(tensor, torch.Tensor) else name
            self.calls[key] += 1
            self.sent[key] += sent
            self.received[key] += received
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        for name in self.NAMES:
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self.originals[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)
        self.originals = {}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cases, steps, batch, model_args, out_dir):
    """One rank: for every (scheme, micro_batches) case, count `steps` adversarial steps."""
    from videomoco.method import AdversarialConfig, AdversarialTrainer, FrameDropGenerator, VideoMoCo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    try:
        for scheme, micro_batches in cases:
            options = SCHEMES[scheme]
            torch.manual_seed(0)
            model = VideoMoCo(model_args["arch"], dim=128, K=1024, width=model_args["width"],
                              shuffle_bn=options["shuffle_bn"])
            gen = FrameDropGenerator(0.25)
            params_d = [p for p in model.parameters() if p.requires_grad]
            opt_d, opt_g = torch.optim.SGD(params_d, 0.01), torch.optim.SGD(gen.parameters(), 0.01)
            trainer = AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(adv_start_epoch=0),
                                         micro_batches=micro_batches, bucket_mb=options["bucket_mb"])
            torch.manual_seed(1 + rank)
            with CommCounter() as counter:
                for step in range(steps):
                    clips = torch.randn(batch, *model_args["clip"])
                    trainer.step(clips, clips.clone(), adversarial=True,
                                 shuffle_generator=torch.Generator().manual_seed(step))
            rows.append({"scheme": scheme, "micro_batches": micro_batches, "calls": dict(counter.calls),
                         "sent": dict(counter.sent), "received": dict(counter.received),
                         "grad_bytes": sum(_nbytes(p) for p in params_d + list(gen.parameters())),
                         "grad_tensors": len(params_d) + len(list(gen.parameters()))})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure(world, steps, batch, model_args):
    """Per-rank counts (list per rank of case rows) of `world` gloo processes."""
    cases = [("authors", 1), ("new", 1), ("new", 2)]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), cases, steps, batch, model_args, out_dir), nprocs=world)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def summarise(per_rank, world, steps, batch, clip):
    """One row per case: calls and MB per step and rank (mean over ranks), and the key clips' multiple."""
    clip_bytes = batch * math.prod(clip) * 4  # one rank's key clips, fp32
    rows = []
    for cases in zip(*per_rank):
        first = cases[0]

        def mean(field, prefix=""):
            """Per step and rank: `field` summed over the keys starting with `prefix`."""
            return sum(v for c in cases for k, v in c[field].items() if k.startswith(prefix)) / (world * steps)

        rows.append({
            "procs": world, "scheme": first["scheme"], "micro_batches": first["micro_batches"],
            "calls/step": round(mean("calls"), 2),
            "all_reduce calls/step": round(mean("calls", "all_reduce"), 2),
            "gradient tensors": first["grad_tensors"],
            "MB received/step": round(mean("received") / 1e6, 3),
            "MB sent/step": round(mean("sent") / 1e6, 3),
            "clips received / own clips": round(
                (mean("received", "all_gather/5d") + mean("received", "all_to_all_single/5d")) / clip_bytes, 3),
            "all_reduce MB / gradient MB": round(mean("received", "all_reduce") / first["grad_bytes"], 3),
            "calls": {k: round(v / steps, 2) for k, v in sorted(Counter(first["calls"]).items())},
        })
    return rows


# --- the recipe at scale, from the measured multiples -------------------------------------------------
RECIPE = {"clips_per_gpu": 32, "clip": (3, 32, 112, 112), "videos": 240_000, "epochs": (100, 100),
          "compute_ms": (59.8, 89.8)}  # MoCo / VideoMoCo step (RESULTS.md "Kinetics-400 pretraining on paper")
NVLINK, INFINIBAND = 360e9, 50e9  # bytes/s per GPU inside a node (up to 8 GPUs) and across nodes: assumptions


def recipe_gradients(bucket_mb=25.0):
    """(gradient bytes of D, tensors, bytes of each bucket in launch order) of r2plus1d_18 (the recipe)."""
    from videomoco.method.gradients import buckets_of
    from videomoco.models import build_encoder

    encoder = build_encoder("r2plus1d_18", num_classes=128)
    params = list(encoder.parameters())
    buckets = buckets_of(params[::-1], bucket_mb)
    return sum(map(_nbytes, params)), len(params), [sum(map(_nbytes, b)) for b in buckets]


def scaling_rows(gpus=(1, 8, 64, 256)):
    """Step time and GPU-hours of the recipe for each GPU count, authors' scheme vs new.

    Shuffle: the authors' scheme receives (N - 1) x a rank's key clips, all_to_all (N - 1) / N x on
    average (the multiples `summarise` measures at 2 and 4 processes); gradients: ring all-reduce 2 (N - 1) / N x D's gradient, after the
    backward (authors') or overlapped with it except the last bucket (new). Bandwidth NVLink up to 8 GPUs,
    InfiniBand beyond (every byte at the slower rate: an upper bound).
    """
    clip_bytes = RECIPE["clips_per_gpu"] * math.prod(RECIPE["clip"]) * 4
    grad_bytes, tensors, buckets = recipe_gradients()
    rows = []
    base = None
    for n in gpus:
        bw = NVLINK if n <= 8 else INFINIBAND
        ring = 2 * (n - 1) / n
        multiple = (n - 1) / n
        comm = {"authors": ((n - 1) * clip_bytes + ring * grad_bytes) / bw,
                "new": (multiple * clip_bytes + ring * buckets[-1]) / bw}  # the last bucket is not hidden
        steps = RECIPE["videos"] / (RECIPE["clips_per_gpu"] * n)
        for scheme, seconds in comm.items():
            step_ms = [c + 1e3 * seconds for c in RECIPE["compute_ms"]]
            wall_h = steps * sum(e * s / 1e3 for e, s in zip(RECIPE["epochs"], step_ms)) / 3600
            base = base or wall_h
            rows.append({"GPUs": n, "scheme": scheme, "shuffle MB received/GPU": round(
                            ((n - 1) if scheme == "authors" else multiple) * clip_bytes / 1e6, 1),
                         "exposed comm ms": round(1e3 * seconds, 2),
                         "MoCo / VideoMoCo step ms": f"{step_ms[0]:.1f} / {step_ms[1]:.1f}",
                         "wall-clock h": round(wall_h, 2), "GPU-hours": round(wall_h * n, 1),
                         "scaling efficiency": round(base / (wall_h * n), 2)})
    return rows, {"gradient MB": round(grad_bytes / 1e6, 1), "gradient tensors": tensors,
                  "buckets": len(buckets), "last bucket MB": round(buckets[-1] / 1e6, 2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.comm", description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="process counts to run")
    p.add_argument("--steps", type=int, default=10, help="counted steps per case")
    p.add_argument("--batch", type=int, default=4, help="clips per rank")
    p.add_argument("--arch", default="r3d_18", help="encoder name (videomoco.models.list_encoders())")
    p.add_argument("--width", type=int, default=8, help="stem width; 64 is the real encoder")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--no_scaling", action="store_true", help="do not print or record the recipe's scaling table")
    return common.add_common_arguments(p).parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.quick:
        args.procs, args.steps, args.batch = [2], 1, 2
    command = common.command_line("benchmarks.comm", argv)
    clip = (3, args.frames, args.crop, args.crop)
    model_args = {"arch": args.arch, "width": args.width, "clip": clip}
    rows = []
    for world in args.procs:
        rows += summarise(measure(world, args.steps, args.batch, model_args), world, args.steps, args.batch, clip)
    for row in rows:
        common.emit(row, command)
    if args.record:
        common.record("comm: collectives per step and rank, authors' scheme vs new", rows, command, args.results,
                      note=f"{args.arch} width {args.width}, {args.steps} adversarial steps per case, {args.batch} "
                           f"clips of {clip} per rank, gloo.")
    if args.no_scaling:
        return 0
    scale, sizes = scaling_rows()
    for row in scale:
        common.emit(row | sizes, command)
    if args.record:
        common.record("comm: the recipe's scaling from the measured multiples", scale, command, args.results,
                      note=f"r2plus1d_18 D: {sizes}. Assumptions: compute per step from the paper estimate above; "
                           "NVLink 360 GB/s per GPU up to 8 GPUs, InfiniBand 50 GB/s beyond (all bytes at that "
                           "rate); new: the backward hides every bucket but the last.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
