"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant: ReLU6, no squeeze-and-excitation)
in plain PyTorch, the embedded default's architecture.

Written out here so that the default model costs neither timm's nor torchvision's import
(about 2 s of every command on a 2-core CPU). Module and parameter names, their order and
every computation follow timm's ``tf_efficientnet_lite0``: its state dicts load as they
are, a layer name (``--layer blocks.5``) means the same in both, and the logits agree
(tests/test_efficientnet_lite.py). Strided convolutions pad TensorFlow's way ("same": the
odd pixel after, not before), as the TensorFlow-trained weights expect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rules.conv import same_pad

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon

# Stages: (block repeats, kernel size, first stride, expansion ratio, output channels).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


class TFSameConv2d(nn.Conv2d):
    """A Conv2d padding as TensorFlow's "same" does for the input it gets (the amounts depend
    on its size); ``same_pad`` tells RSP's conv rule to derive its geometry the same way."""

    same_pad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        (t, b), (l, r) = same_pad(x.shape[-2], kh, sh, dh), same_pad(x.shape[-1], kw, sw, dw)
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free conv padded "same": statically where that is symmetric (stride 1, odd k)."""
    if stride == 1:
        return nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)
    return TFSameConv2d(c_in, c_out, k, stride, groups=groups, bias=False)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by ReLU6 (or nothing): one module, as in timm, so that ``bn2``
    names the activated head features."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()  # on the fresh BN output, as timm does: no second buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Block(nn.Module):
    """A block's layers run in the order they are registered in; the block's input is added
    back where the shapes allow (stride 1, as many channels out as in)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.children():
            y = layer(y)
        return x + y if self.has_skip else y


class DepthwiseSeparableConv(Block):
    """The first stage's block: depthwise k×k, then a linear 1×1 projection."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int):
        super().__init__(c_in, c_out, stride)
        self.conv_dw, self.bn1 = conv(c_in, c_in, k, stride, groups=c_in), BatchNormAct2d(c_in)
        self.conv_pw, self.bn2 = conv(c_in, c_out), BatchNormAct2d(c_out, act=False)


class InvertedResidual(Block):
    """MobileNetV2's block: 1×1 expansion, depthwise k×k, linear 1×1 projection."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int):
        super().__init__(c_in, c_out, stride)
        mid = c_in * expand
        self.conv_pw, self.bn1 = conv(c_in, mid), BatchNormAct2d(mid)
        self.conv_dw, self.bn2 = conv(mid, mid, k, stride, groups=mid), BatchNormAct2d(mid)
        self.conv_pwl, self.bn3 = conv(mid, c_out), BatchNormAct2d(c_out, act=False)


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv_stem = conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = BatchNormAct2d(STEM_CHANNELS)
        stages, c_in = [], STEM_CHANNELS
        for repeats, k, stride, expand, c_out in STAGES:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(DepthwiseSeparableConv(c_in, c_out, k, s) if expand == 1
                              else InvertedResidual(c_in, c_out, k, s, expand))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(c_in, HEAD_CHANNELS)
        self.bn2 = BatchNormAct2d(HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
