"""The first layer's z^B rule (RSP_SPEC §2) for an ungrouped conv of any stride, padding and
dilation, as two Triton kernels over the raw input (NCHW) and the layer's weight.

With L, H the per-sample bounds of the input and W⁺ = max(W, 0), W⁻ = min(W, 0):
  Z = conv(x − L, W⁺) + conv(x − H, W⁻)   (zero-padded: a padded pixel adds nothing)
  S = R / Z where Z ≠ 0, else 0
  R_in = (x − L) ⊙ convT(S, W⁺) + (x − H) ⊙ convT(S, W⁻)
This is the spec's conv(x, W) − L·conv(1, W⁺) − H·conv(1, W⁻) and its three back-projections
regrouped: every term of Z is ≥ 0, so TF32 products lose no digits to cancellation, and two
transposed products replace three. The first kernel writes only S (position-major, for the
second's gathers); the second gathers S per input pixel over the taps that reach it and
combines with x in its epilogue. cuDNN instead runs a 9-channel convolution and a 9-channel
transposed one in FFMA kernels, with Z and S passed over in between.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...tf32 import matmul_tf32
from . import GRID_YZ_LIMIT
from .conv_products import _dot


@triton.jit
def _sections_kernel(x_ptr, w_ptr, bounds_ptr, r_ptr, s_ptr, O, C, K, L, H, W, Wo, KW, T, SY, SX, DY, DX, PT, PL,
                     sxn, sxc, sxh, sxw, srn, sro, srl, ssn, ssl,
                     BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, FP64: tl.constexpr,
                     TF32: tl.constexpr):
    """S[n, l-block, o-block] = R/Z with Z reduced over (channel, tap) = the weight's K columns."""
    pid_l, pid_o, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    oy, ox = rl // Wo, rl % Wo
    low, high = tl.load(bounds_ptr + 2 * n), tl.load(bounds_ptr + 2 * n + 1)
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_L, BLOCK_O), dtype=tl.float64 if FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        c, t = rk // T, rk % T
        y = oy[:, None] * SY + (t // KW)[None, :] * DY - PT
        x = ox[:, None] * SX + (t % KW)[None, :] * DX - PL
        valid = (rl[:, None] < L) & (rk[None, :] < K) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        xv = tl.load(x_base + c[None, :] * sxc + y * sxh + x * sxw, mask=valid, other=0.0)
        w = tl.load(w_ptr + ro[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (ro[None, :] < O), other=0.0)
        acc = _dot(tl.where(valid, xv - low, 0.0), tl.maximum(w, 0.0), acc, FP64, TF32)
        acc = _dot(tl.where(valid, xv - high, 0.0), tl.minimum(w, 0.0), acc, FP64, TF32)
    mask = (rl[:, None] < L) & (ro[None, :] < O)
    r = tl.load(r_ptr + n.to(tl.int64) * srn + ro[None, :] * sro + rl[:, None] * srl, mask=mask, other=0.0).to(acc.dtype)
    s = tl.where(acc != 0, r / tl.where(acc != 0, acc, 1.0), 0.0)
    tl.store(s_ptr + n.to(tl.int64) * ssn + rl[:, None] * ssl + ro[None, :], s.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _back_kernel(s_ptr, w_ptr, x_ptr, bounds_ptr, out_ptr, O, C, K, H, W, Ho, Wo, KW, T, SY, SX, DY, DX, PT, PL,
                 ssn, ssl, sxn, sxc, sxh, sxw,
                 BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, FP64: tl.constexpr,
                 TF32: tl.constexpr):
    """R_in[n, c-block, pixel-block]: S gathered from the output positions whose patches hold
    each pixel, times W⁺ and W⁻ per tap, combined with x − L and x − H."""
    pid_q, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    py, px = rq // W, rq % W
    s_base = s_ptr + n.to(tl.int64) * ssn
    acc_pos = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    acc_neg = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64 if FP64 else tl.float32)
    o_blocks = tl.cdiv(O, BLOCK_O)
    for k in range(0, T * o_blocks):
        t, o0 = k // o_blocks, (k % o_blocks) * BLOCK_O
        # the output position (i, j) whose tap t reads this pixel, where the stride allows one
        i_s = py + PT - (t // KW) * DY
        j_s = px + PL - (t % KW) * DX
        i, j = i_s // SY, j_s // SX
        reached = (rq < H * W) & (i_s >= 0) & (j_s >= 0) & (i_s % SY == 0) & (j_s % SX == 0) & (i < Ho) & (j < Wo)
        ro = o0 + tl.arange(0, BLOCK_O)
        sv = tl.load(s_base + (i * Wo + j)[:, None] * ssl + ro[None, :], mask=reached[:, None] & (ro[None, :] < O),
                     other=0.0)
        w = tl.load(w_ptr + ro[:, None] * K + rc[None, :] * T + t, mask=(ro[:, None] < O) & (rc[None, :] < C), other=0.0)
        acc_pos = _dot(sv, tl.maximum(w, 0.0), acc_pos, FP64, TF32)
        acc_neg = _dot(sv, tl.minimum(w, 0.0), acc_neg, FP64, TF32)
    mask = (rq[:, None] < H * W) & (rc[None, :] < C)
    offsets = n.to(tl.int64) * sxn + rc[None, :] * sxc + py[:, None] * sxh + px[:, None] * sxw
    xv = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_pos.dtype)
    low, high = tl.load(bounds_ptr + 2 * n), tl.load(bounds_ptr + 2 * n + 1)
    out = (xv - low) * acc_pos + (xv - high) * acc_neg
    tl.store(out_ptr + n.to(tl.int64) * C * H * W + rc[None, :] * H * W + rq[:, None], out.to(out_ptr.dtype.element_ty),
             mask=mask)


# CUDA's limit on a launch's third grid dimension, where both kernels put the samples
MAX_SAMPLES = GRID_YZ_LIMIT


def tiles(out_channels: int, columns: int, dtype: torch.dtype, device: torch.device) -> dict[str, dict[str, int]]:
    """Each kernel's tile edges: on a GPU in float32, 128 positions (or pixels) by up to 64 output
    channels (all of a VGG or ResNet stem's), the weight's ``columns`` = C·kh·kw in steps of 32 and
    16 input channels (a stem has 3); float64 and the CPU interpreter: small tiles."""
    if device.type != "cuda" or dtype == torch.float64:
        return {"sections": dict(BLOCK_L=32, BLOCK_O=16, BLOCK_K=16), "back": dict(BLOCK_Q=32, BLOCK_C=16, BLOCK_O=16)}
    block_o = min(64, max(16, triton.next_power_of_2(out_channels)))
    return {"sections": dict(BLOCK_L=128, BLOCK_O=block_o, BLOCK_K=min(32, max(16, triton.next_power_of_2(columns)))),
            "back": dict(BLOCK_Q=128, BLOCK_C=16, BLOCK_O=block_o)}


def first_layer_triton(x: torch.Tensor, R: torch.Tensor, weight: torch.Tensor, stride, dilation, pad,
                       tf32: bool | None = None) -> torch.Tensor:
    """R_in (N, C, H, W) contiguous of the z^B rule for x (N, C, H, W), R (N, O, Ho, Wo) and an
    ungrouped conv's weight (O, C, kh, kw); pad = (left, right, top, bottom). Products in
    float64 for float64 tensors, else in float32, on TF32 tensor cores on CUDA if ``tf32``
    (None: where torch's matmuls may use them)."""
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = R.shape[-2:]
    if weight.shape[1] != C or R.shape[:2] != (N, O) or R.dtype != x.dtype:
        raise ValueError(f"first_layer: x {tuple(x.shape)}, R {tuple(R.shape)}, weight {tuple(weight.shape)} do not fit")
    if x.dtype in (torch.float16, torch.bfloat16):  # products in float32: tl.dot takes no mixed operands
        return first_layer_triton(x.float(), R.float(), weight.float(), stride, dilation, pad, tf32).to(x.dtype)
    if N > MAX_SAMPLES:  # the samples are independent
        return torch.cat([first_layer_triton(x[i:i + MAX_SAMPLES], R[i:i + MAX_SAMPLES], weight, stride, dilation, pad, tf32)
                          for i in range(0, N, MAX_SAMPLES)])
    T, K, L = kh * kw, C * kh * kw, Ho * Wo
    flat = x.reshape(N, -1)
    bounds = torch.stack([flat.amin(1), flat.amax(1)], 1).contiguous()  # L, H per sample
    w = weight.detach().to(x.dtype).reshape(O, K).contiguous()
    R = R.reshape(N, O, L)
    fp64 = x.dtype == torch.float64
    tf32 = matmul_tf32() if tf32 is None else tf32
    flags = dict(FP64=fp64, TF32=not fp64 and x.is_cuda and tf32)
    geometry = (kw, T, *stride, *dilation, pad[2], pad[0])
    t = tiles(O, K, x.dtype, x.device)

    S = torch.empty((N, L, O), dtype=x.dtype, device=x.device)
    ts = t["sections"]
    _sections_kernel[(triton.cdiv(L, ts["BLOCK_L"]), triton.cdiv(O, ts["BLOCK_O"]), N)](
        x, w, bounds, R, S, O, C, K, L, H, W, Wo, *geometry, *x.stride(), *R.stride(), *S.stride()[:2],
        **ts, **flags, num_warps=4)

    out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device)
    tb = t["back"]
    _back_kernel[(triton.cdiv(H * W, tb["BLOCK_Q"]), triton.cdiv(C, tb["BLOCK_C"]), N)](
        S, w, x, bounds, out, O, C, K, H, W, Ho, Wo, *geometry, *S.stride()[:2], *x.stride(),
        **tb, **flags, num_warps=4)
    return out
