"""Rules that move relevance without changing its amount.

Pass-through: activations, Dropout, Identity, norms, Flatten and reshapes (R reshaped to
the input; BatchNorm is folded into the conv or linear before it: for an inner conv that
changes nothing, for a first layer it gives the true weights). Routes: pure index maps
(zero padding, transposes, indexing, pieces of a split, copies within a sample): R goes back
where each value came from, a copied value's summed; a GLU's signal half is such a piece. Scale: products, quotients and biased sums whose other operand only reweights or shifts
one (a gate, a constant, a parameter, a statistic; see operands.py): all of R to that one."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..kernels.reference import per_sample_sum
from .base import Context, Rule, finish_purge, node_function
from .operands import op_name


class PassThrough(Rule):
    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return [R.reshape(ctx.shapes[self.inputs[0]])]


class Route(Rule):
    """Zero padding and other pure index maps: R_in is the op's vector-Jacobian product,
    i.e. relevance is cropped back to where the input was (padding carries none)."""

    def __init__(self, node, inputs, module):
        super().__init__(node, inputs, needs_values=[a for a in node.all_input_nodes if a is not inputs[0]])
        self.module = module

    def function(self, ctx: Context):
        return node_function(self.node, self.module, ctx)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        fn = self.function(ctx)
        probe = torch.zeros(ctx.shapes[self.inputs[0]], dtype=R.dtype, device=R.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(fn(probe), probe, R)
        if ctx.tracking and R.shape[0] == grad.shape[0]:  # relevance on a zero padding is cropped away (a norm after the pad)
            ctx.drop(per_sample_sum(R) - per_sample_sum(grad))
        pending = ctx.pending_purges.pop(self.node, None)  # a copy padding's conv left its purge here
        return [grad if pending is None else finish_purge(ctx, grad, pending)]


class SampleRoute(Route):
    """A copy or move within each sample (repeat, expand, tile, repeat_interleave, index_select,
    flip, roll, rot90): an index map whose vector-Jacobian product sums the relevance of a
    value's copies, as torch.cat([x, x, x], 1) does. Along the batch the plan refuses it (as a
    reduction, dims_read_along); here, where the shapes are known, a copy that changes the rank or
    the batch's size (repeat, expand, tile with more dims than the tensor's, or a count on dim 0)."""

    def __init__(self, node, inputs):
        super().__init__(node, inputs, None)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        shape = ctx.shapes[self.inputs[0]]
        if R.dim() != len(shape) or R.shape[0] != shape[0]:
            raise UnsupportedModelError(f"{self.node.name} ({op_name(self.node)}) makes a {R.dim()}-dimensional tensor of "
                                        f"{R.shape[0]} rows from a {len(shape)}-dimensional one of {shape[0]}: the "
                                        "batch's dimension is not kept, and each sample's map would take the other "
                                        "samples' relevance")
        return super().propagate(ctx, R)


class GatedHalf(Route):
    """A gated linear unit, GLU(x) = a·σ(b) with a, b the two halves of x along ``dim``: all
    of R to a, as for any gate (the rule of x·σ(g)); b's half gets none."""

    def __init__(self, node, inputs, module, dim: int):
        super().__init__(node, inputs, module)
        self.needs_values, self.dim = [], dim

    def function(self, ctx: Context):
        return lambda x: x.narrow(self.dim, 0, x.shape[self.dim] // 2)


class Select(Route):
    """y = x[index], or one piece of chunk / split / unbind (y = split(x)[i], the split
    itself never gets a rule): relevance goes back to the piece's place in x."""

    def __init__(self, node, inputs, split: fx.Node | None):
        others = [a for n in ((node, split) if split is not None else (node,)) for a in n.all_input_nodes]
        Rule.__init__(self, node, inputs, needs_values=[a for a in others if a is not inputs[0] and a is not split])
        self.module, self.split = None, split

    def function(self, ctx: Context):
        index = ctx.resolve(self.node.args[1])
        if self.split is None:
            return lambda x: x[index]
        split = node_function(self.split, None, ctx)
        return lambda x: split(x)[index]


class Rejoin(Route):
    """torch.cat / torch.stack given one split's pieces as a whole (``torch.cat(x.chunk(2, 1),
    1)``, ``torch.stack(x.unbind(1), 2)``) or a slice of them (``x.chunk(2, 1)[::-1]``): an
    index map of x, so relevance goes back to where each value came from, as for the pieces
    taken one by one (``Select``) and joined (``Cat``)."""

    def __init__(self, node, inputs, split: fx.Node, pieces: slice | None = None):
        others = [a for n in (node, split) for a in n.all_input_nodes]
        held = {inputs[0], split, *(p for p in others if p.op == "call_function" and p.args and p.args[0] is split)}
        Rule.__init__(self, node, inputs, needs_values=[a for a in others if a not in held])
        self.module, self.split, self.pieces = None, split, pieces or slice(None)

    def function(self, ctx: Context):
        split = node_function(self.split, None, ctx)
        rest = ctx.resolve(self.node.args[1:])
        kwargs = ctx.resolve({k: v for k, v in self.node.kwargs.items() if k != "tensors"})
        return lambda x: self.node.target(split(x)[self.pieces], *rest, **kwargs)


class Scale(Rule):
    """y = x·g, x/s, x ± c, … with the other operand only reweighting or shifting x (which
    operand that is: ``operands.sole_operand``): all of R goes to x (LRP's signal-take-all
    for gates: relevance does not flow into the branch computing the factor), summed back to
    x's shape if x was broadcast."""

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        return [R.sum_to_size(ctx.shapes[self.inputs[0]])]
