"""Atomic save, safe load, rotation, RNG state and the authors' checkpoint format."""

import json
import random

import numpy as np
import pytest
import torch

from videomoco.engine import checkpoint as ck
from videomoco.engine.checkpoint import CheckpointError


def test_save_then_load_round_trip(tmp_path):
    state = {"format": "videomoco", "epoch": 3, "state_dict": {"w": torch.randn(4, 5)}, "config": {"a": [1, 2]}}
    ck.save_checkpoint(state, tmp_path / "c.pth.tar")
    back = ck.load_checkpoint(tmp_path / "c.pth.tar")
    assert back["epoch"] == 3 and back["config"] == {"a": [1, 2]}
    assert torch.equal(back["state_dict"]["w"], state["state_dict"]["w"])


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / ck.checkpoint_name(1)
    ck.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def half_write(obj, f, *a, **k):  # writes part of the file, then the "disk is full"
        real_save(obj, f, *a, **k)
        f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_unreadable_and_foreign_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pth.tar").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as e:
        ck.load_checkpoint(tmp_path / "junk.pth.tar")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pth.tar")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        ck.load_checkpoint(tmp_path / "other.pth")


def test_load_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": {}, "obj": np.arange(3)}, tmp_path / "np.pth")  # numpy arrays need full unpickling
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(tmp_path / "np.pth")


def test_latest_skips_corrupt_and_orders_steps(tmp_path):
    for name in (ck.checkpoint_name(1), ck.checkpoint_name(2), ck.checkpoint_name(2, step=30)):
        ck.save_checkpoint({"state_dict": {}, "name": name}, tmp_path / name)
    path, ckpt = ck.latest_checkpoint(tmp_path)
    assert path.name == ck.checkpoint_name(2, step=30) and ckpt["name"] == path.name
    (tmp_path / ck.checkpoint_name(3)).write_bytes(b"truncated")
    path, _ = ck.latest_checkpoint(tmp_path)
    assert path.name == ck.checkpoint_name(2, step=30)
    assert ck.latest_checkpoint(tmp_path / "empty") == (None, None)


def test_rotation_keeps_last_n_and_every_m(tmp_path):
    for e in range(1, 11):
        (tmp_path / ck.checkpoint_name(e)).write_bytes(b"x")
    (tmp_path / ck.checkpoint_name(5, step=99)).write_bytes(b"x")  # older than epoch 10: goes
    ck.rotate_checkpoints(tmp_path, keep_last=3, keep_every=4)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(e) for e in (4, 8, 9, 10)]
    (tmp_path / ck.checkpoint_name(10, step=120)).write_bytes(b"x")
    (tmp_path / ck.checkpoint_name(10, step=130)).write_bytes(b"x")
    ck.rotate_checkpoints(tmp_path, keep_last=3, keep_every=4)
    assert ck.list_checkpoints(tmp_path)[-1].name == ck.checkpoint_name(10, step=130)
    assert not (tmp_path / ck.checkpoint_name(10, step=120)).exists()


def test_rng_state_is_weights_only_and_restores(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_checkpoint({"state_dict": {}, "rng": ck.rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])



class FakeCuda:
    """torch.cuda's RNG functions on `count` fake devices, this process on `current`."""

    def __init__(self, monkeypatch, count, current=0):
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.current = current
        for name, fn in {"is_available": lambda: True, "is_initialized": lambda: True,
                         "device_count": lambda: count, "current_device": lambda: self.current,
                         "get_rng_state": self.get, "set_rng_state": self.set,
                         "get_rng_state_all": lambda: [self.states[i] for i in range(count)],
                         "set_rng_state_all": self.set_all}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def index(self, device):
        return self.current if device in (None, "cuda") else int(device)

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda"):
        if self.index(device) not in self.states:
            raise IndexError(f"no device {device}")
        self.states[self.index(device)] = state.clone()

    def set_all(self, states):
        for i, state in enumerate(states):
            self.set(state, i)


def test_cuda_rng_state_is_this_devices_and_weights_only(tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, count=8, current=3)
    cuda.states[3] = torch.arange(16, dtype=torch.uint8)
    ck.save_checkpoint({"state_dict": {}, "rng": ck.rng_state()}, tmp_path / "r.pth")
    saved = ck.load_checkpoint(tmp_path / "r.pth")["rng"]["cuda"]  # weights_only=True
    assert saved["device"] == 3 and torch.equal(saved["state"], torch.arange(16, dtype=torch.uint8))
    one = FakeCuda(monkeypatch, count=1)  # resumed on 1 GPU: the saved state goes to this process's device
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert torch.equal(one.states[0], torch.arange(16, dtype=torch.uint8))


@pytest.mark.parametrize("saved_on, resumed_on, current", [(8, 1, 0), (1, 8, 0), (1, 8, 5), (8, 8, 5)])
def test_cuda_rng_state_of_another_gpu_count_restores_what_it_can(tmp_path, monkeypatch, saved_on, resumed_on,
                                                                 current):
    """Old checkpoints hold `get_rng_state_all()` of every GPU: restoring never raises on another GPU count."""
    old = {**ck.rng_state(), "cuda": [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(saved_on)]}
    cuda = FakeCuda(monkeypatch, count=resumed_on, current=current)
    before = {i: s.clone() for i, s in cuda.states.items()}
    ck.set_rng_state(old)
    for i, state in cuda.states.items():
        expected = old["cuda"][i] if i == current and i < saved_on else before[i]
        assert torch.equal(state, expected), i


def test_cuda_rng_state_untouched_when_cuda_never_started(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # e.g. a --device cpu run on a GPU machine
    state = ck.rng_state()
    assert "cuda" not in state
    ck.set_rng_state({**state, "cuda": {"device": 0, "state": torch.full((16,), 7, dtype=torch.uint8)}})
    assert cuda.states[0].eq(0).all() and cuda.states[1].eq(1).all()

def test_official_layout_is_normalised(torchvision_fixtures):
    layout = json.loads((torchvision_fixtures / "videomoco_checkpoint_layout.json").read_text())
    entries = layout["moco_netD_full_key_list_example_r3d_18_dim128_K65536_no_mlp"]
    sd = {e["key"]: torch.zeros([min(s, 4) for s in e["shape"]]) for e in entries}  # tiny stand-ins
    out = ck.model_state_dict(sd)
    assert not any(k.startswith("module.") for k in out)
    assert {"queue", "queue_ptr", "encoder_q.stem.0.weight", "encoder_k.fc.bias"} <= set(out)
    assert out["queue_age"].shape == (out["queue"].shape[1],) and not out["queue_age"].any()
    assert ck.is_official({"epoch": 100, "arch": "r3d_18", "state_dict": sd})


def test_mismatch_lists_missing_unexpected_and_shapes():
    model = {"encoder_q.layer1.0.conv1.1.weight": torch.zeros(8), "a": torch.zeros(2, 3), "b": torch.zeros(1)}
    ckpt = {"encoder_q.layer1.0.conv1.1.weight": torch.zeros(64), "a": torch.zeros(2, 3), "c": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        ck.check_compatible(model, ckpt, "r3d_18", "r2plus1d_18")
    msg = str(e.value)
    assert msg.startswith("checkpoint is r3d_18 (width 64) but the model is r2plus1d_18 (width 8)")
    assert "1 keys missing, 1 unexpected, 1 shape mismatches" in msg and "[64] vs [8]" in msg
    ck.check_compatible(model, dict(model))  # identical: no error


def test_corrupt_files_name_the_real_problem(tmp_path):
    # regression: random bytes gave torch's paragraph about the weights_only default, a truncated
    # file "[Errno 22] Invalid argument"
    rng = np.random.default_rng(0)
    (tmp_path / "random.pth.tar").write_bytes(b"\x01" + rng.bytes(4000))
    ck.save_checkpoint({"state_dict": {"w": torch.randn(64, 64)}}, tmp_path / "full.pth.tar")
    data = (tmp_path / "full.pth.tar").read_bytes()
    (tmp_path / "truncated.pth.tar").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "obj": np.arange(3)}, tmp_path / "pickled.pth")
    for name, reason in [("random.pth.tar", "not a PyTorch checkpoint"),
                         ("truncated.pth.tar", "truncated or corrupt file"),
                         ("pickled.pth", "refused by weights_only=True: ")]:
        with pytest.raises(CheckpointError, match=reason) as e:
            ck.load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and "PyTorch 2.6" not in str(e.value)
