"""torch.distributed set-up for the three ways a run starts.

- `torchrun` (env://): RANK / WORLD_SIZE / LOCAL_RANK in the environment; multi-node and elastic
  restarts (with `--resume auto`).
- `--multiprocessing_distributed` (the authors' way): one process per GPU via `mp.spawn`,
  `--world_size` nodes, `--rank` = node rank. On a CPU-only machine a node runs one process.
- a single process (no process group).
NCCL on GPUs, gloo on CPU. Only rank 0 writes logs and checkpoints.
"""

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videomoco.engine.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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
    return cfg.device != "cpu" and torch.cuda.is_available()


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


def init_distributed(cfg, local_rank=0):
    """Initialise the process group (when more than one process) and pick the device -> `DistInfo`."""
    nprocs = procs_per_node(cfg)
    if launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank, init_method = int(os.environ.get("LOCAL_RANK", 0)), "env://"
    elif cfg.multiprocessing_distributed:
        rank = max(cfg.rank, 0) * nprocs + local_rank
        world_size, init_method = max(cfg.world_size, 1) * nprocs, cfg.dist_url
    elif cfg.dist_url == "env://" and cfg.world_size == -1:
        rank, world_size, init_method = 0, 1, "env://"
    else:
        rank, world_size, init_method = max(cfg.rank, 0), max(cfg.world_size, 1), cfg.dist_url

    if cfg.device not in ("auto", "cpu") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device} asked for but CUDA is not available")
    if _wants_cuda(cfg):
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
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


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
