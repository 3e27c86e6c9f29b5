"""The epoch loop: one pass over the loader with adversarial steps and logging; the caller's `after_step`
decides when to save and stop (engine.pretrain).

Metrics stay on the device as 0-d tensors and are summed; the host syncs (and NaN checks) happen
only every `--print_freq` steps and at the end of an epoch.
"""

import logging
import math
import signal
import time

import torch
from tqdm import tqdm

from videomoco.engine import distributed as du
from videomoco.engine.logger import drop_strip

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or Inf at `step` (one-line message naming the step)."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.step = step


class StopFlag:
    """Set by SIGTERM / SIGINT (preemption); the loop checks it at step boundaries."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signal is None:
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                        signal.Signals(signum).name)
        self.signal = signum

    def is_set(self, device, sync=True):
        """True when any rank was signalled; `sync=False` only looks at this rank (no collective)."""
        flag = self.signal is not None
        if sync and du.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def step_seed(seed, rank, step):
    """The seed of step `step` on `rank`. Reseeding torch every step (augmentation, shuffle-BN) makes
    the run replay exactly from any stop point, whatever consumed random numbers in between."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63)


def shuffle_generator(seed, step):
    """The generator of step `step`'s shuffle-BN permutation: the same on every rank, so none is broadcast."""
    return torch.Generator().manual_seed(step_seed(seed, -1, step))


def _prepare(clips, augment, device, channels_last):
    """uint8 (B, 3, T, H, W) from the loader -> augmented float on the device."""
    clips = augment(clips.to(device, non_blocking=True))
    if channels_last:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    return clips


def prepare_views(im_q, im_k, augment, cfg, info, step, micro_batches):
    """Augment both views of step `step` micro-batch by micro-batch, each with the random draws of the rank
    it stands for.

    Micro-batch j of rank r is rank `r * micro_batches + j` of a run on `micro_batches` times more
    processes: seeded alike, it draws the same crops' colour, flips and blur as that rank would.
    """
    pairs = []
    for j, (q, k) in enumerate(zip(im_q.tensor_split(micro_batches), im_k.tensor_split(micro_batches))):
        torch.manual_seed(step_seed(cfg.seed, info.rank * micro_batches + j, step))
        pairs.append(tuple(_prepare(x, augment, info.device, cfg.channels_last) for x in (q, k)))
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([q for q, _ in pairs]), torch.cat([k for _, k in pairs])


def _flush(sums, count, times, *, epoch, step, lr, world_size, logger):
    """Sync the summed metrics (the only host sync), check them, log them. Returns the means."""
    names = sorted(sums)
    values = du.all_reduce_mean(torch.stack([sums[n] for n in names]) / count).tolist()
    metrics = dict(zip(names, values))
    bad = [n for n in ("loss_d", "loss_g") if n in metrics and not math.isfinite(metrics[n])]
    if bad:
        raise TrainingDiverged(f"{bad[0]} is {metrics[bad[0]]} at step {step} (epoch {epoch})", step)
    data_time, step_time, clips, step_end = times
    step_time += time.perf_counter() - step_end  # the sync above waited for the work these steps queued
    metrics.update(lr=lr, data_time=data_time / count, step_time=step_time / count,
                   clips_per_s=clips * world_size / max(step_time, 1e-9))
    logger.scalars(step, metrics)
    return metrics


def duration(seconds):
    """`seconds` as a short human string: 45s, 12m05s, 3h07m, 2d04h."""
    seconds = max(int(round(seconds)), 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


def run_eta(seconds_per_step, steps_left_in_epoch, epochs_after, steps_per_epoch):
    """Seconds left in the run at this rate: the rest of this epoch plus `epochs_after` whole epochs."""
    return seconds_per_step * (steps_left_in_epoch + epochs_after * steps_per_epoch)


def generator_state(epoch, cfg):
    """The progress bar's word for the generator in `epoch`: "on", or "off until E" (--adv_start_epoch)."""
    return "on" if epoch >= cfg.adv_start_epoch else f"off until {cfg.adv_start_epoch + 1}"


def train_one_epoch(trainer, loader, augment, cfg, info, epoch, step, *, batch, logger, after_step):
    """Train `epoch` from the loader's position with `trainer`; `step`: the steps done before it.

    After every step the loop calls `after_step(step, batch_in_epoch, end_of_epoch)`, where the caller decides
    when to save and stop: a status it returns ("stopped", "max_steps") ends the epoch there. `batch`: clips
    per process. Returns (status, metrics): "done" or that status; the means last logged (None if none).
    """
    model, generator = trainer.model, trainer.generator
    adversarial = epoch >= cfg.adv_start_epoch
    model.train()
    generator.train()
    lr = trainer.opt_d.param_groups[0]["lr"]  # logged; set once per epoch (engine.schedule)
    num_batches = len(loader.sampler) // batch
    start = loader.sampler.start // batch
    bar = tqdm(total=num_batches, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=2.0,
               dynamic_ncols=True, disable=not du.is_main_process(), leave=False)
    epoch_start, steps_in_epoch = time.perf_counter(), 0
    sums, count, times, metrics = {}, 0, [0.0, 0.0, 0, 0.0], None  # data s, step s, clips, end of the last step
    end = time.perf_counter()
    status = "done"
    progress = info.progress  # what a rank whose collective fails reports about the others
    progress.set("waiting for data", step + 1)
    for i, (im_q, im_k) in enumerate(loader, start=start):
        progress.set("computing", step + 1)
        data_time = time.perf_counter() - end
        im_q, im_k = prepare_views(im_q, im_k, augment, cfg, info, step, trainer.micro_batches)  # (B, 3, T, H, W)
        if i == start and cfg.image_every > 0 and epoch % cfg.image_every == 0 and adversarial:
            with torch.no_grad():  # the generator is deterministic: no RNG or state is touched
                _, keep = generator(im_q[:1])
            logger.image("generator/dropped_frames", step,
                         drop_strip(im_q[0].float(), keep[0], mean=augment.mean.flatten().tolist(),
                                    std=augment.std.flatten().tolist()))
        out = trainer.step(im_q, im_k, adversarial, shuffle_generator(cfg.seed, step))
        step += 1
        for name, value in out.items():
            sums[name] = sums.get(name, 0) + value.float()
        count += 1
        times[0] += data_time
        times[3] = time.perf_counter()
        times[1] += times[3] - end
        times[2] += im_q.shape[0]
        bar.update(1)
        steps_in_epoch += 1
        last = i + 1 == num_batches
        if step % cfg.print_freq == 0 or last:
            metrics = _flush(sums, count, times, epoch=epoch, step=step, lr=lr, world_size=info.world_size,
                             logger=logger)
            left = run_eta((time.perf_counter() - epoch_start) / steps_in_epoch, num_batches - i - 1,
                           cfg.epochs - epoch - 1, num_batches)
            bar.set_postfix(loss_d=f"{metrics['loss_d']:.3f}", acc1=f"{metrics['acc1']:.1f}",
                            G=generator_state(epoch, cfg), run_left=duration(left))
            sums, count, times = {}, 0, [0.0, 0.0, 0, 0.0]
        status = after_step(step, i + 1, last) or "done"
        if last or status != "done":
            break
        progress.set("waiting for data", step + 1)
        end = time.perf_counter()
    bar.close()
    if count:
        metrics = _flush(sums, count, times, epoch=epoch, step=step, lr=lr, world_size=info.world_size, logger=logger)
    if metrics is not None:
        seconds = time.perf_counter() - epoch_start
        left = run_eta(seconds / max(steps_in_epoch, 1), 0, cfg.epochs - epoch - 1, num_batches)
        log.info("epoch %d/%d step %d (G %s): %s; %s this epoch, about %s left for the run", epoch + 1, cfg.epochs,
                 step, generator_state(epoch, cfg),
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss_d", "loss_g", "acc1", "lr")),
                 duration(seconds), duration(left))
    return status, metrics
