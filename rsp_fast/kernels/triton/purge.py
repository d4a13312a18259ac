"""Triton hostile purging: pass 1 writes D = 2·x̂·dx and counts its non-zeros per sample
(one atomic per block), pass 2 subtracts total/count from the active units (``shift_active``,
also the second pass of the implicit-GEMM conv path, whose back-projection makes pass 1)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import GRID_YZ_LIMIT

BLOCK = 1024
MAX_GRID_Y = GRID_YZ_LIMIT  # samples per launch: one per grid row


def _sample_parts(N: int):
    """(rows, count) of each launch: one sample per grid row, at most MAX_GRID_Y rows a launch."""
    for n0 in range(0, N, MAX_GRID_Y):
        yield slice(n0, n0 + MAX_GRID_Y), min(MAX_GRID_Y, N - n0)


@triton.jit
def _purge_combine_count_kernel(dx_ptr, x_ptr, out_ptr, count_ptr, M, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    n = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = n.to(tl.int64) * M
    d = tl.load(dx_ptr + base + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    if UPCAST:  # half and bfloat16 compute in float32
        d, x = d.to(tl.float32), x.to(tl.float32)
    D = (2.0 * x * d).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base + offs, D, mask=mask)
    active = tl.sum(((D != 0) & mask).to(tl.int32), axis=0)
    tl.atomic_add(count_ptr + n, active)


@triton.jit
def _purge_shift_kernel(out_ptr, total_ptr, count_ptr, M, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    n = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = n.to(tl.int64) * M
    count = tl.load(count_ptr + n)
    total = tl.load(total_ptr + n)
    D = tl.load(out_ptr + base + offs, mask=mask, other=0.0)
    if UPCAST:
        total, D = total.to(tl.float32), D.to(tl.float32)
    shift = tl.where(count > 0, total / tl.maximum(count, 1).to(total.dtype), 0.0)
    tl.store(out_ptr + base + offs, tl.where(D != 0, D - shift, D).to(out_ptr.dtype.element_ty), mask=mask)


def purge_triton(dx: torch.Tensor, x_pos: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    if dx.shape != x_pos.shape or total.shape != (dx.shape[0],):
        raise ValueError(f"purge: dx {tuple(dx.shape)}, x_pos {tuple(x_pos.shape)}, total {tuple(total.shape)} do not fit")
    dx, x_pos, total = dx.contiguous(), x_pos.contiguous(), total.contiguous()
    out = torch.empty_like(dx)
    N = dx.shape[0]
    M = dx.numel() // N if N else 0
    if M == 0:
        return out
    counts = torch.zeros(N, dtype=torch.int32, device=dx.device)
    for rows, n in _sample_parts(N):
        _purge_combine_count_kernel[(triton.cdiv(M, BLOCK), n)](
            dx[rows], x_pos[rows], out[rows], counts[rows], M, BLOCK=BLOCK, UPCAST=dx.element_size() < 4)
    return shift_active(out, total, counts)


def shift_active(D: torch.Tensor, total: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The purge's second pass on a contiguous D (N, ...) in place: each sample's non-zeros minus
    total/counts (int32 counts of them; none where the count is 0)."""
    N = D.shape[0]
    M = D.numel() // N if N else 0
    total = total.contiguous()
    for rows, n in _sample_parts(N if M else 0):
        _purge_shift_kernel[(triton.cdiv(M, BLOCK), n)](D[rows], total[rows], counts[rows], M,
                                                        BLOCK=BLOCK, UPCAST=D.element_size() < 4)
    return D
