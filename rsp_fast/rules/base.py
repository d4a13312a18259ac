"""What every RSP rule looks like, and the context it runs in."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..kernels.reference import per_sample_sum, unsupported_relevance


@dataclass
class Context:
    """Per-call state shared by the rules: the forward values a rule asked for, the tensor
    shapes of every node, and the kernel set chosen by the dispatcher."""

    values: dict[fx.Node, Any]
    shapes: dict[fx.Node, torch.Size]
    ops: Any
    resolve: Callable[[Any], Any] = field(default=lambda a: a)
    dropped: torch.Tensor | None = None  # (N,) when tracked: relevance lost at unsupported positions
    product_dtype: torch.dtype | None = None  # precision="bf16": the matrix products' operands
    # purges a conv left to the padding before it (by the pad's node): see LayerRule.purge_at
    pending_purges: dict[fx.Node, dict] = field(default_factory=dict)

    def low(self, t: torch.Tensor) -> torch.Tensor:
        """An operand of a matrix product, in the product precision."""
        return t if self.product_dtype is None else t.to(self.product_dtype)

    def drop(self, amount: torch.Tensor) -> None:
        """Account for relevance a rule could not pass on (RSP_SPEC.md §3, the one exact caveat)."""
        if self.dropped is not None:
            if amount.shape[0] != self.dropped.shape[0]:  # k rows a sample: heads folded into the batch by a reshape
                amount = amount.reshape(self.dropped.shape[0], -1).sum(1)
            self.dropped += amount.to(self.dropped.dtype)

    @property
    def tracking(self) -> bool:
        return self.dropped is not None


def hooked_input_key(node) -> tuple:
    """Where the forward pass leaves a layer's input as its forward pre-hooks changed it."""
    return (node, "hooked input")


class Rule:
    """One layer's relevance rule: relevance at the node's output -> relevance at its inputs.

    ``inputs`` are the nodes relevance flows back to; ``needs_values`` the nodes whose
    forward values the rule reads (saved during the forward pass, everything else is freed).
    """

    def __init__(self, node: fx.Node, inputs: list[fx.Node], needs_values: list[fx.Node] | None = None):
        self.node = node
        self.inputs = inputs
        self.needs_values = needs_values if needs_values is not None else []

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class LayerRule(Rule):
    """A conv or linear layer: reads its saved input; a first layer (one that sees the raw
    input) uses the z^B rule with the weights of a BatchNorm after it folded in."""

    def __init__(self, node: fx.Node, inputs: list[fx.Node], module: torch.nn.Module, first: bool, bn_scale: Callable):
        super().__init__(node, inputs, needs_values=list(inputs))
        self.module, self.first, self.bn_scale = module, first, bn_scale
        self.input_non_negative = False  # set by the plan when the input is ≥ 0 by construction
        # set by the plan for an inner conv reading a padding that copies values (reflect,
        # replicate, circular: Conv2d(padding_mode=...)): the pad's node, whose rule purges once
        # the copies are summed back, so that the shift is uniform over the layer's own units
        self.purge_at: fx.Node | None = None
        # set by the plan for a first conv reading a zero padding: (the padding's input, its amounts)
        self.zero_pad: tuple[fx.Node, tuple[int, ...]] | None = None

    def hooked_input(self, ctx: Context) -> torch.Tensor | None:
        """What a forward pre-hook that changed the layer's input (a mask) gave the layer."""
        return ctx.values.get(hooked_input_key(self.node))

    def input_value(self, ctx: Context) -> tuple[torch.Tensor, bool]:
        """The input the layer computed with, and whether it is ≥ 0 by construction: the saved
        value of its input node, or what a forward pre-hook gave the layer (then nothing is
        known of its sign)."""
        hooked = self.hooked_input(ctx)
        return (ctx.values[self.inputs[0]], self.input_non_negative) if hooked is None else (hooked, False)

    def picture_behind_zero_pad(self, ctx: Context) -> torch.Tensor:
        """A first conv's input before the zero padding it reads (``zero_pad``): the pad's input,
        or what a pre-hook gave the conv with the padding cut off again."""
        source, padding = self.zero_pad
        hooked = self.hooked_input(ctx)
        if hooked is None:
            return ctx.values[source]
        index = [slice(None)] * hooked.dim()
        for i in range(len(padding) // 2):  # F.pad's order: the last dim's pair first
            dim = hooked.dim() - 1 - i
            index[dim] = slice(padding[2 * i], hooked.shape[dim] - padding[2 * i + 1])
        return hooked[tuple(index)]

    def purge_deferral(self, ctx: Context, pointwise: bool) -> dict | None:
        """Where the plan left this conv's purge to the copy padding before it (``purge_at``)
        and the kernel purges at all (k > 1): the dict the inner rule fills with what the
        pad's rule needs to purge; else None."""
        if self.purge_at is None or pointwise:
            return None
        deferred = ctx.pending_purges[self.purge_at] = {}
        return deferred

    def weight(self, ctx: Context) -> torch.Tensor:
        """The weight the layer's forward uses."""
        return self.module.weight

    def folded_weight(self, ctx: Context, dtype: torch.dtype, fold: bool = True) -> torch.Tensor:
        """The weight with the BatchNorm after it folded in, where there is one and ``fold``."""
        W = self.weight(ctx)
        scale = self.bn_scale() if fold else None
        if scale is not None and scale.numel() == W.shape[0]:  # not a norm of channels an add broadcast to
            W = W * scale.view(-1, *([1] * (W.dim() - 1)))
        return W.detach().to(dtype)


def node_function(node: fx.Node, module: torch.nn.Module | None, ctx: Context) -> Callable[[torch.Tensor], torch.Tensor]:
    """The node's op as a function of its first tensor argument, other arguments fixed to
    their forward values (so a rule can re-run a pooling or padding op on a changed input)."""
    if node.op == "call_module":
        return module
    rest = ctx.resolve(node.args[1:])
    kwargs = ctx.resolve({k: v for k, v in node.kwargs.items() if node.args or k not in ("input", "self")})
    if node.op == "call_method":
        return lambda x: getattr(x, node.target)(*rest, **kwargs)
    return lambda x: node.target(x, *rest, **kwargs)


def rectified_input(x: torch.Tensor, non_negative: bool = False) -> torch.Tensor:
    """x̂ = max(x, 0) of an inner layer, rescaled per sample by a power of two so that its
    largest value lies in [0.5, 1).

    The inner conv and linear rules are invariant to the scale of x̂ (the filters and the
    responses scale by s and s², the normalised sections by 1/s², the back-projection times
    x̂ by 1), and a power of two changes no bit of their result; but the responses grow with
    x̂²: activations of 1e-20 (seen in deep randomly initialised nets) underflow them to 0 in
    float32 and give NaN, activations of 1e20 overflow them. ``non_negative``: x ≥ 0 already.
    Off CUDA the scale is applied only when needed; on CUDA always (no host sync, so CUDA
    graph capture stays possible)."""
    x_pos = x if non_negative else x.clamp(min=0)
    exponent = _peak_exponent(x_pos, non_negative=True)
    if not x_pos.is_cuda and bool((exponent.abs() <= 16).all()):
        return x_pos
    return x_pos * _power_of_two(exponent, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _peak_exponent(x: torch.Tensor, non_negative: bool) -> torch.Tensor:
    """Per sample, the binary exponent of max(x̂) (0 for an all-zero sample)."""
    peak = x.detach().reshape(x.shape[0], -1).amax(1)
    return torch.frexp(peak if non_negative else peak.clamp(min=0))[1]


def _power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return power_of_two(-exponent, dtype)


def power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^exponent in ``dtype``, the exponent kept where the dtype holds it (±127 in float32): a
    subnormal peak (float32 below 2^-126) is scaled up as far as the dtype goes, not to inf."""
    largest = math.frexp(torch.finfo(dtype).max)[1] - 1  # 127 in float32, 1023 in float64 (2^1024 is inf)
    return torch.ldexp(torch.ones(exponent.shape, dtype=dtype, device=exponent.device),
                       exponent.clamp(-largest, largest))


def unit_scaled(t: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """t times a power of two that brings max|t| into [0.5, 1), per sample (row of dim 0) or
    over all of t: for the first-layer (z^B) rule's input and weight. That rule is invariant to a
    positive scale of either (Z scales with it, R/Z inversely, the back-projection by 1), and a
    power of two changes no bit of its result; but a picture (or weight) of subnormal values,
    1e-40 in float32, made Z subnormal and R/Z inf."""
    rows = t.reshape(t.shape[0] if per_sample else 1, -1)
    scale = _power_of_two(_peak_exponent(rows.abs(), non_negative=True), t.dtype)
    return t * scale.view(-1, *([1] * (t.dim() - 1)))


def input_scale(x: torch.Tensor, non_negative: bool = False) -> torch.Tensor:
    """(N,) the powers of two ``rectified_input`` multiplies max(x, 0) by, for kernels that apply
    them as they read x (always applied: they change no bit of the result)."""
    return _power_of_two(_peak_exponent(x, non_negative), x.dtype)


def finish_purge(ctx: Context, contributions: torch.Tensor, pending: dict) -> torch.Tensor:
    """The purge a conv left to the copy padding before it, on x̂⊙dx with the copies summed
    (each copy holds x̂ of its source pixel): R_in = D − [D≠0]·total/n, D = 2·x̂⊙dx."""
    total = pending["total"]
    if ctx.tracking:
        active = (contributions != 0).flatten(1).any(1)
        ctx.drop(torch.where(active, 2 * pending["unsupported"], total))
    return ctx.ops.purge(contributions, torch.ones_like(contributions), total)


def purged_relevance(ctx: Context, R: torch.Tensor, Rs: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor,
                     dx: torch.Tensor, x_pos: torch.Tensor, deferred: dict | None = None,
                     pointwise: bool = False) -> torch.Tensor:
    """Hostile purging of a conv (k > 1) or linear layer's back-projection ``dx``. When
    tracked, what it loses is accounted: 2·(relevance at unsupported positions), or all of
    it if no unit is active. ``Rs``, ``Ga``, ``Gb`` are R and the responses in one layout.
    ``pointwise``: a 1×1 conv, not purged (x̂⊙dx; tracked, R at unsupported positions is lost)."""
    if pointwise:
        if ctx.tracking:
            ctx.drop(unsupported_relevance(Rs, Ga, Gb))
        return ctx.ops.combine(dx, x_pos)
    total = per_sample_sum(R)
    if deferred is not None:  # left to the copy padding before the layer: x̂⊙dx, and what the purge needs
        deferred.update(total=total, unsupported=unsupported_relevance(Rs, Ga, Gb) if ctx.tracking else None)
        return ctx.ops.combine(dx, x_pos)
    if ctx.tracking:
        active = (x_pos * dx != 0).flatten(1).any(1)
        ctx.drop(torch.where(active, 2 * unsupported_relevance(Rs, Ga, Gb), total))
    return ctx.ops.purge(dx, x_pos, total)
