"""Where to take clips from a video, and in which order the DataLoader visits the videos.

Clip sampling is separate from decoding and from datasets (as in pytorchvideo): these functions
only return start frames. A clip of `frames_per_clip` frames taken every `frame_stride` frames
spans `span = frames_per_clip * frame_stride` source frames:

    video  |0 ........................................ num_frames|
    clip          |start ........ start + span|
                   ^ one frame every frame_stride

Videos shorter than the span start at 0 (the decoder loops them).
"""

import math

import numpy as np

import torch
from torch.utils.data import Sampler


def clip_span(frames_per_clip, frame_stride=1):
    """Number of source frames covered by one clip."""
    return frames_per_clip * frame_stride


def random_clip_start(num_frames, span, rng, step=1):
    """A uniformly random start frame among 0, step, 2 step, ... such that the clip fits (0 for videos shorter
    than `span`); `step` is the authors' `-sbc` (torchvision's `VideoClips(step_between_clips)`)."""
    return step * int(rng.integers(0, max(0, num_frames - span) // step + 1))


def uniform_clip_starts(num_frames, span, num_clips=10):
    """`num_clips` evenly spaced start frames from the first to the last possible one (testing).

    A single clip is centred; videos shorter than `span` give `num_clips` zeros.
    """
    last = max(0, num_frames - span)
    if num_clips == 1:
        return [last // 2]
    return [round(i * last / (num_clips - 1)) for i in range(num_clips)]


def distinct_clip_starts(num_frames, span, rng, count=2, step=1, gap=1):
    """`count` different random start frames among 0, step, 2 step, ..., sorted (one decoding pass reads them
    in order), uniform over the sets whose starts are at least `gap` frames apart (gap=span: clips that share
    no frame). A video too short for that gap gets merely different starts (clips may overlap); when it has
    fewer than `count` possible starts, starts repeat.
    """
    last = max(0, num_frames - span) // step
    units = -(-gap // step)  # the gap in steps, rounded up
    if (count - 1) * units > last:
        units = 1
    if last + 1 >= count:
        # count distinct sorted p in [0, last - (count - 1)(units - 1)], spread by units - 1 steps each:
        # one to one with the start sets of gap >= units steps, so uniform over them
        picks = sorted(int(p) for p in rng.choice(last + 1 - (count - 1) * (units - 1), size=count, replace=False))
        return [step * (p + i * (units - 1)) for i, p in enumerate(picks)]
    return sorted(step * int(s) for s in rng.integers(0, last + 1, size=count))


class EpochSampler(Sampler):
    """Distributed-aware, epoch-seeded sampler whose position can be checkpointed mid-epoch.

    Every rank draws the same permutation from `(seed, epoch)` and the ranks partition it. With
    `batch_size` (the per-rank batch) the permutation is cut into global batches of
    `world_size * batch_size` and rank r takes the r-th contiguous slice of each, so a global batch
    holds the same videos in the same order whatever the number of ranks (and of micro-batches
    within a rank); `batch_size=1` is the classic every-`world_size`-th index from `rank`. `drop_last` drops the tail that does
    not divide evenly; otherwise the head is repeated to pad it. `state_dict()` records the epoch
    and how many of this rank's samples were consumed, and iteration after `load_state_dict()`
    resumes from there.
    """

    def __init__(self, dataset_len, shuffle=True, seed=0, rank=0, world_size=1, drop_last=False, batch_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dataset_len < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.dataset_len, self.shuffle, self.seed = dataset_len, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.batch_size = batch_size
        if drop_last:
            self.num_samples = dataset_len // world_size
        else:
            self.num_samples = math.ceil(dataset_len / world_size)
        self.epoch = 0
        self.start = 0  # where the next iteration begins (set by load_state_dict)
        self.handed_out = 0  # indices yielded so far in this epoch

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch):
        """Select the epoch's permutation; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch, self.start, self.handed_out = epoch, 0, 0

    def indices(self):
        """This rank's full list of indices for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        if total > len(order):
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        order = order[:total]
        block = self.world_size * self.batch_size
        full = len(order) // block * block  # whole global batches; the tail is dealt out index by index
        mine = [order[i + self.rank * self.batch_size : i + (self.rank + 1) * self.batch_size]
                for i in range(0, full, block)]
        return [i for chunk in mine for i in chunk] + order[full:][self.rank :: self.world_size]

    def __iter__(self):
        start, self.start = self.start, 0
        self.handed_out = start
        for i in self.indices()[start:]:
            self.handed_out += 1
            yield i

    def state_dict(self, consumed=None):
        """`{"epoch", "position", "seed"}`; pass `consumed` = samples trained on this epoch by this rank.

        Without `consumed` the position is the number of indices handed out, which runs ahead of
        training by the DataLoader's prefetch (`workers * prefetch_factor` batches) when workers > 0.
        """
        position = self.handed_out if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": min(position, self.num_samples), "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.start = int(state["epoch"]), int(state["position"])
        self.handed_out = self.start
        self.seed = int(state.get("seed", self.seed))


# --------------------------------------------------------------------------- test-time clips, by rule
# Each rule: (num_frames, fps, frames_per_clip, frame_stride, num_clips) -> the source frame indices of every
# test clip of one video, a list of `frames_per_clip`-long lists. docs/eval.md cites the code each rule transcribes.


def _strided(starts, frames_per_clip, frame_stride):
    return [[s + i * frame_stride for i in range(frames_per_clip)] for s in starts]


def ours_test_clips(num_frames, fps, frames_per_clip, frame_stride, num_clips):
    """`uniform_clip_starts`: evenly spaced from the first to the last start, rounded."""
    span = clip_span(frames_per_clip, frame_stride)
    return _strided(uniform_clip_starts(num_frames, span, num_clips), frames_per_clip, frame_stride)


def torchvision_test_clips(num_frames, fps, frames_per_clip, frame_stride, num_clips):
    """torchvision's `UniformClipSampler` over `VideoClips` windows (step 1): starts floor(linspace(0, W - 1, n))
    over the W = N - span + 1 windows; a video shorter than the span has no window (the authors skip it; here
    it keeps n clips from 0, which the decoder loops)."""
    span = clip_span(frames_per_clip, frame_stride)
    windows = max(num_frames - span + 1, 1)
    starts = torch.linspace(0, windows - 1, steps=num_clips).floor().to(torch.int64).tolist()
    return _strided(starts, frames_per_clip, frame_stride)


def vcop_test_clips(num_frames, fps, frames_per_clip, frame_stride, num_clips):
    """VCOP's retrieval clips: centres linspace(T/2, N - T/2, n), start int(centre - T/2) (truncated)."""
    half = frames_per_clip * frame_stride / 2
    centres = np.linspace(half, num_frames - half, num_clips)
    return _strided([max(int(c - half), 0) for c in centres], frames_per_clip, frame_stride)


def slowfast_test_clips(num_frames, fps, frames_per_clip, frame_stride, num_clips, target_fps=30):
    """PySlowFast's test clips: a window of stride * T frames at `target_fps` (clip_size source frames), the
    i-th starting at delta * i / n (delta = N - clip_size), its T frames at linspace(start, start + clip_size - 1)
    clamped and truncated."""
    clip_size = max(1.0, frame_stride * frames_per_clip / target_fps * (fps or target_fps))
    delta = max(num_frames - clip_size, 0)
    out = []
    for i in range(num_clips):
        start = delta * i / num_clips
        index = torch.linspace(start, start + clip_size - 1, frames_per_clip)
        out.append(torch.clamp(index, 0, max(num_frames - 1, 0)).long().tolist())
    return out


def coclr_test_clips(num_frames, fps, frames_per_clip, frame_stride, num_clips):
    """CoCLR's test windows: every window of T * ds frames from 0 in steps of T * ds // 2 - 1 (their
    `frame_sampler`, mode test); a video no longer than the window gives one, left-padded with frame 0.
    `num_clips` is unused: the count follows the video's length."""
    span = clip_span(frames_per_clip, frame_stride)
    offsets = [i * frame_stride for i in range(frames_per_clip)]
    if num_frames - span <= 0:
        seen = [o for o in offsets if o < num_frames]
        return [[0] * (frames_per_clip - len(seen)) + seen]
    step = max(span // 2 - 1, 1)
    return [[s + o for o in offsets] for s in range(0, num_frames - span + 1, step)]


TEST_CLIPS = {"ours": ours_test_clips, "torchvision": torchvision_test_clips, "vcop": vcop_test_clips,
              "slowfast": slowfast_test_clips, "coclr": coclr_test_clips}


def view_clip_indices(rule, num_frames, fps, frames_per_clip, frame_stride=1, num_clips=10):
    """The frame indices `[[int] * frames_per_clip] * clips` of one video's test clips under `rule`."""
    if rule not in TEST_CLIPS:
        raise ValueError(f"unknown test-clip rule {rule!r}; choose from {', '.join(TEST_CLIPS)}")
    return TEST_CLIPS[rule](int(num_frames), float(fps or 0), frames_per_clip, frame_stride, num_clips)
