import math

import pytest
import torch
import torch.nn.functional as F

from videomoco.method.losses import (
    contrastive_loss,
    decay_weights,
    decayed_logits,
    feature_l1,
    positive_rank_accuracy,
)


def random_inputs(b=4, dim=8, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, dim, generator=g), dim=1)
    key = F.normalize(torch.randn(b, dim, generator=g), dim=1)
    queue = F.normalize(torch.randn(dim, k, generator=g), dim=0)
    ages = torch.randint(0, 50, (k,), generator=g)
    return q, key, queue, ages


def naive_logits(q, k, queue, ages, decay, T, on="logit"):
    """The formula, one key at a time, in float64: t**a on the logit (the authors' code) or on exp(logit)
    (the paper's sum_i t^i exp(q . k_i / T), i.e. log(t**a exp(x)) = x + a log t)."""
    q, k, queue = q.double(), k.double(), queue.double()
    out = torch.empty(q.shape[0], 1 + queue.shape[1], dtype=torch.float64)
    for i in range(q.shape[0]):
        out[i, 0] = (q[i] * k[i]).sum() / T
        for j in range(queue.shape[1]):
            weight, logit = decay ** int(ages[j]), (q[i] * queue[:, j]).sum() / T
            out[i, 1 + j] = weight * logit if on == "logit" else torch.log(weight * torch.exp(logit))
    return out


@pytest.mark.parametrize("on", ["logit", "exp"])
@pytest.mark.parametrize("decay", [0.9, 0.99999, 1.0])
def test_decayed_logits_match_naive_formula(decay, on):
    q, k, queue, ages = random_inputs()
    logits = decayed_logits(q, k, queue, ages, decay, T=0.07, on=on)
    assert logits.shape == (4, 13) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), naive_logits(q, k, queue, ages, decay, 0.07, on), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on", ["logit", "exp"])
def test_decay_one_is_plain_moco_exactly(on):
    q, k, queue, ages = random_inputs()
    plain = torch.cat([torch.einsum("nc,nc->n", q, k).unsqueeze(-1), q @ queue], dim=1) / 0.07
    assert torch.equal(decayed_logits(q, k, queue, ages, 1.0, 0.07, on=on), plain)


def test_the_two_placements_differ_in_sign_for_negatives_below_zero():
    """On the logit, t**a < 1 moves a negative's logit toward 0: a negative with q.n < 0 rises (it gets harder);
    on exp(logit) every decayed negative falls by a |log t|."""
    q, k, queue, ages = random_inputs()
    ages = torch.full_like(ages, 1000)
    plain, logit, exp = (decayed_logits(q, k, queue, ages, d, 0.07, on=on)[:, 1:]
                         for d, on in ((1.0, "logit"), (0.999, "logit"), (0.999, "exp")))
    below = plain < 0
    assert below.any() and (~below).any()
    assert (logit[below] > plain[below]).all() and (logit[~below] < plain[~below]).all()
    torch.testing.assert_close(exp - plain, torch.full_like(plain, 1000 * math.log(0.999)))
    with pytest.raises(ValueError, match="decay placement"):
        decayed_logits(q, k, queue, ages, 0.9, 0.07, on="loss")


def test_decay_weights():
    ages = torch.tensor([0, 1, 10, 1000])
    torch.testing.assert_close(decay_weights(ages, 0.99).double(), 0.99 ** ages.double(), rtol=1e-6, atol=0)
    assert decay_weights(ages, 0.99)[0] == 1.0
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="temporal decay"):
            decay_weights(ages, bad)


def test_contrastive_loss_is_cross_entropy_of_column_zero():
    q, k, queue, ages = random_inputs()
    logits = decayed_logits(q, k, queue, ages, 0.9, 0.2)
    expected = -torch.log_softmax(logits.double(), dim=1)[:, 0].mean()
    torch.testing.assert_close(contrastive_loss(logits).double(), expected, rtol=1e-6, atol=1e-6)


def test_topk_accuracy_matches_topk_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 10, generator=g)
    acc1, acc5 = positive_rank_accuracy(logits, ks=(1, 5))
    for acc, k in ((acc1, 1), (acc5, 5)):
        expected = (logits.topk(k, dim=1).indices == 0).any(dim=1).float().mean() * 100
        assert acc.dim() == 0
        torch.testing.assert_close(acc, expected)
    assert 0 <= acc1 <= acc5 <= 100


def test_feature_l1_is_mean_absolute_difference():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(feature_l1(a, b), torch.nn.L1Loss()(a, b))


def test_a_few_steps_lower_the_loss():
    q0, k, queue, ages = random_inputs(b=8, dim=16, k=64)
    q = q0.clone().requires_grad_(True)
    opt = torch.optim.SGD([q], lr=0.05)
    losses = []
    for _ in range(20):
        loss = contrastive_loss(decayed_logits(F.normalize(q, dim=1), k, queue, ages, 0.99, 0.07))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(losses[-1])
