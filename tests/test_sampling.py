"""Clip start sampling and the epoch-seeded, distributed-aware, resumable sampler."""

import numpy as np
import pytest

from videomoco.data.sampling import (
    EpochSampler,
    clip_span,
    distinct_clip_starts,
    random_clip_start,
    uniform_clip_starts,
)


def test_clip_span():
    assert clip_span(16, 2) == 32 and clip_span(8) == 8


def test_random_clip_start_fits_and_covers_the_range():
    rng = np.random.default_rng(0)
    starts = {random_clip_start(100, 16, rng) for _ in range(2000)}
    assert min(starts) == 0 and max(starts) == 84
    assert random_clip_start(10, 16, rng) == 0  # shorter than the span


def test_clip_starts_with_a_step_are_its_multiples():
    """The authors' -sbc 5: torchvision's VideoClips offers starts 0, 5, ... up to the last that fits."""
    rng = np.random.default_rng(0)
    assert {random_clip_start(100, 16, rng, step=5) for _ in range(2000)} == set(range(0, 85, 5))
    pairs = [distinct_clip_starts(100, 16, rng, step=5) for _ in range(200)]
    assert all(a < b and a % 5 == b % 5 == 0 and b <= 84 for a, b in pairs)


def test_uniform_clip_starts():
    starts = uniform_clip_starts(250, 16, num_clips=10)
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] == 234
    assert starts == sorted(starts) and len(set(starts)) == 10
    assert uniform_clip_starts(10, 16, num_clips=4) == [0, 0, 0, 0]
    assert uniform_clip_starts(116, 16, num_clips=1) == [50]


def test_distinct_clip_starts():
    rng = np.random.default_rng(0)
    for _ in range(100):
        a, b = distinct_clip_starts(100, 16, rng)
        assert a < b <= 84
    assert distinct_clip_starts(16, 16, rng) == [0, 0]  # only one possible start


def collect(sampler):
    return list(iter(sampler))


@pytest.mark.parametrize("n,world,drop_last", [(10, 1, False), (10, 3, False), (10, 3, True), (7, 4, False)])
def test_ranks_partition_the_epoch(n, world, drop_last):
    shares = [collect(EpochSampler(n, seed=1, rank=r, world_size=world, drop_last=drop_last)) for r in range(world)]
    assert all(len(s) == len(EpochSampler(n, rank=0, world_size=world, drop_last=drop_last)) for s in shares)
    seen = [i for s in shares for i in s]
    if drop_last:
        assert len(set(seen)) == len(seen) == n // world * world
    else:
        assert set(seen) == set(range(n))


def test_same_seed_and_epoch_give_the_same_order():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    assert collect(a) == collect(b)
    first = collect(a)
    a.set_epoch(1)
    assert collect(a) != first and sorted(collect(a)) == list(range(50))
    assert collect(EpochSampler(50, seed=4)) != first
    assert collect(EpochSampler(50, shuffle=False)) == list(range(50))


def test_resume_mid_epoch_continues_exactly():
    full = EpochSampler(40, seed=7)
    full.set_epoch(2)
    order = collect(full)

    run = EpochSampler(40, seed=7)
    run.set_epoch(2)
    it = iter(run)
    consumed = [next(it) for _ in range(13)]
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 13, "seed": 7}

    resumed = EpochSampler(40, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop re-selects the same epoch: position is kept
    assert consumed + collect(resumed) == order
    resumed.set_epoch(3)  # a new epoch starts from the beginning
    assert len(collect(resumed)) == 40


def test_state_dict_with_consumed_count_overrides_prefetch():
    s = EpochSampler(20)
    list(iter(s))
    assert s.state_dict()["position"] == 20
    assert s.state_dict(consumed=8)["position"] == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0)


@pytest.mark.parametrize("world, batch", [(2, 4), (4, 2), (8, 1)])
def test_global_batches_do_not_depend_on_how_they_are_split(world, batch):
    # a global batch of 8 holds the same videos in the same order on 1 rank or on `world` ranks: rank r
    # gets the r-th contiguous slice of it, so a micro-batch of one process is a rank of a bigger run
    whole = collect(EpochSampler(37, seed=5, batch_size=8, drop_last=True))
    shares = [collect(EpochSampler(37, seed=5, rank=r, world_size=world, batch_size=batch, drop_last=True))
              for r in range(world)]
    for i in range(len(whole) // 8):
        step = [x for share in shares for x in share[i * batch : (i + 1) * batch]]
        assert step == whole[i * 8 : (i + 1) * 8]


def test_batch_size_one_is_every_world_size_th_index():
    order = collect(EpochSampler(12, seed=2))
    assert collect(EpochSampler(12, seed=2, rank=1, world_size=3)) == order[1::3]
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(12, batch_size=0)


def test_distinct_clip_starts_with_a_gap_are_uniform_over_the_disjoint_pairs():
    rng = np.random.default_rng(0)
    pairs = [tuple(distinct_clip_starts(24, 8, rng, gap=8)) for _ in range(4000)]
    assert all(b - a >= 8 and b <= 16 for a, b in pairs)  # two 8-frame clips of 24 frames that share no frame
    counts = np.unique(pairs, axis=0, return_counts=True)[1]
    assert len(counts) == 45 and counts.min() > 0.5 * counts.mean()  # every one of the 45 disjoint pairs, evenly
    steps = [distinct_clip_starts(100, 16, rng, step=5, gap=16) for _ in range(200)]
    assert all(b - a >= 20 and a % 5 == b % 5 == 0 for a, b in steps)  # the gap rounded up to whole steps
    assert distinct_clip_starts(12, 8, rng, gap=8) != [0, 0]  # too short for the gap: merely different starts


def test_distinct_clip_starts_without_a_gap_draw_as_before():
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert distinct_clip_starts(50, 8, a) == sorted(int(s) for s in b.choice(43, size=2, replace=False))
