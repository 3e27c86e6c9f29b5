"""The cost of one VideoMoCo training step, and of the plain MoCo step, on synthetic clips.

    python -m benchmarks.train_step --arch r3d_18 --width 64 --frames 16 --crop 112 --batch 2

One step is `AdversarialTrainer.step(im_q, im_k, adversarial)`: with `adversarial=True` the
generator drops frames, the query encoder sees the real and the dropped clip, the key encoder
encodes the key clip, and both the encoder and the generator take an optimiser step; with
`adversarial=False` it is plain MoCo (G off). Both run in the same process (`--mode both`) so
the ratio VideoMoCo / MoCo is the generator's overhead at equal batch.

Inputs are normalised float clips `(B, 3, T, H, W)` already on the device: this measures the
step, not the data pipeline (see `benchmarks.data`). Reported per mode: steps/s and clips/s
(median of timed steps after warm-up, device synchronised; the two modes' timed steps alternate,
so a shared machine's load hits both alike), peak memory, FLOPs per step
(`FlopCounterMode`, one eager step outside the timed loop), achieved TFLOP/s, and MFU against
the matmul TFLOP/s measured in the same run (`common.matmul_peak`).
"""

import argparse
import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common

MODES = {"moco": False, "videomoco": True}  # mode -> adversarial
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r3d_18", help="encoder name (videomoco.models.list_encoders())")
    p.add_argument("--width", type=int, default=64, help="stem width; 64 is torchvision's")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--moco-k", type=int, default=65536, help="queue length K")
    p.add_argument("--mlp", action="store_true", help="MoCo v2 projection head")
    p.add_argument("--precision", choices=DTYPES, default="fp32", help="autocast dtype for the forward passes")
    p.add_argument("--channels_last", "--channels-last", action="store_true", help="channels_last_3d model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the two encoders")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["both", *MODES], default="both")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step per mode and print the N most expensive ops")
    p.add_argument("--flops-only", action="store_true",
                   help="only count the FLOPs of one step, on fake tensors (no compute, any size, CPU)")
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.frames, args.crop, args.batch = 8, 4, 32, 2
        args.moco_k, args.warmup, args.iters = 16, 1, 2
    if args.moco_k < args.batch:
        p.error(f"--moco-k ({args.moco_k}) must be at least --batch ({args.batch})")
    if args.precision == "fp16" and torch.device(args.device).type == "cpu":
        p.error("--precision fp16 needs a GPU (CPU autocast supports bf16)")
    return args


def build_trainer(args, device):
    """The model, generator, optimisers and `AdversarialTrainer` for one benchmark run."""
    from videomoco.method import AdversarialConfig, AdversarialTrainer, FrameDropGenerator, VideoMoCo

    torch.manual_seed(args.seed)
    model = VideoMoCo(args.arch, dim=args.dim, K=args.moco_k, mlp=args.mlp, width=args.width).to(device)
    cfg = AdversarialConfig()
    generator = FrameDropGenerator(cfg.drop_ratio, cfg.fill).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # The optimisers of `videomoco pretrain`: SGD with momentum for both players.
    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    amp_dtype = DTYPES[args.precision]
    scaler_d = scaler_g = None
    if amp_dtype == torch.float16:
        scaler_d, scaler_g = torch.amp.GradScaler(device.type), torch.amp.GradScaler(device.type)
    trainer = AdversarialTrainer(model, generator, opt_d, opt_g, cfg, amp_dtype=amp_dtype,
                                 scaler_d=scaler_d, scaler_g=scaler_g)
    return trainer, model


def synthetic_clips(args, device):
    """Two normalised float clips `(B, 3, T, H, W)` on the device: the query and key views."""
    shape = (args.batch, 3, args.frames, args.crop, args.crop)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    return [torch.randn(shape, device=device).contiguous(memory_format=fmt) for _ in range(2)]


def count_flops(step):
    """FLOPs of one call of `step()` (forward and backward), counted by dispatching aten ops."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def count_flops_only(args, mode):
    """FLOPs of one step at any size without computing it: the clips are fake tensors (shapes only).

    The trainer is built for real on the CPU and thrown away after (the fake step leaves its state undefined).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    trainer, _ = build_trainer(args, torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        im_q, im_k = synthetic_clips(args, torch.device("cpu"))
        flops = count_flops(lambda: trainer.step(im_q, im_k, adversarial=MODES[mode]))
    return {"mode": mode, "arch": args.arch, "width": args.width, "clip": f"{args.frames}x{args.crop}x{args.crop}",
            "batch": args.batch, "gflop_per_step": flops / 1e9, "gflop_per_clip": flops / args.batch / 1e9}


def print_profile(step, device, top, title):
    """torch.profiler table of one step (to stderr): which ops the time goes to."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        common.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {title} ---\n" + prof.key_averages().table(sort_by=sort_by, row_limit=top), file=sys.stderr)


def prepare(args, mode, device):
    """Build one mode's trainer, count its FLOPs, compile and warm it up.

    Returns `(step, row)`: the step function to time and the row so far. Peak memory is the growth
    over this window (weights, optimiser state, activations of the warm-up steps).
    """
    mem_start = common.peak_memory_reset(device)
    trainer, model = build_trainer(args, device)
    im_q, im_k = synthetic_clips(args, device)
    adversarial = MODES[mode]
    last = {}

    def step():
        last.update(trainer.step(im_q, im_k, adversarial=adversarial))

    step.losses = last
    flops = count_flops(step)  # eager, before compiling: the count is exact and device-independent
    if args.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    for _ in range(args.warmup):
        step()
    common.synchronize(device)
    return step, {
        "mode": mode, "arch": args.arch, "width": args.width,
        "clip": f"{args.frames}x{args.crop}x{args.crop}", "batch": args.batch, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "device": str(device),
        "peak_mem_mib": common.peak_memory_bytes(device, mem_start) / 2**20,
        "gflop_per_step": flops / 1e9, "gflop_per_clip": flops / args.batch / 1e9,
    }


def bench(args, modes, device):
    """One row per mode; the timed steps of the modes alternate so outside load hits them alike."""
    steps, rows = {}, {}
    for mode in modes:  # MoCo first: on CPU the allocator keeps freed memory, so the bigger run comes second
        steps[mode], rows[mode] = prepare(args, mode, device)
    stats = common.compare(steps, warmup=0, iters=args.iters, sync=device)
    for mode, row in rows.items():
        losses = {k: float(v) for k, v in steps[mode].losses.items()}  # after the timed loop: no sync inside
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"{mode}: non-finite loss {losses}")
        seconds = stats[mode]["median_s"]
        row.update(step_ms=seconds * 1e3, steps_per_s=1 / seconds, clips_per_s=args.batch / seconds,
                   achieved_tflops=row["gflop_per_step"] / seconds / 1e3, loss_d=losses["loss_d"])
        if args.profile:
            print_profile(steps[mode], device, args.profile, mode)
    return list(rows.values())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    command = common.command_line("benchmarks.train_step", argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    if args.flops_only:
        rows = [count_flops_only(args, mode) for mode in modes]
        columns = list(rows[0])
    else:
        def peak():
            return common.matmul_peak(device, size=256 if args.quick else None, iters=2 if args.quick else 10)

        peak_before = peak()
        rows = bench(args, modes, device)
        peak_tflops = max(peak_before, peak())  # before and after: one burst of outside load can't lower it
        for row in rows:
            row.update(peak_tflops=peak_tflops, mfu=row["achieved_tflops"] / peak_tflops)
        columns = ["mode", "arch", "width", "clip", "batch", "precision", "device", "step_ms", "steps_per_s",
                   "clips_per_s", "peak_mem_mib", "gflop_per_step", "achieved_tflops", "peak_tflops", "mfu"]
    note = None
    if len(rows) == 2:
        flops_ratio = rows[1]["gflop_per_step"] / rows[0]["gflop_per_step"]
        note = f"VideoMoCo / MoCo: FLOPs {flops_ratio:.2f}x"
        for row in rows:
            row["videomoco_over_moco_flops"] = flops_ratio
            if not args.flops_only:
                row["videomoco_over_moco"] = rows[1]["step_ms"] / rows[0]["step_ms"]
        if not args.flops_only:
            note += f", step time {rows[0]['videomoco_over_moco']:.2f}x (timed steps alternate between the modes)"
    for row in rows:
        common.emit(row, command=command)
    if args.record:
        name = "train_step: FLOPs per step (fake tensors, no timing)" if args.flops_only else "train_step"
        common.record(name, [{k: row[k] for k in columns} for row in rows], command,
                      path=args.results, note=note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
