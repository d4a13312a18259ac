"""Trace an unmodified model into a torch.fx graph.

Modules that RSP has a rule for are kept as leaves (so that e.g. timm's ``Conv2dSame``,
whose padding depends on the input size, never needs to be traced through), and so is any
submodule whose forward cannot be traced (control flow on its input's size, as in timm's
VGG head): a model is refused only if such a module lies on the relevance path. Every module
call, leaf or not, records the graph node holding its output, so that any module name
from ``model.named_modules()`` can be the saliency layer.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError

MODULE_META = "rsp_module"  # node.meta key: the leaf module a call_module node runs
KEPT_WHOLE = "rsp_kept_whole"  # node.meta key: set on modules kept whole because they cannot be traced
ATTR_VALUE = "rsp_attr_value"  # node.meta key: the parameter or buffer a get_attr node reads


class _RecordingTracer(fx.Tracer):
    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool]):
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self.module_outputs: dict[str, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_rule_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        last = next(iter(reversed(self.graph.nodes)), None)  # the newest node so far
        depth = len(self.module_stack)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            # Control flow on traced values inside this submodule (e.g. timm's VGG head checks
            # its input size): keep the module whole, as one node, and drop what its partial
            # trace added. In the head it runs as it is; on the relevance path the plan
            # reports it as a module without a rule.
            self._erase_after(last)
            while len(self.module_stack) > depth:  # fx does not unwind it when a forward raises
                self.module_stack.popitem()
            out = self.create_proxy("call_module", self.path_of_module(m), args, kwargs)
            out.node.meta[KEPT_WHOLE] = True
        if isinstance(out, fx.Proxy):
            path = self.path_of_module(m)
            self.module_outputs[path] = out.node
            if out.node.op == "call_module" and out.node.target == path:  # a leaf (not a wrapper ending in one)
                out.node.meta[MODULE_META] = m
        return out

    def _erase_after(self, last: fx.Node | None) -> None:
        doomed = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            doomed.append(node)
        for node in doomed:  # newest first: users go before what they use
            self.graph.erase_node(node)
        gone = set(doomed)
        self.module_outputs = {k: v for k, v in self.module_outputs.items() if v not in gone}


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
    for node in graph.nodes:
        if node.op == "get_attr":
            node.meta[ATTR_VALUE] = _attribute(model, node.target)
    return graph, tracer.module_outputs


def _attribute(model: nn.Module, path: str):
    value = model
    for name in path.split("."):
        value = getattr(value, name, None)
    return value

