"""C3D with batch norm, the 8-conv backbone of the video self-supervised literature.

Tran et al., "Learning Spatiotemporal Features with 3D Convolutional Networks" (ICCV 2015), in the
form used by VCOP, PRP, VideoMoCo and others: every conv is 3x3x3 (stride 1, padding 1) followed by
BN and ReLU, and the fc6/fc7 head is dropped.

    (B, 3, 16, 112, 112)
    conv1            w   -> pool1 (1, 2, 2) -> (B,  w, 16, 56, 56)
    conv2            2w  -> pool2 (2, 2, 2) -> (B, 2w,  8, 28, 28)
    conv3a, conv3b   4w  -> pool3 (2, 2, 2) -> (B, 4w,  4, 14, 14)
    conv4a, conv4b   8w  -> pool4 (2, 2, 2) -> (B, 8w,  2,  7,  7)
    conv5a, conv5b   8w  -> pool5 = global average pool -> (B, 8w) -> fc

Choices, each to accept clips other than 16x112x112:
- pool5 is `AdaptiveAvgPool3d(1)` (as in the SSL variants), not the original max pool + fc6, so
  `feature_dim = 8 * width` (512 at width 64) for any input size.
- pools 1-4 use `ceil_mode=True`: identical to the classic floor pools on even sizes, and a size-1
  dimension stays 1 instead of failing, so short clips (T=8: 8 -> 4 -> 2 -> 1) and 32 px work.
- convs keep their bias, so the keys (`conv1`, `bn1`, ..., `conv5b`, `bn5b`) match the common SSL
  C3D checkpoints; only the head is named `fc` here.
"""

from functools import partial

import torch.nn as nn

from videomoco.models.checkpointing import checkpoint_stage
from videomoco.models.registry import register_encoder
from videomoco.models.resnet3d import init_weights

# (name, output channels as a multiple of width, pool kernel after it or None)
BLOCKS = (
    ("1", 1, (1, 2, 2)),
    ("2", 2, (2, 2, 2)),
    ("3a", 4, None),
    ("3b", 4, (2, 2, 2)),
    ("4a", 8, None),
    ("4b", 8, (2, 2, 2)),
    ("5a", 8, None),
    ("5b", 8, None),
)


class C3D(nn.Module):
    """C3D-BN for clips `(B, 3, T, H, W)`; `width` is conv1's channels (64 = the paper)."""

    def __init__(self, num_classes=400, width=64):
        super().__init__()
        in_planes = 3
        for name, mult, pool in BLOCKS:
            self.add_module(f"conv{name}", nn.Conv3d(in_planes, mult * width, 3, padding=1))
            self.add_module(f"bn{name}", nn.BatchNorm3d(mult * width))
            if pool is not None:
                self.add_module(f"pool{name[0]}", nn.MaxPool3d(pool, stride=pool, ceil_mode=True))
            in_planes = mult * width
        self.relu = nn.ReLU(inplace=True)
        self.pool5 = nn.AdaptiveAvgPool3d(1)
        self.feature_dim = in_planes
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self.grad_checkpointing = False  # a plain attribute: not in state_dict()
        init_weights(self)

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint each conv block (conv, BN, ReLU, pool) in training forwards (timm's API)."""
        self.grad_checkpointing = bool(enable)
        return self

    def _block(self, name, pool, x):
        """conv{name} -> bn{name} -> ReLU (-> pool): (B, C, T, H, W) -> (B, C', T', H', W')."""
        x = self.relu(getattr(self, f"bn{name}")(getattr(self, f"conv{name}")(x)))
        return x if pool is None else getattr(self, f"pool{name[0]}")(x)

    def forward_features(self, x):
        """(B, 3, T, H, W) -> pooled features (B, feature_dim)."""
        for name, _, pool in BLOCKS:
            block = partial(self._block, name, pool)
            if self.grad_checkpointing:  # the ModuleList only tells the checkpoint which params/BNs the block has
                owner = nn.ModuleList([getattr(self, f"conv{name}"), getattr(self, f"bn{name}")])
                x = checkpoint_stage(owner, x, block)
            else:
                x = block(x)
        return self.pool5(x).flatten(1)  # (B, 8w)

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register_encoder
def c3d(num_classes=400, width=64):
    """C3D with BN, global-average pool5 (27.9M params at width 64 with a 400-way fc)."""
    return C3D(num_classes, width)
