"""torch.distributed set-up for the three ways a run starts.

- `torchrun` (env://): RANK / WORLD_SIZE / LOCAL_RANK in the environment; multi-node and elastic
  restarts (with `--resume auto`).
- `--multiprocessing_distributed` (the authors' way): one process per GPU via `mp.spawn`,
  `--world_size` nodes, `--rank` = node rank. On a CPU-only machine a node runs one process.
- a single process (no process group).
NCCL on GPUs, gloo on CPU. Only rank 0 writes logs and checkpoints.

Faults: a collective waits at most `--dist_timeout` seconds. Each rank keeps its progress ("step 7:
waiting for data") in the process group's store, so a rank whose collective times out or loses a peer
ends with one line saying where the others were (`collective_error_line`). `ranks_agree` compares
fingerprints of what every rank must hold alike (the weights, the queue) before a checkpoint is written.
"""

import datetime
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videomoco.engine.config import ConfigError, resolve_device

log = logging.getLogger(__name__)


class DistributedFailure(RuntimeError):
    """The process group failed (one line naming this rank): it could not be joined, or its ranks disagree."""


class RanksDisagree(DistributedFailure):
    """Ranks hold different weights or queues (one line naming the first tensor that differs and the ranks)."""


class Progress:
    """Where this rank is (step, phase), mirrored in the process group's store for the other ranks to read.

    A phase change (a few a step) records it here and wakes a writer thread, which sends the newest record
    to the store (coalescing changes it has not sent yet). `set` waits for that write up to `FLUSH_S`, so a
    rank that dies or hangs right after (in a data fetch, say) has told the others where; it does not wait
    while an earlier write is still in flight, so a stalled store costs the training thread `FLUSH_S` once,
    not at every phase. Nothing is written without a store (one process). Every rank passes through the
    same phases in the same order, so `count` tells who is behind.
    """

    KEY = "videomoco/progress/{}"
    FLUSH_S = 0.05

    def __init__(self, store=None, rank=0, world_size=1):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.count, self.step, self.phase = 0, None, "starting"
        self._record, self._wake, self._sent, self._writer = None, threading.Event(), threading.Event(), None
        self._in_flight = False

    def set(self, phase, step=None):
        self.count, self.step, self.phase = self.count + 1, step, phase
        if self.store is None:
            return
        self._record = f"{self.count} {-1 if step is None else step} {phase}"
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="videomoco-progress", daemon=True)
            self._writer.start()
        stalled = self._in_flight
        self._sent.clear()
        self._wake.set()
        if not stalled:
            self._sent.wait(self.FLUSH_S)

    def _write(self):
        key = self.KEY.format(self.rank)
        while True:
            self._wake.wait()
            self._wake.clear()
            self._in_flight = True
            try:
                self.store.set(key, self._record)
            except Exception:  # the store is gone (its host exited): nothing left to tell
                self._sent.set()
                return
            self._in_flight = False
            self._sent.set()

    def read(self):
        """{rank: (count, step, phase)} of every rank that has reported; {} if there is no store or it is gone."""
        if self.store is None:
            return {}
        keys = [self.KEY.format(r) for r in range(self.world_size)]
        try:  # `check` first: a `get` of a missing key would wait for it
            present = list(enumerate(keys)) if self.store.check(keys) else [
                (r, k) for r, k in enumerate(keys) if self.store.check([k])]
            values = self.store.multi_get([k for _, k in present])
        except Exception:  # the store's host is gone (rank 0 hosts it without torchrun's shared store)
            return {}
        out = {}
        for (r, _), value in zip(present, values):
            count, step, phase = value.decode().split(" ", 2)
            out[r] = (int(count), None if step == "-1" else int(step), phase)
        return out


def _where(step, phase):
    return phase if step is None else f"step {step} ({phase})"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    progress: Progress = field(default_factory=Progress)

    @property
    def distributed(self):
        return self.world_size > 1


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def procs_per_node(cfg):
    """Processes on this node: one per GPU with --multiprocessing_distributed (one on CPU)."""
    if launched_by_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cfg.multiprocessing_distributed and _wants_cuda(cfg):
        return torch.cuda.device_count()
    return 1


def _wants_cuda(cfg):
    return resolve_device(cfg.device).startswith("cuda")


def launch(worker, cfg):
    """Run `worker(local_rank, cfg)` in this process, or spawn one process per GPU (authors' way)."""
    nprocs = procs_per_node(cfg)
    if launched_by_torchrun() or nprocs <= 1:
        return worker(0 if not launched_by_torchrun() else int(os.environ.get("LOCAL_RANK", 0)), cfg)
    try:
        mp.spawn(_spawned, nprocs=nprocs, args=(worker, cfg))
    except mp.ProcessExitedException as e:
        log.error("process %d exited with code %s", e.error_index, e.exit_code)
        return {"status": "failed", "exit_code": e.exit_code or 1}
    return {"status": "done", "exit_code": 0}


def _spawned(local_rank, worker, cfg):
    """mp.spawn target: a worker's non-zero `exit_code` becomes the process exit status."""
    result = worker(local_rank, cfg) or {}
    if result.get("exit_code"):
        raise SystemExit(result["exit_code"])


def placement(cfg, local_rank=0):
    """(rank, world size, local rank, init method) of this process: torchrun's environment, else the flags."""
    nprocs = procs_per_node(cfg)
    if launched_by_torchrun():
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                "env://")
    if cfg.multiprocessing_distributed:
        return max(cfg.rank, 0) * nprocs + local_rank, max(cfg.world_size, 1) * nprocs, local_rank, cfg.dist_url
    if cfg.dist_url == "env://" and cfg.world_size == -1:
        return 0, 1, local_rank, "env://"
    return max(cfg.rank, 0), max(cfg.world_size, 1), local_rank, cfg.dist_url


def check_world(cfg):
    """Before any process starts or joins: the world a run of `cfg` will have fits it. One-line `ConfigError`
    for a torchrun environment that is not numbers, or a --batch_size (the total) not divisible by the world size."""
    try:
        _, world_size, _, _ = placement(cfg)
    except ValueError:
        raise ConfigError("torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: "
                          f"{os.environ.get('RANK')!r} / {os.environ.get('WORLD_SIZE')!r}") from None
    if world_size < 1:
        raise ConfigError(f"torchrun's WORLD_SIZE must be >= 1, got {world_size}")
    if cfg.batch_size % world_size:
        source = ("torchrun's WORLD_SIZE" if launched_by_torchrun() else
                  f"--world_size {max(cfg.world_size, 1)} x {procs_per_node(cfg)} processes"
                  if cfg.multiprocessing_distributed else "--world_size")
        raise ConfigError(f"--batch_size {cfg.batch_size} (the total over all processes) is not divisible by the "
                          f"world size {world_size} ({source}); use a multiple of {world_size}")


def init_distributed(cfg, local_rank=0):
    """Initialise the process group (when more than one process) and pick the device -> `DistInfo`."""
    rank, world_size, local_rank, init_method = placement(cfg, local_rank)
    if _wants_cuda(cfg):  # `resolve_device` refuses a CUDA device without CUDA
        index = cfg.gpu if cfg.gpu is not None and world_size == 1 else local_rank
        if cfg.device.startswith("cuda:"):
            index = int(cfg.device.split(":")[1])
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        backend = cfg.dist_backend
        if device.type == "cpu" and backend == "nccl":
            backend = "gloo"
            if rank == 0:
                log.info("no GPU: using the gloo backend instead of nccl")
        try:
            dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        except RuntimeError as e:  # a rank that never came, an unreachable store, a peer's stale address
            raise DistributedFailure(f"rank {rank}: cannot join the process group of {world_size} ({init_method}): "
                                     f"{_reason(e)}{_restart_hint()}") from None
    progress = Progress(_default_store(), rank, world_size) if world_size > 1 else Progress()
    progress.set("starting")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, progress=progress)


def _default_store():
    """The default process group's store (torchrun's agent store, or rank 0's TCPStore); None if there is none."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def per_process(cfg, world_size, nprocs):
    """(batch size, workers) for one process: `--batch_size` is the total over all processes,
    `--workers` the total per node, clamped to the CPU cores this node has."""
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by the world size {world_size}")
    workers = math.ceil(cfg.workers / nprocs)
    cores = max(1, (os.cpu_count() or 1) // nprocs)
    if workers > cores:
        log.info("-j %d: this machine has %d CPU cores, using %d data workers per process",
                 cfg.workers, os.cpu_count() or 1, cores)
        workers = cores
    return cfg.batch_size // world_size, workers


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor):
    """Mean of `tensor` over all processes (a copy; the input is unchanged)."""
    if get_world_size() == 1:
        return tensor.detach().clone()
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(module, src=0):
    """Copy rank `src`'s buffers (BN statistics, queue) to every rank, as DDP's broadcast_buffers would."""
    if get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src)


# --- faults: failed collectives, ranks that disagree ---

# what gloo raises (a plain RuntimeError) on a timeout or a lost peer; NCCL and the store raise `dist.DistError`
_GLOO_FAILURES = ("gloo", "pair closure", "by peer", "Timed out waiting")


def is_collective_failure(err):
    """True if `err` is a collective (or the store) that timed out or lost a peer, not a bug in our code."""
    return isinstance(err, dist.DistError) or any(mark in str(err) for mark in _GLOO_FAILURES)


def _reason(err):
    """torch's message without its source locations and advice: "Connection closed by peer [10.0.0.2]:3121"."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\] ?", "", text)  # "[/path/gloo/transport/tcp/pair.cc:553] "
    return text.split(". ")[0].rstrip(".")


def _restart_hint():
    """torchrun (torch 2.5 and later) keeps one store for all the attempts of a job: after a restart a rank can
    read a peer's address from the previous attempt and fail to connect (pytorch/pytorch#135712, #167288)."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("; a restarted torchrun reuses its store, which still holds the previous attempt's addresses: "
                "run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return ""


def _others(progress, records):
    """Where the other ranks were, from their progress `records`: those behind this rank, else those elsewhere."""
    others = {r: rec for r, rec in sorted(records.items()) if r != progress.rank}
    if not others:
        return "the other ranks' progress is unknown (the store is unreachable)"
    here = (progress.step, progress.phase)
    behind = [r for r, (count, _, _) in others.items() if count < progress.count]
    elsewhere = [r for r, (_, step, phase) in others.items() if (step, phase) != here]
    listing = ", ".join(f"rank {r} at {_where(*others[r][1:])}" for r in (behind or elsewhere)[:4])
    if len(behind) == 1:
        text = f"rank {behind[0]} is behind, at {_where(*others[behind[0]][1:])}"
    elif behind:
        text = f"{len(behind)} ranks are behind: {listing}{', ...' if len(behind) > 4 else ''}"
    elif elsewhere:
        text = f"none is behind: {listing}{', ...' if len(elsewhere) > 4 else ''}"
    else:
        text = f"the other ranks are at {_where(*here)} too"
    missing = progress.world_size - 1 - len(others)
    return text + (f" ({missing} ranks never reported)" if missing else "")


def collective_error_line(err, info, timeout):
    """One line for a collective that failed on this rank: where it was, why, and where the other ranks were,
    e.g. "rank 0: a collective waited more than 30 s (--dist_timeout) at step 7 (computing); rank 1 is behind,
    at step 7 (waiting for data)"."""
    here = _where(info.progress.step, info.progress.phase)
    text = str(err).lower()
    if "timed out" in text or "timeout" in text:
        head = f"rank {info.rank}: a collective waited more than {timeout:g} s (--dist_timeout) at {here}"
    else:
        head = f"rank {info.rank}: a collective failed at {here} ({_reason(err)}: a rank exited or was killed?)"
    return f"{head}; {_others(info.progress, info.progress.read())}"


def fingerprint(tensors):
    """(N, 2) int64: per tensor, the sum of its elements' bit patterns and that sum weighted by position.

    Integer sums are exact in any order (they wrap on overflow), so equal tensors give equal fingerprints
    whatever the kernel or the thread count, where a float sum could differ in its last bit."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    rows = []
    for t in tensors:
        bits = t.detach().reshape(-1)
        if bits.is_floating_point():
            bits = bits.view(ints[bits.element_size()])
        bits = bits.long()
        position = torch.arange(1, bits.numel() + 1, device=bits.device)
        rows.append(torch.stack([bits.sum(), (bits * position).sum()]))
    return torch.stack(rows)


def ranks_agree(named, when):
    """Check that every rank holds the same `named` [(name, tensor)]: all-gathers their `fingerprint`s (2
    integers a tensor) and compares them exactly. Returns how many tensors; `RanksDisagree` (one line, the
    same on every rank) naming the first that differs and the ranks that differ from rank 0."""
    world = get_world_size()
    if world == 1:
        return len(named)
    mine = fingerprint([t for _, t in named])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # (world, N, 2): one host sync
    differs = (every != every[0]).any(dim=2)  # (world, N)
    if differs.any():
        bad = differs.any(dim=0)
        i = int(bad.nonzero()[0])
        ranks = differs[:, i].nonzero().flatten().tolist()
        who = f"rank {ranks[0]} holds" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} hold"
        raise RanksDisagree(f"rank {get_rank()}: the ranks disagree {when}: {who} another {named[i][0]} than rank 0 "
                            f"({int(bad.sum())} of {len(named)} tensors differ)")
    return len(named)
