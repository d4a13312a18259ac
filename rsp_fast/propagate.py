"""One RSP pass over a plan: a recording forward, then relevance walked back to the input.

The forward runs the traced graph on the original modules (the model is never edited)
with in-place ops made out-of-place, keeps only the values the rules need, and runs the
head (saliency layer -> logits) with autograd so the initial relevance needs no second pass.
"""
from __future__ import annotations

import operator
import threading
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

from .errors import RSPError
from .graph.head import scores_over_classes
from .graph.plan import Plan
from .graph.trace import ATTR_VALUE, FX_CONSTANT, TRACE_GATE, attributes_kept
from .rules import Context
from .rules.base import LayerRule, hooked_input_key
from .rules.pool import indices_key, max_pool_with_indices

_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


# RSP's rules run in float32 when the model computes in half precision: float16 cannot even
# hold the rules' 1e-9 stabilisers, and bfloat16's 8-bit mantissa would blur conservation.
# (precision="bf16" still runs the matrix products in bfloat16.)
_WORK_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RSP's rules compute in for a forward pass in ``dtype``."""
    return _WORK_DTYPES.get(dtype, dtype)


def _to_work(value: Any) -> Any:
    return value.to(work_dtype(value.dtype)) if isinstance(value, torch.Tensor) else value


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling the module runs forward hooks (its own or the global ones)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _one_sample_gradient(grad: torch.Tensor) -> torch.Tensor:
    """A gradient of one sample, contiguous. torch 2.14's CPU BatchNorm and InstanceNorm backward
    (eval mode, at batch 1) get the input gradient wrong (3.4 off a peak of 2.8) for a
    (1, C, H, W) gradient with strides (C, 1, W·C, C), as einsum's backward makes, and
    InstanceNorm also for a channels-last one, as a conv's or a permute's backward makes in a
    channels-last model: R₀ at batch 1 was not that sample's R₀ in a batch."""
    return grad if grad.is_contiguous() else grad.contiguous()


class _Recorder(fx.Interpreter):
    def __init__(self, model: torch.nn.Module, plan: Plan):
        super().__init__(model, graph=plan.graph)
        self.plan = plan
        self.saved: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, torch.Size] = {}
        self.saliency_value: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # the class scores before a final softmax, if the plan names them
        self.index_pools = {s.node for s in plan.steps if getattr(s, "records_indices", False)}
        self.constants = {n.target: n.meta[ATTR_VALUE] for n in plan.graph.nodes if n.meta.get(FX_CONSTANT)}
        self.layer_modules = {s.node: s.module for s in plan.steps if isinstance(s, LayerRule) and s.node.op == "call_module"}
        self.running: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.running = n  # named if the forward fails here
        with torch.set_grad_enabled(n in self.plan.head):
            if n in self.index_pools:  # the max pool, and where its maxima are, for its rule
                args, _ = self.fetch_args_kwargs_from_env(n)
                pool = self.fetch_attr(n.target)
                out, self.saved[indices_key(n)] = max_pool_with_indices(pool, args[0])
                if has_hooks(pool):  # the module itself, as model(x) runs it: its hooks may change the output
                    out = super().run_node(n)
            elif n in self.layer_modules and (self.layer_modules[n]._forward_pre_hooks
                                              or torch_module._global_forward_pre_hooks):
                out = self._run_keeping_hooked_input(n, self.layer_modules[n])
            else:
                out = super().run_node(n)
        if n is self.plan.saliency:  # R₀'s maps come from this leaf, in the rules' dtype
            self.saliency_value = _to_work(out.detach()).requires_grad_()
            with torch.enable_grad():
                out = self.saliency_value.to(out.dtype)  # the head runs in the model's dtype
        if isinstance(out, torch.Tensor):
            self.shapes[n] = out.shape
            if out.grad_fn is not None and out.dim() > 2 and out.shape[0] == 1 and n in self.plan.head:
                out.register_hook(_one_sample_gradient)  # computed in the head (not a parameter: hooks stay off the model)
        if n is self.plan.scores:
            self.scores = out
        if n in self.plan.saved:
            self.saved[n] = _to_work(out.detach() if isinstance(out, torch.Tensor) else out)
        return out

    def pass_output(self, output: Any) -> Any:
        """What the pass reads the logits from: the class scores before a final softmax the plan
        names, else the forward's output."""
        if self.scores is not None and scores_over_classes(self.plan.scores_dim, self.scores.dim()):
            return self.scores
        return output

    def _run_keeping_hooked_input(self, n: fx.Node, module: nn.Module) -> Any:
        """Run a layer whose forward pre-hooks may change its input (a mask), keeping the input
        they give it for its rule: the saved value of the input node is not what it computed with."""
        given, thread = {}, threading.get_ident()

        def keep(_, args, kwargs):  # registered last, it runs after the model's own pre-hooks
            x = args[0] if args else kwargs.get("input")  # conv(input=h) too
            if threading.get_ident() == thread and isinstance(x, torch.Tensor):
                given["x"] = x
        handle = module.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = super().run_node(n)
        finally:
            handle.remove()  # the model's hooks as they were
        source = n.args[0] if n.args else n.kwargs.get("input")
        before = self.env.get(source) if isinstance(source, fx.Node) else None
        if "x" in given and given["x"] is not before:
            if before is None or given["x"].shape != before.shape:
                raise RSPError(f"a forward pre-hook on {n.target} changes the shape of its input ("
                               f"{tuple(before.shape) if before is not None else '?'} -> {tuple(given['x'].shape)}), "
                               "which RSP cannot send relevance back through: do it in the forward")
            self.saved[hooked_input_key(n)] = _to_work(given["x"].detach())
        return out

    def get_attr(self, target, args, kwargs):
        if target in self.constants:  # fx's constants live in the graph, not on the model
            return self.constants[target]
        return super().get_attr(target, args, kwargs)

    # In-place ops would overwrite values the rules read later: run them out of place.
    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if getattr(module, "inplace", False) and args and isinstance(args[0], torch.Tensor):
            if has_hooks(module):  # the module itself, hooks and all
                return super().call_module(target, (args[0].clone(),) + tuple(args[1:]), kwargs)
            if type(module) is nn.ReLU:  # the out-of-place op directly: no copy first
                return torch.relu(args[0])
            if isinstance(module, nn.Hardtanh):  # ReLU6 included
                return F.hardtanh(args[0], module.min_val, module.max_val)
            args = (args[0].clone(),) + tuple(args[1:])
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        target = _INPLACE_FUNCTIONS.get(target, target)
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target.endswith("_") and not target.endswith("__") and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        return super().call_method(target, args, kwargs)


def _where(model: torch.nn.Module, node: fx.Node | None) -> str:
    """Where in the forward a node runs, for an error message: its module's path and type, or the function's name."""
    if node is None or node.op in ("placeholder", "output"):
        return ""
    if node.op == "call_module":
        return f" in module '{node.target}' ({type(model.get_submodule(node.target)).__name__})"
    return f" at '{node.name}'"


def logits_of(output):
    """The logits in a model's output: the tensor itself, or the ``logits`` of an output object
    (Hugging Face's ModelOutput, an OrderedDict that fx hands back as a dict; a named tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    inner = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return inner if isinstance(inner, torch.Tensor) else output


def class_scores(output) -> torch.Tensor:
    """The (N, classes) logits in a model's output (a fully convolutional head's (N, classes, 1, 1)
    flattened), or an RSPError saying what the output is instead."""
    logits = logits_of(output)
    if isinstance(logits, torch.Tensor) and logits.dim() > 2 and all(n == 1 for n in logits.shape[2:]):
        logits = logits.flatten(1)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and not logits.is_floating_point():
        raise RSPError(f"the model must return floating-point logits, not {logits.dtype} (class scores that "
                       "relevance can be a share of)")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        kind = next((name for name, t in (("dict", dict), ("tuple", tuple), ("list", list)) if isinstance(logits, t)),
                    type(logits).__name__)  # fx hands a list back as its own immutable_list
        shape = f", not {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else f", not a {kind}"
        raise RSPError(f"the model must return logits of shape (N, classes){shape}"
                       + ("" if isinstance(logits, torch.Tensor) else " (or an output whose 'logits' is that tensor): "
                          "explain a module whose forward returns the logits alone, e.g. model(x)[0] or model(x)['out']"))
    if logits.shape[1] == 0:
        raise RSPError(f"the model returns logits of shape {tuple(logits.shape)}: no class to explain")
    return logits


# how far the traced forward's logits may be from model(x)'s (of their largest magnitude): the
# same ops in the same order agree to the last bit on a CPU; GPUs may pick other algorithms
FORWARD_TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 3e-2}
FORWARD_TOLERANCE_DEFAULT = 1e-3


class _AutocastSeen(TorchFunctionMode):
    """Notes the dtype of an autocast the model's forward enters itself: fx does not see it (a
    ``with`` block), so the traced pass computes in the model's dtype and the logits differ by
    that dtype's rounding, which is not a part of the forward left out."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type, self.dtype = device_type, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.dtype is None and torch.is_autocast_enabled(self.device_type):
            self.dtype = torch.get_autocast_dtype(self.device_type)
        return func(*args, **(kwargs or {}))


def _check_forward(model: torch.nn.Module, traced, x: torch.Tensor) -> None:
    """Refuse a model whose traced forward does not compute what calling it does: what fx cannot
    see (a torchvision.transforms.v2 transform, torch.func.functional_call's parameters, an
    overridden ``__call__``) would otherwise be left out of the explanation silently."""
    if has_hooks(model) or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # the model's own hooks do not run in the traced pass (RSP warns); a capture cannot wait
    if any(type(m).__name__ == "OptimizedModule" for m in model.modules()):
        return  # a submodule compiled alone: calling it would compile it (slow), its guards may miss hooks added since
    got = logits_of(traced)
    try:  # without grad first: no autograd graph of the whole model beside what the pass keeps
        gap = _gap_to_model(model, x, got, grad=False)
    except Exception:  # e.g. a hook that registers a tensor hook on its output: tried with grad
        gap = "failed"
    if gap is not None:  # as the traced pass runs the head, with grad (no fused inference paths either)
        gap = _gap_to_model(model, x, got, grad=True)
    if gap is not None:
        raise RSPError(gap)


def values_apart(expected: torch.Tensor, got: torch.Tensor, tolerance: float) -> tuple[float, float, bool] | None:
    """None where ``got`` is ``expected`` to ``tolerance`` of its largest finite magnitude, with
    NaN and Inf in the same places; else (largest finite difference, that magnitude, whether the
    NaN and Inf are alike)."""
    expected, got = expected.detach().double(), got.detach().double()
    finite = torch.isfinite(expected)
    alike = torch.equal(finite, torch.isfinite(got)) and torch.equal(expected[~finite].nan_to_num(), got[~finite].nan_to_num())
    scale = expected[finite].abs().amax().item() if finite.any() else 0.0
    gap = (got[finite] - expected[finite]).abs().amax().item() if finite.any() else 0.0
    if alike and gap <= tolerance * scale + torch.finfo(torch.float64).tiny:
        return None
    return gap, scale, alike


def _gap_to_model(model: torch.nn.Module, x: torch.Tensor, got, grad: bool) -> str | None:
    """None if model(x)'s logits are the traced ``got`` (to their dtype's tolerance), else why not."""
    autocast = _AutocastSeen(x.device.type)
    # on a copy: a forward that writes its input in place must not change the caller's tensor, which the rules read
    with attributes_kept(model), torch.set_grad_enabled(grad), autocast:  # attributes: this call was not the user's
        expected = logits_of(model(x.clone()))
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
        return None  # no logits to compare: the pass names what it needs
    if got.shape != expected.shape:
        return (f"the traced forward gives logits of shape {tuple(got.shape)}, model(x) {tuple(expected.shape)}: "
                "part of the forward is not seen by torch.fx (see README, Limits)")
    tolerance = FORWARD_TOLERANCE.get(autocast.dtype or expected.dtype, FORWARD_TOLERANCE_DEFAULT)
    apart = values_apart(expected, got, tolerance)  # NaN or Inf where model(x) has them (an overflow): named later
    if apart is None:
        return None
    gap, scale, _ = apart
    return (f"the traced forward's logits are {gap:.3g} from model(x)'s (of {scale:.3g}): part of the "
            "forward is not seen by torch.fx — e.g. an in-place op (y += …, y.add_(…)) on a tensor the forward "
            "also reads under another name or through a view (write y = y + … instead), a "
            "torchvision.transforms.v2 transform in the model, torch.func.functional_call, or a __call__ that "
            "does more than forward; do that outside the model, on its input (or the forward is random in eval "
            "mode: no map explains it)")


def record_forward(model: torch.nn.Module, plan: Plan, x: torch.Tensor, check_forward: bool = False):
    """Run the model; returns (logits — the scores before a final softmax or sigmoid —, saliency
    activation A with grad to logits, context pieces).
    A forward that fails (inputs of the wrong shape for the model) raises an RSPError saying so;
    ``check_forward``: also one whose traced logits are not model(x)'s (``_check_forward``)."""
    rec = _Recorder(model, plan)
    try:
        with torch.no_grad(), TRACE_GATE.forward():  # not while torch.fx patches modules in another thread
            logits = rec.run(x)
            if check_forward:
                _check_forward(model, logits, x)
    except RSPError as exc:  # raised by the recorder itself: without what fx appends ("While executing ...")
        exc.args = (str(exc).split("\n\nWhile executing")[0],)
        raise
    except (torch.OutOfMemoryError, MemoryError):  # out of memory is not a bad input: a smaller batch may do
        raise
    except Exception as exc:
        reason = str(exc).split("\n\nWhile executing")[0].strip()  # fx appends the graph node and its traceback
        raise RSPError(f"the model's forward failed on inputs of shape {tuple(x.shape)}{_where(model, rec.running)}: "
                       f"{reason}") from None
    return rec.pass_output(logits), rec.saliency_value, rec.saved, rec.shapes


def _like_saved_input(R: torch.Tensor, step, saved) -> torch.Tensor:
    """R in the dtype of the rule's saved input: a forward that computes a part in another dtype
    (a pool run in float32 in a float64 model, cast back) sends relevance out of that part in its dtype."""
    x = saved.get(step.inputs[0]) if step.inputs else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != R.dtype:
        return R.to(x.dtype)
    return R


def propagate(plan: Plan, R0: torch.Tensor, saved, shapes, ops, on_step: Callable | None = None,
              dropped: torch.Tensor | None = None, product_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Walk R0 from the saliency layer back to the input; fan-out contributions are summed.
    ``dropped`` (N,), if given, accumulates the relevance lost at unsupported positions."""
    def resolve(a):
        return fx.node.map_arg(a, lambda n: saved[n])

    ctx = Context(values=saved, shapes=shapes, ops=ops, resolve=resolve, dropped=dropped, product_dtype=product_dtype)
    relevance: dict[fx.Node, torch.Tensor] = {plan.saliency: R0}
    with torch.no_grad():
        for step in plan.steps:
            R = _like_saved_input(relevance.pop(step.node), step, saved)
            outs = step.propagate(ctx, R)
            for node, r in zip(step.inputs, outs):
                relevance[node] = relevance[node] + r if node in relevance else r
            if on_step is not None:
                on_step(step, outs)
    return relevance[plan.input]
