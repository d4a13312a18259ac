"""Where branches meet: residual add, concatenation and stacking. (Fan-out, where a tensor feeds
several consumers, needs no rule: the propagation sums what each consumer sends back.)"""
from __future__ import annotations

import torch

from .base import Context, Rule

ADD_EPS = 1e-9


class Add(Rule):
    """y = a + b: â = max(a,0)+1e-9, b̂ = max(b,0)+1e-9, R_a = â·safe_div(R, â+b̂), R_b likewise
    (the authors' Add rule). Broadcast operands get their relevance summed back to shape."""

    kind = "add"

    def __init__(self, node, inputs):
        super().__init__(node, inputs, needs_values=list(inputs))

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        a, b = (ctx.values[n] for n in self.inputs)
        a_hat = a.clamp(min=0) + ADD_EPS
        b_hat = b.clamp(min=0) + ADD_EPS
        S = R / (a_hat + b_hat)  # â + b̂ ≥ 2e-9: never zero
        return [(a_hat * S).sum_to_size(a.shape), (b_hat * S).sum_to_size(b.shape)]


class Cat(Rule):
    """Concatenation: split R by the same slices."""

    kind = "cat"

    def __init__(self, node, inputs, dim: int):
        super().__init__(node, inputs)
        self.dim = dim

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        sizes = [ctx.shapes[n][self.dim] for n in self.inputs]
        return list(torch.split(R, sizes, dim=self.dim))


class Stack(Cat):
    """torch.stack: each input gets its slice of R back."""

    kind = "stack"

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return list(R.unbind(self.dim))
