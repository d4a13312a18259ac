"""Which operand of a product, quotient or biased sum takes all of the relevance.

y = x·g, x/s, x + c: when the other operand only reweights or shifts x — a sigmoid gate, a
number, a parameter, or a statistic of the activations (a mean, a norm, a softmax over pooled
features) — all of R goes to x (LRP's signal-take-all, as for gates and attention weights
treated as constants): the factor's branch gets none, so its ops need no rules. In a gated
linear unit act(g)·x (StarNet, MambaOut) the activated operand is the gate. A product of two
position-wise activations that are both activated or both not (relu(a)·tanh(b), a·b) has no
such operand and is refused.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.trace import ATTR_VALUE, FX_CONSTANT, MODULE_META

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub, torch.subtract}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.multiply}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide}
ADD_METHODS = {"add", "add_", "__add__"}
SUB_METHODS = {"sub", "sub_", "__sub__", "subtract"}
MUL_METHODS = {"mul", "mul_", "__mul__", "multiply"}
DIV_METHODS = {"div", "div_", "__truediv__", "divide", "true_divide"}
ADDCMUL = ({torch.addcmul}, {"addcmul", "addcmul_"})  # functions, methods

GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
GATE_METHODS = {"sigmoid", "sigmoid_"}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax}  # weights in [0, 1] too, but not activations
RECTIFIERS = (nn.ReLU, nn.ReLU6)
# Other elementwise activations: R passes through them as through ReLU (an extension, as in
# LRP: RSP_SPEC.md defines ReLU and ReLU6 only). Their outputs can be negative, so the
# layer after them clamps its input (x̂ = max(x, 0)) as RSP does everywhere.
ELEMENTWISE_ACTIVATIONS = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU,
                           nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.Tanhshrink,
                           nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.RReLU)
ACTIVATIONS = RECTIFIERS + ELEMENTWISE_ACTIVATIONS
RECTIFIER_FUNCTIONS = {F.relu, torch.relu, F.relu6}
ACTIVATION_FUNCTIONS = RECTIFIER_FUNCTIONS | GATE_FUNCTIONS | {
    F.silu, F.hardswish, F.gelu, F.mish, F.leaky_relu, F.prelu, F.elu, F.celu, F.selu, F.softplus, torch.tanh, F.tanh, F.hardtanh,
    F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.logsigmoid, F.threshold, F.rrelu}
ACTIVATION_METHODS = GATE_METHODS | {"relu", "relu_", "tanh"}
CAST_METHODS = {"to", "float", "double", "half", "bfloat16", "type", "type_as"}
TRANSPOSES = ({torch.transpose, torch.swapaxes, torch.swapdims}, {"transpose", "swapaxes", "swapdims"})  # functions, methods
RESHAPE_METHODS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "view_as", "reshape_as",
                   "contiguous"} | CAST_METHODS
# Ops whose output summarises their input over some dimensions: a value computed only
# from such summaries (and parameters) is a statistic, not a position-wise signal.
ADAPTIVE_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.norm, torch.linalg.vector_norm,
                       torch.linalg.norm, torch.var, torch.std, torch.var_mean, torch.std_mean, torch.logsumexp}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "norm", "var", "std", "logsumexp"}
REDUCTION_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def calls(node: fx.Node, functions: set, methods: set) -> bool:
    return ((node.op == "call_function" and node.target in functions)
            or (node.op == "call_method" and node.target in methods))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def op_name(node: fx.Node) -> str:
    """What a call node calls: a method's name, or a function's."""
    return node.target if isinstance(node.target, str) else node.target.__name__


def call_arg(node: fx.Node, position: int, name: str, default=None):
    """An argument of a call, given by position or by keyword (``default`` where neither)."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def two_operands(node: fx.Node) -> tuple:
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first, call_arg(node, 1, "other")


def reduced_dims(node: fx.Node) -> tuple | None:
    """The dimensions a mean / sum / amax node reduces, as a tuple (None: all of them)."""
    dims = call_arg(node, 1, "dim")
    return (dims,) if isinstance(dims, int) else (tuple(dims) if dims is not None else None)


def behind_reshapes(arg, resizes: bool = False):
    """The value a chain of reshapes, expands, casts (and with ``resizes``, interpolations)
    starts from."""
    while isinstance(arg, fx.Node) and arg.args and (
            (arg.op == "call_method" and arg.target in RESHAPE_METHODS)
            or (arg.op == "call_function" and arg.target in (torch.reshape, torch.unsqueeze, torch.squeeze))
            or (resizes and arg.op == "call_function" and arg.target is F.interpolate)
            or (resizes and isinstance(arg.meta.get(MODULE_META), nn.Upsample))):
        arg = arg.args[0]
    return arg


def is_activated(arg) -> bool:
    """The output of an elementwise activation (module or function), also reshaped."""
    arg = behind_reshapes(arg)
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_module":
        m = arg.meta.get(MODULE_META)
        return isinstance(m, ACTIVATIONS) or is_timm_activation(m)
    return calls(arg, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS)


def _reaches_input(node: fx.Node, key: str, stop=lambda n: False) -> bool:
    """Whether a backward walk from ``node`` reaches the model's input without passing a node
    where ``stop`` holds (shape queries carry no values: not followed). Cached in node.meta[key]."""
    if key not in node.meta:
        stack, seen, reached = [node], {node}, False
        while stack and not reached:
            n = stack.pop()
            reached = n.op == "placeholder"
            if stop(n):
                continue
            for a in _value_inputs(n):
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        node.meta[key] = reached
    return node.meta[key]


# Ops that read only the shape, dtype and device of their first operand, not its values.
TEMPLATE_FUNCTIONS = {torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like}
TEMPLATE_METHODS = {"new_ones", "new_zeros", "new_full", "new_empty"}


def _templates(node: fx.Node) -> tuple:
    """The operands whose shape, dtype and device alone ``node`` reads: x of ``x.new_ones(...)``
    or ``torch.zeros_like(x)``, y of ``w.type_as(y)`` or ``w.to(y)``."""
    if node.args and calls(node, TEMPLATE_FUNCTIONS, TEMPLATE_METHODS):
        return (node.args[0],)
    if node.op == "call_method" and node.target in ("type_as", "to") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return (node.args[1],)
    return ()


def _value_inputs(node: fx.Node) -> list:
    """The nodes whose values ``node`` reads (not shape queries, not a template)."""
    templates = _templates(node)
    return [a for a in node.all_input_nodes if a not in templates and not is_shape_query(a)]


def is_parameter(v) -> bool:
    """A parameter or buffer of the model, or a value computed from them alone (−bias, a
    reshaped scale): a constant while the model is explained."""
    return isinstance(v, fx.Node) and not _reaches_input(v, "rsp_reaches_input")


RANDOM_OPS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "normal_",
              "uniform_", "bernoulli", "bernoulli_", "multinomial", "poisson", "exponential_", "random_", "dropout"}


class _Unknown(Exception):
    """A value that depends on more than buffers, numbers and the input's dtype and device."""


def fixed_value(v, read: Callable[[str], object] | None = None):
    """The value of a node computed from buffers, numbers and the input's dtype and device alone
    (a filter made in forward: ``torch.full((c, 1, 3, 3), 1 / 9, dtype=x.dtype)``, a buffer / 9),
    worked out on the CPU for a float32 input; None if it reads a parameter (learned), the
    input's values or sizes, or a module's output. Cached in node.meta; with ``read`` (a
    get_attr target → the model's attribute now: buffers change after the trace) worked out anew."""
    if not isinstance(v, fx.Node):
        return v
    if read is None and "rsp_fixed_value" in v.meta:
        return v.meta["rsp_fixed_value"]
    try:  # the caller's random stream left as it was, whatever the chain calls
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            value = _evaluate(v, {}, read=read)
    except Exception:  # _Unknown, or the op fails without the real input: not a fixed value
        value = None
    if read is None:
        v.meta["rsp_fixed_value"] = value
    return value


# An activation's sizes at plan time, where a filter made in forward reads them (its channels,
# x.shape[1]): the filter's signs, all that is asked of it, do not hang on them.
PROBE_SIZE = 3
PROBES = {"dtype": torch.float32, "device": torch.device("cpu"), "shape": torch.Size([PROBE_SIZE] * 8)}


def attribute_now(node: fx.Node, read: Callable[[str], object] | None):
    """What a get_attr node reads: as traced, or with ``read`` the model's attribute now (a
    tensor fx made a constant of the graph lives in the graph, not on the model)."""
    return node.meta.get(ATTR_VALUE) if read is None or node.meta.get(FX_CONSTANT) else read(node.target)


def _evaluate(node: fx.Node, done: dict, learned: bool = False, read: Callable[[str], object] | None = None):
    """``node``'s value from buffers and numbers (with ``learned``, parameters too: for the
    shape, dtype or device of one, not its values); attributes as traced, or as ``read`` gives them."""
    if node in done:
        return done[node]
    if node.op == "get_attr":
        value = attribute_now(node, read)
        if isinstance(value, torch.Tensor):
            if (isinstance(value, nn.Parameter) or value.requires_grad) and not learned:
                raise _Unknown(node)
            value = value.detach().clone()  # an in-place op in the chain must not write the model's buffer
    elif node.op == "call_function" and node.target is getattr and node.args[1] in PROBES:
        source = node.args[0]  # an activation's are the probes, a parameter's its own
        value = getattr(_evaluate(source, {}, True, read), node.args[1]) if is_parameter(source) else PROBES[node.args[1]]
    elif node.op == "call_method" and node.target == "size" and not is_parameter(node.args[0]):
        dim = call_arg(node, 1, "dim")
        value = PROBES["shape"] if dim is None else PROBE_SIZE
    elif node.op in ("call_function", "call_method"):
        if getattr(node.target, "__name__", node.target) in RANDOM_OPS:  # drawn anew at every call: not fixed
            raise _Unknown(node)
        templates = _templates(node)

        def operand(a):
            if a not in templates:
                return _evaluate(a, done, learned, read)
            return torch.empty_like(_evaluate(a, {}, True, read)) if is_parameter(a) else torch.empty(0)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), operand)
        value = (node.target(*args, **kwargs) if node.op == "call_function"
                 else getattr(args[0], node.target)(*args[1:], **kwargs))
    else:  # the input, a module's output
        raise _Unknown(node)
    done[node] = value
    return value


TIMM_ACTIVATION_MODULES = ("timm.layers.activations", "timm.layers.activations_me")
TIMM_GATES = {"Sigmoid", "HardSigmoid", "HardSigmoidMe"}


def is_timm_activation(m) -> bool:
    """timm's own elementwise activation modules (GELU, Swish, HardSigmoid, their "Me"
    versions): not subclasses of torch's, some built on autograd functions fx cannot read."""
    return type(m).__module__ in TIMM_ACTIVATION_MODULES


def is_gate(arg) -> bool:
    """A factor in [0, 1]: squeeze-and-excitation's sigmoid channel scale, swish's σ(x), a
    softmax over positions (attention pooling's weights), also reshaped, expanded (ECA's
    ``x * y.expand_as(x)``) or resized (GhostNetV2)."""
    arg = behind_reshapes(arg, resizes=True)  # a resize's convex combinations stay in [0, 1]
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_module":
        m = arg.meta.get(MODULE_META)
        return (isinstance(m, (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax))
                or (is_timm_activation(m) and type(m).__name__ in TIMM_GATES))
    return calls(arg, GATE_FUNCTIONS | SOFTMAX_FUNCTIONS, GATE_METHODS | {"softmax"})


def _is_reduction(node: fx.Node) -> bool:
    """A mean, sum, norm, variance, ..., or an adaptive pool to one value along each dim it
    pools (not a regional average, a pool to 4×4: as position-wise as F.avg_pool2d's)."""
    if node.op == "call_module":
        m = node.meta.get(MODULE_META)
        return isinstance(m, REDUCTION_MODULES) and _pools_to_one(m.output_size)
    if node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS:
        return _pools_to_one(call_arg(node, 1, "output_size"))
    return calls(node, REDUCTION_FUNCTIONS, REDUCTION_METHODS)


def _pools_to_one(size) -> bool:
    return all(s in (1, None) for s in (size if isinstance(size, (tuple, list)) else (size,)))


def is_shape_query(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim() and items of them: values that carry no relevance."""
    if node.op == "call_function" and node.target is getattr:
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and is_shape_query(node.args[0]))


def is_statistic(arg) -> bool:
    """Whether every path from the model's input to ``arg`` passes through a reduction (a
    mean, sum, norm, variance, adaptive pool) or starts at a parameter: a per-channel,
    per-group or per-position summary (an attention weight over channels or branches, a
    norm's scale), not a position-wise copy of the signal."""
    return isinstance(arg, fx.Node) and not _reaches_input(arg, "rsp_reaches_input_unreduced", _is_reduction)


def _depends_only_through_reductions(f: fx.Node, x: fx.Node) -> bool:
    """Whether f is computed from x, and only through reductions (an RMS norm's scale of x)."""
    reached = {False: False, True: False}  # x reached without / with a reduction on the way
    stack, seen = [(f, False)], {(f, False)}
    while stack:
        node, reduced = stack.pop()
        if node is x:
            reached[reduced] = True
            continue
        reduced = reduced or _is_reduction(node)
        for a in node.all_input_nodes:
            if (a, reduced) not in seen and not is_shape_query(a):
                seen.add((a, reduced))
                stack.append((a, reduced))
    return reached[True] and not reached[False]


def _normalises(factor, x) -> bool:
    """Whether ``factor`` only reweights ``x``: a statistic while x is not, or, where both are
    statistics (past a global pool, in a head), one computed from x through a reduction."""
    if not isinstance(x, fx.Node) or is_parameter(x) or not is_statistic(factor):
        return False
    return not is_statistic(x) or _depends_only_through_reductions(factor, x)


def _scaled_operand(node: fx.Node) -> fx.Node | None:
    a, b = two_operands(node)
    if calls(node, DIV_FUNCTIONS, DIV_METHODS):
        plain = isinstance(a, fx.Node) and not is_parameter(a) and (is_number(b) or is_parameter(b))
        return a if plain or _normalises(b, a) else None
    return _product_operand(a, b)


def _product_operand(a, b) -> fx.Node | None:
    """Of the factors of a·b, the one that takes all of R, or None."""
    if isinstance(a, fx.Node) and a is b and not is_parameter(a):  # x·x = x²: an elementwise function of x
        return a
    for x, factor in ((a, b), (b, a)):  # x·σ(x) (swish): both are the same signal
        if isinstance(x, fx.Node) and not is_parameter(x) and (is_number(factor) or is_gate(factor) or is_parameter(factor)):
            return x
    for x, factor in ((a, b), (b, a)):
        if _normalises(factor, x):
            return x
    for x, factor in ((a, b), (b, a)):  # a GLU-style unit, act(g)·x: the activated operand is the gate
        if isinstance(x, fx.Node) and not is_statistic(x) and is_activated(factor) and not is_activated(x):
            return x
    return None


def _biased_operand(node: fx.Node) -> fx.Node | None:
    if not is_number(node.kwargs.get("alpha", 1)):  # x ± α·c shifts x as x ± c does
        return None
    a, b = two_operands(node)
    if calls(node, SUB_FUNCTIONS, SUB_METHODS):
        # x − s, s a statistic of x: a norm's centring (ConvNeXt's hand-written LayerNorm, x − x.mean(1)),
        # a shift as x/s is a scale; a statistic added is left to the sum's rule (a global-context block's)
        shift = is_number(b) or is_parameter(b) or _normalises(b, a)
        return a if isinstance(a, fx.Node) and not is_parameter(a) and shift else None
    for x, c in ((a, b), (b, a)):
        if isinstance(x, fx.Node) and not is_parameter(x) and (is_number(c) or is_parameter(c)):
            return x
    return None


def addcmul_operands(node: fx.Node) -> tuple:
    """(input, tensor1, tensor2, value) of torch.addcmul(input, tensor1, tensor2, value=v) = input + v·tensor1·tensor2."""
    given = dict(zip(("input", "tensor1", "tensor2"), node.args)) | node.kwargs
    return given.get("input", given.get("self")), given.get("tensor1"), given.get("tensor2"), given.get("value", 1)


def _addcmul_operand(node: fx.Node) -> fx.Node | None:
    """torch.addcmul(c, c', x) = c + c'·x with c, c' parameters (ConvNeXt-V2's response norm),
    or addcmul(x, c, c')."""
    signals = [v for v in addcmul_operands(node)[:3] if isinstance(v, fx.Node) and not is_parameter(v)]
    return signals[0] if len(signals) == 1 else None


def addcmul_terms(node: fx.Node) -> tuple[fx.Node, fx.Node, object] | None:
    """For torch.addcmul(x, c, f) = x + c·f with c a number, parameter, gate or statistic (a
    layer-scaled residual in one op): x, f and c, the sum's terms and f's factor, or None."""
    x, t1, t2, value = addcmul_operands(node)
    f = _product_operand(t1, t2)
    if not isinstance(x, fx.Node) or is_parameter(x) or f is None or not is_number(value):
        return None
    return x, f, t2 if f is t1 else t1


def is_product(node: fx.Node) -> bool:
    return calls(node, MUL_FUNCTIONS | DIV_FUNCTIONS, MUL_METHODS | DIV_METHODS)


def is_biased_sum(node: fx.Node) -> bool:
    return calls(node, ADD_FUNCTIONS | SUB_FUNCTIONS, ADD_METHODS | SUB_METHODS)


def sole_operand(node: fx.Node) -> fx.Node | None:
    """The operand that takes all of R, or None: for x·g, x·c, x·p, x·s, act(g)·x and x/c, x/p,
    x/s (g a gate, c a number, p a parameter, s a statistic), x ± c, x ± p, x − s and addcmul(p, p', x)."""
    if is_product(node):
        return _scaled_operand(node)
    if is_biased_sum(node):
        return _biased_operand(node)
    if calls(node, *ADDCMUL):
        return _addcmul_operand(node)
    return None


def keeps_sign_of_operand(node: fx.Node) -> bool:
    """Whether y ≥ 0 when its sole operand is: x·gate, x·c or x/c with c > 0, x + c with c ≥ 0."""
    x = sole_operand(node)
    others = [v for v in two_operands(node) if v is not x] or [x]  # x·x: both are the gate
    if is_product(node):
        return all(is_gate(v) or (is_number(v) and v > 0) for v in others)
    if calls(node, ADD_FUNCTIONS, ADD_METHODS):
        return node.kwargs.get("alpha", 1) >= 0 and all(is_number(v) and v >= 0 for v in others)
    return False
