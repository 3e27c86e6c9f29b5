"""The math of VideoMoCo as pure tensor functions (no modules, no state).

Notation: B queries, K queue keys, `dim` embedding size, T the softmax temperature, t the
temporal decay. Queries and keys are L2-normalised. The positive key of query i is k_i, the
negatives are the queue columns; logits put the positive first (label 0), as MoCo does. Each negative j
has an exponent a_j (its age in steps, or its position in the queue: `VideoMoCo.decay_exponents`), and
t**a_j multiplies either its logit (`on="logit"`, the authors' code) or its exp(logit) (`on="exp"`, the
paper's equation: sum_i t^i exp(q . k_i / T)), which adds a_j log t to the logit:

    logit:  logits[i] = [ q_i . k_i / T,  t**a_1 * (q_i . n_1) / T,       ...,  t**a_K * (q_i . n_K) / T ]
    exp:    logits[i] = [ q_i . k_i / T,  (q_i . n_1) / T + a_1 * log t,  ...,  (q_i . n_K) / T + a_K * log t ]
"""

import math

import torch
import torch.nn.functional as F

DECAY_ON = ("logit", "exp")  # what t**a multiplies: the negative's logit (authors' code) or its exp (the paper)


def decay_weights(ages, decay):
    """`t**a` for each queue key: exponents `(K,)` int -> `(K,)` float32, on the exponents' device.

    Computed as `exp(a * log t)` so that `t = 1` gives exactly 1.0 for every key.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"temporal decay must be in (0, 1], got {decay}")
    return torch.exp(ages.to(torch.float32) * math.log(decay))


def decayed_logits(q, k, queue, exponents, decay, T, on="logit"):
    """Contrastive logits with temporally decayed negatives.

    q: (B, dim) queries, k: (B, dim) positive keys, queue: (dim, K) negatives, exponents: (K,) int (a_j);
    on: "logit" (t**a_j * q.n_j / T) or "exp" (q.n_j / T + a_j log t, i.e. t**a_j * exp(q.n_j / T)).
    Returns logits (B, 1 + K) float32, the positive in column 0. With `decay = 1` either form is
    exactly MoCo's `cat([q.k, q @ queue]) / T`.
    """
    if on not in DECAY_ON:
        raise ValueError(f"unknown decay placement {on!r}; expected one of {', '.join(DECAY_ON)}")
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (B, 1)
    if on == "logit":
        l_neg = (q @ queue) * decay_weights(exponents, decay)  # (B, K)
        return torch.cat([l_pos, l_neg], dim=1) / T
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"temporal decay must be in (0, 1], got {decay}")
    shift = exponents.to(torch.float32) * math.log(decay)  # (K,), exactly 0 for t = 1
    return torch.cat([l_pos / T, (q @ queue) / T + shift], dim=1)


def contrastive_labels(logits):
    """The InfoNCE targets: the positive is column 0. logits: (B, 1 + K) -> (B,) int64."""
    return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


def contrastive_loss(logits):
    """InfoNCE: cross-entropy of the positive (column 0) among 1 + K. logits: (B, 1 + K) -> 0-d."""
    return F.cross_entropy(logits.float(), contrastive_labels(logits))


@torch.no_grad()
def positive_rank_accuracy(logits, ks=(1, 5)):
    """Percentage of rows whose positive (column 0) is among the top k, for each k in `ks`.

    logits: (B, 1 + K). Returns a tuple of 0-d float tensors in [0, 100]. The rank of the
    positive is the number of negatives scoring strictly higher (ties go to the positive),
    which needs no sort and no host sync.
    """
    rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)  # (B,)
    return tuple((rank < k).float().mean() * 100.0 for k in ks)


def feature_l1(f_dropped, f_real):
    """Mean absolute difference between two feature batches (B, D) -> 0-d (official `nn.L1Loss`)."""
    return (f_dropped.float() - f_real.float()).abs().mean()
