"""rsp_fast: fast, faithful Relative Sectional Propagation (Nam, Choi, Lee, AAAI 2021).

The names below load on first use (PEP 562): ``import rsp_fast.cli`` does not import torch,
so the command line answers ``--help`` at once and catches a Ctrl-C during torch's import.
"""
import importlib

from .errors import BackendUnavailableError, RSPError, UnsupportedModelError

__version__ = "0.1.0"
_LAZY = {"RSP": ".api", "Explanation": ".api", "heatmap": ".api", "cost": ".cost", "backends": ".ops.dispatch",
         "StaticRSP": ".static"}
__all__ = ["RSP", "Explanation", "StaticRSP", "heatmap", "backends", "cost", "RSPError", "UnsupportedModelError",
           "BackendUnavailableError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        try:  # a submodule (rsp_fast.memory, rsp_fast.render, ...), as an eager import used to provide
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
