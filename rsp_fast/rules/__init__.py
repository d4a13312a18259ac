"""The RSP rule for each kind of graph node, and the table that picks it.

A node gets a rule by its module type (``call_module``), function (``call_function``) or
tensor method (``call_method``). Anything else on the path from the input to the saliency
layer is unsupported and reported, with its module path, before any work is done.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import Context, Rule
from .conv import Conv, is_same_padding_conv
from .linear import Linear
from .merge import Add, Cat
from .passthrough import PassThrough, Route
from .pool import INDEX_POOLS, MaxPoolByIndices, Pool

__all__ = ["Context", "Rule", "rule_for", "is_rule_leaf", "SUPPORTED", "describe_supported", "NodeKind", "node_kind"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
PASS_MODULES = ACTIVATIONS + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)

PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.flatten, torch.reshape, F.dropout, F.dropout1d, F.dropout2d}
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.mean}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
CAT_FUNCTIONS = {torch.cat, torch.concat}
PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "relu", "relu_", "clone", "view_as", "reshape_as"}
POOL_METHODS = {"mean"}
ADD_METHODS = {"add", "add_", "__add__"}

SUPPORTED = {
    "modules": ["Conv2d (any stride/padding/dilation/groups; timm Conv2dSame)", "Linear", "BatchNorm1d/2d (folded; timm BatchNormAct2d with ReLU/ReLU6)",
                "ReLU", "ReLU6", "Dropout*", "Identity", "Flatten", "Unflatten", "MaxPool/AvgPool/AdaptiveAvgPool/AdaptiveMaxPool 1d/2d", "ZeroPad/ConstantPad(0) 1d/2d"],
    "functions": ["+ / torch.add (residual add)", "torch.cat", "torch.flatten", "torch.reshape", "F.relu", "F.relu6", "F.dropout", "F.*pool*", "torch.mean", "F.pad (zeros)"],
    "methods": sorted(PASS_METHODS | POOL_METHODS | ADD_METHODS),
}


def describe_supported() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in SUPPORTED.items())


def _is_passthrough_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS) or (isinstance(m, nn.Hardtanh) and m.min_val == 0) or isinstance(m, (nn.Identity, nn.Dropout))


def _batchnorm_act_ok(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: BN then drop then act; fine when both pass R through."""
    act, drop = getattr(m, "act", nn.Identity()), getattr(m, "drop", nn.Identity())
    return _is_passthrough_activation(act) and _is_passthrough_activation(drop)


def is_rule_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: those a rule handles whole."""
    return isinstance(m, (nn.Conv2d, nn.Linear) + BATCHNORM + PASS_MODULES + POOL_MODULES + PAD_MODULES + (nn.Hardtanh,))


class NodeKind:
    LAYER, PASS, POOL, ROUTE, ADD, CAT = "layer", "pass", "pool", "route", "add", "cat"


def _zero_constant_pad(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return not isinstance(module, nn.ConstantPad1d | nn.ConstantPad2d) or module.value == 0
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def node_kind(node: fx.Node, module: nn.Module | None) -> str | None:
    """What a node does for RSP, or None if unsupported."""
    if node.op == "call_module":
        m = module
        if isinstance(m, nn.Conv2d):
            custom = type(m).forward is not nn.Conv2d.forward and not is_same_padding_conv(m)
            return None if custom or m.padding_mode != "zeros" else NodeKind.LAYER
        if isinstance(m, nn.Linear):
            return NodeKind.LAYER if type(m).forward is nn.Linear.forward else None
        if isinstance(m, BATCHNORM):
            return NodeKind.PASS if _batchnorm_act_ok(m) else None
        if isinstance(m, PASS_MODULES) or (isinstance(m, nn.Hardtanh) and m.min_val == 0):
            return NodeKind.PASS
        if isinstance(m, POOL_MODULES):
            return NodeKind.POOL
        if isinstance(m, PAD_MODULES):
            return NodeKind.ROUTE if _zero_constant_pad(node, m) else None
        return None
    if node.op == "call_function":
        t = node.target
        if t in PASS_FUNCTIONS:
            return NodeKind.PASS
        if t is F.hardtanh:
            return NodeKind.PASS if _hardtanh_min(node) == 0 else None
        if t in POOL_FUNCTIONS:
            return NodeKind.POOL
        if t in ADD_FUNCTIONS:
            return NodeKind.ADD
        if t in CAT_FUNCTIONS:
            return NodeKind.CAT
        if t is F.pad:
            return NodeKind.ROUTE if _zero_constant_pad(node, None) else None
        return None
    if node.op == "call_method":
        if node.target in PASS_METHODS:
            return NodeKind.PASS
        if node.target in POOL_METHODS:
            return NodeKind.POOL
        if node.target in ADD_METHODS:
            return NodeKind.ADD
    return None


def _hardtanh_min(node: fx.Node) -> float:
    """The lower bound of an ``F.hardtanh`` call (its default is -1)."""
    return node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)


def rectifies(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether a node's output is ≥ 0 whatever its input: ReLU, ReLU6, hardtanh from 0, and
    timm's BatchNormAct2d ending in one of them."""
    if node.op == "call_module":
        m = module
        if isinstance(m, BATCHNORM):
            m = getattr(m, "act", None)
        return isinstance(m, ACTIVATIONS) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0)
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, F.relu6):
            return True
        if node.target is F.hardtanh:
            return _hardtanh_min(node) >= 0
    return node.op == "call_method" and node.target in ("relu", "relu_")


def keeps_sign(node: fx.Node, module: nn.Module | None, kind: str | None) -> bool:
    """Whether a node's output is ≥ 0 when all its inputs are: pooling, zero padding,
    concatenation, sums, reshapes and dropout (not BatchNorm, whose shift can make it negative)."""
    if kind == NodeKind.ADD:
        return "alpha" not in node.kwargs  # torch.add(a, b, alpha=-1) subtracts
    if kind in (NodeKind.POOL, NodeKind.ROUTE, NodeKind.CAT):
        return True
    return kind == NodeKind.PASS and not isinstance(module, BATCHNORM)


def relevance_inputs(node: fx.Node, kind: str) -> list:
    """The arguments relevance flows back to (may include non-node constants for add)."""
    if kind == NodeKind.ADD:
        return [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
    if kind == NodeKind.CAT:
        return list(node.args[0] if node.args else node.kwargs["tensors"])
    return [node.args[0] if node.args else next(iter(node.kwargs.values()))]


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def rule_for(node: fx.Node, kind: str, module: nn.Module | None, first: bool, bn_scale: Callable) -> Rule:
    inputs = relevance_inputs(node, kind)
    if kind == NodeKind.LAYER:
        cls = Conv if isinstance(module, nn.Conv2d) else Linear
        return cls(node, inputs, module, first, bn_scale)
    if kind == NodeKind.PASS:
        return PassThrough(node, inputs)
    if kind == NodeKind.POOL:
        if isinstance(module, INDEX_POOLS) and not module.return_indices:
            return MaxPoolByIndices(node, inputs, module)
        return Pool(node, inputs, module)
    if kind == NodeKind.ROUTE:
        return Route(node, inputs, module)
    if kind == NodeKind.ADD:
        return Add(node, inputs)
    return Cat(node, inputs, _cat_dim(node))


def batchnorm_scale(bn: nn.Module) -> Callable[[], torch.Tensor | None]:
    """γ/√(var+ε) of an eval-mode BatchNorm, computed when called (weights may change)."""
    def scale():
        if bn.running_var is None:
            return None
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s * bn.weight if bn.weight is not None else s
    return scale
