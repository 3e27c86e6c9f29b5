"""Video ResNets: r3d_18, mc3_18 and r2plus1d_18, key-for-key torchvision's.

Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition" (CVPR 2018).
The three networks share one ResNet-18 body and differ only in the 3x3x3 "unit":

    "3d"    full 3x3x3 conv                                  (r3d_18, and mc3_18 layer1)
    "2d"    1x3x3 conv, never strides in time                (mc3_18 layers 2-4)
    "2+1d"  1x3x3 spatial conv -> BN -> ReLU -> 3x1x1 temporal conv  (r2plus1d_18)

    x (B, 3, T, H, W) -> stem -> layer1..layer4 -> avgpool -> (B, 8*width) -> fc -> (B, num_classes)

With `width=64` the module tree, `state_dict()` keys, order, shapes and outputs are those of
`torchvision.models.video.{r3d_18, mc3_18, r2plus1d_18}`, so their Kinetics-400 weights load as-is.
Smaller widths scale every stage (width * (1, 2, 4, 8)) for tests and CPU demos.
"""

import torch.nn as nn

from videomoco.models.checkpointing import checkpoint_stage
from videomoco.models.registry import register_encoder

def make_conv(kind, in_planes, out_planes, midplanes, stride=1):
    """The 3x3x3 unit of one block conv; `midplanes` is only used by "2+1d"."""
    if kind == "3d":
        return nn.Conv3d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    if kind == "2d":
        return nn.Conv3d(in_planes, out_planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
    if kind == "2+1d":
        # torchvision's Conv2Plus1D is this Sequential: keys .0 spatial conv, .1 mid BN, .3 temporal conv
        return nn.Sequential(
            nn.Conv3d(in_planes, midplanes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )
    raise ValueError(f"unknown conv kind {kind!r}; expected '3d', '2d' or '2+1d'")


def make_stem(kind, width):
    """Stride (1, 2, 2) stem: (B, 3, T, H, W) -> (B, width, T, H/2, W/2)."""
    if kind == "2+1d":
        mid = 45 * width // 64  # torchvision hard-codes 45 mid channels at width 64
        return nn.Sequential(
            nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """conv1 (unit, BN, ReLU) -> conv2 (unit, BN) -> + shortcut -> ReLU."""

    def __init__(self, kind, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        # the (2+1)D width that matches a 3x3x3 conv's parameter count, computed once per block from
        # its (inplanes, planes) and used by both convs, as torchvision does (layer2.0 gets 230, not 288)
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        self.conv1 = nn.Sequential(
            make_conv(kind, inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(make_conv(kind, planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + shortcut)


def make_layer(kind, inplanes, planes, stride, blocks=2):
    """One stage of `blocks` BasicBlocks (2 in ResNet-18); the first block strides and projects the shortcut when needed."""
    downsample = None
    if stride != 1 or inplanes != planes:
        ds_stride = (1, stride, stride) if kind == "2d" else stride
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes, 1, stride=ds_stride, bias=False), nn.BatchNorm3d(planes)
        )
    layer = [BasicBlock(kind, inplanes, planes, stride, downsample)]
    layer += [BasicBlock(kind, planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layer)


class VideoResNet(nn.Module):
    """ResNet-18 for clips `(B, 3, T, H, W)`; `kinds` gives the unit of each of the 4 stages."""

    def __init__(self, kinds, stem, num_classes=400, width=64):
        super().__init__()
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.feature_dim = planes[-1]
        self.stem = make_stem(stem, width)
        self.layer1 = make_layer(kinds[0], width, planes[0], stride=1)
        self.layer2 = make_layer(kinds[1], planes[0], planes[1], stride=2)
        self.layer3 = make_layer(kinds[2], planes[1], planes[2], stride=2)
        self.layer4 = make_layer(kinds[3], planes[2], planes[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self.grad_checkpointing = False  # a plain attribute: not in state_dict()
        init_weights(self)

    def set_grad_checkpointing(self, enable=True):
        """Checkpoint the stem and every residual block of layer1..layer4 in training forwards (timm's API).

        Per block, as timm's `checkpoint_seq(..., flatten=True)`, not per stage: layer1 holds most of
        the activations, so a per-stage checkpoint would recompute nearly all of them at once in backward.
        """
        self.grad_checkpointing = bool(enable)
        return self

    def forward_features(self, x):
        """(B, 3, T, H, W) -> pooled features (B, feature_dim)."""
        if self.grad_checkpointing:
            x = checkpoint_stage(self.stem, x)
            for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
                x = checkpoint_stage(block, x)
        else:
            x = self.stem(x)  # (B, w, T, H/2, W/2)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, T', H/16, W/16)
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def init_weights(model):
    """torchvision's init: Kaiming-normal (fan_out) convs, BN at identity, fc N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_encoder
def r3d_18(num_classes=400, width=64):
    """3D ResNet-18: 3x3x3 convs everywhere (33.4M params at width 64)."""
    return VideoResNet(("3d",) * 4, "3d", num_classes, width)


@register_encoder
def mc3_18(num_classes=400, width=64):
    """Mixed-convolution ResNet-18: 3D convs in layer1, 2D (1x3x3) after (11.7M params)."""
    return VideoResNet(("3d", "2d", "2d", "2d"), "3d", num_classes, width)


@register_encoder
def r2plus1d_18(num_classes=400, width=64):
    """(2+1)D ResNet-18: every 3x3x3 conv factorised into spatial then temporal (31.5M params)."""
    return VideoResNet(("2+1d",) * 4, "2+1d", num_classes, width)
