import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from videomoco.method.generator import FrameDropGenerator, drop_frames, num_dropped, random_drop
from videomoco.models import build_encoder


def clip(b=2, t=8, h=16, w=16, seed=0):
    return torch.randn(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed))


def dropped_sets(keep):
    return [set((row == 0).nonzero().flatten().tolist()) for row in keep]


@pytest.mark.parametrize("t,h,w", [(8, 16, 16), (7, 20, 28), (10, 12, 40), (3, 8, 8)])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_drops_exactly_the_top_k_scores(t, h, w, ratio):
    torch.manual_seed(0)
    gen = FrameDropGenerator(drop_ratio=ratio, hidden=16, input_size=8)
    x = clip(t=t, h=h, w=w)
    out, keep = gen(x)
    assert out.shape == x.shape and keep.shape == (2, t)
    k = min(round(ratio * t), t - 1)
    assert num_dropped(t, ratio) == k
    assert torch.equal(keep.sum(dim=1), torch.full((2,), float(t - k)))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    top = gen.scores(x).topk(k, dim=1).indices
    assert dropped_sets(keep) == [set(row.tolist()) for row in top]


def test_kept_frames_are_untouched_and_mean_fill_is_the_frames_mean():
    x = clip()
    scores = torch.randn(2, 8)
    out, keep = drop_frames(x, scores, 0.25, fill="mean")
    for b in range(2):
        for t in range(8):
            if keep[b, t]:
                assert torch.equal(out[b, :, t], x[b, :, t])
            else:
                torch.testing.assert_close(out[b, :, t], torch.full_like(x[b, :, t], x[b, :, t].mean().item()))


def test_zero_fill():
    x = clip()
    out, keep = drop_frames(x, torch.randn(2, 8), 0.5, fill="zero")
    dropped = keep == 0
    assert torch.count_nonzero(out.transpose(1, 2)[dropped]) == 0
    assert torch.equal(out.transpose(1, 2)[~dropped], x.transpose(1, 2)[~dropped])


def test_hold_fill_repeats_previous_kept_frame():
    x = clip(t=8)
    # row 0 drops the first frames (held from the first kept one), row 1 drops a middle run
    scores = torch.tensor([[9.0, 8.0, 0, 0, 7.0, 0, 0, 6.0], [0, 0, 9.0, 8.0, 7.0, 0, 6.0, 0]])
    out, keep = drop_frames(x, scores, 0.5, fill="hold")
    assert keep[0, :2].tolist() == [0, 0] and keep[1, 2:5].tolist() == [0, 0, 0]
    for b in range(2):
        kept = [t for t in range(8) if keep[b, t]]
        for t in range(8):
            earlier = [s for s in kept if s <= t]
            src = earlier[-1] if earlier else kept[0]
            assert torch.equal(out[b, :, t], x[b, :, src])


def test_random_drop_is_reproducible_and_counts():
    x = clip(b=3, t=10)
    out1, keep1 = random_drop(x, 0.3, fill="zero", generator=torch.Generator().manual_seed(1))
    out2, keep2 = random_drop(x, 0.3, fill="zero", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2) and torch.equal(keep1, keep2)
    assert keep1.sum(dim=1).tolist() == [10 - round(0.3 * 10)] * 3
    _, keep3 = random_drop(x, 0.3, fill="zero", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(keep1, keep3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown fill"):
        FrameDropGenerator(fill="blur")
    with pytest.raises(ValueError, match="drop_ratio"):
        FrameDropGenerator(drop_ratio=1.0)
    with pytest.raises(ValueError, match="unknown fill"):
        drop_frames(clip(), torch.randn(2, 8), 0.25, fill="nearest")


def test_generator_gets_gradient_through_the_encoder():
    torch.manual_seed(0)
    gen = FrameDropGenerator(hidden=16, input_size=16)
    encoder = build_encoder("r3d_18", num_classes=8, width=4)
    out, keep = gen(clip(b=2, t=8, h=32, w=32))
    loss = encoder(out).pow(2).sum()
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
    assert gen.score.weight.grad.abs().sum() > 0
    assert gen.features[0].weight.grad.abs().sum() > 0
    assert encoder.stem[0].weight.grad is not None


def test_generator_cost_is_small_next_to_the_encoder():
    with torch.device("meta"):  # full-size r2plus1d_18, nothing allocated
        encoder = build_encoder("r2plus1d_18", num_classes=128, width=64)
        gen = FrameDropGenerator()
        x = torch.empty(1, 3, 32, 112, 112)
        with FlopCounterMode(display=False) as enc_flops, torch.no_grad():
            encoder(x)
        with FlopCounterMode(display=False) as gen_flops, torch.no_grad():
            gen(x)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert gen_flops.get_total_flops() < 0.01 * enc_flops.get_total_flops()
    assert params(gen) < 0.01 * params(encoder)


def test_scores_are_float32_under_bf16_autocast():
    """G scores in fp32 under autocast (cuDNN's GRU would autocast to fp16; bf16 scores tie in top-k)."""
    torch.manual_seed(0)
    gen = FrameDropGenerator(hidden=16, input_size=16)
    x = clip(b=2, t=8, h=32, w=32)
    expected = gen.scores(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = gen.scores(x)
        got_bf16_input = gen.scores(x.bfloat16())
        dropped, keep = gen(x)
    assert got.dtype == torch.float32 and keep.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_bf16_input, gen.scores(x.bfloat16().float()), rtol=0, atol=0)
    torch.testing.assert_close(dropped, gen(x)[0], rtol=0, atol=0)
