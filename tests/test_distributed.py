"""Two CPU processes with gloo agree after a few adversarial steps; the helpers work without dist."""

import socket
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
