"""Trace an unmodified model into a torch.fx graph.

Modules that RSP has a rule for are kept as leaves (so that e.g. timm's ``Conv2dSame``,
whose padding depends on the input size, never needs to be traced through). Every module
call, leaf or not, records the graph node holding its output, so that any module name
from ``model.named_modules()`` can be the saliency layer.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError

MODULE_META = "rsp_module"  # node.meta key: the leaf module a call_module node runs


class _RecordingTracer(fx.Tracer):
    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool]):
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self.module_outputs: dict[str, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_rule_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs[self.path_of_module(m)] = out.node
            if out.node.op == "call_module":
                out.node.meta[MODULE_META] = m
        return out


def trace(model: nn.Module, is_rule_leaf: Callable[[nn.Module], bool]) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """The model's fx graph and, per module path, the node holding that module's output."""
    tracer = _RecordingTracer(is_rule_leaf)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; the user needs one clear message
        raise UnsupportedModelError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); rsp_fast needs a model whose forward "
            "has no data-dependent control flow outside its leaf modules"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"rsp_fast explains models with exactly one input; {type(model).__name__}.forward takes "
            f"{len(placeholders)} ({', '.join(n.name for n in placeholders)})"
        )
    return graph, tracer.module_outputs

