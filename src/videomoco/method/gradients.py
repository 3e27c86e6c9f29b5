"""All-reduce mean of a player's gradients over ranks, the way DDP's reducer does it, without the wrapper.

`average_gradients` is the plain version: one all-reduce per tensor after the backward. A
`BucketedReducer` groups the parameters into buckets of about `bucket_mb` MB in the order the
backward produces their gradients (the reverse of the module's order), and launches each bucket's
all-reduce asynchronously from a post-accumulate-grad hook as soon as its last gradient is final, so
communication overlaps the rest of the backward; `finish()` waits and writes the means back. Buckets
are launched in index order on every rank (a bucket that is ready early waits for the ones before
it), so all ranks issue the same collectives in the same order. Keeping the players plain modules
keeps `module.` prefixes out of checkpoints, and G and D each get their own reducer.
"""

import torch
import torch.distributed as dist

from videomoco.method.moco import is_distributed


def average_gradients(params):
    """All-reduce mean of `.grad` over ranks, one call per tensor (no-op in a single process)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def buckets_of(params, bucket_mb):
    """Split `params` (in backward order) into consecutive lists of at most ~`bucket_mb` MB of one dtype
    and device each (a bucket holds at least one tensor)."""
    cap, buckets, size = bucket_mb * 2**20, [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > cap or (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class BucketedReducer:
    """Bucketed, overlapped all-reduce mean of the gradients of `params` (those that require grad).

    Call `arm()` before the backward whose gradients are the step's last (the last micro-batch: earlier
    ones only accumulate), then `finish()` before the optimiser step. Hooks do nothing while not armed.
    """

    def __init__(self, params, bucket_mb=25.0):
        params = [p for p in params if p.requires_grad]
        self.buckets = buckets_of(params[::-1], bucket_mb)
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.world = dist.get_world_size()
        self.armed = False
        self.ready, self.works, self.launched = [], [], 0
        self.flat = [None] * len(self.buckets)  # one buffer per bucket, allocated at its first launch, then reused
        self.hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]

    def arm(self):
        self.armed = True
        self.ready = [0] * len(self.buckets)
        self.works, self.launched = [None] * len(self.buckets), 0

    def _grad_ready(self, param):
        if not self.armed:
            return
        i = self.bucket_of[id(param)]
        self.ready[i] += 1
        while self.launched < len(self.buckets) and self.ready[self.launched] == len(self.buckets[self.launched]):
            self._launch(self.launched)

    def _launch(self, i):
        """Flatten bucket i's gradients (zeros for a missing one) into its buffer and start their sum over ranks."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        if self.flat[i] is None:
            self.flat[i] = grads[0].new_empty(sum(g.numel() for g in grads))
        torch.cat([g.reshape(-1) for g in grads], out=self.flat[i])
        self.works[i] = dist.all_reduce(self.flat[i], async_op=True)
        self.launched = i + 1

    def finish(self):
        """Launch what the backward left (unused parameters), wait, and write the means into `.grad`."""
        if not self.armed:
            raise RuntimeError("BucketedReducer.finish() without arm() before the backward")
        while self.launched < len(self.buckets):
            self._launch(self.launched)
        for bucket, flat, work in zip(self.buckets, self.flat, self.works):
            work.wait()
            flat.div_(self.world)
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self.armed = False
        self.works = []

    def remove(self):
        for hook in self.hooks:
            hook.remove()
