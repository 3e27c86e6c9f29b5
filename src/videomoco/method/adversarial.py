"""One VideoMoCo training step: the generator G drops frames, the discriminator D (MoCo) learns.

    keys    k = D.encode_keys(im_k)                       once per step, enqueued once at the end
    G:      dropped = G(im_q)                             top-k frames dropped and filled
    D:      q = D.encode_query(dropped)                   (and q_real = D.encode_query(im_q))
    loss_D = InfoNCE(decayed logits of q)                 (+ InfoNCE of q_real if real_query_loss)
    loss_G = -g_loss_weight * L1(q, q_real)               "feature_l1" (the authors' loss), or
           = -InfoNCE(decayed logits of q)                "contrastive"

G and D are updated by their own optimisers from one shared forward pass: G's loss is
back-propagated into G's parameters only (`backward(inputs=...)`), G steps, then D's loss into
D's parameters only, D steps. So G's step never moves D and D's step never moves G. Before
`adv_start_epoch` (`adversarial=False`) G is not run at all: plain MoCo with temporal decay.

Under torch.distributed the trainer averages the gradients of both players itself, so `model`
and `generator` stay plain modules (no DDP wrapper, no `module.` prefix in the checkpoint).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from videomoco.method.losses import contrastive_loss, feature_l1, topk_accuracy
from videomoco.method.moco import is_distributed

G_LOSSES = ("feature_l1", "contrastive")


@dataclass
class AdversarialConfig:
    drop_ratio: float = 0.25  # fraction of query frames G drops
    fill: str = "mean"  # how dropped frames are filled: mean | zero | hold
    g_loss: str = "feature_l1"  # feature_l1 (authors') | contrastive
    g_loss_weight: float = 100.0  # scales the feature_l1 loss of G (the authors' 100)
    real_query_loss: bool = False  # D also learns from the undropped query
    adv_start_epoch: int = 100  # epochs of plain MoCo before G starts


def trainable_params(optimizer):
    """The parameters an optimiser updates (those that require grad)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def average_gradients(params):
    """All-reduce mean of `.grad` over ranks (no-op in a single process)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class AdversarialTrainer:
    """Runs `step(im_q, im_k, adversarial)` for a `VideoMoCo` model and a `FrameDropGenerator`.

    opt_d / opt_g: the optimisers of D and G (each only sees its own player's parameters).
    amp_dtype: None, torch.bfloat16 or torch.float16 for autocast; scaler_d / scaler_g: optional
    `torch.amp.GradScaler`s (fp16). `generator` and `opt_g` may be None for plain MoCo.
    """

    def __init__(self, model, generator, opt_d, opt_g, cfg=None, amp_dtype=None, scaler_d=None, scaler_g=None):
        self.cfg = cfg or AdversarialConfig()
        if self.cfg.g_loss not in G_LOSSES:
            raise ValueError(f"unknown g_loss {self.cfg.g_loss!r}; expected one of {', '.join(G_LOSSES)}")
        self.model, self.generator = model, generator
        self.opt_d, self.opt_g = opt_d, opt_g
        self.params_d = trainable_params(opt_d)
        self.params_g = trainable_params(opt_g) if opt_g is not None else []
        self.amp_dtype, self.scaler_d, self.scaler_g = amp_dtype, scaler_d, scaler_g

    def _autocast(self, device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def _update(self, loss, params, optimizer, scaler, retain_graph=False):
        """Back-propagate `loss` into `params` only, then step `optimizer`."""
        optimizer.zero_grad(set_to_none=True)
        scaled = scaler.scale(loss) if scaler is not None else loss
        scaled.backward(inputs=params, retain_graph=retain_graph)
        average_gradients(params)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def step(self, im_q, im_k, adversarial):
        """One step on query / key clips (B, C, T, H, W). Returns detached 0-d tensors (no host sync)."""
        cfg, model = self.cfg, self.model
        if adversarial and (self.generator is None or self.opt_g is None):
            raise ValueError("an adversarial step needs a generator and its optimiser")
        zero = torch.zeros((), device=im_q.device)
        loss_g, drop_fraction = zero, zero

        with self._autocast(im_q.device):
            k = model.encode_keys(im_k)  # (B, dim), no grad
            if adversarial:
                dropped, keep = self.generator(im_q)  # (B, C, T, H, W), (B, T)
                q = model.encode_query(dropped)  # (B, dim)
                q_real = None
                if cfg.real_query_loss or cfg.g_loss == "feature_l1":
                    with torch.set_grad_enabled(cfg.real_query_loss):
                        q_real = model.encode_query(im_q)
                drop_fraction = 1.0 - keep.detach().mean()
            else:
                q = model.encode_query(im_q)

        logits, _ = model.contrastive_logits(q, k)  # (B, 1 + K)
        loss_d = contrastive_loss(logits)
        if adversarial and cfg.real_query_loss:
            loss_d = loss_d + contrastive_loss(model.contrastive_logits(q_real, k)[0])

        if adversarial:
            if cfg.g_loss == "feature_l1":
                loss_g = -cfg.g_loss_weight * feature_l1(q, q_real.detach())
            else:
                loss_g = -contrastive_loss(logits)
            # G first: its gradient flows back through D, whose parameters must not have stepped yet
            self._update(loss_g, self.params_g, self.opt_g, self.scaler_g, retain_graph=True)
        self._update(loss_d, self.params_d, self.opt_d, self.scaler_d)
        model.enqueue(k)

        acc1, acc5 = topk_accuracy(logits.detach(), ks=(1, 5))
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "acc1": acc1,
            "acc5": acc5,
            "drop_fraction": drop_fraction,
            "queue_age_mean": model.queue_age.float().mean(),
            "queue_age_max": model.queue_age.max().float(),
        }
