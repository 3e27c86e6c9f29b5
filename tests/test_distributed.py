"""Two CPU processes with gloo agree after a few adversarial steps; the helpers work without dist."""

import json
import os
import socket
import time
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videomoco.engine import distributed as du
from videomoco.engine.config import PretrainConfig


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    from videomoco.method import AdversarialConfig, AdversarialTrainer, FrameDropGenerator, VideoMoCo

    torch.set_num_threads(1)
    cfg = PretrainConfig(data="x", world_size=2, rank=rank, dist_url=f"tcp://127.0.0.1:{port}", device="cpu")
    info = du.init_distributed(cfg)
    assert (info.rank, info.world_size, du.get_world_size()) == (rank, 2, 2)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = VideoMoCo("r3d_18", dim=16, K=32, width=8)
    gen = FrameDropGenerator(0.25, hidden=16)
    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9)
    opt_g = torch.optim.SGD(gen.parameters(), 0.1)
    trainer = AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(adv_start_epoch=0))
    torch.manual_seed(100 + rank)  # each rank sees different data
    for _ in range(3):
        out = trainer.step(torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32), adversarial=True)
    du.sync_buffers(model)
    mean = du.all_reduce_mean(out["loss_d"])
    torch.save({"model": model.state_dict(), "gen": gen.state_dict(), "mean": mean, "loss": out["loss_d"]},
               f"{out_dir}/rank{rank}.pt")
    du.cleanup()


def test_two_gloo_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key  # parameters, BN stats, one identical queue
    for key, value in r0["gen"].items():
        assert torch.equal(value, r1["gen"][key]), key
    assert not torch.equal(r0["model"]["queue"][:, :4], torch.zeros(16, 4))
    assert int(r0["model"]["queue_ptr"]) == 3 * 4  # 3 steps x 2 ranks x 2 clips enqueued
    assert torch.allclose(r0["mean"], (r0["loss"] + r1["loss"]) / 2)


def test_single_process_helpers():
    assert not dist.is_initialized()
    assert (du.get_rank(), du.get_world_size(), du.is_main_process()) == (0, 1, True)
    du.barrier()
    x = torch.tensor([1.0, 3.0])
    y = du.all_reduce_mean(x)
    assert torch.equal(y, x) and y is not x
    info = du.init_distributed(PretrainConfig(data="x", device="cpu"))
    assert not info.distributed and info.device.type == "cpu" and not dist.is_initialized()


def test_per_process_batch_and_worker_clamp(monkeypatch):
    monkeypatch.setattr(du.os, "cpu_count", lambda: 2)
    batch, workers = du.per_process(PretrainConfig(data="x", batch_size=32, workers=128), world_size=4, nprocs=1)
    assert (batch, workers) == (8, 2)
    with pytest.raises(ValueError, match="not divisible"):
        du.per_process(PretrainConfig(data="x", batch_size=30), world_size=4, nprocs=1)


def test_torchrun_env_is_detected(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert du.launched_by_torchrun() and du.procs_per_node(PretrainConfig(data="x")) == 2
    seen = {}
    du.launch(lambda local_rank, cfg: seen.setdefault("local_rank", local_rank), Namespace())
    assert seen["local_rank"] == 1


# --- faults: fingerprints, ranks that disagree, a collective that times out, a group that cannot be joined ---



def test_fingerprint_is_exact_whatever_the_layout_and_threads():
    x = torch.randn(1000, 333, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = du.fingerprint([x, torch.arange(5), torch.tensor([True, False])])
        torch.set_num_threads(2)
        two = du.fingerprint([x.t().contiguous().t(), torch.arange(5), torch.tensor([True, False])])  # other strides
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (3, 2) and one.dtype == torch.int64 and torch.equal(one, two)
    ulp, swapped = x.clone(), x.clone()
    ulp[3, 4] = torch.nextafter(ulp[3, 4], torch.tensor(float("inf")))  # the smallest change of one element
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]  # the same sum of bits, elsewhere
    rows = du.fingerprint([x, ulp, swapped])
    assert not torch.equal(rows[0], rows[1]) and rows[0, 0] == rows[2, 0] and rows[0, 1] != rows[2, 1]


def _agree_worker(rank, port, out_dir):
    from videomoco.method import VideoMoCo

    torch.set_num_threads(1)
    du.init_distributed(PretrainConfig(data="x", world_size=2, rank=rank, dist_url=f"tcp://127.0.0.1:{port}",
                                       device="cpu"))
    torch.manual_seed(0)
    model = VideoMoCo("r3d_18", dim=16, K=32, width=8)
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.startswith("queue")]
    result = {"agree": du.ranks_agree(named, "at step 0")}
    if rank == 1:  # one ulp of one weight, and the queue pointer
        with torch.no_grad():
            w = model.encoder_q.layer1[1].conv1[1].weight
            w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(float("inf")))
            model.queue_ptr += 1
    try:
        du.ranks_agree(named, "at step 7 (not saved)")
    except du.RanksDisagree as e:
        result["error"] = str(e)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    du.cleanup()


def test_ranks_agree_or_name_the_first_tensor_that_differs(tmp_path):
    mp.spawn(_agree_worker, args=(free_port(), tmp_path), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["agree"] for r in results] == [127, 127]  # 124 parameters, the queue, its pointer and ages
    for rank, result in enumerate(results):  # both ranks stop, with the same line
        assert result["error"] == (f"rank {rank}: the ranks disagree at step 7 (not saved): rank 1 holds another "
                                   "encoder_q.layer1.1.conv1.1.weight than rank 0 (2 of 127 tensors differ)")


def _stuck_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    info = du.init_distributed(PretrainConfig(data="x", world_size=2, rank=rank, dist_url=f"tcp://127.0.0.1:{port}",
                                              device="cpu", dist_timeout=2))
    info.progress.set("waiting for data", 3)
    if rank == 1:  # a stuck loader, until rank 0 (which hosts the store) has written what it saw
        deadline = time.monotonic() + 120
        while not (out_dir / "rank0.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    info.progress.set("computing", 3)
    try:
        dist.all_reduce(torch.ones(1))
        line = "no error"
    except RuntimeError as e:
        line = du.collective_error_line(e, info, 2) if du.is_collective_failure(e) else f"not a collective failure: {e}"
    (out_dir / "rank0.txt").write_text(line)
    os._exit(0)


def test_a_collective_that_times_out_names_the_rank_behind(tmp_path):
    start = time.monotonic()
    mp.spawn(_stuck_worker, args=(free_port(), tmp_path), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text() == (
        "rank 0: a collective waited more than 2 s (--dist_timeout) at step 3 (computing); "
        "rank 1 is behind, at step 3 (waiting for data)")
    assert time.monotonic() - start < 60


def test_what_counts_as_a_collective_failure_and_its_reason():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.0.0.2]:3121. This is typically caused by a remote worker crashing.")
    assert du.is_collective_failure(gloo) and du.is_collective_failure(dist.DistBackendError("NCCL error"))
    assert not du.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert du._reason(gloo) == "Connection closed by peer [10.0.0.2]:3121"


def test_a_process_group_that_cannot_be_joined_is_one_line(monkeypatch):
    port = free_port()  # nobody listens: rank 1 waits --dist_timeout for rank 0's store
    cfg = PretrainConfig(data="x", world_size=2, rank=1, dist_url=f"tcp://127.0.0.1:{port}", device="cpu",
                         dist_timeout=1)
    with pytest.raises(du.DistributedFailure) as e:
        du.init_distributed(cfg)
    assert str(e.value).startswith(f"rank 1: cannot join the process group of 2 (tcp://127.0.0.1:{port}): ")
    assert "timed out" in str(e.value) and "\n" not in str(e.value) and not dist.is_initialized()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's second attempt, its store shared
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(du.DistributedFailure, match="run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1$"):
        du.init_distributed(cfg)


def test_the_line_names_the_ranks_behind_else_those_elsewhere():
    me = du.Progress(None, rank=0, world_size=5)
    for phase in ("starting", "waiting for data", "computing"):
        me.set(phase, None if phase == "starting" else 7)  # count 3
    behind = {1: (2, 7, "waiting for data"), 2: (3, 7, "computing"), 3: (2, 7, "waiting for data")}
    assert du._others(me, behind) == ("2 ranks are behind: rank 1 at step 7 (waiting for data), rank 3 at step 7 "
                                      "(waiting for data) (1 ranks never reported)")
    writing = {1: (3, 7, "writing checkpoint_0001.pth.tar"), 2: (3, 7, "computing"), 3: (3, 7, "computing"),
               4: (3, 7, "computing")}
    assert du._others(me, writing) == "none is behind: rank 1 at step 7 (writing checkpoint_0001.pth.tar)"
    assert du._others(me, {r: (3, 7, "computing") for r in range(5)}) == "the other ranks are at step 7 (computing) too"
    assert du._others(me, {}) == "the other ranks' progress is unknown (the store is unreachable)"


def test_progress_reaches_the_store_from_a_writer_thread():
    """A writer thread sends the newest record (earlier ones it had not sent yet are skipped); `set` waits for it
    on a responsive store, so a rank killed right after has told the others where it was, and with a blocked
    store it waits `FLUSH_S` once, not at every phase."""
    import threading

    class FastStore:
        def __init__(self):
            self.writes = []

        def set(self, key, value):
            self.writes.append(value)

    fast = FastStore()
    progress = du.Progress(fast, rank=1, world_size=2)
    for step in range(1, 21):
        progress.set("waiting for data", step)
        assert fast.writes[-1] == f"{step} {step} waiting for data"  # already in the store when `set` returns

    class SlowStore:
        def __init__(self):
            self.writes, self.release = [], threading.Event()

        def set(self, key, value):
            self.release.wait(10)
            self.writes.append((threading.current_thread().name, key, value))

    store = SlowStore()
    progress = du.Progress(store, rank=3, world_size=4)
    start = time.monotonic()
    for step in range(1, 51):
        progress.set("computing", step)
    assert time.monotonic() - start < 1.0 and not store.writes  # one FLUSH_S wait, then none
    store.release.set()
    deadline = time.monotonic() + 10
    while (not store.writes or store.writes[-1][2] != "50 50 computing") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.writes[-1] == ("videomoco-progress", "videomoco/progress/3", "50 50 computing")
    assert len(store.writes) < 50  # coalesced


@pytest.mark.slow
def test_a_batch_the_world_does_not_divide_is_one_line_on_each_rank_before_any_group_forms(tmp_path):
    """-b 7 on 2 ranks, launched with torchrun's environment (without its agent): each rank says so in one line and
    exits 2 at once (no rank waits for the other: no process group forms) and nothing is written."""
    import subprocess
    import sys

    from conftest import REPO, error_lines

    (tmp_path / "data").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "videomoco", "pretrain", "data", "-b", "7", "--moco-k", "16", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 2, output
        assert error_lines(output) == ["videomoco pretrain: error: --batch_size 7 (the total over all processes) is not "
                                       "divisible by the world size 2 (torchrun's WORLD_SIZE); use a multiple of 2"]
    assert os.listdir(tmp_path) == ["data"]
