"""Bucketed, overlapped gradient all-reduce: the same gradients as one all-reduce per tensor, once per step."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port

from videomoco.method.gradients import BucketedReducer, buckets_of


def test_buckets_follow_the_order_and_cap():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 200, 300, 50, 1000)]
    sizes = [[p.numel() for p in b] for b in buckets_of(params, bucket_mb=600 * 4 / 2**20)]
    assert sizes == [[100, 200, 300], [50], [1000]]  # 600 fills the cap exactly; order kept
    assert [len(b) for b in buckets_of(params, bucket_mb=0.0)] == [1] * 5
    mixed = params[:2] + [torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))]
    assert [len(b) for b in buckets_of(mixed, bucket_mb=25)] == [2, 1]  # one dtype per bucket


def _players():
    from videomoco.method import FrameDropGenerator, VideoMoCo

    torch.manual_seed(0)
    return VideoMoCo("r3d_18", dim=16, K=32, width=8, mlp=True), FrameDropGenerator(0.25, hidden=16)


def _trainer(model, gen, bucket_mb, micro_batches):
    from videomoco.method import AdversarialConfig, AdversarialTrainer

    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9)
    opt_g = torch.optim.SGD(gen.parameters(), 0.1)
    return AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(adv_start_epoch=0),
                              micro_batches=micro_batches, bucket_mb=bucket_mb)


def _reduce_worker(rank, world, port, out_dir):
    """Per-tensor vs two bucket sizes, 3 micro-batches, 2 adversarial steps: parameters and calls."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(torch._C._current_autograd_node() is not None)  # True: launched inside the backward
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        model, gen = _players()
        results, grads, counts = {}, {}, {}
        for bucket_mb in (0.0, 0.05, 25.0):
            trainer = _trainer(copy.deepcopy(model), copy.deepcopy(gen), bucket_mb, micro_batches=3)
            torch.manual_seed(100 + rank)  # each rank its own data, the same for every variant
            calls.clear()
            for step in range(2):
                trainer.step(torch.randn(6, 3, 8, 32, 32), torch.randn(6, 3, 8, 32, 32), adversarial=True,
                             shuffle_generator=torch.Generator().manual_seed(step))
                if step == 0:
                    grads[bucket_mb] = [p.grad.clone() for p in trainer.params_d + trainer.params_g]
            counts[bucket_mb] = (len(calls), sum(calls))
            if trainer.reducers:
                counts[bucket_mb] += (len(trainer.reducers["d"].buckets) + len(trainer.reducers["g"].buckets),)
            results[bucket_mb] = {**{f"d.{k}": v for k, v in trainer.model.state_dict().items()},
                                  **{f"g.{k}": v for k, v in trainer.generator.state_dict().items()}}
        torch.save({"results": results, "grads": grads, "counts": counts,
                    "tensors": len(_trainer(model, gen, 0, 1).params_d) + len(list(gen.parameters()))},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_bucketed_reduction_matches_per_tensor_and_runs_once_per_step(tmp_path, world):
    """2 ranks: bitwise, gradients and the parameters after 2 steps (a sum of two numbers has one order).
    4 ranks: gloo may add a bucket's elements in another order than a lone tensor's, so the first step's
    gradients agree to 1e-6 of each tensor's largest (measured: 2e-7); later steps then diverge as any float
    difference does (G's top-k may pick another frame). Every rank holds the same parameters, bitwise."""
    mp.spawn(_reduce_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    r0 = ranks[0]
    for bucket_mb in (0.05, 25.0):
        for got, want in zip(r0["grads"][bucket_mb], r0["grads"][0.0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0 if world == 2 else 1e-6 * want.abs().max().item())
        for key, value in r0["results"][bucket_mb].items():
            if world == 2:
                assert torch.equal(value, r0["results"][0.0][key]), (bucket_mb, key)
            if "running" in key:
                continue  # BN running statistics are each rank's own
            for other in ranks[1:]:
                assert torch.equal(other["results"][bucket_mb][key], value), key
    tensors = r0["tensors"]
    calls, in_backward = r0["counts"][0.0]
    assert calls == 2 * tensors and in_backward == 0  # per tensor, after the backward, once per step
    for bucket_mb in (0.05, 25.0):
        calls, in_backward, buckets = r0["counts"][bucket_mb]
        assert calls == 2 * buckets  # once per step for 3 micro-batches
        assert buckets < tensors
        assert in_backward >= calls - 2 * 2  # all but (at most) each player's last bucket overlap the backward
    assert r0["counts"][0.05][2] > r0["counts"][25.0][2] == 2  # 25 MB: one bucket per player at this size


def test_finish_without_arm_is_an_error(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        reducer = BucketedReducer([torch.nn.Parameter(torch.ones(3))])
        with pytest.raises(RuntimeError, match="arm"):
            reducer.finish()
        p = reducer.buckets[0][0]
        reducer.arm()
        (p * 2).sum().backward()
        reducer.finish()  # one rank: the mean is the gradient itself
        assert torch.equal(p.grad, torch.full((3,), 2.0))
        reducer.remove()
    finally:
        dist.destroy_process_group()


def test_bucket_buffers_are_allocated_once(tmp_path):
    """As DDP's bucket views: the flat buffer of each bucket is allocated at the first step and reused."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
        reducer = BucketedReducer(params, bucket_mb=1e-5)  # 10 bytes: one tensor per bucket
        pointers = []
        for step in range(3):
            for p in params:
                p.grad = None
            reducer.arm()
            (params[0] * (step + 1)).sum().add((params[1] * 3).sum()).backward()
            reducer.finish()
            pointers.append([(id(flat), flat.data_ptr()) for flat in reducer.flat])
            assert torch.equal(params[0].grad, torch.full((3,), float(step + 1)))
            assert torch.equal(params[1].grad, torch.full((2, 2), 3.0))
        assert len(reducer.buckets) == len(pointers[0]) == 2 and pointers[0] == pointers[1] == pointers[2]
        reducer.remove()
    finally:
        dist.destroy_process_group()
