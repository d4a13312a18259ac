"""The public API: ``RSP(model, layer=...).attribute(inputs, target=...)``, Captum-style."""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import RSPError, UnsupportedModelError, not_initialised
from .graph.plan import Plan, build_plan, layer_name, step_path
from .graph.trace import TRACE_GATE, UntraceableModelError, called_by_a_caller, eval_mode, unwrap, wrapper_chain
from .init import initial_relevance
from .ops.dispatch import resolve_backend_name, select_kernels
from .propagate import class_scores, propagate, record_forward, work_dtype
from .rules.base import LayerRule, power_of_two
from .samples_apart import check_samples_apart, samples_alone
from .shared_setting import SETTINGS
from .tf32 import restore_tf32, set_tf32

if TYPE_CHECKING:
    from .static import StaticRSP

INITS = ("comparative", "gradcam")
PRECISIONS = ("fp32", "tf32", "bf16")
MAX_SHAPE_PLANS = 8  # plans kept for models traced per input shape (see RSP._plan_for)
MAX_FORWARD_CHECKS = 16  # input shapes on which a plan's traced forward is checked against model(x) (once each)


@dataclass
class Explanation:
    """Everything one RSP call computed, per sample."""

    attribution: torch.Tensor  # relevance at the input, shaped like it
    initial: torch.Tensor  # R₀ at the saliency layer
    logits: torch.Tensor
    target: torch.Tensor  # (N,)
    hostile: torch.Tensor  # (N, K); K = 0 for the gradcam init
    cams: torch.Tensor  # normalised Grad-CAM maps without channel sum, target first
    layer: str
    steps: dict[str, torch.Tensor] = field(default_factory=dict)  # with record=True: relevance at each rule's input
    dropped: torch.Tensor | None = None  # with record=True: (N,) relevance lost at inputs with no support


class RSP:
    """Relative Sectional Propagation (Nam, Choi, Lee, AAAI 2021) for an unmodified model.

    Args:
        model: a traceable ``nn.Module`` (VGG, ResNet, MobileNet, EfficientNet-Lite, plain CNNs, MLPs).
        layer: saliency layer as a module name from ``model.named_modules()`` or the module itself;
            None picks the last spatial feature map before global pooling/flatten (VGG: the last
            ReLU before the last max-pool; ResNet: ``layer4``; MLP: the input of the last Linear).
        init: ``"comparative"`` (target against ``hostile_k`` hostile classes) or ``"gradcam"``.
        hostile_k: number of hostile classes (top predictions other than the target) by default.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``; None (the
            default) reads ``RSP_FAST_BACKEND``, and without it takes ``"auto"``.
        precision: ``"fp32"`` (everything in the input's dtype; on CUDA TF32 off), ``"tf32"``
            (CUDA: TF32 tensor cores for the forward pass and the products) or ``"bf16"`` (the
            products' operands in bfloat16; on CPU the compiled float32 kernels keep the layers
            they run faster); the normalisation and the purge always run in the input's dtype.
        max_batch: the most samples one pass takes; larger inputs run in chunks of this size
            (samples are independent, so the result is the same: bounds the memory a call
            needs). None: the whole batch.

    A model in training mode is explained in eval mode and restored afterwards; the model,
    its parameters, hooks and gradients are never changed. Explainers can be built and called
    from several threads at once (README, Limits: what torch.fx's tracing holds back).
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, init: str = "comparative",
                 hostile_k: int = 3, backend: str | None = None, precision: str = "fp32", max_batch: int | None = None):
        if not isinstance(model, nn.Module):
            raise RSPError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self._given = model  # a wrapper's module may be replaced later (dp.module = other): followed at each call
        model, layer = unwrap(model, layer)  # torch.compile and DataParallel run the module as it is
        # hooks on a wrapper too: unwrapped, they are left behind
        hooked = next((m for m in wrapper_chain(self._given) if (m._forward_pre_hooks or m._forward_hooks)
                       and not (m is model and called_by_a_caller(m))), None)
        if hooked is not None:
            warnings.warn(f"hooks registered on the model itself ({type(hooked).__name__}) do not run in RSP's pass: "
                          "its forward is traced (hooks on its submodules do run); if a hook changes the input or "
                          "the output, apply that change outside the model", stacklevel=2)
        if init not in INITS:
            raise RSPError(f"init must be one of {INITS}, not {init!r}")
        if not isinstance(hostile_k, int) or isinstance(hostile_k, bool) or hostile_k < 0:
            raise RSPError(f"hostile_k must be a non-negative int, not {hostile_k!r}")
        if precision not in PRECISIONS:
            raise RSPError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise RSPError(f"max_batch must be a positive int or None, not {max_batch!r}")
        self.model, self.init, self.hostile_k, self.precision = model, init, hostile_k, precision
        self.max_batch = max_batch
        self.backend = resolve_backend_name(backend)
        self._layer, self._plans, self._plans_lock = layer, {}, threading.Lock()  # threads share the plans
        with eval_mode(model):  # traced as it predicts, whatever mode it is in now
            self._build_plan()
        if self.plan is None:  # _build_plan named it otherwise
            self.layer = layer_name(model, layer)  # None: chosen at the first call
        if self.backend != "auto":
            select_kernels(self.backend, _model_device(model))  # fail now, not mid-video

    def __getstate__(self) -> dict:
        """Copied or pickled without its plans (graphs traced from the model) and its lock: a
        copy traces its own model when restored."""
        return {k: v for k, v in self.__dict__.items() if k not in ("plan", "_plans", "_plans_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plans, self._plans_lock = {}, threading.Lock()
        with eval_mode(self.model):
            self._build_plan()

    def attribute(self, inputs: torch.Tensor, target=None, hostile=None, initial: torch.Tensor | None = None) -> torch.Tensor:
        """Relevance shaped like ``inputs``: positive for the target, negative for hostile evidence.
        ``initial``: a relevance of your own at the saliency layer, shaped like its output, to
        propagate instead of R₀ (the authors' ``model.RSP(R=...)``)."""
        return self.explain(inputs, target, hostile, initial=initial).attribution

    def explain(self, inputs: torch.Tensor, target=None, hostile=None, record: bool = False,
                initial: torch.Tensor | None = None) -> Explanation:
        """Like ``attribute`` but returns logits, classes, R₀ and, with ``record=True``, every rule's
        output and the relevance dropped at positions with no support (so that
        ΣR_input = ΣR₀ − dropped per sample, RSP_SPEC.md §3)."""
        self._check_inputs(inputs)
        if initial is not None:
            _check_initial(initial, inputs)
        N = inputs.shape[0]
        chunk = self.max_batch or N
        if N <= chunk:
            return check_finite(self._explain_checked(inputs, target, hostile, record, initial=initial))
        target, hostile = _per_sample(target, N, "target", 0), _per_sample(hostile, N, "hostile", 1)
        parts = []
        for i in range(0, N, chunk):
            if i:  # a model changed since the last chunk (another thread) is traced anew
                self._refresh_plan()
            parts.append(self._explain_checked(inputs[i:i + chunk], _rows(target, i, chunk), _rows(hostile, i, chunk),
                                               record, initial=_rows(initial, i, chunk)))
        return check_finite(_concatenate(parts))

    def _explain_checked(self, inputs: torch.Tensor, target, hostile, record: bool = False,
                         trusted_target: bool = False, initial: torch.Tensor | None = None) -> Explanation:
        """One pass on checked inputs. With ``hostile=None`` and either no target or a target
        tensor already checked (``trusted_target``) it never waits for the device, so a CUDA
        graph can capture it."""
        with on_device(inputs.device):
            return self._explain_on_device(inputs, target, hostile, record, trusted_target, initial)

    def _explain_on_device(self, inputs, target, hostile, record, trusted_target, initial) -> Explanation:
        self._follow_wrapper()
        ops = select_kernels(self.backend, inputs.device, work_dtype(inputs.dtype))
        # the forward too runs in the chosen precision: its activations feed R₀ and every rule;
        # R₀ needs autograd through the head, also when the caller is in inference mode; a
        # caller's autocast would run the rules' products in bf16/fp16 whatever ``precision`` says
        with eval_mode(self.model):  # traced as it predicts; before the pass, which a trace would wait for
            plan = self._current_plan(inputs)  # (_check_inputs, which every call runs first, traced a stale one anew)
        # the whole pass waits for a trace in another thread: torch.fx patches module attribute
        # reads process-wide while it traces, and the rules read weights
        with TRACE_GATE.forward(), eval_mode(self.model), _matmul_precision(self.precision, inputs.device), \
                torch.inference_mode(False), _autocast_off(inputs.device):
            if inputs.is_inference():
                inputs = inputs.clone()
            return self._pass(plan, inputs, target, hostile, ops, record, trusted_target, initial)

    def _follow_wrapper(self) -> None:
        """The module a wrapper given to RSP runs now, if another than when it was built."""
        inner = unwrap(self._given)[0] if self._given is not self.model else self.model
        if inner is not self.model:
            with self._plans_lock:
                self.model, self._plans = inner, {}
                with eval_mode(inner):
                    self._build_plan()

    def _build_plan(self) -> None:
        for module in self.model.modules():  # named as such, not as a layer without a rule
            _refuse_quantized(self.model, module)
        try:
            self.plan: Plan | None = build_plan(self.model, self._layer)
            self.layer = self.plan.layer_name
        except UntraceableModelError:
            # the forward branches on sizes: traced per input shape, with sizes as numbers,
            # at the first call with that shape (when unsupported layers are reported)
            self.plan = None

    def _refresh_plan(self) -> None:
        """The model traced anew where a submodule was replaced since its plan was made (before
        the inputs and the model's tensors are checked against it)."""
        if self.plan is not None and not self.plan.is_current():
            with self._plans_lock, eval_mode(self.model):
                if not self.plan.is_current():
                    self._build_plan()

    def _plan_for(self, inputs: torch.Tensor) -> Plan:
        """The plan a call on ``inputs`` runs, traced anew if the model changed since."""
        self._refresh_plan()
        return self._current_plan(inputs)

    def _current_plan(self, inputs: torch.Tensor) -> Plan:
        """The plan for ``inputs`` once the model's plan was refreshed (checking staleness walks
        every module, about a millisecond on EfficientNet-B0: a call does it once, in _check_inputs)."""
        if self.plan is not None:
            return self.plan
        key = (tuple(inputs.shape), inputs.dtype, inputs.device)
        with self._plans_lock:
            plan = self._plans.pop(key, None)  # re-inserted last: the least recently used plan goes first
            if plan is not None and not plan.is_current():
                plan = None
            if plan is None:
                if len(self._plans) >= MAX_SHAPE_PLANS:
                    self._plans.pop(next(iter(self._plans)))
                plan = build_plan(self.model, self._layer, example=inputs)
            self._plans[key] = plan
            self.layer = plan.layer_name
        return plan

    def _pass(self, plan, inputs, target, hostile, ops, record: bool, trusted_target: bool, initial=None) -> Explanation:
        key = (tuple(inputs.shape), inputs.dtype, inputs.device)
        check = key not in plan.forward_checked and len(plan.forward_checked) < MAX_FORWARD_CHECKS
        # a batch mixed where the plan cannot see it: batches of 2 or more, once per shape, counted apart
        apart = inputs.shape[0] > 1 and key not in plan.samples_checked and len(plan.samples_checked) < MAX_FORWARD_CHECKS
        alone = samples_alone(self.model, plan, inputs) if apart else None  # first: the model's hooks see the pass last
        output, A, saved, shapes = record_forward(self.model, plan, inputs, check_forward=check)
        if check:
            plan.forward_checked.add(key)
        plan.keep_what_the_pass_wrote(self.model)
        plan.check_batch_dims(shapes)  # a reduction or join along -k that is the batch's at these shapes
        logits = class_scores(output)
        if A.shape[0] != inputs.shape[0] or logits.shape[0] != inputs.shape[0]:
            rows, what = (A.shape[0], f"the saliency layer {plan.layer_name!r}") if A.shape[0] != inputs.shape[0] else (
                logits.shape[0], "the logits")
            raise UnsupportedModelError(
                f"{what} has {rows} rows for {inputs.shape[0]} samples: the model folds its batch with another "
                "dimension (a 2-D CNN run on each frame of a clip) and RSP's initial relevance is one per sample; "
                "give a layer= where the rows are one per sample again")
        if apart:
            check_samples_apart(self.model, plan, inputs, logits, alone)
            plan.samples_checked.add(key)
        tgt = target if trusted_target else _targets(target, logits)
        init, hst = self.init, _hostiles(hostile, logits, tgt, self.hostile_k if self.init == "comparative" else 0)
        if init == "gradcam":
            hst = hst[:, :0]  # a hostile list given is checked, but the gradcam init has none (K = 0)
        if hst.shape[1] == 0:
            init = "gradcam"  # comparative needs at least one hostile class (RSP_SPEC.md §1)
        R0, cams = initial_relevance(logits, A, tgt, hst, init, plan.channels_last_at(A.dim()),
                                     f"the saliency layer {plan.layer_name!r}")
        if initial is not None:
            if initial.shape != R0.shape:
                raise RSPError(f"initial relevance has shape {tuple(initial.shape)}, but the saliency layer "
                               f"{plan.layer_name!r} gives {tuple(R0.shape)}")
            R0 = initial.to(R0.dtype).contiguous()
        # propagated at a peak of about 1 (a power of two: exact; one for the batch, as some
        # steps hold its samples in other rows), so that a small initial relevance (1e-30)
        # does not underflow float32 in the products; scaled back after
        unit = _peak_power_of_two(R0.detach())
        steps: dict[str, torch.Tensor] = {}
        names = _step_names(plan.steps) if record else {}
        on_step = (lambda step, outs: steps.__setitem__(names[step.node], outs[0] * unit)) if record else None
        dropped = R0.new_zeros(R0.shape[0]) if record else None
        R = propagate(plan, R0.detach() / unit, saved, shapes, ops, on_step, dropped,
                      torch.bfloat16 if self.precision == "bf16" else None) * unit
        if dropped is not None:
            dropped = dropped * unit
        return Explanation(R, R0.detach(), logits.detach(), tgt, hst, cams.detach(), plan.layer_name, steps, dropped)

    def static(self, example: torch.Tensor) -> StaticRSP:
        """A fast path for a fixed input shape (video frames): on CUDA the whole pass is
        captured once as a CUDA graph and replayed per call; elsewhere it runs eagerly.
        See ``rsp_fast.static.StaticRSP``."""
        from .static import StaticRSP

        return StaticRSP(self, example)

    def _check_inputs(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise RSPError(f"inputs must be a torch.Tensor, not {type(x).__name__}")
        if self.precision == "tf32" and x.device.type != "cuda":
            raise RSPError("precision='tf32' uses CUDA tensor cores: give CUDA tensors, or use 'fp32' or 'bf16'")
        if not x.is_floating_point():
            raise RSPError(f"inputs must be a floating-point tensor, not {x.dtype}")
        if x.device.type == "meta":
            raise RSPError("inputs are on the meta device: they hold no values to explain")
        if x.layout != torch.strided:
            raise RSPError(f"inputs must be a dense tensor, not one of layout {x.layout}; convert it (x.to_dense())")
        self._refresh_plan()  # the checks below read the plan that will run
        rank = self.plan.input_rank if self.plan else None
        if x.dim() < 2 or (rank is not None and x.dim() != rank):
            want = f"{rank}-D {_LAYOUTS.get(rank, '')}".rstrip() if rank else "at least 2-D (N, ...)"
            raise RSPError(f"inputs must be {want}, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise RSPError("inputs hold no samples (batch size 0)")
        if not torch.isfinite(x).all():
            raise RSPError("inputs contain NaN or Inf")
        # a model traced per input shape: its trace refuses a lazy module it runs (one it never runs may stay lazy)
        check_model_tensors(self.model, self.plan.leaves if self.plan else frozenset())
        p = next((q for q in self.model.parameters() if q.is_floating_point()), None)  # not an integer count
        if p is not None and p.dtype != x.dtype:
            raise RSPError(f"inputs are {x.dtype} but the model's parameters are {p.dtype}; convert one to the other")
        if p is not None and p.device != x.device:
            raise RSPError(f"inputs are on {x.device} but the model is on {p.device}")
        if self.plan is None or all(q.dtype == x.dtype and q.device == x.device
                                    for q in self.model.parameters() if q.is_floating_point()):
            return
        for step in self.plan.steps:  # a layer with a rule cast to float64 alone would fail inside the rule
            if isinstance(step, LayerRule) and step.node.op == "call_module":
                for key, q in step.module.named_parameters(recurse=False):
                    if q.is_floating_point() and (q.dtype != x.dtype or q.device != x.device):
                        raise RSPError(f"inputs are {x.dtype} on {x.device} but {step.node.target}.{key} is {q.dtype} "
                                       f"on {q.device}: the parameters of the layers RSP's rules read must have the "
                                       "inputs' dtype and device")


def check_model_tensors(model: nn.Module, called: frozenset | None = None) -> None:
    """Parameters and buffers RSP can run with: float (not a quantized module's packed integers),
    initialised where the forward uses them (``called``: ids of the modules the traced graph calls
    whole; None: anywhere), and not made under inference_mode. Runs at every call, so one walk
    over the modules' own dicts; names are looked up only for the error."""
    for module in model.modules():
        _refuse_quantized(model, module)
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            if t is None:
                continue
            if nn.parameter.is_lazy(t):
                if not _runs(model, module, called):
                    continue
                raise not_initialised(next(n for n, q in itertools.chain(model.named_parameters(), model.named_buffers())
                                           if q is t))
            if t.is_inference():
                raise RSPError("the model's parameters or buffers were made under torch.inference_mode(): autograd, "
                               "which R₀ needs through the head, cannot use them; build or load the model outside "
                               "inference_mode")


def _runs(model: nn.Module, module: nn.Module, called: frozenset | None) -> bool:
    """Whether ``module`` runs in the forward (``called``: ids of the modules the traced graph
    calls whole; None: not known, so it may): it or a module holding it is called. A lazy module
    the forward never calls (an auxiliary head) stays uninitialised however often the model runs."""
    return called is None or any(id(m) in called and any(sub is module for sub in m.modules()) for m in model.modules())


def _refuse_quantized(model: nn.Module, module: nn.Module) -> None:
    if _is_quantized(module):
        name = next(n for n, m in model.named_modules() if m is module) or "root module"
        kind = type(module)
        raise UnsupportedModelError(
            f"the model's {name} is a quantized module ({kind.__module__}.{kind.__qualname__}): RSP explains "
            "float models (float16 and bfloat16 too); explain the float model it was quantized from")


def _is_quantized(module: nn.Module) -> bool:
    """A module of torch's quantized namespaces (integer weights, no autograd), but not
    (FX)FloatFunctional: the float stand-in for add and cat that models written for quantization use
    (torchvision's quantizable models with quantize=False are float models)."""
    kind = type(module)
    return (kind.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
            and kind.__name__ not in ("FloatFunctional", "FXFloatFunctional"))


def _peak_power_of_two(R: torch.Tensor) -> torch.Tensor:
    """The power of two just above max|R| (1 where there is no relevance; within the dtype's
    range, 2^±127 in float32), as a 0-d tensor: no wait for the device."""
    _, exponent = torch.frexp(R.abs().amax() if R.numel() else R.new_zeros(()))  # m·2^e, ½ ≤ m < 1; 0: e = 0
    return power_of_two(exponent, R.dtype)


def on_device(device: torch.device):
    """The inputs' GPU made the current one: Triton launches on the current device and stream,
    whatever device the tensors are on (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_initial(initial, inputs: torch.Tensor) -> None:
    if not isinstance(initial, torch.Tensor) or not initial.is_floating_point():
        raise RSPError(f"initial must be a floating-point tensor shaped like the saliency layer's output, not "
                       f"{initial.dtype if isinstance(initial, torch.Tensor) else type(initial).__name__}")
    if initial.device != inputs.device:
        raise RSPError(f"initial is on {initial.device} but the inputs are on {inputs.device}")
    if initial.dim() < 2 or initial.shape[0] != inputs.shape[0]:
        raise RSPError(f"initial must have one row per sample ({inputs.shape[0]}), got shape {tuple(initial.shape)}")
    if not torch.isfinite(initial).all():
        raise RSPError("initial contains NaN or Inf")


_LAYOUTS = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, T, H, W)"}  # inputs of a model starting with a Conv1d / 2d / 3d


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """TF32 for CUDA's matmuls and convolutions: off for "fp32" (PyTorch lets cuDNN use TF32 by
    default: "fp32" means float32), on for "tf32"; "bf16" casts RSP's product operands itself
    and leaves the model's forward pass to the user's settings. The flags are process-wide:
    calls of several threads that want one setting share it, a call that wants the other waits
    for them, and the user's settings come back when the last one ends."""
    if device.type != "cuda" or precision == "bf16":
        yield
        return
    want = precision == "tf32"

    with SETTINGS.held("tf32", want, lambda: set_tf32(want), restore_tf32):
        yield


def _per_sample(value, N: int, name: str, shared_dim: int):
    """``value`` as a tensor with one row per sample when it has one (a target of dimension 1, a
    hostile list of dimension 2), so that chunks can take their rows; a value every sample
    shares (``shared_dim``: an int target, one hostile list) as a Python int or list, which no
    chunk slices, even where it was given as a tensor."""
    if value is None:
        return None
    t = _as_class_tensor(value, name, "cpu")
    if t.dim() == shared_dim:
        return t.tolist()
    if t.dim() != shared_dim + 1 or t.shape[0] != N:
        raise _per_sample_error(name, N, t.shape)
    return t


def _per_sample_error(name: str, N: int, shape) -> RSPError:
    what = "an int or one class per sample" if name == "target" else "a list of classes or one list per sample"
    return RSPError(f"{name} must be {what} ({N}), got shape {tuple(shape)}")


def check_finite(out: Explanation) -> Explanation:
    """``out``, or an RSPError where a sample's attribution holds NaN or Inf: from finite inputs
    that happens only past the dtype's range (a forward that overflows, NaN weights; relevance
    that under- or overflows where a sample's activations span more orders of magnitude than
    the dtype holds), and a NaN map must not pass for an explanation. Nor do NaN or +inf
    logits (a head that overflows) where the map stays finite: the target would be an argmax
    over NaN. Logits of −inf for classes a model masks out are fine. One wait for the device."""
    bad_map = ~torch.isfinite(out.attribution.flatten(1)).all(1)
    logits = out.logits.flatten(1)
    bad_logits = (logits.isnan() | logits.isposinf()).any(1) | (bad_map & ~torch.isfinite(logits).all(1))
    bad_logits, bad_map = (torch.stack([bad_logits, bad_map]).cpu()).tolist()
    dtype = str(out.attribution.dtype).removeprefix("torch.")
    if any(bad_logits):
        raise RSPError(f"the model's output is not finite (NaN or Inf) for sample(s) {_indices(bad_logits)}: its forward "
                       f"overflows {str(out.logits.dtype).removeprefix('torch.')} or its weights hold NaN")
    if any(bad_map):
        where = next((f" (first at {name!r})" for name, R in out.steps.items() if not torch.isfinite(R).all()), "")
        hint = "rescale the inputs" if dtype == "float64" else "explain in float64 (model.double(), inputs.double())"
        raise RSPError(f"the attribution of sample(s) {_indices(bad_map)} is not finite (NaN or Inf){where}: its "
                       f"relevance left the range of {dtype}, as where activations span more orders of magnitude "
                       f"than it holds; {hint}")
    return out


def _indices(flags: list[bool], most: int = 8) -> str:
    hits = [i for i, bad in enumerate(flags) if bad]
    return ", ".join(map(str, hits[:most])) + (f" and {len(hits) - most} more" if len(hits) > most else "")


def _rows(value, start: int, count: int):
    return value[start:start + count] if isinstance(value, torch.Tensor) else value


def _concatenate(parts: list[Explanation]) -> Explanation:
    """One Explanation from those of consecutive chunks of a batch."""
    first = parts[0]

    def cat(name: str, dim: int = 0):
        return torch.cat([getattr(p, name) for p in parts], dim)
    steps = {k: torch.cat([p.steps[k] for p in parts]) for k in first.steps}
    dropped = cat("dropped") if first.dropped is not None else None
    return Explanation(cat("attribution"), cat("initial"), cat("logits"), cat("target"), cat("hostile"), cat("cams", 1),
                       first.layer, steps, dropped)


def heatmap(R: torch.Tensor) -> torch.Tensor:
    """The map shown to users: channel sum of the relevance (positive = target), N×H×W for
    images, N×L for signals, N×T×H×W for clips; an MLP's N×F relevance as it is. It sums dim
    1: for N×T×F tokens (channels last) sum the features instead, ``R.sum(-1)``."""
    if not isinstance(R, torch.Tensor):
        raise RSPError(f"heatmap takes a relevance tensor (an attribution), not {type(R).__name__}")
    return R.sum(1) if R.dim() >= 3 else R


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _step_names(steps) -> dict:
    """Each rule's key in ``Explanation.steps``, by node: its module's path (also of a conv
    traced through, as one with padding_mode 'reflect'), or the node's name for a function; a
    module run more than once (a block's shared ReLU) is "path", "path:2", … in forward order."""
    names, calls = {}, {}
    for step in reversed(steps):  # the plan runs from the saliency layer back to the input
        path = step_path(step)
        if path is not None:
            calls[path] = calls.get(path, 0) + 1
            names[step.node] = path if calls[path] == 1 else f"{path}:{calls[path]}"
        else:
            names[step.node] = step.node.name
    return names


def _as_class_tensor(value, name: str, device) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise RSPError(f"{name} must be an int or a sequence of ints, not {value!r}") from None
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):  # [] holds no class: float
        raise RSPError(f"{name} must hold integer class indices, not {t.dtype}")
    return t.long()


def _check_range(t: torch.Tensor, classes: int, name: str) -> None:
    if t.numel() and (t.min() < 0 or t.max() >= classes):
        bad = t[(t < 0) | (t >= classes)][0].item()
        raise RSPError(f"{name} class {bad} is out of range: the model has {classes} classes (0..{classes - 1})")


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    N, classes = logits.shape
    if target is None:
        return logits.argmax(1)
    return class_per_sample(target, N, classes, logits.device)


def class_per_sample(target, N: int, classes: int, device) -> torch.Tensor:
    """A target (an int or one class per sample) as N class indices, checked."""
    t = _as_class_tensor(target, "target", device)
    if t.dim() == 0:
        t = t.expand(N)
    if t.shape != (N,):
        raise _per_sample_error("target", N, t.shape)
    _check_range(t, classes, "target")
    return t


def _hostiles(hostile, logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    N, classes = logits.shape
    if hostile is None:
        k = min(k, classes - 1)
        # classes masked out (−inf) rank below every other but above the target: never picked for it
        others = logits.detach().nan_to_num(neginf=torch.finfo(logits.dtype).min)
        others.scatter_(1, target.unsqueeze(1), float("-inf"))
        return others.topk(k, dim=1).indices if k else target.new_zeros((N, 0))
    h = _as_class_tensor(hostile, "hostile", logits.device)
    if h.dim() == 1:
        h = h.unsqueeze(0).expand(N, -1)
    if h.dim() != 2 or h.shape[0] != N:
        raise _per_sample_error("hostile", N, h.shape)
    _check_range(h, classes, "hostile")
    if (h == target.unsqueeze(1)).any():
        raise RSPError("a hostile class equals the target class of its sample")
    if h.shape[1] > 1 and (h.sort(1).values.diff(dim=1) == 0).any():  # K counts in R₀: a repeat would weigh twice
        raise RSPError("a sample's hostile classes repeat a class; give each once")
    return h
