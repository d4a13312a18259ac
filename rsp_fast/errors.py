"""Errors raised by rsp_fast: each names the problem in one line."""


class RSPError(ValueError):
    """Base class: bad input or a model rsp_fast cannot explain."""


class UnsupportedModelError(RSPError):
    """A layer or op on the path from the input to the saliency layer has no RSP rule."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no GPU, no Triton)."""
