"""One VideoMoCo training step: the generator G drops frames, the discriminator D (MoCo) learns.

    keys    k = D.encode_keys(im_k)                       once per step, enqueued once at the end
    G:      dropped = G(im_q)                             top-k frames dropped and filled
    D:      q_real = D.encode_query(im_q), then q = D.encode_query(dropped)   (the authors' order)
    loss_D = InfoNCE(decayed logits of q)                 (+ InfoNCE of q_real if real_query_loss)
    loss_G = -g_loss_weight * L1(q, q_real)               "feature_l1" (the authors' loss), or
           = -InfoNCE(decayed logits of q)                "contrastive"

G and D are updated by their own optimisers from one shared forward pass: G's loss is
back-propagated into G's parameters only (`backward(inputs=...)`), D's loss into D's parameters
only, then G steps and D steps. So G's step never moves D and D's step never moves G. With
`g_grad="authors"` G descends on loss_G + loss_D, as in the authors' loop (their loss_d.backward()
also reaches G, whose gradients are not zeroed in between). A batch
can be processed in micro-batches (`micro_batches`): the gradients of each are accumulated
before the players step, with the semantics of a run on that many times more GPUs. Before
`adv_start_epoch` (`adversarial=False`) G is not run at all: plain MoCo with temporal decay.

Under torch.distributed the trainer averages the gradients of both players itself
(`videomoco.method.gradients`: buckets launched from the backward of the step's last micro-batch, or
one call per tensor after it), so `model` and `generator` stay plain modules (no DDP wrapper, no
`module.` prefix in the checkpoint).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from videomoco.method.gradients import BucketedReducer, average_gradients
from videomoco.method.losses import contrastive_loss, feature_l1, positive_rank_accuracy
from videomoco.method.moco import is_distributed

G_LOSSES = ("feature_l1", "contrastive")
G_GRADS = ("own", "authors")


@dataclass
class AdversarialConfig:
    drop_ratio: float = 0.25  # fraction of query frames G drops
    fill: str = "mean"  # how dropped frames are filled: mean | zero | hold
    g_loss: str = "feature_l1"  # feature_l1 (authors') | contrastive
    g_loss_weight: float = 100.0  # scales the feature_l1 loss of G (the authors' 100)
    real_query_loss: bool = False  # D also learns from the undropped query
    adv_start_epoch: int = 100  # epochs of plain MoCo before G starts
    g_grad: str = "own"  # G learns from: own (loss_G) | authors (loss_G + loss_D, their train loop)


def compile_encoders(model, backend="inductor"):
    """`torch.compile` the two encoders of a `VideoMoCo`, as `--compile` and the benchmarks do (`backend`
    "aot_eager" goes through the same graph capture and autograd without generating kernels: the dry runs).

    The generator's update back-propagates with `retain_graph=True` (the discriminator's backward reuses the
    graph), which the compiled backward's donated buffers (on by default since torch 2.6) forbid.
    """
    from torch._functorch import config as functorch_config  # not imported by `import torch`

    functorch_config.donated_buffer = False
    model.encoder_q.compile(backend=backend)
    model.encoder_k.compile(backend=backend)
    return model


def trainable_params(optimizer):
    """The parameters an optimiser updates (those that require grad)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


class AdversarialTrainer:
    """Runs `step(im_q, im_k, adversarial)` for a `VideoMoCo` model and a `FrameDropGenerator`.

    opt_d / opt_g: the optimisers of D and G (each only sees its own player's parameters).
    amp_dtype: None, torch.bfloat16 or torch.float16 for autocast; scaler_d / scaler_g: optional
    `torch.amp.GradScaler`s (fp16). `generator` and `opt_g` may be None for plain MoCo.
    micro_batches: each batch is processed in this many micro-batches (see `step`). bucket_mb: under
    torch.distributed, the size of the gradient all-reduce buckets launched during the backward (0: one
    all-reduce per tensor after it).
    """

    def __init__(self, model, generator, opt_d, opt_g, cfg=None, amp_dtype=None, scaler_d=None, scaler_g=None,
                 micro_batches=1, bucket_mb=25.0):
        self.cfg = cfg or AdversarialConfig()
        if self.cfg.g_loss not in G_LOSSES:
            raise ValueError(f"unknown g_loss {self.cfg.g_loss!r}; expected one of {', '.join(G_LOSSES)}")
        if self.cfg.g_grad not in G_GRADS:
            raise ValueError(f"unknown g_grad {self.cfg.g_grad!r}; expected one of {', '.join(G_GRADS)}")
        if self.cfg.g_grad == "authors" and self.cfg.g_loss == "contrastive":
            raise ValueError("g_grad='authors' adds loss_D to G's loss, which cancels g_loss='contrastive'")
        self.model, self.generator = model, generator
        self.opt_d, self.opt_g = opt_d, opt_g
        self.params_d = trainable_params(opt_d)
        self.params_g = trainable_params(opt_g) if opt_g is not None else []
        self.amp_dtype, self.scaler_d, self.scaler_g = amp_dtype, scaler_d, scaler_g
        self.micro_batches = micro_batches  # set by the memory planner before training
        self.bucket_mb = bucket_mb
        self.reducers = None  # {"d", "g"}: built at the first distributed step (a deepcopy before it has no hooks)

    def _arm_reducers(self, adversarial):
        """Under torch.distributed with buckets: the coming backward is the step's last, reduce as it goes."""
        if not is_distributed() or not self.bucket_mb:
            return
        if self.reducers is None:
            self.reducers = {"d": BucketedReducer(self.params_d, self.bucket_mb),
                             "g": BucketedReducer(self.params_g, self.bucket_mb) if self.params_g else None}
        self.reducers["d"].arm()
        if adversarial:
            self.reducers["g"].arm()

    def _autocast(self, device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def _backward(self, loss, params, scaler, retain_graph=False):
        """Accumulate the gradient of `loss` into `params` only (`.grad +=`)."""
        scaled = scaler.scale(loss) if scaler is not None else loss
        scaled.backward(inputs=params, retain_graph=retain_graph)

    def _step(self, player, optimizer, scaler):
        """Average `player`'s ("d" or "g") gradients over ranks, then step its optimiser."""
        if self.reducers is not None:
            self.reducers[player].finish()
        else:
            average_gradients(self.params_d if player == "d" else self.params_g)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _micro_step(self, im_q, k, adversarial, weight):
        """Forward one micro-batch of queries (b, C, T, H, W) against its keys k (b, dim) and accumulate
        `weight` x each player's gradient; nothing steps. Returns the micro-batch's metrics."""
        cfg, model = self.cfg, self.model
        zero = torch.zeros((), device=im_q.device)
        loss_g, drop_fraction = zero, zero
        with self._autocast(im_q.device):
            if adversarial:
                dropped, keep = self.generator(im_q)  # (b, C, T, H, W), (b, T)
                q_real = None
                if cfg.real_query_loss or cfg.g_loss == "feature_l1":
                    with torch.set_grad_enabled(cfg.real_query_loss):
                        q_real = model.encode_query(im_q)  # first, as the authors: BN running stats follow
                q = model.encode_query(dropped)  # (b, dim)
                drop_fraction = 1.0 - keep.detach().mean()
            else:
                q = model.encode_query(im_q)

        logits, _ = model.contrastive_logits(q, k)  # (b, 1 + K), against the queue as the step found it
        loss_d = contrastive_loss(logits)
        if adversarial and cfg.real_query_loss:
            loss_d = loss_d + contrastive_loss(model.contrastive_logits(q_real, k)[0])
        if adversarial:
            if cfg.g_loss == "feature_l1":
                loss_g = -cfg.g_loss_weight * feature_l1(q, q_real.detach())
            else:
                loss_g = -contrastive_loss(logits)
            # G's gradient flows back through D's graph before either player has stepped; one backward of
            # the sum keeps loss_D's share of G's gradient under G's own GradScaler
            g_objective = loss_g + loss_d if cfg.g_grad == "authors" else loss_g
            self._backward(g_objective * weight, self.params_g, self.scaler_g, retain_graph=True)
        self._backward(loss_d * weight, self.params_d, self.scaler_d)
        acc1, acc5 = positive_rank_accuracy(logits.detach(), ks=(1, 5))
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "acc1": acc1, "acc5": acc5,
                "drop_fraction": drop_fraction}

    def step(self, im_q, im_k, adversarial, shuffle_generator=None):
        """One step on query / key clips (B, C, T, H, W). Returns detached 0-d tensors (no host sync).

        The batch is processed as `self.micro_batches` micro-batches, as that many times more processes
        with one micro-batch each would (BN's running statistics aside): BN statistics per micro-batch, shuffle-BN of the keys
        across all of them, one momentum update, every logit against the queue of the step's start, the
        gradients of the batch-mean losses accumulated, then G and D step once and all keys are enqueued.
        shuffle_generator: the `torch.Generator` of the shuffle-BN permutation (see `encode_keys`).
        """
        model, chunks = self.model, min(self.micro_batches, im_q.shape[0])
        if adversarial and (self.generator is None or self.opt_g is None):
            raise ValueError("an adversarial step needs a generator and its optimiser")
        with self._autocast(im_q.device):  # no grad; k (B, dim), k_all: every rank's (world * B, dim)
            k, k_all = model.encode_keys(im_k, chunks=chunks, generator=shuffle_generator, all_ranks=True)
        self.opt_d.zero_grad(set_to_none=True)
        if adversarial:
            self.opt_g.zero_grad(set_to_none=True)
        out = {}
        for j, (q_j, k_j) in enumerate(zip(im_q.tensor_split(chunks), k.tensor_split(chunks))):
            if j == chunks - 1:  # the gradients are final in this backward: reduce them as it goes
                self._arm_reducers(adversarial)
            weight = q_j.shape[0] / im_q.shape[0]  # the losses are means over the whole batch
            for name, value in self._micro_step(q_j, k_j, adversarial, weight).items():
                out[name] = out.get(name, 0) + value * weight
        if adversarial:
            self._step("g", self.opt_g, self.scaler_g)
        self._step("d", self.opt_d, self.scaler_d)
        model.enqueue(k_all, gathered=True)
        return out | {"queue_age_mean": model.queue_age.float().mean(),
                      "queue_age_max": model.queue_age.max().float()}
