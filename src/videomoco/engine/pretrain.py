"""`videomoco pretrain`: wiring (config, processes, model, data, resume) around the epoch loop.

    run(cfg) -> launch (torchrun | mp.spawn | in-process) -> _worker(local_rank, cfg):
        init_distributed -> build_trainer -> data -> resume -> _train_epochs: loop.train_one_epoch per epoch

`build_trainer` is also what `benchmarks.train_step` times; `_train_epochs` decides every save and stop.
"""

import dataclasses
import json
import logging
import math
import os
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from videomoco.data.augment import AUGMENTATIONS, input_norm
from videomoco.data.datasets import DataFailureError, clamp_workers, set_epoch
from videomoco.engine import checkpoint as ck
from videomoco.engine import retention
from videomoco.engine import distributed as du
from videomoco.engine import memory
from videomoco.engine import monitor
from videomoco.engine.config import ConfigError, PretrainConfig, check_paths, config_from_args, error_line, save_config
from videomoco.engine.config import add_arguments as _add_config_arguments
from videomoco.engine.logger import MetricLogger, environment, setup_logging
from videomoco.engine.loop import StopFlag, TrainingDiverged, train_one_epoch
from videomoco.engine.schedule import lr_for, schedule_state, set_lr
from videomoco.flags import fail
from videomoco.method.adversarial import compile_encoders
from videomoco.method.moco import micro_batch_sizes, own_key_fraction

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


def build_models(cfg):
    """VideoMoCo and its frame-dropping generator as `cfg` describes them, on the default device (CPU, or the
    meta device under `with torch.device("meta")`: shapes without memory)."""
    from videomoco.method import VideoMoCo, build_generator

    model = VideoMoCo(arch=cfg.arch, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
                      temporal_decay=cfg.temporal_decay, width=cfg.width, mlp_bn=cfg.mlp_bn,
                      shuffle_bn=cfg.shuffle_bn, decay_unit=cfg.decay_unit, decay_on=cfg.decay_on,
                      shuffle_groups=cfg.shuffle_groups or None)
    return model, build_generator(cfg.generator, drop_ratio=cfg.drop_ratio, fill=cfg.fill)


def check_resume(cfg):
    """An explicit `--resume FILE`, before any process starts or writes: readable, its fields and weights sound
    (`checkpoint.load_checkpoint`), the keys and shapes of `cfg`'s model (built on the meta device), and epochs
    left to train. One-line `CheckpointError` / `ConfigError`."""
    if cfg.resume in ("", "auto"):
        return
    path = cfg.resume
    ckpt = ck.load_checkpoint(path, resume=True)
    with torch.device("meta"):
        model, generator = build_models(cfg)
    ck.check_compatible(model.state_dict(), ck.model_state_dict(ckpt["state_dict"]), ckpt.get("arch", "?"), cfg.arch)
    if not ck.is_official(ckpt) and generator_resumes(ckpt, path, cfg.generator):
        ck.restore(path, "generator", partial(generator.load_state_dict, assign=True), ckpt["generator"])
    if ckpt["epoch"] >= cfg.epochs:
        raise ConfigError(f"--resume {path} has done {ckpt['epoch']} epochs and --epochs is {cfg.epochs}: nothing "
                          "left to train (raise --epochs to train on)")


def build_trainer(cfg, device):
    """VideoMoCo, its frame-dropping generator, their SGD optimisers (fused on CUDA) and fp16 GradScalers, seeded
    by `cfg.seed`, in one `AdversarialTrainer` (`.model`, `.generator`, `.opt_d`, `.opt_g`, `.scaler_d`,
    `.scaler_g`): what `videomoco pretrain` and `benchmarks.train_step` train."""
    from videomoco.method import AdversarialConfig, AdversarialTrainer
    from videomoco.models import set_grad_checkpointing

    torch.manual_seed(cfg.seed)  # the same initial weights and queue on every rank
    model, generator = build_models(cfg)
    model, generator = model.to(device), generator.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if cfg.grad_checkpointing:  # the query encoder's backward; the key encoder runs without grad
        set_grad_checkpointing(model.encoder_q)
    params_d = [p for p in model.parameters() if p.requires_grad]
    fused = True if device.type == "cuda" else None  # one kernel per step, and GradScaler.step without host syncs
    opt_d = torch.optim.SGD(params_d, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    opt_g = torch.optim.SGD(generator.parameters(), cfg.g_lr or cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, fused=fused)
    precision = resolve_precision(cfg.precision, device)
    fp16 = precision == "fp16"
    scaler_d = torch.amp.GradScaler(device.type) if fp16 else None
    scaler_g = torch.amp.GradScaler(device.type) if fp16 else None
    adv = AdversarialConfig(drop_ratio=cfg.drop_ratio, fill=cfg.fill, g_loss=cfg.g_loss,
                            g_loss_weight=cfg.g_loss_weight, real_query_loss=cfg.real_query_loss,
                            adv_start_epoch=cfg.adv_start_epoch, g_grad=cfg.g_grad)
    return AdversarialTrainer(model, generator, opt_d, opt_g, adv, amp_dtype=AMP_DTYPES[precision], scaler_d=scaler_d,
                              scaler_g=scaler_g, bucket_mb=cfg.bucket_mb)


def build_augmentation(cfg, device):
    """The `GpuAugment` of `cfg.aug` (and `--aug_draw`, the `--aug_*` strengths of "ours") on `device`."""
    from videomoco.data.augment import build_augment

    return build_augment(cfg.aug, cfg.aug_draw, jitter=cfg.aug_jitter, hue=cfg.aug_hue, grayscale_p=cfg.aug_grayscale,
                         flip_p=cfg.aug_flip, aug_plus=cfg.aug_plus, invert_p=cfg.aug_invert).to(device)


class Run:
    """What one process trains with and where it is (epoch, step, batch in the epoch); `save()` writes a
    checkpoint from rank 0."""

    def __init__(self, cfg, info, batch):
        self.cfg, self.info, self.per_process_batch = cfg, info, batch
        self.loader = self.sampler = None  # set by _build_data
        self.trainer = build_trainer(cfg, info.device)
        self.model, self.generator = self.trainer.model, self.trainer.generator
        self.augment = build_augmentation(cfg, info.device)
        self.stop = StopFlag()
        self.epoch, self.step, self.batch_in_epoch = cfg.start_epoch, 0, 0
        self.last_checkpoint, self.saved_step = None, None
        self.start = None  # (epoch, step, mid_epoch) of the checkpoint resumed from; None: a fresh run
        self.ckp_dir_prepared = False  # the first save sets aside newer checkpoints (checkpoint.prepare_ckp_dir)
        self.ckp_dir = Path(cfg.ckp_dir)
        self.logger = MetricLogger(cfg.log_dir, enabled=du.is_main_process())
        self.monitor = None  # engine.monitor.Monitor with --monitor (rank 0)

    # --- checkpoints ---
    def state(self, epoch, mid_epoch):
        t, batch = self.trainer, self.batch_in_epoch if mid_epoch else 0
        sampler = self.sampler.state_dict(consumed=batch * self.per_process_batch) | {"epoch": epoch}
        return ck.pretrain_state(dataclasses.asdict(self.cfg), epoch=epoch, step=self.step, batch_in_epoch=batch,
                                 model=self.model, generator=self.generator, optimizer=t.opt_d, optimizer_g=t.opt_g,
                                 scheduler=schedule_state(self.cfg, epoch), sampler=sampler, scaler_d=t.scaler_d,
                                 scaler_g=t.scaler_g)

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
                                   f"(epoch {epoch}), e.g. {bad[0]}: not saved", self.step)
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
            ckpt = ck.load_checkpoint(path, resume=True)  # checked before the launch too (check_resume)
        sd = ck.model_state_dict(ckpt["state_dict"])
        ck.check_compatible(self.model.state_dict(), sd, ckpt.get("arch", "?"), cfg.arch)
        self.model.load_state_dict(sd)
        self.epoch = ckpt["epoch"]
        if self.epoch >= cfg.epochs and du.is_main_process():
            log.info("%s has done %d epochs of --epochs %d: nothing left to train", path, self.epoch, cfg.epochs)
        trained = ck.checkpoint_decay(ckpt)
        if trained != {"unit": cfg.decay_unit, "on": cfg.decay_on} and du.is_main_process():
            log.warning("%s was trained with --decay_unit %s --decay_on %s; this run goes on with --decay_unit %s "
                        "--decay_on %s", path, trained["unit"], trained["on"], cfg.decay_unit, cfg.decay_on)
        recorded, used = ck.checkpoint_input_norm(ckpt), input_norm(AUGMENTATIONS[cfg.aug])
        if recorded["name"] != used["name"] and du.is_main_process():
            keeps = next(aug for aug, norm in AUGMENTATIONS.items() if norm == recorded["name"])
            log.warning("%s was trained on inputs normalised with %s statistics; this run (--aug %s) normalises with "
                        "%s (--aug %s keeps them)", path, recorded["name"], cfg.aug, used["name"], keeps)
        if ck.is_official(ckpt):
            log.info("loaded the authors' checkpoint %s (epoch %d): weights and queue only, fresh optimiser",
                     path, self.epoch)
            self.start = (self.epoch, 0, False)
            return
        t = self.trainer
        ck.restore(path, "optimizer", partial(load_optimizer_state, t.opt_d), ckpt["optimizer"])
        if self._resume_generator(ckpt, path):
            ck.restore(path, "generator", self.generator.load_state_dict, ckpt["generator"])
            ck.restore(path, "optimizer_g", partial(load_optimizer_state, t.opt_g), ckpt["optimizer_g"])
        if t.scaler_d is not None and ckpt.get("scaler"):
            ck.restore(path, "scaler", lambda s: (t.scaler_d.load_state_dict(s["d"]), t.scaler_g.load_state_dict(s["g"])),
                       ckpt["scaler"])
        self.step, self.batch_in_epoch = ckpt["step"], ckpt.get("batch_in_epoch", 0)
        ck.restore(path, "sampler", self.sampler.load_state_dict, {**ckpt["sampler"], "epoch": self.epoch,
                                                                  "position": self.batch_in_epoch * self.per_process_batch})
        ck.restore(path, "rng", ck.set_rng_state, ckpt["rng"])  # torch is also reseeded every step (loop.step_seed)
        self.last_checkpoint = Path(path)
        self.start = (self.epoch, self.step, self.batch_in_epoch > 0)
        log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)

    def _resume_generator(self, ckpt, path):
        """`generator_resumes`, saying when a fresh generator replaces the checkpoint's."""
        if generator_resumes(ckpt, path, self.cfg.generator):
            return True
        log.info("--resume %s: its %s generator has not trained yet; a fresh %s generator", path,
                 ck.checkpoint_generator_kind(ckpt), self.cfg.generator)
        return False


def generator_resumes(ckpt, path, wanted):
    """Whether to load `ckpt`'s generator: yes if it is of `--generator`'s kind (`wanted`); if not, a fresh one of
    that kind when the checkpoint's has never stepped (runs that share their first epochs), else CheckpointError."""
    kind = ck.checkpoint_generator_kind(ckpt)
    if kind == wanted:
        return True
    if ck.generator_trained(ckpt):
        raise ck.CheckpointError(f"--resume {path}: its generator is a trained {kind!r} one, not --generator {wanted}")
    return False


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
                                  scale=(cfg.aug_scale_min, 1.0), seed=cfg.seed, clips_per_video=cfg.clips_per_video,
                                  start_step=cfg.step_between_clips)
        _check_one_batch(cfg, dataset.num_videos, info.world_size)
        run.loader = build_loader(dataset, run.per_process_batch, workers, shuffle=True, drop_last=True,
                                  seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                  pin_memory=info.device.type == "cuda")
    except (OSError, ValueError) as e:  # no such directory, no usable videos, fewer videos than one batch
        raise ConfigError(f"DATA {cfg.data}: {e}") from None
    run.sampler = run.loader.sampler
    return dataset


def _check_one_batch(cfg, videos, world_size):
    """`ConfigError` naming the fix when an epoch of `videos` x --clips_per_video items has no full batch."""
    items = videos * cfg.clips_per_video
    if items // world_size * world_size >= cfg.batch_size:
        return
    fits = items // world_size * world_size
    lower = f"lower -b to at most {fits}, or " if fits else ""
    raise ValueError(f"{videos} videos x {cfg.clips_per_video} clips per video give {items} clips per epoch, fewer "
                     f"than one batch of {cfg.batch_size}: {lower}draw several clips per video per epoch with "
                     f"--clips_per_video {-(-cfg.batch_size // videos)} (README: \"Your own videos\")")


def _warn_own_key_negatives(cfg, videos):
    """One warning when 10% or more of the queries find a key of their own video among the queue's negatives,
    with the queue (and batch, which the queue must hold) that avoids it: 40% of the videos, 8% of queries."""
    stale = own_key_fraction(cfg.moco_k, videos, cfg.clips_per_video)
    if stale < 0.1:
        return
    limit = max(1, int(0.4 * videos))
    if limit >= cfg.batch_size:
        fix = f"use --moco-k {limit} or less (40% of the videos)"
    else:  # the queue holds at least one batch
        fix = f"the queue holds at least a batch, so lower both, e.g. -b {limit} --moco-k {limit} (40% of the videos)"
    if cfg.clips_per_video > 1:
        fix += f"; with --clips_per_video {cfg.clips_per_video} the video's other clips of the epoch are queued too"
    log.warning("--moco-k %d with %d videos: about %.0f%% of queries find a key of their own video among the "
                "negatives; %s", cfg.moco_k, videos, 100 * stale, fix)


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


def _monitor(run, cfg, epoch, epoch_seconds):
    """--monitor: rank 0 measures kNN top-1 after `epoch` epochs and logs it with its cost (in epochs of
    `epoch_seconds`); the other ranks wait for it."""
    if run.monitor is None:
        return
    if du.is_main_process():
        result = run.monitor(run.model.encoder_q)
        values = {"knn_top1": result["knn_top1"], "seconds": result["seconds"], "epoch": epoch}
        cost = ""
        if epoch_seconds:
            values["cost_epochs"] = result["seconds"] / epoch_seconds
            cost = f", {values['cost_epochs']:.2f} of an epoch"
        run.logger.scalars(run.step, values, prefix="monitor")
        log.info("monitor after epoch %d: kNN top-1 %.1f%% (%d labelled videos, k<=%d; %.1f s%s)", epoch,
                 result["knn_top1"], len(run.monitor), monitor.MONITOR_K, result["seconds"], cost)
    du.barrier()


def fresh_optimizers(trainer):
    """Forget both players' optimiser state (SGD's momentum buffers), as the authors' second phase starts: their
    train.py resumes checkpoint_0100 without loading it (line 238). The fp16 loss scales are kept."""
    for optimizer in (trainer.opt_d, trainer.opt_g):
        optimizer.state.clear()
    if du.is_main_process():
        log.info("--adv_optimizer fresh: the optimisers of D and G start afresh at epoch %d", trainer.cfg.adv_start_epoch)


def _train_epochs(run, cfg, info):
    """Train from `run.epoch` to --epochs: the one place that decides when to save and when to stop.

    Checkpoints every --save_every epochs and after the last, every --save_every_steps steps, and where a
    signal (SIGTERM / SIGINT) or --max_steps stops the run. Returns "done", "stopped" or "max_steps".
    """

    def after_step(step, batch, end_of_epoch):  # train_one_epoch's call after every step of epoch `run.epoch`
        run.step, run.batch_in_epoch = step, batch
        if end_of_epoch:  # decided after the epoch, below
            return None
        if cfg.max_steps and step >= cfg.max_steps:
            return "max_steps"
        # multi-process runs agree on stopping with a collective, so only at print_freq boundaries
        if (du.get_world_size() == 1 or step % cfg.print_freq == 0) and run.stop.is_set(info.device):
            return "stopped"
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            run.save(run.epoch, mid_epoch=True)
        return None

    first = run.epoch
    if first == 0:
        _monitor(run, cfg, 0, None)  # the random-init baseline of the curve
    if du.is_main_process():
        if run.epoch >= cfg.adv_start_epoch:
            log.info("the generator trains from this run's first step (--adv_start_epoch %d)", cfg.adv_start_epoch)
        elif cfg.adv_start_epoch < cfg.epochs:
            log.info("epochs %d-%d: plain MoCo with temporal decay, no generator (loss_g and drop_fraction are 0); "
                     "the generator joins at epoch %d (--adv_start_epoch %d)", run.epoch + 1, cfg.adv_start_epoch,
                     cfg.adv_start_epoch + 1, cfg.adv_start_epoch)
        else:
            log.info("no generator in this run: --adv_start_epoch %d is not below --epochs %d (plain MoCo with "
                     "temporal decay; loss_g and drop_fraction stay 0)", cfg.adv_start_epoch, cfg.epochs)
    for epoch in range(run.epoch, cfg.epochs):
        info.progress.set(f"starting epoch {epoch}", run.step + 1)
        if epoch == cfg.adv_start_epoch and epoch > first and du.is_main_process():
            log.info("epoch %d: the generator joins (--adv_start_epoch %d)", epoch + 1, cfg.adv_start_epoch)
        if run.stop.is_set(info.device):  # signalled during the last step of the previous epoch
            if run.saved_step != run.step:
                run.save(epoch)
            return "stopped"
        set_epoch(run.loader, epoch)
        if cfg.adv_optimizer == "fresh" and 0 < cfg.adv_start_epoch == epoch and run.batch_in_epoch == 0:
            fresh_optimizers(run.trainer)
        set_lr(run.trainer.opt_d, lr_for(cfg, epoch))
        set_lr(run.trainer.opt_g, lr_for(cfg, epoch, cfg.g_lr))
        started = time.perf_counter()
        status, _ = train_one_epoch(run.trainer, run.loader, run.augment, cfg, info, epoch, run.step,
                                    batch=run.per_process_batch, logger=run.logger, after_step=after_step)
        if status != "done":
            run.save(epoch, mid_epoch=True)
            return status
        run.epoch, run.batch_in_epoch = epoch + 1, 0
        if run.epoch % cfg.monitor_every == 0 or run.epoch == cfg.epochs:
            _monitor(run, cfg, run.epoch, time.perf_counter() - started)
        if run.epoch % cfg.save_every == 0 or run.epoch == cfg.epochs:
            run.save(run.epoch)
        if cfg.max_steps and run.step >= cfg.max_steps:
            if run.saved_step != run.step:
                run.save(run.epoch)
            return "max_steps"
    return "done"


DECAY_UNIT_TEXT = {"step": "enqueue steps since the key was written (the authors' code)",
                   "key": "the key's position in the queue from the newest (the paper's t^i)"}
DECAY_ON_TEXT = {"logit": "multiplies the negative's logit (the authors' code)",
                 "exp": "multiplies exp(logit / T) (the paper's equation)"}


def _sizes(sizes):
    return " + ".join(map(str, sizes)) if len(sizes) <= 4 else f"{len(sizes)} x {min(sizes)}-{max(sizes)}"


def recipe_lines(cfg, run, world_size):
    """What this run computes where the authors' code and ours can differ (docs/method.md): the augmentation, the
    normalisation, the decay's form, the BatchNorm batches and the optimisers at --adv_start_epoch."""
    norm = input_norm(AUGMENTATIONS[cfg.aug])
    t, K, B = cfg.temporal_decay, cfg.moco_k, cfg.batch_size
    oldest = math.ceil(K / B) - 1 if cfg.decay_unit == "step" else K - 1
    b, n = run.per_process_batch, run.trainer.micro_batches
    query = micro_batch_sizes(b, min(n, b))
    key = run.model.key_bn_sizes(b, n, world_size > 1)
    return [
        f"augmentation: --aug {cfg.aug}: {run.augment.describe()}",
        f"normalisation: {norm['name']}, mean {tuple(norm['mean'])}, std {tuple(norm['std'])}",
        f"temporal decay: t**a with t = {t:g}, a = {DECAY_UNIT_TEXT[cfg.decay_unit]}; t**a "
        f"{DECAY_ON_TEXT[cfg.decay_on]}; the oldest of {K} keys: t**{oldest} = {t ** oldest:.4g} at batch {B}",
        f"BatchNorm batches per process ({world_size} x {b} clips, {n} micro-batch{'es' if n > 1 else ''}): "
        f"query encoder {_sizes(query)}, key encoder {_sizes(key)}",
        f"optimisers at --adv_start_epoch {cfg.adv_start_epoch}: {cfg.adv_optimizer}",
    ]


def _write_run_files(run, cfg, memory_plan):
    """config.yaml, memory_plan.json and the config as TensorBoard text in --log_dir (`WriteError` if they
    cannot be written)."""
    log_dir = Path(cfg.log_dir)
    path = log_dir / "config.yaml"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
        path = log_dir / memory.PLAN_FILE
        path.write_text(json.dumps(memory_plan, indent=1) + "\n")
    except OSError as e:
        raise ck.write_error(path, e) from None
    run.logger.text("config", "\n".join(f"    {k}: {v}" for k, v in dataclasses.asdict(cfg).items()))


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
    if cfg.monitor and du.is_main_process():
        try:
            run.monitor = monitor.Monitor(cfg.monitor, cfg.frame_per_clip, cfg.frame_stride, cfg.crop_size,
                                          run.augment.mean, run.augment.std, info.device,
                                          amp_dtype=run.trainer.amp_dtype, workers=clamp_workers(workers))
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if cfg.resume:
        run.resume(cfg.resume)
    if info.distributed:  # every rank starts from the same weights and queue (the same checkpoint, if any)
        n = du.ranks_agree(run.replicated(), "at the start (did every rank read the same --resume checkpoint?)")
        log.info("ranks agree on %d tensors at the start (step %d)", n, run.step)
    if cfg.resumeG:
        log.warning("--resumeG %s: the authors' MaskGenerator does not fit our FrameDropGenerator "
                    "(different architecture); continuing with a fresh generator", cfg.resumeG)
    memory_plan = memory.plan_training_step(run.trainer, cfg, info.device, run.per_process_batch, info.world_size,
                                            workers, run.epoch)
    if du.is_main_process():
        log.info("what this run computes:\n    %s", "\n    ".join(recipe_lines(cfg, run, info.world_size)))
    if cfg.compile:
        compile_encoders(run.model)
    if du.is_main_process():
        _warn_own_key_negatives(cfg, dataset.num_videos)
    log.info("%d videos x %d clips per video, %d processes x batch %d, %d workers each, epochs %d..%d",
             dataset.num_videos, cfg.clips_per_video, info.world_size, batch, workers, run.epoch, cfg.epochs)
    run.stop.install()
    try:
        if du.is_main_process():
            _write_run_files(run, cfg, memory_plan)
        status = _train_epochs(run, cfg, info)
    except TrainingDiverged as e:
        msg = f"{e}; last good checkpoint: {run.last_checkpoint or 'none'}"
        log.error("%s", msg)
        return {"status": "diverged", "error": msg, "step": e.step, "exit_code": 1}
    except ck.WriteError as e:  # a full or read-only --ckp_dir / --log_dir: the files written so far are intact
        msg = f"{e}; last good checkpoint: {run.last_checkpoint or 'none'}"
        return {"status": "write_failure", "error": msg, "step": run.step, "exit_code": fail("pretrain", msg, code=1)}
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
    du.check_world(cfg)
    check_resume(cfg)
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
    except ck.WriteError as e:  # the logs' last flush
        return fail("pretrain", e, code=1)
    return result.get("exit_code", 0) if result else 0
