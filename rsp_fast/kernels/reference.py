"""Pure-PyTorch RSP math: the specification every kernel is tested against.

Each function here is one fusable step of RSP_SPEC.md (sections 2 and 4). They work on
any device and dtype; the normalisation and the purge are the fallback when no compiled
kernel is available, the products' references are the tests' oracles for the fused kernels.
All reductions are per sample (dimension 0), never across the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where b != 0, else 0 (the authors' ``safe_divide`` without its epsilon)."""
    # Lanes where b = 0 divide to inf/nan and are then replaced: one division, one select.
    return torch.where(b != 0, a / b, 0.0)


def split_sections(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R⁺ = max(R, 0) and R⁻ = max(-R, 0): the target and hostile sections, both >= 0."""
    return R.clamp(min=0), (-R).clamp(min=0)


def stacked_sections(R: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[R⁺; R⁻] concatenated along ``dim``, written once into one buffer (no separate
    halves to copy): the layout in which both sections go through each matrix product.
    ``dtype``: the buffer's, if not R's (the cast made in the same pass)."""
    shape = list(R.shape)
    half = shape[dim]
    shape[dim] = 2 * half
    out = R.new_empty(shape, dtype=dtype)
    zero = R.new_zeros(())  # maximum and minimum, unlike clamp, may write another dtype
    torch.maximum(R, zero, out=out.narrow(dim, 0, half))
    torch.minimum(R, zero, out=out.narrow(dim, half, half)).neg_()
    return out


def sectional_normalize_reference(
    R: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """S⁺ = R⁺/Ga where R⁺ ≠ 0 and Ga ≠ 0, S⁻ = R⁻/Gb where R⁻ ≠ 0 and Gb ≠ 0, else 0 (selected, not
    multiplied by a mask: an infinite response beside a zero R would give NaN)."""
    Rp, Rn = split_sections(R)
    return safe_div(Rp, torch.where(Rp != 0, Ga, 0)), safe_div(Rn, torch.where(Rn != 0, Gb, 0))


def sectional_normalize_stacked_reference(Rs: torch.Tensor, Gs: torch.Tensor, half: int) -> torch.Tensor:
    """The sectional normalisation on the stacked layout: Rs = [R⁺; R⁻] and Gs = [G⁺; G⁻]
    (rows [0, half) and [half, 2·half) of dim −2) give [S⁺; −S⁻], the operand of the single
    back-projection, zero where R or G is zero."""
    S = safe_div(Rs, torch.where(Rs != 0, Gs, 0))
    S.narrow(-2, half, half).neg_()
    return S


def sectional_matmul_reference(A: torch.Tensor, B: torch.Tensor, Rs: torch.Tensor, half: int) -> torch.Tensor:
    """Stacked responses G = A·B and their stacked sectional normalisation in one step.
    The Triton kernel fuses the division into the product's epilogue."""
    return sectional_normalize_stacked_reference(Rs, A @ B, half)


def sectional_products_reference(x_pos: torch.Tensor, R: torch.Tensor, kernel, stride, dilation, padding) -> torch.Tensor:
    """An inner conv's three products (groups = 1) on its unfolded patches, dense: the
    sectional filters Fs = [R⁺; R⁻]·Xᵤᵀ, the normalised responses [S⁺; −S⁻] of Fs·Xᵤ, and the
    back-projection Fsᵀ·[S⁺; −S⁻] folded back onto the input (N, C, H, W). ``padding`` is
    (left, right, top, bottom). The masked kernels compute the same at R's non-zeros only."""
    xp = F.pad(x_pos, tuple(padding))
    N, C, Hp, Wp = xp.shape
    O, L = R.shape[1], R.shape[-2] * R.shape[-1]
    cols = F.unfold(xp, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))  # N, C·k², L
    Rs = stacked_sections(R.reshape(N, O, L), dim=1)
    Fs = Rs @ cols.transpose(1, 2)
    S = sectional_normalize_stacked_reference(Rs, Fs @ cols, O)
    dx = F.fold(Fs.transpose(1, 2) @ S, (Hp, Wp), tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
    left, right, top, bottom = padding
    return dx[..., top : Hp - bottom, left : Wp - right]


def depthwise_products_reference(x_pos: torch.Tensor, R: torch.Tensor, kernel, stride, dilation, padding) -> torch.Tensor:
    """The same three products for a depthwise conv (groups = C, O = m·C outputs, output channel
    o reading input channel o // m): per sample and channel, F± = R±·Xᵤᵀ (m×k² filters from that
    channel's patches Xᵤ, k²×L), [S⁺; −S⁻] from F±·Xᵤ, and Fᵀ·S folded back onto the input."""
    xp = F.pad(x_pos, tuple(padding))
    N, C, Hp, Wp = xp.shape
    O, L = R.shape[1], R.shape[-2] * R.shape[-1]
    m, taps = O // C, kernel[0] * kernel[1]
    cols = F.unfold(xp, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride)).view(N, C, taps, L)
    Rs = stacked_sections(R.reshape(N, C, m, L), dim=2)  # N, C, 2m, L
    Fs = Rs @ cols.transpose(-1, -2)  # N, C, 2m, k²
    S = sectional_normalize_stacked_reference(Rs, Fs @ cols, m)
    dcols = (Fs.transpose(-1, -2) @ S).reshape(N, C * taps, L)
    dx = F.fold(dcols, (Hp, Wp), tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
    left, right, top, bottom = padding
    return dx[..., top : Hp - bottom, left : Wp - right]


def per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of every element of each sample: shape (N,)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def unsupported_relevance(R: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor) -> torch.Tensor:
    """Per sample, Σ R⁺[Ga=0] − Σ R⁻[Gb=0]: relevance at positions whose response is zero
    (an all-zero input patch), which the sectional normalisation cannot pass on."""
    Rp, Rn = split_sections(R)
    return per_sample_sum(Rp * (Ga == 0)) - per_sample_sum(Rn * (Gb == 0))


def purge_reference(dx: torch.Tensor, x_pos: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Hostile purging: D = 2·x̂⊙dx, then shift the active units so that ΣR_in = total.

    ``dx`` is the combined back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻ at the layer input, ``x_pos``
    the clamped input x̂ and ``total`` (N,) the relevance sum ΣR⁺ − ΣR⁻ to conserve.
    R_in = D − [D≠0]·total/n with n = #{D≠0} per sample (no shift where n = 0).
    """
    D = 2 * x_pos * dx
    active = D != 0
    n = per_sample_sum(active)  # an integer: float16 holds no count above 65504, bfloat16 none exactly above 256
    wide = torch.promote_types(D.dtype, torch.float32)  # the shift too, as the CUDA and Triton kernels do
    shift = safe_div(total.to(wide), n.to(wide)).view(-1, *([1] * (D.dim() - 1)))
    return torch.where(active, D - shift, D).to(D.dtype)  # not D − active·shift: 0·inf is NaN


def combine_reference(dx: torch.Tensor, x_pos: torch.Tensor) -> torch.Tensor:
    """The 1×1 variant without the purge: R_in = x̂⊙dx = C⁺ − C⁻."""
    return x_pos * dx
