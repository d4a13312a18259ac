"""Typed wrappers and fake (meta) implementations of the compiled ``rsp_fast::`` ops.

Importing ``rsp_fast._C`` runs the C++ registrars; if it is missing, ``HAVE_C`` is False
and the package works on the PyTorch reference alone.
"""
from __future__ import annotations

import importlib.util

import torch

from ..environment import setting

REBUILD = ("reinstalling rsp-fast from its source (a checkout or the sdist) with pip install --no-build-isolation "
           "builds it for this torch")


def _load_extension() -> tuple[bool, str, bool]:
    """Import rsp_fast._C (its registrars add torch.ops.rsp_fast.*): whether it runs, why not, and
    whether it is there but broken (built for another torch or CUDA: an extension is bound to the
    torch release it was compiled against, whose version it holds), which ``auto`` warns of."""
    try:
        from .. import _C
    except ImportError as exc:
        if importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}._C") is None:
            return False, f"rsp_fast._C is not built, so the PyTorch engine runs ({REBUILD})", False
        return False, (f"rsp_fast._C is not importable ({exc}): built for another torch or CUDA? This is torch "
                       f"{torch.__version__}; the PyTorch engine runs ({REBUILD})"), True
    built = getattr(_C, "TORCH_VERSION", None)
    if built is not None and built.split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        return False, (f"rsp_fast._C was built against torch {built}, this is torch {torch.__version__}: "
                       f"the PyTorch engine runs ({REBUILD})"), True
    return True, "", False


HAVE_C, C_ERROR, C_BROKEN = _load_extension()


def _has_op(name: str) -> bool:
    return HAVE_C and hasattr(torch.ops.rsp_fast, name)


def pointwise_kernel_built() -> bool:
    return _has_op("pointwise_sectional_products")


def cuda_kernels_built() -> bool:
    return HAVE_C and torch._C._dispatch_has_kernel_for_dispatch_key("rsp_fast::purge", "CUDA")


def sectional_normalize(R: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S⁺, S⁻) = (R/Ga where R > 0, −R/Gb where R < 0; 0 where the response is 0), one pass."""
    return torch.ops.rsp_fast.sectional_normalize.default(R, Ga, Gb)


def sectional_normalize_stacked(Rs: torch.Tensor, Gs: torch.Tensor, half: int) -> torch.Tensor:
    """[S⁺; −S⁻] from Rs = [R⁺; R⁻] and Gs = [G⁺; G⁻] stacked along dim −2, one pass."""
    return torch.ops.rsp_fast.sectional_normalize_stacked.default(Rs, Gs, half)


def purge(dx: torch.Tensor, x_pos: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """R_in = D − [D≠0]·total/#{D≠0} per sample, D = 2·x̂⊙dx (see kernels.reference.purge_reference)."""
    return torch.ops.rsp_fast.purge.default(dx, x_pos, total)


def masked_sectional_products(x_pos: torch.Tensor, R: torch.Tensor, kernel, stride, dilation, padding) -> torch.Tensor:
    """An inner conv's back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻ at its input, every product computed only
    where R is non-zero (see kernels.reference.sectional_products_reference); groups = 1."""
    return torch.ops.rsp_fast.masked_sectional_products.default(x_pos, R, list(kernel), list(stride), list(dilation),
                                                                list(padding))


def depthwise_sectional_products(x_pos: torch.Tensor, R: torch.Tensor, kernel, stride, dilation, padding) -> torch.Tensor:
    """A depthwise conv's back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻ at its input, the three products fused
    per (sample, channel) plane (see kernels.reference.depthwise_products_reference)."""
    if x_pos.device.type == "cpu":
        setting("RSP_FAST_CPU_CAPABILITY")  # a bad value: an RSPError naming it, not the kernel's RuntimeError
    return torch.ops.rsp_fast.depthwise_sectional_products.default(x_pos, R, list(kernel), list(stride), list(dilation),
                                                                   list(padding))


def pointwise_sectional_products(x_pos: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A stride-1 1×1 conv's back-projection F⁺ᵀS⁺ − F⁻ᵀS⁻ at its input (groups = 1), the three
    products fused a tile of positions at a time, the responses never in memory (see
    kernels.reference.sectional_products_reference with a 1×1 kernel)."""
    return torch.ops.rsp_fast.pointwise_sectional_products.default(x_pos, R)


# The fake (meta) implementations give torch.compile each op's output and check what the C++
# checks (csrc/*_checks.h): a shape, dtype or device the kernel refuses is refused while tracing,
# and a meta tensor among CPU ones (which dispatches here) is an error, not uninitialised memory.
_CPU_DTYPES = (torch.float32, torch.float64)  # AT_DISPATCH_FLOATING_TYPES
_CUDA_DTYPES = _CPU_DTYPES + (torch.float16, torch.bfloat16)  # the CUDA kernels' AT_DISPATCH_FLOATING_TYPES_AND2
_MAX_ARG = 2**31 - 1  # products_checks.h's kMaxArg
_MAX_DEPTHWISE_TAPS = 128  # depthwise_products_cpu.cpp's kMaxTaps


def _one_dtype_and_device(op: str, *tensors: torch.Tensor, cuda_kernel: bool = True) -> None:
    """One dtype and device, a dtype the kernel for that device takes (``cuda_kernel``: the op
    has a CUDA kernel; the products ops have only CPU ones)."""
    first = tensors[0]
    torch._check(all(t.dtype == first.dtype for t in tensors), lambda: f"{op}: the tensors must share one dtype")
    torch._check(all(t.device == first.device for t in tensors), lambda: f"{op}: the tensors must be on one device")
    kind = first.device.type
    torch._check(kind != "cuda" or cuda_kernel, lambda: f"{op}: no CUDA kernel (CPU tensors only)")
    dtypes = {"cpu": _CPU_DTYPES, "cuda": _CUDA_DTYPES}.get(kind)
    torch._check(dtypes is None or first.dtype in dtypes,
                 lambda: f"{op}: not implemented for {first.dtype} on {kind} (takes {', '.join(map(str, dtypes))})")


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)  # as the kernels return


def _conv_output_size(size: int, before: int, after: int, k: int, s: int, d: int) -> int:
    return (size + before + after - d * (k - 1) - 1) // s + 1


if _has_op("sectional_normalize"):

    @torch.library.register_fake("rsp_fast::sectional_normalize")
    def _sectional_normalize_fake(R, Ga, Gb):
        torch._check(R.shape == Ga.shape and R.shape == Gb.shape, lambda: "sectional_normalize: shapes differ")
        _one_dtype_and_device("sectional_normalize", R, Ga, Gb)
        return _contiguous_like(R), _contiguous_like(R)


if _has_op("sectional_normalize_stacked"):

    @torch.library.register_fake("rsp_fast::sectional_normalize_stacked")
    def _sectional_normalize_stacked_fake(Rs, Gs, half):
        torch._check(Rs.shape == Gs.shape, lambda: "sectional_normalize_stacked: shapes differ")
        torch._check(Rs.dim() >= 2 and half >= 0 and Rs.shape[-2] % 2 == 0 and Rs.shape[-2] // 2 == half,
                     lambda: f"sectional_normalize_stacked: dim -2 of {tuple(Rs.shape)} must be twice half = {half}")
        _one_dtype_and_device("sectional_normalize_stacked", Rs, Gs)
        return _contiguous_like(Rs)


if _has_op("purge"):

    @torch.library.register_fake("rsp_fast::purge")
    def _purge_fake(dx, x_pos, total):
        torch._check(dx.dim() >= 1, lambda: "purge: dx must have a batch dimension")
        torch._check(dx.shape == x_pos.shape, lambda: "purge: dx and x_pos must have the same shape")
        torch._check(total.dim() == 1 and total.shape[0] == dx.shape[0], lambda: "purge: total must be (N,)")
        _one_dtype_and_device("purge", dx, x_pos, total)
        return _contiguous_like(dx)


def _check_conv_geometry(name, x_pos, R, kernel, stride, dilation, padding) -> None:
    """What products_checks.h checks: R is the output of this conv of x_pos, every argument in range."""
    torch._check(len(kernel) == 2 and len(stride) == 2 and len(dilation) == 2 and len(padding) == 4,
                 lambda: f"{name}: kernel, stride and dilation take two values, padding four")
    torch._check(min(*kernel, *stride, *dilation) > 0, lambda: f"{name}: kernel, stride and dilation must be positive")
    torch._check(min(padding) >= 0, lambda: f"{name}: padding must be >= 0")
    torch._check(max(*kernel, *stride, *dilation, *padding) <= _MAX_ARG,
                 lambda: f"{name}: kernel, stride, dilation and padding must be below 2^31")
    left, right, top, bottom = padding
    Hp, Wp = x_pos.shape[2] + top + bottom, x_pos.shape[3] + left + right
    Hs, Ws = Hp + min(stride[0], Hp), Wp + min(stride[1], Wp)
    torch._check(Hs <= _MAX_ARG and Ws <= _MAX_ARG and Hs * Ws <= _MAX_ARG,
                 lambda: f"{name}: the padded input {Hp}x{Wp} with stride {stride[0]}x{stride[1]} passes 2^31 elements a plane")
    fits = Hp >= dilation[0] * (kernel[0] - 1) + 1 and Wp >= dilation[1] * (kernel[1] - 1) + 1
    out = (_conv_output_size(x_pos.shape[2], top, bottom, kernel[0], stride[0], dilation[0]),
           _conv_output_size(x_pos.shape[3], left, right, kernel[1], stride[1], dilation[1]))
    torch._check(fits and tuple(R.shape[2:]) == out, lambda: f"{name}: R {tuple(R.shape)} is not the output of this "
                                                             f"{kernel[0]}x{kernel[1]} conv of x_pos {tuple(x_pos.shape)}")


def _products_fake(name: str):
    def fake(x_pos, R, kernel, stride, dilation, padding):
        torch._check(x_pos.dim() == 4 and R.dim() == 4 and x_pos.shape[0] == R.shape[0],
                     lambda: f"{name}: x_pos (N, C, H, W) and R (N, O, h, w) expected")
        _one_dtype_and_device(name, x_pos, R, cuda_kernel=False)
        _check_conv_geometry(name, x_pos, R, kernel, stride, dilation, padding)
        if name == "depthwise_sectional_products":
            C, O = x_pos.shape[1], R.shape[1]
            torch._check(O % C == 0 if C > 0 else O == 0,
                         lambda: f"{name}: {O} output channels are not a multiple of {C} input channels")
            torch._check(kernel[0] * kernel[1] <= _MAX_DEPTHWISE_TAPS,
                         lambda: f"{name}: kernels up to {_MAX_DEPTHWISE_TAPS} taps, not {kernel[0]}x{kernel[1]}")
        return _contiguous_like(x_pos)
    return fake


for _name in ("masked_sectional_products", "depthwise_sectional_products"):
    if _has_op(_name):
        torch.library.register_fake(f"rsp_fast::{_name}")(_products_fake(_name))


if _has_op("pointwise_sectional_products"):

    @torch.library.register_fake("rsp_fast::pointwise_sectional_products")
    def _pointwise_products_fake(x_pos, R):
        torch._check(x_pos.dim() >= 2 and x_pos.dim() == R.dim() and x_pos.shape[0] == R.shape[0]
                     and x_pos.shape[2:] == R.shape[2:],
                     lambda: "pointwise_sectional_products: x_pos (N, C, ...) and R (N, O, ...) expected")
        _one_dtype_and_device("pointwise_sectional_products", x_pos, R, cuda_kernel=False)
        return _contiguous_like(x_pos)
