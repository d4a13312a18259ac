"""One dispatch point for RSP's kernels: ``backend="auto"|"torch"|"cpp"|"cuda"|"triton"``
or the environment variable ``RSP_FAST_BACKEND``.

``auto`` picks the fastest kernel set available for the tensor's device and falls back
quietly to the PyTorch reference (with one warning where the compiled kernels are there but
cannot load: built for another torch); an explicit backend that cannot run raises an error that
says why. Each kernel set provides ``sectional_normalize`` (and its stacked form), ``purge``
and ``combine``; a set without its own version of an op uses the reference one. Optional:
``sectional_matmul`` (Triton), ``masked_products``, ``depthwise_products`` and
``pointwise_products`` (C++ on CPU).
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BackendUnavailableError, RSPError
from ..kernels import reference
from ..kernels.triton import capability_short_of, triton_unavailable_reason
from . import custom

NAMES = ("auto", "torch", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class KernelSet:
    name: str
    sectional_normalize: Callable = reference.sectional_normalize_reference
    sectional_normalize_stacked: Callable = reference.sectional_normalize_stacked_reference
    purge: Callable = reference.purge_reference
    combine: Callable = reference.combine_reference
    sectional_matmul: Callable | None = None  # fused product + normalisation; None: product, then the stacked op
    masked_products: Callable | None = None  # an inner conv's products at R's non-zeros only; None: dense products
    depthwise_products: Callable | None = None  # a depthwise conv's products fused per plane; None: library convs
    pointwise_products: Callable | None = None  # a stride-1 1×1 conv's products fused per tile; None: the GEMMs
    dtypes: frozenset | None = None  # the dtypes its kernels handle; None: any


FLOAT = frozenset({torch.float32, torch.float64})
FLOAT_AND_HALF = FLOAT | {torch.float16, torch.bfloat16}


def _triton_sectional_normalize(R, Ga, Gb):
    from ..kernels.triton.sectional_norm import sectional_normalize_triton  # imports triton on first use only

    return sectional_normalize_triton(R, Ga, Gb)


def _triton_sectional_matmul(A, B, Rs, half):
    from ..kernels.triton.sectional_matmul import sectional_matmul_triton

    return sectional_matmul_triton(A, B, Rs, half)


def _triton_purge(dx, x_pos, total):
    from ..kernels.triton.purge import purge_triton

    return purge_triton(dx, x_pos, total)


TORCH = KernelSet("torch")
COMPILED = KernelSet("cpp", sectional_normalize=custom.sectional_normalize, purge=custom.purge,
                     sectional_normalize_stacked=custom.sectional_normalize_stacked,
                     masked_products=custom.masked_sectional_products,
                     depthwise_products=custom.depthwise_sectional_products,
                     pointwise_products=custom.pointwise_sectional_products, dtypes=FLOAT)
COMPILED_CUDA = KernelSet("cuda", sectional_normalize=custom.sectional_normalize, purge=custom.purge,
                          sectional_normalize_stacked=custom.sectional_normalize_stacked, dtypes=FLOAT_AND_HALF)
TRITON = KernelSet("triton", sectional_normalize=_triton_sectional_normalize, purge=_triton_purge,
                   sectional_matmul=_triton_sectional_matmul, dtypes=FLOAT_AND_HALF)
SETS = {"torch": TORCH, "cpp": COMPILED, "cuda": COMPILED_CUDA, "triton": TRITON}


@functools.cache
def _warn_broken_extension() -> None:
    """Once per process: ``auto`` falls back to the PyTorch engine quietly where the compiled
    kernels were not built, but says so where they were and cannot load (an install problem)."""
    if custom.C_BROKEN:
        warnings.warn(custom.C_ERROR, RuntimeWarning, stacklevel=3)


def _availability(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Empty string if ``name`` can run on ``device`` (and ``dtype``), else the reason it cannot."""
    reason = _device_availability(name, device)
    supported = SETS[name].dtypes if name in SETS else None
    if not reason and dtype is not None and supported is not None and dtype not in supported:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in supported))
        reason = f"its kernels handle {names}, not {str(dtype).replace('torch.', '')}"
    return reason


CUDA_MIN_CAPABILITY = (7, 5)  # setup.py's CUDA_ARCHS: T4 and later (the PTX of 9.0 runs on later GPUs)


def _device_availability(name: str, device: torch.device) -> str:
    if name == "torch":
        return ""
    if name == "cpp":
        if not custom.HAVE_C:
            return custom.C_ERROR
        return "" if device.type == "cpu" else f"the cpp backend runs on CPU tensors, not {device.type}"
    if name == "cuda":
        if not custom.HAVE_C:
            return custom.C_ERROR
        if not custom.cuda_kernels_built():
            return "rsp_fast._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, not {device.type}"
        return capability_short_of(CUDA_MIN_CAPABILITY, device, "rsp_fast._C's CUDA kernels are built for")
    if name == "triton":
        return triton_unavailable_reason(device)
    return f"unknown backend {name!r}; choose one of {', '.join(NAMES)}"


def backends(device: str | torch.device | None = None) -> dict[str, str]:
    """Each backend and whether it can run here: ``"available"`` or the reason it cannot."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise RSPError(f"unknown device {str(device)!r}") from None
    return {n: (_availability(n, dev) or "available") for n in NAMES[1:]}


def resolve_backend_name(name: str | None) -> str:
    name = (name or os.environ.get("RSP_FAST_BACKEND") or "auto").lower()
    if name not in NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def select_kernels(name: str, device: torch.device, dtype: torch.dtype | None = None) -> KernelSet:
    """The kernel set for ``name`` (already resolved) on ``device`` for ``dtype`` tensors."""
    if name == "auto":
        for candidate in (("cuda", "triton") if device.type == "cuda" else ("cpp",)):
            if not _availability(candidate, device, dtype):
                return SETS[candidate]
        _warn_broken_extension()
        return TORCH
    reason = _availability(name, device, dtype)
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return SETS[name]
