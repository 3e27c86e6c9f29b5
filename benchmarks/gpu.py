"""The GPU check: correctness on CUDA, the encoders against torchvision, step speed and the data loader, in one command.

    python -m benchmarks.gpu --out DIR [--record] [--budget-s 480] [--parts correctness,speed]
    python -m benchmarks.gpu --dry-run --out DIR    # the same code at a tiny size on CPU, in well under a minute
    python -m benchmarks.gpu --prepare .gpu_data    # here, before the device call: the videos the device cannot encode

Parts, in order of value; each is written to DIR/<n>_<part>.json as soon as it finishes, and rewritten
(status "running") after every measurement, so a run cut short keeps what it measured:

  1 correctness  `pytest -m cuda` in a subprocess (pass / fail counts); bf16 and fp16 autocast steps against an
                 fp32 step (TF32 off) from the same state and inputs: loss relative difference and gradient
                 cosine of each player; a `videomoco pretrain` run (bf16, channels_last, --deterministic) stopped
                 half way and resumed with `--resume auto`, against an uninterrupted run: max abs difference of
                 the final checkpoints' parameters
  2 encoders     r3d_18, mc3_18, r2plus1d_18: torchvision's randomly initialised model's state_dict loaded into
                 ours (strict), outputs compared in fp32 (TF32 off, deterministic cuDNN); skipped without torchvision
  3 speed        `benchmarks.train_step --mode videomoco` per arch, clip and configuration (fp32 eager, bf16,
                 bf16 + channels_last_3d) at batch 32, MFU against a bf16 matmul measured in this part, the fastest
                 configuration's torch.profiler table, and the largest batch the memory planner says fits
  4 data         `PretrainDataset` + `build_loader` (decode, crops) and `GpuAugment` on the device, per worker
                 count: clips/s alone, and the step fed by the loader against the same step on ready clips
  5 compile      bf16 + channels_last_3d + torch.compile, one `benchmarks.train_step` subprocess per shape,
                 killed at the time box ("timed out"): compiling 3D convolutions can take minutes

Time: `--budget-s` in all, shared by the parts as SHARES says; time a part leaves unused passes to the next.
Subprocesses (pytest, pretrain, compile) are killed at their part's deadline; the in-process parts check it
before every measurement. The last thing printed is a short table, also written to DIR/summary.md (with the
speed table); `--record` appends both to benchmarks/RESULTS.md.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
PARTS = ("correctness", "encoders", "speed", "data", "compile")
SHARES = {"correctness": 0.35, "encoders": 0.05, "speed": 0.28, "data": 0.12, "compile": 0.20}
AMP_TOLERANCE = {"loss_rel_diff": 2e-2, "grad_cosine": 0.99}  # bf16 / fp16 step against the fp32 step
ENCODER_TOLERANCE = 1e-4  # max abs difference / max abs torchvision output
STARVED = 0.05  # the GPU is starved when data costs more than this fraction of the step time
ENCODERS = ("r3d_18", "mc3_18", "r2plus1d_18")
CONFIGS = {  # speed configurations -> benchmarks.train_step flags
    "fp32": [],
    "bf16": ["--precision", "bf16"],
    "bf16+cl": ["--precision", "bf16", "--channels_last"],
    "bf16+cl+compile": ["--precision", "bf16", "--channels_last", "--compile"],
}


@dataclass
class Sizes:
    """Every size of the run: the device's (FULL) or the dry run's (DRY)."""

    width: int = 64
    archs: tuple = ("r2plus1d_18", "r3d_18")  # the first arch and frame count are the goal's shape
    frames: tuple = (16, 32)
    crop: int = 112
    batch: int = 32
    moco_k: int = 65536
    warmup: int = 2
    iters: int = 5
    max_batch: int = 256  # cap of the largest-batch runs
    batch_step: int = 8  # the largest batch is rounded down to a multiple of this
    profile_rows: int = 20
    matmul_size: int = 8192
    # correctness
    pytest_share: float = 0.35  # of the correctness part's time
    amp_arch: str = "r2plus1d_18"
    amp_frames: int = 16
    amp_batch: int = 8
    amp_k: int = 256
    cli_arch: str = "r2plus1d_18"
    cli_width: int = 32
    cli_frames: int = 8
    cli_crop: int = 64
    cli_batch: int = 8
    cli_workers: int = 4
    cli_videos: int = 16  # 2 steps per epoch
    cli_steps: int = 50
    cli_stop: int = 25
    cli_adv_start: int = 6  # epoch
    cli_video_size: tuple = (128, 96)
    cli_video_frames: int = 40
    # data
    data_videos: int = 16
    data_size: tuple = (340, 256)
    data_seconds: float = 10.0
    data_gop: int = 25
    workers: tuple = (4, 8, 16)
    data_batches: int = 20  # loader + augmentation alone, per worker count
    e2e_steps: int = 10  # the step fed by the loader, and on ready clips, per worker count


FULL = Sizes()
DRY = Sizes(width=8, archs=("r2plus1d_18",), frames=(8,), crop=32, batch=2, moco_k=16, warmup=1, iters=2,
            max_batch=4, batch_step=1, profile_rows=5, matmul_size=256, amp_frames=8, amp_batch=2, amp_k=16,
            cli_width=8, cli_frames=8, cli_crop=32, cli_batch=2, cli_workers=0, cli_videos=2, cli_steps=6,
            cli_stop=3, cli_adv_start=2, cli_video_size=(48, 40), cli_video_frames=16, data_videos=2,
            data_size=(64, 48), data_seconds=1.0, workers=(0, 1), data_batches=2, e2e_steps=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu", help="folder for the JSON files and summary.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for all parts together (shared by SHARES)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--data", default=str(REPO / ".gpu_data"), help="the videos written by --prepare")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints and indexes (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    p.add_argument("--prepare", metavar="DIR", default=None, help="only write the videos the device needs into DIR")
    p.add_argument("--record", action="store_true", help="append the summary to benchmarks/RESULTS.md")
    p.add_argument("--results", default=None, help="results file for --record (default benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {', '.join(unknown)}; known: {', '.join(PARTS)}")
    return args


# --------------------------------------------------------------------------- helpers


class Context:
    """What the parts share: sizes, device, folders, the time box and every part's document."""

    def __init__(self, args, sizes, device, out, work, data):
        self.args, self.sizes, self.device, self.out, self.work, self.data = args, sizes, device, out, work, data
        self.dry_run = args.dry_run
        self.docs = {}
        self.deadline = math.inf  # of the part that runs now

    def left(self):
        """Seconds left in the current part's time box."""
        return self.deadline - time.monotonic()

    def save(self, doc):
        """(Re)write the part's JSON file atomically."""
        path = self.out / f"{PARTS.index(doc['part']) + 1}_{doc['part']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, path)


def subprocess_env(dry_run):
    """The environment of the subprocesses: this checkout's sources first, deterministic cuBLAS."""
    path = [str(REPO / "src"), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1", VIDEOMOCO_GPU_CHECK="1")
    if dry_run:
        env["OMP_NUM_THREADS"] = "1"  # 2 OpenMP threads on 2 busy cores make tiny steps 100x slower
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def spawn(cmd, log, env):
    """Start `cmd` in its own process group, its output to the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, log, timeout):
    """Wait for `proc` at most `timeout` s, then kill its group -> (exit code, or None when killed; its output)."""
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    return code, Path(log).read_text(errors="replace")


def run_logged(cmd, log, timeout, env):
    """Run `cmd` to the end or for `timeout` s -> (exit code or None when timed out, output)."""
    return finish(spawn(cmd, log, env), log, timeout)


def tail(text, chars=3000):
    return text[-chars:]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def cudnn_flags(deterministic=False, benchmark=False, tf32=None):
    """Set cuDNN's algorithm choice, and TF32 of convolutions and matmuls unless None, for a block; restored after."""
    b, m = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (b.deterministic, b.benchmark, b.allow_tf32, m.allow_tf32)
    b.deterministic, b.benchmark = deterministic, benchmark
    if tf32 is not None:
        b.allow_tf32 = m.allow_tf32 = tf32
    try:
        yield
    finally:
        b.deterministic, b.benchmark, b.allow_tf32, m.allow_tf32 = saved


def json_rows(text):
    """The JSON lines a benchmark printed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def train_step_argv(sizes, device, arch, frames, batch, config):
    """`benchmarks.train_step` flags for one VideoMoCo step configuration."""
    return ["--mode", "videomoco", "--arch", arch, "--width", str(sizes.width), "--frames", str(frames),
            "--crop", str(sizes.crop), "--batch", str(batch), "--moco-k", str(sizes.moco_k),
            "--warmup", str(sizes.warmup), "--iters", str(sizes.iters), "--device", str(device),
            "--matmul_size", str(sizes.matmul_size), *CONFIGS[config]]


def train_step_in_process(argv):
    """`benchmarks.train_step.main(argv)` here -> (its last JSON row, what it printed to stderr)."""
    from benchmarks import train_step

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_step.main(argv)
    rows = json_rows(out.getvalue())
    if code or not rows:
        raise RuntimeError(f"train_step exited with {code}: {tail(err.getvalue(), 500)}")
    return rows[-1], err.getvalue()


def profile_table(text):
    """The torch.profiler table train_step prints after `--- profile`, or None."""
    start = text.find("--- profile")
    return text[start:].strip() if start >= 0 else None


def speed_row(row, arch, frames, config, peak_bf16):
    """The fields of a train_step row that the summary uses, and MFU against the bf16 matmul rate."""
    keep = ("batch", "clip", "step_ms", "clips_per_s", "peak_mem_mib", "gflop_per_step", "achieved_tflops", "mfu")
    return {"arch": arch, "frames": frames, "config": config, "status": "ok", **{k: row.get(k) for k in keep},
            "mfu_bf16": row["achieved_tflops"] / peak_bf16 if peak_bf16 else None}


# --------------------------------------------------------------------------- part 1: correctness


def pytest_cuda(ctx, timeout):
    """`pytest -m cuda` in a subprocess -> counts of passed, failed, skipped, ... and the exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    code, output = run_logged(cmd, ctx.work / "pytest.log", timeout, subprocess_env(ctx.dry_run))
    lines = [line for line in output.splitlines() if line.strip()]
    counts = {k.rstrip("s") if k in ("errors", "warnings") else k: int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)",
                                     lines[-1] if lines else "")}
    ok = code in (0, 5) and not counts.get("failed") and not counts.get("error")  # 5: no test selected
    return {"status": "timed out" if code is None else "ok" if ok else "failed", "exit_code": code,
            "counts": counts, "command": " ".join(cmd[1:]), "output_tail": tail(output)}


def amp_agreement(ctx):
    """bf16 and fp16 autocast steps against the fp32 step (TF32 off) from the same state and inputs.

    The queue is filled with the keys of random clips first (`amp_layers.filled_state`). The autocast steps
    replay the fp32 step's dropped frames (the generator's top-k is discrete: a near-tie decided otherwise
    would train on another clip, which is not rounding); whether their own choice agreed is reported.
    """
    from benchmarks import amp_layers, train_step

    s, device = ctx.sizes, ctx.device
    args = train_step.parse_args(train_step_argv(s, device, s.amp_arch, s.amp_frames, s.amp_batch, "fp32")
                                 + ["--moco-k", str(s.amp_k)])
    with cudnn_flags(tf32=False):
        state, clips = amp_layers.filled_state(args, device, s.amp_batch, s.amp_frames, s.crop, s.amp_k)
        ref_losses, ref_grads, ref_keep = amp_layers.step(args, state, "fp32", clips, device)
    rows = []
    for precision in ("bf16", "fp16"):
        _, _, own_keep = amp_layers.step(args, state, precision, clips, device)
        losses, grads, _ = amp_layers.step(args, state, precision, clips, device, keep=ref_keep)
        rel = {k: abs(losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in losses}
        cos = amp_layers.player_cosines(grads, ref_grads)
        cos = [cos["d"], cos["g"]]
        within = max(rel.values()) < AMP_TOLERANCE["loss_rel_diff"] and min(cos) > AMP_TOLERANCE["grad_cosine"]
        ok = within if not ctx.dry_run else all(math.isfinite(v) for v in [*losses.values(), *cos])
        rows.append({"precision": precision, "status": "ok" if ok else "failed", "within_tolerance": within,
                     "losses": losses, "loss_rel_diff": rel, "max_loss_rel_diff": max(rel.values()),
                     "grad_cosine_d": cos[0], "grad_cosine_g": cos[1],
                     "own_drops_agree": bool(torch.equal(own_keep, ref_keep))})
        free_memory(device)
    return {"status": "ok" if all(r["status"] == "ok" for r in rows) else "failed", "reference": ref_losses,
            "tolerance": AMP_TOLERANCE, "shape": [s.amp_batch, 3, s.amp_frames, s.crop, s.crop], "arch": s.amp_arch,
            "moco_k": s.amp_k, "judged": not ctx.dry_run,
            "note": "fp32 reference with TF32 off; fp16 with GradScaler(init_scale=256); autocast steps replay the "
                    "fp32 step's dropped frames" + (
                        "; dry run: the tolerance is not applied (a width-8 net's step is mostly rounding in bf16, "
                        "see benchmarks/RESULTS.md 'autocast gradients against fp32'), only finiteness"
                        if ctx.dry_run else ""),
            "rows": rows}


def compare_checkpoints(a, b):
    """Max abs difference of every parameter and buffer of the model and the generator of two checkpoints."""
    from videomoco.engine import checkpoint as ck

    ca, cb = ck.load_checkpoint(a), ck.load_checkpoint(b)
    diff, equal = 0.0, True
    for part in ("state_dict", "generator"):
        for key, value in ca[part].items():
            other = cb[part][key]
            equal = equal and torch.equal(value, other)
            if value.is_floating_point() and value.numel():
                d = float((value.float() - other.float()).abs().max())
                diff = max(diff, d if math.isfinite(d) else math.inf)  # max() would skip a nan
    return {"max_abs_diff": diff, "equal": equal, "steps": [ca["step"], cb["step"]]}


def last_loss(log_dir):
    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("loss_d") if lines else None


def pretrain_resume(ctx):
    """`videomoco pretrain` for `cli_steps` steps straight through, and stopped at `cli_stop` then resumed.

    The straight run and the first half run at the same time (two processes); every run has the same flags
    (bf16, channels_last, --deterministic, --device auto) except --max_steps and --resume.
    """
    from videomoco.data.index import build_index

    s = ctx.sizes
    index = ctx.work / "cli_index"
    build_index(ctx.data / "cli" / "videos", index, workers=1, progress=False)  # before the runs: no race
    epochs = math.ceil(s.cli_steps * s.cli_batch / s.cli_videos)
    flags = ["-a", s.cli_arch, "--width", str(s.cli_width), "-fpc", str(s.cli_frames), "-cs", str(s.cli_crop),
             "-b", str(s.cli_batch), "-j", str(s.cli_workers), "--moco-k", str(max(4 * s.cli_batch, 16)),
             "--moco-dim", "32", "--epochs", str(epochs), "--adv_start_epoch", str(s.cli_adv_start),
             # the CPU dry run in fp32: bf16 autocast on CPU overflowed BN's running_var of its tiny net at times,
             # which the run now refuses to save (non-finite weights)
             "--precision", "fp32" if ctx.dry_run else "bf16", "--channels_last", "--deterministic",
             "--device", "auto", "--seed", "0",
             "-p", "5", "--save_every", "5", "--image_every", "5"]
    env = subprocess_env(ctx.dry_run)

    def cli(name, *extra):
        out = ctx.work / name
        return [sys.executable, "-m", "videomoco", "pretrain", str(index), *flags, "--log_dir", str(out / "log"),
                "--ckp_dir", str(out / "ckp"), *extra]

    runs = {"straight": cli("straight"), "first_half": cli("resumed", "--max_steps", str(s.cli_stop))}
    procs = {name: spawn(cmd, ctx.work / f"{name}.log", env) for name, cmd in runs.items()}
    result = {"steps": s.cli_steps, "stop_at": s.cli_stop, "command": " ".join(runs["straight"][1:]), "runs": {}}
    for name, proc in procs.items():
        code, output = finish(proc, ctx.work / f"{name}.log", ctx.left())
        result["runs"][name] = {"exit_code": code, "output_tail": tail(output, 1500)}
    if all(r["exit_code"] == 0 for r in result["runs"].values()):
        code, output = run_logged(cli("resumed", "--resume", "auto"), ctx.work / "resume.log", ctx.left(), env)
        result["runs"]["resume"] = {"exit_code": code, "output_tail": tail(output, 1500)}
    codes = [r["exit_code"] for r in result["runs"].values()]
    if None in codes:
        return result | {"status": "timed out"}
    if codes != [0, 0, 0]:
        return result | {"status": "failed"}
    from videomoco.engine import retention

    finals = [retention.list_checkpoints(ctx.work / name / "ckp")[-1] for name in ("straight", "resumed")]
    result.update(compare_checkpoints(*finals), checkpoints=[p.name for p in finals],
                  final_loss_d=[last_loss(ctx.work / name / "log") for name in ("straight", "resumed")])
    result["status"] = "ok" if result["equal"] and result["steps"] == [s.cli_steps] * 2 else "failed"
    return result


def guarded(check, *args):
    """`check(*args)`, or an error entry when it raises (so that one broken check does not hide the next)."""
    try:
        return check(*args)
    except Exception as e:
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": tail(traceback.format_exc())}


def part_correctness(ctx, doc):
    checks = doc["results"]
    checks["pytest"] = guarded(pytest_cuda, ctx, ctx.left() * ctx.sizes.pytest_share)
    ctx.save(doc)
    checks["amp"] = guarded(amp_agreement, ctx)
    ctx.save(doc)
    free_memory(ctx.device)
    checks["pretrain_resume"] = guarded(pretrain_resume, ctx)
    statuses = [c["status"] for c in checks.values()]
    doc["status"] = "ok" if all(st == "ok" for st in statuses) else "timed out" if "timed out" in statuses else "failed"


# --------------------------------------------------------------------------- part 2: encoders


def part_encoders(ctx, doc):
    """Our encoders with torchvision's random weights (strict load) against torchvision, fp32, eval and train mode."""
    try:
        import torchvision
        import torchvision.models.video as tv
    except ImportError as e:
        doc["status"], doc["results"]["reason"] = "skipped", f"torchvision is not importable: {e}"
        return
    from videomoco.models import build_encoder

    s, device = ctx.sizes, ctx.device
    rows = doc["results"].setdefault("rows", [])
    doc["results"].update(tolerance=f"max abs diff <= {ENCODER_TOLERANCE} x max |torchvision output|",
                          input=[2, 3, s.frames[0], s.crop, s.crop], torchvision=torchvision.__version__)
    with cudnn_flags(deterministic=True, tf32=False):
        for name in ENCODERS:
            torch.manual_seed(0)
            ref = getattr(tv, name)(weights=None).to(device)
            ours = build_encoder(name, num_classes=400).to(device)
            ours.load_state_dict(ref.state_dict(), strict=True)
            x = torch.randn(2, 3, s.frames[0], s.crop, s.crop, device=device)
            row = {"arch": name}
            for mode in ("eval", "train"):
                with torch.no_grad():
                    want, got = ref.train(mode == "train")(x), ours.train(mode == "train")(x)
                row[f"max_abs_diff_{mode}"] = float((got - want).abs().max())
                row[f"max_abs_output_{mode}"] = float(want.abs().max())
            ok = all(row[f"max_abs_diff_{m}"] <= ENCODER_TOLERANCE * row[f"max_abs_output_{m}"]
                     for m in ("eval", "train"))
            rows.append(row | {"status": "ok" if ok else "failed"})
            ctx.save(doc)
            del ref, ours
            free_memory(device)
    doc["status"] = "ok" if all(r["status"] == "ok" for r in rows) else "failed"


# --------------------------------------------------------------------------- part 3: speed


def largest_batch(ctx, arch, frames):
    """The largest batch of a bf16 + channels_last VideoMoCo step that the memory planner says fits."""
    from benchmarks import train_step
    from videomoco.engine import memory

    s, device = ctx.sizes, ctx.device
    args = train_step.parse_args(train_step_argv(s, device, arch, frames, s.batch, "bf16+cl"))
    trainer, _ = train_step.build_trainer(args, device)
    clip = (3, frames, s.crop, s.crop)
    estimate = memory.probe_step(trainer, clip, True, device, channels_last=True)
    usable = memory.usable_bytes(memory.budget_bytes(device))
    del trainer
    free_memory(device)
    fits = max(1, (usable - estimate.fixed) // estimate.per_clip)  # peak(m, m) = fixed + m * per_clip
    return min(s.max_batch, max(s.batch_step, fits // s.batch_step * s.batch_step)), int(fits)


def measure(ctx, rows, arch, frames, batch, config, peak, extra=()):
    """One train_step run, appended to `rows` (an out-of-memory or error row when it fails)."""
    argv = train_step_argv(ctx.sizes, ctx.device, arch, frames, batch, config) + list(extra)
    try:
        row, err = train_step_in_process(argv)
        rows.append(speed_row(row, arch, frames, config, peak))
        return row, err
    except torch.OutOfMemoryError:
        rows.append({"arch": arch, "frames": frames, "config": config, "batch": batch, "status": "out of memory"})
    except Exception as e:
        rows.append({"arch": arch, "frames": frames, "config": config, "batch": batch, "status": "error",
                     "error": f"{type(e).__name__}: {e}"[:1000]})
    finally:
        free_memory(ctx.device)
    return None, ""


def fastest(rows, arch, frames, batch):
    ok = [r for r in rows if r["status"] == "ok" and (r["arch"], r["frames"], r["batch"]) == (arch, frames, batch)]
    return max(ok, key=lambda r: r["clips_per_s"]) if ok else None


def part_speed(ctx, doc):
    """fp32 / bf16 / bf16 + channels_last steps at batch 32 per arch and clip, the fastest's profile,
    then the largest batch that fits."""
    s, device, res = ctx.sizes, ctx.device, doc["results"]
    rows = res.setdefault("rows", [])

    def peak():
        return common.matmul_peak(device, dtype=torch.bfloat16, size=s.matmul_size, iters=2 if ctx.dry_run else 10)

    res["bf16_matmul_tflops"] = peak()
    res["fp32_conv_tf32"] = torch.backends.cudnn.allow_tf32
    res["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    shapes = [(a, f) for f in s.frames for a in s.archs]  # the goal's shape first
    timed_out = False
    with cudnn_flags(benchmark=True):
        for arch, frames in shapes:
            for config in ("fp32", "bf16", "bf16+cl"):
                if ctx.left() <= 0:
                    timed_out = True
                    break
                measure(ctx, rows, arch, frames, s.batch, config, res["bf16_matmul_tflops"])
                ctx.save(doc)
        best = fastest(rows, s.archs[0], s.frames[0], s.batch)
        if best and ctx.left() > 0:
            _, err = measure(ctx, [], best["arch"], best["frames"], s.batch, best["config"], res["bf16_matmul_tflops"],
                             ["--profile", str(s.profile_rows), "--warmup", "1", "--iters", "1"])
            res["profile"] = {"config": best["config"], "arch": best["arch"], "frames": best["frames"],
                              "batch": s.batch, "table": profile_table(err)}
            ctx.save(doc)
        for arch, frames in shapes:
            if ctx.left() <= 0:
                timed_out = True
                break
            try:
                batch, fits = largest_batch(ctx, arch, frames)
            except Exception as e:
                rows.append({"arch": arch, "frames": frames, "config": "bf16+cl", "status": "error", "largest": True,
                             "error": f"planner: {type(e).__name__}: {e}"[:1000]})
                continue
            if batch <= s.batch:
                continue
            extra = ["--warmup", "1", "--iters", str(max(2, s.iters // 2))]
            n = len(rows)
            measure(ctx, rows, arch, frames, batch, "bf16+cl", res["bf16_matmul_tflops"], extra)
            if rows[-1]["status"] == "out of memory" and ctx.left() > 0:  # the planner's margin was too thin
                measure(ctx, rows, arch, frames, batch * 3 // 4 // s.batch_step * s.batch_step, "bf16+cl",
                        res["bf16_matmul_tflops"], extra)
            for r in rows[n:]:
                r.update(largest=True, planner_fits=fits)
            ctx.save(doc)
    res["bf16_matmul_tflops"] = max(res["bf16_matmul_tflops"], peak())  # before and after: the better one
    for r in rows:
        if r["status"] == "ok":
            r["mfu_bf16"] = r["achieved_tflops"] / res["bf16_matmul_tflops"]
    res["fastest"] = {}
    for arch, frames in shapes:
        best = fastest(rows, arch, frames, s.batch)
        res["fastest"][f"{arch} {frames}x{s.crop}x{s.crop}"] = best["config"] if best else None
    at_batch = [r for r in rows if not r.get("largest")]  # an out-of-memory largest batch is a finding, no failure
    doc["status"] = "timed out" if timed_out else "ok" if at_batch and all(r["status"] == "ok" for r in at_batch) \
        else "failed"


# --------------------------------------------------------------------------- part 4: data


def goal_config(ctx):
    """The fastest eager configuration of the goal's shape in part 3 (bf16 + channels_last without one)."""
    rows = ctx.docs.get("speed", {}).get("results", {}).get("rows", [])
    s = ctx.sizes
    best = fastest(rows, s.archs[0], s.frames[0], s.batch)
    return (best["config"], best["clips_per_s"]) if best else ("bf16+cl", None)


def part_data(ctx, doc):
    """Per worker count: clips/s of the loader + GPU augmentation, and the step fed by it against ready clips."""
    from benchmarks import train_step
    from videomoco.data.datasets import PretrainDataset, build_loader, set_epoch
    from videomoco.data.index import build_index
    from videomoco.engine.config import PretrainConfig
    from videomoco.engine.pretrain import build_augmentation

    s, device, res = ctx.sizes, ctx.device, doc["results"]
    frames, b = s.frames[0], s.batch
    config, step_rate = goal_config(ctx)
    index = build_index(ctx.data / "data" / "videos", ctx.work / "data_index", workers=min(8, os.cpu_count() or 1),
                        progress=False)
    needed = b * (2 + s.data_batches + s.e2e_steps)
    index = replace(index, records=index.records * math.ceil(needed / len(index)))  # one epoch covers a round
    cfg = PretrainConfig()
    augment = build_augmentation(cfg, device)
    args = train_step.parse_args(train_step_argv(s, device, s.archs[0], frames, b, config))
    trainer, _ = train_step.build_trainer(args, device)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format

    def prepare(clips):  # as engine.loop does: (B, 3, T, H, W) uint8 -> augmented float on the device
        return augment(clips.to(device, non_blocking=True)).contiguous(memory_format=fmt)

    def steps(batches):  # wall seconds of one step per item of `batches` (device synchronised at the ends)
        common.synchronize(device)
        start = time.perf_counter()
        for q, k in batches:
            trainer.step(prepare(q), prepare(k), adversarial=True)
        common.synchronize(device)
        return time.perf_counter() - start

    res.update(video=f"{s.data_size[0]}x{s.data_size[1]}", videos=s.data_videos, clip=f"{frames}x{s.crop}x{s.crop}",
               batch=b, step_config=f"{s.archs[0]} {config}", part3_step_clips_per_s=step_rate,
               starved_if=f"data time > {STARVED:.0%} of the step time", cores=os.cpu_count())
    rows = res.setdefault("rows", [])
    with cudnn_flags(benchmark=True):
        clip = torch.randint(0, 256, (b, 3, frames, s.crop, s.crop), dtype=torch.uint8)
        ready = [(clip.pin_memory(), clip.pin_memory()) if device.type == "cuda" else (clip, clip.clone())]
        steps(ready * 2)  # warm-up: cuDNN's algorithm search, the optimiser state
        common.synchronize(device)
        start = time.perf_counter()
        for _ in range(s.e2e_steps):
            prepare(ready[0][0])
        common.synchronize(device)
        res["augment_ms_per_view"] = 1e3 * (time.perf_counter() - start) / s.e2e_steps
        for workers in s.workers:
            if ctx.left() <= 0:
                doc["status"] = "timed out"
                return
            dataset = PretrainDataset(index, frames_per_clip=frames, crop_size=s.crop)
            loader = build_loader(dataset, b, workers, pin_memory=device.type == "cuda")
            set_epoch(loader, 0)
            it = iter(loader)
            next(it)  # the workers' start-up
            common.synchronize(device)
            start = time.perf_counter()
            for _ in range(s.data_batches):
                q, k = next(it)
                prepare(q)
                prepare(k)
            common.synchronize(device)
            loader_rate = s.data_batches * b / (time.perf_counter() - start)
            fed = steps(next(it) for _ in range(s.e2e_steps))
            alone = steps(ready * s.e2e_steps)
            overhead = fed / alone - 1  # extra time per step that the data costs
            rows.append({"workers": loader.num_workers, "loader_clips_per_s": loader_rate,
                         "fed_step_clips_per_s": s.e2e_steps * b / fed,
                         "ready_step_clips_per_s": s.e2e_steps * b / alone,
                         "data_time_fraction": overhead, "starved": overhead > STARVED,
                         "loader_over_part3_step": loader_rate / step_rate if step_rate else None})
            del it, loader
            ctx.save(doc)
    doc["status"] = "ok"


# --------------------------------------------------------------------------- part 5: compile


def part_compile(ctx, doc):
    """bf16 + channels_last + torch.compile per shape, goal first, each a train_step subprocess killed at the box.

    The dry run compiles with the aot_eager backend: the same graph capture and compiled autograd (where
    torch.compile's failures of a training step show, e.g. donated buffers under retain_graph), without
    inductor's kernel generation, which takes minutes on 2 CPU cores.
    """
    s, res = ctx.sizes, doc["results"]
    rows = res.setdefault("rows", [])
    peak = ctx.docs.get("speed", {}).get("results", {}).get("bf16_matmul_tflops")
    config = "bf16+cl+compile"
    backend = ["--compile_backend", "aot_eager"] if ctx.dry_run else []
    res["note"] = "dry run: torch.compile with the aot_eager backend" if ctx.dry_run else None
    env = subprocess_env(ctx.dry_run)
    for frames in s.frames:
        for arch in s.archs:
            if ctx.left() <= 1:
                rows.append({"arch": arch, "frames": frames, "config": config, "status": "not run (time box)"})
                continue
            argv = train_step_argv(s, ctx.device, arch, frames, s.batch, config) + backend + [
                "--profile", str(s.profile_rows)]
            started = time.monotonic()
            code, output = run_logged([sys.executable, "-m", "benchmarks.train_step", *argv],
                                      ctx.work / f"compile_{arch}_{frames}.log", ctx.left(), env)
            found = json_rows(output)
            if code == 0 and found:
                row = speed_row(found[-1], arch, frames, config, peak)
                row.update(seconds=time.monotonic() - started, profile=profile_table(output))
            else:
                status = "timed out" if code is None else "error"
                row = {"arch": arch, "frames": frames, "config": config, "batch": s.batch, "status": status,
                       "seconds": time.monotonic() - started, "output_tail": tail(output, 2000)}
            rows.append(row)
            ctx.save(doc)
    statuses = {r["status"] for r in rows}
    cut = statuses & {"timed out", "not run (time box)"}
    doc["status"] = "ok" if statuses == {"ok"} else "timed out" if cut else "failed"


PART_FUNCTIONS = {"correctness": part_correctness, "encoders": part_encoders, "speed": part_speed,
                  "data": part_data, "compile": part_compile}


# --------------------------------------------------------------------------- preparation, summary, main


def prepare(root, sizes=FULL):
    """Write the data part's H.264 videos (root/data/videos) and the pretrain part's (root/cli/videos).

    Existing files are kept. Returns the bytes written under `root` in all.
    """
    from benchmarks.data import make_frames
    from videomoco.data.encode import write_video

    root = Path(root)
    jobs = [(root / "data" / "videos" / f"v{i:03d}.mp4", round(sizes.data_seconds * 25), sizes.data_size,
             sizes.data_gop, i) for i in range(sizes.data_videos)]
    jobs += [(root / "cli" / "videos" / f"v{i:03d}.mp4", sizes.cli_video_frames, sizes.cli_video_size, None, i)
             for i in range(sizes.cli_videos)]
    for path, num_frames, (w, h), gop, seed in jobs:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, make_frames(num_frames, w, h, seed), 25, "h264", gop=gop)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def speed_rows(ctx):
    """Every measured speed row, parts 3 and 5."""
    return [r for n in ("speed", "compile") for r in ctx.docs.get(n, {}).get("results", {}).get("rows", [])]


def speed_summary(ctx, add):
    """Per shape at the common batch: the fastest configuration, its MFU and its gain over fp32; the largest batches."""
    s = ctx.sizes
    ok = [r for r in speed_rows(ctx) if r["status"] == "ok"]
    for arch, frames in [(a, f) for f in s.frames for a in s.archs]:
        best = fastest(ok, arch, frames, s.batch)
        base = next((r for r in ok if (r["arch"], r["frames"], r["batch"], r["config"])
                     == (arch, frames, s.batch, "fp32")), None)
        if best:
            gain = f", {best['clips_per_s'] / base['clips_per_s']:.2f}x fp32" if base else ""
            mfu = f"{best['mfu_bf16']:.1%}" if best.get("mfu_bf16") is not None else "?"
            add("speed", f"{arch} {frames}x{s.crop}x{s.crop} b{s.batch} fastest",
                f"{best['config']}: {best['clips_per_s']:.1f} clips/s, MFU {mfu}{gain}, "
                f"{best['peak_mem_mib'] / 1024:.1f} GiB", "ok")
    for r in ok:
        if r.get("largest"):
            add("speed", f"{r['arch']} {r['frames']}f largest batch {r['batch']}",
                f"{r['clips_per_s']:.1f} clips/s, {r['peak_mem_mib'] / 1024:.1f} GiB", "ok")


def summary_rows(ctx):
    """The short table: one row per check."""
    rows = []

    def add(part, check, result, status):
        rows.append({"part": part, "check": check, "result": result, "status": status})

    for name in PARTS:
        doc = ctx.docs.get(name)
        if doc is None:
            continue
        res = doc["results"]
        if doc.get("error") or doc["status"] == "skipped":
            add(name, "-", doc.get("error") or res.get("reason", ""), doc["status"])
        elif name == "correctness":
            for check, r in res.items():
                if r["status"] == "error":
                    add(name, check, r["error"][:100], "error")
            if "counts" in res.get("pytest", {}):
                c = res["pytest"]["counts"]
                add(name, "pytest -m cuda", ", ".join(f"{n} {k}" for k, n in c.items()) or "no summary line",
                    res["pytest"]["status"])
            for r in res.get("amp", {}).get("rows", []):
                add(name, f"{r['precision']} vs fp32 step", f"loss rel diff {r['max_loss_rel_diff']:.2g}, grad cos "
                    f"D {r['grad_cosine_d']:.5f} G {r['grad_cosine_g']:.5f}", r["status"])
            if "pretrain_resume" in res:
                r = res["pretrain_resume"]
                found = (f"max abs diff {r['max_abs_diff']:.3g}" + (" (bitwise equal)" if r["equal"] else "")
                         if "max_abs_diff" in r else "exit codes " + str([x["exit_code"] for x in r["runs"].values()]))
                add(name, f"pretrain {r['steps']} steps vs stop at {r['stop_at']} + resume", found, r["status"])
        elif name == "encoders":
            for r in res.get("rows", []):
                add(name, f"{r['arch']} vs torchvision", f"max abs diff eval {r['max_abs_diff_eval']:.2g}, "
                    f"train {r['max_abs_diff_train']:.2g}", r["status"])
        elif name == "data":
            for r in res.get("rows", []):
                versus = r["loader_over_part3_step"]
                add(name, f"{r['workers']} workers, {res['step_config']}",
                    f"loader {r['loader_clips_per_s']:.0f} clips/s" + (f" ({versus:.2f}x the step)" if versus else "")
                    + f", data {r['data_time_fraction']:.1%} of the step", "starved" if r["starved"] else "ok")
        if name in ("speed", "compile"):
            for r in res.get("rows", []):
                if r["status"] != "ok" or name == "compile":
                    found = f"{r['clips_per_s']:.1f} clips/s" if r["status"] == "ok" else r.get("error", "")[:100]
                    seconds = f" ({r['seconds']:.0f} s in all)" if "seconds" in r else ""
                    add(name, f"{r['arch']} {r['frames']}f b{r.get('batch', '?')} {r['config']}", found + seconds,
                        r["status"])
        if name == "speed" or (name == "compile" and "speed" not in ctx.docs):
            speed_summary(ctx, add)
    return rows


def speed_table(ctx):
    """Every speed row (parts 3 and 5), for RESULTS.md."""
    keys = ("arch", "clip", "batch", "config", "clips_per_s", "step_ms", "peak_mem_mib", "achieved_tflops", "mfu_bf16",
            "status")
    return [{k: r.get(k) if r.get(k) is not None else "" for k in keys} for r in speed_rows(ctx)]


def write_summary(ctx, rows, command):
    """DIR/summary.md (and RESULTS.md with --record): the summary table and the speed table."""
    peak = ctx.docs.get("speed", {}).get("results", {}).get("bf16_matmul_tflops")
    note = f"bf16 matmul {peak:.4g} TFLOP/s measured in the run (MFU's denominator)" if peak else None
    targets = [ctx.out / "summary.md"] + ([ctx.args.results or common.RESULTS_PATH] if ctx.args.record else [])
    speed = speed_table(ctx)
    for path in targets if rows else []:
        common.record("gpu check" + (" (dry run, CPU)" if ctx.dry_run else ""), rows, command, path=path, note=note)
        if speed:
            common.record("gpu check: VideoMoCo step speed", speed, command, path=path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.prepare:
        size = prepare(args.prepare)
        print(f"wrote {args.prepare}: {size / 2**20:.1f} MiB")
        return 0
    if args.dry_run:
        torch.set_num_threads(1)  # see subprocess_env
    elif not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="videomoco-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data" if args.dry_run else Path(args.data)
    if args.dry_run or not (data / "data").is_dir():
        print(f"generating the videos in {data}", file=sys.stderr)
        prepare(data, sizes)
    ctx = Context(args, sizes, device, out, work, data)
    command = common.command_line("benchmarks.gpu", argv)
    machine = common.machine_info()
    start = time.monotonic()
    shares = {name: SHARES[name] / sum(SHARES[p] for p in args.parts) for name in args.parts}
    done_share = 0.0
    try:
        for name in PARTS:
            if name not in args.parts:
                continue
            done_share += shares[name]
            ctx.deadline = start + done_share * args.budget_s  # unused time of earlier parts passes on
            doc = {"part": name, "status": "running", "budget_s": ctx.left(), "dry_run": args.dry_run,
                   "device": str(device), "command": command, "machine": machine, "results": {}}
            ctx.docs[name] = doc
            print(f"[{time.monotonic() - start:.0f}s] {name}: {ctx.left():.0f}s", file=sys.stderr, flush=True)
            part_start = time.monotonic()
            try:
                PART_FUNCTIONS[name](ctx, doc)
            except Exception as e:
                doc["status"], doc["error"] = "error", f"{type(e).__name__}: {e}"[:2000]
                doc["traceback"] = tail(traceback.format_exc(), 4000)
            doc["seconds"] = time.monotonic() - part_start
            ctx.save(doc)
            free_memory(device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = summary_rows(ctx)
    write_summary(ctx, rows, command)
    print(f"\n{common.machine_summary(machine)}\n{command}, {time.monotonic() - start:.0f} s\n")
    print(common.markdown_table(rows) if rows else "(no part ran)", flush=True)
    failed = [name for name, doc in ctx.docs.items() if doc["status"] in ("failed", "error")]
    if failed:
        print(f"benchmarks.gpu: {', '.join(failed)} failed (see {out}/)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
