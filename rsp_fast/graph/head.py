"""The head: where relevance starts (the default saliency layer: the last map before the
global pool or flatten, or the input of an MLP's last Linear), the class scores a final softmax
normalises, and whether the saliency map has its channels last (N×H×W×C, N×T×F tokens).
Worked out from the traced graph alone, for any input shape."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import RSPError
from ..rules import (CAT_FUNCTIONS, STACK_FUNCTIONS, NodeKind, functional_linear_weight, is_identity_in_eval,
                     is_pointwise_conv, node_kind, relevance_inputs)
from ..rules.operands import TRANSPOSES, call_arg, calls, is_parameter, reduced_dims
from .trace import KEPT_WHOLE

FLATTEN_FUNCTIONS_OR_METHODS = {"flatten", "view", "reshape"}


def module_of(model: nn.Module, node: fx.Node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _is_flatten(node: fx.Node, module) -> bool:
    """A flatten, or a view or reshape that may be one: not one to four or more sizes (ones at
    the end not counted: x.reshape(n, -1, 1, 1) flattens), which keeps a map, nor one that merges
    back dims a view split and a transpose moved (the last step of a channel shuffle,
    x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w), of a 1-D map too); a shape
    known only at run time (x.view(size)) counts as a flatten."""
    if module is not None:
        return isinstance(module, nn.Flatten)
    name = _view_name(node)
    if name in (None, "flatten"):
        return name is not None
    sizes = _shape_argument(node)
    while len(sizes) > 2 and isinstance(sizes[-1], int) and sizes[-1] == 1:
        sizes = sizes[:-1]
    return len(sizes) < MAP_RANK and not (len(sizes) > 2 and _merges_a_split(node, len(sizes)))


MAP_RANK = 4  # N×C×H×W; a view to fewer sizes may flatten the map (N×F, N×C×L), one to as many keeps it


def _view_name(node: fx.Node) -> str | None:
    """"flatten", "view" or "reshape" for such a call (function or method), else None."""
    name = getattr(node.target, "__name__", node.target)
    return name if node.op in ("call_function", "call_method") and name in FLATTEN_FUNCTIONS_OR_METHODS else None


def _shape_argument(node: fx.Node) -> tuple:
    """The sizes a view or reshape is given (one item where a value known at run time holds them)."""
    sizes = node.args[1:] or (node.kwargs.get("shape", node.kwargs.get("size")),)
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(sizes)


def _merges_a_split(node: fx.Node, count: int) -> bool:
    """Whether a view to ``count`` sizes reads, behind transposes or permutes (and copies), a view
    to more sizes: dims split, moved and merged back."""
    source, moved = node.args[0] if node.args else node.kwargs.get("input"), False
    while isinstance(source, fx.Node) and (calls(source, TRANSPOSES[0] | {torch.permute}, TRANSPOSES[1] | {"permute"})
                                           or calls(source, set(), {"contiguous"})):
        moved = moved or not calls(source, set(), {"contiguous"})
        source = source.args[0]
    return (moved and isinstance(source, fx.Node) and _view_name(source) in ("view", "reshape")
            and len(_shape_argument(source)) > count)


def _first_tensor_input(node: fx.Node, kind: str | None = None) -> fx.Node | None:
    """The input the main path comes from: where a rule sends relevance (x of x·scale + bias),
    else the first tensor argument."""
    ins = [a for a in (relevance_inputs(node, kind) if kind else node.all_input_nodes) if isinstance(a, fx.Node)]
    if calls(node, CAT_FUNCTIONS | STACK_FUNCTIONS, set()):  # every piece is on the path (a class token too): the first
        return ins[0] if ins else None
    return next((a for a in ins if not is_parameter(a)), ins[0] if ins else None)  # w·x + b: x, not w


def default_saliency(model: nn.Module, graph: fx.Graph) -> fx.Node:
    """VGG: the last ReLU before the last max-pool; ResNet: layer4; otherwise the last
    spatial map before global pooling / flatten; for MLPs the input of the last Linear."""
    output = next(n for n in graph.nodes if n.op == "output")
    node, last_linear_input = logits_node(output), None
    # Walk back along the main path to the first flatten or pooling of the head.
    while node is not None and node.op != "placeholder":
        m = module_of(model, node)
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
    while node is not None and node.op != "placeholder" and is_identity_in_eval(node, module_of(model, node)):
        node = _first_tensor_input(node)
    if node is not None and node.op != "placeholder":
        return node
    raise RSPError(f"could not choose a default saliency layer for {type(model).__name__}; pass layer='<module name>'")


def logits_node(output: fx.Node) -> fx.Node | None:
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


def scores_normalised(model: nn.Module, logits: fx.Node | None) -> tuple[fx.Node | None, int | str | None]:
    """The scores a model's last op turns into probabilities (a softmax or log_softmax, a
    sigmoid) and the dim it normalises (None: PyTorch's implicit one; ``ELEMENTWISE``), or
    (None, None): their gradients saturate where the model is sure, and R₀ is meant for the
    class scores (RSP_SPEC §1's y_c); the order, so the target, is the same. Whether the dim is
    the classes' is known with the output's rank, at run time (``scores_over_classes``)."""
    if logits is None:
        return None, None
    m = module_of(model, logits)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        dim = m.dim
    elif isinstance(m, nn.Sigmoid) or calls(logits, {torch.sigmoid, F.sigmoid}, {"sigmoid"}):
        dim = ELEMENTWISE
    elif calls(logits, *NORMALISERS):
        dim = call_arg(logits, 1, "dim")
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
    while node is not None and node.op != "placeholder" and not _ends_head(model, node, m := module_of(model, node)):
        if node_kind(node, m) == NodeKind.LAYER and not through_layers:
            return None
        node = _first_tensor_input(node)
    return _feature_map_behind(model, _global_pool_behind_head(model, node) or node) if node is not None else None


def _feature_map_behind(model: nn.Module, node: fx.Node | None) -> fx.Node | None:
    """Back over pooling, reshapes and dropout to the feature map they summarise (and over head
    modules kept whole, like timm VGG's conv MLP: relevance cannot start there); None if the
    input is reached first."""
    while node is not None and node.op != "placeholder":
        m = module_of(model, node)
        if not (_is_flatten(node, m) or node_kind(node, m) == NodeKind.POOL or _is_global_pool(model, node, m)
                or node.meta.get(KEPT_WHOLE) or is_identity_in_eval(node, m) or _generalised_mean_part(node)):
            return node
        node = _first_tensor_input(node)
    return None


def _generalised_mean_part(node: fx.Node) -> bool:
    """x ** p or x.clamp(min=ε), 0 < ε ≤ 1e-3, before a mean: GeM pooling (x.clamp(ε).pow(p).mean().pow(1/p)),
    part of the pooling, not a map of its own (a clamp at 0 or at 0.1, an activation, is one)."""
    if calls(node, {operator.pow, torch.pow}, {"pow", "__pow__"}):
        exponent = call_arg(node, 1, "exponent")
        return isinstance(exponent, (int, float)) and exponent != 1 or isinstance(exponent, fx.Node) and is_parameter(exponent)
    if calls(node, {torch.clamp, torch.clamp_min, torch.clip}, {"clamp", "clamp_min", "clip"}):
        low = call_arg(node, 1, "min")
        return isinstance(low, (int, float)) and 0 < low <= 1e-3
    return False


def _layer_on_path(model: nn.Module, node: fx.Node, stop: fx.Node | None) -> bool:
    """Whether a conv or linear layer lies on the main path from ``node`` back to ``stop``."""
    while node is not None and node is not stop and node.op != "placeholder":
        m = module_of(model, node)
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
    while conv is not None and conv.op != "placeholder" and node_kind(conv, module_of(model, conv)) == NodeKind.PASS:
        conv = _first_tensor_input(conv)  # its activation
    m = module_of(model, conv) if conv is not None else None
    if conv is not None and is_pointwise_conv(conv, m) or isinstance(m, nn.Linear):
        return _first_tensor_input(conv)  # (a Linear on each token of an N×T×F input, averaged over T, alike)
    return node


def _global_pool_behind_head(model: nn.Module, node: fx.Node | None) -> fx.Node | None:
    """timm-style heads run a 1×1 conv, a norm, an activation, a learnable affine map or a
    permute on the pooled map before flattening (MobileNetV3, HGNetV2, ConvNeXt's RMS-norm
    head): the global pool behind such a head, if there is one."""
    while node is not None and node.op != "placeholder":
        m = module_of(model, node)
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
        return (len(pools) > 1 and all(_is_global_pool(model, p, module_of(model, p)) for p in pools)
                and len({_first_tensor_input(p) for p in pools}) == 1)
    if isinstance(module, ADAPTIVE_POOLS):
        size = module.output_size
    elif node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS:
        size = call_arg(node, 1, "output_size")
    elif calls(node, {torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"}):  # average, sum or max pooling
        # over the time of a 1-D map (N×C×L) too, and over the tokens of a Linear's N×T×F output
        tokens = ([1], [-2]) if _made_by_a_linear(model, node.args[0]) else ()
        spatial = ([2, 3], [-2, -1], [2, 3, 4], [-3, -2, -1], [2], [-1], [3], [4], [3, 4])  # [3]: x.sum(3).sum(2)
        return sorted(reduced_dims(node) or ()) in spatial + tokens
    else:
        return False
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def pooled_channels_last(model: nn.Module, saliency: fx.Node, rank: int | None = None) -> bool:
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
        m = module_of(model, node)
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
        call_arg(node, 1, "dims", ())
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
        module = module_of(model, node)
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
            m = module_of(model, node)
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
