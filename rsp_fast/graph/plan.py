"""The propagation plan: which nodes RSP walks through, with which rule, in what order.

Built per (model, layer), per input shape where the forward branches on sizes, and again
when the model changed (``Plan.is_current``): the graph is traced, the saliency node found,
every node on the way back to the input given a rule (or reported as unsupported, all at
once, before any work), first layers (those that see the raw input) marked for the z^B
rule, and BatchNorms after a conv or linear folded into it.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from ..errors import RSPError, UnsupportedModelError
from ..rules import (BATCH_MIXING, NodeKind, Rule, batchnorm_scale, describe_supported, dims_read_along,
                     filter_signs_hold, filter_signs_judged, functional_batchnorm_scale, functional_linear_weight,
                     is_batchnorm, is_identity_in_eval, is_pointwise_conv, is_rule_leaf, keeps_sign, mixes_the_batch,
                     node_kind, pads_by_copy, rectifies, relevance_inputs, rule_for, unsupported_combination, zero_padding)
from ..rules.base import LayerRule
from ..rules.conv import Conv
from ..rules.conv3d import Conv3d
from ..rules.operands import (TRANSPOSES, calls, is_biased_sum, is_parameter, is_product, is_shape_query, is_softmax, reduced_dims,
                              sole_operand, two_operands)
from .trace import KEPT_WHOLE, UntraceableModelError, attribute_at, trace

FLATTEN_FUNCTIONS_OR_METHODS = {"flatten", "view", "reshape"}


@dataclass
class Plan:
    graph: fx.Graph
    input: fx.Node
    saliency: fx.Node
    layer_name: str
    steps: list[Rule]  # from the saliency layer back to the input (reverse topological order)
    saved: set[fx.Node]  # nodes whose forward values the rules read
    head: set[fx.Node]  # nodes computed from the saliency layer (run with autograd for the initial relevance)
    input_rank: int | None  # rank the first layer expects (4 for Conv2d), None if unknown
    # what the traced graph holds of every module besides its tensors, when the plan was built
    states: list[ModuleState] = field(default_factory=list)
    leaves: frozenset = frozenset()  # ids of the modules the graph calls whole
    # reductions and joins along negative dimensions: (node, the node whose rank they index, dims, op)
    batch_dim_checks: list[tuple[fx.Node, fx.Node, tuple[int, ...], str]] = field(default_factory=list)
    # whether the saliency map of a given rank (None: any) is N×H×W×C (MambaOut's, its head pooling
    # dims 1 and 2) or N×T×F (a Linear's tokens)
    layout: Callable[[int | None], bool] = lambda rank: False
    scores: fx.Node | None = None  # the class scores a final softmax, log_softmax or sigmoid normalises
    scores_dim: int | str | None = None  # the dim it normalises (see scores_over_classes)
    layouts: dict = field(default_factory=dict)  # rank → layout(rank), worked out once
    filter_signs: list = field(default_factory=list)  # (conv with a fixed filter, judged ≥ 0: a pooling)

    @property
    def channels_last(self) -> bool:
        """Whether the saliency map has its channels last, whatever its rank."""
        return self.channels_last_at(None)

    def channels_last_at(self, rank: int | None) -> bool:
        """Whether the saliency map of this rank has its channels last, transposes in the head followed."""
        if rank not in self.layouts:
            self.layouts[rank] = self.layout(rank)
        return self.layouts[rank]

    def check_batch_dims(self, shapes: dict) -> None:
        """An UnsupportedModelError where a negative dimension turns out to be the batch's at
        these shapes (dim 0 itself the plan refuses): the op would mix the samples."""
        for node, source, dims, what in self.batch_dim_checks:
            rank = len(shapes.get(source, ()))
            batch = [d for d in dims if rank and d % rank == 0]
            if batch:
                raise UnsupportedModelError(f"{node.name}: " + BATCH_MIXING.format(what)
                                            + f" (dim {batch[0]} of a {rank}-dimensional tensor is the batch's)")

    def is_current(self) -> bool:
        """Whether the model is still the one the plan was traced from: a submodule replaced or
        added, a hook added or removed, a plain attribute (``padding_mode``, a flag its forward
        reads) or a method set since needs a new plan, as the forward runs the new one and the
        graph, the rules and what the plan read of the graph hold the old (in-place changes to
        parameters and buffers need none: the graph reads them by reference; but a fixed filter's
        sign chose its rule, and is judged again)."""
        if self.states and _global_hooks() != self.states[0].global_hooks:
            return False
        if not all(state.holds() for state in self.states):
            return False
        read = functools.partial(attribute_at, self.states[0].module) if self.states else None
        return not self.filter_signs or filter_signs_hold(self.filter_signs, read)

    def keep_what_the_pass_wrote(self, model: nn.Module) -> None:
        """After a pass on a current plan: what the modules it ran wrote onto themselves (a hook
        keeping a count or a statistic) is the model's state now, not a change to trace anew."""
        if not self.is_current():
            self.states = _module_states(model, self.leaves)


# nn.Module's own bookkeeping, and the mode RSP itself switches: not part of what a forward does
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _global_hooks() -> tuple:
    return tuple(torch_module._global_forward_pre_hooks), tuple(torch_module._global_forward_hooks)


def _attribute_value(value):
    """A snapshot of an attribute a traced forward may have read as a constant (a number, a
    string, a function or method, tuples, lists and dicts of them), or ``_SKIP`` for tensors and
    other objects, which the graph reads by reference or not at all."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):  # torch.Size and named tuples too: compared as plain tuples
        items = tuple(_attribute_value(v) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = tuple((k, _attribute_value(v)) for k, v in value.items())
        return _SKIP if any(v is _SKIP or not isinstance(k, _PLAIN) for k, v in items) else items
    if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)):
        return value
    return _SKIP


_SKIP = object()


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (*_PLAIN, tuple)) and a == b)


@dataclass
class ModuleState:
    module: nn.Module
    cls: type
    forward: Callable  # its class's forward (patched on the class, it is another function)
    children: tuple  # (name, child) pairs, in order
    hooks: tuple  # the keys of its forward pre-hooks and forward hooks
    attributes: dict  # name → (the object it held: numbers, strings, tuples, functions; its snapshot)
    lists: dict  # name → (the list or dict it held, its snapshot then: it may change in place)
    names: frozenset | None = None  # its attributes' names (None for a leaf): one added may be read
    global_hooks: tuple = ()
    absent: tuple | None = None  # a norm's statistics set to None (BatchNorm then uses the batch's); None: not a norm

    @classmethod
    def of(cls, module: nn.Module, leaf: bool = False) -> "ModuleState":
        attributes, lists = {}, {}
        # a module the graph calls whole reads its attributes itself: only those its class declares
        # constant (a conv's stride, padding_mode) shape the plan, not a statistic a hook keeps there
        declared = set().union(*(getattr(c, "__constants__", ()) for c in type(module).__mro__)) if leaf else None
        for k, v in module.__dict__.items():
            if declared and k not in declared and k != "forward":
                continue
            if k not in _MODULE_INTERNALS and _attribute_value(v) is not _SKIP:
                if isinstance(v, (list, dict)):
                    lists[k] = (v, _attribute_value(v))
                else:
                    attributes[k] = (v, _attribute_value(v))
        attributes.setdefault("forward", (_SKIP, _SKIP))  # a forward set on the instance later is a change too
        return cls(module, type(module), type(module).forward, tuple(module._modules.items()), _hooks(module),
                   attributes, lists, None if leaf else frozenset(module.__dict__), absent=_absent(module))

    def holds(self) -> bool:
        m = self.module
        if m.__class__ is not self.cls or self.cls.forward is not self.forward or _hooks(m) != self.hooks:
            return False
        if self.absent is not None and _absent(m) != self.absent:
            return False
        children = m._modules
        if len(children) != len(self.children):
            return False
        for name, child in self.children:
            if children.get(name) is not child:
                return False
        now = m.__dict__
        if self.names is not None and now.keys() != self.names:  # getattr(self, "flag", False) set since
            return False
        for k, (v, snapshot) in self.attributes.items():  # the same object (one identity test), else an equal value
            value = now.get(k, _SKIP)
            if value is not v and not _same(_attribute_value(value), snapshot):
                return False
        for k, (v, snapshot) in self.lists.items():
            if now.get(k, _SKIP) is not v or _attribute_value(v) != snapshot:
                return False
        return True


def _absent(module: nn.Module) -> tuple | None:
    """Which running statistics of a norm are None (only norms keep them: checked on those alone)."""
    buffers = module._buffers
    return (buffers.get("running_mean") is None, buffers["running_var"] is None) if "running_var" in buffers else None


def _hooks(module: nn.Module) -> tuple:
    return tuple(module._forward_pre_hooks), tuple(module._forward_hooks)  # their handles' ids


def _module_states(model: nn.Module, leaves: frozenset = frozenset()) -> list[ModuleState]:
    states, seen, todo = [], set(), [model]
    while todo:
        module = todo.pop()
        if id(module) not in seen:
            seen.add(id(module))
            states.append(ModuleState.of(module, id(module) in leaves))
            todo += [child for child in module._modules.values() if child is not None]
    if states:
        states[0].global_hooks = _global_hooks()
    return states


def _module(model: nn.Module, node: fx.Node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _is_flatten(node: fx.Node, module) -> bool:
    """A flatten, or a view or reshape that may be one: not one to four or more sizes, which
    keeps a map (the last step of a channel shuffle, x.view(n, g, c // g, h, w).transpose(1, 2)
    .reshape(n, c, h, w)); a shape known only at run time (x.view(size)) counts as a flatten."""
    if module is not None:
        return isinstance(module, nn.Flatten)
    name = getattr(node.target, "__name__", node.target)
    if node.op not in ("call_function", "call_method") or name not in FLATTEN_FUNCTIONS_OR_METHODS:
        return False
    return name == "flatten" or len(_shape_argument(node)) < MAP_RANK


MAP_RANK = 4  # N×C×H×W; a view to fewer sizes may flatten the map (N×F, N×C×L), one to as many keeps it


def _shape_argument(node: fx.Node) -> tuple:
    """The sizes a view or reshape is given (one item where a value known at run time holds them)."""
    sizes = node.args[1:] or (node.kwargs.get("shape", node.kwargs.get("size")),)
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(sizes)


def _first_tensor_input(node: fx.Node, kind: str | None = None) -> fx.Node | None:
    """The input the main path comes from: where a rule sends relevance (x of x·scale + bias),
    else the first tensor argument."""
    ins = [a for a in relevance_inputs(node, kind) if isinstance(a, fx.Node)] if kind else node.all_input_nodes
    return ins[0] if ins else None


def _default_saliency(model: nn.Module, graph: fx.Graph) -> fx.Node:
    """VGG: the last ReLU before the last max-pool; ResNet: layer4; otherwise the last
    spatial map before global pooling / flatten; for MLPs the input of the last Linear."""
    output = next(n for n in graph.nodes if n.op == "output")
    node, last_linear_input = _logits_node(output), None
    # Walk back along the main path to the first flatten or pooling of the head.
    while node is not None and node.op != "placeholder":
        m = _module(model, node)
        if (isinstance(m, nn.Linear) or functional_linear_weight(node) is not None) and last_linear_input is None:
            last_linear_input = _first_tensor_input(node)
        if _ends_head(model, node, m):
            break
        # pooled maps of several branches merged (Kim's CNN for text, two streams' embeddings): each is
        # part of the evidence; not where the merge makes the logits, each branch's own (late fusion)
        maps = {_map_behind(model, branch, last_linear_input is not None) for branch in _merged_branches(node, m)}
        if len(maps) > 1 and None not in maps:
            return node
        node = _first_tensor_input(node)
    pool = _global_pool_behind_head(model, node) or node
    node = _feature_map_behind(model, pool)
    if node is not None and last_linear_input is None and not _layer_on_path(model, output, pool):
        node = _feature_map_behind(model, _input_of_class_score_conv(model, node)) or node  # the logits pooled maps
    if node is not None:
        return node
    node = last_linear_input
    while node is not None and node.op != "placeholder" and is_identity_in_eval(node, _module(model, node)):
        node = _first_tensor_input(node)
    if node is not None and node.op != "placeholder":
        return node
    raise RSPError(f"could not choose a default saliency layer for {type(model).__name__}; pass layer='<module name>'")


def _logits_node(output: fx.Node) -> fx.Node | None:
    """Where the logits come from: the output itself, or what an output object holds as
    ``logits`` (a dict, a named tuple, Hugging Face's ModelOutput), as the pass reads them."""
    value = output.args[0]
    if isinstance(value, fx.Node) and value.op == "call_function" and isinstance(value.target, type):
        fields = getattr(value.target, "_fields", ())  # a named tuple's, by position
        value = value.kwargs if "logits" in value.kwargs else dict(zip(fields, value.args))
    logits = value.get("logits") if isinstance(value, dict) else None
    return logits if isinstance(logits, fx.Node) else _first_tensor_input(output)


NORMALISERS = ({F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, torch.sigmoid, F.sigmoid},
               {"softmax", "log_softmax", "sigmoid"})


ELEMENTWISE = "elementwise"


def _scores_normalised(model: nn.Module, logits: fx.Node | None) -> tuple[fx.Node | None, int | str | None]:
    """The scores a model's last op turns into probabilities (a softmax or log_softmax, a
    sigmoid) and the dim it normalises (None: PyTorch's implicit one; ``ELEMENTWISE``), or
    (None, None): their gradients saturate where the model is sure, and R₀ is meant for the
    class scores (RSP_SPEC §1's y_c); the order, so the target, is the same. Whether the dim is
    the classes' is known with the output's rank, at run time (``scores_over_classes``)."""
    if logits is None:
        return None, None
    m = _module(model, logits)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        dim = m.dim
    elif isinstance(m, nn.Sigmoid) or calls(logits, {torch.sigmoid, F.sigmoid}, {"sigmoid"}):
        dim = ELEMENTWISE
    elif calls(logits, *NORMALISERS):
        dim = logits.args[1] if len(logits.args) > 1 else logits.kwargs.get("dim")
    else:
        return None, None
    source = logits.args[0] if logits.args else logits.kwargs.get("input")
    return (source, dim) if isinstance(source, fx.Node) and (dim is None or isinstance(dim, (int, str))) else (None, None)


def scores_over_classes(dim: int | str | None, rank: int) -> bool:
    """Whether a final softmax over ``dim`` of a rank-``rank`` output normalises its classes (dim 1)."""
    if dim == ELEMENTWISE:
        return True
    if dim is None:  # softmax's implicit dim: 0 for ranks 0, 1 and 3, else 1
        return rank not in (0, 1, 3)
    return rank > 1 and dim % rank == 1


def _ends_head(model: nn.Module, node: fx.Node, m) -> bool:
    """A flatten or pooling of the head (or a module kept whole): the walk back stops there."""
    return bool(_is_flatten(node, m) or node_kind(node, m) == NodeKind.POOL or _is_global_pool(model, node, m)
                or node.meta.get(KEPT_WHOLE))


def _merged_branches(node: fx.Node, m) -> list[fx.Node]:
    """The activations a concatenation or sum joins (none for other nodes, or a sum with a constant)."""
    kind = node_kind(node, m)
    if kind not in (NodeKind.CAT, NodeKind.ADD):
        return []
    return [a for a in relevance_inputs(node, kind) if isinstance(a, fx.Node) and not is_parameter(a)]


def _map_behind(model: nn.Module, node: fx.Node, through_layers: bool) -> fx.Node | None:
    """The feature map a branch of the head summarises: back to its pooling, then behind it.
    Without ``through_layers``, None past a conv or linear layer (a branch's own logits)."""
    while node is not None and node.op != "placeholder" and not _ends_head(model, node, m := _module(model, node)):
        if node_kind(node, m) == NodeKind.LAYER and not through_layers:
            return None
        node = _first_tensor_input(node)
    return _feature_map_behind(model, _global_pool_behind_head(model, node) or node) if node is not None else None


def _feature_map_behind(model: nn.Module, node: fx.Node | None) -> fx.Node | None:
    """Back over pooling, reshapes and dropout to the feature map they summarise (and over head
    modules kept whole, like timm VGG's conv MLP: relevance cannot start there); None if the
    input is reached first."""
    while node is not None and node.op != "placeholder":
        m = _module(model, node)
        if _attention_weighted(node, m):
            node = sole_operand(node)
            continue
        if not (_is_flatten(node, m) or node_kind(node, m) == NodeKind.POOL or _is_global_pool(model, node, m)
                or node.meta.get(KEPT_WHOLE) or is_identity_in_eval(node, m) or _generalised_mean_part(node)):
            return node
        node = _first_tensor_input(node)
    return None


def _attention_weighted(node: fx.Node, m) -> bool:
    """h·softmax(a(h)) before a sum over the positions: the weights of an attention pool, a part
    of the pooling (as in its matmul spelling, h @ softmax(a(h))ᵀ), not a map of its own."""
    if not is_product(node) or node_kind(node, m) != NodeKind.SCALE:
        return False
    x = sole_operand(node)
    return any(is_softmax(v) for v in two_operands(node) if v is not x)


def _generalised_mean_part(node: fx.Node) -> bool:
    """x ** p or x.clamp(min=ε), 0 < ε ≤ 1e-3, before a mean: GeM pooling (x.clamp(ε).pow(p).mean().pow(1/p)),
    part of the pooling, not a map of its own (a clamp at 0 or at 0.1, an activation, is one)."""
    if calls(node, {operator.pow, torch.pow}, {"pow", "__pow__"}):
        exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
        return isinstance(exponent, (int, float)) and exponent != 1 or isinstance(exponent, fx.Node) and is_parameter(exponent)
    if calls(node, {torch.clamp, torch.clamp_min, torch.clip}, {"clamp", "clamp_min", "clip"}):
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        return isinstance(low, (int, float)) and 0 < low <= 1e-3
    return False


def _layer_on_path(model: nn.Module, node: fx.Node, stop: fx.Node | None) -> bool:
    """Whether a conv or linear layer lies on the main path from ``node`` back to ``stop``."""
    while node is not None and node is not stop and node.op != "placeholder":
        m = _module(model, node)
        kind = node_kind(node, m)
        if kind == NodeKind.LAYER:
            return True
        node = _first_tensor_input(node, kind)
    return False


def _input_of_class_score_conv(model: nn.Module, node: fx.Node) -> fx.Node:
    """A head that only pools (SqueezeNet, S3D, network-in-network: no layer after the global
    pool) pools maps that a 1×1 conv made, one channel per class: class scores, whose Grad-CAM
    only restates them. Then the features that conv reads, which Grad-CAM is meant for;
    otherwise ``node`` itself."""
    conv = node
    while conv is not None and conv.op != "placeholder" and node_kind(conv, _module(model, conv)) == NodeKind.PASS:
        conv = _first_tensor_input(conv)  # its activation
    m = _module(model, conv) if conv is not None else None
    if conv is not None and is_pointwise_conv(conv, m) or isinstance(m, nn.Linear):
        return _first_tensor_input(conv)  # (a Linear on each token of an N×T×F input, averaged over T, alike)
    return node


def _global_pool_behind_head(model: nn.Module, node: fx.Node | None) -> fx.Node | None:
    """timm-style heads run a 1×1 conv, a norm, an activation, a learnable affine map or a
    permute on the pooled map before flattening (MobileNetV3, HGNetV2, ConvNeXt's RMS-norm
    head): the global pool behind such a head, if there is one."""
    while node is not None and node.op != "placeholder":
        m = _module(model, node)
        if _is_global_pool(model, node, m):
            return node
        kind = node_kind(node, m)
        if not (_is_flatten(node, m) or is_pointwise_conv(node, m) or kind in (NodeKind.PASS, NodeKind.ROUTE, NodeKind.SCALE)):
            return None
        node = _first_tensor_input(node, kind)
    return None


ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                  nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
ADAPTIVE_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                           F.adaptive_max_pool2d, F.adaptive_max_pool3d)


def _is_global_pool(model: nn.Module, node: fx.Node, module) -> bool:
    """An adaptive pool to 1×1 (1, 1×1×1), or a mean, sum or max over the spatial dimensions;
    or the sum or concatenation of such pools of one map (timm's avgmax and catavgmax pools)."""
    if node.op == "call_function" and node.target in (operator.add, torch.add, torch.cat):
        pools = node.all_input_nodes
        return (len(pools) > 1 and all(_is_global_pool(model, p, _module(model, p)) for p in pools)
                and len({_first_tensor_input(p) for p in pools}) == 1)
    if isinstance(module, ADAPTIVE_POOLS):
        size = module.output_size
    elif node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS:
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
    elif calls(node, {torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"}):  # average, sum or max pooling
        # over the time of a 1-D map (N×C×L) too, and over the tokens of a Linear's N×T×F output
        tokens = ([1], [-2]) if _made_by_a_linear(model, node.args[0]) else ()
        spatial = ([2, 3], [-2, -1], [2, 3, 4], [-3, -2, -1], [2], [-1], [3], [4], [3, 4])  # [3]: x.sum(3).sum(2)
        return sorted(reduced_dims(node) or ()) in spatial + tokens
    else:
        return False
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def step_path(step: Rule) -> str | None:
    """The path of the module a step runs: a call_module's target, or for a layer traced
    through (a conv with padding_mode 'reflect', timm's Conv2dSame) the Conv or Linear module
    its conv or linear call runs in; None for a function of the forward."""
    if step.node.op == "call_module":
        return str(step.node.target)
    stack = step.node.meta.get("nn_module_stack")
    if isinstance(step, LayerRule) and stack:
        path, cls = next(reversed(stack.values()))[:2]
        if isinstance(cls, type) and issubclass(cls, (nn.modules.conv._ConvNd, nn.Linear)):
            return path
    return None


def layer_name(model: nn.Module, layer) -> str | None:
    """The module name ``layer`` (a name, a submodule or None) stands for, checked."""
    if layer is None:
        return None
    if layer is model or layer == "":
        raise RSPError(f"layer {layer if layer == '' else type(layer).__name__!r} is the whole model, whose output is "
                       "the logits: name a layer inside it (None picks one)")
    if isinstance(layer, nn.Module):
        names = [name for name, m in model.named_modules() if m is layer]
        if not names:
            raise RSPError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__} (if it was "
                           "replaced after RSP(...) was built, give the layer by its name to follow such changes)")
        return names[0]
    if not isinstance(layer, str):
        raise RSPError(f"layer must be a module name, a module or None, not {type(layer).__name__}")
    known = dict(model.named_modules())
    module, colon, call = layer.rpartition(":")
    if colon and module in known and call.isdigit() and int(call) >= 1:
        return layer  # a module's k-th call (a block's shared ReLU: "layer1.0.relu:1"), as Explanation.steps names it
    if layer not in known:
        try:  # a second name of a module held twice: named_modules lists the first only
            return layer_name(model, model.get_submodule(layer))
        except (AttributeError, RSPError):
            pass
        sample = ", ".join(list(n for n in known if n)[-8:])
        raise RSPError(f"layer {layer!r} is not a module of {type(model).__name__} (e.g. {sample})")
    return layer


def _ancestors(name: str) -> list[str]:
    """"a.b.c" -> ["a.b", "a"]: the paths of the modules holding a module, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _resolve_layer(model: nn.Module, graph: fx.Graph, module_outputs: dict[str, fx.Node], layer,
                   with_example: bool = False) -> tuple[fx.Node, str]:
    if isinstance(layer, str) and layer not in module_outputs:
        # the name of a function's output, as a default layer is reported where no module makes it
        # (``cat_9``; ``relu`` where the forward calls F.relu, not the module ``relu`` it holds)
        node = next((n for n in graph.nodes if n.name == layer and n.op in ("call_function", "call_method")), None)
        if node is not None:
            return node, layer
    layer = layer_name(model, layer)
    if layer is None:
        node = _default_saliency(model, graph)
        names = [name for name, n in module_outputs.items() if n is node]
        return node, (min(names, key=len) if names else node.name)
    module, _, call = layer.rpartition(":")
    if module and call.isdigit():
        layer = f"{module}:{int(call)}"  # "relu:01" is its first call, as "relu:1" is
    if layer not in module_outputs and module in module_outputs and call.isdigit():
        calls = sum(1 for name in module_outputs if name.rpartition(":")[0] == module)
        raise RSPError(f"layer {layer!r}: {module!r} is called {calls} time(s) in {type(model).__name__}.forward")
    if layer not in module_outputs:
        # a part of a module RSP runs whole (a BatchNorm's activation) has no output of its own
        outer = next((p for p in _ancestors(layer) if p in module_outputs
                      and module_outputs[p].op == "call_module" and module_outputs[p].target == p), None)
        if outer is not None and module_outputs[outer].meta.get(KEPT_WHOLE) and not with_example:
            # kept whole only because it branches on sizes: traced into with an input, at the first call
            raise UntraceableModelError(f"layer {layer!r} is inside {outer!r}, which torch.fx traces only with an input "
                                        f"({module_outputs[outer].meta[KEPT_WHOLE]})")
        if outer is not None:
            raise RSPError(f"layer {layer!r} is part of {outer!r} ({type(model.get_submodule(outer)).__name__}), "
                           f"which RSP runs as one layer: name {outer!r} instead")
        raise RSPError(f"layer {layer!r} is never called in {type(model).__name__}.forward (as a module: called "
                       "through its .forward method, or returning no tensor of its own, as a list, it has no output "
                       "to start from: name a module inside it)")
    return module_outputs[layer], layer


def build_plan(model: nn.Module, layer=None, example: torch.Tensor | None = None) -> Plan:
    """The plan for any input, or with ``example`` for inputs of its shape only (traced with
    sizes as numbers: for forwards that branch on sizes). Raises UntraceableModelError when
    only such a trace could do."""
    graph, module_outputs = trace(model, is_rule_leaf, example)
    saliency, layer_name = _resolve_layer(model, graph, module_outputs, layer, example is not None)
    order = {n: i for i, n in enumerate(graph.nodes)}

    # Every node relevance reaches on its way back from the saliency layer, with its kind.
    kinds: dict[fx.Node, str] = {}
    problems: list[tuple[str, str]] = []  # (where, what)
    stack, seen, reached_input = [saliency], {saliency}, False
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            reached_input = True
            continue
        module = _module(model, node)
        kind = node_kind(node, module) if node.op != "get_attr" else None
        if kind is None:
            problems.append(_describe_unsupported(node, module))
        else:
            kinds[node] = kind
        # Go on past a node without a rule too, to report every problem (but not its shape queries).
        for arg in relevance_inputs(node, kind) if kind else [a for a in node.all_input_nodes if not is_shape_query(a)]:
            if not isinstance(arg, fx.Node):
                problems.append((node.name, f"{kind} with a constant operand ({arg!r})"))
            elif arg not in seen:
                seen.add(arg)
                stack.append(arg)
    if problems:
        untraced = any(n.meta.get(KEPT_WHOLE) for n in seen) and example is None
        raise (UntraceableModelError if untraced else UnsupportedModelError)(
            "no RSP rule for " + _grouped(problems) + f" (between the input and layer {layer_name!r}). "
            f"Supported: {describe_supported()}"
        )
    if not reached_input:
        raise RSPError(f"layer {layer_name!r} does not depend on the model's input")

    # Forward order: which nodes still carry the raw input (their layer is a "first" layer).
    raw: dict[fx.Node, bool] = {}
    reshaped: set[fx.Node] = set()  # raw nodes behind a reshape of the input (x.unsqueeze(1), x.view(-1, 1, 28, 28))
    input_node = next(n for n in graph.nodes if n.op == "placeholder")
    input_rank = None
    for node in sorted(kinds, key=order.__getitem__):
        ins = relevance_inputs(node, kinds[node])
        from_input = any(a is input_node or raw.get(a, False) for a in ins)
        raw[node] = from_input and kinds[node] != NodeKind.LAYER
        if raw[node] and (calls(node, LAYOUT_CHANGES, LAYOUT_CHANGE_METHODS) or any(a in reshaped for a in ins)):
            reshaped.add(node)
        module = _module(model, node)
        if from_input and kinds[node] == NodeKind.LAYER and input_rank is None and not any(a in reshaped for a in ins):
            input_rank = (4 if isinstance(module, nn.Conv2d) or node.target in (F.conv2d, torch.conv2d) else
                          3 if isinstance(module, nn.Conv1d) or node.target in (F.conv1d, torch.conv1d) else
                          5 if isinstance(module, nn.Conv3d) or node.target in (F.conv3d, torch.conv3d) else None)

    steps = []
    for node in sorted(kinds, key=order.__getitem__, reverse=True):
        module = _module(model, node)
        first = kinds[node] == NodeKind.LAYER and any(a is input_node or raw.get(a, False) for a in relevance_inputs(node, kinds[node]))
        steps.append(rule_for(node, kinds[node], module, first, _bn_after(model, node, kinds)))

    non_negative = _non_negative(model)
    for step in steps:
        if isinstance(step, LayerRule):
            step.input_non_negative = non_negative(step.inputs[0])
            source = step.inputs[0]
            if (isinstance(step, Conv | Conv3d) and not step.first and len(source.users) == 1 and source in kinds
                    and pads_by_copy(source, _module(model, source))):
                step.purge_at = source  # RSP_SPEC §2 purges over the layer's input: the pixels, not their copies
            if isinstance(step, Conv | Conv3d) and step.first and len(source.users) == 1 and source in kinds:
                padding = zero_padding(source, _module(model, source))
                if padding is not None:  # z^B's bounds and patches are the picture's, as for the conv's own padding
                    step.zero_pad = (source.args[0], padding)
                    step.needs_values.append(source.args[0])

    head, frontier = set(), [saliency]
    while frontier:
        for user in frontier.pop().users:
            if user not in head:
                head.add(user)
                frontier.append(user)
    mixing = [(n.name, why) for n in sorted(head, key=order.__getitem__) if (why := mixes_the_batch(n, _module(model, n)))]
    if mixing:
        raise UnsupportedModelError(f"the model's head (after layer {layer_name!r}) mixes the samples, and RSP's "
                                    "initial relevance is each sample's own: " + _grouped(mixing))
    # On the relevance path dim 0 is refused by node_kind; on the branches that only compute factors
    # (a gate, a statistic) here: their values reach every sample's output. -k is known at run time.
    factors = _factor_branches(graph, saliency, kinds)
    along_batch = [(n.name, BATCH_MIXING.format(read[2])) for n in factors
                   if (read := dims_read_along(n)) is not None and 0 in read[0]]
    if along_batch:
        raise UnsupportedModelError("no RSP rule for " + _grouped(along_batch) + f" (between the input and layer {layer_name!r})")
    batch_dim_checks = []
    for node in sorted(set(kinds) | factors, key=order.__getitem__):
        read = dims_read_along(node)
        if read is not None and any(d < 0 for d in read[0]):
            dims, source, what = read
            batch_dim_checks.append((node, source, dims, what))
    saved = {v for s in steps for v in s.needs_values}
    leaves = frozenset(id(_module(model, n)) for n in graph.nodes if n.op == "call_module")
    scores, scores_dim = _scores_normalised(model, _logits_node(next(n for n in graph.nodes if n.op == "output")))
    return Plan(graph, input_node, saliency, layer_name, steps, saved, head, input_rank, _module_states(model, leaves),
                leaves, batch_dim_checks, functools.partial(_pooled_channels_last, model, saliency),
                scores if scores in head else None, scores_dim, filter_signs=filter_signs_judged(kinds))


def _pooled_channels_last(model: nn.Module, saliency: fx.Node, rank: int | None = None) -> bool:
    """Whether the saliency map has its channels last: the head pools it over dims 1 and 2
    (N×H×W×C, as MambaOut's head does), or permutes it from that layout first, before any other
    op; or it is a Linear's output, or a Linear reads it (a Linear reads the last dim: N×T×F
    tokens, each token a position), and no reshape comes first. A merge (a residual add) or a
    norm on the way keeps the layout. With the map's ``rank`` (known at run time) transposes and
    permutes on the way are followed (``h.transpose(1, 2).mean(2)`` pools a Linear's tokens)."""
    if _permuted_to_channels_last(model, saliency):
        return True
    made = _made_by_a_linear(model, saliency)  # a Linear's output: channels last already
    node, through_linear = saliency, made
    order = list(range(rank)) if rank else None  # order[i]: the map's dim now at position i
    moved = False
    while len(node.users) == 1:
        node = next(iter(node.users))
        m = _module(model, node)
        if calls(node, {torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"}):
            dims = reduced_dims(node) or ()
            if moved:  # pooled over all of the map's positions, its last dim kept: channels last
                return all(isinstance(d, int) for d in dims) and sorted(order[d % rank] for d in dims) == list(range(1, rank - 1))
            return sorted(dims) in ([1, 2], [-3, -2]) + (([1], [-2]) if through_linear else ())
        if order is not None and _moves_dims(node, order):
            moved = True
            continue
        if moved and node_kind(node, m) == NodeKind.POOL:  # a pool of the trailing dims keeps dim 1: the channels
            return order[1] == rank - 1
        if calls(node, LAYOUT_CHANGES, LAYOUT_CHANGE_METHODS) or _is_flatten(node, m):
            return False  # behind a reshape the layout is not known
        if isinstance(m, nn.Linear) or functional_linear_weight(node) is not None:
            through_linear = True
            continue
        if calls(node, {torch.permute}, {"permute"}):
            return _permute_order(node) == (0, 3, 1, 2)
        if node_kind(node, m) != NodeKind.PASS:
            break
    return made


def _moves_dims(node: fx.Node, order: list) -> bool:
    """For a transpose, swapaxes, permute or movedim with numbers for dims: ``order`` updated to
    the layout after it, and True; False (``order`` as it was) for other ops."""
    rank = len(order)
    args = list(node.args[1:]) + list(node.kwargs.values())
    if not args or not all(isinstance(a, int) for a in (args[0] if isinstance(args[0], (tuple, list)) else args)):
        return False
    if calls(node, *TRANSPOSES) and len(args) == 2:
        a, b = (d % rank for d in args)
        order[a], order[b] = order[b], order[a]
    elif calls(node, {torch.permute}, {"permute"}) and len(_permute_order(node)) == rank:
        order[:] = [order[d % rank] for d in _permute_order(node)]
    elif calls(node, {torch.movedim}, {"movedim"}) and len(args) == 2 and all(isinstance(a, int) for a in args):
        order.insert(args[1] % rank, order.pop(args[0] % rank))
    else:
        return False
    return True


def _permute_order(node: fx.Node) -> tuple:
    order = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else \
        (node.args[1] if len(node.args) > 1 else node.kwargs.get("dims", ()))
    return tuple(order)


# ops that change a tensor's shape or order of dims: behind them a layout is not known
LAYOUT_CHANGES = TRANSPOSES[0] | {torch.reshape, torch.flatten, torch.unflatten, torch.movedim, torch.squeeze, torch.unsqueeze}
LAYOUT_CHANGE_METHODS = TRANSPOSES[1] | {"view", "reshape", "flatten", "unflatten", "movedim", "squeeze", "unsqueeze"}


def _permuted_to_channels_last(model: nn.Module, node: fx.Node) -> bool:
    """Whether the map was put in N×H×W×C by a ``permute(0, 2, 3, 1)``: walking back along the
    main path (through Linears, norms, activations, residual sums, splits and gates, which keep
    a layout) the first permute met is that one (a MambaOut or ConvNeXt block between its
    permutes). A conv, a pool, a reduction, a reshape or the input settles nothing (False)."""
    while isinstance(node, fx.Node) and node.op in ("call_module", "call_function", "call_method"):
        if calls(node, {torch.permute}, {"permute"}):
            return _permute_order(node) == (0, 2, 3, 1)
        module = _module(model, node)
        if calls(node, LAYOUT_CHANGES, LAYOUT_CHANGE_METHODS) or isinstance(module, nn.Flatten | nn.Unflatten):
            return False
        kind = node_kind(node, module)
        linear = isinstance(module, nn.Linear) or functional_linear_weight(node) is not None
        if kind in (NodeKind.POOL, NodeKind.SUM) or (kind == NodeKind.LAYER and not linear):
            return False
        node = _first_tensor_input(node, None if linear else kind)
    return False


def _made_by_a_linear(model: nn.Module, node: fx.Node) -> bool:
    """Whether the node is a Linear's output (or a map's positions made tokens), behind
    activations, dropout, norms, gates, slices, and residual sums and joins with such an
    operand and none from a conv or a pool (an MLP-Mixer's blocks, their token-mixing branch
    transposed back; not a conv map plus a Linear's broadcast vector): its last dimension holds
    the features (N×T×F tokens)."""
    known: dict[fx.Node, bool | None] = {}

    def made(node) -> bool | None:  # None: not known (the input, a transpose, ...)
        if not isinstance(node, fx.Node) or node.op == "placeholder":
            return None
        if node not in known:
            known[node] = None  # while it is worked out
            m = _module(model, node)
            kind = node_kind(node, m)
            if isinstance(m, nn.Linear) or functional_linear_weight(node) is not None or _tokens_of_a_map(node):
                known[node] = True
            elif kind in (NodeKind.ADD, NodeKind.CAT):
                found = {made(a) for a in relevance_inputs(node, kind) if isinstance(a, fx.Node)}
                known[node] = False if False in found else True if True in found else None
            elif kind in (NodeKind.SCALE, NodeKind.SELECT, NodeKind.PASS):
                known[node] = made(_first_tensor_input(node, kind))
            elif kind in (NodeKind.LAYER, NodeKind.POOL, NodeKind.SUM):
                known[node] = False
        return known[node]
    try:
        return made(node) is True
    except RecursionError:  # a very deep token network: its layout is not known here
        return False


def _tokens_of_a_map(node: fx.Node) -> bool:
    """``x.flatten(2).transpose(1, 2)`` (ViT's and MLP-Mixer's patch tokens): N×T×C, channels last."""
    if calls(node, *TRANSPOSES):
        dims = node.args[1:3] if len(node.args) >= 3 else ()
    elif calls(node, {torch.permute}, {"permute"}):
        dims = (1, 2) if _permute_order(node) in ((0, 2, 1), (0, -1, -2), (0, 2, -2), (0, -1, 1)) else ()
    else:
        return False
    source = node.args[0] if node.args else None
    if not (isinstance(source, fx.Node) and calls(source, {torch.flatten}, {"flatten"})):
        return False
    flat = dict(zip(("input", "start_dim", "end_dim"), source.args)) | source.kwargs
    return (flat.get("start_dim", 0) == 2 and flat.get("end_dim", -1) == -1 and len(dims) == 2
            and all(isinstance(d, int) for d in dims) and sorted(d % 3 for d in dims) == [1, 2])


def _non_negative(model: nn.Module):
    """``f(node)``: whether the node's forward values are ≥ 0 by construction (a rectifier's
    output, or what pooling, padding, concatenation, sums and reshapes make of such values).
    Layer rules then use their input as x̂ = max(x, 0) without clamping a copy."""
    known: dict[fx.Node, bool] = {}

    def check(node) -> bool:
        if not isinstance(node, fx.Node):
            return False  # a constant operand
        if node not in known:
            module = _module(model, node)
            if node.op in ("placeholder", "get_attr", "output"):
                known[node] = False
            elif rectifies(node, module):
                known[node] = True
            else:
                kind = node_kind(node, module)
                operands = relevance_inputs(node, kind) if kind else []
                known[node] = bool(operands) and keeps_sign(node, module, kind) and all(check(a) for a in operands)
        return known[node]
    return check


def _describe_unsupported(node: fx.Node, module) -> tuple[str, str]:
    """(where, what) of a node without a rule."""
    if module is not None:
        why = node.meta.get(KEPT_WHOLE)
        reason = f"its forward cannot be traced: {why}" if why else unsupported_combination(node, module)
        return node.target, type(module).__name__ + (f" ({reason})" if reason else "")
    if node.op == "get_attr":
        return node.target, "a parameter or buffer used as an activation"
    # a call inside a module's forward is named by that module's path, as users know it
    stack = node.meta.get("nn_module_stack") or {}
    where = f"{next(reversed(stack.values()))[0]} ({node.name})" if stack else node.name
    combination = unsupported_combination(node)
    if combination:
        return where, combination
    if node.op == "call_method":
        return where, f"Tensor.{node.target}"
    fn = node.target
    return where, f"{getattr(fn, '__module__', None) or 'builtin'}.{getattr(fn, '__name__', fn)}"


def _grouped(problems: list[tuple[str, str]], shown: int = 3) -> str:
    """"a, b and 5 more: what; c: other": each reason once, its first places in natural order."""
    def natural(name: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    places: dict[str, set[str]] = {}
    for where, what in problems:
        places.setdefault(what, set()).add(where)
    parts = []
    for what, where in sorted(places.items(), key=lambda item: natural(min(item[1], key=natural))):
        names = sorted(where, key=natural)
        more = f" and {len(names) - shown} more" if len(names) > shown + 1 else ""
        parts.append(", ".join(names[:shown] if more else names) + more + f": {what}")
    return "; ".join(parts)


def _factor_branches(graph: fx.Graph, saliency: fx.Node, explained) -> set[fx.Node]:
    """The nodes the saliency layer depends on that compute from the input but get no relevance:
    the branches of gates and statistics (``h * sigmoid(h.mean(0))``)."""
    ancestors, todo = set(), [saliency]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in ancestors and not is_shape_query(a):
                ancestors.add(a)
                todo.append(a)
    from_input, todo = set(), [n for n in graph.nodes if n.op == "placeholder"]
    while todo:
        for user in todo.pop().users:
            if user not in from_input:
                from_input.add(user)
                todo.append(user)
    return {n for n in ancestors & from_input if n not in explained}


def _bn_after(model: nn.Module, node: fx.Node, explained):
    """The folding scale of the BatchNorms (modules or F.batch_norm in eval mode) that alone
    consume this layer's output, one after another, past a bias added on its own, dropout or
    an identity, and that relevance passes (not one after the saliency layer: R₀ is the layer's
    own output's); their scales multiply."""
    scales = []
    while len(node.users) == 1 and (user := next(iter(node.users))) in explained:
        m = _module(model, user)
        scale = (batchnorm_scale(m) if is_batchnorm(m) and m.running_var is not None
                 else functional_batchnorm_scale(user, functools.partial(attribute_at, model)))
        if scale is not None:
            scales.append(scale)
        elif not (is_identity_in_eval(user, m) or is_biased_sum(user) and sole_operand(user) is node):
            break
        node = user
    if len(scales) < 2:
        return scales[0] if scales else lambda: None

    def product():
        values = [s() for s in scales]
        return None if any(v is None for v in values) else functools.reduce(operator.mul, values)
    return product
