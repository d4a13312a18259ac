"""Conv2d: the heart of RSP (RSP_SPEC.md §2).

Inner layers use per-sample sectional filters built from the relevance itself (the
layer's weights are ignored); the first layer, which sees pixels, uses the z^B rule with
the (BatchNorm-folded) weights. Padding is applied explicitly so that asymmetric
"same" padding (timm's Conv2dSame) and PyTorch's ``padding="same"`` share one code path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..environment import setting
from ..kernels.reference import per_sample_sum, safe_div, stacked_sections
from ..kernels.triton import triton_unavailable_reason
from ..tf32 import matmul_tf32
from .base import Context, LayerRule, input_scale, purged_relevance, rectified_input, unit_scaled
from . import conv_paths


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)

    @property
    def is_pointwise(self) -> bool:
        return self.kernel == (1, 1)

    @property
    def patches_are_input(self) -> bool:
        """A stride-1, unpadded 1×1 conv: its patch matrix is its input, no unfolding needed."""
        return self.is_pointwise and self.stride == (1, 1) and not any(self.pad)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        l, r, t, b = self.pad
        return ((h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1)


def same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one dimension: (before, after), the odd pixel after."""
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def is_same_padding_conv(module: nn.Module) -> bool:
    """timm's Conv2dSame, StdConv2dSame, rsp_fast's TFSameConv2d (TF-style padding computed from the input size
    at run time; a module says so with ``same_pad = True``)."""
    return isinstance(module, nn.Conv2d) and (type(module).__name__ == "Conv2dSame" or getattr(module, "same_pad", False) is True)


CONV_CALL_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")  # F.convNd's, in order


class _Conv2dCalls(TorchFunctionMode):
    """Records the arguments of every conv2d call made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", None) == "conv2d":
            self.calls.append({**dict(zip(CONV_CALL_ARGS, args)), **kwargs, "output": out})
        return out


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def effective_conv_weight(module: nn.Conv2d) -> torch.Tensor | None:
    """The weight a Conv2d with its own ``forward`` (timm's weight-standardised StdConv2d,
    ScaledStdConv2d) passes to conv2d, found by running it once on a small probe; None
    unless it makes exactly one conv2d call, on its input (or on the TF-style "same" padding of
    it, which the rule works out itself), with the module's own geometry, and returns that call's
    output; other forwards are
    traced into. (Inner layers only need the geometry; a first layer's z^B rule needs this weight.)"""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    w = module.weight
    probe = w.new_zeros(1, module.in_channels, (kh - 1) * dh + 2 * sh + 1, (kw - 1) * dw + 2 * sw + 1)
    calls = _Conv2dCalls()
    try:
        with torch.no_grad(), calls:
            result = type(module).forward(module, probe)  # not module(probe): the user's hooks must not see the probe
    except Exception:
        return None
    # one conv of the input itself (or of its TF "same" padding, which the rule works out itself),
    # whose output is the module's (a gain or a norm applied after it changes the effective weights)
    if (len(calls.calls) != 1 or calls.calls[0]["output"] is not result
            or not (calls.calls[0].get("input") is probe or is_same_padding_conv(module))):
        return None
    c = calls.calls[0]
    padding = c.get("padding", 0)
    same_geometry = (_pair(c.get("stride", 1)) == _pair(module.stride) and _pair(c.get("dilation", 1)) == _pair(module.dilation)
                     and c.get("groups", 1) == module.groups
                     and (padding == module.padding if isinstance(padding, str) else _pair(padding) == _pair(module.padding)))
    weight = c.get("weight")
    if not same_geometry or not isinstance(weight, torch.Tensor) or weight.shape != w.shape:
        return None
    return weight.detach()


CONV_MODULES = (nn.Conv1d, nn.Conv2d)
PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def has_plain_conv_forward(module: nn.Module) -> bool:
    """nn.Conv1d's, nn.Conv2d's or nn.Conv3d's own forward, or timm's Conv2dSame (that forward
    after TF-style padding)."""
    return type(module).forward in PLAIN_CONV_FORWARDS or type(module).__name__ == "Conv2dSame"


# A 1-D conv is explained as the 2-D conv it equals on a 1×L image: its tensors get a
# height of 1, its kernel, stride, padding and dilation a first entry of 1, 1, 0, 1.
def as_image(t: torch.Tensor) -> torch.Tensor:
    """A 1-D conv's N×C×L input, output or weight as N×C×1×L (2-D ones unchanged)."""
    return t.unsqueeze(-2) if t.dim() == 3 else t


def image_shape(shape) -> tuple:
    return tuple(shape[:-1]) + (1, shape[-1]) if len(shape) == 3 else tuple(shape)


def _as_2d(value, first):
    """A 1-D conv argument (an int, a 1-tuple, or "same"/"valid") as the 2-D one."""
    if isinstance(value, str):
        return value
    return (first, value[0] if isinstance(value, (tuple, list)) else value)


def conv_geometry(module: nn.Conv1d | nn.Conv2d, in_hw: tuple[int, int]) -> ConvGeometry:
    if isinstance(module, nn.Conv1d):
        return call_geometry(module.kernel_size, module.stride, module.padding, module.dilation, module.groups, one_d=True)
    if is_same_padding_conv(module):
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        (t, b), (l, r) = same_pad(in_hw[0], kh, sh, dh), same_pad(in_hw[1], kw, sw, dw)
        return ConvGeometry((kh, kw), (sh, sw), (dh, dw), module.groups, (l, r, t, b))
    return call_geometry(module.kernel_size, module.stride, module.padding, module.dilation, module.groups)


def call_geometry(kernel, stride=1, padding=0, dilation=1, groups=1, one_d: bool = False) -> ConvGeometry:
    """The geometry of a conv2d call with these arguments (ints, pairs, "same" or "valid");
    ``one_d``: of a conv1d call, as the conv2d one on a 1×L image."""
    if one_d:
        kernel, stride, padding, dilation = _as_2d(kernel, 1), _as_2d(stride, 1), _as_2d(padding, 0), _as_2d(dilation, 1)
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel), _pair(stride), _pair(dilation)
    if padding == "same":
        (t, b), (l, r) = same_padding((kh, kw), (dh, dw))
    elif padding == "valid":
        t = b = l = r = 0
    else:
        (t, l) = _pair(padding)
        b, r = t, l
    return ConvGeometry((kh, kw), (sh, sw), (dh, dw), groups, (l, r, t, b))


def _pad(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    return F.pad(x, g.pad) if any(g.pad) else x


def _crop(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    l, r, t, b = g.pad
    return x[..., t : x.shape[-2] - b, l : x.shape[-1] - r]


def conv_transpose_to(S: torch.Tensor, W: torch.Tensor, g: ConvGeometry, padded_hw: tuple[int, int]) -> torch.Tensor:
    """The adjoint of the (unpadded-input) conv, sized to the padded input."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    oh, ow = S.shape[-2:]
    op = (padded_hw[0] - ((oh - 1) * sh + dh * (kh - 1) + 1), padded_hw[1] - ((ow - 1) * sw + dw * (kw - 1) + 1))
    return F.conv_transpose2d(S, W, stride=g.stride, output_padding=op, groups=g.groups, dilation=g.dilation)


# The first layer's z^B rule on CUDA as two Triton kernels (kernels/triton/first_layer.py: S
# formed without Z reaching memory, the back-projection combined with x in its epilogue) instead
# of cuDNN's convolutions and the passes between them. Opt-in (RSP_FAST_CUDA_FUSED_FIRST_LAYER=1):
# slower than cuDNN's on an H100 (docs/gpu/h100_first_layer_session20.json, batch 64, TF32:
# VGG16's conv1_1 8.12 against 5.69 ms, ResNet50's conv1 18.3 against 3.08).


def first_conv_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, W: torch.Tensor, g: ConvGeometry,
                         fused: bool | None = None) -> torch.Tensor:
    """z^B rule: inputs bounded by L = min(x), H = max(x) per sample; no bias in Z.

    Z = conv(x − L, W⁺) + conv(x − H, W⁻), every term ≥ 0: the same sum as the authors'
    conv(x, W) − L·conv(1, W⁺) − H·conv(1, W⁻) without its cancellation (on a blank picture,
    x = L = H, theirs leaves rounding noise that S = R/Z turns into relevance as large as R;
    on a photo's saturated regions, error). One convolution of the stacked input [x − L, x − H]
    (per group, zero-padded like x) with [W⁺, W⁻]; the back-projection one transposed
    convolution with [W⁺, W⁻], combined as (x − L)·b⁺ + (x − H)·b⁻: the wide (output-channel)
    tensors are written once. ``fused``: the Triton kernels instead (ungrouped convs, dropped
    relevance not tracked); None: on CUDA where enabled, with a kernel backend."""
    x, W = unit_scaled(x), unit_scaled(W, per_sample=False)
    if fused is None:
        fused = (x.is_cuda and setting("RSP_FAST_CUDA_FUSED_FIRST_LAYER") and ctx.ops.name != "torch"
                 and triton_unavailable_reason(x.device) == "")
    if fused and g.groups == 1 and not ctx.tracking:
        from ..kernels.triton.first_layer import first_layer_triton

        # 16-bit products elsewhere: TF32 here (cuDNN's convolutions use it by default too)
        tf32 = ctx.product_dtype is not None or matmul_tf32()
        return first_layer_triton(x, R, W, g.stride, g.dilation, g.pad, tf32)
    N, C = x.shape[:2]
    G = g.groups
    flat = x.reshape(N, -1)
    bounds = torch.stack([flat.amin(1), flat.amax(1)], 1).view(N, 1, 2, 1, 1, 1)  # L, H per sample
    shifted = (x.reshape(N, G, 1, C // G, *x.shape[-2:]) - bounds).reshape(N, 2 * C, *x.shape[-2:])  # [x − L, x − H]
    padded = _pad(shifted, g)
    W_sections = torch.cat([W.clamp(min=0), W.clamp(max=0)], 1)
    Z = F.conv2d(padded, W_sections, stride=g.stride, dilation=g.dilation, groups=G)
    S = safe_div(R, Z)
    if ctx.tracking:
        ctx.drop(per_sample_sum(R * (Z == 0)))
    back = _crop(conv_transpose_to(S, W_sections, g, padded.shape[-2:]), g) * shifted
    return back.view(N, G, 2, C // G, *x.shape[-2:]).sum(2).reshape(x.shape)


# Block edges of the Gram product at multiples of 16 elements: each block's GEMM operands then start
# on 32-byte boundaries in bfloat16, as cuBLAS's tensor-core kernels want (cut at multiples of
# 196, VGG16's conv4 blocks were 8-byte misaligned in bfloat16, and an H100 ran bfloat16 GEMMs of
# that pass on its 4-byte-aligned kernels).
GEMM_ALIGN = 16


def gram_block_edges(L: int, block: int) -> list[int]:
    """Where ``patch_gram`` cuts L positions into blocks of about ``block``: whole multiples of
    GEMM_ALIGN (or of ``block`` when it is smaller)."""
    align = min(GEMM_ALIGN, block)
    width = -(-L // -(-L // block))  # the blocks as even as they can be
    width = -(-width // align) * align
    return list(range(0, L, width)) + [L]


def patch_gram(cols: torch.Tensor, block: int = 256) -> torch.Tensor:
    """K = colsᵀ·cols for (..., ck, L) patches. K is symmetric: from ``2·block`` positions on,
    only the blocks on and above the diagonal are multiplied and the rest mirrored (about 1.25×
    faster for VGG16's conv4 layers, L = 784, here)."""
    L = cols.shape[-1]
    if L < 2 * block:
        return cols.transpose(-1, -2) @ cols
    edges = gram_block_edges(L, block)
    parts = len(edges) - 1
    K = cols.new_empty(*cols.shape[:-2], L, L)
    for i in range(parts):
        span_i = slice(edges[i], edges[i + 1])
        left = cols[..., span_i].transpose(-1, -2)
        for j in range(i, parts):
            span_j = slice(edges[j], edges[j + 1])
            K[..., span_i, span_j] = left @ cols[..., span_j]
            if j > i:
                K[..., span_j, span_i] = K[..., span_i, span_j].transpose(-1, -2)
    return K


def _tap_views(t: torch.Tensor, g: ConvGeometry, out_hw, padded_hw) -> list[torch.Tensor]:
    """For a (..., P, P) matrix over the padded input's pixels (P = Hp·Wp) of a stride-1 conv:
    per tap δ the (..., L, L) view of its entries [p(l) + δ, p(l') + δ], p(l) the pixel where
    output l's patch starts."""
    (Ho, Wo), (Hp, Wp) = out_hw, padded_hw
    t6 = t.view(*t.shape[:-2], Hp, Wp, Hp, Wp)
    views = []
    for ky in range(g.kernel[0]):
        for kx in range(g.kernel[1]):
            rows, cols = slice(ky * g.dilation[0], ky * g.dilation[0] + Ho), slice(kx * g.dilation[1], kx * g.dilation[1] + Wo)
            views.append(t6[..., rows, cols, rows, cols])
    return views


# The pixel-Gram path holds about 2·L² + 2·P² elements per sample and group (K and M, the pixel
# Gram and Q); samples go through it in chunks of at most this many elements (128 MB in float32).
GRAM_CHUNK_ELEMENTS = 2**25


def pixel_gram_products(X: torch.Tensor, g: ConvGeometry, out_hw, padded_hw, responses_to_M, dtype: torch.dtype):
    """The Gram path of a stride-1 conv without unfolding its patches. With X (..., C, P) the
    padded input and Π = XᵀX the Gram matrix of its pixels (C·P² multiply-adds, not ck·L²),
    the patch Gram is a sum over the taps, K[l, l'] = Σ_δ Π[p(l)+δ, p(l')+δ], and the folded
    back-projection fold(Xᵤ·M) is X·Q with Q[p(l)+δ, p(l')+δ] += M[l, l'] for every tap.
    ``responses_to_M`` maps K (..., L, L) to M = R±ᵀS±; the tap sums accumulate in ``dtype``.
    Returns the back-projection at the padded input, (..., C, P)."""
    Ho, Wo = out_hw
    L = Ho * Wo
    K = X.new_zeros(*X.shape[:-2], Ho, Wo, Ho, Wo, dtype=dtype)
    for view in _tap_views(patch_gram(X), g, out_hw, padded_hw):
        K += view
    M = responses_to_M(K.view(*X.shape[:-2], L, L).to(X.dtype))
    Q = X.new_zeros(*X.shape[:-2], X.shape[-1], X.shape[-1], dtype=dtype)
    M6 = M.view(*M.shape[:-2], Ho, Wo, Ho, Wo)
    for view in _tap_views(Q, g, out_hw, padded_hw):
        view += M6
    return X @ Q.to(X.dtype)


def _depthwise_filters(x_img: torch.Tensor, R_img: torch.Tensor, g: ConvGeometry, groups: int) -> torch.Tensor:
    """A depthwise conv's weight gradient F[c, ky, kx] = Σ_ij R[c, i, j]·x[c, i·s + ky·d, j·s + kx·d]
    computed as a forward correlation of x with R as the kernel (dilated by the stride, stepping by
    the dilation): oneDNN's depthwise weight-gradient kernels are up to ~90× slower than this for
    5×5 kernels here (EfficientNet), and no faster for 3×3."""
    out = F.conv2d(x_img, R_img.reshape(-1, 1, *R_img.shape[-2:]), stride=g.dilation, dilation=g.stride, groups=groups)
    kh, kw = g.kernel
    return out[0, :, :kh, :kw].unsqueeze(1).contiguous()


def _conv_kernel_products(xp: torch.Tensor, Rs: torch.Tensor, g: ConvGeometry, out_hw, normalize, normalize_stacked, low,
                          fold_samples: bool = False):
    """The filter path on PyTorch's convolution kernels, each sample with its own sectional
    filters: weight gradient -> F±, convolution -> G±, input gradient -> back-projection.
    Dense layers run one sample at a time (on CPU as fast as one call with the samples folded
    into groups, and the filters and responses held at once are one sample's), or with
    ``fold_samples`` as one grouped call. Depthwise layers fold the samples into the groups
    they have anyway. Returns the back-projection at the padded input, N×C×Hp×Wp."""
    N, C, Hp, Wp = xp.shape
    dtype = xp.dtype
    x_low = low(xp)
    Og = Rs.shape[2] // 2

    def products(x_img: torch.Tensor, groups: int):
        common = dict(bias_sizes=None, stride=list(g.stride), padding=[0, 0], dilation=list(g.dilation),
                      transposed=False, output_padding=[0, 0], groups=groups)

        def filters(R):  # sectional filters per sample and group: the conv's weight gradient
            R_img = R.reshape(1, -1, *out_hw)
            if C == g.groups:
                return _depthwise_filters(x_img, R_img, g, groups)
            shape = [R_img.shape[1], C // g.groups, *g.kernel]
            return torch.ops.aten.convolution_backward(R_img, x_img, x_img.new_empty(1).expand(shape),
                                                       output_mask=[False, True, False], **common)[1]

        def responses(Fw, like):  # normalised in the input's precision
            return F.conv2d(x_img, Fw, stride=g.stride, dilation=g.dilation, groups=groups).reshape(like.shape).to(dtype)

        def back(S, Fw):
            return torch.ops.aten.convolution_backward(low(S).reshape(1, -1, *out_hw), x_img, Fw,
                                                       output_mask=[True, False, False], **common)[0].to(dtype)
        return filters, responses, back

    if C == g.groups or fold_samples:  # every sample its own groups
        filters, responses, back = products(x_low.reshape(1, N * C, Hp, Wp), N * g.groups)
        if C == g.groups:
            # Depthwise: one section at a time keeps oneDNN's depthwise kernels (a channel
            # multiplier of 2 falls off them: 3× slower here).
            Rs_low = low(Rs)
            Rp, Rn = Rs_low[:, :, :Og], Rs_low[:, :, Og:]
            Fp, Fn = filters(Rp), filters(Rn)
            Sp, Sn = normalize(responses(Fp, Rp), responses(Fn, Rn))
            return (back(Sp, Fp) - back(Sn, Fn)).reshape(N, C, Hp, Wp)
        Fs = filters(low(Rs))  # both sections in each product
        return back(normalize_stacked(responses(Fs, Rs)), Fs).reshape(N, C, Hp, Wp)
    dx = xp.new_empty(N, C, Hp, Wp)
    for i in range(N):  # both sections in each product: [R⁺; R⁻]
        filters, responses, back = products(x_low[i:i + 1], g.groups)
        Fs = filters(low(Rs[i:i + 1]))
        dx[i:i + 1] = back(normalize_stacked(responses(Fs, Rs[i:i + 1]), slice(i, i + 1)), Fs)
    return dx


def _nonzeros_per_sample(R: torch.Tensor, every: int = 8) -> float:
    """nnz(R) per sample, estimated from every 8th channel: the path choice needs no exact
    count, and a full count costs a few per cent of a small network's pass."""
    sample = R[:, ::every]
    return float((sample != 0).sum()) * R.shape[1] / (sample.shape[1] * R.shape[0])


def inner_conv_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, g: ConvGeometry, path: str | None = None,
                         non_negative: bool = False, deferred: dict | None = None) -> torch.Tensor:
    """Per-sample sectional filters F± = R±·X̂ᵤᵀ (per group), responses G± = F±·X̂ᵤ, sectional
    normalisation, one back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻, then the purge (k > 1) or not (1×1).
    ``non_negative``: x is known to be ≥ 0 (a ReLU's output, say), so x̂ = x needs no copy.
    ``deferred``: a dict to fill with what the purge needs, returning x̂⊙dx unpurged."""
    if g.is_pointwise and g.stride != (1, 1) and not any(g.pad):
        return _strided_pointwise_relevance(ctx, x, R, g, path, non_negative)
    N, C = x.shape[:2]
    G, O = g.groups, R.shape[1]
    Og, L = O // G, R.shape[-2] * R.shape[-1]
    # the compiled kernels work in the input's precision (under precision="bf16" too: they are CPU
    # kernels, and more exact than asked) and never form Ga and Gb, which tracking reads; the
    # masked ones take dense layers, samples within their 32-bit offsets
    l, r, t, b = g.pad
    k2, Cp = g.kernel[0] * g.kernel[1], conv_paths.masked_channels(C, x.element_size())
    compiled = (ctx.product_dtype is None or not x.is_cuda) and not ctx.tracking
    masked = (compiled and ctx.ops.masked_products is not None and G == 1
              and (x.shape[-2] + t + b) * (x.shape[-1] + l + r) * Cp < 2**31)
    nonzeros = _nonzeros_per_sample(R) if masked and path is None else None
    # depthwise: the products fused per plane where that kernel exists; dense stride-1 1×1 convs: per tile
    fused_depthwise = (compiled and C == G and ctx.ops.depthwise_products is not None
                       and k2 <= conv_paths.DEPTHWISE_MAX_TAPS)
    low = ctx.product_dtype or x.dtype
    speedup = conv_paths.torch_products_speedup(x.is_cuda, low)
    fused_pointwise = compiled and G == 1 and g.patches_are_input and ctx.ops.pointwise_products is not None
    # Triton's implicit GEMMs: a path of the kernel backends, not of the pure-PyTorch reference
    # (unless the caller names it); tracking reads the responses, which the fused kernels never form
    implicit_runs = ((path is not None or ctx.ops.name != "torch") and deferred is None  # they fuse the purge
                     and conv_paths.implicit_gemm_fits(g, C, O, tuple(x.shape[-2:]), L)
                     and not ctx.tracking and triton_unavailable_reason(x.device) == "")
    tap_sums = conv_paths.tap_sums_pay(x.is_cuda, low, implicit_runs)
    pixel_gram = conv_paths.pixel_gram_macs(g, C // G, x.shape[-2:], L, tap_sums)
    path = path or ("depthwise" if fused_depthwise else
                    conv_paths.choose_path(C // G * k2, Og, L, g.patches_are_input, x.is_cuda and C != G, nonzeros,
                                           Cp * k2, pixel_gram, conv_paths.on_tensor_cores(low), implicit_runs,
                                           conv_paths.cuda_gram_slowdown(low), fused_pointwise, G > 1, speedup))
    path = conv_paths.runnable_dense_path(path, implicit_runs, x.is_cuda, low, L)
    if path in ("implicit_gemm", "implicit_gram"):
        return _implicit_gemm_relevance(ctx, x, R, g, non_negative, gram=path == "implicit_gram")
    x_pos = rectified_input(x, non_negative)
    Rg = R.reshape(N, G, Og, L)
    if path == "masked":
        dx, Ga, Gb = ctx.ops.masked_products(x_pos, R, g.kernel, g.stride, g.dilation, g.pad), None, None
    elif path == "depthwise":
        dx, Ga, Gb = ctx.ops.depthwise_products(x_pos, R, g.kernel, g.stride, g.dilation, g.pad), None, None
    elif path == "pointwise":
        dx, Ga, Gb = ctx.ops.pointwise_products(x_pos, R), None, None
    else:
        dx, Ga, Gb = _dense_products(ctx, x_pos, Rg, g, path, R.shape[-2:], pixel_gram is not None)
    return purged_relevance(ctx, R, Rg, Ga, Gb, dx, x_pos, deferred, pointwise=g.is_pointwise)


def _strided_pointwise_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, g: ConvGeometry, path: str | None,
                                 non_negative: bool) -> torch.Tensor:
    """A strided 1×1 conv (ResNet's downsampling shortcuts) reads only the pixels on its stride
    grid: RSP through it is RSP through a stride-1 1×1 conv of those pixels, whose patch matrix is
    the input itself (the filter, Gram and masked paths, no unfolding), and the other pixels get
    no relevance (1×1 convs are not purged)."""
    (sh, sw), (h, w) = g.stride, R.shape[-2:]
    R_in = x.new_zeros(x.shape)
    picked = x[..., ::sh, ::sw][..., :h, :w]
    R_in[..., ::sh, ::sw][..., :h, :w] = inner_conv_relevance(ctx, picked.contiguous(), R, replace(g, stride=(1, 1)),
                                                              path, non_negative)
    return R_in


def _dense_products(ctx: Context, x_pos: torch.Tensor, Rg: torch.Tensor, g: ConvGeometry, path: str, out_hw,
                    pixel_gram: bool):
    """The back-projection at the input by the filter, conv or Gram path, both sections through
    each product together ([R⁺; R⁻], [S⁺; −S⁻]); and, when tracking, the responses Ga, Gb.
    ``pixel_gram``: the Gram path through the pixels' Gram matrix (``pixel_gram_macs`` said so)."""
    G, Og, L = Rg.shape[1:]
    Rs = stacked_sections(Rg, dim=2)  # N, G, 2·O/G, L: [R⁺; R⁻]
    xp = _pad(x_pos, g)
    N, C, Hp, Wp = xp.shape
    seen = []

    def normalize(Ga: torch.Tensor, Gb: torch.Tensor):
        seen.append((Ga, Gb))
        return ctx.ops.sectional_normalize(Rg, Ga, Gb)

    def normalize_stacked(Gs: torch.Tensor, samples: slice = slice(None)) -> torch.Tensor:
        """[S⁺; −S⁻] for the stacked responses of ``samples``."""
        if ctx.tracking:  # the dropped-relevance accounting reads Ga and Gb
            seen.append((Gs[:, :, :Og], Gs[:, :, Og:]))
        return ctx.ops.sectional_normalize_stacked(Rs[samples], Gs, Og)

    if path in ("conv", "grouped_conv"):
        dx = _crop(_conv_kernel_products(xp, Rs, g, out_hw, normalize, normalize_stacked, ctx.low,
                                         fold_samples=path == "grouped_conv"), g)
    else:
        Rs_low = ctx.low(Rs)

        def normalized_responses(A, B, samples: slice = slice(None)):  # [S⁺; −S⁻] for the stacked responses A·B
            if ctx.ops.sectional_matmul is not None and not ctx.tracking:
                return ctx.ops.sectional_matmul(A, B, Rs_low[samples], Og)  # fused: the responses never reach memory
            return ctx.low(normalize_stacked((A @ B).to(x_pos.dtype), samples))

        if path == "gram" and pixel_gram:
            X = ctx.low(xp).reshape(N, G, C // G, Hp * Wp)
            dX = torch.empty_like(X)
            # samples in chunks: the L×L and P×P matrices of a whole batch of large maps would not fit
            chunk = max(1, GRAM_CHUNK_ELEMENTS // (G * (2 * L * L + 2 * Hp * Wp * Hp * Wp)))
            for i in range(0, N, chunk):
                part = slice(i, i + chunk)
                dX[part] = pixel_gram_products(
                    X[part], g, out_hw, (Hp, Wp),
                    lambda K: Rs_low[part].transpose(-1, -2) @ normalized_responses(Rs_low[part], K, part), x_pos.dtype)
            dx = _crop(dX.reshape(N, C, Hp, Wp), g).to(x_pos.dtype)
        else:
            dx = _unfolded_products(ctx, xp, Rs_low, g, path, normalized_responses).to(x_pos.dtype)
    # only read when tracking, which never fuses; one piece per sample on the conv path
    Ga, Gb = (torch.cat(pieces) for pieces in zip(*seen)) if seen else (None, None)
    return dx, Ga, Gb


def _implicit_gemm_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, g: ConvGeometry,
                             non_negative: bool, gram: bool = False) -> torch.Tensor:
    """The conv rule end to end on Triton's implicit GEMMs (stride 1, one group): x̂ formed as the
    input is copied channels-last in the products' precision, the products by the filters (or
    ``gram``: by the Gram path), the purge's 2·x̂⊙dx (a 1×1 conv's x̂⊙dx) written by the
    back-projection, then the purge's shift; the same values as the other paths'
    rectified_input, products and purge, in fewer passes over the layer's tensors."""
    from ..kernels.triton import conv_products as kernels
    from ..kernels.triton.purge import shift_active

    N, O = R.shape[:2]
    chunk = kernels.max_samples(g.kernel)
    if N > chunk:  # more samples than one launch's grid holds: the samples are independent
        return torch.cat([_implicit_gemm_relevance(ctx, x[i:i + chunk], R[i:i + chunk], g, non_negative, gram)
                          for i in range(0, N, chunk)])
    x = kernels.with_pixel_stride(x)  # once, for the copy and the back-projection's epilogue
    scale = input_scale(x, non_negative)
    x_cl = kernels.pack_input(x, scale, ctx.product_dtype or x.dtype)
    counts = None if g.is_pointwise else torch.zeros(N, dtype=torch.int32, device=x.device)
    products = kernels.gram_products_triton if gram else kernels.conv_products_triton
    out = products(x_cl, R.reshape(N, O, -1), g.kernel, g.dilation, g.pad, R.shape[-2:], x.dtype,
                   combine=kernels.Combination(x, scale, counts))
    return out if counts is None else shift_active(out, per_sample_sum(R), counts)


def _unfolded_products(ctx: Context, xp: torch.Tensor, Rs_low: torch.Tensor, g: ConvGeometry, path: str,
                       normalized_responses) -> torch.Tensor:
    """The filter or (patch) Gram path on the unfolded patches Xᵤ; the back-projection at the input."""
    N, C, Hp, Wp = xp.shape
    G, L = Rs_low.shape[1], Rs_low.shape[-1]
    if g.patches_are_input:  # no im2col/col2im copies
        cols = ctx.low(xp).reshape(N, G, C // G, L)
    else:
        cols = F.unfold(ctx.low(xp), g.kernel, dilation=g.dilation, stride=g.stride).view(N, G, -1, L)
    if path == "gram":
        K = patch_gram(cols)  # N, G, L, L
        dcols = cols @ (Rs_low.transpose(-1, -2) @ normalized_responses(Rs_low, K))
    else:
        Fs = Rs_low @ cols.transpose(-1, -2)  # N, G, 2·O/G, C/G·k²
        dcols = Fs.transpose(-1, -2) @ normalized_responses(Fs, cols)
    if not dcols.is_cuda:  # CUDA's col2im sums the k² overlaps in float32: fold first, cast the k²-times smaller result
        dcols = dcols.to(xp.dtype)
    if g.patches_are_input:
        return dcols.reshape(N, C, Hp, Wp)
    return _crop(F.fold(dcols.reshape(N, -1, L), (Hp, Wp), g.kernel, dilation=g.dilation, stride=g.stride), g)


class Conv(LayerRule):
    def weight(self, ctx: Context) -> torch.Tensor:
        if has_plain_conv_forward(self.module):
            return self.module.weight
        return effective_conv_weight(self.module)  # checked when the plan was built

    def geometry(self, shapes, in_hw: tuple[int, int]) -> ConvGeometry:
        return conv_geometry(self.module, in_hw)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        x, non_negative = self.input_value(ctx)
        x_img, R_img = as_image(x), as_image(R)
        g = self.geometry(ctx.shapes, tuple(x_img.shape[-2:]))
        if self.first and self.zero_pad is not None and len(self.zero_pad[1]) <= 2 * (x.dim() - 2):
            return [self.padded_first_relevance(ctx, R_img, g)]
        if self.first:
            R_in = first_conv_relevance(ctx, x_img, R_img, as_image(self.folded_weight(ctx, x.dtype)), g)
        else:
            R_in = inner_conv_relevance(ctx, x_img, R_img, g, non_negative=non_negative,
                                        deferred=self.purge_deferral(ctx, g.is_pointwise))
        return [R_in.reshape(x.shape)]

    def padded_first_relevance(self, ctx: Context, R_img: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
        """A first conv reading a zero padding (ZeroPad2d, F.pad): z^B on the picture with the
        padding taken into the conv's own, so that the zeros count neither in the bounds L, H
        nor as pixels (as a conv's padding argument does); R_in padded back with zeros, which
        the pad's rule crops."""
        padding, x = self.zero_pad[1], self.picture_behind_zero_pad(ctx)
        extra = padding + (0,) * (4 - len(padding))
        g = replace(g, pad=tuple(p + e for p, e in zip(g.pad, extra)))
        R_in = first_conv_relevance(ctx, as_image(x), R_img, as_image(self.folded_weight(ctx, x.dtype)), g)
        return F.pad(R_in.reshape(x.shape), padding)




def same_padding(kernel, dilation) -> list[tuple[int, int]]:
    """(before, after) per dimension of a conv's padding="same": PyTorch puts the odd pixel after."""
    return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]


def conv_call_args(node) -> dict:
    """The arguments of an F.conv{1,2,3}d / torch.conv{1,2,3}d node by name (defaults left out)."""
    return {**dict(zip(CONV_CALL_ARGS, node.args)), **node.kwargs}


class ConvCall:
    """A conv layer written as a function, F.conv{1,2,3}d(x, w, b, stride, padding, dilation,
    groups) with a weight that is a parameter or computed from parameters: its arguments read
    from the call (mixed into a conv rule); the inner rule needs only the kernel's size, a
    first layer the weight's values."""

    def __init__(self, node, inputs, first: bool, bn_scale):
        super().__init__(node, inputs, None, first, bn_scale)
        self.call = conv_call_args(node)
        self.needs_values = list(inputs) + ([self.call["weight"]] if first else [])

    def weight(self, ctx: Context) -> torch.Tensor:
        return ctx.values[self.call["weight"]]

    def call_geometry_args(self) -> tuple:
        """The call's stride, padding, dilation and groups (PyTorch's defaults where not given)."""
        return tuple(self.call.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))


class FunctionalConv(ConvCall, Conv):
    """F.conv1d / F.conv2d on a parameter: the conv rule, its geometry read from the call."""

    def geometry(self, shapes, in_hw: tuple[int, int]) -> ConvGeometry:
        kernel = tuple(shapes[self.call["weight"]][2:])
        return call_geometry(kernel, *self.call_geometry_args(), one_d=len(kernel) == 1)
