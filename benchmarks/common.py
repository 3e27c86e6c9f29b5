"""Shared helpers for the benchmarks: machine description, timing, a matmul roofline and result output.

Every benchmark is a module `benchmarks/<name>.py` with `main(argv=None)`, runnable as
`python -m benchmarks.<name>` or `videomoco bench <name>`. It prints one JSON line per result
with `emit` and, when given `--record`, appends a markdown table to `benchmarks/RESULTS.md`
with `record`, so every number in that file comes with the machine and the exact command.
"""

import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from videomoco import markdown
from videomoco.engine import memory

RESULTS_PATH = Path(__file__).resolve().with_name("RESULTS.md")


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def _nvidia_driver():
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    """What the numbers were measured on: CPU, usable cores, RAM, GPU and software versions."""
    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        # other processes' work at the start of the run: a load above the core count means shared CPUs
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(),
            gpu_count=torch.cuda.device_count(),
            driver=_nvidia_driver(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def machine_summary(info=None):
    """One line for a results table heading, e.g. `Intel Xeon, 2/2 cores, 23 GiB RAM, torch 2.13.0`."""
    info = info or machine_info()
    text = f"{info['cpu']}, {info['usable_cores']}/{info['logical_cores']} cores, {info['ram_gib']} GiB RAM"
    if "gpu" in info:
        text += f", {info['gpu']} (driver {info['driver']}, CUDA {info['cuda']}, cuDNN {info['cudnn']})"
    return text + f", torch {info['torch']}, python {info['python']}, 1-min load average {info['load_avg_1m']}"


def command_line(module, argv):
    """The exact command that reproduces a run: `python -m <module> <argv...>`."""
    return " ".join(["python -m", module] + ([shlex.join(argv)] if argv else []))


def emit(result, command=None):
    """Print `result` as one JSON line, with the machine description and the command line."""
    line = dict(result)
    line["machine"] = machine_info()
    line["command"] = command if command is not None else shlex.join(sys.argv)
    print(json.dumps(line, default=str), flush=True)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"  # no exponents for big numbers
    return value


def markdown_table(rows):
    """`rows` (list of dicts with the same keys) as a markdown table."""
    keys = list(rows[0])
    return "\n".join(markdown.table(keys, [[_cell(row.get(k, "")) for k in keys] for row in rows]))


def record(name, rows, command, path=None, note=None):
    """Append a section (title, UTC date, machine, exact command, table) to `path` (default RESULTS.md)."""
    if not rows:
        raise ValueError(f"record({name!r}): no rows to record")
    path = Path(path) if path is not None else RESULTS_PATH
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"\n### {name} ({date})\n", f"Machine: {machine_summary()}\n", f"Command: `{command}`\n"]
    if note:
        parts.append(f"{note}\n")
    parts.append(markdown_table(rows) + "\n")
    with open(path, "a") as f:
        f.write("\n".join(parts))
    return path


def synchronize(device):
    """Wait for queued kernels on `device` (a no-op on CPU) so wall-clock times are real."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _stats(times):
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "iters": len(times)}


def compare(fns, warmup=1, iters=5, sync=None):
    """Time several functions round-robin: `{name: fn}` -> `{name: timeit stats}`.

    Interleaving the calls (a, b, a, b, ...) makes outside load hit every function alike, so
    their ratio stays meaningful on a shared machine even when the absolute times are not.
    """
    if iters < 1:
        raise ValueError(f"timeit: iters must be >= 1, got {iters}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if sync is not None:
                synchronize(sync)
            start = time.perf_counter()
            fn()
            if sync is not None:
                synchronize(sync)
            times[name].append(time.perf_counter() - start)
    return {name: _stats(t) for name, t in times.items()}


def timeit(fn, warmup=1, iters=5, sync=None):
    """Call `fn()` `warmup` times untimed then `iters` times timed.

    `sync` is the device to synchronise before and after each call (None: no sync).
    Returns `{"median_s", "mean_s", "min_s", "iters"}`.
    """
    return compare({"fn": fn}, warmup, iters, sync)["fn"]


def matmul_peak(device, dtype=None, size=None, iters=5):
    """Achieved dense matmul TFLOP/s on `device`, measured now: the roofline for MFU.

    Defaults: bf16 with n=8192 on CUDA, fp32 with n=1024 on CPU (about 2 GFLOP a call).
    Returns the best of `iters` calls of `2 n^3 / t`, in TFLOP/s: a peak, so the fastest call
    (on a shared CPU the median would count other processes' load against the model).
    """
    device = torch.device(device)
    on_gpu = device.type != "cpu"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    n = size or (8192 if on_gpu else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = timeit(lambda: a @ b, warmup=2, iters=iters, sync=device)
    return 2 * n**3 / stats["min_s"] / 1e12


def peak_memory_reset(device):
    """Start a peak-memory window; returns the baseline to pass to `peak_memory_bytes`.

    The library's planner measures the same way (`videomoco.engine.memory`): CUDA resets the
    allocator's peak, CPU the process's RSS high-water mark (Linux `/proc/self/clear_refs`).
    """
    memory.reset_peak(device)
    return memory.memory_in_use(device)


def peak_memory_bytes(device, start=0):
    """Peak memory growth since `peak_memory_reset` returned `start` (CPU: peak RSS, approximate,
    because the C allocator may reuse pages that earlier, freed tensors left resident)."""
    return max(0, memory.peak_since_reset(device) - start)


def add_common_arguments(parser):
    """The flags every benchmark takes: `--quick` (smoke-test size) and `--record` (append to RESULTS.md)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one iteration (smoke test)")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--results", default=None, help="results file for --record (default benchmarks/RESULTS.md)")
    return parser
