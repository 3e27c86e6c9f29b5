"""Datasets over a VideoIndex, fault-tolerant decoding, and the DataLoader that feeds them.

    index --(sampler: which video)--> dataset[i] --(sampling: which frames)--> decode.read_clip(s)
          --(augment: crop box, resize)--> uint8 (3, T, S, S) --> DataLoader --> GpuAugment on device

Random state: item i of epoch e draws from `np.random.default_rng([seed, e, i])`, so a clip and
its crops depend on (seed, epoch, index) only, never on the worker count or order.

Threads: `threads=None` decodes with one thread per DataLoader worker (the workers fill the
cores) and with FFmpeg's threads when `workers=0`; give `threads=2` to a loader with half as
many workers as cores.

Faults: a video that raises while decoding (VideoError, OSError) is logged, appended to
the index's quarantine.csv (one `write` per line, safe from several worker processes), flagged
in a failure table in shared memory (one byte per video, so no lock is needed and the main
process can read `num_failed`), and the item is replaced by the same item of the next video.
Once more than `max_failures` of the videos have failed (and more than one: a single bad file never
stops a small run), `DataFailureError` stops the run.

Hand-over: with workers, a batch's clips travel through a ring of shared-memory slots allocated once
(`_BatchRing`), not a new shared-memory tensor per batch, whose fresh pages cost more than the collate.
"""

import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from videomoco.data import decode
from videomoco.data.augment import crop_and_resize, random_resized_crop_box, resize_frames, resized_size, view_boxes
from videomoco.data.sampling import EpochSampler, clip_span, distinct_clip_starts, random_clip_start, view_clip_indices

log = logging.getLogger(__name__)

# Errors a broken or unreadable file can raise; programming errors (TypeError, KeyError, ...) propagate.
# decode.py wraps FFmpeg errors in VideoError; a ValueError or TypeError here is a bug, not a bad video
DECODE_ERRORS = (decode.VideoError, OSError, EOFError)


class DataFailureError(RuntimeError):
    """Too many videos failed to decode during training."""


class VideoClipDataset(Dataset):
    """Shared machinery: per-video arrays, per-item RNG, shared epoch and failure table.

    Per-video fields are kept in numpy arrays rather than a list of Python objects, so that
    reading them in forked workers does not touch reference counts and copy the pages (flat RSS).
    """

    items_per_video = 1
    clip_fields = ()  # positions of the uint8 (3, T, S, S) clips in an item (handed over by a _BatchRing)

    def __init__(self, index, frames_per_clip=16, frame_stride=1, crop_size=112, short_side=None,
                 seed=0, max_failures=0.01, threads=None):
        if len(index) == 0:
            raise ValueError(f"the index of {index.root} has no usable videos")
        self.root = index.root
        self.paths = np.array([r.path.encode() for r in index.records])  # fixed-width bytes
        self.frames = np.array([r.frames for r in index.records], dtype=np.int64)
        self.labels = np.array([r.label for r in index.records], dtype=np.int64)
        self.index = replace(index, records=[])  # for add_quarantine only
        self.frames_per_clip, self.frame_stride = frames_per_clip, frame_stride
        self.crop_size, self.short_side = crop_size, short_side
        self.seed, self.max_failures = seed, max_failures
        self.threads = threads  # decoder threads; None: 1 per DataLoader worker (see decode.decoder_threads)
        self.span = clip_span(frames_per_clip, frame_stride)
        # Shared memory: set_epoch in the main process reaches persistent workers, and workers'
        # failure flags reach the main process. Each byte is written by whoever fails that video.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._failed = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()

    def __len__(self):
        return len(self.paths) * self.items_per_video

    @property
    def num_videos(self):
        return len(self.paths)

    def path(self, video):
        return os.path.join(self.root, self.paths[video].decode())

    def set_epoch(self, epoch):
        """Select the random draws of `epoch` (also in already running workers)."""
        self._epoch[0] = epoch

    @property
    def epoch(self):
        return int(self._epoch[0])

    @property
    def num_failed(self):
        """Videos that failed to decode so far in this run (all workers)."""
        return int(self._failed.sum())

    def failed_videos(self):
        return [self.paths[v].decode() for v in torch.nonzero(self._failed).flatten().tolist()]

    def rng(self, i):
        return np.random.default_rng([self.seed, self.epoch, i])

    def load(self, i, rng):
        """Decode and crop item `i` (implemented by the datasets)."""
        raise NotImplementedError

    def __getitem__(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        i %= n
        for attempt in range(self.num_videos):
            j = self.next_video_item(i, attempt)
            video = self.video_of(j)
            if self._failed[video]:
                continue
            try:
                return self.load(j, self.rng(j))
            except DECODE_ERRORS as err:
                self._record_failure(video, err)
        raise DataFailureError(f"all {self.num_videos} videos failed to decode: see {self._quarantine_file()}")

    def video_of(self, i):
        """The video of item `i`."""
        return i // self.items_per_video

    def next_video_item(self, i, attempt):
        """The item that stands in for item `i` when `attempt` videos from its own failed: the same item of the
        `attempt`-th next video."""
        return (i + attempt * self.items_per_video) % len(self)

    def _quarantine_file(self):
        return os.path.join(self.index.dir, "quarantine.csv") if self.index.dir else "the index's quarantine list"

    def _record_failure(self, video, err):
        path = self.path(video)
        detail = err.reason if isinstance(err, decode.VideoError) else f"{type(err).__name__}: {err}"
        reason = "training-time decode error: " + " ".join(str(detail).split())
        log.warning("skipping %s (%s)", path, reason)
        self._failed[video] = 1
        try:
            self.index.add_quarantine(path, reason)
        except OSError as qerr:
            log.warning("could not append to %s: %s", self._quarantine_file(), qerr)
        failed, total = self.num_failed, self.num_videos
        if failed > max(self.max_failures * total, 1):
            raise DataFailureError(
                f"{failed} of {total} videos failed to decode ({100 * failed / total:.1f}%), above the limit "
                f"{100 * self.max_failures:g}%: see {self._quarantine_file()}"
            )

    def read(self, video, starts):
        """Clips starting at `starts` of one video, decoded in one pass -> list of uint8 `(T, H, W, 3)`."""
        return decode.read_clips(self.path(video), starts, self.frames_per_clip, self.frame_stride, self.short_side,
                                 threads=self.threads)


VIEWS = ("same", "distinct", "disjoint")  # PretrainDataset: where the two views of a video come from


class PretrainDataset(VideoClipDataset):
    """Two views of one video for contrastive pretraining: item i -> `(q, k)` uint8 `(3, T, S, S)`.

    views="same" (the authors'): one clip, two independent random resized crops (one box per
    clip, shared by its frames). views="distinct": two different clips of the video, decoded in
    one pass, each with its own crop; views="disjoint": the same with two clips that share no frame
    (when the video is at least two clips long; else as "distinct"). `clips_per_video` N: N items per video per epoch, each with its
    own draws (torchvision's `RandomClipSampler(video_clips, N)`; the authors' train.py uses 1), item i
    of video i // N. `start_step`: clip starts are multiples of it (the authors' `-sbc`).
    """

    clip_fields = (0, 1)

    def __init__(self, index, frames_per_clip=16, frame_stride=1, crop_size=112, scale=(0.2, 1.0),
                 short_side=None, views="same", seed=0, max_failures=0.01, threads=None, clips_per_video=1,
                 start_step=1):
        if views not in VIEWS:
            raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}")
        if clips_per_video < 1 or start_step < 1:
            raise ValueError(f"need clips_per_video >= 1 and start_step >= 1, got {clips_per_video}, {start_step}")
        super().__init__(index, frames_per_clip, frame_stride, crop_size, short_side, seed, max_failures, threads)
        self.scale, self.views = scale, views
        self.items_per_video, self.start_step = clips_per_video, start_step

    def load(self, i, rng):
        video = i // self.items_per_video
        num_frames = int(self.frames[video])
        if self.views == "same":
            clip = self.read(video, [random_clip_start(num_frames, self.span, rng, self.start_step)])[0]
            clips = [clip, clip]
        else:
            gap = self.span if self.views == "disjoint" else 1
            clips = self.read(video, distinct_clip_starts(num_frames, self.span, rng, step=self.start_step, gap=gap))
            if rng.random() < 0.5:  # starts are sorted: do not make the query always the earlier clip
                clips = clips[::-1]
        h, w = clips[0].shape[1:3]
        q, k = (crop_and_resize(c, random_resized_crop_box(h, w, self.scale, rng=rng), self.crop_size) for c in clips)
        return q, k


@dataclass(frozen=True)
class TestView:
    """Where a test clip's frames come from and how it is cropped (an evaluation protocol's test-time views).

    clips: the rule of `sampling.TEST_CLIPS` for the frame indices; resize: the frame size before cropping
    (`augment.resized_size`: 0 none, an int the short side, a pair the size); side: the square crop's side in
    the resized frame (0: the short side); rounding: of the centre crop's offset (`augment.view_boxes`).
    The crop is then resized to the dataset's `crop_size`.
    """

    clips: str = "ours"
    resize: int | tuple = 0
    side: int = 0
    rounding: str = "floor"


class LabeledDataset(VideoClipDataset):
    """Labeled clips for fine-tuning and evaluation -> `(clip uint8 (3, T, S, S), label, video_id)`.

    mode="train": `clips_per_video` random clips per video per epoch, each with a random resized crop of
    `scale` and `ratio`.
    mode="test": one item per (video, clip, crop): the clips of `view.clips` (`num_clips` of them but for
    rules that follow the video's length) times `num_crops` (1: centre; 3: start/centre/end along the long
    side) squares, cropped as `view` says and resized to `crop_size`. Items of a video are consecutive, so
    average predictions by `video_id`.
    """

    clip_fields = (0,)

    def __init__(self, index, frames_per_clip=16, frame_stride=1, crop_size=112, mode="train", num_clips=10,
                 num_crops=1, short_side=None, scale=(0.5, 1.0), seed=0, max_failures=0.01, threads=None,
                 clips_per_video=1, ratio=(3 / 4, 4 / 3), view=TestView()):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if num_crops not in (1, 3) or num_clips < 1 or clips_per_video < 1:
            raise ValueError(f"need num_clips >= 1, clips_per_video >= 1 and num_crops in (1, 3), got {num_clips}, "
                             f"{clips_per_video}, {num_crops}")
        unlabeled = sum(r.label < 0 for r in index.records)
        if unlabeled:
            raise ValueError(f"{unlabeled} of {len(index)} videos have no label (layout {index.layout!r})")
        super().__init__(index, frames_per_clip, frame_stride, crop_size, short_side, seed, max_failures, threads)
        self.mode, self.num_clips, self.num_crops, self.scale, self.ratio = mode, num_clips, num_crops, scale, ratio
        self.view = view
        self.fps = np.array([r.fps for r in index.records], dtype=np.float64)
        self.items_per_video = num_clips * num_crops if mode == "test" else clips_per_video
        if mode == "test":  # clips per video may follow its length (CoCLR's windows): items by offset
            counts = [len(self.clip_indices(v)) * num_crops for v in range(len(self.paths))]
            self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache = (None, None)  # ((video, clip), frames): the crops of one clip decode it once

    def __len__(self):
        return int(self._first[-1]) if self.mode == "test" else super().__len__()

    def video_of(self, i):
        if self.mode != "test":
            return super().video_of(i)
        return int(np.searchsorted(self._first, i, side="right")) - 1

    def next_video_item(self, i, attempt):
        if self.mode != "test":
            return super().next_video_item(i, attempt)
        video = self.video_of(i)
        other = (video + attempt) % self.num_videos
        local = min(i - self._first[video], self._first[other + 1] - self._first[other] - 1)
        return int(self._first[other] + local)

    def clip_indices(self, video):
        """The source frame indices of every test clip of `video` (its `view.clips` rule)."""
        return view_clip_indices(self.view.clips, int(self.frames[video]), float(self.fps[video]),
                                 self.frames_per_clip, self.frame_stride, self.num_clips)

    def load(self, i, rng):
        video = self.video_of(i)
        if self.mode == "train":
            frames = self.read(video, [random_clip_start(int(self.frames[video]), self.span, rng)])[0]
            box = random_resized_crop_box(*frames.shape[1:3], self.scale, self.ratio, rng=rng)
        else:
            clip, crop = divmod(int(i - self._first[video]), self.num_crops)
            key, frames = self._cache
            if key != (video, clip):
                frames = decode.read_frame_lists(self.path(video), [self.clip_indices(video)[clip]], self.short_side,
                                                 self.threads)[0]
                frames = resize_frames(frames, resized_size(*frames.shape[1:3], self.view.resize))
                self._cache = ((video, clip), frames)
            box = view_boxes(*frames.shape[1:3], self.view.side, self.num_crops, self.view.rounding)[crop]
        return crop_and_resize(frames, box, self.crop_size), int(self.labels[video]), video


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


RING_SLOTS = 3  # shared-memory batch slots per loader worker (`_BatchRing`): what the memory planner reserves


class _InRing:
    """A batch whose clips wait in ring slot `slot`; `rest` holds the other fields, collated as usual."""

    def __init__(self, slot, rest):
        self.slot, self.rest = slot, rest


class _BatchRing:
    """Shared-memory batch slots, `slots` per worker, allocated once before the workers start.

    A worker stacks a batch's clips into its next free slot instead of a fresh shared-memory tensor
    (whose pages cost a fault each on first touch: ~300 per 16x112x112 item, a fifth of the loader's
    cost over `dataset[i]`) and sends only the slot number; the main process copies the clips out
    (into pinned memory when pinning) and frees the slot. A worker that finds no free slot within
    `wait` seconds, or a batch of another shape, collates as usual, so nothing can block on the ring.
    """

    def __init__(self, dataset, batch_size, workers, slots=RING_SLOTS, wait=0.05):
        shape = (batch_size, 3, dataset.frames_per_clip, dataset.crop_size, dataset.crop_size)
        self.fields, self.slots, self.wait = dataset.clip_fields, slots, wait
        self.buffers = [torch.empty((workers * slots,) + shape, dtype=torch.uint8).share_memory_() for _ in self.fields]
        self.free = torch.ones(workers * slots, dtype=torch.uint8).share_memory_()
        self.turn = 0  # the next slot this worker tries (each worker process has its own copy)

    def collate(self, batch):
        """In a worker: clips into a free slot -> `_InRing`; anything else -> `default_collate`."""
        info, shape = get_worker_info(), self.buffers[0].shape[1:]
        clips = [[item[j] for item in batch] for j in self.fields]
        if info is None or not all(isinstance(c, torch.Tensor) and c.shape == shape[1:] and c.dtype == torch.uint8
                                   for field in clips for c in field) or len(batch) != shape[0]:
            return default_collate(batch)
        slot = self._take_slot(info.id)
        if slot is None:
            return default_collate(batch)
        for buffer, field in zip(self.buffers, clips):
            torch.stack(field, out=buffer[slot])
        rest = [default_collate([item[j] for item in batch]) for j in range(len(batch[0])) if j not in self.fields]
        return _InRing(slot, rest)

    def _take_slot(self, worker):
        deadline = time.monotonic() + self.wait
        while True:
            for _ in range(self.slots):
                slot, self.turn = worker * self.slots + self.turn, (self.turn + 1) % self.slots
                if self.free[slot]:
                    self.free[slot] = 0
                    return slot
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0002)

    def hand_over(self, batch, pin_memory):
        """In the main process: `_InRing` -> the batch as `default_collate` gives it (a list), slot freed."""
        clips = [buffer[batch.slot].clone() if not pin_memory else
                 torch.empty_like(buffer[batch.slot], pin_memory=True).copy_(buffer[batch.slot]) for buffer in self.buffers]
        self.free[batch.slot] = 1
        rest = [r.pin_memory() if pin_memory and isinstance(r, torch.Tensor) else r for r in batch.rest]
        clips, rest = iter(clips), iter(rest)
        return [next(clips) if j in self.fields else next(rest) for j in range(len(self.fields) + len(batch.rest))]


class _RingLoader(DataLoader):
    """A DataLoader whose workers hand clips over through a `_BatchRing`; batches are as without it."""

    def __init__(self, *args, ring, **kwargs):
        super().__init__(*args, collate_fn=ring.collate, **kwargs)
        self.ring = ring

    def __iter__(self):
        self.ring.free.fill_(1)  # batches left in the ring by an interrupted epoch are dropped by the reset
        for batch in super().__iter__():
            yield self.ring.hand_over(batch, self.pin_memory) if isinstance(batch, _InRing) else batch


_CLAMPED = set()  # (asked, cpus) already reported: a command that builds several loaders says it once


def clamp_workers(workers):
    """`workers` capped at the usable CPUs, said once per process (torch's DataLoader would warn at every loader)."""
    cpus = usable_cpus()
    if workers > cpus:
        if (workers, cpus) not in _CLAMPED:
            _CLAMPED.add((workers, cpus))
            log.info("clamping -j %d to %d workers (%d CPUs)", workers, cpus, cpus)
        return cpus
    return workers


def build_loader(dataset, batch_size, workers, shuffle=True, drop_last=True, seed=0, rank=0, world_size=1,
                 pin_memory=None):
    """A DataLoader over `dataset` with an `EpochSampler` (`loader.sampler`), persistent workers.

    `workers` is clamped to the usable CPUs; `pin_memory` defaults to CUDA being available.
    With workers, the clips of the datasets here travel through a `_BatchRing`.
    Call `set_epoch(loader, epoch)` before each epoch.
    """
    workers = clamp_workers(workers)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last, batch_size=batch_size)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(f"{len(sampler)} items per rank are fewer than one batch of {batch_size} (drop_last)")
    kwargs = dict(batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                  pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                  persistent_workers=workers > 0)
    if workers > 0 and getattr(dataset, "clip_fields", ()):
        try:
            return _RingLoader(dataset, ring=_BatchRing(dataset, batch_size, workers), **kwargs)
        except RuntimeError as e:  # shared memory too small for the slots (e.g. a container's 64 MB /dev/shm)
            log.warning("loader: no shared-memory batch ring (%s); workers hand batches over one by one",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return DataLoader(dataset, **kwargs)


def set_epoch(loader, epoch):
    """Select `epoch` in the loader's sampler (order) and dataset (random draws)."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def failure_summary(dataset):
    """One line for the end-of-epoch log, e.g. `2 of 9,537 videos failed to decode (0.02%)`."""
    failed, total = dataset.num_failed, dataset.num_videos
    return f"{failed:,} of {total:,} videos failed to decode ({100 * failed / total:.2f}%)"

