"""A multiply-add and memory-traffic model of one RSP pass, layer by layer.

``rsp_fast.cost(model, (3, 224, 224))`` lists, for every conv and linear layer between the
input and the saliency layer, the forward pass's multiply-adds, what RSP's filter path and
Gram path would cost, the path ``choose_path`` takes, and the bytes its main buffers move
(per image). It explains where RSP's time goes and why deep layers take the Gram path.
The masked path (products at R's non-zeros only, CPU) is chosen at run time from how sparse
the relevance is, so it is not in this table: it costs ≈ 3·nnz(R)·ck instead of ≈ 6·o·L·ck.
Depthwise layers listed on the conv path run on the fused depthwise kernel with the ``cpp``
backend: the same multiply-adds, each plane's three products in one pass. Dense stride-1 1×1
layers on the CPU take the fused pointwise kernel (path ``pointwise``) where it is built.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn

from .api import check_model_tensors
from .errors import RSPError
from .graph.plan import build_plan, step_path
from .graph.trace import UntraceableModelError, eval_mode, unwrap
from .kernels.triton import triton_unavailable_reason
from .ops.custom import pointwise_kernel_built
from .propagate import class_scores, record_forward, work_dtype
from .rules.conv import Conv, image_shape
from .rules.conv_paths import (choose_path, cuda_gram_slowdown, gram_macs, implicit_gemm_fits, on_tensor_cores,
                               pixel_gram_macs, runnable_dense_path, tap_sums_pay)
from .rules.conv3d import Conv3d
from .rules.linear import Linear


def _layer_name(step) -> str:
    return step_path(step) or step.node.name


def _conv_row(step: Conv, shapes, dtype: torch.dtype, device: torch.device) -> dict:
    C, H, W = image_shape(shapes[step.inputs[0]])[1:]
    O, h, w = image_shape(shapes[step.node])[1:]
    g = step.geometry(shapes, (H, W))
    G, L = g.groups, h * w
    ck, og = C // G * g.kernel[0] * g.kernel[1], O // G
    elem = dtype.itemsize
    forward = O * ck * L
    filter_macs = 6 * og * ck * L * G
    cuda = device.type == "cuda"
    implicit = implicit_gemm_fits(g, C, O, (H, W), L) and triton_unavailable_reason(device) == ""  # as the rule asks
    pixel_gram = pixel_gram_macs(g, C // G, (H, W), L, tap_sums_pay(cuda, dtype, implicit))
    gram = gram_macs(ck, og, L, pixel_gram) * G
    if step.first:
        path, macs = "z^B", 4 * forward  # two convs (x − L with W⁺, x − H with W⁻) and two transposed ones
        moved = elem * (4 * C * H * W + 3 * O * L)
    else:
        # a strided unpadded 1×1 conv runs as a stride-1 one on the pixels it reads
        pointwise = g.is_pointwise and not any(g.pad)
        fused_pointwise = pointwise and G == 1 and not cuda and pointwise_kernel_built()
        path = choose_path(ck, og, L, pointwise, cuda and C != G, pixel_gram=pixel_gram,
                           tensor_cores=on_tensor_cores(dtype), implicit_gemm_runs=implicit,
                           gram_slowdown=cuda_gram_slowdown(dtype), fused_pointwise=fused_pointwise, grouped=G > 1)
        path = runnable_dense_path(path, implicit, cuda, dtype, L)
        gram_path = path in ("gram", "implicit_gram")
        macs = gram if gram_path else filter_macs
        if path == "pointwise":  # x and R read twice, the responses and ratios never in memory
            moved = elem * (2 * ck * L + 2 * O * L + 4 * C * H * W)
        elif path == "gram" and pixel_gram is not None:  # the padded input's pixels and their P×P Gram, no patches
            l, r, t, b = g.pad
            P = (H + t + b) * (W + l + r)
            moved = elem * (3 * C * P + 8 * O * L + 4 * C * H * W + G * P * P)
        else:  # the (unfolded) input, read by every product
            patches = 0 if path in ("conv", "grouped_conv", "implicit_gemm", "implicit_gram") else ck * G * L
            moved = elem * (3 * patches + 8 * O * L + 4 * C * H * W + (G * L * L if gram_path else 0))
    return {"layer": _layer_name(step), "kind": "conv", "path": path, "forward_macs": forward,
            "filter_macs": filter_macs, "gram_macs": gram, "rsp_macs": macs, "bytes": moved}


def _linear_row(step: Linear, in_shape, out_shape, elem: int) -> dict:
    F_in, O = in_shape[-1], out_shape[-1]
    positions = max(1, int(torch.tensor(in_shape[1:-1]).prod().item())) if len(in_shape) > 2 else 1
    forward = O * F_in * positions
    macs = (4 if step.first else 2) * forward  # first: z⁺, z⁻ and both transposed; inner: two products
    return {"layer": _layer_name(step), "kind": "linear", "path": "z^B" if step.first else "dense",
            "forward_macs": forward, "filter_macs": macs, "gram_macs": macs, "rsp_macs": macs,
            "bytes": elem * (O * F_in + 4 * positions * (F_in + O))}


def _conv3d_row(step: Conv3d, shapes, elem: int) -> dict:
    """A Conv3d runs its products as PyTorch's 3-D convolutions (rules/conv3d.py): the first
    layer two convolutions and two transposed ones, an inner layer three products per section."""
    in_shape, out_shape = shapes[step.inputs[0]], shapes[step.node]
    C, inputs = in_shape[1], math.prod(in_shape[2:])
    O, L = out_shape[1], math.prod(out_shape[2:])
    g = step.geometry(shapes)
    forward = O * C // g.groups * math.prod(g.kernel) * L
    macs = 4 * forward if step.first else 6 * forward
    return {"layer": _layer_name(step), "kind": "conv3d", "path": "z^B" if step.first else "grouped_conv",
            "forward_macs": forward, "filter_macs": 6 * forward, "gram_macs": None, "rsp_macs": macs,
            "bytes": elem * (4 * C * inputs + 8 * O * L)}


def _sizes(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, or an RSPError saying what it should be."""
    wrong = RSPError(f"input_shape must be a tuple of positive ints without the batch, e.g. (3, 224, 224), "
                     f"not {input_shape!r}")
    if not isinstance(input_shape, (tuple, list, torch.Size)):
        raise wrong
    try:
        sizes = tuple(operator.index(n) for n in input_shape if not isinstance(n, bool))
    except TypeError:
        raise wrong from None
    if len(sizes) != len(input_shape) or not sizes or min(sizes) < 1:
        raise wrong
    return sizes


def _runs_as_a_batch(model: nn.Module, plan, x: torch.Tensor) -> bool:
    """Whether the model runs on ``x`` taken as a batch (its first dimension the batch size)."""
    try:
        return x.dim() > 1 and class_scores(record_forward(model, plan, x)[0]).shape[0] == x.shape[0]
    except RSPError:
        return False


def cost(model: nn.Module, input_shape, layer=None, dtype: torch.dtype | None = None) -> dict:
    """Per-image cost of RSP on ``model`` for inputs of ``input_shape`` (without the batch)."""
    if not isinstance(model, nn.Module):
        raise RSPError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    model, layer = unwrap(model, layer)
    input_shape = _sizes(input_shape)
    check_model_tensors(model, frozenset())  # as RSP; lazy modules once the plan says which run
    p = next(model.parameters(), None)  # a model without parameters: float32 on the CPU unless told
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise RSPError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
    if dtype is not None and p is not None and dtype != p.dtype:
        raise RSPError(f"dtype {dtype} is not the model's ({p.dtype}): cost runs the model as it is; convert it first")
    try:  # two samples (a forward may squeeze a batch of one away), traced through the model
        x = torch.zeros((2, *input_shape), dtype=dtype or (p.dtype if p is not None else torch.float32),
                        device=p.device if p is not None else "cpu")
    except (RuntimeError, MemoryError) as exc:  # CPU allocators raise RuntimeError, CUDA's OutOfMemoryError
        raise RSPError(f"input_shape {tuple(input_shape)}: two samples of that size do not fit in memory "
                       f"({str(exc).splitlines()[0][:160]})") from None
    with eval_mode(model):
        try:
            plan = build_plan(model, layer)
        except UntraceableModelError:  # a forward that branches on sizes: traced for this shape
            plan = build_plan(model, layer, example=x)
        check_model_tensors(model, plan.leaves)  # a lazy module would be initialised by the probe, with random weights
        with_batch = RSPError(f"input_shape is one sample's shape, without the batch: {tuple(input_shape[1:])}, "
                              f"not {tuple(input_shape)}")
        if plan.input_rank is not None and x.dim() != plan.input_rank:  # as RSP refuses such inputs
            if len(input_shape) == plan.input_rank:
                raise with_batch
            raise RSPError(f"input_shape {tuple(input_shape)}: the model's first layer takes {plan.input_rank - 1}-D "
                           "samples (its input without the batch)")

        def probe(x: torch.Tensor) -> dict:
            try:
                output, _, _, shapes = record_forward(model, plan, x)
            except RSPError:
                # a shape with the batch has the rank the first layer takes (where the plan knows it)
                if plan.input_rank is None and _runs_as_a_batch(model, plan, x[0]):
                    raise with_batch from None
                raise
            try:  # as RSP takes the output
                rows = class_scores(output).shape[0]
            except RSPError:
                if len(input_shape) > 1 and _runs_as_a_batch(model, plan, x[0]):  # an MLP's (8, 10): 8 samples
                    raise with_batch from None
                raise
            if rows != x.shape[0]:
                raise RSPError(f"input_shape {tuple(input_shape)}: the model gives {rows} rows of logits for "
                               f"{x.shape[0]} samples; RSP needs one per sample")
            return shapes

        try:
            shapes = probe(x)
        except RSPError as two:
            try:  # a forward written for one sample at a time (h.view(1, -1)), which RSP explains at batch 1
                shapes = probe(x[:1])
            except RSPError:
                raise two from None
    plan.check_batch_dims(shapes)  # RSP refuses it there: cost too
    work = work_dtype(x.dtype)  # the rules of a 16-bit model run in float32
    elem = work.itemsize
    rows = []
    for step in reversed(plan.steps):  # input to saliency layer
        if isinstance(step, Conv):
            rows.append(_conv_row(step, shapes, work, x.device))
        elif isinstance(step, Conv3d):
            rows.append(_conv3d_row(step, shapes, elem))
        elif isinstance(step, Linear):
            rows.append(_linear_row(step, shapes[step.inputs[0]], shapes[step.node], elem))
    totals = {k: sum(r[k] for r in rows) for k in ("forward_macs", "filter_macs", "rsp_macs", "bytes")}
    totals["rsp_over_forward_macs"] = totals["rsp_macs"] / max(totals["forward_macs"], 1)
    return {"layer": plan.layer_name, "layers": rows, "totals": totals}
