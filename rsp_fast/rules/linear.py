"""Linear layers — an rsp_fast extension (the authors start below the classifier).

Inner layers: the sectional split and purge of the conv rule with the layer's own
positive weights, Zp = x̂·W⁺ᵀ, C± = x̂ ⊙ (safe_div(R±, Zp)·W⁺), D = 2(C⁺ − C⁻), uniform
shift. A Linear that sees the raw input (an MLP's first layer) uses the z^B rule, as the
first conv does. Leading dimensions beyond the batch are positions of one sample.
"""
from __future__ import annotations

import torch

from ..kernels.reference import per_sample_sum, safe_div
from .base import Context, LayerRule, purged_relevance, rectified_input, unit_scaled


def first_linear_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    x, W = unit_scaled(x), unit_scaled(W, per_sample=False)
    N = x.shape[0]
    flat = x.reshape(N, -1)
    shape = (N,) + (1,) * (x.dim() - 1)
    below, above = x - flat.amin(1).view(shape), x - flat.amax(1).view(shape)  # x − L ≥ 0, x − H ≤ 0
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    Z = below @ Wp.T + above @ Wn.T  # every term ≥ 0: no cancellation (rules/conv.py's first_conv_relevance)
    S = safe_div(R, Z)
    if ctx.tracking:
        ctx.drop(per_sample_sum(R * (Z == 0)))
    return below * (S @ Wp) + above * (S @ Wn)


def inner_linear_relevance(ctx: Context, x: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
                           non_negative: bool = False) -> torch.Tensor:
    x_pos = rectified_input(x, non_negative)
    Wp = W.clamp(min=0)
    Zp = (ctx.low(x_pos) @ ctx.low(Wp).T).to(x.dtype)
    Sp, Sn = ctx.ops.sectional_normalize(R, Zp, Zp)
    return purged_relevance(ctx, R, R, Zp, Zp, (ctx.low(Sp - Sn) @ ctx.low(Wp)).to(x.dtype), x_pos)


class Linear(LayerRule):
    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        x, non_negative = self.input_value(ctx)
        # a BatchNorm1d after a Linear on N×T×F tokens normalises dim 1, the tokens, not the
        # Linear's features: nothing to fold, it passes R through
        W = self.folded_weight(ctx, x.dtype, fold=x.dim() == 2)
        if self.first:
            return [first_linear_relevance(ctx, x, R, W)]
        return [inner_linear_relevance(ctx, x, R, W, non_negative=non_negative)]


class FunctionalLinear(Linear):
    """F.linear(x, W, b) or x @ P with W, P parameters (a linear layer written as a function):
    the linear rules with W (Pᵀ for a product)."""

    def __init__(self, node, inputs, first: bool, bn_scale, weight_node, transposed: bool):
        super().__init__(node, inputs, None, first, bn_scale)
        self.weight_node, self.transposed = weight_node, transposed
        self.needs_values = list(inputs) + [weight_node]

    def weight(self, ctx: Context) -> torch.Tensor:
        W = ctx.values[self.weight_node]
        return W.T if self.transposed else W
