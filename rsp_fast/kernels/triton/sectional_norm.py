"""Triton sectional normalisation: S⁺ = R/Ga where R > 0 and Ga ≠ 0, S⁻ = −R/Gb where
R < 0 and Gb ≠ 0, in one pass (half and bfloat16 computed in float32)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sectional_normalize_kernel(r_ptr, ga_ptr, gb_ptr, sp_ptr, sn_ptr, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2³¹ elements too
    mask = offs < n
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    ga = tl.load(ga_ptr + offs, mask=mask, other=0.0)
    gb = tl.load(gb_ptr + offs, mask=mask, other=0.0)
    if UPCAST:  # half and bfloat16 compute in float32; float32/64 in their own precision
        r, ga, gb = r.to(tl.float32), ga.to(tl.float32), gb.to(tl.float32)
    pos = ~(r <= 0) & (ga != 0)  # a NaN R fails both comparisons: NaN in both sections, as in the reference
    neg = ~(r >= 0) & (gb != 0)
    sp = tl.where(pos, r / tl.where(pos, ga, 1.0), 0.0)
    sn = tl.where(neg, -r / tl.where(neg, gb, 1.0), 0.0)
    tl.store(sp_ptr + offs, sp.to(sp_ptr.dtype.element_ty), mask=mask)
    tl.store(sn_ptr + offs, sn.to(sn_ptr.dtype.element_ty), mask=mask)


def sectional_normalize_triton(R: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if R.shape != Ga.shape or R.shape != Gb.shape:
        raise ValueError(f"sectional_normalize: R {tuple(R.shape)}, Ga {tuple(Ga.shape)} and Gb {tuple(Gb.shape)} differ in shape")
    R, Ga, Gb = R.contiguous(), Ga.contiguous(), Gb.contiguous()
    S_pos, S_neg = torch.empty_like(R), torch.empty_like(R)
    n = R.numel()
    if n:
        _sectional_normalize_kernel[(triton.cdiv(n, BLOCK),)](R, Ga, Gb, S_pos, S_neg, n, BLOCK=BLOCK, UPCAST=R.element_size() < 4)
    return S_pos, S_neg
