"""Fused Triton kernels (one file per op). They run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (set before triton is imported), which is how CI tests them."""
from __future__ import annotations

import os

import torch


MIN_CAPABILITY = (8, 0)  # Ampere: bf16 and TF32 tensor cores
GRID_YZ_LIMIT = 65535  # CUDA's limit on a launch grid's second and third dimensions


def triton_unavailable_reason(device: torch.device) -> str:
    """Empty if the Triton kernels can run on ``device``, else why not."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        # said before importing Triton, which the CPU never needs (its import takes 0.07 s here)
        return f"Triton runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), not {device.type}"
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if device.type == "cuda":
        return capability_short_of(MIN_CAPABILITY, device, "the Triton kernels (bf16 and TF32 dots) need")
    if type(triton.language.standard.sum).__name__ != "InterpretedFunction":  # Triton's own helpers, jitted at its import
        return ("TRITON_INTERPRET=1 was set after triton was imported (torchvision and timm import it): Triton's "
                "own functions are compiled for a GPU; set it before the first import")
    return ""


def capability_short_of(needed: tuple[int, int], device: torch.device, what: str) -> str:
    """Empty if ``device``'s compute capability is ``needed`` or later, else why it falls short."""
    have = torch.cuda.get_device_capability(device)
    if have >= needed:
        return ""
    return (f"{what} compute capability {needed[0]}.{needed[1]} and later; {torch.cuda.get_device_name(device)} "
            f"has {have[0]}.{have[1]}")
