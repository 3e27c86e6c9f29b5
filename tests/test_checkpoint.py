"""Atomic save, safe load, rotation, RNG state and the authors' checkpoint format."""

import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from videomoco.engine import checkpoint as ck
from videomoco.engine import retention
from videomoco.engine.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import enospc  # noqa: E402


def test_save_then_load_round_trip(tmp_path):
    state = {"format": "videomoco", "epoch": 3, "state_dict": {"w": torch.randn(4, 5)}, "config": {"a": [1, 2]}}
    ck.save_checkpoint(state, tmp_path / "c.pth.tar")
    back = ck.load_checkpoint(tmp_path / "c.pth.tar")
    assert back["epoch"] == 3 and back["config"] == {"a": [1, 2]}
    assert torch.equal(back["state_dict"]["w"], state["state_dict"]["w"])


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / retention.checkpoint_name(1)
    ck.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def half_write(obj, f, *a, **k):  # writes part of the file, then the "disk is full"
        real_save(obj, f, *a, **k)
        f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(ck.WriteError, match="no space left on device"):
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
    for name in (retention.checkpoint_name(1), retention.checkpoint_name(2), retention.checkpoint_name(2, step=30)):
        ck.save_checkpoint({"epoch": 1, "state_dict": {}, "name": name}, tmp_path / name)
    path, ckpt = retention.latest_checkpoint(tmp_path)
    assert path.name == retention.checkpoint_name(2, step=30) and ckpt["name"] == path.name
    (tmp_path / retention.checkpoint_name(3)).write_bytes(b"truncated")
    path, _ = retention.latest_checkpoint(tmp_path)
    assert path.name == retention.checkpoint_name(2, step=30)
    assert retention.latest_checkpoint(tmp_path / "empty") == (None, None)


def test_rotation_keeps_last_n_and_every_m(tmp_path):
    for e in range(1, 11):
        (tmp_path / retention.checkpoint_name(e)).write_bytes(b"x")
    (tmp_path / retention.checkpoint_name(5, step=99)).write_bytes(b"x")  # older than epoch 10: goes
    retention.rotate_checkpoints(tmp_path, keep_last=3, keep_every=4)
    assert [p.name for p in retention.list_checkpoints(tmp_path)] == [retention.checkpoint_name(e) for e in (4, 8, 9, 10)]
    (tmp_path / retention.checkpoint_name(10, step=120)).write_bytes(b"x")
    (tmp_path / retention.checkpoint_name(10, step=130)).write_bytes(b"x")
    retention.rotate_checkpoints(tmp_path, keep_last=3, keep_every=4)
    assert retention.list_checkpoints(tmp_path)[-1].name == retention.checkpoint_name(10, step=130)
    assert not (tmp_path / retention.checkpoint_name(10, step=120)).exists()


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
                         ("pickled.pth", "refused to load: the file contains Python objects")]:
        with pytest.raises(CheckpointError, match=reason) as e:
            ck.load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and "PyTorch 2.6" not in str(e.value)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    # regression: a newer epoch checkpoint in --ckp_dir (a rollback) made retention delete the one just saved
    for e in (1, 5):
        (tmp_path / retention.checkpoint_name(e)).write_bytes(b"x")
    retention.rotate_checkpoints(tmp_path, keep_last=1, protect=tmp_path / retention.checkpoint_name(1))
    assert [p.name for p in retention.list_checkpoints(tmp_path)] == [retention.checkpoint_name(1), retention.checkpoint_name(5)]
    (tmp_path / retention.checkpoint_name(1, step=3)).write_bytes(b"x")  # mid-epoch, older than epoch 5
    retention.rotate_checkpoints(tmp_path, keep_last=1, protect=tmp_path / retention.checkpoint_name(1, step=3))
    assert (tmp_path / retention.checkpoint_name(1, step=3)).exists() and not (tmp_path / retention.checkpoint_name(1)).exists()


def test_newer_checkpoints_are_set_aside_not_deleted(tmp_path):
    names = [retention.checkpoint_name(1), retention.checkpoint_name(2), retention.checkpoint_name(2, step=5), retention.checkpoint_name(3)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    assert retention.set_aside_newer(tmp_path, (3, 6, False)) == (None, 0)  # resumed from the newest: none is newer
    folder, n = retention.set_aside_newer(tmp_path, (2, 4, False))  # rolled back to the end of epoch 2 (step 4)
    assert n == 2 and folder.parent == tmp_path and folder.name.startswith("superseded-")
    assert sorted(p.name for p in folder.iterdir()) == names[2:]
    assert [p.name for p in retention.list_checkpoints(tmp_path)] == names[:2]
    again, n = retention.set_aside_newer(tmp_path)  # a fresh run: all of them, into another folder
    assert n == 2 and again != folder and sorted(p.name for p in again.iterdir()) == names[:2]
    assert retention.list_checkpoints(tmp_path) == [] and len(list(folder.iterdir())) == 2
    (tmp_path / names[2]).write_bytes(b"x")
    assert retention.set_aside_newer(tmp_path, (2, 5, True)) == (None, 0)  # the mid-epoch file a run resumed from


def test_nonfinite_weights_are_named_and_skipped_by_latest(tmp_path, caplog):
    good = {"epoch": 1, "state_dict": {"a": torch.ones(2), "queue_ptr": torch.zeros(1, dtype=torch.long)},
            "generator": {"w": torch.ones(3)}}
    assert ck.nonfinite_tensors(good) == []
    bad = {"state_dict": {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(1)},
           "generator": {"w": torch.tensor([float("inf")])}}
    assert ck.nonfinite_tensors(bad) == ["a", "generator.w"]
    ck.save_checkpoint(good, tmp_path / retention.checkpoint_name(1))
    ck.save_checkpoint(bad, tmp_path / retention.checkpoint_name(2))
    path, _ = retention.latest_checkpoint(tmp_path)
    assert path.name == retention.checkpoint_name(1)
    assert any("2 tensors of its weights are NaN/Inf, e.g. a" in r.getMessage() for r in caplog.records)


def test_temp_files_of_killed_writes_are_removed(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(Path(a).name), real_replace(a, b)))
    ck.save_checkpoint({"state_dict": {}}, tmp_path / retention.checkpoint_name(1))
    assert replaced[0].startswith(f".{retention.checkpoint_name(1)}.{os.getpid()}.")  # the writer's pid in the name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [f".checkpoint_0002.pth.tar.{dead}.abc_123.tmp", f".checkpoint_0002.pth.tar.{os.getpid()}.x1.tmp",
             ".checkpoint_0003.pth.tar.k2j4_8z9.tmp"]  # a dead writer, this process (not writing), an old name
    live = [f".checkpoint_0004.pth.tar.{os.getppid()}.q9.tmp", ".other.tmp"]  # a live writer, not ours
    for name in stale + live:
        (tmp_path / name).write_bytes(b"x")
    assert retention.remove_stale_temp_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + [retention.checkpoint_name(1)])


def test_deflate_bomb_is_refused_before_torch_load(tmp_path, monkeypatch):
    from videomoco.engine.checkpoint import read_checkpoint

    torch.save({"state_dict": {"w": torch.zeros(4)}}, tmp_path / "c.pth")
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(tmp_path / "c.pth") as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("data/0"):  # 100 MB of zeros, deflated to ~0.1 MB
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(entry, "w") as f:
                    for _ in range(100):
                        f.write(bytes(10**6))
            else:
                dst.writestr(info, src.read(info))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match=r"would inflate to 100.0 MB from 0.1 MB on disk \(compression ratio "
                                              r"\d+:1\); refused"):
        ck.load_checkpoint(bomb)
    with pytest.raises(ValueError, match="would inflate to"):  # `videomoco export` and the evaluations read alike
        read_checkpoint(bomb)


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_refused_code_names_the_global_and_never_advises_weights_only_false(tmp_path, capfd):
    # regression: torch's generic sentence said re-running with weights_only=False "will likely succeed"
    torch.save({"state_dict": {}, "x": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(tmp_path / "evil.pth")
    msg = str(e.value)
    assert "refused to load: the file contains Python objects (e.g. GLOBAL posix.system) that could run code" in msg
    assert "will likely succeed" not in msg and "\n" not in msg and "pwned" not in capfd.readouterr().out


def test_checkpoint_input_norm_by_format():
    from videomoco.data.augment import IMAGENET_MEAN, KINETICS_MEAN
    from videomoco.engine.checkpoint import checkpoint_input_norm

    authors = {"epoch": 100, "arch": "r2plus1d_18", "state_dict": {"module.encoder_q.fc.weight": torch.zeros(1)}}
    assert checkpoint_input_norm(authors)["mean"] == list(IMAGENET_MEAN)
    ours_old = {"format": "videomoco", "state_dict": {"encoder_q.fc.weight": torch.zeros(1)}}
    assert checkpoint_input_norm(ours_old)["name"] == "kinetics"
    ours = {**ours_old, "input_norm": {"name": "imagenet", "mean": [0.0] * 3, "std": [1.0] * 3}}
    assert checkpoint_input_norm(ours)["mean"] == list(IMAGENET_MEAN)  # the name is trusted, not the numbers
    assert checkpoint_input_norm({"state_dict": {"conv1.weight": torch.zeros(1)}})["mean"] == list(KINETICS_MEAN)


def test_pretraining_checkpoints_record_their_normalisation_and_decay():
    from videomoco.engine.checkpoint import checkpoint_decay, checkpoint_input_norm, pretrain_state
    from videomoco.method.generator import FrameDropGenerator

    model, gen = torch.nn.Linear(2, 2), FrameDropGenerator()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    for aug, norm in (("ours", "kinetics"), ("authors", "imagenet"), ("authors_plus", "imagenet")):
        config = {"arch": "r3d_18", "aug": aug, "decay_unit": "key", "decay_on": "exp"}
        state = pretrain_state(config, epoch=1, step=1, batch_in_epoch=0, model=model, generator=gen, optimizer=opt,
                               optimizer_g=opt, scheduler={}, sampler={})
        assert state["input_norm"]["name"] == norm and checkpoint_input_norm(state)["name"] == norm
        assert checkpoint_decay(state) == {"unit": "key", "on": "exp"}
    authors = {"epoch": 100, "arch": "r2plus1d_18", "state_dict": {"module.queue": torch.zeros(1)}}
    assert checkpoint_decay(authors) == {"unit": "step", "on": "logit"}


# --- what a checkpoint is trusted for (issue 27) ---

@pytest.mark.parametrize("field, value", [("epoch", "ten"), ("epoch", -5), ("epoch", 2.5), ("epoch", True),
                                          ("step", "x"), ("batch_in_epoch", -1), ("arch", 3), ("config", "cfg"),
                                          ("optimizer", {"state": {}}), ("rng", {"torch": torch.zeros(1)}),
                                          ("num_classes", 0), ("state_dict", [1])])
def test_a_malformed_field_is_one_line_naming_it(tmp_path, field, value):
    ckpt = {"format": "videomoco", "epoch": 1, "state_dict": {"w": torch.ones(2)}, field: value}
    ck.save_checkpoint(ckpt, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=f"field '{field}' must be") as e:
        ck.load_checkpoint(tmp_path / "c.pth")
    assert "\n" not in str(e.value) and str(tmp_path / "c.pth") in str(e.value)


def test_resume_requires_the_fields_its_format_reads(tmp_path):
    ck.save_checkpoint({"state_dict": {}}, tmp_path / "authors.pth")  # the authors' format: the epoch at least
    ck.save_checkpoint({"format": "videomoco", "epoch": 1, "step": 2, "state_dict": {}}, tmp_path / "ours.pth")
    assert ck.load_checkpoint(tmp_path / "authors.pth")["state_dict"] == {}  # evaluation reads the weights only
    with pytest.raises(CheckpointError, match="field 'epoch' is missing"):
        ck.load_checkpoint(tmp_path / "authors.pth", resume=True)
    with pytest.raises(CheckpointError, match="field 'arch' is missing"):
        ck.load_checkpoint(tmp_path / "ours.pth", resume=True)


@pytest.mark.parametrize("where", ["module.encoder_q.fc.weight", "module.queue"])
def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path, where):
    sd = {"module.encoder_q.fc.weight": torch.ones(2, 2), "module.queue": torch.ones(2, 4)}
    sd[where][0, 0] = float("nan") if "fc" in where else float("inf")
    ck.save_checkpoint({"epoch": 3, "state_dict": sd}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=f"1 tensors of its weights are NaN/Inf, e.g. {where} .*refused"):
        ck.load_checkpoint(tmp_path / "c.pth")
    torch.save({k[len("module.encoder_q."):]: v for k, v in sd.items()}, tmp_path / "bare.pth")  # any format
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        ck.encoder_state(tmp_path / "bare.pth")


def test_a_full_disk_is_one_line_naming_the_path_and_space_and_keeps_the_old_file(tmp_path, small_fs, monkeypatch):
    state = {"epoch": 2, "state_dict": {"w": torch.zeros(250_000)}}  # 1 MB
    disk = small_fs("disk", free=256 * 1024) or tmp_path
    path = disk / "c.pth.tar"
    ck.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, path)
    if disk == tmp_path:  # not root: the write fails as on a full disk
        enospc(monkeypatch)
    with pytest.raises(ck.WriteError) as e:
        ck.save_checkpoint(state, path)
    assert re.fullmatch(rf"cannot write {re.escape(str(path))}: no space left on device \(needs about 1.0 MB, "
                        r"[\d.]+ (kB|MB|GB|bytes) free there\)", str(e.value)), str(e.value)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1 and not list(disk.glob(".c.pth.tar*"))


def test_a_read_only_target_is_one_line(read_only_dir):
    with pytest.raises(ck.WriteError, match=f"cannot write {re.escape(str(read_only_dir))}/c.pth: "
                                            "(read-only file system|permission denied)"):
        ck.save_checkpoint({"state_dict": {}}, read_only_dir / "c.pth")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ck.save_checkpoint({"state_dict": {}}, tmp_path / "c.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth").stat().st_mode & 0o777 == mode


def test_authors_checkpoint_carries_imagenet_statistics_and_features_depend_on_them(tmp_path):
    """The authors' format loads with ImageNet statistics recorded (`model.preprocessing`), which evaluation then
    feeds it; the other statistics give other features. Ours records Kinetics', through export and fine-tuning."""
    from eval_data import pretrain_checkpoint

    from videomoco.data.augment import IMAGENET_MEAN, IMAGENET_STD, KINETICS_MEAN, KINETICS_STD, normalize
    from videomoco.engine.checkpoint import finetune_state, load_encoder, save_export
    from videomoco.eval import common
    from videomoco.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("r3d_18", num_classes=8, width=8)
    authors = {"epoch": 100, "arch": "r3d_18",
               "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}
    torch.save(authors, tmp_path / "checkpoint_0100.pth.tar")
    model = load_encoder(tmp_path / "checkpoint_0100.pth.tar").eval()
    recorded = model.preprocessing["input_norm"]
    assert recorded["name"] == "imagenet" and recorded["mean"] == list(IMAGENET_MEAN)

    clip = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        theirs = model.forward_features(normalize(clip, IMAGENET_MEAN, IMAGENET_STD))
        other = model.forward_features(normalize(clip, KINETICS_MEAN, KINETICS_STD))
    assert (theirs - other).abs().max() > 1e-3 * theirs.abs().max()  # the statistics change the features

    cfg = common.EvalConfig(device="cpu")  # protocol videomoco: the checkpoint's statistics
    assert common.input_stats(cfg, model)["name"] == "imagenet"
    pretrain_checkpoint(tmp_path / "ours.pth")
    ours = load_encoder(tmp_path / "ours.pth")
    assert common.input_stats(cfg, ours)["name"] == "kinetics"
    assert common.input_stats(common.EvalConfig(device="cpu", protocol="authors"), ours)["name"] == "imagenet"

    # the record travels: export sidecar, fine-tuning checkpoint
    exported = save_export(model, tmp_path / "enc.pth")
    assert exported["input_norm"]["name"] == "imagenet"
    assert load_encoder(tmp_path / "enc.pth").preprocessing["input_norm"]["name"] == "imagenet"
    save_export(model, tmp_path / "enc.safetensors", fmt="safetensors")
    assert load_encoder(tmp_path / "enc.safetensors").preprocessing["input_norm"]["name"] == "imagenet"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = finetune_state(model, opt, 1, 8)
    assert state["input_norm"]["name"] == "imagenet"
    torch.save(state, tmp_path / "ft.pth")
    assert load_encoder(tmp_path / "ft.pth").preprocessing["input_norm"]["name"] == "imagenet"
