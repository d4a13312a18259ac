"""Where branches meet: residual add, concatenation and stacking. (Fan-out, where a tensor feeds
several consumers, needs no rule: the propagation sums what each consumer sends back.)"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import RSPError
from .base import Context, Rule

BATCH_MIXING = ("{} along the batch dimension, which mixes samples (test-time augmentation in the forward, "
                "say): RSP explains each sample on its own")

ADD_EPS = 1e-9


class Add(Rule):
    """y = a + b: â = max(a,0)+1e-9, b̂ = max(b,0)+1e-9, R_a = â·safe_div(R, â+b̂), R_b likewise
    (the authors' Add rule). y = a − b (PoolFormer's pool(x) − x), a + α·b, or a + α·c·b with
    c a factor that only reweights b (torch.addcmul(a, c, b, value=α), a layer-scaled residual):
    the second operand's term is α·b or α·c·b, so b̂ = max(α·c·b, 0)+1e-9, all of it b's, as c's
    branch gets no relevance (an extension). Broadcast operands get their relevance summed back
    to shape."""

    def __init__(self, node, inputs, alpha: float = 1, factor=None):
        super().__init__(node, inputs, needs_values=list(inputs) + ([factor] if isinstance(factor, fx.Node) else []))
        self.alpha, self.factor = alpha, factor

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        a, b = (ctx.values[n] for n in self.inputs)
        term = b if self.alpha == 1 else self.alpha * b
        if self.factor is not None:
            term = term * (ctx.values[self.factor] if isinstance(self.factor, fx.Node) else self.factor)
        a_hat, b_hat = a.clamp(min=0) + ADD_EPS, term.clamp(min=0) + ADD_EPS
        S = R / (a_hat + b_hat)  # â + b̂ ≥ 2e-9: never zero
        return [(a_hat * S).sum_to_size(a.shape), (b_hat * S).sum_to_size(b.shape)]


class Sum(Rule):
    """y = x.sum(dims) within a sample (ResNeSt's and SKNet's sum over their branches): the
    residual-add rule for as many operands as the summed dimensions hold, x̂ = max(x,0)+1e-9,
    R_x = x̂·safe_div(R, Σx̂)."""

    def __init__(self, node, inputs, dims):
        super().__init__(node, inputs, needs_values=list(inputs))
        self.dims = tuple(dims)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        x_hat = ctx.values[self.inputs[0]].clamp(min=0) + ADD_EPS
        total = x_hat.sum(self.dims, keepdim=True)  # ≥ 1e-9: never zero
        return [x_hat * (R.reshape(total.shape) / total)]  # R without keepdim's ones, or with them


class MeanOfStack(Sum):
    """x.mean(d) of x = torch.stack(branches, s), d and s written with opposite signs: the add
    rule's if they name one dimension at run time (the branches' average), else ``other``'s
    (the pooling rule of a mean over another dimension)."""

    def __init__(self, node, inputs, dims, stacked: int, other: Rule):
        super().__init__(node, inputs, dims)
        self.stacked, self.other = stacked, other

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        rank = len(ctx.shapes[self.inputs[0]])
        if self.dims[0] % rank == self.stacked % rank:
            return super().propagate(ctx, R)
        if self.dims[0] % rank == 0:
            raise RSPError(f"{self.node.name}: " + BATCH_MIXING.format("a mean"))
        return self.other.propagate(ctx, R)


class Cat(Rule):
    """Concatenation: split R by the same slices."""

    def __init__(self, node, inputs, dim: int):
        super().__init__(node, inputs)
        self.dim = dim

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        sizes = [ctx.shapes[n][self.dim] for n in self.inputs]
        return list(torch.split(R, sizes, dim=self.dim))


class Stack(Cat):
    """torch.stack: each input gets its slice of R back (a stack along the batch, which would
    mix samples, the plan refuses or checks at run time)."""

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return list(R.unbind(self.dim))
