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

from ..errors import RSPError, UnsupportedModelError
from ..rules import (BATCH_MIXING, STACK_FUNCTIONS, NodeKind, Rule, batchnorm_scale, describe_supported, dims_read_along,
                     filter_signs_hold, filter_signs_judged, functional_batchnorm_scale, is_batchnorm,
                     is_identity_in_eval, is_rule_leaf, keeps_sign, mixes_the_batch, node_kind, pads_by_copy,
                     reads_other_samples, rectifies, relevance_inputs, rule_for, unsupported_combination, zero_padding)
from ..rules.base import LayerRule
from ..rules.conv import Conv
from ..rules.conv3d import Conv3d
from ..rules.operands import calls, is_biased_sum, is_shape_query, sole_operand
from .head import (LAYOUT_CHANGE_METHODS, LAYOUT_CHANGES, default_saliency, logits_node, module_of,
                   pooled_channels_last, scores_normalised)
from .module_state import ModuleState, global_hooks, module_states
from .trace import KEPT_WHOLE, UntraceableModelError, attribute_at, trace

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
    # input (shape, dtype, device)s on which the traced forward was found to give model(x)'s logits
    forward_checked: set = field(default_factory=set)
    samples_checked: set = field(default_factory=set)  # input shapes whose samples were seen kept apart (samples_apart.py)

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
        if self.states and global_hooks() != self.states[0].global_hooks:
            return False
        if not all(state.holds() for state in self.states):
            return False
        read = functools.partial(attribute_at, self.states[0].module) if self.states else None
        return not self.filter_signs or filter_signs_hold(self.filter_signs, read)

    def keep_what_the_pass_wrote(self, model: nn.Module) -> None:
        """After a pass on a current plan: what the modules it ran wrote onto themselves (a hook
        keeping a count or a statistic) is the model's state now, not a change to trace anew. Only
        plain attributes: a module replaced or a hook added meanwhile (by another thread) is seen
        at the next call."""
        if not self.is_current():
            for state in self.states:
                state.keep_attributes()


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
    if colon and module and call.isdigit() and int(call) >= 1 and layer not in known:
        try:  # the k-th call of a module held under a second name (inside a compiled block: "blk.c:1")
            return f"{layer_name(model, model.get_submodule(module))}:{call}"
        except (AttributeError, RSPError):
            pass
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
        node = default_saliency(model, graph)
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


def _indexing_changes_rank(node: fx.Node) -> bool:
    """``x[:, None]`` (a new axis) or ``x[:, 0]`` (an axis taken away): the input's rank is not the first layer's."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return False
    index = node.args[1]  # a bare int picks one of chunk's or split's parts
    return index is None or (isinstance(index, tuple) and any(i is None or isinstance(i, int) for i in index))


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
    unsupported: list[fx.Node] = []
    stack, seen, reached_input = [saliency], {saliency}, False
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            reached_input = True
            continue
        module = module_of(model, node)
        kind = node_kind(node, module) if node.op != "get_attr" else None
        if kind is None:
            unsupported.append(node)
        else:
            kinds[node] = kind
        # Go on past a node without a rule too, to report every problem (but not its shape queries).
        for arg in relevance_inputs(node, kind) if kind else [a for a in node.all_input_nodes if not is_shape_query(a)]:
            if not isinstance(arg, fx.Node):
                problems.append((node.name, f"{kind} with a constant operand ({arg!r})"))
            elif arg not in seen:
                seen.add(arg)
                stack.append(arg)
    problems += [_describe_unsupported(n, module_of(model, n)) for n in unsupported if not _named_by_another(n, unsupported)]
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
    # raw nodes behind a reshape of the input (x.unsqueeze(1), x.view(-1, 1, 28, 28), torch.stack([x, x, x], 1))
    reshaped: set[fx.Node] = set()
    input_node = next(n for n in graph.nodes if n.op == "placeholder")
    input_rank = None
    for node in sorted(kinds, key=order.__getitem__):
        ins = relevance_inputs(node, kinds[node])
        from_input = any(a is input_node or raw.get(a, False) for a in ins)
        raw[node] = from_input and kinds[node] != NodeKind.LAYER
        if raw[node] and (calls(node, LAYOUT_CHANGES | STACK_FUNCTIONS, LAYOUT_CHANGE_METHODS) or _indexing_changes_rank(node)
                          or any(a in reshaped for a in ins)):
            reshaped.add(node)
        module = module_of(model, node)
        if from_input and kinds[node] == NodeKind.LAYER and input_rank is None and not any(a in reshaped for a in ins):
            input_rank = (4 if isinstance(module, nn.Conv2d) or node.target in (F.conv2d, torch.conv2d) else
                          3 if isinstance(module, nn.Conv1d) or node.target in (F.conv1d, torch.conv1d) else
                          5 if isinstance(module, nn.Conv3d) or node.target in (F.conv3d, torch.conv3d) else None)

    steps = []
    for node in sorted(kinds, key=order.__getitem__, reverse=True):
        module = module_of(model, node)
        first = kinds[node] == NodeKind.LAYER and any(a is input_node or raw.get(a, False) for a in relevance_inputs(node, kinds[node]))
        steps.append(rule_for(node, kinds[node], module, first, _bn_after(model, node, kinds)))

    non_negative = _non_negative(model)
    for step in steps:
        if isinstance(step, LayerRule):
            step.input_non_negative = non_negative(step.inputs[0])
            source = step.inputs[0]
            if (isinstance(step, Conv | Conv3d) and not step.first and len(source.users) == 1 and source in kinds
                    and pads_by_copy(source, module_of(model, source))):
                step.purge_at = source  # RSP_SPEC §2 purges over the layer's input: the pixels, not their copies
            if isinstance(step, Conv | Conv3d) and step.first and len(source.users) == 1 and source in kinds:
                padding = zero_padding(source, module_of(model, source))
                if padding is not None:  # z^B's bounds and patches are the picture's, as for the conv's own padding
                    step.zero_pad = (source.args[0], padding)
                    step.needs_values.append(source.args[0])

    head, frontier = set(), [saliency]
    while frontier:
        for user in frontier.pop().users:
            if user not in head:
                head.add(user)
                frontier.append(user)
    mixing = [(n.name, why) for n in sorted(head, key=order.__getitem__) if (why := mixes_the_batch(n, module_of(model, n)))]
    if mixing:
        raise UnsupportedModelError(f"the model's head (after layer {layer_name!r}) mixes the samples, and RSP's "
                                    "initial relevance is each sample's own: " + _grouped(mixing))
    # On the relevance path dim 0 is refused by node_kind; on the branches that only compute factors
    # (a gate, a statistic) here: their values reach every sample's output. -k is known at run time.
    factors = _factor_branches(graph, saliency, kinds)
    along_batch = [(n.name, why) for n in factors if (why := reads_other_samples(n))]
    if along_batch:
        raise UnsupportedModelError("no RSP rule for " + _grouped(along_batch) + f" (between the input and layer {layer_name!r})")
    batch_dim_checks = []
    for node in sorted(set(kinds) | factors, key=order.__getitem__):
        read = dims_read_along(node)
        if read is not None and any(d < 0 for d in read[0]):
            dims, source, what = read
            batch_dim_checks.append((node, source, dims, what))
    saved = {v for s in steps for v in s.needs_values}
    leaves = frozenset(id(module_of(model, n)) for n in graph.nodes if n.op == "call_module")
    scores, scores_dim = scores_normalised(model, logits_node(next(n for n in graph.nodes if n.op == "output")))
    return Plan(graph, input_node, saliency, layer_name, steps, saved, head, input_rank, module_states(model, leaves),
                leaves, batch_dim_checks, functools.partial(pooled_channels_last, model, saliency),
                scores if scores in head else None, scores_dim, filter_signs=filter_signs_judged(kinds))


def _non_negative(model: nn.Module):
    """``f(node)``: whether the node's forward values are ≥ 0 by construction (a rectifier's
    output, or what pooling, padding, concatenation, sums and reshapes make of such values).
    Layer rules then use their input as x̂ = max(x, 0) without clamping a copy."""
    known: dict[fx.Node, bool] = {}

    def check(node) -> bool:
        if not isinstance(node, fx.Node):
            return False  # a constant operand
        if node not in known:
            module = module_of(model, node)
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


COMPARISONS = ({operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne, torch.gt, torch.ge, torch.lt,
                torch.le, torch.eq, torch.ne}, {"gt", "ge", "lt", "le", "eq", "ne", "__gt__", "__ge__", "__lt__", "__le__"})


def _named_by_another(node: fx.Node, unsupported: list[fx.Node]) -> bool:
    """Whether an op without a rule is a part of another one's: a field of its output
    (``x.topk(k).values``: topk is named), or a comparison that only makes the masks of ops
    named (``torch.where(x > 0, x, a * x)``: where is named)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[0] in unsupported
    return calls(node, *COMPARISONS) and bool(node.users) and all(u in unsupported for u in node.users)


def _describe_unsupported(node: fx.Node, module) -> tuple[str, str]:
    """(where, what) of a node without a rule."""
    if module is not None:
        why = node.meta.get(KEPT_WHOLE)
        reason = (f"its forward cannot be traced: {why}" if why else
                  "a TorchScript module, which torch.fx cannot read: use the nn.Module it was scripted or traced from"
                  if isinstance(module, torch.jit.ScriptModule) else unsupported_combination(node, module))
        return node.target, type(module).__name__ + (f" ({reason})" if reason else "")
    if node.op == "get_attr" and str(node.target).startswith("_tensor_constant"):  # fx's name for a tensor it folded
        stack = node.meta.get("nn_module_stack") or {}
        where = f" in {next(reversed(stack.values()))[0]}" if stack else ""
        return node.target, (f"a constant tensor the forward makes without the input{where} (e.g. a coordinate grid), "
                             "joined to the activations: RSP has no rule for relevance that flows into it")
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
        m = module_of(model, user)
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
