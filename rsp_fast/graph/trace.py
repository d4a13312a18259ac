"""Trace an unmodified model into a torch.fx graph.

Modules that RSP has a rule for are kept as leaves (so that e.g. timm's ``Conv2dSame``,
whose padding depends on the input size, never needs to be traced through), and so is any
submodule whose forward cannot be traced (control flow on its input's size, as in timm's
VGG head): a model is refused only if such a module lies on the relevance path. Every module
call, leaf or not, records the graph node holding its output, so that any module name
from ``model.named_modules()`` can be the saliency layer.

A forward that branches or loops on sizes (``if x.dim() == 4``, LeNet's
``num_flat_features``, ``int(np.prod(x.size()[1:]))``) cannot be traced symbolically; it is
traced again with an example input running alongside (``trace(..., example=x)``), sizes
as plain numbers: that graph holds for inputs of the example's shape only.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import operator
import threading
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RSPError, UnsupportedModelError, not_initialised
from ..shared_setting import SETTINGS

MODULE_META = "rsp_module"  # node.meta key: the leaf module a call_module node runs
KEPT_WHOLE = "rsp_kept_whole"  # node.meta key: why a module kept whole could not be traced
ATTR_VALUE = "rsp_attr_value"  # node.meta key: the parameter or buffer a get_attr node reads
CONSTANT_PREFIX = "_tensor_constant"  # fx's name for a tensor the forward makes without an input
FX_CONSTANT = "rsp_fx_constant"  # node.meta key: the get_attr node reads such a tensor, which fx put on the model


class _RecordingTracer(fx.Tracer):
    # a buffer read as a node of the graph: a filter or a scale worked out from it in forward
    # (``self.k.expand(c, 1, 3, 3) / 9``) is worked out again at every pass, not kept as fx's
    # constant from the buffer as traced (a buffer loaded in place after would not be seen)
    proxy_buffer_attributes = True

    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool | None]):
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self.module_outputs: dict[str, fx.Node] = {}  # "path": its last call's output, "path:k": its k-th call's
        self._calls: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, torch.jit.ScriptModule):  # fx cannot read its code: called whole (in the head, autograd runs it)
            return True
        leaf = self._is_rule_leaf(m)
        if leaf is None and parametrize.is_parametrized(m):
            # torch.nn.utils.parametrize makes the module's class a subclass "Parametrized<Name>" in
            # torch.nn's namespace, which fx keeps whole: judged by the class it was made from
            made_from = type(m).__bases__[0]
            return made_from.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and not isinstance(m, nn.Sequential)
        return super().is_leaf_module(m, qualname) if leaf is None else leaf

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:  # a module made inside the forward (``nn.ZeroPad2d(1)(x)``): its ops, traced
            return forward(*args, **kwargs)
        if isinstance(self.root, _Caller) and m is self.root.model:  # the model itself: never kept whole
            return super().call_module(m, forward, args, kwargs)
        if type(m).__name__ == "OptimizedModule" and (wrapped := _wrapped(m)) is not None:
            # a submodule compiled alone (model.layer4 = torch.compile(model.layer4)), which fx
            # cannot trace: the module it runs, traced in its place (paths "layer4._orig_mod.…")
            if m._forward_hooks or m._forward_pre_hooks:  # they would not run around it
                path = self.path_of_module(m)
                raise UnsupportedModelError(f"{path} is compiled with torch.compile and has hooks of its own, which "
                                            f"rsp_fast cannot run around the module it compiles: register them on "
                                            f"{path}._orig_mod")
            out = wrapped[0](*args, **kwargs)  # called, so that its own hooks run as for any module
            if isinstance(out, fx.Proxy):
                self._count_call(self.path_of_module(m), out.node)
            return out
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):  # traced through: fx calls it with its hooks (a lazy one's would fill it)
            _check_initialised(m, path, recurse=False)
        last = next(iter(reversed(self.graph.nodes)), None)  # the newest node so far
        depth = len(self.module_stack)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except (_ForwardFailed, UnsupportedModelError):
            raise
        except Exception as exc:
            # Control flow on traced values inside this submodule (e.g. timm's VGG head checks
            # its input size): keep the module whole, as one node, and drop what its partial
            # trace added. In the head it runs as it is; on the relevance path the plan
            # reports it as a module without a rule.
            self._erase_after(last)
            while len(self.module_stack) > depth:  # fx does not unwind it when a forward raises
                self.module_stack.popitem()
            out = self.create_proxy("call_module", path, args, kwargs)
            out.node.meta[KEPT_WHOLE] = _first_line(exc)
        if isinstance(out, fx.Proxy):
            self._count_call(path, out.node)
            if out.node.op == "call_module" and out.node.target == path:  # a leaf (not a wrapper ending in one)
                out.node.meta[MODULE_META] = m
        return out

    def _count_call(self, path: str, node: fx.Node) -> None:
        self._calls[path] = self._calls.get(path, 0) + 1
        self.module_outputs[path] = self.module_outputs[f"{path}:{self._calls[path]}"] = node

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


SIZE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}  # what an example's sizes and kind answer


class _ForwardFailed(Exception):
    """The example input made an op of the forward fail: a bad input, not an untraceable model."""


class _SizedProxy(fx.Proxy):
    def __len__(self) -> int:
        return len(self.tracer.values[self.node])


class _ConcreteTracer(_RecordingTracer):
    """Traces with an example input alongside: every node's value is computed as it is
    added, and sizes (x.size(), x.shape, x.dim(), len(x), and arithmetic on them) come back
    as plain numbers, so Python code that branches or loops on them runs as it would.
    Branching on the values themselves still fails, as it must."""

    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool | None], example: torch.Tensor):
        super().__init__(is_rule_leaf)
        self.example = example
        self.values: dict[fx.Node, Any] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, *rest, **options) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, *rest, **options)
        if kind == "get_attr" and node not in self.values:  # a tensor attribute fx read without a proxy
            with untraced():
                self.values[node] = attribute_at(self.root, target)
        return node

    def _sizes_as_numbers(self, a):
        if isinstance(a, fx.proxy.Attribute):
            root = self._sizes_as_numbers(a.root)
            if not isinstance(root, fx.Proxy):  # an attribute of a size or a device: x.device.type
                return getattr(root, a.attr)
            if a.attr in SIZE_ATTRIBUTES:
                return getattr(self.values[root.node], a.attr)
        return a

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._sizes_as_numbers)
        value = None
        if kind in ("call_function", "call_method") and not _holds_proxy((args, kwargs)):
            value = _call(kind, target, args, kwargs)
            if not isinstance(value, torch.Tensor):
                return value  # arithmetic on sizes: a number, not a node
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        node = proxy.node
        self.values[node] = self._evaluate(node) if value is None else value  # a tensor made from sizes: computed above
        if kind == "call_method" and target in SIZE_METHODS:
            self.graph.erase_node(node)
            return self.values.pop(node)
        return proxy

    def _evaluate(self, node: fx.Node):
        if node.op == "placeholder":  # the first input; an optional argument's default; another is refused later
            return self.example if not self.values else (node.args[0] if node.args else None)
        if node.op not in ("get_attr", "call_function", "call_method", "call_module"):
            return None
        # fx patches module calls and attribute reads while tracing (a read of a parameter makes
        # a get_attr node, which would come back here): run and read the real ones
        with _untraced():
            if node.op == "get_attr":
                return attribute_at(self.root, node.target)
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
            target = self.root.get_submodule(node.target) if node.op == "call_module" else node.target
            if node.op == "call_module":
                _check_initialised(target, node.target)
            return _call(node.op, target, args, kwargs)


def _check_initialised(module: nn.Module, path: str, recurse: bool = True) -> None:
    """A lazy module a trace is about to run (``recurse``: its submodules too) or go through:
    it would be given random weights, by its own pre-hook, from the trace's example."""
    for name, t in itertools.chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse)):
        if nn.parameter.is_lazy(t):
            raise not_initialised(f"{path}.{name}" if path else name)


# fx's own context manager for running real code in the middle of a trace (private, so checked:
# without it, forwards that branch on sizes are refused as before)
_untraced = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)


def untraced():
    """Real code in the middle of a trace: modules called and attributes read as they are."""
    return _untraced() if _untraced is not None else contextlib.nullcontext()


def _holds_proxy(a) -> bool:
    found = []
    fx.node.map_aggregate(a, lambda v: found.append(v) if isinstance(v, fx.Proxy) else v)
    return bool(found)


def _call(kind: str, target, args, kwargs):
    try:
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)  # a function, or a module (called with its hooks, as the forward does)
    except _ForwardFailed:  # an op inside a module called here: said once, not once per level
        raise
    except Exception as exc:
        raise _ForwardFailed(_first_line(exc)) from None


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class UntraceableModelError(UnsupportedModelError):
    """The model's forward (or a module on the relevance path) could not be traced symbolically."""


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block, every module's own mode restored after it. RSP
    explains the model as it predicts: BatchNorm on its running statistics, no dropout, no
    stochastic depth; fx writes ``self.training`` into the graph as a constant, so tracing
    too must run in this block. Blocks of several threads on one model share the switch: the
    modes come back when the last one ends (not while another thread's pass still runs)."""
    def to_eval():
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        return modes

    def restore(modes):
        if modes[0][1]:  # a train() of the model's own may set more than flags (a cache it keeps in eval mode)
            model.train()
        for m, mode in modes:
            m.training = mode

    with SETTINGS.held(("modes", id(model)), "eval", to_eval, restore):  # the model lives while inside
        yield model


class _TraceGate:
    """torch.fx patches nn.Module.__call__ and __getattr__ for the whole process while it
    traces: a forward pass that runs meanwhile in another thread goes through the patches (into
    the graph, or into an error), and two traces that overlap restore them in the wrong order,
    leaving every model of the process broken. So traces run one at a time, and rsp_fast's own
    forward passes (``forward``) wait for a trace, which waits for them; a thread's own pass and
    trace never wait for each other. Models that other code runs during a trace it cannot hold."""

    def __init__(self):
        self._changed = threading.Condition()
        self._tracer: int | None = None  # the thread tracing
        self._passes = 0  # forward passes running, all threads
        self._traces_waiting = 0  # passes yield to them: a stream of passes cannot hold a trace off
        self._mine = threading.local()  # this thread's passes running

    @contextlib.contextmanager
    def trace(self):
        me = threading.get_ident()
        with self._changed:
            nested = self._tracer == me
            if not nested:
                own = getattr(self._mine, "passes", 0)
                self._traces_waiting += 1
                self._changed.wait_for(lambda: self._tracer is None and self._passes == own)
                self._traces_waiting -= 1
                self._tracer = me
        try:
            yield
        finally:
            if not nested:
                with self._changed:
                    self._tracer = None
                    self._changed.notify_all()

    @contextlib.contextmanager
    def forward(self):
        me = threading.get_ident()
        with self._changed:
            own = getattr(self._mine, "passes", 0)
            if self._tracer != me and own == 0:
                self._changed.wait_for(lambda: self._tracer is None and self._traces_waiting == 0)
            self._passes += 1
            self._mine.passes = own + 1
        try:
            yield
        finally:
            with self._changed:
                self._passes -= 1
                self._mine.passes -= 1
                self._changed.notify_all()


TRACE_GATE = _TraceGate()


def unwrap(model: nn.Module, layer=None):
    """The module a wrapper runs unchanged (torch.compile's OptimizedModule, DataParallel,
    DistributedDataParallel), and a layer name given relative to the wrapper made relative to
    it; a TorchScript module, which fx cannot read, is refused by name."""
    while True:
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(f"{type(model).__name__} is a TorchScript module, which torch.fx cannot read: "
                                        "pass the nn.Module it was scripted or traced from")
        if any(c.__module__.startswith("torch.export") for c in type(model).__mro__):
            raise UnsupportedModelError("the model is a torch.export module (ExportedProgram.module()): its graph holds "
                                        "ATen ops, not the layers rsp_fast has rules for, and it cannot switch to eval "
                                        "mode: pass the nn.Module it was exported from")
        wrapped = _wrapped(model)
        if wrapped is None:
            return model, layer
        model, prefix = wrapped
        if isinstance(layer, str) and layer.startswith(prefix):
            layer = layer[len(prefix):]


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """The model and every module it wraps unchanged, outermost first."""
    chain = [model]
    while (wrapped := _wrapped(chain[-1])) is not None:
        chain.append(wrapped[0])
    return chain


def _wrapped(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module a wrapper runs and the prefix its path gets, or None for a plain module."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod, "_orig_mod."
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module, "module."
    return None


_MISSING = object()


@contextlib.contextmanager
def attributes_kept(model: nn.Module):
    """Puts back what tracing wrote onto the model's modules: an fx Proxy a forward or a forward
    pre-hook set (``torch.nn.utils.prune``'s ``weight``; it broke the model until its next real
    forward), a value a forward worked out from one input's sizes (it would make the plans of
    other shapes look stale), and the tensors fx keeps on the model as ``_tensor_constantN``, a
    new one per trace (the graph reads them from its nodes)."""
    restore = _attributes_restorer(model)
    try:
        yield
    finally:
        restore()


def _attributes_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts the attributes of the model's modules back as they are now, and a
    buffer the forward set to an fx Proxy (``self.count += 1``; a buffer or module it creates
    itself stays: the graph reads it)."""
    before = {id(m): (dict(m.__dict__), dict(m._buffers)) for m in model.modules()}

    def restore() -> None:
        for m in model.modules():
            if id(m) not in before:
                continue
            old, old_buffers = before[id(m)]
            now = m.__dict__
            for name in [n for n in now if n not in old]:
                del now[name]
            for name, value in old.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value
            for name, value in list(m._buffers.items()):
                if isinstance(value, fx.Proxy):
                    if name in old_buffers:
                        m._buffers[name] = old_buffers[name]
                    else:
                        del m._buffers[name]
    return restore


def trace(model: nn.Module, is_rule_leaf: Callable[[nn.Module], bool | None],
          example: torch.Tensor | None = None) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """The model's fx graph and, per module path, the node holding that module's output.
    With ``example``, traced with sizes as numbers: the graph holds for that input shape only."""
    if example is not None and _untraced is None:
        raise UnsupportedModelError(f"could not trace {type(model).__name__} with torch.fx: its forward branches on "
                                    "sizes, which needs torch.fx._symbolic_trace._maybe_revert_all_patches")
    def tracer() -> _RecordingTracer:
        return _RecordingTracer(is_rule_leaf) if example is None else _ConcreteTracer(is_rule_leaf, example.clone())
    root = _Caller(model) if called_by_a_caller(model) else model
    try:
        # not under a caller's inference_mode: fx keeps tensors the forward makes as constants of the
        # graph, and the head between the saliency layer and the logits runs them with autograd
        with torch.inference_mode(False), torch.no_grad(), TRACE_GATE.trace(), attributes_kept(model):
            attributes = {*root.__dict__, *root._buffers, *root._parameters}  # a GraphModule's own constants are buffers
            tracer, graph = _traced(tracer, root)
            for node in graph.nodes:  # read while fx's constants are still on the model
                if node.op == "get_attr":
                    node.meta[ATTR_VALUE] = attribute_at(root, node.target)
                    node.meta[FX_CONSTANT] = node.target not in attributes and node.target.startswith(CONSTANT_PREFIX)
        if root is not model:
            tracer.module_outputs = _paths_in_model(graph, tracer.module_outputs)
        _drop_fixed_arguments(graph)
        _max_values_as_amax(graph)
        _follow_in_place_writes(graph, model)
        _names_apart_from_modules(graph, tracer.module_outputs)
    except _ForwardFailed as exc:
        raise RSPError(f"the model's forward failed on inputs of shape {tuple(example.shape)}: {exc}") from None
    except RSPError:  # said in one line already (a lazy module the trace would run)
        raise
    except Exception as exc:  # fx raises many types; the user needs one clear message
        error = UntraceableModelError if example is None else UnsupportedModelError
        needs = ("its forward writes into an activation by index (h[:, :4] = v), which torch.fx cannot trace: write "
                 "it as torch.cat of the parts or with a mask (h * mask)" if "does not support item assignment" in str(exc)
                 else "rsp_fast needs a model whose forward branches only on sizes, not on values, outside its leaf modules")
        raise error(f"could not trace {type(model).__name__} with torch.fx ({_first_line(exc)}); {needs}") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"rsp_fast explains models with exactly one input; {type(model).__name__}.forward takes "
            f"{len(placeholders)} ({', '.join(n.name for n in placeholders)})"
        )
    return graph, tracer.module_outputs


def _traced(make_tracer: Callable[[], _RecordingTracer], root: nn.Module) -> tuple[_RecordingTracer, fx.Graph]:
    """The tracer and its graph, buffers read as nodes; or, where the forward branches on a
    buffer's values or sizes (``if self.enabled:``, ``range(self.table.shape[0])``), as the
    tensors they are when traced, as fx reads them by default."""
    tracer, restore = make_tracer(), _attributes_restorer(root)
    try:
        return tracer, tracer.trace(root, concrete_args=_defaults(root))
    except _ForwardFailed:
        raise
    except Exception:
        restore()  # what the failed trace wrote onto the modules
        tracer = make_tracer()
        tracer.proxy_buffer_attributes = False
        return tracer, tracer.trace(root, concrete_args=_defaults(root))


class _Caller(nn.Module):
    """Calls the model as ``model(x)`` does: the root fx traces for a forward that takes
    ``*args`` or ``**kwargs`` (a decorator's ``wrapper(self, *args, **kwargs)``, as Hugging
    Face's ``can_return_tuple``), which fx would trace as placeholders of their own (one tuple,
    not the input; a dict it cannot hand over empty), and for a forward set on the instance,
    which fx would not read (it traces the class's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def called_by_a_caller(model: nn.Module) -> bool:
    """Whether the model is traced as a ``_Caller``'s child (so its own hooks run, too): its
    forward takes ``*args`` or ``**kwargs``, or was set on the instance (fx reads the class's),
    or its class calls it its own way (a ``__call__`` that preprocesses the input)."""
    code = getattr(type(model).forward, "__code__", None)
    takes_stars = code is not None and bool(code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS))
    return takes_stars or "forward" in model.__dict__ or type(model).__call__ is not nn.Module.__call__


def _names_apart_from_modules(graph: fx.Graph, module_outputs: dict[str, fx.Node]) -> None:
    """A function's node named like a module the forward calls (``relu_2`` for the third
    F.relu, beside a module ``relu_2``) renamed ``relu_2_fn``: a name in ``explainer.layer``,
    ``layer=`` and ``record=True``'s steps stands for one thing."""
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and node.name in module_outputs:
            name = f"{node.name}_fn"
            while name in module_outputs:
                name += "_"
            node._rename(name)


def _paths_in_model(graph: fx.Graph, module_outputs: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """A graph traced from a ``_Caller`` with its module paths made the model's own."""
    prefix = "model."
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target.startswith(prefix):
            node.target = node.target[len(prefix):]
        stack = node.meta.get("nn_module_stack")
        if stack:  # where errors say a call is
            node.meta["nn_module_stack"] = {k: (v[0][len(prefix):],) + tuple(v[1:]) for k, v in stack.items()
                                            if isinstance(v, tuple) and str(v[0]).startswith(prefix)}
    return {path[len(prefix):]: node for path, node in module_outputs.items() if path.startswith(prefix)}


def _defaults(model: nn.Module) -> dict | None:
    """The forward's optional arguments (``forward(x, return_features=False)``) at their
    defaults, as ``model(x)`` runs them: fx then traces the branch they take."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} or None


def _max_values_as_amax(graph: fx.Graph) -> None:
    """``x.max(d).values`` and ``torch.max(x, d)[0]`` (max over time in text CNNs) as
    ``torch.amax(x, d)``, one op with a rule (a max pooling), where the indices go unused
    (``values, _ = x.max(d)`` picks them into a node nothing reads)."""
    for node in list(graph.nodes):
        if not ((node.op == "call_method" and node.target == "max") or (node.op == "call_function" and node.target is torch.max)):
            continue
        call = dict(zip(("input", "dim", "keepdim"), node.args)) | dict(node.kwargs)
        used = [u for u in node.users if u.users or not (u.op == "call_function" and u.target is operator.getitem)]
        if not isinstance(call.get("dim"), int) or not used or not all(_picks_values(u, node) for u in used):
            continue
        with graph.inserting_before(node):
            amax = graph.call_function(torch.amax, (call["input"], call["dim"], bool(call.get("keepdim", False))))
        amax.meta.update(node.meta)  # where errors say the call is
        for user in list(node.users):
            user.replace_all_uses_with(amax)
            graph.erase_node(user)
        graph.erase_node(node)


def _picks_values(user: fx.Node, node: fx.Node) -> bool:
    return user.op == "call_function" and ((user.target is getattr and tuple(user.args) == (node, "values"))
                                           or (user.target is operator.getitem and tuple(user.args) == (node, 0)))


def _drop_fixed_arguments(graph: fx.Graph) -> None:
    """fx keeps an argument fixed by ``concrete_args`` as a placeholder checked by an assert;
    RSP passes only the input, so both go (the value is already written into the graph)."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if not node.args:  # no default: a second input, refused by the caller
            continue
        for check in list(node.users):  # _assert_is_none(arg), or _assert(arg == value)
            asserts = [check] if _is_assert(check) else list(check.users) if check.target is operator.eq else []
            if asserts and all(_is_assert(a) for a in asserts):
                for a in asserts:
                    graph.erase_node(a)
                if check.target is operator.eq:
                    graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)


def _follow_in_place_writes(graph: fx.Graph, model: nn.Module) -> None:
    """fx records ``out.add_(x)``, ``x.relu_()``, ``F.relu(x, inplace=True)`` or an in-place
    module called as a statement as a node of their own, while the code after them reads the
    tensor they wrote through its old name. RSP's forward runs every op out of place (the rules
    need the values from before the write), so the nodes after such a write are made to read the
    write's node: the graph then computes what the model computes, and relevance goes through
    the write (the residual of ``out.add_(x)``). In-place functions become their out-of-place
    twins (``F.relu_`` -> ``F.relu``), which the rules know. (``a += b`` rebinds ``a`` to its
    own node already; another name for ``a`` taken before it is not followed, as it would be
    wrong for numbers, nor is a view of a written tensor.)"""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _writes_in_place(node, model):
            continue
        written = node.args[0] if node.args else None
        if isinstance(written, fx.Node):
            for user in list(written.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(written, node)
        if node.op == "call_function":
            _make_out_of_place(node)


def _writes_in_place(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    if name.endswith("_") and not name.endswith("__"):
        return True
    return node.op == "call_function" and _inplace_argument(node) is True


def _inplace_position(node: fx.Node) -> int | None:
    """Where a function call passes its ``inplace`` parameter by position, if it does."""
    try:
        parameters = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    position = parameters.index("inplace") if "inplace" in parameters else None
    return position if position is not None and position < len(node.args) else None


def _inplace_argument(node: fx.Node):
    """The value of a function call's ``inplace`` parameter, given by name or by position."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"]
    position = _inplace_position(node)
    return node.args[position] if position is not None else None


def _make_out_of_place(node: fx.Node) -> None:
    name = getattr(node.target, "__name__", "")
    if name.endswith("_"):
        twin = getattr(torch.nn.functional, name[:-1], None) or getattr(torch, name[:-1], None)
        if callable(twin):
            node.target = twin
    elif _inplace_argument(node) is True:
        position = _inplace_position(node)
        if position is not None:
            node.args = node.args[:position]
        node.kwargs = {**node.kwargs, "inplace": False}


def _is_assert(node: fx.Node) -> bool:
    return getattr(node.target, "__name__", None) in ("_assert", "_assert_is_none")


def attribute_at(model: nn.Module, path: str):
    value = model
    for name in path.split("."):
        value = getattr(value, name, None)
    return value

