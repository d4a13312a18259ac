"""rsp_fast: fast, faithful Relative Sectional Propagation (Nam, Choi, Lee, AAAI 2021)."""
from .api import RSP, Explanation, heatmap
from .cost import cost
from .errors import BackendUnavailableError, RSPError, UnsupportedModelError
from .ops.dispatch import backends
from .static import StaticRSP

__version__ = "0.1.0"
__all__ = ["RSP", "Explanation", "StaticRSP", "heatmap", "backends", "cost", "RSPError", "UnsupportedModelError", "BackendUnavailableError", "__version__"]
