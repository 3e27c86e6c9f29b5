"""Datasets on real (tiny) videos: views, labels, test-time clips, reproducibility, faults, the loader."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from videomoco.data import decode
from videomoco.data.datasets import (
    DataFailureError,
    LabeledDataset,
    PretrainDataset,
    build_loader,
    set_epoch,
)
from videomoco.data.encode import write_video
from videomoco.data.index import build_index
from videomoco.data.sampling import EpochSampler, uniform_clip_starts

T, CROP = 4, 16


@pytest.fixture
def index(tmp_path):
    """Six 24-frame 64x48 (landscape) videos in two classes (Kinetics layout), indexed."""
    for c, cls in enumerate(["jump", "run"]):
        for k in range(3):
            frames = np.random.default_rng(10 * c + k).integers(0, 256, (24, 48, 64, 3), dtype=np.uint8)
            path = tmp_path / "data" / "train" / cls / f"{cls}{k}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_video(path, frames)
    return build_index(tmp_path / "data", tmp_path / "index", workers=1, progress=False)


def count_reads(monkeypatch):
    """Record every `decode.read_clips(path, starts, ...)` and `decode.read_frame_lists(path, clips, ...)` call as
    (path, starts)."""
    calls, real, real_lists = [], decode.read_clips, decode.read_frame_lists

    def spy(path, starts, *args, **kwargs):
        calls.append((path, list(starts)))
        return real(path, starts, *args, **kwargs)

    def spy_lists(path, clips, *args, **kwargs):
        if not callable(clips):  # a callable comes from read_clips, already recorded
            calls.append((path, [c[0] for c in clips]))
        return real_lists(path, clips, *args, **kwargs)

    monkeypatch.setattr(decode, "read_clips", spy)
    monkeypatch.setattr(decode, "read_frame_lists", spy_lists)
    return calls


def break_video(index, i):
    with open(index.path(i), "wb") as f:
        f.write(b"not a video" * 50)


@pytest.mark.parametrize("views", ["same", "distinct", "disjoint"])
def test_pretrain_item_is_two_uint8_views_from_one_decode(index, views, monkeypatch):
    calls = count_reads(monkeypatch)
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, views=views)
    q, k = ds[2]
    assert q.shape == k.shape == (3, T, CROP, CROP) and q.dtype == k.dtype == torch.uint8
    assert not torch.equal(q, k)
    (path, starts), = calls  # one open / decoding pass for both views
    assert path == index.path(2)
    assert len(starts) == (1 if views == "same" else 2)
    if views != "same":
        assert starts[0] != starts[1]
    if views == "disjoint":
        assert abs(starts[1] - starts[0]) >= T


def test_clips_per_video_gives_several_items_of_each_video(index, monkeypatch):
    calls = count_reads(monkeypatch)
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, clips_per_video=3, start_step=4)
    assert len(ds) == 3 * ds.num_videos
    items = [ds[i] for i in range(3, 6)]  # the three clips of video 1, each with its own draws
    assert [path for path, _ in calls] == [index.path(1)] * 3
    assert all(start % 4 == 0 for _, starts in calls for start in starts)
    assert not torch.equal(items[0][0], items[1][0])


def test_clamp_workers_says_it_once(monkeypatch, caplog):
    from videomoco.data import datasets

    monkeypatch.setattr(datasets, "usable_cpus", lambda: 2)
    monkeypatch.setattr(datasets, "_CLAMPED", set())
    caplog.set_level("INFO")
    assert [datasets.clamp_workers(w) for w in (1, 7, 7)] == [1, 2, 2]
    assert caplog.text.count("clamping -j 7 to 2 workers") == 1


def test_items_are_indexable_like_a_sequence(index):
    ds = LabeledDataset(index, frames_per_clip=T, crop_size=CROP, mode="test", num_clips=2)
    assert ds[-1][2] == len(index) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(list(iter(ds))) == len(ds)  # iteration stops at the end


def test_pretrain_draws_depend_on_seed_epoch_index_only(index):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, seed=1)
    a = ds[3]
    assert all(torch.equal(x, y) for x, y in zip(a, ds[3]))
    assert all(torch.equal(x, y) for x, y in zip(a, PretrainDataset(index, frames_per_clip=T, crop_size=CROP, seed=1)[3]))
    ds.set_epoch(1)
    assert not torch.equal(a[0], ds[3][0])
    with pytest.raises(ValueError, match="views"):
        PretrainDataset(index, views="both")


def test_batches_do_not_depend_on_the_worker_count(index):
    def batches(workers):
        ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, seed=5)
        loader = build_loader(ds, batch_size=2, workers=workers, seed=5)
        out = []
        for epoch in (0, 1):  # epoch 1 checks that set_epoch reaches persistent workers
            set_epoch(loader, epoch)
            out += [q for q, _ in loader]
        return torch.stack(out)

    assert torch.equal(batches(0), batches(2))


def test_labeled_train_returns_label_and_video_id(index):
    ds = LabeledDataset(index, frames_per_clip=T, crop_size=CROP, mode="train")
    assert len(ds) == len(index)
    for i in range(len(ds)):
        clip, label, video = ds[i]
        assert clip.shape == (3, T, CROP, CROP) and clip.dtype == torch.uint8
        assert video == i and index.classes[label] == index.records[i].class_name


@pytest.mark.parametrize("num_crops", [1, 3])
def test_labeled_test_items_cover_every_clip_and_crop(index, num_crops, monkeypatch):
    calls = count_reads(monkeypatch)
    ds = LabeledDataset(index, frames_per_clip=T, crop_size=CROP, mode="test", num_clips=3, num_crops=num_crops)
    assert len(ds) == len(index) * 3 * num_crops
    items = [ds[i] for i in range(len(ds))]
    assert [video for _, _, video in items] == [v for v in range(len(index)) for _ in range(3 * num_crops)]
    assert all(label == index.records[video].label for _, label, video in items)
    # each clip is decoded once however many crops are taken from it, at uniformly spaced starts
    assert len(calls) == len(index) * 3
    assert [starts[0] for _, starts in calls[:3]] == uniform_clip_starts(index.records[0].frames, T, 3)
    if num_crops == 3:
        left, centre, right = items[:3]
        assert not torch.equal(left[0], centre[0]) and not torch.equal(centre[0], right[0])
    # deterministic: no randomness in test mode
    assert torch.equal(items[1][0], LabeledDataset(index, frames_per_clip=T, crop_size=CROP, mode="test",
                                                   num_clips=3, num_crops=num_crops)[1][0])


def test_labeled_rejects_bad_arguments(index):
    with pytest.raises(ValueError, match="mode"):
        LabeledDataset(index, mode="val")
    with pytest.raises(ValueError, match="num_crops"):
        LabeledDataset(index, mode="test", num_crops=2)
    index.records[0].label = -1
    with pytest.raises(ValueError, match="1 of 6 videos have no label"):
        LabeledDataset(index)


def test_broken_video_is_replaced_quarantined_and_counted(index, caplog):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, max_failures=0.5)
    break_video(index, 1)
    with caplog.at_level(logging.WARNING, logger="videomoco.data.datasets"):
        q, k = ds[1]
    assert q.shape == (3, T, CROP, CROP)
    replacement = PretrainDataset(index, frames_per_clip=T, crop_size=CROP)
    assert torch.equal(q, replacement[2][0])  # the next video's item, same draws
    assert ds.num_failed == 1 and ds.failed_videos() == [index.records[1].path]
    assert "skipping" in caplog.text and index.records[1].path in caplog.text
    quarantine = Path(index.dir, "quarantine.csv").read_text()
    assert index.records[1].path in quarantine and "training-time decode error: cannot open" in quarantine
    ds[1]  # a known failure is skipped without decoding it again or logging twice
    assert quarantine == Path(index.dir, "quarantine.csv").read_text()


def test_too_many_failures_stop_with_a_clear_error(index):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, max_failures=0.2)
    break_video(index, 0)
    ds[0]  # 1 of 6 = 17% is within 20%
    break_video(index, 3)
    with pytest.raises(DataFailureError, match=r"2 of 6 videos failed to decode \(33.3%\), above the limit 20%: see .*quarantine.csv"):
        ds[3]


def test_failures_in_workers_reach_the_main_process(index):
    ds = LabeledDataset(index, frames_per_clip=T, crop_size=CROP, max_failures=0.5)
    break_video(index, 4)
    loader = build_loader(ds, batch_size=3, workers=2, shuffle=False)
    videos = torch.cat([video for _, _, video in loader])
    assert 4 not in videos.tolist() and len(videos) == 6
    assert ds.num_failed == 1


def test_build_loader_wires_sampler_and_clamps_workers(index, caplog):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP)
    with caplog.at_level(logging.INFO, logger="videomoco.data.datasets"):
        loader = build_loader(ds, batch_size=2, workers=512, rank=1, world_size=2)
    assert "clamping -j 512 to" in caplog.text
    assert 0 < loader.num_workers < 512 and loader.persistent_workers
    assert isinstance(loader.sampler, EpochSampler) and len(loader.sampler) == 3 and len(loader) == 1
    assert loader.pin_memory == torch.cuda.is_available()
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(ds, batch_size=8, workers=0)


def test_threads_reach_the_decoder_and_leave_items_unchanged(index, monkeypatch):
    threads, real = [], decode.read_clips

    def spy(*args, **kwargs):
        threads.append(kwargs.get("threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "read_clips", spy)
    one = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, threads=1)[2]
    two = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, threads=2)[2]
    default = LabeledDataset(index, frames_per_clip=T, crop_size=CROP)[2]
    assert threads == [1, 2, None]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert default[0].shape == (3, T, CROP, CROP)


def test_one_bad_video_never_stops_a_small_run(index):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, max_failures=0.01)
    break_video(index, 2)
    q, _ = ds[2]  # 1 of 6 is above 1%, but a single failure is always tolerated
    assert q.shape == (3, T, CROP, CROP) and ds.num_failed == 1
    break_video(index, 4)
    with pytest.raises(DataFailureError, match="2 of 6 videos failed"):
        ds[4]


def test_a_bug_is_not_mistaken_for_a_bad_video(index, monkeypatch):
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP)
    monkeypatch.setattr(ds, "read", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad argument")))
    with pytest.raises(ValueError, match="bad argument"):
        ds[0]
    assert ds.num_failed == 0 and index.records[0].path not in Path(index.dir, "quarantine.csv").read_text()


def pretrain_batches(index, workers, epochs=((0, None), (1, None))):
    """Batches of (epoch, how many batches to take: None = all) in turn, from one loader."""
    ds = PretrainDataset(index, frames_per_clip=T, crop_size=CROP, seed=5)
    loader = build_loader(ds, batch_size=2, workers=workers, seed=5)
    out = []
    for epoch, take in epochs:
        set_epoch(loader, epoch)
        for b, batch in enumerate(loader):
            if take is not None and b == take:
                break
            out.append(batch)
    return loader, out


def test_ring_hands_over_the_batches_default_collate_makes(index):
    """With workers, clips travel through shared slots; the batches (and the type) are those without workers,
    also after an epoch stopped early (its batches left in the ring) and while earlier batches are held."""
    plan = [(0, 1), (1, None), (2, None)]  # epoch 0 stopped after one batch
    loader, batches = pretrain_batches(index, 2, plan)
    _, expected = pretrain_batches(index, 0, plan)
    assert type(loader).__name__ == "_RingLoader" and len(loader.ring.buffers) == 2
    assert len(batches) == len(expected) == 1 + 2 * 3
    for got, want in zip(batches, expected):
        assert type(got) is type(want) is list and len(got) == 2
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert loader.ring.free.tolist() == [1] * len(loader.ring.free)  # every slot handed back


def test_ring_collate_falls_back_when_no_slot_is_free(index, monkeypatch):
    from types import SimpleNamespace

    from videomoco.data import datasets

    ds = LabeledDataset(index, frames_per_clip=T, crop_size=CROP)
    ring = datasets._BatchRing(ds, batch_size=3, workers=2, slots=2, wait=0.01)
    batch = [ds[i] for i in range(3)]
    monkeypatch.setattr(datasets, "get_worker_info", lambda: SimpleNamespace(id=1))
    handed = ring.collate(batch)
    assert isinstance(handed, datasets._InRing) and handed.slot in (2, 3) and ring.free[handed.slot] == 0
    got, want = ring.hand_over(handed, pin_memory=False), datasets.default_collate(batch)
    assert ring.free[handed.slot] == 1 and all(torch.equal(g, w) for g, w in zip(got, want))  # clip, label, video
    ring.free.zero_()  # every slot taken: the worker collates as usual after `wait`
    assert isinstance(ring.collate(batch), list)
    assert isinstance(ring.collate(batch[:2]), list)  # a short batch does not fit the slots
