"""Conv3d (video and volume CNNs, e.g. torchvision's R3D, MC3 and R(2+1)D): the conv rules
of RSP_SPEC §2 over three spatial dimensions, on PyTorch's own 3-D convolutions and their
gradients, with the samples folded into the groups so that each sample has its own filters
(as the 2-D ``grouped_conv`` path does). The products run in the input's precision on every
device; the sectional normalisation and the purge are the kernel set's.

Inner layer, per sample (x̂ = max(x, 0), zero-padded):
  F± = ∂/∂W ⟨conv(x̂, W), R±⟩,  G± = conv(x̂, F±),  S± = R± / G±,
  dx = convT(S⁺, F⁺) − convT(S⁻, F⁻), then the purge (a 1×1×1 conv: x̂ ⊙ dx).
First layer (z^B): Z = conv(x − L, W⁺) + conv(x − H, W⁻) with both inputs zero-padded (the
spec's conv(x, W) − L·conv(1, W⁺) − H·conv(1, W⁻)), S = R / Z,
R_in = (x − L) ⊙ convT(S, W⁺) + (x − H) ⊙ convT(S, W⁻).
Padding is applied explicitly (so "same" with an even kernel pads one side more, as PyTorch
does) and cropped from the result. A Conv3d with a copying ``padding_mode`` is traced into
F.pad (the copy-padding rule) and F.conv3d (``FunctionalConv3d``), as 2-D convs are."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.grad import conv3d_input, conv3d_weight

from ..kernels.reference import per_sample_sum, safe_div
from .base import Context, LayerRule, purged_relevance, rectified_input, unit_scaled
from .conv import ConvCall, same_padding


@dataclass(frozen=True)
class Conv3dGeometry:
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int] | str  # per dimension, or "same" / "valid"
    dilation: tuple[int, int, int]
    groups: int

    def pads(self) -> list[tuple[int, int]]:
        """(before, after) zero padding along T, H, W ("same" with an even kernel pads after more)."""
        if self.padding == "valid":
            return [(0, 0)] * 3
        if self.padding == "same":
            return same_padding(self.kernel, self.dilation)
        return [(p, p) for p in self.padding]


def _triple(v) -> tuple:
    return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def conv3d_geometry(kernel, stride=1, padding=0, dilation=1, groups=1) -> Conv3dGeometry:
    """The geometry of a Conv3d module's or an F.conv3d call's arguments."""
    return Conv3dGeometry(_triple(kernel), _triple(stride), _triple(padding), _triple(dilation), groups)


def _pad(t: torch.Tensor, pads) -> torch.Tensor:
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad lists the last dimension first
    return F.pad(t, flat) if any(flat) else t


def _crop(t: torch.Tensor, pads) -> torch.Tensor:
    T, H, W = t.shape[-3:]
    (t0, t1), (h0, h1), (w0, w1) = pads
    return t[..., t0:T - t1, h0:H - h1, w0:W - w1]


def first_conv3d_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, W: torch.Tensor, g: Conv3dGeometry,
                           pads: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """z^B (RSP_SPEC's first-layer rule) over (T, H, W); ``pads``: (before, after) per dimension in
    place of the conv's own (a zero padding before the conv taken into it)."""
    pads, G = pads or g.pads(), g.groups
    x, W = unit_scaled(x), unit_scaled(W, per_sample=False)
    flat = x.reshape(x.shape[0], -1)
    shape = (-1, 1, 1, 1, 1)
    below = _pad(x - flat.amin(1).view(shape), pads)  # x − L, zero on the padding
    above = _pad(x - flat.amax(1).view(shape), pads)  # x − H
    W_pos, W_neg = W.clamp(min=0), W.clamp(max=0)
    geometry = (g.stride, 0, g.dilation, G)
    Z = F.conv3d(below, W_pos, None, *geometry) + F.conv3d(above, W_neg, None, *geometry)
    S = safe_div(R, Z)
    if ctx.tracking:
        ctx.drop(per_sample_sum(R * (Z == 0)))
    R_in = below * conv3d_input(below.shape, W_pos, S, *geometry) + above * conv3d_input(above.shape, W_neg, S, *geometry)
    return _crop(R_in, pads)


def inner_conv3d_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, g: Conv3dGeometry,
                           non_negative: bool = False, deferred: dict | None = None) -> torch.Tensor:
    pads = g.pads()
    N, C = x.shape[:2]
    O, out = R.shape[1], R.shape[2:]
    G = N * g.groups  # one group per sample and group of the layer
    x_pos = rectified_input(x, non_negative)
    xp = _pad(x_pos, pads).reshape(1, N * C, *[s + a + b for s, (a, b) in zip(x.shape[2:], pads)])
    geometry = (g.stride, 0, g.dilation, G)
    R_pos, R_neg = R.clamp(min=0), (-R).clamp(min=0)
    filters = [conv3d_weight(xp, (N * O, C // g.groups, *g.kernel), Rs.reshape(1, N * O, *out), *geometry)
               for Rs in (R_pos, R_neg)]
    Ga, Gb = (F.conv3d(xp, Fs, None, *geometry).view_as(R) for Fs in filters)
    S_pos, S_neg = ctx.ops.sectional_normalize(R, Ga, Gb)
    dx = (conv3d_input(xp.shape, filters[0], S_pos.reshape(1, N * O, *out), *geometry)
          - conv3d_input(xp.shape, filters[1], S_neg.reshape(1, N * O, *out), *geometry))
    dx = _crop(dx.view(N, C, *xp.shape[2:]), pads)
    return purged_relevance(ctx, R, R, Ga, Gb, dx, x_pos, deferred, pointwise=all(k == 1 for k in g.kernel))


class Conv3d(LayerRule):
    def geometry(self, shapes) -> Conv3dGeometry:
        m = self.module
        return conv3d_geometry(m.kernel_size, m.stride, m.padding, m.dilation, m.groups)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        (x, non_negative), g = self.input_value(ctx), self.geometry(ctx.shapes)
        if self.first and self.zero_pad is not None and len(self.zero_pad[1]) <= 6:
            return [self.padded_first_relevance(ctx, R, g)]
        if self.first:
            return [first_conv3d_relevance(ctx, x, R, self.folded_weight(ctx, x.dtype), g)]
        deferred = self.purge_deferral(ctx, all(k == 1 for k in g.kernel))
        return [inner_conv3d_relevance(ctx, x, R, g, non_negative=non_negative, deferred=deferred)]


    def padded_first_relevance(self, ctx: Context, R: torch.Tensor, g: Conv3dGeometry) -> torch.Tensor:
        """A first conv reading a zero padding (ZeroPad3d, F.pad): z^B on the clip with the padding
        taken into the conv's own, as ``Conv.padded_first_relevance`` does in 2-D; R_in padded
        back with zeros, which the pad's rule crops."""
        padding, x = self.zero_pad[1], self.picture_behind_zero_pad(ctx)
        extra = tuple(padding) + (0,) * (6 - len(padding))  # F.pad order: W's pair, H's, T's
        added = [(extra[4], extra[5]), (extra[2], extra[3]), (extra[0], extra[1])]
        pads = [(a + c, b + d) for (a, b), (c, d) in zip(g.pads(), added)]
        return F.pad(first_conv3d_relevance(ctx, x, R, self.folded_weight(ctx, x.dtype), g, pads), padding)


class FunctionalConv3d(ConvCall, Conv3d):
    """F.conv3d on a parameter (a Conv3d written as a function, or a Conv3d with a copying
    ``padding_mode``, traced into F.pad and this call): the geometry read from the call."""

    def geometry(self, shapes) -> Conv3dGeometry:
        return conv3d_geometry(tuple(shapes[self.call["weight"]][2:]), *self.call_geometry_args())
