"""Activation (gradient) checkpointing of one encoder stage, BatchNorm-exact.

    y = checkpoint_stage(stage, x)          # x (B, C, T, H, W) -> y (B, C', T', H', W'), as stage(x)
    y = checkpoint_stage(modules, x, fn)    # fn(x), a stage made of `modules` (an nn.Module holding them)

In a training forward the stage keeps only its input; its inner activations are recomputed
during backward (`torch.utils.checkpoint`, non-reentrant). Less memory, about one more forward
of the stage in compute.

The recomputation re-runs every BatchNorm of the stage in train mode, which would update
`running_mean`, `running_var` and `num_batches_tracked` a second time. The recompute context
snapshots those buffers on entry and copies them back on exit (exact for any momentum, including
`momentum=None`'s cumulative average), so outputs, gradients and BN buffers after forward +
backward are those of the plain call. Under `torch.compile` no context is passed (it accepts only
dispatch modes there): the compiled graph applies buffer mutations once and recomputes pure ops.
"""

from contextlib import nullcontext
from functools import partial

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class FrozenBNStats:
    """Context manager: the running statistics of every `_BatchNorm` in `module` are restored on exit.

    Re-enterable: checkpoint builds one per forward and enters it at each recomputation, which
    happens once per backward through the graph (several with `retain_graph=True`).
    """

    def __init__(self, module):
        self.module = module
        self._saved = []  # a stack of snapshots, one per open entry

    def _buffers(self):
        for m in self.module.modules():
            if isinstance(m, _BatchNorm):
                for name in _BN_BUFFERS:
                    buf = getattr(m, name)
                    if buf is not None:  # track_running_stats=False: no buffers
                        yield buf

    def __enter__(self):
        self._saved.append([(buf, buf.clone()) for buf in self._buffers()])
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buf, value in self._saved.pop():
                buf.copy_(value)
        return False


def _contexts(module):
    """checkpoint's `context_fn`: (forward context, recompute context)."""
    return nullcontext(), FrozenBNStats(module)


def needs_checkpoint(module, x):
    """True when a call would record a graph: grad enabled and the input or a parameter needs grad."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def checkpoint_stage(module, x, fn=None):
    """`fn(x)` (default `module(x)`), checkpointed when it records a graph, else a plain call.

    `module` holds the stage's parameters and BatchNorms; `fn` must use no others. Plain call
    (nothing recomputed) in `torch.no_grad()` / inference mode or when nothing needs grad.
    """
    fn = module if fn is None else fn
    if not needs_checkpoint(module, x):
        return fn(x)
    if torch.compiler.is_compiling():
        return checkpoint(fn, x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=False, context_fn=partial(_contexts, module))
