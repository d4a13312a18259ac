"""A static-shape fast path for video: the whole RSP pass captured once as a CUDA graph.

Frames of a video share one shape. Launching RSP's hundreds of small kernels one by one
costs the CPU more time than the GPU needs for many of them; a graph replays them all with
one launch. ``RSP(model).static(example)`` returns a ``StaticRSP``: each call copies its
inputs (the example's shape, dtype and device) into the graph's input buffer and replays.
Off CUDA there are no graphs and it runs the eager pass, so the same code runs everywhere.

The graph holds the model's parameters by address: change them in place (``load_state_dict``
does) and the next replay sees the new values; replace a parameter tensor and it does not.
"""
from __future__ import annotations

import threading
import warnings

import torch

from .api import Explanation, check_finite, class_per_sample, on_device
from .errors import RSPError

WARMUP_CALLS = 2  # Triton compiles, cuBLAS/cuDNN pick algorithms and allocate their workspaces outside the capture


class StaticRSP:
    """RSP for inputs of one shape: ``__call__(inputs, target=None)`` returns the attribution,
    ``explain(inputs, target=None)`` an ``Explanation`` (without ``record``'s steps)."""

    def __init__(self, explainer, example: torch.Tensor):
        explainer._check_inputs(example)
        self.explainer = explainer
        self.shape, self.dtype, self.device = example.shape, example.dtype, example.device
        self._example = example.detach().clone()
        self._graphs: dict[bool, tuple] = {}  # target given? -> (graph, input buffer, target buffer, output)
        self.uses_graphs = self.device.type == "cuda"
        self.classes: int | None = None
        self._replaying = threading.Lock()  # one input buffer and one output per graph: one call at a time

    def __getstate__(self) -> dict:
        """Copied or pickled without its CUDA graphs and lock: a copy captures its own."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_graphs", "_replaying")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._graphs, self._replaying = {}, threading.Lock()
        self.uses_graphs = self.device.type == "cuda"

    def __call__(self, inputs: torch.Tensor, target=None) -> torch.Tensor:
        return self.explain(inputs, target).attribution

    def explain(self, inputs: torch.Tensor, target=None):
        if not isinstance(inputs, torch.Tensor) or (inputs.shape, inputs.dtype, inputs.device) != (self.shape, self.dtype, self.device):
            got = (tuple(inputs.shape), inputs.dtype, str(inputs.device)) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise RSPError(f"this static RSP takes inputs of shape {tuple(self.shape)}, {self.dtype} on {self.device}; got {got}")
        if not self.uses_graphs:
            return self.explainer.explain(inputs, target)
        self.explainer._check_inputs(inputs)
        with self._replaying, on_device(self.device):
            return self._replay(inputs, target)

    def _replay(self, inputs: torch.Tensor, target):
        given = target is not None
        if given not in self._graphs:
            try:
                self._graphs[given] = self._capture(given)
            except RSPError:
                raise
            except Exception as exc:  # an op that cannot be captured: stay correct, run eagerly
                warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running RSP eagerly")
                self.uses_graphs = False
                return self.explainer.explain(inputs, target)
        graph, x, t, out = self._graphs[given]
        x.copy_(inputs)
        if given:
            t.copy_(class_per_sample(target, self.shape[0], self.classes, self.device))
        graph.replay()
        # the next replay overwrites the graph's outputs: hand out copies
        return check_finite(Explanation(*(v.clone() if isinstance(v, torch.Tensor) else v for v in
                                          (out.attribution, out.initial, out.logits, out.target, out.hostile, out.cams,
                                           out.layer))))

    def _capture(self, given: bool):
        rsp = self.explainer
        with torch.inference_mode(False):  # a capture under inference_mode: later calls still copy into them
            x = self._example.clone()
            t = torch.zeros(self.shape[0], dtype=torch.long, device=self.device) if given else None
        with on_device(self.device):  # torch's own capture stream is made once, on the device current then
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    logits = rsp._explain_checked(x, t, None, trusted_target=given).logits
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.classes = logits.shape[1]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
                out = rsp._explain_checked(x, t, None, trusted_target=given)
        return graph, x, t, out
