"""Errors raised by rsp_fast: each names the problem in one line."""


class RSPError(ValueError):
    """Base class: bad input or a model rsp_fast cannot explain."""


class UnsupportedModelError(RSPError):
    """A layer or op on the path from the input to the saliency layer has no RSP rule."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no GPU, no Triton)."""


def not_initialised(name: str) -> RSPError:
    """A lazy module's parameter the forward would use before it has a shape: running it (RSP's
    own pass or trace) would initialise it with random weights and explain those."""
    return RSPError(f"the model's {name} is not initialised yet (a lazy module, e.g. LazyConv2d): run the model "
                    "once on an example input before explaining it")
