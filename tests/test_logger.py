"""The dropped-frames strip and the metrics files."""

import json

import pytest
import torch

from videomoco.engine.logger import MetricLogger, drop_strip


def test_drop_strip_marks_dropped_frames_red():
    clip = torch.full((3, 4, 6, 5), 7, dtype=torch.uint8)  # (C, T, H, W)
    img = drop_strip(clip, torch.tensor([1, 0, 1, 0]), border=2)
    assert img.shape == (3, 6 + 4, 4 * (5 + 4)) and img.dtype == torch.uint8
    frame_w = 5 + 4
    corners = [img[:, 0, t * frame_w].tolist() for t in range(4)]
    assert corners == [[128, 128, 128], [255, 0, 0], [128, 128, 128], [255, 0, 0]]
    assert (img[:, 2:8, 2:7] == 7).all()  # the first frame's pixels, inside its border


def test_drop_strip_unnormalises_float_clips():
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    clip = torch.zeros(3, 2, 4, 4)  # normalised zeros = the mean = 0.5 -> 128
    img = drop_strip(clip, torch.ones(2), border=1, mean=mean, std=std)
    assert img[:, 1, 1].tolist() == [128, 128, 128]


def test_metric_logger_writes_jsonl_and_noop_off_rank0(tmp_path):
    log = MetricLogger(tmp_path / "a")
    log.scalars(5, {"loss_d": torch.tensor(1.5).item(), "lr": 0.1})
    log.image("img", 5, torch.zeros(3, 4, 4, dtype=torch.uint8))
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, "loss_d": 1.5, "lr": 0.1}]
    assert list((tmp_path / "a").glob("events.out.tfevents.*"))
    off = MetricLogger(tmp_path / "b", enabled=False)
    off.scalars(1, {"x": 1.0})
    off.close()
    assert not (tmp_path / "b").exists()


def test_nothing_is_created_before_the_first_record_and_a_full_disk_is_one_line(tmp_path, small_fs, capfd):
    from videomoco.engine.checkpoint import WriteError

    logger = MetricLogger(tmp_path / "log")
    assert not (tmp_path / "log").exists()  # a run refused at its start leaves no log
    logger.close()
    disk = small_fs("full", free=0)
    if disk is None:
        pytest.skip("needs a small tmpfs (root)")
    logger = MetricLogger(disk / "log")
    with pytest.raises(WriteError, match=rf"cannot write {disk}/log\S*: no space left on device \(needs about \d+ "
                                         r"bytes, \d+ bytes free there\)"):
        for step in range(100):  # TensorBoard's thread fails on its first flush; metrics.jsonl at once
            logger.scalars(step, {"loss": 1.0})
    logger.close()
    assert "Traceback" not in capfd.readouterr().err
