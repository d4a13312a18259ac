"""Max, average and adaptive pooling (and spatial means): the z-rule through the op.

x' = x + 1e-9, Z = pool(x'), R_in = x' ⊙ ∂/∂x'⟨pool(x'), safe_div(R, Z)⟩ (RSP_SPEC.md §2).
The authors split R into R⁺ and R⁻ first; the sum is the same, so one pass suffices.
Through a max pool the gradient is one-hot at each window's maximum, where x' = Z: the rule
routes R there unchanged (dropped where Z = 0). ``MaxPoolByIndices`` does exactly that with
the indices the forward pass recorded, without re-running the pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import per_sample_sum, safe_div
from .base import Context, Rule, node_function
from .operands import calls

POOL_EPS = 1e-9
INDEX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


def pools_by_indices(module: nn.Module | None) -> bool:
    """A max-pool module whose output the indices path can recompute from its attributes: not
    one that returns indices itself, nor a subclass with its own forward (timm's MaxPool2dSame
    pads the input first), which the z-rule through the module handles instead."""
    return (isinstance(module, INDEX_POOLS) and not module.return_indices
            and type(module).forward in (nn.MaxPool1d.forward, nn.MaxPool2d.forward))


def indices_key(node) -> tuple:
    """Where the forward pass leaves a max pool's indices among the saved values."""
    return (node, "indices")


def max_pool_with_indices(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``module`` (an ``INDEX_POOLS`` module) computes, and the flat index of each maximum."""
    pool = torch.nn.functional.max_pool2d if isinstance(module, nn.MaxPool2d) else torch.nn.functional.max_pool1d
    return pool(x, module.kernel_size, module.stride, module.padding, module.dilation,
                ceil_mode=module.ceil_mode, return_indices=True)


MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                      F.adaptive_max_pool3d}


def is_max_pool(node, module: nn.Module | None) -> bool:
    return isinstance(module, MAX_POOLS) or (module is None and calls(node, MAX_POOL_FUNCTIONS | {torch.amax}, {"amax"}))


class Pool(Rule):
    def __init__(self, node, inputs, module):
        super().__init__(node, inputs, needs_values=list(node.all_input_nodes))
        self.module = module
        # max(x + ε) = max(x) + ε: a max pool routes R by x's own maxima, which x + ε loses where
        # |x| is near ε's rounding (activations of 1e-12 in float32 tie within a window)
        self.takes_max = is_max_pool(node, module)

    def function(self, ctx: Context):
        """The op as a function of the input relevance flows to."""
        return node_function(self.node, self.module, ctx)

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        fn = self.function(ctx)
        x = ctx.values[self.inputs[0]].detach()
        x = (x if self.takes_max else x + POOL_EPS).requires_grad_()
        with torch.enable_grad():
            Z = fn(x)
            (grad,) = torch.autograd.grad(Z, x, safe_div(R, Z.detach() + POOL_EPS if self.takes_max else Z.detach()))
        Z = Z.detach() + POOL_EPS if self.takes_max else Z.detach()
        if ctx.tracking:  # no support: Z = 0, or a max-pool window that read only padding (-inf)
            ctx.drop(per_sample_sum(torch.where((Z == 0) | (Z == float("-inf")), R, 0.0)))
        out = (x.detach() + POOL_EPS if self.takes_max else x.detach()) * grad
        # a -inf padding (a max pool's, written as F.pad) got no relevance: 0, not -inf · 0 = NaN
        return [torch.where(grad != 0, out, 0.0) if self.takes_max else out]


class AttentionPool(Pool):
    """y = x @ A or A @ x with A a softmax (GCNet's global context: x weighted by an attention
    map over positions): the weights are treated as constants, as gates are, and the product
    is then a pooling with weights ≥ 0: the same z-rule; A's branch gets no relevance."""

    def __init__(self, node, inputs, weights_index: int):
        super().__init__(node, inputs, None)
        self.weights_index = weights_index  # A's position among the product's two operands

    def function(self, ctx: Context):
        weights = ctx.values[self.node.args[self.weights_index]]
        return (lambda x: torch.matmul(weights, x)) if self.weights_index == 0 else (lambda x: torch.matmul(x, weights))


class MaxPoolByIndices(Rule):
    """A max-pool module: R goes to each window's maximum (the z-rule above, exactly), found
    by the indices the forward pass recorded; reads the pool's output, not its larger input."""

    records_indices = True

    def __init__(self, node, inputs, module):
        super().__init__(node, inputs, needs_values=[node])
        self.module = module

    def propagate(self, ctx: Context, R: torch.Tensor) -> list[torch.Tensor]:
        idx, Y = ctx.values[indices_key(self.node)], ctx.values[self.node]
        # a dilated window can miss every pixel (ceil_mode and padding): PyTorch gives it -inf
        # and an index past the plane, which must not be written through
        supported = ((Y + POOL_EPS) != 0) & (Y != float("-inf"))
        if ctx.tracking:
            ctx.drop(per_sample_sum(R * ~supported))
        shape = ctx.shapes[self.inputs[0]]
        R_in = R.new_zeros(*shape[:2], shape[2:].numel())
        idx = idx.flatten(2).clamp(max=R_in.shape[2] - 1)
        R_in.scatter_add_(2, idx, torch.where(supported, R, 0.0).flatten(2))  # windows may overlap
        return [R_in.view(shape)]
