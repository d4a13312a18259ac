"""The RSP rule for each kind of graph node, and the table that picks it.

A node gets a rule by its module type (``call_module``), function (``call_function``) or
tensor method (``call_method``). Anything else on the path from the input to the saliency
layer is unsupported and reported, with its module path, before any work is done.
"""
from __future__ import annotations

import operator
import weakref
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.trace import MODULE_META
from .base import Context, Rule
from .conv import Conv, effective_conv_weight, has_plain_conv_forward
from .linear import Linear
from .merge import Add, Cat, Stack
from .passthrough import PassThrough, Route, Scale, Select
from .pool import MaxPoolByIndices, Pool, pools_by_indices

__all__ = ["Context", "Rule", "rule_for", "is_rule_leaf", "SUPPORTED", "describe_supported", "NodeKind", "node_kind"]

RECTIFIERS = (nn.ReLU, nn.ReLU6)
# Other elementwise activations: R passes through them as through ReLU (an extension, as in
# LRP: RSP_SPEC.md defines ReLU and ReLU6 only). Their outputs can be negative, so the
# layer after them clamps its input (x̂ = max(x, 0)) as RSP does everywhere.
SMOOTH_ACTIVATIONS = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU,
                      nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Hardtanh)
ACTIVATIONS = RECTIFIERS + SMOOTH_ACTIVATIONS
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
# Norms that cannot be folded into the layer before them pass R through, as RSP_SPEC.md says
# of a BatchNorm that cannot be folded (ConvNeXt's LayerNorm, GroupNorm in BiT ResNets).
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm)
NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.instance_norm, F.batch_norm, F.local_response_norm}
PASS_MODULES = ACTIVATIONS + OTHER_NORMS + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
# Resizing whose weights are ≥ 0 is a positive linear map like average pooling: the same z-rule.
POSITIVE_RESIZE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)

RECTIFIER_FUNCTIONS = {F.relu, torch.relu, F.relu6}
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
ACTIVATION_FUNCTIONS = RECTIFIER_FUNCTIONS | GATE_FUNCTIONS | {
    F.silu, F.hardswish, F.gelu, F.mish, F.leaky_relu, F.prelu, F.elu, F.celu, F.selu, F.softplus, torch.tanh, F.tanh, F.hardtanh}
PASS_FUNCTIONS = ACTIVATION_FUNCTIONS | NORM_FUNCTIONS | {torch.flatten, torch.reshape, F.dropout, F.dropout1d, F.dropout2d}
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.mean}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
STACK_FUNCTIONS = {torch.stack}
ROUTE_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.movedim}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
GATE_METHODS = {"sigmoid", "sigmoid_"}
PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "relu", "relu_", "clone", "view_as", "reshape_as", "tanh"} | GATE_METHODS
POOL_METHODS = {"mean"}
ADD_METHODS = {"add", "add_", "__add__"}
MUL_METHODS = {"mul", "mul_", "__mul__"}
ROUTE_METHODS = {"transpose", "permute", "swapaxes", "swapdims", "movedim"}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}
RESHAPE_METHODS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "view_as", "reshape_as", "contiguous"}
DIV_METHODS = {"div", "div_", "__truediv__"}

SUPPORTED = {
    "modules": ["Conv2d (any stride/padding/dilation/groups; timm Conv2dSame)", "Linear", "BatchNorm1d/2d (folded; timm BatchNormAct2d)",
                "LayerNorm, GroupNorm, InstanceNorm, LocalResponseNorm (pass-through)",
                "ReLU", "ReLU6", "elementwise activations (" + ", ".join(m.__name__ for m in SMOOTH_ACTIVATIONS) + ")",
                "Dropout*", "Identity", "Flatten", "Unflatten", "MaxPool/AvgPool/AdaptiveAvgPool/AdaptiveMaxPool 1d/2d", "Upsample (nearest, (bi)linear, area)", "ZeroPad/ConstantPad(0) 1d/2d"],
    "functions": ["+ / torch.add (residual add)", "x * sigmoid gate, x * constant or parameter (layer scale), x / constant", "torch.cat", "torch.stack", "chunk/split/unbind and indexing", "transpose/permute", "torch.flatten", "torch.reshape",
                  "F.relu and the other activations", "F.dropout", "torchvision's stochastic_depth", "F.*pool*", "F.interpolate (nearest, (bi)linear, area)", "torch.mean", "F.pad (zeros)"],
    "methods": sorted(PASS_METHODS | POOL_METHODS | ADD_METHODS | MUL_METHODS | DIV_METHODS | ROUTE_METHODS | SPLIT_METHODS),
}


def describe_supported() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in SUPPORTED.items())


def _is_passthrough_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS + (nn.Identity, nn.Dropout))


def _batchnorm_act_ok(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: BN then drop then act; fine when both pass R through."""
    act, drop = getattr(m, "act", nn.Identity()), getattr(m, "drop", nn.Identity())
    return _is_passthrough_activation(act) and _is_passthrough_activation(drop)


def is_rule_leaf(m: nn.Module) -> bool:
    """Modules traced as one node: those a rule handles whole."""
    return isinstance(m, (nn.Conv2d, nn.Linear, nn.Upsample) + BATCHNORM + PASS_MODULES + POOL_MODULES + PAD_MODULES)


class NodeKind:
    LAYER, PASS, POOL, ROUTE, SELECT, ADD, SCALE, CAT = "layer", "pass", "pool", "route", "select", "add", "scale", "cat"


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
            known = has_plain_conv_forward(m) or _weight_transforming_conv(m)
            return NodeKind.LAYER if known and m.padding_mode == "zeros" else None
        if isinstance(m, nn.Linear):
            return NodeKind.LAYER if type(m).forward is nn.Linear.forward else None
        if isinstance(m, BATCHNORM):
            return NodeKind.PASS if _batchnorm_act_ok(m) else None
        if isinstance(m, PASS_MODULES):
            return NodeKind.PASS
        if isinstance(m, POOL_MODULES) or (isinstance(m, nn.Upsample) and m.mode in POSITIVE_RESIZE_MODES):
            return NodeKind.POOL
        if isinstance(m, PAD_MODULES):
            return NodeKind.ROUTE if _zero_constant_pad(node, m) else None
        return None
    if node.op == "call_function":
        t = node.target
        if t in PASS_FUNCTIONS or _is_stochastic_depth(t):
            return NodeKind.PASS
        if t in POOL_FUNCTIONS:
            return NodeKind.POOL
        if t is F.interpolate:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            return NodeKind.POOL if mode in POSITIVE_RESIZE_MODES else None
        if t in ADD_FUNCTIONS:
            return NodeKind.PASS if _adds_zero(node) else NodeKind.ADD
        if t in MUL_FUNCTIONS | DIV_FUNCTIONS:
            return NodeKind.SCALE if _scaled_operand(node) is not None else None
        if t in CAT_FUNCTIONS | STACK_FUNCTIONS:
            return NodeKind.CAT
        if t is F.pad:
            return NodeKind.ROUTE if _zero_constant_pad(node, None) else None
        if t in ROUTE_FUNCTIONS:
            return NodeKind.ROUTE
        if t is operator.getitem:
            return NodeKind.SELECT if _selects_from_a_tensor(node) else None
        return None
    if node.op == "call_method":
        if node.target in PASS_METHODS:
            return NodeKind.PASS
        if node.target in POOL_METHODS:
            return NodeKind.POOL
        if node.target in ADD_METHODS:
            return NodeKind.PASS if _adds_zero(node) else NodeKind.ADD
        if node.target in MUL_METHODS | DIV_METHODS:
            return NodeKind.SCALE if _scaled_operand(node) is not None else None
        if node.target in ROUTE_METHODS:
            return NodeKind.ROUTE
    return None


def split_source(node: fx.Node) -> fx.Node | None:
    """For y = split(x)[i] (chunk, split, tensor_split, unbind): the split node, else None."""
    source = node.args[0]
    if isinstance(source, fx.Node) and ((source.op == "call_method" and source.target in SPLIT_METHODS)
                                        or (source.op == "call_function" and source.target in SPLIT_FUNCTIONS)):
        return source
    return None


def _selects_from_a_tensor(node: fx.Node) -> bool:
    """getitem on a split's pieces, or indexing of a tensor a rule knows (not of a module's
    tuple output or a shape)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return False
    if split_source(node) is not None:
        return bool(source.args) and isinstance(source.args[0], fx.Node)
    if source.op == "placeholder":
        return True
    module = source.meta.get(MODULE_META)
    if getattr(module, "return_indices", False):
        return False
    return node_kind(source, module) is not None


_WEIGHT_TRANSFORMING: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _weight_transforming_conv(m: nn.Conv2d) -> bool:
    """A Conv2d whose own forward only transforms its weight (weight standardisation), as a
    probe shows once per module."""
    if m not in _WEIGHT_TRANSFORMING:
        _WEIGHT_TRANSFORMING[m] = effective_conv_weight(m) is not None
    return _WEIGHT_TRANSFORMING[m]


def _adds_zero(node: fx.Node) -> bool:
    """x + 0 (an accumulator started at 0, as in MobileOne's branch sum): R passes to x."""
    return any(_is_number(v) and v == 0 for v in _two_operands(node)) and "alpha" not in node.kwargs


def _is_stochastic_depth(fn) -> bool:
    """torchvision's ``stochastic_depth`` (kept as one call by fx): the identity in eval mode
    and a dropout of whole samples in training, so R passes through like Dropout."""
    return getattr(fn, "__name__", None) == "stochastic_depth" and getattr(fn, "__module__", "").startswith("torchvision.")


def _is_gate(arg) -> bool:
    """A sigmoid-like factor in [0, 1]: squeeze-and-excitation's channel scale, swish's σ(x),
    also reshaped, expanded (ECA's ``x * y.expand_as(x)``) or resized (GhostNetV2)."""
    arg = _behind_reshapes(arg, resizes=True)  # a resize's convex combinations stay in [0, 1]
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_module":
        return isinstance(arg.meta.get(MODULE_META), (nn.Sigmoid, nn.Hardsigmoid))
    if arg.op == "call_function":
        return arg.target in GATE_FUNCTIONS
    return arg.op == "call_method" and arg.target in GATE_METHODS


def _behind_reshapes(arg, resizes: bool = False):
    """The value a chain of reshapes, expands (and with ``resizes``, interpolations) starts from."""
    while isinstance(arg, fx.Node) and arg.args and (
            (arg.op == "call_method" and arg.target in RESHAPE_METHODS)
            or (arg.op == "call_function" and arg.target in (torch.reshape, torch.unsqueeze, torch.squeeze))
            or (resizes and arg.op == "call_function" and arg.target is F.interpolate)
            or (resizes and isinstance(arg.meta.get(MODULE_META), nn.Upsample))):
        arg = arg.args[0]
    return arg


def _two_operands(node: fx.Node) -> tuple:
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first, node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _divides(node: fx.Node) -> bool:
    return node.target in DIV_FUNCTIONS or node.target in DIV_METHODS


def _scaled_operand(node: fx.Node) -> fx.Node | None:
    """For y = a·b: the operand relevance flows to when the other factor is a gate, a number
    or a parameter (layer scale); for y = a/c: a, when c is a number. None for a product of
    two activations."""
    a, b = _two_operands(node)
    if _divides(node):
        return a if isinstance(a, fx.Node) and _is_number(b) else None
    for x, factor in ((a, b), (b, a)):
        if isinstance(x, fx.Node) and (_is_number(factor) or _is_gate(factor)) and not _is_parameter(x):
            return x
    for x, factor in ((a, b), (b, a)):  # a parameter as the factor: layer scale (ConvNeXt)
        if isinstance(x, fx.Node) and _is_parameter(factor) and not _is_parameter(x):
            return x
    return None


def _is_parameter(v) -> bool:
    """A parameter or buffer of the model: a constant while it is explained."""
    v = _behind_reshapes(v)
    return isinstance(v, fx.Node) and v.op == "get_attr"


def is_shape_query(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim() and items of them: values that carry no relevance."""
    if node.op == "call_function" and node.target is getattr:
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and is_shape_query(node.args[0]))


def is_unsupported_product(node: fx.Node) -> bool:
    """A product or quotient whose factors are neither gates nor constants (a·b of two
    activations, as in attention)."""
    op_table = MUL_FUNCTIONS | DIV_FUNCTIONS if node.op == "call_function" else MUL_METHODS | DIV_METHODS
    return node.op in ("call_function", "call_method") and node.target in op_table and _scaled_operand(node) is None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_factor(node: fx.Node) -> bool:
    """Whether y = a·b or a/b has the sign of its scaled operand (a gate or a positive constant)."""
    x = _scaled_operand(node)
    factor = next((v for v in _two_operands(node) if v is not x), x)  # x·x: both are the gate
    return _is_gate(factor) or (_is_number(factor) and factor > 0)


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
        return isinstance(m, RECTIFIERS) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0)
    if node.op == "call_function":
        if node.target in RECTIFIER_FUNCTIONS:
            return True
        if node.target is F.hardtanh:
            return _hardtanh_min(node) >= 0
    return node.op == "call_method" and node.target in ("relu", "relu_")


def keeps_sign(node: fx.Node, module: nn.Module | None, kind: str | None) -> bool:
    """Whether a node's output is ≥ 0 when all its inputs are: pooling, zero padding,
    concatenation, sums, reshapes and dropout (not BatchNorm, whose shift can make it negative)."""
    if kind == NodeKind.ADD:
        return "alpha" not in node.kwargs  # torch.add(a, b, alpha=-1) subtracts
    if kind in (NodeKind.POOL, NodeKind.ROUTE, NodeKind.SELECT, NodeKind.CAT):
        return True
    if kind == NodeKind.SCALE:
        return _positive_factor(node)
    # Every pass-through activation maps x ≥ 0 to values ≥ 0; a norm's shift does not.
    return kind == NodeKind.PASS and not isinstance(module, BATCHNORM + OTHER_NORMS) and node.target not in NORM_FUNCTIONS


def relevance_inputs(node: fx.Node, kind: str) -> list:
    """The arguments relevance flows back to (may include non-node constants for add)."""
    if kind == NodeKind.ADD:
        return [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
    if kind == NodeKind.CAT:
        return list(node.args[0] if node.args else node.kwargs["tensors"])
    if kind == NodeKind.SCALE:
        return [_scaled_operand(node)]
    if kind == NodeKind.SELECT:
        split = split_source(node)
        return [split.args[0] if split is not None else node.args[0]]
    return [next((a for a in node.args if isinstance(a, fx.Node)), None) or next(iter(node.kwargs.values()))]


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
        if pools_by_indices(module):
            return MaxPoolByIndices(node, inputs, module)
        return Pool(node, inputs, module)
    if kind == NodeKind.ROUTE:
        return Route(node, inputs, module)
    if kind == NodeKind.SELECT:
        return Select(node, inputs, split_source(node))
    if kind == NodeKind.ADD:
        return Add(node, inputs)
    if kind == NodeKind.SCALE:
        return Scale(node, inputs)
    if node.target in STACK_FUNCTIONS:
        return Stack(node, inputs, _cat_dim(node))
    return Cat(node, inputs, _cat_dim(node))


def batchnorm_scale(bn: nn.Module) -> Callable[[], torch.Tensor | None]:
    """γ/√(var+ε) of an eval-mode BatchNorm, computed when called (weights may change)."""
    def scale():
        if bn.running_var is None:
            return None
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s * bn.weight if bn.weight is not None else s
    return scale
