"""The memory planner against the measured peak, memory per clip, and the cost of micro-batches.

    python -m benchmarks.memory --configs r3d_18:16 r3d_18:32 r2plus1d_18:16 r2plus1d_18:32 --batch 8 --micro 4
    python -m benchmarks.memory --overhead --configs r3d_18:16 --crop 64 --batch 32 --micro 4

Each configuration runs in a fresh process (so one run's resident pages cannot hide the next one's):
it builds the trainer of `videomoco pretrain` for `arch` at `frames x crop x crop`, lets the planner
estimate the peak of a step of `--batch` clips in micro-batches of `--micro` (`memory.probe_step`, as
`--micro_batch auto` does before training), then runs two real VideoMoCo steps of that batch and
measures the second one's peak (CPU: peak RSS; CUDA: allocator peak). The batch's uint8 clips are held
as the DataLoader's would be. `--overhead` times steps of `--batch` clips in micro-batches of `--micro`
against one micro-batch of `--batch`, alternating, and reports the time per clip of each.
"""

import argparse
import json
import math
import subprocess
import sys
import time

import torch

from benchmarks import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["r3d_18:16", "r3d_18:32", "r2plus1d_18:16", "r2plus1d_18:32"],
                   metavar="ARCH:FRAMES")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=4, help="clips per micro-batch")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--overhead", action="store_true", help="time micro-batches of --micro against one of --batch")
    p.add_argument("--iters", type=int, default=2, help="timed steps per variant (--overhead)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config in this process
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.crop, args.batch, args.micro, args.iters = ["r3d_18:8"], 32, 4, 2, 1
    return args


def _trainer(args, arch, frames, device):
    from benchmarks.train_step import build_trainer

    ns = argparse.Namespace(arch=arch, width=8 if args.quick else 64, frames=frames, crop=args.crop, dim=128,
                            moco_k=64 if args.quick else 65536, mlp=False, precision=args.precision,
                            channels_last=False, grad_checkpointing=args.grad_checkpointing, seed=0)
    return build_trainer(ns, device)[0]


def _batch(args, frames, device):
    """The loader's uint8 views (held, as a real run holds them) and the normalised float views."""
    shape = (args.batch, 3, frames, args.crop, args.crop)
    raw = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)]
    return raw, [torch.randn(shape, device=device) for _ in range(2)]


def measure_one(args, arch, frames):
    """Planner estimate vs measured peak for one configuration (run in its own process)."""
    from videomoco.engine import memory

    device = torch.device(args.device)
    trainer = _trainer(args, arch, frames, device)
    clip = (3, frames, args.crop, args.crop)
    t0 = time.perf_counter()
    estimate = memory.probe_step(trainer, clip, True, device)
    probe_s = time.perf_counter() - t0
    raw, (im_q, im_k) = _batch(args, frames, device)
    trainer.micro_batches = math.ceil(args.batch / args.micro)
    trainer.step(im_q, im_k, True)  # allocates the optimiser state, as the run's first step does
    memory.reset_peak(device)
    t0 = time.perf_counter()
    trainer.step(im_q, im_k, True)
    common.synchronize(device)
    step_s = time.perf_counter() - t0
    measured = memory.peak_since_reset(device)
    predicted = estimate.peak(args.micro, args.batch)
    del raw
    return {"arch": arch, "clip": f"{frames}x{args.crop}x{args.crop}", "precision": args.precision,
            "grad_ckpt": args.grad_checkpointing, "batch": args.batch, "micro": args.micro,
            "per_clip_mib": estimate.per_clip / 2**20, "fixed_mib": estimate.fixed / 2**20,
            "estimated_peak_mib": predicted / 2**20, "measured_peak_mib": measured / 2**20,
            "estimate_over_measured": predicted / measured, "probe_s": probe_s, "step_s": step_s}


def overhead_one(args, arch, frames):
    """Time per clip of a step in micro-batches of --micro vs one micro-batch of --batch (alternating)."""
    device = torch.device(args.device)
    trainer = _trainer(args, arch, frames, device)
    _, (im_q, im_k) = _batch(args, frames, device)
    variants = {f"micro {args.micro}": math.ceil(args.batch / args.micro), f"micro {args.batch}": 1}

    def stepper(n):
        def step():
            trainer.micro_batches = n
            trainer.step(im_q, im_k, True)
        return step

    stats = common.compare({name: stepper(n) for name, n in variants.items()}, warmup=1, iters=args.iters, sync=device)
    rows = [{"arch": arch, "clip": f"{frames}x{args.crop}x{args.crop}", "batch": args.batch, "variant": name,
             "step_s": stats[name]["median_s"], "ms_per_clip": 1e3 * stats[name]["median_s"] / args.batch}
            for name in variants]
    ratio = rows[0]["step_s"] / rows[1]["step_s"]
    for row in rows:
        row["micro_over_whole"] = ratio
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one:
        arch, frames = args.one.split(":")
        result = (overhead_one if args.overhead else measure_one)(args, arch, int(frames))
        print(json.dumps(result))
        return 0
    rows = []
    for config in args.configs:  # a fresh process each: resident pages of one run must not hide the next's
        child = [a for a in argv if a != "--record"]
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *child, "--one", config],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmarks.memory: {config} failed:\n{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows += result if isinstance(result, list) else [result]
    command = common.command_line("benchmarks.memory", argv)
    for row in rows:
        common.emit(row, command=command)
    if args.record:
        name = "memory: micro-batch overhead" if args.overhead else "memory: planner estimate vs measured peak"
        common.record(name, rows, command, path=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
