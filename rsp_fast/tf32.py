"""PyTorch's TF32 settings for CUDA's float32 matmuls and cuDNN's convolutions, read and set.

Since torch 2.9 they are ``fp32_precision`` strings ("tf32", "ieee", or "none": the parent's),
the legacy ``allow_tf32`` flags a view of them that raises once the strings hold a mix it
cannot state (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` alone does): read and
set the strings where they exist, the flags before.
"""
from __future__ import annotations

import torch

_B = torch.backends
STRINGS = hasattr(_B.cuda.matmul, "fp32_precision") and hasattr(getattr(_B.cudnn, "conv", None), "fp32_precision")


def _inherited(*levels: str) -> str:
    """The first setting from the leaf up that is not "none" (the default: "ieee")."""
    return next((p for p in levels if p != "none"), "ieee")


def matmul_tf32() -> bool:
    """Whether CUDA's float32 matmuls may run on TF32 tensor cores."""
    if STRINGS:
        return _inherited(_B.cuda.matmul.fp32_precision, _B.fp32_precision) == "tf32"
    return _B.cuda.matmul.allow_tf32


def conv_tf32() -> bool:
    """Whether cuDNN's float32 convolutions may use TF32."""
    if STRINGS:
        return _inherited(_B.cudnn.conv.fp32_precision, _B.cudnn.fp32_precision, _B.fp32_precision) == "tf32"
    return _B.cudnn.allow_tf32


def set_tf32(on: bool):
    """TF32 on or off for both; returns what ``restore_tf32`` puts back."""
    if STRINGS:
        saved = _B.cuda.matmul.fp32_precision, _B.cudnn.conv.fp32_precision
        _B.cuda.matmul.fp32_precision = _B.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        saved = _B.cuda.matmul.allow_tf32, _B.cudnn.allow_tf32
        _B.cuda.matmul.allow_tf32 = _B.cudnn.allow_tf32 = on
    return saved


def restore_tf32(saved) -> None:
    if STRINGS:
        _B.cuda.matmul.fp32_precision, _B.cudnn.conv.fp32_precision = saved
    else:
        _B.cuda.matmul.allow_tf32, _B.cudnn.allow_tf32 = saved
