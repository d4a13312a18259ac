"""Triton matrix product whose epilogue applies the sectional normalisation.

Computes the stacked responses G = A·B (batched) and, in the same kernel, the stacked
normalised relevance S = [R⁺/G⁺; −R⁻/G⁻] (zero where R or G is zero), so G never travels
to memory. Rows [0, half) are the target section, rows [half, 2·half) the hostile one.
The filter path calls it with A = [F⁺; F⁻], B = X̂ᵤ; the Gram path with A = [R⁺; R⁻], B = K.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...tf32 import matmul_tf32
from . import GRID_YZ_LIMIT

MAX_GRID_Z = GRID_YZ_LIMIT


@triton.jit
def _sectional_matmul_kernel(a_ptr, b_ptr, r_ptr, s_ptr, M, N, K, half,
                             sab, sam, sak, sbb, sbk, sbn, srb, srm, srn, ssb, ssm, ssn,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP64: tl.constexpr,
                             TF32: tl.constexpr):
    pid_m, pid_n, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch.to(tl.int64) * sab
    b_base = b_ptr + batch.to(tl.int64) * sbb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if FP64 else tl.float32)  # fp16/bf16/fp32 accumulate in fp32
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_base + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_base + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if TF32:  # float32 operands on TF32 tensor cores, as torch's products do under allow_tf32
            acc += tl.dot(a, b, input_precision="tf32")
        else:
            acc += tl.dot(a, b, input_precision="ieee")
    # epilogue: the sectional normalisation of this tile of responses
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    r = tl.load(r_ptr + batch.to(tl.int64) * srb + rm[:, None] * srm + rn[None, :] * srn, mask=mask, other=0.0).to(acc.dtype)
    active = (r != 0) & (acc != 0)
    s = tl.where(active, r / tl.where(active, acc, 1.0), 0.0)
    s = tl.where(rm[:, None] < half, s, -s)
    tl.store(s_ptr + batch.to(tl.int64) * ssb + rm[:, None] * ssm + rn[None, :] * ssn, s.to(s_ptr.dtype.element_ty), mask=mask)


def sectional_matmul_triton(A: torch.Tensor, B: torch.Tensor, Rs: torch.Tensor, half: int) -> torch.Tensor:
    """A: (..., M, K), B: (..., K, N), Rs: (..., M, N) with M = 2·half; returns S like Rs."""
    batch_shape = A.shape[:-2]
    M, K = A.shape[-2:]
    N = B.shape[-1]
    if B.shape[-2] != K or Rs.shape[-2:] != (M, N) or M != 2 * half or not B.shape[:-2] == Rs.shape[:-2] == batch_shape:
        raise ValueError(f"sectional_matmul: A {tuple(A.shape)}, B {tuple(B.shape)}, Rs {tuple(Rs.shape)}, half {half} do not fit")
    if A.device.type == "cpu" and torch.bfloat16 in (A.dtype, B.dtype):
        # Triton's interpreter (the CPU's Triton) multiplies bf16's raw bits as integers: exact in float32
        A, B = A.float(), B.float()
    count = math.prod(batch_shape)  # not reshape(-1, …): ambiguous for an empty operand (K = 0)
    A3, B3, R3 = (t.reshape(count, *t.shape[-2:]) for t in (A, B, Rs))
    S = torch.empty(R3.shape, dtype=Rs.dtype, device=Rs.device)
    if S.numel() == 0:
        return S.reshape(*batch_shape, M, N)
    BM, BN, BK, warps, stages = _tiles(M, A.dtype, A.device)
    tf32 = A.dtype == torch.float32 and A.device.type == "cuda" and matmul_tf32()
    for i in range(0, A3.shape[0], MAX_GRID_Z):  # CUDA's grid holds at most 65535 (samples × groups) in z
        a, b, r, s = (t[i:i + MAX_GRID_Z] for t in (A3, B3, R3, S))
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), a.shape[0])
        _sectional_matmul_kernel[grid](a, b, r, s, M, N, K, half, *a.stride(), *b.stride(), *r.stride(), *s.stride(),
                                       BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, FP64=A.dtype == torch.float64, TF32=tf32,
                                       num_warps=warps, num_stages=stages)
    return S.reshape(*batch_shape, M, N)


def _tiles(M: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int, int]:
    """Tile sizes (M, N, K), warps and pipeline stages. GPUs get tensor-core sized tiles (the
    K tile holds 128 bytes of a row; a short M takes a 64-row tile); float64 and the CPU
    interpreter keep small tiles."""
    if device.type != "cuda" or dtype == torch.float64:
        return 32, 32, (16 if device.type == "cuda" else 32), 4, 2
    BM = 64 if M <= 64 else 128
    return BM, 128, 128 // (torch.finfo(dtype).bits // 8), 8 if BM == 128 else 4, 3
