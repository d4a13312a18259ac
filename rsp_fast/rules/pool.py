"""Max, average and adaptive pooling (and spatial means): the z-rule through the op.

x' = x + 1e-9, Z = pool(x'), R_in = x' ⊙ ∂/∂x'⟨pool(x'), safe_div(R, Z)⟩ (RSP_SPEC.md §2).
The authors split R into R⁺ and R⁻ first; the sum is the same, so one pass suffices.
"""
from __future__ import annotations

import torch

from ..kernels.reference import per_sample_sum, safe_div
from .base import Context, Rule, node_function

POOL_EPS = 1e-9


class Pool(Rule):
    kind = "pool"

    def __init__(self, node, inputs, module):
        super().__init__(node, inputs, needs_values=list(node.all_input_nodes))
        self.module = module

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        fn = node_function(self.node, self.module, ctx)
        x = (ctx.values[self.inputs[0]].detach() + POOL_EPS).requires_grad_()
        with torch.enable_grad():
            Z = fn(x)
            (grad,) = torch.autograd.grad(Z, x, safe_div(R, Z.detach()))
        if ctx.tracking:
            ctx.drop(per_sample_sum(R * (Z.detach() == 0)))
        return [x.detach() * grad]
