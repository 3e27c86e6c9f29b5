import copy

import pytest
import torch
from test_moco import TinyEncoder, clips, simulate_queue

from videomoco.engine.config import _FLAGS, PretrainConfig
from videomoco.method.adversarial import G_GRADS, G_LOSSES, AdversarialConfig, AdversarialTrainer
from videomoco.method.generator import FrameDropGenerator
from videomoco.method.losses import contrastive_loss, decayed_logits, feature_l1
from videomoco.method.moco import VideoMoCo

METRICS = {"loss_d", "loss_g", "acc1", "acc5", "drop_fraction", "queue_age_mean", "queue_age_max"}


def make_players(seed=0, temporal_decay=0.99, K=24):
    torch.manual_seed(seed)
    model = VideoMoCo(dim=8, K=K, temporal_decay=temporal_decay, encoder_fn=TinyEncoder)
    gen = FrameDropGenerator(hidden=16, input_size=8)
    return model, gen


def make_trainer(model, gen, lr_d=0.1, lr_g=0.1, momentum_d=0.9, weight_decay=0.0, scalers=None, **cfg):
    opt_d = torch.optim.SGD(model.parameters(), lr=lr_d, momentum=momentum_d, weight_decay=weight_decay)
    opt_g = torch.optim.SGD(gen.parameters(), lr=lr_g, weight_decay=weight_decay)
    return AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(**cfg), **(scalers or {}))


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def same(before, module):
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_step_returns_detached_scalars():
    model, gen = make_players()
    trainer = make_trainer(model, gen)
    out = trainer.step(clips(), clips(seed=1), adversarial=True)
    assert set(out) == METRICS
    for name, value in out.items():
        assert value.dim() == 0 and not value.requires_grad, name
    assert out["loss_g"] < 0  # G maximises the feature distance
    torch.testing.assert_close(out["drop_fraction"], torch.tensor(round(0.25 * 4) / 4))


def test_generator_off_with_no_decay_is_plain_moco():
    model, gen = make_players(temporal_decay=1.0)
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, gen)
    gen.register_forward_hook(lambda *args: pytest.fail("G ran with adversarial=False"))
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        im_q, im_k = clips(seed=seed), clips(seed=seed + 10)
        torch.manual_seed(seed)  # same shuffle-BN permutation in both
        out = trainer.step(im_q, im_k, adversarial=False)
        torch.manual_seed(seed)
        logits, labels = reference(im_q, im_k)  # the authors' forward: logits + enqueue
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()
        assert torch.equal(out["loss_d"], loss.detach())
        assert out["loss_g"] == 0 and out["drop_fraction"] == 0
    assert torch.equal(model.queue, reference.queue)
    assert torch.equal(model.queue_age, reference.queue_age)


def test_queue_metrics_follow_the_ages():
    model, gen = make_players(K=24)
    trainer = make_trainer(model, gen)
    for seed in range(4):
        out = trainer.step(clips(b=5, seed=seed), clips(b=5, seed=seed + 10), adversarial=seed % 2 == 1)
    _, ages, ptr = simulate_queue(24, [5] * 4)
    assert int(model.queue_ptr) == ptr
    assert out["queue_age_max"] == max(ages)
    torch.testing.assert_close(out["queue_age_mean"], torch.tensor(sum(ages) / 24))


def test_each_d_step_lowers_the_loss_it_was_given():
    # A fixed batch fills the queue with copies of its own keys, so the loss across steps is not
    # monotone; what must hold is that every step lowers the loss of its own logits.
    model, gen = make_players()
    trainer = AdversarialTrainer(model, gen, torch.optim.SGD(model.encoder_q.parameters(), lr=5e-3), None)
    im_q = clips(seed=0)
    im_k = im_q + 0.3 * clips(seed=1)  # a noisy view of the same clips
    for _ in range(4):
        queue, ages, ptr = model.queue.clone(), model.queue_age.clone(), int(model.queue_ptr)
        out = trainer.step(im_q, im_k, adversarial=False)
        k = model.queue[:, [(ptr + i) % model.K for i in range(4)]].T  # this step's keys
        with torch.no_grad():
            q = model.encode_query(im_q)
        after = contrastive_loss(decayed_logits(q, k, queue, ages, model.temporal_decay, model.T))
        assert after < out["loss_d"]


def test_g_step_does_not_move_d_and_d_step_does_not_move_g():
    model, gen = make_players()
    trainer = make_trainer(model, gen, lr_d=0.0)
    d_before, g_before = snapshot(model.encoder_q), snapshot(gen)
    trainer.step(clips(), clips(seed=1), adversarial=True)
    assert same(d_before, model.encoder_q) and not same(g_before, gen)
    assert gen.score.weight.grad.abs().sum() > 0 and gen.features[0].weight.grad.abs().sum() > 0

    model, gen = make_players()
    trainer = make_trainer(model, gen, lr_g=0.0)
    d_before, g_before = snapshot(model.encoder_q), snapshot(gen)
    trainer.step(clips(), clips(seed=1), adversarial=True)
    assert not same(d_before, model.encoder_q) and same(g_before, gen)


def run_one_step(**cfg):
    model, gen = make_players()
    trainer = make_trainer(model, gen, **cfg)
    torch.manual_seed(1)
    trainer.step(clips(), clips(seed=1), adversarial=True)
    return snapshot(model.encoder_q), snapshot(gen)


def test_d_update_ignores_g_loss_and_g_update_ignores_d_loss():
    d_small, g_small = run_one_step(g_loss_weight=1.0)
    d_large, g_large = run_one_step(g_loss_weight=1e4)
    assert all(torch.equal(a, b) for a, b in zip(d_small, d_large))
    assert not all(torch.equal(a, b) for a, b in zip(g_small, g_large))

    d_fake, g_fake = run_one_step(real_query_loss=False)
    d_both, g_both = run_one_step(real_query_loss=True)
    assert all(torch.equal(a, b) for a, b in zip(g_fake, g_both))
    assert not all(torch.equal(a, b) for a, b in zip(d_fake, d_both))


def reference_gradients(model, gen, im_q, im_k, seed):
    """One adversarial step's losses recomputed from scratch: (dL_G/dG, dL_D/dG, dL_D/dD), D = encoder_q."""
    torch.manual_seed(seed)  # the trainer's shuffle-BN permutation
    k = model.encode_keys(im_k)
    dropped, _ = gen(im_q)
    with torch.no_grad():
        q_real = model.encode_query(im_q)
    q = model.encode_query(dropped)
    loss_d = contrastive_loss(model.contrastive_logits(q, k)[0])
    loss_g = -100.0 * feature_l1(q, q_real)
    params_g, params_d = list(gen.parameters()), list(model.encoder_q.parameters())
    g_from_g = torch.autograd.grad(loss_g, params_g, retain_graph=True)
    from_d = torch.autograd.grad(loss_d, params_g + params_d)
    return g_from_g, from_d[:len(params_g)], from_d[len(params_g):]


def test_g_grad_authors_also_descends_on_d_loss():
    # plain SGD: p <- p - lr (grad + wd p). "own": G's grad is dL_G; "authors": dL_G + dL_D (their loop
    # zeroes G's gradients before loss_g.backward() only); D's update is dL_D in both
    lr, wd = 0.1, 0.01
    im_q, im_k = clips(), clips(seed=1)
    model0, gen0 = make_players()
    g_from_g, g_from_d, d_from_d = reference_gradients(copy.deepcopy(model0), copy.deepcopy(gen0), im_q, im_k, 1)
    assert all(g.abs().sum() > 0 for g in g_from_d)  # loss_D does reach every parameter of G
    after = {}
    for g_grad in G_GRADS:
        model, gen = copy.deepcopy(model0), copy.deepcopy(gen0)
        trainer = make_trainer(model, gen, lr_d=lr, lr_g=lr, momentum_d=0.0, weight_decay=wd, g_grad=g_grad)
        torch.manual_seed(1)
        trainer.step(im_q, im_k, adversarial=True)
        after[g_grad] = snapshot(model.encoder_q), snapshot(gen)
    for p, own, authors, dg, dd in zip(gen0.parameters(), after["own"][1], after["authors"][1], g_from_g, g_from_d):
        torch.testing.assert_close(own, p - lr * (dg + wd * p))
        torch.testing.assert_close(authors, p - lr * (dg + dd + wd * p))
    for p, own, authors, dd in zip(model0.encoder_q.parameters(), after["own"][0], after["authors"][0], d_from_d):
        assert torch.equal(own, authors)
        torch.testing.assert_close(own, p - lr * (dd + wd * p))


def test_g_grad_authors_keeps_g_gradient_under_g_scaler():
    # loss_D's share of G's gradient is scaled by G's GradScaler, not D's: the scales must not matter
    runs = []
    for scale_d, scale_g in ((None, None), (2.0**10, 2.0**3)):
        model, gen = make_players()
        scalers = {}
        if scale_d:
            scalers = {"scaler_d": torch.amp.GradScaler("cpu", init_scale=scale_d),
                       "scaler_g": torch.amp.GradScaler("cpu", init_scale=scale_g)}
        trainer = make_trainer(model, gen, scalers=scalers, g_grad="authors")
        torch.manual_seed(1)
        trainer.step(clips(), clips(seed=1), adversarial=True)
        runs.append((snapshot(model.encoder_q), snapshot(gen)))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(a, b)


def test_query_encoder_sees_the_real_query_first():
    # the authors' order (q_real, then the dropped query): BN running statistics after a step equal theirs
    model, gen = make_players()
    reference, reverse, ref_gen = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(gen)
    im_q = clips()
    make_trainer(model, gen).step(im_q, clips(seed=1), adversarial=True)
    with torch.no_grad():
        dropped, _ = ref_gen(im_q)
        reference.encode_query(im_q), reference.encode_query(dropped)
        reverse.encode_query(dropped), reverse.encode_query(im_q)
    ours, theirs, swapped = (dict(m.encoder_q.named_buffers()) for m in (model, reference, reverse))
    for name in ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"):
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    assert not torch.allclose(swapped["body.1.running_var"], theirs["body.1.running_var"])


def test_pretrain_flags_offer_the_trainers_choices():
    choices = {dest: kwargs.get("choices") for _, dest, _, kwargs in _FLAGS}  # the trainer's own constants
    assert choices["g_grad"] is G_GRADS and choices["g_loss"] is G_LOSSES
    assert PretrainConfig().g_grad == AdversarialConfig().g_grad == "own"


def test_contrastive_g_loss_is_minus_d_loss():
    model, gen = make_players()
    trainer = make_trainer(model, gen, g_loss="contrastive")
    out = trainer.step(clips(), clips(seed=1), adversarial=True)
    torch.testing.assert_close(out["loss_g"], -out["loss_d"])


def test_real_query_loss_adds_the_real_query_term():
    model, gen = make_players()
    ref_model, ref_gen = copy.deepcopy(model), copy.deepcopy(gen)
    trainer = make_trainer(model, gen, real_query_loss=True)
    im_q, im_k = clips(), clips(seed=1)
    torch.manual_seed(3)
    out = trainer.step(im_q, im_k, adversarial=True)
    torch.manual_seed(3)  # same shuffle-BN permutation for the keys
    k = ref_model.encode_keys(im_k)
    dropped, _ = ref_gen(im_q)
    expected = sum(contrastive_loss(ref_model.contrastive_logits(ref_model.encode_query(x), k)[0])
                   for x in (dropped, im_q))
    torch.testing.assert_close(out["loss_d"], expected.detach())


def test_unknown_g_loss_and_missing_generator():
    model, gen = make_players()
    with pytest.raises(ValueError, match="g_loss"):
        make_trainer(model, gen, g_loss="wasserstein")
    with pytest.raises(ValueError, match="g_grad"):
        make_trainer(model, gen, g_grad="both")
    with pytest.raises(ValueError, match="cancels"):
        make_trainer(model, gen, g_grad="authors", g_loss="contrastive")
    trainer = AdversarialTrainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), None)
    trainer.step(clips(), clips(seed=1), adversarial=False)
    with pytest.raises(ValueError, match="generator"):
        trainer.step(clips(), clips(seed=1), adversarial=True)


@pytest.mark.parametrize("use_scaler", [False, True])
def test_bf16_autocast_with_and_without_scaler(use_scaler):
    model, gen = make_players()
    opt_d = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    scalers = {}
    if use_scaler:
        scalers = {"scaler_d": torch.amp.GradScaler("cpu"), "scaler_g": torch.amp.GradScaler("cpu")}
    trainer = AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(), amp_dtype=torch.bfloat16, **scalers)
    d_before, g_before = snapshot(model.encoder_q), snapshot(gen)
    out = trainer.step(clips(), clips(seed=1), adversarial=True)
    assert torch.isfinite(out["loss_d"]) and torch.isfinite(out["loss_g"])
    assert out["loss_d"].dtype == torch.float32
    assert not same(d_before, model.encoder_q) and not same(g_before, gen)


@pytest.mark.parametrize("adversarial, g_grad", [(False, "own"), (True, "own"), (True, "authors")])
def test_micro_batches_accumulate_the_whole_batch_update(adversarial, g_grad):
    # with BatchNorm frozen (eval mode) nothing depends on how the batch is split, so 3 micro-batches
    # (2 + 2 + 1 clips) must give the whole batch's step: the same losses, parameters of both players,
    # queue, pointer and ages
    runs = []
    for micro_batches in (1, 3):
        model, gen = make_players()
        model.eval()
        trainer = make_trainer(model, gen, real_query_loss=True, g_grad=g_grad)
        trainer.micro_batches = micro_batches
        outs = [trainer.step(clips(b=5, seed=s), clips(b=5, seed=s + 1), adversarial=adversarial) for s in (0, 2)]
        runs.append((outs, model, gen))
    (outs_a, model_a, gen_a), (outs_b, model_b, gen_b) = runs
    for a, b in zip(outs_a, outs_b):
        for name in METRICS:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(gen_a.parameters(), gen_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(model_b.queue_ptr) == 10  # every key of both steps enqueued once
    assert same(snapshot(make_players()[1]), gen_b) != adversarial  # G moved only in adversarial steps


def test_micro_batches_use_batch_norm_per_micro_batch():
    model, gen = make_players()
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    make_trainer(whole, copy.deepcopy(gen)).step(clips(b=4), clips(b=4, seed=1), adversarial=False)
    trainer = make_trainer(split, copy.deepcopy(gen))
    trainer.micro_batches = 2
    trainer.step(clips(b=4), clips(b=4, seed=1), adversarial=False)
    assert not torch.allclose(whole.encoder_q.body[0].weight, split.encoder_q.body[0].weight, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("shuffle", ["device_rng", "cpu_generator"])  # the CPU permutation goes through pinned memory
def test_training_step_has_no_host_sync(precision, shuffle):
    """Augmentation (with blur) + one VideoMoCo step on CUDA under `set_sync_debug_mode("error")`: any host sync
    raises. fp16 uses GradScalers with fused SGD (an unfused optimiser syncs twice in `GradScaler.step`)."""
    from videomoco.data.augment import GpuAugment

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = VideoMoCo("r3d_18", dim=16, K=32, width=8).to(device)
    gen = FrameDropGenerator().to(device)
    opt_d = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.1, momentum=0.9, fused=True)
    opt_g = torch.optim.SGD(gen.parameters(), 0.1, momentum=0.9, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scalers = (torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")) if precision == "fp16" else (None, None)
    trainer = AdversarialTrainer(model, gen, opt_d, opt_g, AdversarialConfig(), dtype, *scalers)
    augment = GpuAugment(blur_p=0.5).to(device)
    raw = torch.randint(0, 256, (2, 4, 3, 8, 32, 32), dtype=torch.uint8).to(device)

    def step(i):
        shuffle_generator = torch.Generator().manual_seed(i) if shuffle == "cpu_generator" else None
        return trainer.step(augment(raw[0]), augment(raw[1]), adversarial=True, shuffle_generator=shuffle_generator)

    step(0)  # warm-up: cuDNN/cuBLAS handles, optimiser and scaler state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(list(out.values()))).all()


def test_step_reads_no_tensor_values(monkeypatch):
    """The CPU stand-in for the sync check above: no bool()/item()/tolist() on a tensor in a step."""
    from test_augment import HostReads

    model, gen = make_players()
    trainer = make_trainer(model, gen)
    trainer.step(clips(), clips(seed=1), adversarial=True)
    host = HostReads(monkeypatch)
    trainer.step(clips(), clips(seed=1), adversarial=True, shuffle_generator=torch.Generator().manual_seed(0))
    assert host.reads == []
