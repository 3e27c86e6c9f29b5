import copy
import io
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from videomoco.method.moco import VideoMoCo, own_key_fraction


class TinyEncoder(nn.Module):
    """A stand-in encoder with the models/ contract and one BatchNorm (so shuffle-BN matters)."""

    def __init__(self, num_classes=16, width=4):
        super().__init__()
        self.feature_dim = width
        self.body = nn.Sequential(nn.Conv3d(3, width, 3, padding=1, bias=False), nn.BatchNorm3d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.body(x).mean(dim=(2, 3, 4))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def tiny_moco(**kw):
    kw = {"dim": 8, "K": 24, "encoder_fn": TinyEncoder, **kw}
    return VideoMoCo(**kw)


def clips(b=4, t=4, size=8, seed=0):
    """Random clips (B, 3, T, size, size), each with its own colour offset so that they differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, t, size, size, generator=g) + 2 * torch.randn(b, 3, 1, 1, 1, generator=g)


def simulate_queue(K, batches):
    """Reference queue bookkeeping: column -> (batch, row) written there, ages, pointer."""
    slot, ages, ptr = [None] * K, [0] * K, 0
    for bi, n in enumerate(batches):
        ages = [a + 1 for a in ages]
        for j in range(n):
            slot[(ptr + j) % K], ages[(ptr + j) % K] = (bi, j), 0
        ptr = (ptr + n) % K
    return slot, ages, ptr


def test_state_dict_layout_matches_official_checkpoint(torchvision_fixtures):
    layout = json.loads((torchvision_fixtures / "videomoco_checkpoint_layout.json").read_text())
    official = [(e["key"].removeprefix("module."), e["shape"])
                for e in layout["moco_netD_full_key_list_example_r3d_18_dim128_K65536_no_mlp"]]
    with torch.device("meta"):  # full size, no memory
        model = VideoMoCo("r3d_18", dim=128, K=65536)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == official[:2] + [("queue_age", [65536])] + official[2:]


def test_mlp_head_keys_match_official(torchvision_fixtures):
    layout = json.loads((torchvision_fixtures / "videomoco_checkpoint_layout.json").read_text())
    spec = layout["moco_netD_per_arch"]["r3d_18_mlp"]
    with torch.device("meta"):
        model = VideoMoCo("r3d_18", dim=128, K=65536, mlp=True)
    sd = model.state_dict()
    assert len(sd) == spec["num_keys"] + 1
    for e in spec["encoder_q_fc_entries"] + spec["encoder_k_fc_entries"]:
        assert list(sd[e["key"].removeprefix("module.")].shape) == e["shape"]


def test_builds_registered_encoder_and_normalises():
    model = VideoMoCo("r3d_18", dim=8, K=16, width=4)
    assert model.encoder_q.fc.out_features == 8
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))
    q = model.encode_query(clips(b=2, size=16))
    assert q.shape == (2, 8)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2))
    assert q.requires_grad


def test_momentum_update_formula():
    model = tiny_moco(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q_before = [p.detach().double() for p in model.encoder_q.parameters()]
    k_before = [p.detach().double() for p in model.encoder_k.parameters()]
    model.encode_keys(clips())
    for pq, pk, pk_new in zip(q_before, k_before, model.encoder_k.parameters()):
        torch.testing.assert_close(pk_new.double(), 0.9 * pk + 0.1 * pq, rtol=1e-6, atol=1e-7)


def test_momentum_update_is_bitwise_the_per_tensor_update():
    """The multi-tensor update does the per-parameter `mul_(m).add_(q, alpha=1 - m)` arithmetic exactly."""
    model = tiny_moco(m=0.99)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    expected = [k.detach().clone().mul_(0.99).add_(q.detach(), alpha=1 - 0.99)
                for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters())]
    model._momentum_update_key_encoder()
    assert all(torch.equal(k, e) for k, e in zip(model.encoder_k.parameters(), expected))


@pytest.mark.parametrize("batch", [4, 5])
def test_enqueue_wraps_around_and_ages(batch):
    model = tiny_moco(K=24)
    keys = [F.normalize(torch.randn(batch, 8), dim=1) for _ in range(7)]
    for k in keys:
        model.enqueue(k)
    slot, ages, ptr = simulate_queue(24, [batch] * len(keys))
    assert int(model.queue_ptr) == ptr
    assert model.queue_age.tolist() == ages
    for col, written in enumerate(slot):
        if written is not None:
            bi, row = written
            assert torch.equal(model.queue[:, col], keys[bi][row])


def test_enqueue_more_than_K_is_an_error():
    with pytest.raises(ValueError, match="cannot enqueue"):
        tiny_moco(K=4).enqueue(torch.randn(5, 8))


def test_forward_uses_ages_before_its_own_enqueue():
    model = tiny_moco(K=24, temporal_decay=0.5, T=0.2)
    for seed in range(3):
        model(clips(seed=seed), clips(seed=seed + 10))
    queue, ages, ptr = model.queue.clone(), model.queue_age.clone(), int(model.queue_ptr)
    im_q = clips(seed=5)
    logits, labels = model(im_q, clips(seed=6))
    k = model.queue[:, ptr:ptr + 4].T  # the keys this step enqueued
    q = model.encode_query(im_q).detach().double()  # train-mode BN: same batch, same output
    expected = torch.empty(4, 25, dtype=torch.float64)
    for i in range(4):
        expected[i, 0] = (q[i] * k[i].double()).sum() / 0.2
        for j in range(24):
            expected[i, 1 + j] = 0.5 ** int(ages[j]) * (q[i] * queue[:, j].double()).sum() / 0.2
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [0, 0, 0, 0]
    assert model.queue_age[ptr:ptr + 4].tolist() == [0] * 4
    assert int(model.queue_age.max()) == int(ages.max()) + 1


def test_decay_one_reproduces_plain_moco_exactly():
    model = tiny_moco(temporal_decay=1.0)
    for seed in range(3):
        model(clips(seed=seed), clips(seed=seed + 10))
    assert int(model.queue_age.max()) > 0
    q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    logits, _ = model.contrastive_logits(q, k)
    plain = torch.cat([torch.einsum("nc,nc->n", q, k).unsqueeze(-1), q @ model.queue], dim=1) / model.T
    assert torch.equal(logits, plain)


def matching_partitions(model, x, keys, group_size):
    """The partitions of the batch into groups of `group_size` whose per-group key forward gives `keys`."""
    found = []
    for first in itertools.combinations(range(x.shape[0]), group_size):
        if 0 not in first:
            continue
        rest = [i for i in range(x.shape[0]) if i not in first]
        expected = torch.empty_like(keys)
        with torch.no_grad():
            for group in (list(first), rest):
                expected[group] = F.normalize(model.encoder_k(x[group]), dim=1)
        if torch.allclose(expected, keys, atol=1e-5):
            found.append(first)
    return found


def test_single_process_shuffle_bn_uses_per_group_statistics():
    model = tiny_moco(shuffle_groups=2)
    x = clips(b=4)
    keys = model.encode_keys(x)
    assert len(matching_partitions(model, x, keys, 2)) == 1
    with torch.no_grad():
        whole_batch = F.normalize(model.encoder_k(x), dim=1)
    assert not torch.allclose(whole_batch, keys, atol=1e-3)


@pytest.mark.parametrize("groups, sizes", [(None, [3, 3]), (1, [6]), (3, [2, 2, 2])])
def test_key_bn_groups_and_their_num_batches_tracked(groups, sizes):
    """--shuffle_groups: the key encoder's BN batches in one process; each group advances num_batches_tracked."""
    model = tiny_moco(shuffle_groups=groups)
    assert model.key_bn_sizes(6) == sizes
    assert model.key_bn_sizes(6, chunks=2) == model.key_bn_sizes(6, distributed=True, chunks=2) == [3, 3]
    model.encode_keys(clips(b=6))
    assert int(model.encoder_k.body[1].num_batches_tracked) == len(sizes)


def test_keys_come_from_the_updated_key_encoder():
    # one shuffle group: the keys are the whole-batch forward of the key encoder *after* its update
    model = tiny_moco(shuffle_groups=1, m=0.5)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    x = clips(b=4)
    with torch.no_grad():
        stale = F.normalize(model.encoder_k(x), dim=1)
    keys = model.encode_keys(x)
    with torch.no_grad():
        torch.testing.assert_close(keys, F.normalize(model.encoder_k(x), dim=1))
    assert not torch.allclose(keys, stale, atol=1e-3)


def test_state_dict_round_trip_keeps_queue_ptr_ages():
    model = tiny_moco(K=24)
    for seed in range(3):
        model(clips(b=5, seed=seed), clips(b=5, seed=seed + 10))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = tiny_moco(K=24)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("queue", "queue_ptr", "queue_age"):
        assert torch.equal(getattr(restored, name), getattr(model, name))
    assert int(restored.queue_ptr) == 15


def test_checkpoint_without_queue_age_loads_as_age_zero():
    model = tiny_moco()
    model.enqueue(torch.randn(4, 8))
    sd = model.state_dict()
    del sd["queue_age"]  # the authors' checkpoints have no ages
    restored = tiny_moco()
    restored.queue_age.fill_(7)
    result = restored.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(restored.queue_age.abs().sum()) == 0
    assert torch.equal(restored.queue, model.queue)


def test_invalid_decay_is_rejected():
    with pytest.raises(ValueError, match="temporal_decay"):
        tiny_moco(temporal_decay=0.0)


def _ddp_worker(rank, world, init_file, model_state):
    import torch.distributed as dist

    torch.manual_seed(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_moco(K=12)
        model.load_state_dict(model_state)
        x_all = clips(b=2 * world, seed=3)
        x = x_all[2 * rank:2 * rank + 2]
        keys = model.encode_keys(x)
        model.enqueue(keys)
        # one queue on every rank, holding every rank's keys in rank order
        queues = [torch.empty_like(model.queue) for _ in range(world)]
        dist.all_gather(queues, model.queue)
        assert all(torch.equal(q, queues[0]) for q in queues)
        all_keys = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(all_keys, keys)
        assert torch.equal(model.queue[:, :2 * world].T, torch.cat(all_keys))
        assert int(model.queue_ptr) == 2 * world
        # the key encoder saw BN statistics of one group of 2 from the global batch of 4
        assert len(matching_partitions(model, x_all, torch.cat(all_keys), 2)) == 1
        # a trainer step on different data per rank leaves both players identical on every rank
        from videomoco.method import AdversarialTrainer, FrameDropGenerator

        torch.manual_seed(0)
        gen = FrameDropGenerator(hidden=8, input_size=8)
        trainer = AdversarialTrainer(model, gen, torch.optim.SGD(model.encoder_q.parameters(), lr=0.1),
                                     torch.optim.SGD(gen.parameters(), lr=0.1))
        trainer.step(x, clips(b=2, seed=10 + rank), adversarial=True)
        flat = torch.cat([p.detach().flatten() for p in [*model.encoder_q.parameters(), *gen.parameters()]])
        flats = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(flats, flat)
        assert torch.equal(flats[0], flats[1])
        dist.barrier()  # neither rank tears gloo down while the other still finishes its last all_gather
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~20 s on 2 cores)
def test_ddp_shuffle_and_shared_queue(tmp_path):
    import torch.multiprocessing as mp

    state = tiny_moco(K=12).state_dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), state), nprocs=2, join=True)


def test_mlp_on_registered_encoder_keeps_key_layout():
    model = VideoMoCo("mc3_18", dim=8, K=16, width=4, mlp=True)
    keys = [k for k in model.state_dict() if k.startswith("encoder_q.fc")]
    assert keys == ["encoder_q.fc.0.weight", "encoder_q.fc.0.bias", "encoder_q.fc.2.weight", "encoder_q.fc.2.bias"]
    assert model.encoder_q.fc[2].out_features == 8
    assert copy.deepcopy(model).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("K, n, clips", [(32, 100, 1), (64, 100, 1), (150, 100, 1), (250, 100, 1), (8, 19, 4),
                                         (16, 19, 8), (4, 50, 2)])
def test_own_key_fraction_matches_a_simulated_queue(K, n, clips):
    """Epochs in a fresh random order of n videos x `clips` items, one key enqueued per sample: how often is a key
    of the query's video queued?"""
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(n * clips) // clips for _ in range(200)])
    last_seen, hits, visits = {}, 0, 0
    for t, video in enumerate(order):
        if video in last_seen and t >= 2 * n * clips:  # skip the first two epochs (queue filling)
            visits += 1
            hits += t - last_seen[video] <= K
        last_seen[video] = t
    assert abs(hits / visits - own_key_fraction(K, n, clips)) < 0.02
    assert own_key_fraction(2 * n, n) == 1.0 and own_key_fraction(0, n) == 0.0


def test_mlp_bn_head_centres_embeddings_over_the_batch():
    """The BN head's output has zero batch mean in every dimension (no direction shared by all clips);
    the linear head's does not. Keys: fc.0 (Linear), fc.1 (BN), fc.3 (the original fc), fc.4 (BN)."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 4, 16, 16)
    for mlp_bn in (False, True):
        model = VideoMoCo("r3d_18", dim=8, K=16, width=4, mlp_bn=mlp_bn)
        mean = model.encoder_q(x).detach().mean(0).abs().max().item()
        assert (mean < 1e-4) == mlp_bn, (mlp_bn, mean)
    keys = [k for k in model.state_dict() if k.startswith("encoder_k.fc.")]
    assert {k.split(".")[2] for k in keys} == {"0", "1", "3", "4"}


def test_micro_batch_keys_use_per_chunk_statistics_of_one_permutation():
    # chunks=2: the key encoder sees two random halves of the batch, as two GPUs would, and the keys
    # come back in the original order; the permutation comes from the generator passed in
    model = tiny_moco(shuffle_groups=1)
    x = clips(b=6)
    keys = model.encode_keys(x, chunks=2, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shuffled = torch.cat([model.encoder_k(x[idx]) for idx in perm.split([3, 3])])
        expected = F.normalize(shuffled[torch.argsort(perm)], dim=1)
    torch.testing.assert_close(keys, expected)
    with torch.no_grad():
        assert not torch.allclose(F.normalize(model.encoder_k(x), dim=1), keys, atol=1e-3)


def test_micro_batch_sizes_are_tensor_split_sizes():
    from videomoco.method.moco import micro_batch_sizes

    for batch, chunks in [(8, 2), (32, 3), (5, 5), (7, 1)]:
        assert micro_batch_sizes(batch, chunks) == [len(c) for c in torch.arange(batch).tensor_split(chunks)]


def _shuffle_worker(rank, world, port, batch):
    """Each rank: keys of both shuffle schemes from one permutation, for 1 and 2 micro-batches."""
    import torch.distributed as dist

    from videomoco.method.moco import concat_all_gather, exchange_clips

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same encoders on every rank
        model = tiny_moco()
        x = clips(b=batch, seed=10 + rank)
        perm = torch.randperm(world * batch, generator=torch.Generator().manual_seed(5))
        gathered = concat_all_gather(x)
        expected = gathered[perm[rank * batch:(rank + 1) * batch]]
        assert torch.equal(exchange_clips(x, perm, rank, world), expected)
        channels_last = x.contiguous(memory_format=torch.channels_last_3d)  # as --channels_last feeds it
        received = exchange_clips(channels_last, perm, rank, world)
        assert torch.equal(received, expected)
        assert received.is_contiguous(memory_format=torch.channels_last_3d)  # the layout is kept
        for chunks in (1, 2):
            keys = {}
            for scheme in ("all_gather", "all_to_all"):
                model.shuffle_bn = scheme
                keys[scheme] = model._encode_keys_shuffled(x, chunks, torch.Generator().manual_seed(7))
            assert keys["all_gather"].shape == (world * batch, 8)
            assert torch.equal(keys["all_gather"], keys["all_to_all"]), (rank, chunks)
            with torch.no_grad():  # and both are shuffle-BN: this rank's keys differ from an unshuffled encoding
                plain = model.encoder_k(x)
            assert not torch.allclose(keys["all_to_all"][rank * batch:(rank + 1) * batch], plain, atol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,batch", [(2, 3), (4, 2)])
def test_all_to_all_shuffle_gives_the_all_gather_keys(world, batch):
    """Uneven splits (3 clips per rank over 2 ranks, 2 over 4): same permutation, identical keys."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_shuffle_worker, args=(world, free_port(), batch), nprocs=world)


def test_unknown_shuffle_scheme_is_refused():
    with pytest.raises(ValueError, match="shuffle_bn"):
        tiny_moco(shuffle_bn="broadcast")


def reference_exponents(K, batches, unit):
    """Float-free reference of each unit's exponents after enqueues of `batches` keys: "step" = enqueues since
    written (`simulate_queue`); "key" = how many keys were written after it, counting the initial random keys
    as written in slot order before the first step."""
    if unit == "step":
        return simulate_queue(K, batches)[1]
    written, ptr, count = list(range(-K, 0)), 0, 0  # slot -> the number of its write
    for n in batches:
        for j in range(n):
            written[(ptr + j) % K], count = count, count + 1
        ptr = (ptr + n) % K
    return [max(written) - w for w in written]


@pytest.mark.parametrize("unit", ["step", "key"])
@pytest.mark.parametrize("batches", [[4] * 7, [5] * 7, [3, 5, 2, 7]])
def test_decay_exponents_follow_their_unit(unit, batches):
    model = tiny_moco(K=24, decay_unit=unit)
    for n in batches:
        model.enqueue(F.normalize(torch.randn(n, 8), dim=1))
    assert model.decay_exponents().tolist() == reference_exponents(24, batches, unit)


@pytest.mark.parametrize("on", ["logit", "exp"])
def test_logits_use_the_key_positions_in_float64(on):
    """The paper's form end to end: t**position on exp(logit / T), against the formula in float64."""
    model = tiny_moco(K=24, temporal_decay=0.9, T=0.2, decay_unit="key", decay_on=on)
    batches = [4, 4, 4, 4, 4, 4, 4]  # 28 keys: wrapped around
    for n in batches:
        model.enqueue(F.normalize(torch.randn(n, 8), dim=1))
    q, k = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    logits, _ = model.contrastive_logits(q, k)
    position = reference_exponents(24, batches, "key")
    queue = model.queue.double()
    expected = torch.empty(3, 25, dtype=torch.float64)
    for i in range(3):
        expected[i, 0] = (q[i].double() * k[i].double()).sum() / 0.2
        for j in range(24):
            logit = (q[i].double() * queue[:, j]).sum() / 0.2
            expected[i, 1 + j] = 0.9 ** position[j] * logit if on == "logit" else logit + position[j] * np.log(0.9)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_key_exponents_do_not_depend_on_the_batch_size():
    """48 keys as 12 x 4, 8 x 6 or 4 x 12: the same key positions; their ages in steps differ by batch."""
    exponents = {}
    for unit, b in itertools.product(("step", "key"), (4, 6, 12)):
        model = tiny_moco(K=24, decay_unit=unit)
        for _ in range(48 // b):
            model.enqueue(F.normalize(torch.randn(b, 8), dim=1))
        exponents[unit, b] = model.decay_exponents().tolist()
    assert exponents["key", 4] == exponents["key", 6] == exponents["key", 12] == list(range(23, -1, -1))
    assert max(exponents["step", 4]) == 5 and max(exponents["step", 6]) == 3 and max(exponents["step", 12]) == 1


def _key_steps(model, steps, batch, micro_batches, rank=0, world=1):
    """`steps` plain MoCo steps of a trainer on `batch` clips per process (this rank's share of a global batch)."""
    from videomoco.method import AdversarialTrainer

    trainer = AdversarialTrainer(model, None, torch.optim.SGD(model.encoder_q.parameters(), lr=0.1), None,
                                 micro_batches=micro_batches)
    for step in range(steps):
        x = clips(b=batch * world, seed=step)[rank * batch:(rank + 1) * batch]
        trainer.step(x, x, adversarial=False)
    return model.decay_exponents(), model.queue_ptr


def _key_worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        exponents, ptr = _key_steps(tiny_moco(K=12, decay_unit="key"), steps=5, batch=2, micro_batches=1,
                                    rank=rank, world=world)
        torch.save({"exponents": exponents, "ptr": ptr}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~15 s on 2 cores)
def test_key_weights_are_the_same_on_one_or_two_processes_and_with_micro_batches(tmp_path):
    import torch.multiprocessing as mp

    from videomoco.method.losses import decay_weights

    mp.spawn(_key_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    one = _key_steps(tiny_moco(K=12, decay_unit="key"), steps=5, batch=4, micro_batches=1)
    torch.manual_seed(0)
    micro = _key_steps(tiny_moco(K=12, decay_unit="key"), steps=5, batch=4, micro_batches=2)
    torch.manual_seed(0)
    halves = _key_steps(tiny_moco(K=12, decay_unit="key"), steps=10, batch=2, micro_batches=1)  # batch size 2
    for exponents, ptr in [(r["exponents"], r["ptr"]) for r in ranks] + [micro, halves]:
        assert int(ptr) == int(one[1]) == 20 % 12
        assert torch.equal(exponents, one[0])
        assert torch.equal(decay_weights(exponents, 0.99999), decay_weights(one[0], 0.99999))


def test_host_tensors_reach_cuda_through_pinned_memory(monkeypatch):
    """moco.to_device: a CPU tensor bound for CUDA is pinned, then copied non_blocking (pageable memory would
    make the copy synchronous); on the same device nothing is copied."""
    from videomoco.method.moco import to_device

    t = torch.arange(4)
    assert to_device(t, "cpu") is t
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((str(device), non_blocking))
            return "on device"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    assert to_device(t, "cuda:0") == "on device"
    assert calls == ["pin", ("cuda:0", True)]
