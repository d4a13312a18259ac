"""ReLU, ReLU6, Dropout, Identity, BatchNorm, Flatten and reshapes: R passes through,
reshaped to the input. (BatchNorm is folded into the conv or linear before it; for an
inner conv that changes nothing, for a first layer it gives the true weights.)"""
from __future__ import annotations

import torch

from .base import Context, Rule, node_function


class PassThrough(Rule):
    kind = "pass-through"

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return [R.reshape(ctx.shapes[self.inputs[0]])]


class Route(Rule):
    """Zero padding and other pure index maps: R_in is the op's vector-Jacobian product,
    i.e. relevance is cropped back to where the input was (padding carries none)."""

    kind = "route"

    def __init__(self, node, inputs, module):
        super().__init__(node, inputs, needs_values=[a for a in node.all_input_nodes if a is not inputs[0]])
        self.module = module

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        fn = node_function(self.node, self.module, ctx)
        probe = torch.zeros(ctx.shapes[self.inputs[0]], dtype=R.dtype, device=R.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(fn(probe), probe, R)
        return [grad]


class Scale(Rule):
    """y = x·g with g a sigmoid gate in [0, 1] (squeeze-and-excitation, swish), y = x·c or
    x/c with c a constant: all of R goes to x (LRP's signal-take-all for gates: the gate
    only reweights x, so relevance does not flow into the branch computing it), summed back
    to x's shape if x was broadcast."""

    kind = "scale"

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return [R.sum_to_size(ctx.shapes[self.inputs[0]])]
