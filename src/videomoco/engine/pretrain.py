"""`videomoco pretrain`: wiring (config, processes, model, data, resume) around the epoch loop.

    run(cfg) -> launch (torchrun | mp.spawn | in-process) -> _worker(local_rank, cfg):
        init_distributed -> model + generator + optimisers -> resume -> data -> epochs -> checkpoints
"""

import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from videomoco.data.datasets import DataFailureError, set_epoch
from videomoco.engine import checkpoint as ck
from videomoco.engine import retention
from videomoco.engine import distributed as du
from videomoco.engine import memory
from videomoco.engine.config import ConfigError, PretrainConfig, check_paths, config_from_args, error_line, save_config
from videomoco.engine.config import add_arguments as _add_config_arguments
from videomoco.engine.logger import MetricLogger, environment, setup_logging
from videomoco.engine.loop import StopFlag, TrainingDiverged, train_one_epoch
from videomoco.engine.schedule import lr_for, schedule_state, set_lr
from videomoco.flags import fail
from videomoco.method.moco import own_key_fraction

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # deterministic cuBLAS (one workspace per stream, no split-K races)


def resolve_precision(precision, device):
    """`--precision auto`: "bf16" on a CUDA device with native bf16 (Ampere and later), else "fp32" (CPU, older
    GPUs). Other values are returned as they are. The logits, losses and G's scores are float32 either way."""
    if precision != "auto":
        return precision
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native_bf16 else "fp32"


def load_optimizer_state(optimizer, state):
    """`optimizer.load_state_dict(state)`, keeping this run's `fused` / `foreach` choice: a checkpoint written on
    the CPU (or before fused SGD) would otherwise switch a fused CUDA optimiser back, and GradScaler then passes
    it the scale that only the fused step accepts."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


# Ops of our models that have no deterministic CUDA kernel in some torch releases: module type -> (name, a
# tiny call of the op on a device that raises under `use_deterministic_algorithms(True)` where it has none).
CUDA_DETERMINISM_PROBES = {
    torch.nn.MaxPool3d: ("MaxPool3d backward (C3D)", lambda device: torch.nn.functional.max_pool3d(
        torch.zeros(1, 1, 2, 2, 2, device=device, requires_grad=True), 2).sum().backward()),
}


def nondeterministic_ops(model, device):
    """The ops of `model` that raise under `torch.use_deterministic_algorithms(True)` on `device` (CUDA only)."""
    if device.type != "cuda":
        return []
    missing = []
    for kind, (name, probe) in CUDA_DETERMINISM_PROBES.items():
        if any(isinstance(m, kind) for m in model.modules()):
            try:
                probe(device)
            except RuntimeError as e:
                if "deterministic" not in str(e):
                    raise
                missing.append(name)
    return missing


def _deterministic_environment(cfg):
    """--deterministic: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA creates its handle, so set it (unless set)
    before any process touches the device; spawned workers inherit it."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


class Run:
    """Everything one process trains with; `save()` writes a checkpoint from rank 0."""

    def __init__(self, cfg, info, batch):
        from videomoco.data.augment import GpuAugment
        from videomoco.method import AdversarialConfig, AdversarialTrainer, FrameDropGenerator, VideoMoCo
        from videomoco.models import set_grad_checkpointing

        self.cfg, self.info, self.per_process_batch = cfg, info, batch
        self.loader = self.sampler = None  # set by _build_data
        dev = info.device
        torch.manual_seed(cfg.seed)  # the same initial weights and queue on every rank
        self.model = VideoMoCo(cfg.arch, cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t, cfg.mlp,
                               cfg.temporal_decay, cfg.width, mlp_bn=cfg.mlp_bn, shuffle_bn=cfg.shuffle_bn).to(dev)
        self.generator = FrameDropGenerator(cfg.drop_ratio, cfg.fill).to(dev)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if cfg.grad_checkpointing:  # the query encoder's backward; the key encoder runs without grad
            set_grad_checkpointing(self.model.encoder_q)
        params_d = [p for p in self.model.parameters() if p.requires_grad]
        fused = True if dev.type == "cuda" else None  # one kernel per step, and GradScaler.step without host syncs
        self.opt_d = torch.optim.SGD(params_d, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                     fused=fused)
        self.opt_g = torch.optim.SGD(self.generator.parameters(), cfg.g_lr or cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay, fused=fused)
        precision = resolve_precision(cfg.precision, dev)  # already resolved (and logged) by _train
        fp16 = precision == "fp16"
        self.scaler_d = torch.amp.GradScaler(dev.type) if fp16 else None
        self.scaler_g = torch.amp.GradScaler(dev.type) if fp16 else None
        adv = AdversarialConfig(drop_ratio=cfg.drop_ratio, fill=cfg.fill, g_loss=cfg.g_loss,
                                g_loss_weight=cfg.g_loss_weight, real_query_loss=cfg.real_query_loss,
                                adv_start_epoch=cfg.adv_start_epoch, g_grad=cfg.g_grad)
        self.trainer = AdversarialTrainer(self.model, self.generator, self.opt_d, self.opt_g, adv,
                                          AMP_DTYPES[precision], self.scaler_d, self.scaler_g, bucket_mb=cfg.bucket_mb)
        self.augment = GpuAugment(color_jitter=(cfg.aug_jitter,) * 3 + (cfg.aug_hue,), grayscale_p=cfg.aug_grayscale,
                                  flip_p=cfg.aug_flip, aug_plus=cfg.aug_plus).to(dev)
        self.stop = StopFlag()
        self.epoch, self.step, self.batch_in_epoch = cfg.start_epoch, 0, 0
        self.last_checkpoint, self.saved_step = None, None
        self.start = None  # (epoch, step, mid_epoch) of the checkpoint resumed from; None: a fresh run
        self.ckp_dir_prepared = False  # the first save sets aside newer checkpoints (checkpoint.prepare_ckp_dir)
        self.ckp_dir = Path(cfg.ckp_dir)
        self.logger = MetricLogger(cfg.log_dir, enabled=du.is_main_process())

    # --- checkpoints ---
    def state(self, epoch, mid_epoch):
        cfg = self.cfg
        return {
            "format": "videomoco", "version": 1,
            "epoch": epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch if mid_epoch else 0,
            "arch": cfg.arch, "config": dataclasses.asdict(cfg),
            "state_dict": self.model.state_dict(), "generator": self.generator.state_dict(),
            "optimizer": self.opt_d.state_dict(), "optimizer_g": self.opt_g.state_dict(),
            "scaler": {"d": self.scaler_d.state_dict(), "g": self.scaler_g.state_dict()} if self.scaler_d else {},
            "scheduler": schedule_state(cfg, epoch),
            "sampler": self.sampler.state_dict(consumed=self.batch_in_epoch * self.per_process_batch if mid_epoch
                                               else 0) | {"epoch": epoch},
            "rng": ck.rng_state(),
        }

    def replicated(self):
        """(name, tensor) of what every rank holds alike: the parameters of D and G, the queue, its pointer and
        ages (not BatchNorm's running statistics, which each rank keeps for its own clips between checkpoints)."""
        return ([(n, p) for n, p in self.model.named_parameters()]
                + [(n, b) for n, b in self.model.named_buffers() if n.startswith("queue")]
                + [(f"generator.{n}", p) for n, p in self.generator.named_parameters()])

    def save(self, epoch, mid_epoch=False):
        """Checkpoint after `epoch` epochs (+ `batch_in_epoch` batches when `mid_epoch`); rank 0 writes.

        Raises `TrainingDiverged` instead of writing non-finite weights (every rank: they hold the same), and
        `RanksDisagree` instead of writing weights or a queue that the ranks hold differently."""
        progress = self.info.progress
        progress.set("saving a checkpoint", self.step)
        du.sync_buffers(self.model)  # BN statistics of rank 0 everywhere (what the file will hold)
        bad = ck.nonfinite_tensors({"state_dict": self.model.state_dict(), "generator": self.generator.state_dict()})
        if bad:
            raise TrainingDiverged(f"{len(bad)} tensors of the weights are NaN/Inf at step {self.step} "
                                   f"(epoch {epoch}), e.g. {bad[0]}: not saved; "
                                   f"last good checkpoint: {self.last_checkpoint or 'none'}")
        agreed = du.ranks_agree(self.replicated(), f"at step {self.step} (not saved)") if self.info.distributed else 0
        name = retention.checkpoint_name(epoch, self.step if mid_epoch else None)
        progress.set(f"writing {name}" if du.is_main_process() else "waiting for rank 0 to write", self.step)
        if du.is_main_process():
            if not self.ckp_dir_prepared:
                self.ckp_dir_prepared = True
                retention.prepare_ckp_dir(self.ckp_dir, self.start, self.cfg.start_epoch)
            self.last_checkpoint = ck.save_checkpoint(self.state(epoch, mid_epoch), self.ckp_dir / name)
            retention.rotate_checkpoints(self.ckp_dir, self.cfg.keep_last, self.cfg.keep_every, protect=self.last_checkpoint)
            log.info("saved %s%s", self.last_checkpoint, f" (ranks agree on {agreed} tensors)" if agreed else "")
        self.saved_step = self.step
        du.barrier()

    def resume(self, path):
        """Load our checkpoint (everything) or the authors' (model weights and epoch)."""
        cfg = self.cfg
        if path == "auto":
            path, ckpt = retention.latest_checkpoint(self.ckp_dir)
            if path is None:
                log.info("--resume auto: no checkpoint in %s, starting from scratch", self.ckp_dir)
                return
        else:
            ckpt = ck.load_checkpoint(path)
        sd = ck.model_state_dict(ckpt["state_dict"])
        ck.check_compatible(self.model.state_dict(), sd, ckpt.get("arch", "?"), cfg.arch)
        self.model.load_state_dict(sd)
        self.epoch = int(ckpt["epoch"])
        if ck.is_official(ckpt):
            log.info("loaded the authors' checkpoint %s (epoch %d): weights and queue only, fresh optimiser",
                     path, self.epoch)
            self.start = (self.epoch, 0, False)
            return
        self.generator.load_state_dict(ckpt["generator"])
        load_optimizer_state(self.opt_d, ckpt["optimizer"])
        load_optimizer_state(self.opt_g, ckpt["optimizer_g"])
        if self.scaler_d is not None and ckpt.get("scaler"):
            self.scaler_d.load_state_dict(ckpt["scaler"]["d"])
            self.scaler_g.load_state_dict(ckpt["scaler"]["g"])
        self.step, self.batch_in_epoch = int(ckpt["step"]), int(ckpt.get("batch_in_epoch", 0))
        self.sampler.load_state_dict({**ckpt["sampler"], "epoch": self.epoch,
                                      "position": self.batch_in_epoch * self.per_process_batch})
        ck.set_rng_state(ckpt["rng"])  # torch is also reseeded every step (loop.step_seed)
        self.last_checkpoint = Path(path)
        self.start = (self.epoch, self.step, self.batch_in_epoch > 0)
        log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)


def _resolve_seed(cfg, info):
    """A seed shared by all ranks: --seed, else the resumed run's, else drawn on rank 0."""
    if cfg.seed is None and cfg.resume:
        path = retention.latest_checkpoint(cfg.ckp_dir)[0] if cfg.resume == "auto" else cfg.resume
        if path is not None:
            try:
                cfg.seed = ck.load_checkpoint(path).get("config", {}).get("seed")
            except ck.CheckpointError:
                pass
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().randrange(2**31) if info.rank == 0 else 0
        if info.world_size > 1:
            t = torch.tensor([cfg.seed], device=info.device)
            torch.distributed.broadcast(t, 0)
            cfg.seed = int(t.item())
    random.seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)


def _build_data(run, cfg, info, workers):
    from videomoco.data.datasets import PretrainDataset, build_loader
    from videomoco.data.index import open_index, pretrain_subset

    try:
        index, which = pretrain_subset(open_index(cfg.data), cfg.subset)
        if du.is_main_process():
            log.info("pretraining on %s", which)
        dataset = PretrainDataset(index, frames_per_clip=cfg.frame_per_clip,
                                  frame_stride=cfg.frame_stride, crop_size=cfg.crop_size, views=cfg.views,
                                  scale=(cfg.aug_scale_min, 1.0), seed=cfg.seed)
        run.loader = build_loader(dataset, run.per_process_batch, workers, shuffle=True, drop_last=True,
                                  seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                  pin_memory=info.device.type == "cuda")
    except (OSError, ValueError) as e:  # no such directory, no usable videos, fewer videos than one batch
        raise ConfigError(f"DATA {cfg.data}: {e}") from None
    run.sampler = run.loader.sampler
    return dataset


def _fitting_options(cfg, estimate, usable, batch):
    """What to change when one clip does not fit (the estimate's smaller clips, then other memory savers)."""
    hints = memory.fitting_hints(estimate, usable, batch, cfg.frame_per_clip, cfg.crop_size)
    hints += ["--precision bf16"] if cfg.precision == "fp32" else []
    hints += ["--grad_checkpointing"] if not cfg.grad_checkpointing else []
    return ", ".join(hints + (["a larger --memory_budget"] if cfg.memory_budget else []))


def _plan_micro_batches(run, cfg, info, workers):
    """Set `run.trainer.micro_batches` from --micro_batch N, or plan it from a measured probe (auto).

    Returns what was decided and measured (written to `memory_plan.json` in --log_dir)."""
    b, world = run.per_process_batch, info.world_size
    smallest = memory.smallest_trainable(run.model)
    if cfg.micro_batch != "auto":
        n = math.ceil(b / min(cfg.micro_batch, b))
        if b // n < smallest:
            raise ConfigError(f"--micro_batch {cfg.micro_batch} splits the batch of {b} per process into micro-batches "
                              f"of {b // n} clip(s); the BatchNorm1d of --mlp_bn needs at least {smallest}")
        run.trainer.micro_batches = n
        log.info("batch %d (%d per process): %s (--micro_batch %d)", cfg.batch_size, b,
                 memory.split_text(n, b), cfg.micro_batch)
        return {"micro_batches": n, "per_process_batch": b}
    clip = (3, cfg.frame_per_clip, cfg.crop_size, cfg.crop_size)
    adversarial = cfg.epochs > max(cfg.adv_start_epoch, run.epoch)  # plan for the costlier step if it will run
    log.info("--micro_batch auto: measuring a %s step of %d and %d clips", "VideoMoCo" if adversarial else "MoCo",
             smallest, 2 * smallest)
    estimate = memory.probe_step(run.trainer, clip, adversarial, info.device, cfg.channels_last, world)
    limit = memory.parse_size(cfg.memory_budget) if cfg.memory_budget else None
    budget = memory.budget_bytes(info.device, limit)
    reserve = memory.worker_reserve(workers, 2 * b * math.prod(clip)) if info.device.type == "cpu" else 0
    try:
        plan = memory.plan_micro_batches(estimate, b, budget, reserve, what=f"batch {cfg.batch_size} ({b} per process)",
                                         smallest=smallest)
    except memory.MemoryPlanError as e:
        plan, error = None, f"{e}; to fit, try {_fitting_options(cfg, estimate, memory.usable_bytes(budget, reserve), b)}"
    n = plan.micro_batches if plan else b + 1
    if world > 1:  # every rank must split alike: the most micro-batches any rank needs
        t = torch.tensor([n], device=info.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        n = int(t.item())
    if n > b:
        raise ConfigError(error if plan is None else "another rank has too little memory for one clip")
    if n != plan.micro_batches:  # another rank needs more
        plan = dataclasses.replace(plan, micro_batches=n, micro_batch=math.ceil(b / n),
                                   peak=estimate.peak(math.ceil(b / n), b))
    run.trainer.micro_batches = n
    what = f"batch {cfg.batch_size} ({b} per process{f' x {world}' if world > 1 else ''})"
    log.info("%s", memory.plan_line(plan, estimate, what, b))
    return {"micro_batches": n, "per_process_batch": b, "budget_bytes": budget, "reserve_bytes": reserve,
            "margin": memory.MARGIN, **dataclasses.asdict(estimate), **{f"plan_{k}": v for k, v in
                                                                      dataclasses.asdict(plan).items()}}


def _worker(local_rank, cfg):
    _deterministic_environment(cfg)  # before init_distributed, which may start CUDA
    try:
        info = du.init_distributed(cfg, local_rank)
    except du.DistributedFailure as e:
        return _failed(str(e))
    setup_logging(info.rank)
    try:
        return _train(cfg, info)
    except du.DistributedFailure as e:  # the ranks disagree
        return _failed(str(e))
    except RuntimeError as e:  # a collective timed out or lost a peer: one line, no checkpoint from this state
        if not info.distributed or not du.is_collective_failure(e):
            raise
        return _failed(du.collective_error_line(e, info, cfg.dist_timeout))
    finally:
        du.cleanup()


def _failed(message):
    """A failing rank says why in one line on stderr (`videomoco pretrain: error: rank R: ...`) and exits 1."""
    return {"status": "distributed_failure", "error": message, "exit_code": fail("pretrain", message, code=1)}


def _train(cfg, info):
    _resolve_seed(cfg, info)
    env = environment()
    log.info("environment: %s", ", ".join(f"{k} {v}" for k, v in env.items()))
    log.info("process %d/%d on %s", info.rank, info.world_size, info.device)
    if cfg.precision == "auto":
        cfg.precision = resolve_precision(cfg.precision, info.device)
        if du.is_main_process():
            log.info("--precision auto: %s on %s", cfg.precision, info.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)  # an op without a deterministic kernel raises
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch, workers = du.per_process(cfg, info.world_size, du.procs_per_node(cfg))
    run = Run(cfg, info, batch)
    missing = nondeterministic_ops(run.model, info.device) if cfg.deterministic else []
    if missing:
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.warning("--deterministic: %s has no deterministic CUDA kernel in torch %s; it runs nondeterministically "
                    "(with a warning), every other op deterministically", ", ".join(missing), torch.__version__)
    dataset = _build_data(run, cfg, info, workers)
    if cfg.resume:
        run.resume(cfg.resume)
    if info.distributed:  # every rank starts from the same weights and queue (the same checkpoint, if any)
        n = du.ranks_agree(run.replicated(), "at the start (did every rank read the same --resume checkpoint?)")
        log.info("ranks agree on %d tensors at the start (step %d)", n, run.step)
    if cfg.resumeG:
        log.warning("--resumeG %s: the authors' MaskGenerator does not fit our FrameDropGenerator "
                    "(different architecture); continuing with a fresh generator", cfg.resumeG)
    memory_plan = _plan_micro_batches(run, cfg, info, workers)
    if cfg.compile:
        # the generator's update back-propagates with retain_graph=True, which donated buffers forbid
        torch._functorch.config.donated_buffer = False
        run.model.encoder_q.compile()
        run.model.encoder_k.compile()
    if du.is_main_process():
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.log_dir) / "config.yaml")
        (Path(cfg.log_dir) / "memory_plan.json").write_text(json.dumps(memory_plan, indent=1) + "\n")
        run.logger.text("config", "\n".join(f"    {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))
    stale = own_key_fraction(cfg.moco_k, len(dataset))
    if stale >= 0.1 and du.is_main_process():
        log.warning("--moco-k %d is %.1fx the %d videos: about %.0f%% of queries find their own video's key from "
                    "the previous epoch among the negatives; use a queue of at most 40%% of the videos",
                    cfg.moco_k, cfg.moco_k / max(len(dataset), 1), len(dataset), 100 * stale)
    log.info("%d videos, %d processes x batch %d, %d workers each, epochs %d..%d", len(dataset),
             info.world_size, batch, workers, run.epoch, cfg.epochs)
    run.stop.install()
    status = "done"
    try:
        for epoch in range(run.epoch, cfg.epochs):
            info.progress.set(f"starting epoch {epoch}", run.step + 1)
            if run.stop.is_set(info.device):  # signalled during the last step of the previous epoch
                if run.saved_step != run.step:
                    run.save(epoch)
                status = "stopped"
                break
            set_epoch(run.loader, epoch)
            set_lr(run.opt_d, lr_for(cfg, epoch))
            set_lr(run.opt_g, lr_for(cfg, epoch, cfg.g_lr))
            status = train_one_epoch(run, epoch)
            if status != "done":
                run.save(epoch, mid_epoch=True)
                break
            run.batch_in_epoch = 0
            run.epoch = epoch + 1
            if run.epoch % cfg.save_every == 0 or run.epoch == cfg.epochs:
                run.save(run.epoch)
            if cfg.max_steps and run.step >= cfg.max_steps:
                if run.saved_step != run.step:
                    run.save(run.epoch)
                status = "max_steps"
                break
    except TrainingDiverged as e:
        log.error("%s", e)
        return {"status": "diverged", "error": str(e), "step": run.step, "exit_code": 1}
    except DataFailureError as e:  # raised in a loader worker: one line, not the worker's traceback
        msg = f"{error_line(e)}; the failed videos are quarantined, so a rerun (--resume auto) skips them"
        log.error("%s", msg)
        return {"status": "data_failure", "error": msg, "step": run.step, "exit_code": 1}
    finally:
        run.stop.uninstall()
        run.logger.close()
    log.info("%s at epoch %d, step %d; last checkpoint %s", status, run.epoch, run.step, run.last_checkpoint)
    return {"status": status, "epoch": run.epoch, "step": run.step, "checkpoint": run.last_checkpoint,
            "log_dir": cfg.log_dir, "ckp_dir": cfg.ckp_dir, "exit_code": 0}


def run(cfg: PretrainConfig) -> dict:
    """Pretrain with `cfg` (the Python entry point). Returns rank 0's summary (status, epoch, step,
    checkpoint path, exit_code); only status and exit_code from a parent that spawned its workers."""
    check_paths(cfg)  # before any process starts: a bad path must not cost an epoch
    _deterministic_environment(cfg)  # spawned workers inherit it
    return du.launch(_worker, cfg)


def add_arguments(parser):
    _add_config_arguments(parser)


def main(args):
    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except (ConfigError, ck.CheckpointError, memory.MemoryPlanError) as e:
        return fail("pretrain", e)
    return result.get("exit_code", 0) if result else 0
