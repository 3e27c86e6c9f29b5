"""VideoMoCo's discriminator: MoCo for clips with a temporally decayed queue.

The layout follows the authors' `moco/builder.py` (itself MoCo v1/v2's), so their checkpoints load:
state-dict keys are `queue (dim, K)`, `queue_ptr (1,)`, `encoder_q.*`, `encoder_k.*`, plus our
`queue_age (K,)` which a checkpoint without it loads as age 0.

Queue ages. `queue_age[j]` counts the enqueues that happened after key j was written, so at the
time logits are computed a key enqueued by the previous step has age 0, one from two steps
ago has age 1, and so on. `enqueue` first ages every key by 1, then writes the new keys with age
0; logits are computed before the step's enqueue. The authors' `count` is our age + 1 for keys a
step wrote but equals our age for the initial random keys, so the two differ by one uniform factor
`t` only after the first K/B steps (docs/method.md, "Ages").

Decay exponents (`decay_unit`). "step" (the authors' code): a key's exponent is its age in enqueue steps,
so the oldest of K keys gets t**(K/B - 1), which depends on the global batch B. "key" (the paper's
t^i over the queue's keys): its position in the queue counted from the newest key (0) to the oldest
(K - 1), the same whatever the batch size, the number of ranks or micro-batches.
"""

import copy

import numpy as np

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from videomoco.method.losses import DECAY_ON, contrastive_labels, decayed_logits

SHUFFLE_BN = ("all_to_all", "all_gather")  # how key clips reach the rank that encodes them (see exchange_clips)
DECAY_UNITS = ("step", "key")  # the decay's exponent: enqueue steps since written (authors), or queue position (paper)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x):
    """all_gather `x` (B, ...) from every rank and concatenate: (world_size * B, ...). No gradient."""
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def exchange_clips(x, perm, rank, world):
    """The clips rank `rank` encodes under the shuffle `perm`, by one `all_to_all`: each rank sends
    each of its clips only to the rank that encodes it (its own stay local).

    x: this rank's clips (b, ...); perm: a permutation of the global batch (world * b,), the same on
    every rank, whose positions [r b, (r + 1) b) rank r encodes. Returns x_all[perm[rank b:(rank + 1) b]]
    (b, ...) without gathering x_all. Split sizes are uneven and computed from `perm` on every rank alike,
    on the host (pass `perm` on the CPU: a GPU copy would cost a device sync here).
    """
    b, perm = x.shape[0], perm.cpu()
    owner = torch.div(perm, b, rounding_mode="floor")  # the rank whose clip sits at each permuted position
    sent = (owner == rank).nonzero().squeeze(1)  # permuted positions of my clips, in order: by destination
    send_sizes = torch.bincount(torch.div(sent, b, rounding_mode="floor"), minlength=world).tolist()
    mine = owner[rank * b : (rank + 1) * b]
    recv_order = torch.argsort(mine, stable=True)  # my positions grouped by source, in order within each
    recv_sizes = torch.bincount(mine, minlength=world).tolist()
    # every buffer in x's layout: a clip is one block of memory in both layouts (the batch dim is outermost),
    # so the collective moves the same bytes, and channels_last_3d clips reach the first conv unconverted
    layout = torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        and not x.is_contiguous() else torch.contiguous_format
    send = x[to_device(perm[sent] - rank * b, x.device)].contiguous(memory_format=layout)
    received = torch.empty_like(x, memory_format=layout)
    dist.all_to_all_single(received, send, recv_sizes, send_sizes)
    out = torch.empty_like(x, memory_format=layout)
    out[to_device(recv_order, x.device)] = received
    return out


def to_device(t, device):
    """`t` on `device`; a host tensor bound for CUDA goes through pinned memory, so that the copy is
    asynchronous (a `non_blocking` copy from pageable memory may run synchronously)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def micro_batch_sizes(batch, chunks):
    """Sizes of `batch` clips split into `chunks` micro-batches as evenly as possible (`tensor_split`)."""
    return [batch // chunks + (i < batch % chunks) for i in range(chunks)]


def _draw_permutation(n, generator, device):
    """A permutation of n from `generator` (on the generator's device) or from the global RNG (on `device`)."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device)


def _randperm(n, generator, device):
    """`_draw_permutation` on `device`."""
    return to_device(_draw_permutation(n, generator, device), device)


def own_key_fraction(K, num_videos, clips_per_video=1):
    """Fraction of queries that find a key of their own video in a queue of K keys.

    With a fresh random order every epoch, a video's two visits are `N + d` samples apart (N =
    `num_videos`, d triangular on (-N, N)); its old key is still queued when that gap is at most K. That stale
    view of the same video then counts as a negative, which fights the positive: keep K well below
    the number of videos (MoCo's 65536 keys are 5% of ImageNet, 27% of Kinetics-400). With `clips_per_video`
    C > 1 the video's other C - 1 clips of the same epoch count too, so the fraction nears K / N, not (K / N)^2 / 2.
    """
    if clips_per_video > 1:
        return _own_key_fraction_clips(K, int(num_videos), int(clips_per_video))
    n = max(int(num_videos), 1)
    if K >= 2 * n:
        return 1.0
    if K <= n:
        return K * K / (2.0 * n * n)
    return 1.0 - (2 * n - K) ** 2 / (2.0 * n * n)


def _own_key_fraction_clips(K, videos, clips):
    """`own_key_fraction` for `clips` items per video in each epoch's random order of M = videos x clips items:
    a query at position p has a = min(p, K) queued keys of this epoch (where its video's other clips - 1 items
    fall at random among the M - 1 other positions) and b = K - a of the last epoch (its C items among M),
    averaged over p."""
    m = videos * clips
    if K >= m:
        return 1.0
    a = np.minimum(np.arange(m), K).astype(np.float64)
    b = K - a
    none = np.ones(m)
    for j in range(clips - 1):  # no other clip of this epoch among the a queued keys
        none *= np.clip((m - 1 - a - j) / (m - 1 - j), 0, 1)
    for j in range(clips):  # no clip of the last epoch among the b queued keys
        none *= np.clip((m - b - j) / (m - j), 0, 1)
    return float(1.0 - none.mean())


def mlp_head(fc, bn=False):
    """MoCo v2's projection head around an existing `fc`: Linear(f, f), ReLU, fc (keys fc.0 / fc.2).

    bn=True adds BatchNorm after both linear layers (MoCo v3 / SimCLR style; keys fc.0, fc.1, fc.3,
    fc.4): centring the embeddings over the batch stops them from collapsing onto the direction
    that every clip shares, which happens with the plain heads on small, homogeneous data.
    """
    f = fc.weight.shape[1]
    if bn:
        return nn.Sequential(nn.Linear(f, f), nn.BatchNorm1d(f), nn.ReLU(), fc,
                             nn.BatchNorm1d(fc.out_features, affine=False))
    return nn.Sequential(nn.Linear(f, f), nn.ReLU(), fc)


class VideoMoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of K negatives whose logits decay with age.

    arch/width: encoder built by `videomoco.models.build_encoder(arch, num_classes=dim, width=width)`,
    or by `encoder_fn(dim)` when given. dim: embedding size; K: queue length; m: key-encoder
    momentum; T: temperature; mlp: MoCo v2 head (mlp_bn: with BatchNorm); temporal_decay: t in
    `t**a`; decay_unit: what a counts (DECAY_UNITS); decay_on: what t**a multiplies (DECAY_ON);
    shuffle_groups: BN groups for the single-process shuffle (default 2 when the batch has >= 4 clips,
    else 1); shuffle_bn: how key clips travel for the multi-process shuffle (SHUFFLE_BN).
    """

    def __init__(self, arch="r3d_18", dim=128, K=65536, m=0.999, T=0.07, mlp=False,
                 temporal_decay=0.99999, width=64, shuffle_groups=None, encoder_fn=None, mlp_bn=False,
                 shuffle_bn="all_to_all", decay_unit="step", decay_on="logit"):
        super().__init__()
        if not 0.0 < temporal_decay <= 1.0:
            raise ValueError(f"temporal_decay must be in (0, 1], got {temporal_decay}")
        for name, value, choices in (("shuffle_bn", shuffle_bn, SHUFFLE_BN), ("decay_unit", decay_unit, DECAY_UNITS),
                                     ("decay_on", decay_on, DECAY_ON)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
        self.arch, self.dim, self.K, self.m, self.T = arch, dim, K, m, T
        self.temporal_decay, self.decay_unit, self.decay_on = temporal_decay, decay_unit, decay_on
        self.shuffle_groups, self.shuffle_bn = shuffle_groups, shuffle_bn

        if encoder_fn is None:
            from videomoco.models import build_encoder

            def encoder_fn(num_classes):
                return build_encoder(arch, num_classes=num_classes, width=width)

        self.encoder_q = encoder_fn(dim)
        if mlp or mlp_bn:
            self.encoder_q.fc = mlp_head(self.encoder_q.fc, bn=mlp_bn)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False  # updated by momentum, not by gradient

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_age", torch.zeros(K, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the authors' checkpoints have no queue_age: their keys then count as fresh (age 0)
        state_dict.setdefault(prefix + "queue_age", torch.zeros_like(self.queue_age))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """k = m * k + (1 - m) * q for every parameter (BN running stats stay the key encoder's own).

        Two multi-tensor kernels over all parameters (`_foreach_mul_`, `_foreach_add_`) instead of two
        launches per parameter; the same arithmetic as `p_k.mul_(m).add_(p_q, alpha=1 - m)`.
        """
        params_k = list(self.encoder_k.parameters())
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    def key_bn_sizes(self, b, chunks=1, distributed=False):
        """The BatchNorm batches of the key encoder in this process for b clips in `chunks` micro-batches: one per
        micro-batch under torch.distributed or with micro-batches, else one per `shuffle_groups` group (default 2
        from b = 4 on, else 1). Each group is a forward of its own, so BN's `num_batches_tracked` advances by one
        per group (the query encoder's by one per micro-batch)."""
        if distributed or chunks > 1:
            return micro_batch_sizes(b, min(chunks, b))
        return micro_batch_sizes(b, min(self.shuffle_groups or (2 if b >= 4 else 1), b))

    @torch.no_grad()
    def _encode_keys_grouped(self, x, generator=None):
        """Single-process shuffle-BN: random groups, BN statistics per group, original order back."""
        b = x.shape[0]
        perm = _randperm(b, generator, x.device)
        k = torch.cat([self.encoder_k(chunk) for chunk in x[perm].split(self.key_bn_sizes(b))])
        return k[torch.argsort(perm)]

    @torch.no_grad()
    def _encode_keys_shuffled(self, x, chunks, generator=None):
        """Shuffle-BN over every rank's micro-batches: each of the `world_size * chunks` key encoders of
        the global batch (a rank's micro-batch, as one GPU of a bigger run) sees a random part of it.

        One permutation of the global batch for all ranks (drawn from `generator`, which every rank seeds
        alike, else rank 0's broadcast); rank r encodes the clips at permuted positions [r b, (r + 1) b) in
        `chunks` micro-batches. How those clips reach it is `self.shuffle_bn`: `all_to_all` sends each clip
        only to the rank that encodes it; `all_gather` (the authors') sends every clip to every rank.
        The same clips in the same order either way, so the keys are identical.
        x: (b, C, T, H, W) -> keys of every rank's batch (world * b, dim), rank-major, unshuffled.
        """
        world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
        b = x.shape[0]
        drawn = _draw_permutation(world * b, generator, x.device)  # training: on the host (a CPU generator)
        if world > 1 and generator is None:
            dist.broadcast(drawn, src=0)
        perm = to_device(drawn, x.device)
        mine = perm[rank * b : (rank + 1) * b]
        if world == 1:
            x_mine = x[mine]
        elif self.shuffle_bn == "all_gather":
            x_mine = concat_all_gather(x)[mine]  # (world * b, C, T, H, W), of which b are kept
        else:
            x_mine = exchange_clips(x, drawn, rank, world)  # split sizes from the host copy: no device sync
        k = torch.cat([self.encoder_k(chunk) for chunk in x_mine.split(micro_batch_sizes(b, chunks))])
        k_all = concat_all_gather(k) if world > 1 else k  # (world * b, dim) in permuted order
        return k_all[torch.argsort(perm)]

    def encode_query(self, x):
        """x: (B, C, T, H, W) -> L2-normalised query embeddings (B, dim) float32, with gradient."""
        return F.normalize(self.encoder_q(x).float(), dim=1)

    @torch.no_grad()
    def encode_keys(self, x, chunks=1, generator=None, all_ranks=False):
        """Momentum-update the key encoder, then x: (B, C, T, H, W) -> normalised keys (B, dim) float32.

        chunks: the micro-batches this process splits its batch into (BN statistics per micro-batch,
        shuffled across all of them and all ranks); generator: a `torch.Generator` for the shuffle
        permutation, seeded alike on every rank (default: the global RNG). all_ranks: return
        `(keys, keys of every rank's batch (world * B, dim))`; the shuffle gathers them anyway, so
        `enqueue(..., gathered=True)` needs no collective of its own.
        """
        self._momentum_update_key_encoder()
        if is_distributed() or chunks > 1:
            k_all = F.normalize(self._encode_keys_shuffled(x, chunks, generator).float(), dim=1)
            rank = dist.get_rank() if is_distributed() else 0
            k = k_all[rank * x.shape[0] : (rank + 1) * x.shape[0]]
        else:
            k = k_all = F.normalize(self._encode_keys_grouped(x, generator).float(), dim=1)
        return (k, k_all) if all_ranks else k

    @torch.no_grad()
    def decay_exponents(self):
        """The exponent a_j of each queue key's weight t**a_j: (K,) int64 on the queue's device, no host sync.

        "step": `queue_age` (enqueues since written); "key": the key's position counted from the newest
        (the one just before `queue_ptr`, 0) back to the oldest (K - 1).
        """
        if self.decay_unit == "step":
            return self.queue_age
        return (self.queue_ptr - 1 - torch.arange(self.K, device=self.queue_ptr.device)) % self.K

    def contrastive_logits(self, q, k):
        """q, k: (B, dim) -> (logits (B, 1 + K) float32, labels (B,) zeros). Uses the queue as it is now."""
        # float32 logits; the queue is cloned because enqueue() writes it in place and forward()
        # enqueues before the caller's backward
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = decayed_logits(q, k, self.queue.clone(), self.decay_exponents(), self.temporal_decay,
                                    self.T, on=self.decay_on)
        return logits, contrastive_labels(logits)

    @torch.no_grad()
    def enqueue(self, k, gathered=False):
        """Write keys k: (B, dim) (gathered from all ranks under DDP) at the pointer, wrapping around.

        gathered: k already holds every rank's keys (`encode_keys(..., all_ranks=True)`). Every key ages
        by one step, the new ones start at age 0. No host sync: the pointer stays on the device.
        """
        if is_distributed() and not gathered:
            k = concat_all_gather(k)
        n = k.shape[0]
        if n > self.K:
            raise ValueError(f"cannot enqueue {n} keys into a queue of K={self.K}")
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % self.K  # (n,)
        self.queue.index_copy_(1, idx, k.detach().to(self.queue.dtype).T)
        self.queue_age.add_(1)
        self.queue_age.index_fill_(0, idx, 0)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def forward(self, im_q, im_k):
        """The plain MoCo step (the authors' behaviour): logits, labels, and the keys enqueued."""
        q = self.encode_query(im_q)  # (B, dim)
        k = self.encode_keys(im_k)  # (B, dim)
        logits, labels = self.contrastive_logits(q, k)
        self.enqueue(k)
        return logits, labels
