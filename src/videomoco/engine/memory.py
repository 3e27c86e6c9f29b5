"""Memory planning: how many clips of a step fit on this device, measured before the first step.

    probe   run the real step on 1 clip (warm-up), 1 clip and 2 clips; read the absolute peak of each
            CPU: peak RSS of the process (VmHWM, reset through /proc/self/clear_refs), what the OOM
            killer sees; CUDA: the caching allocator's peak of allocated bytes
    fit     peak(m clips) = fixed + m * per_clip, and the rest of the batch's input clips on top
    plan    the fewest micro-batches whose largest one fits in (budget - reserve) * (1 - MARGIN),
            budget = what the process holds now + what the device has free (or --memory_budget)

The warm-up matters on CPU: the first step leaves optimiser state and allocator pages resident
that later steps reuse, so only the second and third peaks are comparable.
"""

import copy
import gc
import json
import logging
import math
import os
import re
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from videomoco.data.datasets import RING_SLOTS

log = logging.getLogger(__name__)

# of the budget, left free: the CPU estimates are within 12% of the measured peaks (RESULTS.md), the OS and
# its page cache need room beside the process, and the CUDA allocator fragments; a kill loses the run
MARGIN = 0.20
WORKER_BYTES = 256 * 2**20  # one DataLoader worker's private memory besides its prefetched batches
PREFETCH = RING_SLOTS  # batches each worker holds: its ring slots (>= DataLoader's prefetch_factor of 2)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "t": 2**40, "tb": 2**40}


class MemoryPlanError(ValueError):
    """Not even one clip fits (one-line message with the estimate and what would help)."""


def parse_size(text):
    """'16GB', '512m', '1.5 GiB', '2000000B' -> bytes (binary units). A unit is required: a bare '16' would be
    16 bytes where 16 GB was meant."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?(b?)\s*", str(text).lower())
    if not match or not (match[2] or match[3]):
        raise ValueError(f"{text!r} is not a size with a unit, such as 16GB, 512MB or 2000000B")
    value = float(match[1]) * _UNITS[match[2] + match[3]]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def gib(n):
    """Bytes for a log line: `21.8 GiB`, `312 MiB`."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- reading the device


def _status_bytes(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{key} not in /proc/self/status")


def _maxrss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _rss(key):
    """The process's resident set now ("VmRSS") or its high-water mark ("VmHWM"); getrusage's peak without /proc."""
    try:
        return _status_bytes(key)
    except OSError:
        return _maxrss_bytes()


def memory_in_use(device):
    """What this process holds now: CUDA allocated bytes, or the CPU resident set."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss("VmRSS")


def _release_free_heap():
    """Give the C heap's free pages back to the OS (glibc), so that RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak(device):
    """Start a peak window (CUDA: the allocator's peak; CPU: the RSS high-water mark, Linux).

    On CPU the heap's free pages are released first: pages a smaller, earlier step left resident
    would otherwise count in the next step's peak when its larger tensors are mapped anew."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's lifetime peak: an overestimate, never an under-


def peak_since_reset(device):
    """The absolute peak since `reset_peak` (see there)."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")


def _cgroup_free():
    """Bytes left under this cgroup's memory limit (v2, then v1), or None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2**60:
                return int(cap) - int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
    return None


def memory_available(device):
    """Bytes this process could still take: free device memory (plus the allocator's cached, unused
    blocks) on CUDA; MemAvailable, capped by the cgroup's limit, on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    cgroup = _cgroup_free()
    return available if cgroup is None else min(available, cgroup)


# --------------------------------------------------------------------------- the estimate


@dataclass
class StepEstimate:
    """peak(m, batch) = fixed + m * per_clip + (batch - m) * per_input_clip, absolute bytes."""

    fixed: int
    per_clip: int
    per_input_clip: int  # what a clip of the batch costs while another micro-batch is computed

    def peak(self, micro, batch):
        return self.fixed + micro * self.per_clip + (batch - micro) * self.per_input_clip


def measure_step(probe, device, per_input_clip, subtract=0, smallest=1):
    """Fit a `StepEstimate` from `probe(m)`, which runs one step on m clips: `smallest` (warm-up),
    `smallest`, `2 * smallest` (2 for a model that cannot train on one clip: BatchNorm1d).

    subtract: bytes resident only during the probe (a copy of the model it trains on).
    """
    peaks = []
    for m in (smallest, smallest, 2 * smallest):
        reset_peak(device)
        probe(m)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        peaks.append(peak_since_reset(device))
    per_clip = max((peaks[2] - peaks[1]) // smallest, per_input_clip)  # RSS noise can hide a tiny clip's cost
    return StepEstimate(fixed=peaks[1] - smallest * per_clip - subtract, per_clip=per_clip,
                        per_input_clip=per_input_clip)


@dataclass
class Plan:
    micro_batches: int
    micro_batch: int  # the largest micro-batch
    needed: int  # peak bytes of the whole batch in one go
    peak: int  # estimated peak with the plan
    budget: int  # usable bytes (after the reserve and the margin)


def usable_bytes(budget, reserve=0):
    """What a plan may fill: the budget less the reserve, less the safety margin."""
    return int((budget - reserve) * (1 - MARGIN))


def fitting_hints(estimate, usable, batch, frames, crop, flags=("-fpc", "-cs")):
    """Smaller clips with which a micro-batch of one clip would fit in `usable` bytes, e.g. `['-fpc 12',
    '-cs 80']`: the memory of a clip scales with frames x crop^2. flags: the command's names for them."""
    room = usable - estimate.fixed
    fraction = max(room / (estimate.per_clip + (batch - 1) * estimate.per_input_clip), 0.0)
    hints = [f"{flags[0]} {math.floor(frames * fraction)}"] if frames * fraction >= 1 else []
    return hints + ([f"{flags[1]} {math.floor(crop * fraction**0.5)}"] if crop * fraction**0.5 >= 8 else [])


def plan_micro_batches(estimate, batch, budget, reserve=0, what=None, smallest=1):
    """The fewest micro-batches of `batch` clips whose estimated peak fits `(budget - reserve) * (1 - MARGIN)`,
    none smaller than `smallest` clips.

    Raises `MemoryPlanError` when even a micro-batch of `smallest` clips does not fit.
    """
    usable = usable_bytes(budget, reserve)
    needed = estimate.peak(batch, batch)
    for n in range(1, batch // smallest + 1):
        micro = math.ceil(batch / n)
        if n > 1 and math.ceil(batch / (n - 1)) == micro:
            continue  # same largest micro-batch as n - 1, more steps
        if estimate.peak(micro, batch) <= usable:
            return Plan(n, micro, needed, estimate.peak(micro, batch), usable)
    clips = "one clip needs" if smallest == 1 else f"{smallest} clips need"
    raise MemoryPlanError(f"{what or f'batch of {batch}'}: {clips} ~{gib(estimate.peak(smallest, batch))}, "
                          f"{gib(usable)} usable of {gib(budget)}")


def split_text(micro_batches, batch):
    """'1 micro-batch of 32', '8 micro-batches of 4', '3 micro-batches of at most 11'."""
    size = math.ceil(batch / micro_batches)
    if micro_batches == 1:
        return f"1 micro-batch of {batch}"
    return f"{micro_batches} micro-batches of {'at most ' if batch % micro_batches else ''}{size}"


def plan_line(plan, estimate, what, batch):
    """The one log line, e.g. `batch 32 (32 per process) needs ~41.0 GiB, 21.8 GiB available: 8 micro-batches of 4
    (...)`; `what` names the batch, `batch` is the clips it splits."""
    return (f"{what} needs ~{gib(plan.needed)}, {gib(plan.budget)} available: {split_text(plan.micro_batches, batch)} "
            f"(~{gib(plan.peak)}; {gib(estimate.fixed)} + {gib(estimate.per_clip)} per clip)")


def worker_reserve(workers, batch_bytes):
    """Host memory to leave for `workers` DataLoader workers, each prefetching `PREFETCH` batches."""
    return workers * (WORKER_BYTES + PREFETCH * batch_bytes)


def budget_bytes(device, limit=None):
    """What the process may use in all: what it holds now + what is available, capped at `limit` (a budget is a
    cap: never more than the device has)."""
    there = memory_in_use(device) + memory_available(device)
    if limit is not None and limit > there:
        log.info("--memory_budget %s is more than the %s this process holds or has free: planning with %s",
                 gib(limit), gib(there), gib(there))
    return there if limit is None else min(limit, there)


# --------------------------------------------------------------------------- probing a training step


def tensor_bytes(tensors):
    """Bytes of the tensors among `tensors` (other values are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(*optimizers):
    """Bytes of the optimisers' state (momentum buffers, ...); None entries count 0."""
    return tensor_bytes(t for opt in optimizers if opt is not None for state in opt.state.values()
                        for t in state.values())


def state_bytes(trainer):
    """Bytes of every tensor an `AdversarialTrainer`'s model, generator and optimisers hold."""
    tensors = [*trainer.model.state_dict().values(), *trainer.generator.state_dict().values()]
    return tensor_bytes(tensors) + optimizer_bytes(trainer.opt_d, trainer.opt_g)


def input_bytes_per_clip(clip, device, views=2, world_size=1, shuffle_bn="all_to_all"):
    """What one more clip of the batch costs outside the micro-batch being computed: `views` float copies
    on the device, their uint8 on the host (the same memory on CPU), and under DDP the key clips of the
    shuffle: three copies with `all_to_all` (sent, received, reordered), every rank's with `all_gather`.
    clip: (C, T, H, W)."""
    elems = math.prod(clip)
    host = views * elems if torch.device(device).type == "cpu" else 0
    shuffled = 0 if world_size == 1 else world_size if shuffle_bn == "all_gather" else 3
    return views * elems * 4 + host + 4 * elems * shuffled


def smallest_trainable(module):
    """Clips a training micro-batch needs at least: 2 when a BatchNorm1d must see more than one value."""
    return 2 if any(isinstance(m, torch.nn.BatchNorm1d) for m in module.modules()) else 1


@contextmanager
def probing(device):
    """Run a memory probe: the global RNG (CPU, and CUDA) is restored afterwards, and a CUDA
    out-of-memory error in it becomes a one-line `MemoryPlanError`."""
    device = torch.device(device)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    except torch.OutOfMemoryError:
        raise MemoryPlanError("one clip does not fit: the device ran out of memory in a step of one clip") from None
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_rng_state(cuda_rng, device)
        torch.set_rng_state(rng)


def probe_step(trainer, clip, adversarial, device, channels_last=False, world_size=1):
    """`StepEstimate` of `trainer.step` on clips (C, T, H, W), measured on a copy of the trainer.

    The trainer's state and the RNG are left as they were. Under DDP every rank must call it.
    Raises `MemoryPlanError` when a CUDA step of one clip runs out of memory.
    """
    device = torch.device(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    with probing(device):
        probe = copy.deepcopy(trainer)
        probe.micro_batches = 1

        def step(m):
            im_q = torch.randn((m, *clip), device=device).contiguous(memory_format=fmt)
            probe.step(im_q, torch.randn_like(im_q), adversarial)

        per_clip = input_bytes_per_clip(clip, device, world_size=world_size, shuffle_bn=trainer.model.shuffle_bn)
        return measure_step(step, device, per_clip,
                            subtract=state_bytes(probe),
                            smallest=smallest_trainable(trainer.model))


# --- pretraining: the micro-batches of a step ---

def _pretrain_fitting_options(cfg, estimate, usable, batch):
    """What to change when one clip does not fit (the estimate's smaller clips, then other memory savers)."""
    hints = fitting_hints(estimate, usable, batch, cfg.frame_per_clip, cfg.crop_size)
    hints += ["--precision bf16"] if cfg.precision == "fp32" else []
    hints += ["--grad_checkpointing"] if not cfg.grad_checkpointing else []
    return ", ".join(hints + (["a larger --memory_budget"] if cfg.memory_budget else []))


PLAN_FILE = "memory_plan.json"  # in --log_dir: the plan, its estimate and the key that lets a restart reuse it
# the PretrainConfig fields that shape a training step's memory
STEP_FIELDS = ("arch", "width", "frame_per_clip", "crop_size", "batch_size", "precision", "channels_last",
               "grad_checkpointing", "compile", "mlp", "mlp_bn", "moco_dim", "moco_k", "views", "shuffle_bn",
               "drop_ratio", "fill", "g_loss", "real_query_loss", "shuffle_groups")


def probe_key(cfg, device, world, adversarial):
    """What a measured `StepEstimate` depends on: the step's configuration, the device and the software."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    return {**{f: getattr(cfg, f) for f in STEP_FIELDS}, "processes": world, "adversarial": adversarial,
            "device": str(device), "device_name": name, "torch": torch.__version__}


def saved_estimate(log_dir, key):
    """The `StepEstimate` that `LOG_DIR/memory_plan.json` recorded for `key`, or None (no file, another key)."""
    try:
        saved = json.loads((Path(log_dir) / PLAN_FILE).read_text())
        if saved.get("probe_key") == key:
            return StepEstimate(*(int(saved[f]) for f in ("fixed", "per_clip", "per_input_clip")))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _step_estimate(trainer, cfg, device, world, adversarial, clip):
    """(estimate, key, reused): the estimate `memory_plan.json` holds for this configuration and device when
    every rank has it (a restart, `--resume auto`), else a measured probe (three small steps)."""
    key = probe_key(cfg, device, world, adversarial)
    estimate = saved_estimate(cfg.log_dir, key)
    if world > 1:  # all ranks reuse, or all probe (the probe is collective)
        t = torch.tensor([int(estimate is not None)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        estimate = estimate if t.item() else None
    if estimate is not None:
        log.info("--micro_batch auto: reusing the step measured for this configuration and device (%s; delete it "
                 "to measure again)", Path(cfg.log_dir) / PLAN_FILE)
        return estimate, key, True
    log.info("--micro_batch auto: measuring a %s step of %d and %d clips", "VideoMoCo" if adversarial else "MoCo",
             smallest_trainable(trainer.model), 2 * smallest_trainable(trainer.model))
    return probe_step(trainer, clip, adversarial, device, cfg.channels_last, world), key, False


def plan_training_step(trainer, cfg, device, b, world, workers, start_epoch):
    """Set `trainer.micro_batches` for pretraining (`cfg`: a `PretrainConfig`) from --micro_batch N, or plan it
    from a measured probe (auto), the same on every rank. b: clips per process; world: processes.

    Returns what was decided and measured (written to `memory_plan.json` in --log_dir); `MemoryPlanError`
    (one line) when the batch cannot be split or not even one clip fits."""
    smallest = smallest_trainable(trainer.model)
    if cfg.micro_batch != "auto":
        if cfg.memory_budget:
            log.warning("--memory_budget %s is not used: --micro_batch %d sets the split (no planning)",
                        cfg.memory_budget, cfg.micro_batch)
        n = math.ceil(b / min(cfg.micro_batch, b))
        if b // n < smallest:
            raise MemoryPlanError(f"--micro_batch {cfg.micro_batch} splits the batch of {b} per process into "
                                  f"micro-batches of {b // n} clip(s); the BatchNorm1d of --mlp_bn needs at least "
                                  f"{smallest}")
        trainer.micro_batches = n
        log.info("batch %d (%d per process): %s (--micro_batch %d)", cfg.batch_size, b,
                 split_text(n, b), cfg.micro_batch)
        return {"micro_batches": n, "per_process_batch": b}
    clip = (3, cfg.frame_per_clip, cfg.crop_size, cfg.crop_size)
    adversarial = cfg.epochs > max(cfg.adv_start_epoch, start_epoch)  # plan for the costlier step if it will run
    estimate, key, reused = _step_estimate(trainer, cfg, device, world, adversarial, clip)
    limit = parse_size(cfg.memory_budget) if cfg.memory_budget else None
    budget = budget_bytes(device, limit)
    reserve = worker_reserve(workers, 2 * b * math.prod(clip)) if device.type == "cpu" else 0
    try:
        plan = plan_micro_batches(estimate, b, budget, reserve, what=f"batch {cfg.batch_size} ({b} per process)",
                                  smallest=smallest)
    except MemoryPlanError as e:
        hints = _pretrain_fitting_options(cfg, estimate, usable_bytes(budget, reserve), b)
        plan, error = None, f"{e}; to fit, try {hints}"
    n = plan.micro_batches if plan else b + 1
    if world > 1:  # every rank must split alike: the most micro-batches any rank needs
        t = torch.tensor([n], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        n = int(t.item())
    if n > b:
        raise MemoryPlanError(error if plan is None else "another rank has too little memory for one clip")
    if n != plan.micro_batches:  # another rank needs more
        plan = dataclasses.replace(plan, micro_batches=n, micro_batch=math.ceil(b / n),
                                   peak=estimate.peak(math.ceil(b / n), b))
    trainer.micro_batches = n
    what = f"batch {cfg.batch_size} ({b} per process{f' x {world}' if world > 1 else ''})"
    log.info("%s", plan_line(plan, estimate, what, b))
    return {"micro_batches": n, "per_process_batch": b, "budget_bytes": budget, "reserve_bytes": reserve,
            "margin": MARGIN, "probe_key": key, "reused": reused, **dataclasses.asdict(estimate),
            **{f"plan_{k}": v for k, v in dataclasses.asdict(plan).items()}}
