"""The RSP rule for each kind of graph node, and the table that picks it.

A node gets a rule by its module type (``call_module``), function (``call_function``) or
tensor method (``call_method``). Anything else on the path from the input to the saliency
layer is unsupported and reported, with its module path, before any work is done.
"""
from __future__ import annotations

import functools
import operator
import weakref
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.trace import ATTR_VALUE, MODULE_META, untraced
from .base import Context, Rule
from .conv import (CONV_MODULES, PLAIN_CONV_FORWARDS, Conv, FunctionalConv, conv_call_args, effective_conv_weight,
                   has_plain_conv_forward)
from .conv3d import Conv3d, FunctionalConv3d
from .linear import FunctionalLinear, Linear
from .merge import BATCH_MIXING, Add, Cat, MeanOfStack, Stack, Sum
from .operands import (ACTIVATION_FUNCTIONS, ACTIVATIONS, ADD_FUNCTIONS, ADD_METHODS, ADDCMUL, CAST_METHODS, DIV_METHODS,
                       GATE_METHODS, MUL_METHODS, RECTIFIER_FUNCTIONS, RECTIFIERS, ELEMENTWISE_ACTIVATIONS,
                       SUB_FUNCTIONS, SUB_METHODS, TRANSPOSES, addcmul_operands, addcmul_terms, attribute_now,
                       behind_reshapes, call_arg, calls, fixed_value, is_biased_sum,
                       is_number, is_parameter, is_product, is_timm_activation, keeps_sign_of_operand, op_name, reduced_dims,
                       sole_operand)
from .passthrough import GatedHalf, PassThrough, Rejoin, Route, SampleRoute, Scale, Select
from .pool import AttentionPool, MaxPoolByIndices, Pool, pools_by_indices

__all__ = ["Context", "Rule", "rule_for", "is_rule_leaf", "SUPPORTED", "describe_supported", "NodeKind", "node_kind",
           "pads_by_copy", "zero_padding"]

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # SyncBatchNorm: plain BN in eval mode
# Frozen BatchNorms (detection backbones, timm's freeze_batch_norm_2d): the same γ, β, running
# statistics and ε as buffers, applied as x·scale + shift; by name, so neither library is imported.
FROZEN_BATCHNORMS = {("torchvision.ops.misc", "FrozenBatchNorm2d"), ("timm.layers.norm_act", "FrozenBatchNormAct2d")}
# Norms that cannot be folded into the layer before them pass R through, as RSP_SPEC.md says
# of a BatchNorm that cannot be folded (ConvNeXt's LayerNorm, GroupNorm in BiT ResNets).
OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm)
NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.instance_norm, F.batch_norm, F.local_response_norm}
PASS_MODULES = ACTIVATIONS + OTHER_NORMS + (nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# Resizing whose weights are ≥ 0 is a positive linear map like average pooling: the same z-rule.
POSITIVE_RESIZE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
# Padding that copies input values (reflect, replicate, circular): an index map, like cropping.
COPY_PAD_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
                    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
# Rearrangements within a sample (space-to-depth stems, sub-pixel upsampling, channel shuffles):
# index maps, like transposes.
SHUFFLE_MODULES = (nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)

NEGATION = ({operator.neg, torch.neg, torch.negative}, {"neg", "negative", "__neg__"})  # −x: x·(−1), R passed on
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
PASS_FUNCTIONS = ACTIVATION_FUNCTIONS | NORM_FUNCTIONS | NEGATION[0] | DROPOUT_FUNCTIONS | {
    torch.flatten, torch.unflatten, torch.reshape, torch.squeeze, torch.unsqueeze}
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                  F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
POWER = ({operator.pow, torch.pow, torch.square}, {"pow", "square", "__pow__"})  # functions, methods
SUM = ({torch.sum}, {"sum"})
AMAX = ({torch.amax}, {"amax"})
# Thresholds written as ops: clamp(x, min, max) (a ReLU as x.clamp(min=0)), maximum/minimum
# with a constant (Filter Response Norm's TLU, max(x, τ)): elementwise, like the activations.
CLAMP = ({torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max}, {"clamp", "clamp_", "clip", "clamp_min", "clamp_max"})
EXTREMUM = ({torch.maximum, torch.minimum, torch.fmax, torch.fmin}, {"maximum", "minimum"})
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
MATMUL = ({operator.matmul, torch.matmul}, {"matmul", "__matmul__"})
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
STACK_FUNCTIONS = {torch.stack}
ROUTE_FUNCTIONS = TRANSPOSES[0] | {torch.permute, torch.movedim, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
                                   torch.native_channel_shuffle}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
# Copies and moves within each sample (a grey image made three channels, a test-time flip):
# index maps like the routes (SampleRoute); along the batch refused, as reductions are (dims_read_along)
COPY_FUNCTIONS = {torch.tile, torch.repeat_interleave, torch.index_select, torch.flip, torch.roll, torch.rot90}
COPY_METHODS = {"repeat", "expand", "tile", "repeat_interleave", "index_select", "flip", "roll", "rot90"}
PASS_METHODS = {"view", "reshape", "flatten", "unflatten", "contiguous", "relu", "relu_", "clone", "view_as", "reshape_as",
                "tanh", "squeeze", "unsqueeze"} | CAST_METHODS | GATE_METHODS | NEGATION[1]
POOL_METHODS = {"mean"}
ROUTE_METHODS = TRANSPOSES[1] | {"permute", "movedim"}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}

SUPPORTED = {
    "modules": ["Conv1d, Conv2d, Conv3d (any stride/padding/padding_mode/dilation/groups; timm Conv2dSame)", "Linear", "BatchNorm1d/2d/3d, SyncBatchNorm (folded; frozen ones and timm BatchNormAct2d too)",
                "LayerNorm, GroupNorm, InstanceNorm, LocalResponseNorm (pass-through)",
                "ReLU", "ReLU6", "elementwise activations (" + ", ".join(m.__name__ for m in ELEMENTWISE_ACTIVATIONS) + ")",
                "Dropout*", "Identity", "Flatten", "Unflatten", "MaxPool/AvgPool/AdaptiveAvgPool/AdaptiveMaxPool 1d/2d/3d", "Upsample (nearest, (bi)linear, area)", "ZeroPad/ConstantPad(0 or -inf)/ReflectionPad/ReplicationPad/CircularPad 1d/2d/3d",
                "PixelShuffle, PixelUnshuffle, ChannelShuffle", "GLU"],
    "functions": ["+ / torch.add (residual add)", "x * (sigmoid or softmax gate, number, parameter, or statistic: a mean, norm or softmax of pooled features), x / (number or statistic), x ± (number or parameter), torch.addcmul (x + p·p' or p + p'·x; a residual x + c·f as the add)",
                  "torch.sum over non-batch dims (sum of branches)", "x ** number", "clamp, maximum/minimum with a constant", "torch.cat and torch.stack (not along the batch)", "chunk/split/unbind and indexing", "transpose/permute", "repeat/expand/tile/repeat_interleave/index_select/flip/roll/rot90 (not along the batch)", "pixel_shuffle/pixel_unshuffle/channel_shuffle", "torch.flatten", "torch.reshape",
                  "F.relu and the other activations", "F.dropout", "torchvision's stochastic_depth", "F.*pool*", "F.interpolate (nearest, (bi)linear, area)", "torch.mean over non-batch dims",
                  "torch.amax / x.max(dim).values / torch.max(x, dim)[0] over non-batch dims (max over time)",
                  "F.conv2d with a constant filter >= 0 (blur pooling)", "F.pad (zeros, reflect, replicate, circular)",
                  "act(g) * x (gated units)", "F.glu", "x @ softmax(...) (attention pooling)",
                  "F.conv1d / F.conv2d / F.conv3d / F.linear / x @ P on parameters (layers written as functions)"],
    "methods": sorted(PASS_METHODS | POOL_METHODS | ADD_METHODS | SUB_METHODS | MUL_METHODS | DIV_METHODS | ROUTE_METHODS | SPLIT_METHODS
                      | COPY_METHODS | POWER[1] | SUM[1] | AMAX[1] | ADDCMUL[1] | CLAMP[1] | EXTREMUM[1]),
}


def describe_supported() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in SUPPORTED.items())


def _is_passthrough_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS + (nn.Identity, nn.modules.dropout._DropoutNd)) or is_timm_activation(m)


def is_identity_in_eval(node: fx.Node, m: nn.Module | None) -> bool:
    """Dropout of any kind (modules and functions), stochastic depth and nn.Identity: the
    identity as the model predicts."""
    if m is not None:
        return isinstance(m, (nn.modules.dropout._DropoutNd, nn.Identity))
    return node.op == "call_function" and (node.target in DROPOUT_FUNCTIONS or _is_stochastic_depth(node.target))


def is_batchnorm(m) -> bool:
    """A BatchNorm RSP folds into the layer before it (RSP_SPEC.md §2), frozen ones included."""
    return isinstance(m, BATCHNORM) or (type(m).__module__, type(m).__name__) in FROZEN_BATCHNORMS


def _batchnorm_act_ok(m: nn.Module) -> bool:
    """timm's BatchNormAct2d: BN then drop then act; fine when both pass R through."""
    act, drop = getattr(m, "act", nn.Identity()), getattr(m, "drop", nn.Identity())
    return _is_passthrough_activation(act) and _is_passthrough_activation(drop)


def is_rule_leaf(m: nn.Module) -> bool | None:
    """True for modules traced as one node (those a rule handles whole); False for a module
    traced into because the rules know the ops its forward calls: a conv (1-D, 2-D, 3-D) padding with copies
    (``padding_mode`` reflect, replicate or circular) runs F.pad, then F.convNd without
    padding, and a conv subclass that does more than one conv of its input (pads it first);
    None leaves the choice to torch.fx."""
    if isinstance(m, CONV_MODULES + (nn.Conv3d,)):
        if type(m).forward in PLAIN_CONV_FORWARDS:
            return m.padding_mode == "zeros"
        # a subclass: whole if its forward is one conv of its input (weight standardisation),
        # else traced into, its padding and F.convNd on its parameters explained op by op
        return _conv_subclass_whole(m)
    if isinstance(m, nn.Linear) and not _plain_linear(m):
        return False  # a subclass with its own forward (timm's Linear): traced into, its F.linear explained
    if (isinstance(m, CONV_MODULES + (nn.Conv3d, nn.Linear, nn.Upsample) + PASS_MODULES + POOL_MODULES + PAD_MODULES
                   + COPY_PAD_MODULES + SHUFFLE_MODULES + (nn.GLU,)) or is_timm_activation(m) or is_batchnorm(m)):
        return True
    return None


def _conv_subclass_whole(m: nn.Module) -> bool:
    """A conv module whose forward is one conv of its input, as the rules run it (a plain conv,
    or one that standardises its weight first)."""
    return has_plain_conv_forward(m) or (isinstance(m, nn.Conv2d) and _weight_transforming_conv(m))


def _plain_linear(m: nn.Linear) -> bool:
    return type(m).forward is nn.Linear.forward


class NodeKind:
    LAYER, PASS, POOL, ROUTE, SELECT, ADD, SCALE, CAT, SUM = (
        "layer", "pass", "pool", "route", "select", "add", "scale", "cat", "sum")


def _pads_by_copy_or_blank(node: fx.Node, module: nn.Module | None) -> bool:
    """Padding a rule can undo: zeros (or -inf, before a max pool; neither carries relevance)
    or copies of input values (reflect, replicate, circular)."""
    if module is not None:
        return not isinstance(module, nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d) or module.value in (0, float("-inf"))
    mode, value = call_arg(node, 2, "mode", "constant"), call_arg(node, 3, "value")
    return mode != "constant" or not value or value == float("-inf")


def pads_by_copy(node: fx.Node, module: nn.Module | None) -> bool:
    """Padding with copies of input values (reflect, replicate, circular), as a module or F.pad."""
    if module is not None:
        return isinstance(module, COPY_PAD_MODULES)
    if node.op != "call_function" or node.target is not F.pad:
        return False
    return call_arg(node, 2, "mode", "constant") != "constant"


def zero_padding(node: fx.Node, module: nn.Module | None) -> tuple[int, ...] | None:
    """The amounts (F.pad order) of a padding with zeros, as a module (ZeroPad, ConstantPad
    with 0) or F.pad in constant mode with 0; None for anything else."""
    if module is not None:
        padding = tuple(module.padding) if isinstance(module, PAD_MODULES) and getattr(module, "value", 0) == 0 else ()
        return padding if padding and all(p >= 0 for p in padding) else None  # a negative one crops
    if node.op != "call_function" or node.target is not F.pad:
        return None
    mode, value = call_arg(node, 2, "mode", "constant"), call_arg(node, 3, "value")
    pad = call_arg(node, 1, "pad")
    if mode == "constant" and not value and isinstance(pad, (tuple, list)) and all(isinstance(p, int) and p >= 0 for p in pad):
        return tuple(pad)
    return None


def _fixed_positive_filter(node: fx.Node, read: Callable[[str], object] | None = None) -> bool:
    """F.conv2d with a constant filter ≥ 0 and no bias (timm's BlurPool anti-aliasing, a box or
    Gaussian filter made in forward): a pooling, not a layer with learned weights. The filter
    is a buffer or made from buffers and numbers: a parameter, frozen or not, is learned (a
    frozen model's non-negative conv weights stay a layer). ``read``: see ``fixed_value``."""
    call = conv_call_args(node)
    value = fixed_value(call.get("weight"), read) if call.get("bias") is None else None
    return isinstance(value, torch.Tensor) and value.dim() >= 3 and value.numel() > 0 and bool((value >= 0).all())


def is_pointwise_conv(node: fx.Node, m: nn.Module | None) -> bool:
    """A 1×1 (1, 1×1×1) conv: a Conv1d/2d/3d module or F.conv* on a parameter filter."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return all(k == 1 for k in m.kernel_size)
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS or not _conv_with_constant_weight(node):
        return False
    weight = conv_call_args(node).get("weight")
    value = weight.meta.get(ATTR_VALUE) if weight.op == "get_attr" else None
    return isinstance(value, torch.Tensor) and all(k == 1 for k in value.shape[2:])


def filter_signs_judged(nodes) -> list[tuple[fx.Node, bool]]:
    """The convs among ``nodes`` whose filter is fixed (buffers and numbers), each with whether
    it is ≥ 0 (a pooling) now: a buffer changed in place since may change the rule."""
    return [(n, _fixed_positive_filter(n)) for n in nodes if n.op == "call_function" and n.target in CONV_FUNCTIONS
            and fixed_value(conv_call_args(n).get("weight")) is not None]


def filter_signs_hold(judged: list[tuple[fx.Node, bool]], read: Callable[[str], object]) -> bool:
    """Whether each filter's sign is still as judged, its buffers read as they are now."""
    return all(_fixed_positive_filter_now(n, read) == positive for n, positive in judged)


def _fixed_positive_filter_now(node: fx.Node, read: Callable[[str], object]) -> bool:
    """``_fixed_positive_filter`` with the model's attributes now, worked out again only when an
    attribute it read holds other values (each call checks the plan). Compared by value: a write
    through ``.data`` leaves a tensor's version as it was."""
    last = node.meta.get(_FILTER_READS)
    if last is not None and all(_same_values(read(target), seen) for target, seen in last[0].items()):
        return last[1]
    reads = {}

    def reading(target: str):
        reads[target] = read(target)
        return reads[target]
    positive = _fixed_positive_filter(node, reading)
    node.meta[_FILTER_READS] = ({t: v.detach().clone() if isinstance(v, torch.Tensor) else v for t, v in reads.items()},
                                positive)
    return positive


_FILTER_READS = "rsp_filter_reads"  # node.meta key: (attribute → a copy of what was read), the judgement


def _same_values(now, seen) -> bool:
    if isinstance(now, torch.Tensor) and isinstance(seen, torch.Tensor):
        return (now.dtype == seen.dtype and now.shape == seen.shape and now.device == seen.device
                and torch.equal(now, seen))
    return now is seen


def _conv_with_constant_weight(node: fx.Node) -> bool:
    """F.conv{1,2,3}d(x, w, ...) with w a parameter or computed from parameters, and constant
    geometry: a conv layer written as a function (per-sample weights, as CondConv's, are not)."""
    call = conv_call_args(node)
    geometry = [call.get(k) for k in ("stride", "padding", "dilation", "groups")]
    return (node.target in CONV_FUNCTIONS and isinstance(call.get("input"), fx.Node)
            and is_parameter(call.get("weight")) and (call.get("bias") is None or is_parameter(call["bias"]))
            and not any(isinstance(v, fx.Node) for v in geometry))


def functional_linear_weight(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """For F.linear(x, W, b) with W (and b) parameters: (W, False); for x @ P with P a 2-D
    parameter: (P, True), its weight being Pᵀ. None for anything else."""
    if node.op == "call_function" and node.target is F.linear:
        x, weight, bias = node.args[0], call_arg(node, 1, "weight"), call_arg(node, 2, "bias")
        if isinstance(x, fx.Node) and is_parameter(weight) and (bias is None or is_parameter(bias)):
            return weight, False
    if calls(node, *MATMUL) and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and not is_parameter(node.args[0]):
        P, transposed = node.args[1], True
        if _is_matrix_transpose(P):  # x @ W.t(): nn.Linear's own convention, the weight W
            P, transposed = P.args[0], False
        value = P.meta.get(ATTR_VALUE) if isinstance(P, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return P, transposed
    return None


def _is_matrix_transpose(v) -> bool:
    """W.t(), W.T, W.mT, W.transpose(0, 1) / (1, 0) / (-1, -2) / (-2, -1), torch.t(W)."""
    if not isinstance(v, fx.Node) or not v.args:
        return False
    if calls(v, {torch.t}, {"t"}) or (v.op == "call_function" and v.target is getattr and v.args[1:] in (("T",), ("mT",))):
        return True
    dims = v.args[1:]  # W.transpose(a, b) and torch.transpose(W, a, b) alike
    return (calls(v, {torch.transpose}, {"transpose"}) and len(dims) == 2 and all(isinstance(d, int) for d in dims)
            and sorted(d % 2 for d in dims) == [0, 1])


def _is_softmax(v) -> bool:
    """A softmax output, also reshaped or transposed."""
    v = behind_reshapes(v)
    while isinstance(v, fx.Node) and calls(v, ROUTE_FUNCTIONS, ROUTE_METHODS):
        v = behind_reshapes(v.args[0])
    if not isinstance(v, fx.Node):
        return False
    return isinstance(v.meta.get(MODULE_META), nn.Softmax) or calls(v, {F.softmax, torch.softmax}, {"softmax"})


def attention_weights_index(node: fx.Node) -> int | None:
    """For x @ A or A @ x with A a softmax and x not: A's position (0 or 1), else None."""
    if not calls(node, *MATMUL) or len(node.args) != 2:
        return None
    a, b = node.args
    if _is_softmax(b) and isinstance(a, fx.Node) and not _is_softmax(a):
        return 1
    if _is_softmax(a) and isinstance(b, fx.Node) and not _is_softmax(b):
        return 0
    return None


def _sums_within_samples(node: fx.Node) -> bool:
    """x.sum(dims) or x.mean(dims) over dimensions that are not the batch's (or over the new
    leading dimension of branches stacked along it)."""
    dims = reduced_dims(node)
    if dims == (0,) and stacks_branches(node.args[0]):
        return True
    return bool(dims) and all(isinstance(d, int) and d != 0 for d in dims)


# Ops that read along whole dimensions: run along the batch's, each sample's output reads the others'.
ALONG_DIMS = ({torch.mean, torch.nanmean, torch.sum, torch.nansum, torch.prod, torch.cumsum, torch.amax, torch.amin, torch.max,
               torch.min, torch.std, torch.var, torch.logsumexp, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax},
              {"mean", "nanmean", "sum", "nansum", "prod", "cumsum", "amax", "amin", "max", "min", "std", "var", "logsumexp",
               "softmax", "log_softmax"})


def dims_read_along(node: fx.Node) -> tuple[tuple[int, ...], fx.Node, str] | None:
    """For a reduction, softmax or join along dimensions written as numbers: those dimensions,
    the node whose rank they index, and the op's name; None for other ops (a stack of branches
    summed away, a reduction of a stack: their own rules weigh the stacked dimension)."""
    if node.op == "call_function" and node.target in CAT_FUNCTIONS | STACK_FUNCTIONS:
        dim = _cat_dim(node)
        if stacks_branches(node) or not is_number(dim):
            return None
        return (dim,), node, f"torch.{node.target.__name__}"
    copies = calls(node, COPY_FUNCTIONS, COPY_METHODS)
    if not (copies or calls(node, *ALONG_DIMS)):
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(source, fx.Node) or (source.op == "call_function" and source.target in STACK_FUNCTIONS):
        return None
    dims = tuple(d for d in (copy_dims(node) if copies else reduced_dims(node)) or ()
                 if isinstance(d, int) and not isinstance(d, bool))
    name = op_name(node)
    return (dims, source, name) if dims else None


def reads_other_samples(node: fx.Node) -> str | None:
    """Why an op makes each sample's values depend on the other samples' (None if the graph shows
    no such thing): it runs along the batch's dimension, or copies by an index computed from the
    activations (one index for the whole batch)."""
    read = dims_read_along(node)
    if read is not None and 0 in read[0]:
        return BATCH_MIXING.format(read[2])
    if calls(node, COPY_FUNCTIONS, COPY_METHODS) and _indexes_by_activations(node):
        return ("an index or repeats computed from the activations: one for the whole batch, so each sample's "
                "copy would depend on the other samples (rules exist for an index or repeats that are constants)")
    return None


def mixes_the_batch(node: fx.Node, module: nn.Module | None) -> str | None:
    """Why a node of the model's head makes each sample's logits depend on the other samples (a
    BatchNorm by the batch's statistics), or None: R₀'s gradient through such a head would mix
    them. A head's reductions are not judged by their dims: its tokens may lead (CLIP's
    attention pool, T×N×C), and an ensemble stacks its members' logits in front."""
    return unsupported_combination(node, module) if _normalises_by_the_batch(node, module) else None


def stacks_branches(node) -> bool:
    """torch.stack([a, b, ...]) along a new leading dimension that every user sums or averages
    away (``stack(branches).sum(0)``): a sum of branches, each sample's rows still its own."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in STACK_FUNCTIONS
            and _cat_dim(node) == 0 and bool(node.users) and all(_drops_leading_dim(u) for u in node.users))


def _averages_stacked_branches(node: fx.Node) -> bool:
    """A mean over one dimension of a torch.stack that is (or, written with the other sign,
    may be: the rank is known at run time) the stacked one."""
    source = node.args[0] if node.args else None
    dims = reduced_dims(node)
    if not (isinstance(source, fx.Node) and source.op == "call_function" and source.target in STACK_FUNCTIONS
            and dims is not None and len(dims) == 1 and isinstance(dims[0], int)):
        return False
    stacked = _cat_dim(source)
    return dims[0] == stacked or (dims[0] != 0 and (dims[0] < 0) != (stacked < 0))  # dim 0: the batch's


def _drops_leading_dim(node: fx.Node) -> bool:
    keepdim = call_arg(node, 2, "keepdim", False)
    return (calls(node, *SUM) or calls(node, {torch.mean}, POOL_METHODS)) and reduced_dims(node) == (0,) and not keepdim


def _thresholds(node: fx.Node) -> bool:
    """clamp(x, ...) or maximum(x, c) with bounds that are numbers or parameters."""
    x, *bounds = list(node.args) + list(node.kwargs.values())
    return isinstance(x, fx.Node) and not is_parameter(x) and all(b is None or is_number(b) or is_parameter(b) for b in bounds)


def _clamp_min(node: fx.Node):
    """The lower bound of a clamp (None if it has none)."""
    if node.target in (torch.clamp_min, "clamp_min"):
        return call_arg(node, 1, "min")
    if node.target in (torch.clamp_max, "clamp_max"):
        return None
    return call_arg(node, 1, "min")


def _raises_to_a_number(node: fx.Node) -> bool:
    base, exponent = node.args[0], call_arg(node, 1, "exponent", 2)
    return isinstance(base, fx.Node) and (is_number(exponent) or node.target in (torch.square, "square"))


def node_kind(node: fx.Node, module: nn.Module | None) -> str | None:
    """What a node does for RSP, or None if unsupported."""
    if node.op == "call_module":
        m = module
        if isinstance(m, CONV_MODULES + (nn.Conv3d,)):
            return NodeKind.LAYER if _conv_subclass_whole(m) else None
        if isinstance(m, nn.Linear):
            return NodeKind.LAYER if _plain_linear(m) else None
        if is_batchnorm(m):
            return NodeKind.PASS if _batchnorm_act_ok(m) and not _normalises_by_the_batch(node, m) else None
        if isinstance(m, PASS_MODULES) or is_timm_activation(m):
            return NodeKind.PASS
        if isinstance(m, POOL_MODULES) or (isinstance(m, nn.Upsample) and m.mode in POSITIVE_RESIZE_MODES):
            return NodeKind.POOL
        if isinstance(m, PAD_MODULES + COPY_PAD_MODULES):
            return NodeKind.ROUTE if _pads_by_copy_or_blank(node, m) else None
        if isinstance(m, SHUFFLE_MODULES + (nn.GLU,)):  # a GLU's signal half: a piece of its input (GatedHalf)
            return NodeKind.ROUTE
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    if _normalises_by_the_batch(node, None):
        return None
    if calls(node, PASS_FUNCTIONS, PASS_METHODS) or _is_stochastic_depth(t):
        return NodeKind.PASS
    if calls(node, *POWER):  # an elementwise function, like the activations
        return NodeKind.PASS if _raises_to_a_number(node) else None
    if calls(node, *CLAMP) or calls(node, *EXTREMUM):
        return NodeKind.PASS if _thresholds(node) else None
    if calls(node, {torch.mean}, POOL_METHODS):  # a spatial mean; over the batch it would mix samples
        if _averages_stacked_branches(node):  # (a + b) / 2 written as stack([a, b], d).mean(d): the add rule's
            return NodeKind.SUM
        return NodeKind.POOL if _sums_within_samples(node) else None
    if calls(node, POOL_FUNCTIONS, set()):
        return NodeKind.POOL
    if calls(node, *AMAX):  # a max over positions (max over time in text CNNs): a max pooling
        return NodeKind.POOL if _sums_within_samples(node) else None
    if t is F.interpolate:
        return NodeKind.POOL if _interpolate_mode(node) in POSITIVE_RESIZE_MODES else None
    if t in CONV_FUNCTIONS:
        if _fixed_positive_filter(node):
            return NodeKind.POOL
        return NodeKind.LAYER if _conv_with_constant_weight(node) else None
    if calls(node, *SUM):
        return NodeKind.SUM if _sums_within_samples(node) else None
    if is_product(node) or is_biased_sum(node) or calls(node, *ADDCMUL):
        if sole_operand(node) is not None:
            return NodeKind.SCALE
        if calls(node, *ADDCMUL):
            return NodeKind.ADD if addcmul_terms(node) is not None else None
        return NodeKind.ADD if is_biased_sum(node) and is_number(node.kwargs.get("alpha", 1)) else None
    if functional_linear_weight(node) is not None:
        return NodeKind.LAYER
    if attention_weights_index(node) is not None:  # a weighted pooling (GCNet's global context)
        return NodeKind.POOL
    if t in CAT_FUNCTIONS | STACK_FUNCTIONS:
        if not (isinstance(_joined(node), (list, tuple)) or rejoined_split(node) is not None):
            return None  # a tuple some other op made: which pieces it holds is not known here
        return NodeKind.CAT if _cat_dim(node) != 0 or stacks_branches(node) else None  # along the batch it would mix samples
    if t is F.pad:
        return NodeKind.ROUTE if _pads_by_copy_or_blank(node, None) else None
    if t is F.glu:
        return NodeKind.ROUTE if isinstance(glu_dim(node, None), int) else None
    if calls(node, ROUTE_FUNCTIONS, ROUTE_METHODS):
        return NodeKind.ROUTE
    if calls(node, COPY_FUNCTIONS, COPY_METHODS):  # along the batch: refused by dims_read_along
        dims = copy_dims(node)
        return NodeKind.ROUTE if dims is not None and 0 not in dims and not _indexes_by_activations(node) else None
    if t is operator.getitem:
        return NodeKind.SELECT if _selects_from_a_tensor(node) else None
    return None


def _interpolate_mode(node: fx.Node) -> str:
    return call_arg(node, 3, "mode", "nearest")


def glu_dim(node: fx.Node, module: nn.Module | None):
    """The dimension an nn.GLU or F.glu splits (an int, unless the graph computes it)."""
    if module is not None:
        return module.dim
    return call_arg(node, 1, "dim", -1)


def _joined(node: fx.Node):
    """What torch.cat / torch.stack joins: a list of tensors, or one node holding a tuple."""
    return node.args[0] if node.args else node.kwargs.get("tensors")


def rejoined_split(node: fx.Node) -> fx.Node | None:
    """For torch.cat(split(x), …) or torch.stack(split(x), …), the split's pieces handed over
    whole as the first argument (or a slice of them: ``x.chunk(2, 1)[::-1]``): the split
    node, else None."""
    pieces = _joined(node)
    if _constant_slice(pieces) is not None:
        pieces = pieces.args[0]
    if isinstance(pieces, fx.Node) and calls(pieces, SPLIT_FUNCTIONS, SPLIT_METHODS) and pieces.args \
            and isinstance(pieces.args[0], fx.Node):
        return pieces
    return None


def _constant_slice(node) -> slice | None:
    """For ``pieces[a:b:c]`` with a, b, c numbers or None: that slice, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    key = node.args[1]
    parts = (key.start, key.stop, key.step) if isinstance(key, slice) else ()
    return key if parts and all(p is None or isinstance(p, int) for p in parts) else None


def split_source(node: fx.Node) -> fx.Node | None:
    """For y = split(x)[i] (chunk, split, tensor_split, unbind): the split node, else None."""
    source = node.args[0]
    return source if isinstance(source, fx.Node) and calls(source, SPLIT_FUNCTIONS, SPLIT_METHODS) else None


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
        with untraced():  # asked by the tracer: the probe must see the real weights, not fx proxies
            _WEIGHT_TRANSFORMING[m] = effective_conv_weight(m) is not None
    return _WEIGHT_TRANSFORMING[m]


def _is_stochastic_depth(fn) -> bool:
    """torchvision's ``stochastic_depth`` (kept as one call by fx): the identity in eval mode
    and a dropout of whole samples in training, so R passes through like Dropout."""
    return getattr(fn, "__name__", None) == "stochastic_depth" and getattr(fn, "__module__", "").startswith("torchvision.")


def _normalises_by_the_batch(node: fx.Node, module: nn.Module | None) -> bool:
    """A BatchNorm that normalises by the batch's own statistics even in eval mode: a module
    without running statistics (``track_running_stats=False``), or F.batch_norm in training
    mode or without them. Each sample's output then depends on the others'."""
    if module is not None:
        return is_batchnorm(module) and getattr(module, "running_var", 1) is None
    if node.op != "call_function" or node.target is not F.batch_norm:
        return False
    args = dict(zip(BATCH_NORM_ARGS, node.args)) | node.kwargs
    return args.get("running_var") is None or args.get("training") is not False and args.get("training") is not None


def unsupported_combination(node: fx.Node, module: nn.Module | None = None) -> str | None:
    """Why a product, quotient, difference, conv, resize, constant pad or batch-statistics norm has no rule, or
    why a reduction, cat or stack would mix the batch (None if it has one)."""
    if _normalises_by_the_batch(node, module):
        return ("a BatchNorm that normalises by the batch's own mean and variance (no running statistics, or "
                "training mode): each sample's output would depend on the other samples'")
    mode = (module.mode if isinstance(module, nn.Upsample) else _interpolate_mode(node) if node.target is F.interpolate
            else None)
    if mode is not None and mode not in POSITIVE_RESIZE_MODES:
        return (f"resizing in mode {mode!r}, whose weights can be negative (rules exist for "
                f"{', '.join(sorted(POSITIVE_RESIZE_MODES))})")
    if (is_product(node) or calls(node, *ADDCMUL)) and sole_operand(node) is None:
        return ("a product of two position-wise activations (rules exist for x times a sigmoid gate, a number, "
                "a parameter or a statistic such as a mean or a norm of the activations, and x divided by one)")
    mixing = reads_other_samples(node)
    if mixing:
        return mixing
    if (isinstance(module, PAD_MODULES) or (module is None and node.target is F.pad)) and not _pads_by_copy_or_blank(node, module):
        value = module.value if module is not None else call_arg(node, 3, "value")
        return (f"padding with the constant {value!r}, a border the activations are joined to that relevance would flow "
                "into (rules exist for padding with 0, with -inf before a max pool, and for reflect, replicate and circular)")
    if node.op == "call_function" and node.target in CONV_FUNCTIONS and not is_parameter(conv_call_args(node).get("weight")):
        return ("a convolution whose weight is computed from the activations (as CondConv's per-sample mixture of "
                "kernels); rules exist for weights that are parameters or computed from parameters only")
    return None


def _hardtanh_min(node: fx.Node) -> float:
    """The lower bound of an ``F.hardtanh`` call (its default is -1)."""
    return call_arg(node, 1, "min_val", -1.0)


def rectifies(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether a node's output is ≥ 0 whatever its input: ReLU, ReLU6, hardtanh from 0, and
    timm's BatchNormAct2d ending in one of them."""
    if node.op == "call_module":
        m = module
        if is_batchnorm(m):
            m = getattr(m, "act", None)
        return isinstance(m, RECTIFIERS) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0)
    if node.op == "call_function":
        if node.target in RECTIFIER_FUNCTIONS:
            return True
        if node.target is F.hardtanh:
            return _hardtanh_min(node) >= 0
    if calls(node, *CLAMP):  # x.clamp(min=0): a ReLU
        low = _clamp_min(node)
        return is_number(low) and low >= 0
    return node.op == "call_method" and node.target in ("relu", "relu_")


def keeps_sign(node: fx.Node, module: nn.Module | None, kind: str | None) -> bool:
    """Whether a node's output is ≥ 0 when all its inputs are: pooling, zero padding,
    concatenation, sums, reshapes and dropout (not BatchNorm, whose shift can make it negative)."""
    if kind == NodeKind.ADD:
        return calls(node, ADD_FUNCTIONS, ADD_METHODS) and node.kwargs.get("alpha", 1) >= 0  # not a − b
    if kind in (NodeKind.POOL, NodeKind.ROUTE, NodeKind.SELECT, NodeKind.CAT, NodeKind.SUM):
        return True
    if kind == NodeKind.SCALE:
        return keeps_sign_of_operand(node)
    # The pass-through activations map x ≥ 0 to values ≥ 0, but for those whose floor or
    # ceiling may be negative; a norm's shift does not.
    return (kind == NodeKind.PASS and not is_batchnorm(module) and not isinstance(module, OTHER_NORMS)
            and node.target not in NORM_FUNCTIONS and not _may_turn_negative(node, module))


def _may_turn_negative(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether an elementwise op can map x ≥ 0 to a negative value: −x, LogSigmoid, Threshold to
    a negative value, Hardtanh, clamp or minimum with a ceiling that is not a number ≥ 0."""
    def below_zero(bound) -> bool:  # a bound not known to be ≥ 0
        return bound is not None and not (is_number(bound) and bound >= 0)

    arg = functools.partial(call_arg, node)
    if isinstance(module, nn.LogSigmoid) or calls(node, {F.logsigmoid}, set()) or calls(node, *NEGATION):
        return True
    if isinstance(module, nn.Threshold):
        return below_zero(module.value)
    if isinstance(module, nn.Hardtanh):
        return below_zero(module.max_val)
    if calls(node, {F.threshold}, set()):
        return below_zero(arg(2, "value"))
    if calls(node, {F.hardtanh}, set()):
        return below_zero(arg(2, "max_val", 1.0))
    if node.target in (torch.clamp_max, "clamp_max"):
        return below_zero(arg(1, "max"))
    if calls(node, *CLAMP) and node.target not in (torch.clamp_min, "clamp_min"):
        return below_zero(arg(2, "max"))
    if calls(node, {torch.minimum, torch.fmin}, {"minimum"}):
        return below_zero(arg(1, "other"))
    return False


def relevance_inputs(node: fx.Node, kind: str) -> list:
    """The arguments relevance flows back to (may include non-node constants for add)."""
    if kind == NodeKind.ADD:
        if calls(node, *ADDCMUL):
            return list(addcmul_terms(node)[:2])
        return [node.args[0], call_arg(node, 1, "other")]
    if kind == NodeKind.CAT:
        split = rejoined_split(node)
        return [split.args[0]] if split is not None else list(_joined(node))
    if kind == NodeKind.SCALE:
        return [sole_operand(node)]
    weights = attention_weights_index(node) if kind == NodeKind.POOL else None
    if weights is not None:
        return [node.args[1 - weights]]
    if kind == NodeKind.SELECT:
        split = split_source(node)
        return [split.args[0] if split is not None else node.args[0]]
    first = next((a for a in node.args if isinstance(a, fx.Node)), None)
    if first is None:  # the tensor given by keyword (torch.flip(dims=[3], input=h))
        first = node.kwargs.get("input", node.kwargs.get("self", next(iter(node.kwargs.values()))))
    return [first]


def copy_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims a copy or move (COPY_FUNCTIONS, COPY_METHODS) acts along, as written: () for
    repeat, expand and tile (their batch size is checked when run, SampleRoute), (0,) where the
    op runs over the flattened tensor (roll or repeat_interleave without dims), rot90's default
    (0, 1); None where a dim is not a number."""
    name = op_name(node)
    if name in ("repeat", "expand", "tile"):
        return ()
    if name == "flip":
        dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else call_arg(node, 1, "dims")
    else:  # repeat_interleave(x, repeats, dim), index_select(x, dim, index), roll(x, shifts, dims), rot90(x, k, dims)
        dims = {"repeat_interleave": call_arg(node, 2, "dim"), "index_select": call_arg(node, 1, "dim"),
                "roll": call_arg(node, 2, "dims"), "rot90": call_arg(node, 2, "dims", (0, 1))}[name]
    dims = (0,) if dims is None else tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return dims if dims and all(is_number(d) and isinstance(d, int) for d in dims) else None


def _indexes_by_activations(node: fx.Node) -> bool:
    """index_select's index or repeat_interleave's repeats computed from the activations: one
    for the whole batch, so that every sample's copy depends on the others' values."""
    name = op_name(node)
    where = {"index_select": (2, "index"), "repeat_interleave": (1, "repeats")}.get(name)
    operand = call_arg(node, *where) if where else None
    return isinstance(operand, fx.Node) and not is_parameter(operand)


def _cat_dim(node: fx.Node) -> int:
    return node.kwargs.get("axis", call_arg(node, 1, "dim", 0))


def rule_for(node: fx.Node, kind: str, module: nn.Module | None, first: bool, bn_scale: Callable) -> Rule:
    inputs = relevance_inputs(node, kind)
    if kind == NodeKind.LAYER:
        linear = functional_linear_weight(node)
        if linear is not None:
            return FunctionalLinear(node, inputs, first, bn_scale, *linear)
        if node.op != "call_module":
            functional = FunctionalConv3d if node.target in (F.conv3d, torch.conv3d) else FunctionalConv
            return functional(node, inputs, first, bn_scale)
        cls = Conv if isinstance(module, CONV_MODULES) else Conv3d if isinstance(module, nn.Conv3d) else Linear
        return cls(node, inputs, module, first, bn_scale)
    if kind == NodeKind.PASS:
        return PassThrough(node, inputs)
    if kind == NodeKind.POOL:
        weights = attention_weights_index(node)
        if weights is not None:
            return AttentionPool(node, inputs, weights)
        if pools_by_indices(module):
            return MaxPoolByIndices(node, inputs, module)
        return Pool(node, inputs, module)
    if kind == NodeKind.ROUTE:
        if calls(node, COPY_FUNCTIONS, COPY_METHODS):
            return SampleRoute(node, inputs)
        if isinstance(module, nn.GLU) or node.target is F.glu:
            return GatedHalf(node, inputs, module, glu_dim(node, module))
        return Route(node, inputs, module)
    if kind == NodeKind.SELECT:
        return Select(node, inputs, split_source(node))
    if kind == NodeKind.ADD:  # a − b and torch.add(a, b, alpha=α): the second operand's share is α·b
        if calls(node, *ADDCMUL):  # x + v·c·f: f's share is v·c·f
            return Add(node, inputs, addcmul_operands(node)[3], factor=addcmul_terms(node)[2])
        sign = -1 if calls(node, SUB_FUNCTIONS, SUB_METHODS) else 1
        return Add(node, inputs, sign * node.kwargs.get("alpha", 1))
    if kind == NodeKind.SCALE:
        return Scale(node, inputs)
    if kind == NodeKind.SUM:
        if calls(node, {torch.mean}, POOL_METHODS) and reduced_dims(node) != (_cat_dim(node.args[0]),):
            return MeanOfStack(node, inputs, reduced_dims(node), _cat_dim(node.args[0]), Pool(node, inputs, None))
        return Sum(node, inputs, reduced_dims(node))
    split = rejoined_split(node)
    if split is not None:
        return Rejoin(node, inputs, split, _constant_slice(_joined(node)))
    if node.target in STACK_FUNCTIONS:
        return Stack(node, inputs, _cat_dim(node))
    return Cat(node, inputs, _cat_dim(node))


BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def functional_batchnorm_scale(node: fx.Node, read: Callable[[str], object]) -> Callable[[], torch.Tensor | None] | None:
    """For F.batch_norm in eval mode on buffers (running statistics) and parameters: its γ/√(var+ε),
    read from the model (``read``: a get_attr target → the attribute now) when called; else None."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = dict(zip(BATCH_NORM_ARGS, node.args)) | node.kwargs
    var, weight, eps = args.get("running_var"), args.get("weight"), args.get("eps", 1e-5)
    if args.get("training", False) is not False or not is_number(eps) or not all(
            isinstance(v, fx.Node) and v.op == "get_attr" for v in (var, *([weight] if weight is not None else []))):
        return None

    def scale():
        s = torch.rsqrt(attribute_now(var, read) + eps)
        return s * attribute_now(weight, read) if weight is not None else s
    return scale


def batchnorm_scale(bn: nn.Module) -> Callable[[], torch.Tensor | None]:
    """γ/√(var+ε) of an eval-mode BatchNorm, computed when called (weights may change)."""
    def scale():
        if bn.running_var is None:
            return None
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s * bn.weight if bn.weight is not None else s
    return scale
