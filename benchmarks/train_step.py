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
the matmul TFLOP/s measured in the same run (`common.matmul_peak`) in the dtype the step computes
in (`peak_dtype`): bf16 / fp16 for those precisions; for fp32 on CUDA the TF32 rate, since cuDNN
runs fp32 convolutions in TF32 by default (`torch.backends.cudnn.allow_tf32`), plain fp32 on CPU.
On CUDA `cudnn.benchmark` is on, as in `videomoco pretrain` without `--deterministic`.

FLOPs: FlopCounterMode has no formula for cuDNN's RNN kernels, so on CUDA the generator's
`nn.GRU` is counted analytically (`gru_flops`: per time step, direction and layer, 3 gates of
`in x h` and `h x h` multiply-adds at 2 FLOPs each, backward twice the forward); on CPU and fake
tensors ATen runs the GRU as matmuls, which FlopCounterMode counts. With `--compile` the FLOPs
are those of the eager step: the compiled graph may compute more (e.g. the weight gradients of
the encoder's convolutions that eager `backward(inputs=G's parameters)` skips in G's update).

`--grad_checkpointing` checkpoints the query encoder's stem and residual blocks (the key encoder
runs without a graph): lower peak memory; the recomputed forwards count in the FLOPs per step.
"""

import argparse
import ctypes
import gc
import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from videomoco.engine import pretrain
from videomoco.engine.config import PretrainConfig
from videomoco.method import compile_encoders

MODES = {"moco": False, "videomoco": True}  # mode -> adversarial


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
    p.add_argument("--precision", choices=pretrain.AMP_DTYPES, default="fp32", help="autocast dtype for the forward passes")
    p.add_argument("--channels_last", "--channels-last", action="store_true", help="channels_last_3d model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the two encoders")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend; aot_eager captures the same graphs without generating kernels")
    p.add_argument("--grad_checkpointing", "--grad-checkpointing", action="store_true",
                   help="activation checkpointing of the query encoder (stem and every residual block)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["both", *MODES], default="both")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step per mode and print the N most expensive ops")
    p.add_argument("--matmul_size", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: common.matmul_peak's)")
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
    """The `AdversarialTrainer` of `videomoco pretrain` (`engine.pretrain.build_trainer`: SGD with momentum for
    both players, fused on CUDA; GradScalers for fp16) at the benchmark's sizes, and its model."""
    # every other setting is pretrain's default; batch_size is only checked against the queue (the step takes any)
    cfg = PretrainConfig(arch=args.arch, width=args.width, moco_dim=args.dim, moco_k=args.moco_k, mlp=args.mlp,
                         precision=args.precision, channels_last=args.channels_last,
                         grad_checkpointing=args.grad_checkpointing, seed=args.seed, batch_size=1)
    trainer = pretrain.build_trainer(cfg, device)
    return trainer, trainer.model


def synthetic_clips(args, device):
    """Two normalised float clips `(B, 3, T, H, W)` on the device: the query and key views."""
    shape = (args.batch, 3, args.frames, args.crop, args.crop)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    return [torch.randn(shape, device=device).contiguous(memory_format=fmt) for _ in range(2)]


def gru_flops(gru, x):
    """FLOPs of one forward of `nn.GRU` on `x`: per time step, direction and layer, 3 gates of `in x h` and
    `h x h` multiply-adds, 2 FLOPs each: 2 * 3 * (in*h + h*h). Biases and gate nonlinearities not counted."""
    batch, steps = (x.shape[0], x.shape[1]) if gru.batch_first else (x.shape[1], x.shape[0])
    if x.dim() == 2:  # unbatched (T, in)
        batch, steps = 1, x.shape[0]
    h, directions = gru.hidden_size, 2 if gru.bidirectional else 1
    total = 0
    for layer in range(gru.num_layers):
        inputs = gru.input_size if layer == 0 else h * directions
        total += 2 * 3 * (inputs * h + h * h) * steps * batch * directions
    return total


def count_flops(step, analytic_gru=False):
    """FLOPs of one call of `step()` (forward and backward), counted by dispatching aten ops.

    `analytic_gru`: add `gru_flops` for every `nn.GRU` forward (3x with a backward, i.e. when its output
    requires grad), for devices where the GRU is one cuDNN kernel that FlopCounterMode does not see.
    """
    extra = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.GRU):
            f = gru_flops(module, args[0])
            extra.append(3 * f if output[0].requires_grad else f)

    handle = torch.nn.modules.module.register_module_forward_hook(hook) if analytic_gru else None
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops() + sum(extra)


def uncounted_gru(device):
    """True where the GRU runs as cuDNN's RNN kernel, which FlopCounterMode does not count."""
    return torch.device(device).type == "cuda" and torch.backends.cudnn.enabled


def matmul_peak_dtype(precision, device):
    """(dtype, label) of the matmul rate a step of `precision` is measured against (see the module doc)."""
    if precision == "bf16":
        return torch.bfloat16, "bf16"
    if precision == "fp16":
        return torch.float16, "fp16"
    tf32 = torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32
    return torch.float32, "tf32" if tf32 else "fp32"


def measure_peak(device, precision, quick=False, size=None):
    """`common.matmul_peak` in the step's dtype, TFLOP/s; TF32 matmuls switched on for a "tf32" peak."""
    dtype, label = matmul_peak_dtype(precision, device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = label == "tf32" or previous
    try:
        return common.matmul_peak(device, dtype=dtype, size=256 if quick else size, iters=2 if quick else 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


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


def restart_peak_window(device):
    """Forget the peak so far, not the baseline: CUDA resets its peak; CPU first hands freed heap back to the OS."""
    gc.collect()
    if torch.device(device).type == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # else RSS stays at the peak the allocator has cached
        except (OSError, AttributeError):
            pass
    common.peak_memory_reset(device)


def prepare(args, mode, device):
    """Build one mode's trainer, count its FLOPs, compile and warm it up.

    Returns `(step, row)`: the step function to time and the row so far. Peak memory is the growth
    over this window (weights, optimiser state, activations of the warm-up steps), not counting the
    FLOP-counting step: under `FlopCounterMode` a step keeps more alive than a training step does
    (with --grad_checkpointing about twice the activations).
    """
    mem_start = common.peak_memory_reset(device)
    trainer, model = build_trainer(args, device)
    im_q, im_k = synthetic_clips(args, device)
    adversarial = MODES[mode]
    last = {}

    def step():
        last.update(trainer.step(im_q, im_k, adversarial=adversarial))

    step.losses = last
    flops = count_flops(step, analytic_gru=uncounted_gru(device))  # eager, before compiling (see the module doc)
    restart_peak_window(device)  # from the same baseline: the weights and optimiser state stay counted
    if args.compile:
        compile_encoders(model, backend=args.compile_backend)
    for _ in range(args.warmup):
        step()
    common.synchronize(device)
    return step, {
        "mode": mode, "arch": args.arch, "width": args.width,
        "clip": f"{args.frames}x{args.crop}x{args.crop}", "batch": args.batch, "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile, "grad_ckpt": args.grad_checkpointing,
        "device": str(device),
        "peak_mem_mib": common.peak_memory_bytes(device, mem_start) / 2**20,
        "gflop_per_step": flops / 1e9, "gflop_per_clip": flops / args.batch / 1e9,
        "flops_of": "eager step" if args.compile else "step",
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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as `videomoco pretrain` (without --deterministic)
    command = common.command_line("benchmarks.train_step", argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    if args.flops_only:
        rows = [count_flops_only(args, mode) for mode in modes]
        columns = list(rows[0])
    else:
        peak_before = measure_peak(device, args.precision, args.quick, args.matmul_size)
        rows = bench(args, modes, device)
        # before and after: one burst of outside load can't lower it
        peak_tflops = max(peak_before, measure_peak(device, args.precision, args.quick, args.matmul_size))
        for row in rows:
            row.update(peak_tflops=peak_tflops, peak_dtype=matmul_peak_dtype(args.precision, device)[1],
                       mfu=row["achieved_tflops"] / peak_tflops)
        columns = ["mode", "arch", "width", "clip", "batch", "precision", "grad_ckpt", "device", "step_ms",
                   "steps_per_s", "clips_per_s", "peak_mem_mib", "gflop_per_step", "achieved_tflops", "peak_tflops",
                   "peak_dtype", "mfu"]
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
    if args.compile and not args.flops_only:
        compiled = "--compile: FLOPs of the eager step (the compiled graph may compute more)"
        note = f"{note}; {compiled}" if note else compiled
    for row in rows:
        common.emit(row, command=command)
    if args.record:
        name = "train_step: FLOPs per step (fake tensors, no timing)" if args.flops_only else "train_step"
        common.record(name, [{k: row[k] for k in columns} for row in rows], command,
                      path=args.results, note=note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
