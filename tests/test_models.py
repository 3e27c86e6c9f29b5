"""The encoders: every registered one trains on a tiny clip; the ResNets are torchvision's, to the key and the logit.

The reference fixtures (/work/shared/fixtures/torchvision_video_resnet, see its README) hold torchvision's
state_dict layout and its outputs for two deterministic weight fills, so no torchvision or weight file is needed.
"""

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from videomoco.models import build_encoder, list_encoders, set_grad_checkpointing

RESNETS = ["r3d_18", "mc3_18", "r2plus1d_18"]
TINY = dict(num_classes=5, width=8)


# ---- the deterministic fills and input of the reference fixtures -------------------------------------------------


def splitmix_unit(i, n):
    """splitmix64 of (key position i, flat index n: uint64 array) mapped to float64 in [0, 1); wraps mod 2**64."""
    z = (n + np.uint64(1)) * np.uint64(0xBF58476D1CE4E5B9)
    z += np.uint64((i * 0x9E3779B97F4A7C15) % 2**64)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z ^= z >> np.uint64(shift)
        z *= np.uint64(mult)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def fill_tensor(fill, key, i, shape):
    """The value of state_dict entry number `i` (`key`, `shape`) under fill "sin" or "hash"."""
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    numel = int(np.prod(shape, dtype=np.int64))
    if fill == "sin":
        s = np.sin(0.7 * np.arange(numel, dtype=np.float64) + 1.3 * i)
        value = 1.0 + 0.1 * s**2 if key.endswith("running_var") else 0.01 * s if key.endswith("running_mean") else 0.02 * s
    else:
        u = splitmix_unit(i, np.arange(numel, dtype=np.uint64))
        r = 2 * u - 1
        if key.endswith("running_var"):
            value = 1.0 + 0.5 * u
        elif key.endswith("running_mean"):
            value = 0.1 * r
        elif len(shape) >= 2:
            value = r * np.sqrt(6 / (numel // shape[0]))
        elif key.endswith("weight"):
            value = 1.0 + 0.1 * r
        else:
            value = 0.1 * r
    return value.reshape(shape).astype(np.float32)


def filled_state(model, fill):
    return {k: fill_tensor(fill, k, i, tuple(v.shape)) for i, (k, v) in enumerate(model.state_dict().items())}


def state_sha256(state):
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def make_input(shape):
    n = int(np.prod(shape))
    return (0.5 * np.sin(0.001 * np.arange(n, dtype=np.float64))).astype(np.float32).reshape(shape)


def assert_close(out, ref, what):
    err = np.abs(out.detach().numpy().astype(np.float64) - ref).max()
    bound = 1e-4 * max(1e-12, np.abs(ref).max())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def load_spec(fixtures, arch):
    return json.loads((fixtures / f"{arch}.json").read_text()), np.load(fixtures / f"{arch}_reference.npz")


# ---- torchvision equivalence --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RESNETS)
def test_state_dict_layout_is_torchvision(arch, torchvision_fixtures):
    spec, _ = load_spec(torchvision_fixtures, arch)
    model = build_encoder(arch)
    ours = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == [(e["key"], e["shape"], "torch." + e["dtype"]) for e in spec["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == spec["param_count"]
    assert len(list(model.buffers())) == spec["num_buffer_tensors"]


@pytest.mark.parametrize("tag", ["small", "large"])
def test_reference_input(tag, torchvision_fixtures):
    _, ref = load_spec(torchvision_fixtures, "r3d_18")
    x = make_input(tuple(ref[f"input_{tag}_shape"]))
    np.testing.assert_array_equal(x.reshape(-1)[:8], ref[f"input_{tag}_first8"])
    assert np.isclose(x.astype(np.float64).sum(), ref[f"input_{tag}_sum_f64"], rtol=1e-9)


def check_reference(arch, fill, tag, fixtures):
    spec, ref = load_spec(fixtures, arch)
    model = build_encoder(arch)
    state = filled_state(model, fill)
    # proves the fill code (and our key order) before any number is compared
    assert state_sha256(state) == spec["filled_state_dict_sha256"][fill]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.eval()
    x = torch.from_numpy(make_input(tuple(ref[f"input_{tag}_shape"])))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.fc(features)
        assert torch.equal(model(x), logits)
    assert_close(features, ref[f"{fill}_features_{tag}"], f"{arch} {fill} features")
    assert_close(logits, ref[f"{fill}_logits_{tag}"], f"{arch} {fill} logits")


@pytest.mark.parametrize("fill", ["hash", "sin"])  # hash exercises the input; sin is the literal requested fixture
@pytest.mark.parametrize("arch", RESNETS)
def test_outputs_match_torchvision_small(arch, fill, torchvision_fixtures):
    check_reference(arch, fill, "small", torchvision_fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("fill", ["hash", "sin"])
@pytest.mark.parametrize("arch", RESNETS)
def test_outputs_match_torchvision_large(arch, fill, torchvision_fixtures):
    check_reference(arch, fill, "large", torchvision_fixtures)


def test_hash_fill_matches_per_key_checksums(torchvision_fixtures):
    spec, _ = load_spec(torchvision_fixtures, "r2plus1d_18")
    for i, e in enumerate(spec["state_dict"][:12]):
        value = fill_tensor("hash", e["key"], i, tuple(e["shape"]))
        np.testing.assert_allclose(value.astype(np.float64).sum(), e["hash_fill_sum_f64"], rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(value.reshape(-1)[:3], np.float32(e["hash_fill_first3"][: value.size]))


# ---- every registered encoder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_encoders())
def test_forward_backward_tiny(name):
    torch.manual_seed(0)
    model = build_encoder(name, **TINY)
    x = torch.randn(2, 3, 8, 32, 32)
    out = model(x)
    assert out.shape == (2, TINY["num_classes"])
    assert model.feature_dim == 8 * TINY["width"]
    out.square().mean().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key


@pytest.mark.parametrize("name", list_encoders())
def test_fc_is_a_replaceable_head(name):
    model = build_encoder(name, **TINY).eval()
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.feature_dim
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        model.fc = nn.Identity()
        assert torch.equal(model(x), features)
    assert features.shape == (1, model.feature_dim)


@pytest.mark.parametrize("name", list_encoders())
def test_channels_last_3d_gives_same_output(name):
    torch.manual_seed(0)
    model = build_encoder(name, **TINY).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_encoders())
def test_torchvision_init(name):
    torch.manual_seed(0)
    model = build_encoder(name, num_classes=5, width=16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    assert not model.fc.bias.any()
    assert 0.005 < model.fc.weight.std().item() < 0.015
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv3d)), key=lambda m: m.weight.numel())
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


# ---- width and architecture details -------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 16])
def test_r2plus1d_midplanes_follow_the_scaled_planes(width):
    state = build_encoder("r2plus1d_18", width=width).state_dict()
    inplanes, planes = width, 2 * width  # layer2.0: both of its convs use the midplanes of (inplanes, planes)
    mid = inplanes * planes * 27 // (inplanes * 9 + 3 * planes)
    assert state["layer2.0.conv1.0.0.weight"].shape == (mid, inplanes, 1, 3, 3)
    assert state["layer2.0.conv2.0.0.weight"].shape == (mid, planes, 1, 3, 3)
    assert state["layer2.0.conv2.0.3.weight"].shape == (planes, mid, 3, 1, 1)
    assert state["stem.0.weight"].shape[0] == 45 * width // 64


def test_mc3_keeps_time_after_layer1():
    model = build_encoder("mc3_18", **TINY).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(mc3=o.shape))
    r3d = build_encoder("r3d_18", **TINY).eval()
    r3d.layer4.register_forward_hook(lambda m, i, o: seen.update(r3d=o.shape))
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        model(x), r3d(x)
    assert seen["mc3"][2:] == (8, 2, 2)
    assert seen["r3d"][2:] == (1, 2, 2)


@pytest.mark.parametrize("shape", [(16, 112, 112), (4, 16, 16), (1, 32, 32), (5, 33, 47)])
def test_c3d_accepts_clip_sizes(shape):
    model = build_encoder("c3d", num_classes=3, width=4).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, *shape))
    assert out.shape == (1, 32) and torch.isfinite(out).all()


def test_c3d_standard_input_stages():
    model = build_encoder("c3d", num_classes=3, width=4).eval()
    shapes = []
    for name in ["pool1", "pool2", "pool3", "pool4"]:
        getattr(model, name).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 112, 112))
    # the classic C3D pyramid at width w: (w,16,56,56) (2w,8,28,28) (4w,4,14,14) (8w,2,7,7)
    assert shapes == [(4, 16, 56, 56), (8, 8, 28, 28), (16, 4, 14, 14), (32, 2, 7, 7)]


# ---- activation checkpointing -------------------------------------------------------------------------------------

GRAD_TOL = dict(atol=1e-6, rtol=1e-5)  # recomputation runs the same kernels on the same inputs: exact in practice


def checkpointed_pair(name, momentum=0.1):
    """Two copies of one tiny encoder, the second with `set_grad_checkpointing(True)`, and a BN recompute counter."""
    torch.manual_seed(0)
    plain = build_encoder(name, **TINY)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = momentum
    ckpt = set_grad_checkpointing(copy.deepcopy(plain))
    bn = next(m for m in ckpt.modules() if isinstance(m, nn.BatchNorm3d))
    calls = []
    bn.register_forward_hook(lambda *_: calls.append(1))
    return plain, ckpt, calls


def run_twice(model, x):
    """Two forwards then one backward (VideoMoCo's query encoder sees the real and the dropped clip)."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out.square().mean() + model(0.5 * x).mean()).backward()
    return out, x.grad


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, driven by num_batches_tracked
@pytest.mark.parametrize("name", list_encoders())
def test_grad_checkpointing_matches_plain_training(name, momentum):
    plain, ckpt, calls = checkpointed_pair(name, momentum)
    x = torch.randn(2, 3, 8, 32, 32)
    out, grad = run_twice(plain, x)
    out_c, grad_c = run_twice(ckpt, x)
    assert len(calls) == 4  # 2 forwards + 2 recomputations in backward: the checkpoint is really on
    torch.testing.assert_close(out_c, out, **GRAD_TOL)
    torch.testing.assert_close(grad_c, grad, **GRAD_TOL)
    for (key, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL, msg=key)
    state, state_c = plain.state_dict(), ckpt.state_dict()
    assert list(state_c) == list(state)  # the flag is no state_dict entry
    for key in state:  # BN running stats updated once per forward, not again by the recomputation
        assert torch.equal(state_c[key], state[key]), key
    assert any(k.endswith("num_batches_tracked") and v.item() == 2 for k, v in state_c.items())


@pytest.mark.parametrize("name", list_encoders())
def test_grad_checkpointing_in_eval_and_no_grad(name):
    plain, ckpt, calls = checkpointed_pair(name)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():  # train mode, no graph: a plain call, BN stats updated once
        torch.testing.assert_close(ckpt(x), plain(x), **GRAD_TOL)
    assert len(calls) == 1
    for key, value in plain.state_dict().items():
        assert torch.equal(ckpt.state_dict()[key], value), key
    plain.eval(), ckpt.eval()
    out, grad = run_twice(plain, x)  # eval mode with grad (input saliency, frozen-BN fine-tuning)
    out_c, grad_c = run_twice(ckpt, x)
    torch.testing.assert_close(out_c, out, **GRAD_TOL)
    torch.testing.assert_close(grad_c, grad, **GRAD_TOL)
    assert ckpt.set_grad_checkpointing(False) is ckpt and not ckpt.grad_checkpointing


@pytest.mark.parametrize("name", list_encoders())
def test_grad_checkpointing_backward_twice_with_retain_graph(name):
    # AdversarialTrainer backpropagates one graph twice (encoder, then generator): one recomputation per backward
    plain, ckpt, calls = checkpointed_pair(name)
    x = torch.randn(2, 3, 8, 32, 32)
    for model in (plain, ckpt):
        loss = model(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    assert len(calls) == 3
    for (key, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL, msg=key)
    for key, value in plain.state_dict().items():
        assert torch.equal(ckpt.state_dict()[key], value), key


def test_set_grad_checkpointing_rejects_other_models():
    with pytest.raises(ValueError, match="Linear does not support activation checkpointing"):
        set_grad_checkpointing(nn.Linear(2, 2))
