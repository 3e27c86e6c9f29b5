"""Faults of multi-process pretraining, 2 CPU processes with gloo: a rank SIGKILLed mid-step, rank 0 killed while
writing a checkpoint, a peer's death seen through torchrun's SIGTERM, a stuck data loader, two torchrun "nodes".

Faults are injected without hooks in videomoco: a `sitecustomize.py` first on the workers' PYTHONPATH patches torch
in the first attempt of the ranks that `FAULTS` names. Same tiny run as tests/test_pretrain.py: 8 videos, batch 4
over 2 ranks, 2 steps an epoch, 3 epochs, a checkpoint every step.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from videomoco.data.encode import write_video
from videomoco.data.index import open_index
from videomoco.engine import checkpoint as ck
from videomoco.engine import retention
from videomoco.method import FrameDropGenerator, VideoMoCo

sys.path.insert(0, str(Path(__file__).parent))
from conftest import moving_square_frames  # noqa: E402
from test_pretrain import TINY, free_port, subprocess_env  # noqa: E402

SITECUSTOMIZE = '''
"""FAULTS="RANK:KIND:N,...": in a worker's first attempt, rank RANK's N-th call of what KIND names fails."""
import os


def _install(kind, at):
    import io, json, signal, time
    import torch
    from torch.utils.data import dataloader

    calls = [0]

    def due():
        calls[0] += 1
        return calls[0] == at

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "kill_in_backward":  # SIGKILL in the N-th backward (D's or G's)
        real_backward = torch.autograd.backward

        def backward(*args, **kwargs):
            if due():
                die()
            return real_backward(*args, **kwargs)

        torch.autograd.backward = backward
    elif kind == "kill_while_saving":  # the N-th checkpoint write: half its bytes in the temp file, then SIGKILL
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            path = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
            if not path.endswith(".tmp") or not due():
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            with open(os.environ["FAULT_LOG"], "w") as log:
                json.dump({"tmp": path, "written": len(data) // 2, "size": len(data)}, log)
            die()

        torch.save = save
    else:  # the N-th batch of a DataLoader: SIGKILL, sleep forever (a stuck loader) or 5 s (a slow one)
        real_next = dataloader._BaseDataLoaderIter.__next__

        def next_batch(self):
            if due():
                if kind == "kill_in_data":
                    die()
                while kind == "hang_in_data":
                    time.sleep(3600)
                if kind == "slow_data":
                    time.sleep(5)
            return real_next(self)

        dataloader._BaseDataLoaderIter.__next__ = next_batch


if os.environ.get("FAULTS") and "RANK" in os.environ and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    for spec in os.environ["FAULTS"].split(","):
        rank, kind, at = spec.split(":")
        if rank == os.environ["RANK"]:
            _install(kind, int(at))
'''

RUN = [*TINY, "--epochs", "3", "--adv_start_epoch", "1", "--micro_batch", "2", "--save_every_steps", "1",
       "--resume", "auto"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def fault_env(tmp_path, faults=""):
    """The workers' environment: the fault injector first on PYTHONPATH, one thread each, and (as the README says
    for --max_restarts) a fresh store for each attempt of torchrun."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = subprocess_env()
    env.update(PYTHONPATH=f"{inject}{os.pathsep}{env['PYTHONPATH']}", FAULTS=faults,
               FAULT_LOG=str(tmp_path / "fault.json"), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return env


def run_all(commands, envs, timeout):
    """Run `commands` at once (with `envs`), each in its own process group -> (return codes, outputs, seconds).
    Whatever is left (a timeout) is killed, group by group."""
    start = time.monotonic()
    logs = [tempfile.TemporaryFile("w+") for _ in commands]  # not pipes: a full one would block its process
    procs = [subprocess.Popen(c, env=e, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, e, log in zip(commands, envs, logs)]
    try:
        codes = [p.wait(timeout=max(1.0, start + timeout - time.monotonic())) for p in procs]
        seconds = time.monotonic() - start
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().replace("\r", "\n"))
        return codes, outputs, seconds
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def torchrun(videos, out, env, flags=(), pretrain_flags=(), timeout=300):
    """`torchrun --nproc_per_node 2 [flags] -m videomoco pretrain ...` -> (return code, output, seconds)."""
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
           *flags, "-m", "videomoco", "pretrain", str(videos), *RUN, *pretrain_flags, "--log_dir", str(out / "log"),
           "--ckp_dir", str(out / "ckp")]
    (code,), (output,), seconds = run_all([cmd], [env], timeout)
    return code, output, seconds


def errors(output):
    return [line[line.index("videomoco pretrain: error: "):] for line in output.splitlines()
            if "videomoco pretrain: error: " in line]


def replicated_count():
    """The tensors `ranks_agree` compares: the parameters of D and G, the queue, its pointer and ages."""
    model, generator = VideoMoCo("r3d_18", dim=16, K=32, width=8), FrameDropGenerator()
    return len(list(model.parameters())) + 3 + len(list(generator.parameters()))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i in range(8):
        write_video(root / f"v{i}.mp4", moving_square_frames(16, 40, seed=i), fps=25, codec="h264")
    open_index(root)  # indexed once here, not by every rank of the first run at once
    return root


@pytest.fixture(scope="module")
def uninterrupted(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output, seconds = torchrun(videos, out, fault_env(out))
    assert code == 0, output[-3000:]
    return out


def assert_same_end(a, b):
    """The same checkpoints at the end, the last one bitwise the same (D and G, the queue, BN statistics)."""
    names = [p.name for p in retention.list_checkpoints(a / "ckp")]
    assert names == [p.name for p in retention.list_checkpoints(b / "ckp")] == [retention.checkpoint_name(e) for e in (1, 2, 3)]
    last = [ck.load_checkpoint(o / "ckp" / names[-1]) for o in (a, b)]
    assert last[0]["step"] == last[1]["step"] == 6
    for part in ("state_dict", "generator"):
        for key, value in last[0][part].items():
            assert torch.equal(value, last[1][part][key]), f"{part}.{key}"
    assert not list((b / "ckp").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("fault, resumed, failure", [
    # rank 1 dies in step 4's first backward; rank 0's collective fails at once
    ("1:kill_in_backward:5", retention.checkpoint_name(1, step=3),
     r"rank 0: a collective failed at step 4 \(computing\) \(.*by peer"),
    # rank 0 dies writing the checkpoint of step 3, half of it in the temp file; rank 1 waits at the barrier
    ("0:kill_while_saving:3", retention.checkpoint_name(1),
     r"rank 1: a collective failed at step 3 \(waiting for rank 0 to write\) \(.*by peer"),
    # rank 1 dies fetching step 4's batch while rank 0 takes 5 s over its own: torchrun's SIGTERM reaches rank 0
    # first, which finds out at its next collective
    ("1:kill_in_data:4,0:slow_data:4", retention.checkpoint_name(1, step=3),
     r"rank 0: a collective failed at step 4 \(computing\) \(.*by peer.*; rank 1 is behind, "
     r"at step 4 \(waiting for data\)"),
], ids=["rank-killed-mid-step", "rank0-killed-writing", "sigterm-after-peer-died"])
def test_torchrun_restarts_from_the_newest_intact_checkpoint(videos, uninterrupted, tmp_path, fault, resumed, failure):
    code, output, seconds = torchrun(videos, tmp_path, fault_env(tmp_path, fault), ["--max_restarts", "1"])
    assert code == 0, output[-3000:]
    lines = errors(output)
    # the survivor says why in one line, unless torchrun's agent ends it before its collective notices the dead
    # peer (a race the agent can win on a loaded machine when the survivor is waiting at a barrier)
    assert len(lines) <= 1 and all(re.search(failure, line) for line in lines), lines or output[-3000:]
    if "kill_while_saving" not in fault:
        assert lines, output[-3000:]
    assert re.findall(r"INFO resumed from (\S+)", output) == [str(tmp_path / "ckp" / resumed)]
    assert "ranks agree on" in output.split("INFO resumed from")[1]  # the restarted group starts alike
    if "kill_while_saving" in fault:
        killed = json.loads((tmp_path / "fault.json").read_text())
        assert 0 < killed["written"] < killed["size"] and ".checkpoint_0001_step00000003.pth.tar." in killed["tmp"]
        assert not Path(killed["tmp"]).exists() and "removed 1 temp files of killed checkpoint writes" in output
    if "slow_data" in fault:
        assert "received SIGTERM" in output  # set the stop flag; nothing was saved from the broken group
    assert_same_end(uninterrupted, tmp_path)
    print(f"{fault}: {seconds:.1f} s")


def test_a_stuck_rank_is_named_by_the_one_that_times_out(videos, tmp_path):
    """Rank 1's loader never returns step 3's batch: rank 0 gives up after --dist_timeout with one line naming
    rank 1 and where it is, writes nothing more, and exits 1. Launched like torchrun (env://) without its agent,
    which would wait 30 s before it SIGKILLs the stuck rank (test_torchrun_ends_a_stuck_run). 10 s: also the
    time a rank may start after the other on a busy machine."""
    port, env = free_port(), fault_env(tmp_path, "1:hang_in_data:3")
    cmd = [sys.executable, "-m", "videomoco", "pretrain", str(videos), *RUN, "--dist_timeout", "10",
           "--log_dir", str(tmp_path / "log"), "--ckp_dir", str(tmp_path / "ckp")]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for r in range(2)]
    try:
        output = procs[0].communicate(timeout=240)[0].replace("\r", "\n")
        assert procs[1].poll() is None  # still stuck
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode == 1, output[-3000:]
    assert errors(output) == ["videomoco pretrain: error: rank 0: a collective waited more than 10 s (--dist_timeout) "
                              "at step 3 (computing); rank 1 is behind, at step 3 (waiting for data)"]
    assert "Traceback" not in output
    assert [p.name for p in retention.list_checkpoints(tmp_path / "ckp")] == [retention.checkpoint_name(1)]  # nothing after step 2
    assert retention.latest_checkpoint(tmp_path / "ckp")[1]["step"] == 2


@pytest.mark.slow
def test_torchrun_ends_a_stuck_run(videos, tmp_path):
    """The same stuck rank under torchrun (no restarts): rank 0 exits 1 after --dist_timeout, torchrun SIGTERMs the
    stuck rank, which does not return to Python, and SIGKILLs it 30 s later; torchrun exits 1."""
    code, output, seconds = torchrun(videos, tmp_path, fault_env(tmp_path, "1:hang_in_data:3"),
                                     pretrain_flags=["--dist_timeout", "5"], timeout=240)
    assert code == 1
    assert errors(output) == ["videomoco pretrain: error: rank 0: a collective waited more than 5 s (--dist_timeout) "
                              "at step 3 (computing); rank 1 is behind, at step 3 (waiting for data)"]
    assert seconds < 5 + 30 + 60, seconds  # the timeout, torchrun's grace before SIGKILL, start-up
    print(f"stuck run ended in {seconds:.1f} s")


def test_two_torchrun_nodes_agree(videos, tmp_path):
    """Two one-process torchrun "nodes" meet at a c10d rendezvous on 127.0.0.1, train 3 epochs and agree on every
    parameter and the queue at each checkpoint."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test{os.getpid()}"
    commands = [[*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 endpoint, "--rdzv_id", run_id, "-m", "videomoco", "pretrain", str(videos), *RUN,
                 "--log_dir", str(tmp_path / f"log{node}"), "--ckp_dir", str(tmp_path / "ckp")] for node in range(2)]
    env = fault_env(tmp_path)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")  # torchrun's default: its agents host the store
    codes, outputs, seconds = run_all(commands, [env, env], timeout=300)
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    output = "".join(outputs)
    n = replicated_count()
    assert output.count(f"(ranks agree on {n} tensors)") == 6  # every checkpoint: 3 epochs, 3 mid-epoch steps
    assert f"ranks agree on {n} tensors at the start (step 0)" in output
    ckpt = ck.load_checkpoint(tmp_path / "ckp" / retention.checkpoint_name(3))
    assert ckpt["step"] == 6 and int(ckpt["state_dict"]["queue_ptr"]) == 6 * 4 % 32
    print(f"two nodes: {seconds:.1f} s")
