"""`videomoco pretrain` end to end on a tiny generated dataset (width 8, 8 frames, 32 px, K=32, batch 4).

8 videos / batch 4 = 2 steps per epoch.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from videomoco import cli
from videomoco.data.encode import write_video
from videomoco.engine import checkpoint as ck
from videomoco.engine import retention
from videomoco.engine import pretrain
from videomoco.method import VideoMoCo

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, enospc, error_lines, moving_square_frames, tree  # noqa: E402
from test_distributed import free_port  # noqa: E402

TINY = ["--width", "8", "-fpc", "8", "-cs", "32", "--moco-k", "32", "--moco-dim", "16", "-b", "4", "-j", "0",
        "--seed", "0", "-p", "1", "--save_every", "1", "--image_every", "1"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i in range(8):
        write_video(root / f"v{i}.mp4", moving_square_frames(16, 40, seed=i), fps=25, codec="h264")
    return root


def cli_run(videos, out, *extra):
    return cli.main(["pretrain", str(videos), *TINY, "--log_dir", str(out / "log"), "--ckp_dir", str(out / "ckp"),
                     *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "log" / "metrics.jsonl").read_text().splitlines()]


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    """Two epochs straight through, generator from epoch 1 on."""
    out = tmp_path_factory.mktemp("reference")
    assert cli_run(videos, out, "--epochs", "2", "--adv_start_epoch", "1") == 0
    return out


def test_end_to_end_plain_then_adversarial(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_g"] == 0 and r["drop_fraction"] == 0 for r in rows[:2])  # plain MoCo in epoch 0
    assert all(r["loss_g"] != 0 and r["drop_fraction"] == 0.25 for r in rows[2:])  # the generator in epoch 1
    assert all(r["loss_d"] > 0 and r["clips_per_s"] > 0 and r["lr"] == 0.03 for r in rows)
    assert rows[-1]["queue_age_max"] == 4  # 4 steps of 4 keys into K=32: the first keys are 4 enqueues old
    assert [p.name for p in retention.list_checkpoints(reference / "ckp")] == ["checkpoint_0001.pth.tar",
                                                                      "checkpoint_0002.pth.tar"]
    ckpt = ck.load_checkpoint(reference / "ckp" / "checkpoint_0002.pth.tar")
    assert (ckpt["format"], ckpt["epoch"], ckpt["step"], ckpt["arch"]) == ("videomoco", 2, 4, "r3d_18")
    assert ckpt["config"]["width"] == 8 and "queue_age" in ckpt["state_dict"] and ckpt["generator"]
    assert ckpt["optimizer"]["state"] and ckpt["sampler"]["epoch"] == 2
    assert yaml.safe_load((reference / "log" / "config.yaml").read_text())["seed"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "log"))
    events.Reload()
    assert "generator/dropped_frames" in events.Tags()["images"]  # logged in the adversarial epoch
    assert {"train/loss_d", "train/queue_age_max", "train/clips_per_s"} <= set(events.Tags()["scalars"])


def _assert_same_run(a, b):
    assert [r["loss_d"] for r in metrics(a)] == [r["loss_d"] for r in metrics(b)]
    assert [r["loss_g"] for r in metrics(a)] == [r["loss_g"] for r in metrics(b)]
    ca, cb = (ck.load_checkpoint(o / "ckp" / "checkpoint_0002.pth.tar") for o in (a, b))
    for part in ("state_dict", "generator"):
        for key, value in ca[part].items():
            assert torch.equal(value, cb[part][key]), f"{part}.{key}"


@pytest.mark.parametrize("stop_step, workers", [(2, "0"), (3, "2")])
def test_resume_is_exact(videos, reference, tmp_path, stop_step, workers):
    """Stopping (at the epoch boundary, or mid-epoch with 2 workers) and resuming gives bitwise the same run."""
    args = ("--epochs", "2", "--adv_start_epoch", "1", "-j", workers)
    assert cli_run(videos, tmp_path, *args, "--max_steps", str(stop_step)) == 0
    names = [p.name for p in retention.list_checkpoints(tmp_path / "ckp")]
    assert names[-1] == retention.checkpoint_name(1, step=3 if stop_step == 3 else None)
    assert cli_run(videos, tmp_path, *args, "--resume", "auto") == 0
    _assert_same_run(reference, tmp_path)


def test_fresh_optimizers_at_the_boundary_are_a_resume_without_optimizer_state(videos, reference, tmp_path, caplog):
    """--adv_optimizer fresh: straight through, the run equals the authors' two phases (stop at the boundary,
    resume without the optimisers' state); carrying the momentum (the reference) is another run."""
    args = ("--epochs", "2", "--adv_start_epoch", "1")
    fresh, phases = tmp_path / "fresh", tmp_path / "phases"
    assert cli_run(videos, fresh, *args, "--adv_optimizer", "fresh") == 0
    assert "optimisers of D and G start afresh at epoch 1" in caplog.text
    assert cli_run(videos, phases, *args, "--max_steps", "2") == 0
    path = phases / "ckp" / "checkpoint_0001.pth.tar"
    ckpt = ck.load_checkpoint(path)
    assert ckpt["optimizer"]["state"]  # momentum carried so far
    ckpt["optimizer"]["state"], ckpt["optimizer_g"]["state"] = {}, {}
    ck.save_checkpoint(ckpt, path)
    assert cli_run(videos, phases, *args, "--resume", "auto") == 0
    _assert_same_run(fresh, phases)
    ours, carried = (ck.load_checkpoint(o / "ckp" / "checkpoint_0002.pth.tar") for o in (fresh, reference))
    assert not torch.equal(ours["state_dict"]["encoder_q.fc.weight"], carried["state_dict"]["encoder_q.fc.weight"])


def test_sigterm_saves_and_exits_zero(videos, tmp_path):
    cmd = [sys.executable, "-m", "videomoco", "pretrain", str(videos), *TINY, "--epochs", "50",
           "--log_dir", str(tmp_path / "log"), "--ckp_dir", str(tmp_path / "ckp"), "--save_every", "100"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jsonl = tmp_path / "log" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (jsonl.is_file() and jsonl.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "received SIGTERM" in output
    path, ckpt = retention.latest_checkpoint(tmp_path / "ckp")
    assert path is not None, output[-2000:]  # mid-epoch, or the epoch's end when the signal hit its last step
    assert ckpt["step"] >= 1 and ckpt["sampler"]["position"] == ckpt["batch_in_epoch"] * 4
    assert ckpt["step"] == 2 * ckpt["epoch"] + ckpt["batch_in_epoch"]
    # resumable: one more step from there
    assert cli_run(videos, tmp_path, "--epochs", "50", "--resume", "auto", "--max_steps", str(ckpt["step"] + 1)) == 0
    assert metrics(tmp_path)[-1]["step"] == ckpt["step"] + 1


def _official_checkpoint(path, arch="r3d_18", width=8, dim=16, K=32, epoch=3):
    """The authors' layout: {'epoch', 'arch', 'state_dict'} with `module.` keys and no queue_age."""

    model = VideoMoCo(arch, dim=dim, K=K, width=width)
    model.queue_ptr.fill_(5)
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if k != "queue_age"}
    torch.save({"epoch": epoch, "arch": arch, "state_dict": sd}, path)
    return model


def test_resume_from_official_checkpoint(videos, tmp_path, caplog):
    model = _official_checkpoint(tmp_path / "theirs.pth.tar", epoch=3)
    assert cli_run(videos, tmp_path, "--resume", str(tmp_path / "theirs.pth.tar"), "--epochs", "4",
                   "--resumeG", str(tmp_path / "netG.pth.tar"), "--adv_start_epoch", "0") == 0
    # their encoder saw ImageNet statistics; this run (--aug ours) normalises with Kinetics': said once
    warnings = [r.getMessage() for r in caplog.records if "normalised with imagenet statistics" in r.getMessage()]
    assert len(warnings) == 1 and "normalises with kinetics (--aug authors keeps them)" in warnings[0]
    rows = metrics(tmp_path)
    assert len(rows) == 2  # only epoch 3 ran
    ckpt = ck.load_checkpoint(tmp_path / "ckp" / "checkpoint_0004.pth.tar")
    assert ckpt["epoch"] == 4
    assert int(ckpt["state_dict"]["queue_ptr"]) == 5 + 2 * 4  # the loaded queue went on from its pointer


def test_resume_records_the_generator_and_swaps_it_only_before_it_trained(videos, tmp_path, capsys):
    # one plain epoch (G would join at epoch 2), then resumed with the other kind of G from epoch 1
    assert cli_run(videos, tmp_path / "a", "--epochs", "1", "--adv_start_epoch", "2") == 0
    first = ck.load_checkpoint(tmp_path / "a" / "ckp" / "checkpoint_0001.pth.tar")
    assert ck.checkpoint_generator_kind(first) == "authors" and not ck.generator_trained(first)
    assert cli_run(videos, tmp_path / "b", "--resume", str(tmp_path / "a" / "ckp" / "checkpoint_0001.pth.tar"),
                   "--epochs", "2", "--adv_start_epoch", "1", "--generator", "motion") == 0
    second = ck.load_checkpoint(tmp_path / "b" / "ckp" / "checkpoint_0002.pth.tar")
    assert ck.checkpoint_generator_kind(second) == "motion" and ck.generator_trained(second)
    assert not any(k.startswith("rnn.") for k in second["generator"])
    capsys.readouterr()
    code = cli_run(videos, tmp_path / "c", "--resume", str(tmp_path / "b" / "ckp" / "checkpoint_0002.pth.tar"),
                   "--epochs", "3", "--adv_start_epoch", "1")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.endswith("its generator is a trained 'motion' one, not --generator authors")
    del second["config"]["generator"]  # a file from before the choice: the authors' kind
    assert ck.checkpoint_generator_kind(second) == "authors" and ck.checkpoint_generator_kind({}) == "authors"


def test_mismatched_arch_is_a_one_line_error(videos, tmp_path, capsys):
    _official_checkpoint(tmp_path / "r3d.pth.tar", arch="r3d_18")
    code = cli_run(videos, tmp_path, "-a", "r2plus1d_18", "--resume", str(tmp_path / "r3d.pth.tar"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("videomoco pretrain: error: checkpoint is r3d_18 (width 8) but the model is r2plus1d_18")
    assert "keys missing" in err and "shape mismatches e.g." in err


def test_authors_command_verbatim(videos, tmp_path):
    """Their README command with a generated official checkpoint; our flags appended only to make it tiny."""
    _official_checkpoint(tmp_path / "checkpoint_0100.pth.tar", arch="r2plus1d_18", dim=128, K=65536, epoch=100)
    theirs = ["--log_dir", "L", "--ckp_dir", "C", "-a", "r2plus1d_18", "--lr", "0.005", "-fpc", "32", "-b", "32",
              "-j", "128", "--epochs", "200", "--schedule", "120", "160", "--dist_url", f"tcp://localhost:{free_port()}",
              "--multiprocessing_distributed", "--world_size", "1", "--rank", "0",
              "--resume", "./checkpoint_0100.pth.tar", str(videos)]
    ours = ["--width", "8", "-fpc", "8", "-cs", "32", "-b", "4", "--max_steps", "1"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *theirs, *ours], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" in proc.stderr or "authors' checkpoint" in proc.stderr
    assert "data workers per process" in proc.stderr  # -j 128 clamped, said in one line
    assert "--moco-k 65536 with 8 videos: about 100% of queries" in proc.stderr  # their queue on a tiny set: warned
    ckpt = ck.load_checkpoint(tmp_path / "C" / retention.checkpoint_name(100, step=1))
    assert ckpt["arch"] == "r2plus1d_18" and ckpt["config"]["lr"] == 0.005 and ckpt["sampler"]["position"] == 4
    # their recipe, said in one block at the start and recorded in the checkpoint
    block = proc.stderr[proc.stderr.index("what this run computes:"):].splitlines()[1:6]
    assert block[0].strip().startswith("augmentation: --aug authors: grayscale p 0.2 -> colour jitter 0.4/0.4/0.4 "
                                       "hue 0.4 (p 1) -> flip p 0.5; drawn per frame")
    assert block[1].strip().startswith("normalisation: imagenet, mean (0.485, 0.456, 0.406)")
    assert "a = enqueue steps since the key was written (the authors' code)" in block[2]
    assert "t**16383 = 0.8489 at batch 4" in block[2]  # K 65536, batch 4: 16384 steps of keys
    assert block[3].strip().startswith("BatchNorm batches per process (1 x 4 clips, 1 micro-batch): query encoder "
                                       "4, key encoder 4")
    assert block[4].strip() == "optimisers at --adv_start_epoch 100: fresh"
    assert "fresh optimiser" in proc.stderr  # their checkpoint: weights and queue only, as their train.py loads it
    assert ckpt["input_norm"]["name"] == "imagenet" and ck.checkpoint_decay(ckpt) == {"unit": "step", "on": "logit"}
    assert (ckpt["config"]["aug"], ckpt["config"]["shuffle_groups"], ckpt["config"]["adv_optimizer"]) == (
        "authors", 1, "fresh")


def test_nan_loss_stops_with_message(videos, tmp_path, monkeypatch):
    from videomoco.method import AdversarialTrainer

    real_step, calls = AdversarialTrainer.step, []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss_d"] = out["loss_d"] * float("nan")
        return out

    monkeypatch.setattr(AdversarialTrainer, "step", step)
    cfg = pretrain.config_from_args({"data": str(videos), "width": 8, "frame_per_clip": 8, "crop_size": 32,
                                     "moco_k": 32, "moco_dim": 16, "batch_size": 4, "workers": 0, "seed": 0,
                                     "print_freq": 1, "save_every": 1, "epochs": 3, "micro_batch": 4,  # no probe step
                                     "log_dir": str(tmp_path / "log"),
                                     "ckp_dir": str(tmp_path / "ckp")})
    result = pretrain.run(cfg)
    assert result["exit_code"] == 1 and result["status"] == "diverged"
    assert "loss_d is nan at step 3 (epoch 1)" in result["error"]
    assert result["error"].endswith("checkpoint_0001.pth.tar")


def test_bf16_channels_last_and_fp16(videos, tmp_path):
    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        assert cli_run(videos, out, "--precision", precision, "--channels_last", "--adv_start_epoch", "0",
                       "--max_steps", "1") == 0
        row = metrics(out)[-1]
        assert torch.isfinite(torch.tensor([row["loss_d"], row["loss_g"]])).all() and row["loss_g"] != 0
    ckpt = ck.load_checkpoint(tmp_path / "fp16" / "ckp" / retention.checkpoint_name(0, step=1))
    assert ckpt["scaler"]["d"]["scale"] > 0


@pytest.mark.parametrize("launcher", ["torchrun", "authors"])
def test_two_processes(videos, tmp_path, launcher):
    """Two ranks, launched like torchrun (env://) or as two one-process "nodes" with the authors'
    --multiprocessing_distributed --world_size 2 --rank R: both finish, only rank 0 writes."""
    port = free_port()
    procs = []
    for rank in range(2):
        env, flags = subprocess_env(), ["--dist_url", "env://"]
        if launcher == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            flags = ["--multiprocessing_distributed", "--world_size", "2", "--rank", str(rank),
                     "--dist_url", f"tcp://127.0.0.1:{port}"]
        cmd = [sys.executable, "-m", "videomoco", "pretrain", str(videos), *TINY, *flags,
               "--epochs", "1", "--adv_start_epoch", "0", "--log_dir", str(tmp_path / "log"),
               "--ckp_dir", str(tmp_path / "ckp")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-1500:] + outputs[1][-1500:]
    assert "process 0/2" in outputs[0]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]  # 8 videos / 2 ranks = 4 each, batch 2 per rank
    ckpt = ck.load_checkpoint(tmp_path / "ckp" / "checkpoint_0001.pth.tar")
    assert int(ckpt["state_dict"]["queue_ptr"]) == 2 * 4  # each step enqueues the keys of both ranks


@pytest.mark.slow
def test_compile_path(videos, tmp_path):
    assert cli_run(videos, tmp_path, "--compile", "--max_steps", "1", "--adv_start_epoch", "0") == 0
    ckpt = ck.load_checkpoint(tmp_path / "ckp" / retention.checkpoint_name(0, step=1))
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # Module.compile keeps the keys


def test_video_failing_in_a_loader_worker_is_one_line_and_exit_1(tmp_path, caplog):
    # regression: DataFailureError raised in a DataLoader worker ended the run with the worker's traceback
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        write_video(root / f"v{i}.mp4", moving_square_frames(16, 40, seed=i), fps=25, codec="h264")
    index_dir = tmp_path / "index"
    assert cli.main(["index", str(root), "--out", str(index_dir), "--no-progress"]) == 0
    for name in ("v1.mp4", "v2.mp4"):  # break after indexing: fail at training time (one alone is tolerated)
        (root / name).write_bytes(b"")
    code = cli.main(["pretrain", str(index_dir), *TINY, "-j", "1", "--epochs", "1", "--log_dir", str(tmp_path / "log"),
                     "--ckp_dir", str(tmp_path / "ckp")])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("2 of 4 videos failed to decode")
    assert "Traceback" not in errors[0] and "\n" not in errors[0]
    quarantine = (index_dir / "quarantine.csv").read_text()
    assert "v1.mp4" in quarantine and "v2.mp4" in quarantine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(videos, tmp_path, capsys):
    assert cli_run(videos, tmp_path, "--device", "cuda") == 2
    assert capsys.readouterr().err == "videomoco pretrain: error: --device cuda asked for but CUDA is not available\n"


def _parameters_and_queue(path):
    """What a micro-batched run and a multi-process run must agree on: every parameter of both
    players, the queue, its pointer and ages (not BatchNorm's running statistics, which a rank
    keeps for its own clips while a micro-batched process updates them once per micro-batch)."""
    ckpt = ck.load_checkpoint(path)
    model = VideoMoCo("r3d_18", dim=16, K=32, width=8)
    params = {f"state_dict.{n}" for n, _ in model.named_parameters()} | {
        "state_dict.queue", "state_dict.queue_ptr", "state_dict.queue_age"}
    values = {f"state_dict.{k}": v for k, v in ckpt["state_dict"].items()}
    values |= {f"generator.{k}": v for k, v in ckpt["generator"].items()}
    return {k: v for k, v in values.items() if k in params or k.startswith("generator.")}


def test_micro_batches_match_two_processes(videos, tmp_path):
    """`-b 8 --micro_batch 4` in one process writes the checkpoint of `torchrun --nproc_per_node 2 ... -b 8`:
    2 plain MoCo steps, then 2 adversarial ones. Tolerance 1e-5: the same arithmetic, but the
    gradients of the two halves are summed in another order (an accumulated backward vs gloo's
    all-reduce), a float32 rounding difference of ~1e-7 per step that SGD carries over 4 steps."""
    args = [*TINY, "-b", "8", "--epochs", "4", "--adv_start_epoch", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    # both as subprocesses with one thread each: the same kernels per micro-batch as per rank (a different
    # thread count reorders float sums, and a tie in G's top-k can then drop another frame)
    pretrain = ["-m", "videomoco", "pretrain", str(videos), *args]
    for out, launcher, extra in ((one, [], ["--micro_batch", "4"]),
                                 (two, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], [])):
        cmd = [sys.executable, *launcher, *pretrain, *extra, "--log_dir", str(out / "log"), "--ckp_dir", str(out / "ckp")]
        proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 micro-batch of 4" in proc.stderr  # torchrun, auto: 4 clips per rank fit
    a, b = (_parameters_and_queue(o / "ckp" / "checkpoint_0004.pth.tar") for o in (one, two))
    assert a.keys() == b.keys() and len(a) > 50
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-5, msg=key)
    assert int(a["state_dict.queue_ptr"]) == 4 * 8 % 32 and int(a["state_dict.queue_age"].max()) == 3
    assert [r["loss_g"] == 0 for r in metrics(one)] == [True, True, False, False]
    for r1, r2 in zip(metrics(one), metrics(two)):
        assert r1["loss_d"] == pytest.approx(r2["loss_d"], abs=1e-4)


def test_resume_is_exact_with_micro_batches(videos, tmp_path):
    args = ("--epochs", "2", "--adv_start_epoch", "1", "-j", "2", "--micro_batch", "2")
    reference = tmp_path / "reference"
    assert cli_run(videos, reference, *args) == 0
    resumed = tmp_path / "resumed"
    assert cli_run(videos, resumed, *args, "--max_steps", "3") == 0  # mid-epoch 1, adversarial
    assert cli_run(videos, resumed, *args, "--resume", "auto") == 0
    _assert_same_run(reference, resumed)


def test_authors_command_plans_micro_batches(videos, tmp_path):
    """Their README command with --micro_batch auto (the default) under a budget that holds 3 of the 4 clips
    of a batch: auto splits it in 2 micro-batches of 2 and the step completes."""
    _official_checkpoint(tmp_path / "checkpoint_0100.pth.tar", arch="r2plus1d_18", dim=128, K=65536, epoch=100)

    def train(out, *extra):
        theirs = ["--log_dir", f"{out}/L", "--ckp_dir", f"{out}/C", "-a", "r2plus1d_18", "--lr", "0.005", "-fpc", "32",
                  "-b", "32", "-j", "128", "--epochs", "200", "--schedule", "120", "160", "--dist_url",
                  f"tcp://localhost:{free_port()}", "--multiprocessing_distributed", "--world_size", "1", "--rank", "0",
                  "--resume", "./checkpoint_0100.pth.tar", str(videos)]
        ours = ["--width", "8", "-fpc", "16", "-cs", "64", "-b", "4", "--max_steps", "1", *extra]
        # glibc then maps every allocation of 64 KiB or more on its own and unmaps it on free, so the probe's
        # RSS follows the live tensors: at this tiny size the default heap's reuse varies the fit by more
        # than a clip's 30 MB from one process to the next (at real sizes it is stable, see RESULTS.md)
        env = dict(subprocess_env(), MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *theirs, *ours], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr, json.loads((tmp_path / out / "L" / "memory_plan.json").read_text())

    log, plan = train("free")
    assert "1 micro-batch of 4" in log and plan["micro_batches"] == 1
    from videomoco.engine.memory import MARGIN, StepEstimate

    estimate = StepEstimate(plan["fixed"], plan["per_clip"], plan["per_input_clip"])
    budget = plan["reserve_bytes"] + int(estimate.peak(3, 4) / (1 - MARGIN))
    log, plan = train("capped", "--memory_budget", f"{budget}B")
    assert "2 micro-batches of 2" in log and plan["micro_batches"] == 2, log[-1500:]
    ckpt = ck.load_checkpoint(tmp_path / "capped" / "C" / retention.checkpoint_name(100, step=1))
    assert ckpt["step"] == 1 and ckpt["sampler"]["position"] == 4


def test_a_batch_that_cannot_fit_is_one_line_before_training(videos, tmp_path, capsys):
    assert cli_run(videos, tmp_path, "--memory_budget", "64MB") == 2
    err = [line for line in capsys.readouterr().err.splitlines()  # log records and the index's progress bar aside
           if line.strip() and not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) |probing: +\d+%", line)]
    assert len(err) == 1 and err[0].startswith("videomoco pretrain: error: batch 4 (4 per process): one clip needs ~")
    assert "usable of 64 MiB; to fit, try" in err[0] and "--grad_checkpointing" in err[0]
    assert not (tmp_path / "ckp").exists() and not (tmp_path / "log").exists()  # issue 27: no log dir either


def test_grad_checkpointing_trains_the_same_model(videos, tmp_path):
    # recomputing each residual stage in the backward pass changes memory, not the update (float tolerance:
    # the recomputed forward is the same arithmetic; 1e-5 after 2 adversarial SGD steps)
    args = ("--adv_start_epoch", "0", "--max_steps", "2")
    assert cli_run(videos, tmp_path / "plain", *args) == 0
    assert cli_run(videos, tmp_path / "ckpt", *args, "--grad_checkpointing") == 0
    a, b = (ck.load_checkpoint(tmp_path / o / "ckp" / retention.checkpoint_name(1)) for o in ("plain", "ckpt"))
    for part in ("state_dict", "generator"):
        for key, value in a[part].items():
            torch.testing.assert_close(value, b[part][key], rtol=0, atol=1e-5, msg=f"{part}.{key}")


def test_precision_auto_is_bf16_on_a_native_bf16_gpu_else_fp32(monkeypatch):
    assert pretrain.PretrainConfig().precision == "auto"
    assert pretrain.resolve_precision("auto", torch.device("cpu")) == "fp32"  # the authors' command on CPU
    for native, expected in ((True, "bf16"), (False, "fp32")):  # False: e.g. a V100 (bf16 only emulated)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert pretrain.resolve_precision("auto", torch.device("cuda")) == expected
    assert pretrain.resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert pretrain.resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_loading_an_optimizer_state_keeps_this_runs_fused_choice():
    p = torch.nn.Parameter(torch.randn(3))
    plain = torch.optim.SGD([p], 0.1, momentum=0.9)  # a CPU run's (or an older) checkpoint
    p.grad = torch.ones(3)
    plain.step()
    fused = torch.optim.SGD([p], 0.1, momentum=0.9, fused=True)  # a CUDA run resuming it
    pretrain.load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True and torch.equal(fused.state[p]["momentum_buffer"], torch.ones(3))
    back = torch.optim.SGD([p], 0.1, momentum=0.9)
    pretrain.load_optimizer_state(back, fused.state_dict())
    assert not back.param_groups[0]["fused"]


def test_deterministic_sets_cublas_workspace_unless_set(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # restored (absent or not) at teardown
    pretrain._deterministic_environment(pretrain.PretrainConfig())
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    pretrain._deterministic_environment(pretrain.PretrainConfig(deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    pretrain._deterministic_environment(pretrain.PretrainConfig(deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_nondeterministic_ops_are_probed_for_the_models_modules_on_cuda(monkeypatch):
    from videomoco.models import build_encoder

    def no_kernel(device):
        raise RuntimeError("max_pool3d_with_indices_backward_cuda does not have a deterministic implementation")

    monkeypatch.setitem(pretrain.CUDA_DETERMINISM_PROBES, torch.nn.MaxPool3d, ("MaxPool3d backward (C3D)", no_kernel))
    c3d, r3d = build_encoder("c3d", num_classes=4, width=4), build_encoder("r3d_18", num_classes=4, width=4)
    assert pretrain.nondeterministic_ops(c3d, torch.device("cpu")) == []  # CPU: every op has a deterministic kernel
    assert pretrain.nondeterministic_ops(c3d, torch.device("cuda")) == ["MaxPool3d backward (C3D)"]
    assert pretrain.nondeterministic_ops(r3d, torch.device("cuda")) == []


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18", "c3d"])
def test_deterministic_cuda_step_runs_and_repeats(arch, precision):
    """Under use_deterministic_algorithms(True) (and cuBLAS's workspace set, as --deterministic does before CUDA
    starts), a VideoMoCo step raises for no op except those `nondeterministic_ops` names, and repeats bitwise."""
    from videomoco.method import AdversarialTrainer, FrameDropGenerator

    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
        pytest.skip("CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts (run with CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    device = torch.device("cuda")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            model = VideoMoCo(arch, dim=16, K=32, width=8).to(device)
            generator = FrameDropGenerator().to(device)
            if pretrain.nondeterministic_ops(model, device):
                torch.use_deterministic_algorithms(True, warn_only=True)
            opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9, fused=True)
            opt_g = torch.optim.SGD(generator.parameters(), 0.1, momentum=0.9, fused=True)
            trainer = AdversarialTrainer(model, generator, opt_d, opt_g, amp_dtype=pretrain.AMP_DTYPES[precision])
            im_q, im_k = torch.randn(2, 4, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
            out = trainer.step(im_q, im_k, adversarial=True)
            results.append([out["loss_d"], out["loss_g"], *[p.detach().clone() for p in model.parameters()]])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic = previous[1]


def test_logged_step_time_includes_the_flush_sync(monkeypatch):
    """The flush's host sync waits for the GPU work the steps queued: that wait counts as step time."""
    from types import SimpleNamespace

    from videomoco.engine import loop

    def slow_all_reduce(t):
        time.sleep(0.05)  # stands for the device finishing the queued steps
        return t

    monkeypatch.setattr(loop.du, "all_reduce_mean", slow_all_reduce)
    logged = {}
    logger = SimpleNamespace(scalars=lambda step, m: logged.update(m))
    times = [0.0, 0.1, 8, time.perf_counter()]  # data s, step s, clips, end of the last step
    metrics = loop._flush({"loss_d": torch.tensor(2.0)}, 2, times, epoch=0, step=2, lr=0.1, world_size=1, logger=logger)
    assert metrics["step_time"] >= (0.1 + 0.05) / 2 and metrics["clips_per_s"] <= 8 / 0.15
    assert logged["clips_per_s"] == metrics["clips_per_s"]


def test_a_rollback_or_a_fresh_run_keeps_its_checkpoints_and_sets_older_runs_aside(videos, reference, tmp_path,
                                                                                 caplog):
    # regression: a newer checkpoint in --ckp_dir made retention delete the one just written
    import shutil

    shutil.copytree(reference / "ckp", tmp_path / "ckp")  # checkpoint_0001, checkpoint_0002
    first = tmp_path / "ckp" / retention.checkpoint_name(1)
    assert cli_run(videos, tmp_path, "--epochs", "2", "--resume", str(first), "--max_steps", "3") == 0
    assert [p.name for p in retention.list_checkpoints(tmp_path / "ckp")] == [first.name, retention.checkpoint_name(1, step=3)]
    (aside,) = (tmp_path / "ckp").glob("superseded-*")
    assert [p.name for p in aside.iterdir()] == [retention.checkpoint_name(2)]  # moved, not deleted
    assert any(f"holds 1 checkpoints newer than this run's start (epoch 1, step 2): moved to {aside}/" in r.getMessage()
               for r in caplog.records)
    assert retention.latest_checkpoint(tmp_path / "ckp")[0].name == retention.checkpoint_name(1, step=3)  # --resume auto
    assert cli_run(videos, tmp_path, "--epochs", "1", "--max_steps", "1") == 0  # a fresh run into the same dir
    assert [p.name for p in retention.list_checkpoints(tmp_path / "ckp")] == [retention.checkpoint_name(0, step=1)]
    assert len(list((tmp_path / "ckp").glob("superseded-*/checkpoint_*"))) == 3


def test_nonfinite_weights_are_never_saved(videos, tmp_path, monkeypatch, caplog):
    # regression: `--lr nan --max_steps 1` saved 62 NaN tensors (the loss, computed before the update, is finite)
    from videomoco.method import AdversarialTrainer

    real_step, calls = AdversarialTrainer.step, []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the epoch's last step: its loss is finite, the weights it leaves are not
            with torch.no_grad():
                self.model.encoder_q.fc.weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(AdversarialTrainer, "step", step)
    assert cli_run(videos, tmp_path, "--epochs", "1", "--micro_batch", "4") == 1  # 4: no probe steps
    assert retention.list_checkpoints(tmp_path / "ckp") == []
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["1 tensors of the weights are NaN/Inf at step 2 (epoch 1), e.g. encoder_q.fc.weight: not saved; "
                      "last good checkpoint: none"]


def test_fewer_videos_than_a_batch_names_the_fix_and_clips_per_video_runs(videos, tmp_path, capsys, caplog):
    """8 videos, -b 16: one line with both fixes; --clips_per_video 2 makes 16 clips an epoch, one step. The log
    says when the generator joins, and each epoch's line the run's progress and time left."""
    assert cli_run(videos, tmp_path / "a", "-b", "16", "--moco-k", "32") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("videomoco pretrain: error: ") and "8 videos x 1 clips per video give 8 clips" in err
    assert "lower -b to at most 8, or draw several clips per video per epoch with --clips_per_video 2" in err
    assert not (tmp_path / "a" / "log").exists()  # a failed start leaves no empty TensorBoard run
    caplog.set_level("INFO")
    assert cli_run(videos, tmp_path / "b", "-b", "16", "--moco-k", "32", "--clips_per_video", "2", "--epochs", "2",
                   "--adv_start_epoch", "1", "--micro_batch", "16", "-sbc", "3") == 0
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2]
    log = caplog.text
    # the queue advice agrees with --moco-k >= batch: both shrink (item 2 of issue 26)
    assert "the queue holds at least a batch, so lower both, e.g. -b 3 --moco-k 3 (40% of the videos)" in log
    assert "epochs 1-1: plain MoCo with temporal decay, no generator" in log
    assert "joins at epoch 2 (--adv_start_epoch 1)" in log and "epoch 2: the generator joins" in log
    assert re.search(r"epoch 1/2 step 1 \(G off until 2\): .* this epoch, about \S+ left for the run", log)
    assert re.search(r"epoch 2/2 step 2 \(G on\): .*about 0s left for the run", log)
    config = yaml.safe_load((tmp_path / "b" / "log" / "config.yaml").read_text())
    assert (config["clips_per_video"], config["step_between_clips"]) == (2, 3)


# --- refusals and full disks (issue 27) ---

def _resumable(path, **fields):
    """A checkpoint of the TINY run in our format, as a run writes it (no training needed), with `fields` set."""
    cfg = pretrain.config_from_args({"data": "d", "width": 8, "frame_per_clip": 8, "crop_size": 32, "moco_k": 32,
                                     "moco_dim": 16, "batch_size": 4, "workers": 0, "seed": 0})
    t = pretrain.build_trainer(cfg, torch.device("cpu"))
    state = ck.pretrain_state(dataclasses.asdict(cfg), epoch=1, step=2, batch_in_epoch=0, model=t.model,
                              generator=t.generator, optimizer=t.opt_d, optimizer_g=t.opt_g, scheduler={},
                              sampler={"epoch": 1, "seed": 0})
    torch.save({**state, **fields}, path)
    return state


def _nonfinite(path, key, value):
    sd = _resumable(path)["state_dict"]
    sd[key].view(-1)[0] = value
    torch.save({**_resumable(path), "state_dict": sd}, path)


@pytest.mark.parametrize("make, args, line", [
    (lambda p: _nonfinite(p, "encoder_q.fc.weight", float("nan")), [],
     "checkpoint {ck}: 1 tensors of its weights are NaN/Inf, e.g. encoder_q.fc.weight (a diverged run?); refused"),
    (lambda p: _nonfinite(p, "queue", float("inf")), [], "checkpoint {ck}: 1 tensors of its weights are NaN/Inf, e.g. queue"),
    (lambda p: _official_checkpoint(p) and torch.save({**torch.load(p), "epoch": "ten"}, p), [],
     "checkpoint {ck}: field 'epoch' must be an integer >= 0, got 'ten'; refused"),
    (lambda p: _resumable(p, epoch="x"), [], "checkpoint {ck}: field 'epoch' must be an integer >= 0, got 'x'"),
    (lambda p: _resumable(p, epoch=-5), [], "checkpoint {ck}: field 'epoch' must be an integer >= 0, got -5"),
    (lambda p: _resumable(p, step=None), [], "checkpoint {ck}: field 'step' must be an integer >= 0, got None"),
    (lambda p: _resumable(p, optimizer=[]), [], "checkpoint {ck}: field 'optimizer' must be an optimizer state dict"),
    (lambda p: _resumable(p, epoch=12), ["--epochs", "4"],
     "--resume {ck} has done 12 epochs and --epochs is 4: nothing left to train"),
    (lambda p: _resumable(p), ["-a", "mc3_18"], "checkpoint is r3d_18 (width 8) but the model is mc3_18"),
    (lambda p: p.mkdir(), [], "--resume {ck} is a directory"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), [], "cannot read checkpoint {ck}: truncated or corrupt file"),
    (lambda p: torch.save({"state_dict": {}, "x": np.arange(3)}, p), [], "cannot read checkpoint {ck}: refused to load"),
], ids=["nan-fc", "inf-queue", "authors-epoch-ten", "epoch-x", "epoch-negative", "step-none", "optimizer-list",
        "nothing-left", "other-arch", "directory", "corrupt", "malicious"])
def test_a_refused_resume_is_one_line_before_any_write(videos, tmp_path, capsys, make, args, line):
    # regression: a NaN checkpoint trained and was then named "last good"; 'epoch': 'ten' was a traceback,
    # -5 failed at the first batch, epoch 12 of 4 exited 0 having trained nothing; the log dir was created first
    path = tmp_path / "in" / "c.pth.tar"
    path.parent.mkdir()
    make(path)
    before = tree(tmp_path)
    assert cli_run(videos, tmp_path, "--resume", str(path), *args) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"videomoco pretrain: error: {line.format(ck=path)}"), errors
    assert tree(tmp_path) == before  # no log dir, no checkpoint dir


def test_a_full_checkpoint_disk_is_one_line_naming_the_last_good_checkpoint(videos, tmp_path, capsys, small_fs,
                                                                            monkeypatch):
    # regression: OSError: [Errno 28] then RuntimeError: [enforce fail at inline_container.cc:672]
    size = len(_resumable_bytes(tmp_path))
    disk = small_fs("disk", free=size * 3 // 2)  # room for the first checkpoint, not for the second beside it
    if disk is None:
        disk = tmp_path / "disk"
        enospc(monkeypatch, after=1)
    code = cli.main(["pretrain", str(videos), *TINY, "--epochs", "2", "--micro_batch", "4", "--log_dir",
                     str(tmp_path / "log"), "--ckp_dir", str(disk / "ckp")])
    errors = error_lines(capsys.readouterr().err)
    first, second = (disk / "ckp" / retention.checkpoint_name(e) for e in (1, 2))
    assert code == 1 and len(errors) == 1, errors
    assert re.fullmatch(rf"videomoco pretrain: error: cannot write {re.escape(str(second))}: no space left on device "
                        rf"\(needs about [\d.]+ MB, [\d.]+ \w+ free there\); last good checkpoint: {re.escape(str(first))}",
                        errors[0]), errors[0]
    monkeypatch.undo()
    assert ck.load_checkpoint(first, resume=True)["epoch"] == 1
    assert sorted(p.name for p in (disk / "ckp").iterdir()) == [first.name]  # no temp file left


def test_a_full_log_disk_is_one_line(videos, tmp_path, capsys, small_fs):
    # regression: a 122-line traceback from engine/logger.py
    disk = small_fs("logs", free=0)
    if disk is None:
        pytest.skip("needs a small tmpfs (root)")
    code = cli_run(videos, tmp_path, "--epochs", "1", "--micro_batch", "4", "--log_dir", str(disk / "log"))
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1, errors
    assert re.fullmatch(rf"videomoco pretrain: error: cannot write {re.escape(str(disk))}/log(/\S+)?: no space left "
                        r"on device \(\d+ bytes free there\); last good checkpoint: none", errors[0]), errors[0]
    assert not (tmp_path / "ckp").exists()


def _resumable_bytes(tmp_path):
    _resumable(tmp_path / "size.pth")
    data = (tmp_path / "size.pth").read_bytes()
    (tmp_path / "size.pth").unlink()
    return data
