"""Each RSP rule against an independent formulation (tests/reference_rules.py), odd shapes, float64."""
import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import rsp_fast
from rsp_fast.init import comparative_relevance, gradcam_maps
from rsp_fast.kernels.reference import purge_reference, sectional_normalize_reference
from rsp_fast.kernels.triton import triton_unavailable_reason
from rsp_fast.ops.dispatch import TORCH
from rsp_fast.rules.base import Context
from rsp_fast.rules.conv import conv_geometry, first_conv_relevance, inner_conv_relevance
from rsp_fast.rules.conv_paths import choose_path
from rsp_fast.rules import conv_paths
from rsp_fast.rules.linear import inner_linear_relevance
from conftest import rel_err
from reference_rules import conv_rsp_one_sample, first_conv_one_sample, linear_rsp_loop, relative_gam_numpy

D = torch.float64
CTX = Context(values={}, shapes={}, ops=TORCH)

CONV_CASES = [  # C, O, k, stride, padding, dilation, groups, H, W
    (3, 5, 3, 1, 1, 1, 1, 7, 9),
    (4, 6, 3, 2, 1, 1, 2, 13, 13),
    (6, 6, 3, 1, 1, 1, 6, 7, 9),  # depthwise
    (6, 6, 5, 2, 2, 1, 6, 9, 7),  # depthwise, stride 2
    (4, 8, 3, 2, 2, 2, 4, 11, 9),  # depthwise, channel multiplier 2, stride 2, dilation 2
    (5, 5, 5, 3, 1, 1, 5, 13, 10),  # depthwise 5×5, stride 3 (the last rows not covered)
    (5, 7, 1, 1, 0, 1, 1, 7, 9),  # pointwise: no purge
    (5, 7, 1, 2, 0, 1, 1, 7, 9),  # strided pointwise (a ResNet shortcut): every other pixel
    (4, 6, 1, 3, 0, 1, 1, 8, 10),
    (4, 4, 3, 1, 2, 2, 1, 9, 9),  # dilation
    (3, 4, 2, 2, 0, 1, 1, 8, 9),  # even kernel, uncovered last column
    (17, 3, 3, 1, 0, 1, 1, 5, 5),
]


@pytest.mark.parametrize("path", ["filter", "gram", "conv", "grouped_conv", "implicit_gemm"])
@pytest.mark.parametrize("C,O,k,s,p,d,g,H,W", CONV_CASES)
def test_inner_conv_matches_authors_formulation_per_sample(C, O, k, s, p, d, g, H, W, path):
    conv = nn.Conv2d(C, O, k, stride=s, padding=p, dilation=d, groups=g).double()
    x = torch.randn(3, C, H, W, dtype=D)
    R = torch.randn(3, O, *conv(x).shape[-2:], dtype=D)
    R[1] = R[1].abs()  # a sample with an empty hostile section
    ours = inner_conv_relevance(CTX, x, R, conv_geometry(conv, (H, W)), path=path)
    for n in range(3):
        ref = conv_rsp_one_sample(x[n:n + 1], R[n:n + 1], conv.weight.shape, conv.stride, conv.padding, conv.dilation, g)
        assert rel_err(ours[n:n + 1], ref) < 1e-10


@pytest.mark.parametrize("path", ["filter", "gram"])
@pytest.mark.parametrize("stride", [2, 1])  # stride 1: the Gram path through the pixels' Gram matrix
def test_fused_triton_product_matches_the_reference_path(path, stride):
    from rsp_fast.ops import dispatch
    if dispatch._availability("triton", torch.device("cpu")):
        pytest.skip("Triton unavailable")
    conv = nn.Conv2d(5, 6, 3, stride=stride, padding=1).double()
    x = torch.randn(2, 5, 9, 7, dtype=D)
    R = torch.randn(2, 6, *conv(x).shape[-2:], dtype=D)
    fused = inner_conv_relevance(Context(values={}, shapes={}, ops=dispatch.TRITON), x, R, conv_geometry(conv, (9, 7)), path=path)
    assert rel_err(fused, inner_conv_relevance(CTX, x, R, conv_geometry(conv, (9, 7)), path=path)) < 1e-12


@pytest.mark.parametrize("path", [*conv_paths.CUDA_DENSE_PATHS, "gram"])
@pytest.mark.parametrize("groups,stride", [(1, 2), (2, 2), (1, 1)])  # stride 1: the Gram path via the pixels
def test_dense_paths_track_dropped_relevance_like_the_reference_path(path, groups, stride):
    """Each of the CUDA dense paths (they run on CPU too) and the Gram path with the
    dropped-relevance accounting, which reads the responses: the same relevance and the same
    dropped amount as the filter path."""
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups).double()
    x = torch.rand(3, 4, 11, 9, dtype=D)
    x[:, :, 3:10, 2:8] = 0  # all-zero patches: relevance there has no support and is dropped
    R = torch.randn(3, 6, *conv(x).shape[-2:], dtype=D)
    results = []
    for p in ("filter", path):
        ctx = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(3, dtype=D))
        results.append((inner_conv_relevance(ctx, x, R, conv_geometry(conv, (11, 9)), path=p), ctx.dropped))
    (expected, expected_drop), (got, drop) = results
    assert expected_drop.abs().min() > 1e-3
    assert rel_err(got, expected) < 1e-12
    torch.testing.assert_close(drop, expected_drop, rtol=1e-12, atol=1e-12)


def test_path_choice_follows_the_cost_model():
    assert choose_path(512 * 9, 512, 14 * 14) == "gram"  # VGG16 conv5
    assert choose_path(64 * 9, 64, 224 * 224) == "conv"  # VGG16 conv1_2
    assert choose_path(9, 1, 112 * 112) == "conv"  # depthwise: tiny filters
    assert choose_path(96, 24, 56 * 56, dense_pointwise=True) == "filter"  # the input is the patch matrix
    assert choose_path(64 * 9, 64, 224 * 224, cuda_dense=True) == "grouped_conv"  # CUDA: no per-sample loop
    assert choose_path(64 * 9, 64, 224 * 224, cuda_dense=True, tensor_cores=True) == "implicit_gemm"  # bf16, TF32
    assert choose_path(512 * 9, 512, 14 * 14, cuda_dense=True) == "gram"


def test_gram_path_weighed_against_the_implicit_gemms_only_where_they_run():
    """VGG16's conv4_2 (1.6× fewer multiply-adds on the Gram path) and conv5 (6.4×) with the Gram
    path's multiply-adds weighed against the implicit GEMMs on CUDA."""
    conv4, conv5 = (512 * 9, 512, 28 * 28), (512 * 9, 512, 14 * 14)
    tc = dict(cuda_dense=True, tensor_cores=True)
    assert choose_path(*conv4, **tc, gram_slowdown=4.0) == "implicit_gemm"
    assert choose_path(*conv5, **tc, gram_slowdown=4.0) == "gram"
    assert choose_path(*conv4, cuda_dense=True, gram_slowdown=4.0) == "gram"  # exact float32: against cuDNN, unweighed
    assert choose_path(*conv4, **tc, implicit_gemm_runs=False, gram_slowdown=4.0) == "gram"  # strided, grouped, tracking
    # CPU (stride 1: the Gram products from the 30×30 padded input's pixels)
    assert choose_path(*conv4, gram_slowdown=4.0, pixel_gram=512 * 900 * 900) == "gram"
    assert choose_path(*conv4, **tc) == "gram"  # unweighed
    assert choose_path(*conv5, **tc, gram_slowdown=float("inf")) == "implicit_gemm"
    # 16-bit products take the Gram path on implicit GEMMs too (multiply-adds compare as they are),
    # TF32 ones on unfolded patches, counted at 4×
    assert conv_paths.cuda_gram_slowdown(torch.bfloat16) == 1.0
    assert conv_paths.cuda_gram_slowdown(torch.float16) == 1.0
    assert conv_paths.cuda_gram_slowdown(torch.float32) == 4.0
    assert conv_paths.cuda_gram_slowdown(torch.float64) == 1.0


def test_implicit_gemms_only_where_each_sample_fits_32_bit_offsets():
    """The Triton implicit GEMMs address within a sample in 32 bits: a layer whose input, or
    sections (2·O per position), or filters (2·O·C per tap), or (the implicit Gram path) L×L Gram per sample reaches 2³¹
    elements runs on the library's convolutions (or the unfolded Gram path) instead."""
    bf16 = torch.bfloat16
    g = conv_geometry(nn.Conv2d(64, 64, 3, padding=1), (224, 224))
    assert conv_paths.implicit_gemm_fits(g, 64, 64, (224, 224), 224 * 224)  # VGG16's conv1_2
    assert not conv_paths.implicit_gemm_fits(g, 64, 64, (8192, 8192), 8192 * 8192)  # 2·64·8192² ≥ 2³¹
    assert not conv_paths.implicit_gemm_fits(g, 2**15, 1, (256, 256), 256 * 256)  # the input alone
    assert not conv_paths.implicit_gemm_fits(g, 2**13, 2**14, (8, 8), 64)  # the filters: 9·2·2¹⁴·2¹³ ≥ 2³¹
    strided = conv_geometry(nn.Conv2d(64, 64, 3, stride=2, padding=1), (224, 224))
    assert not conv_paths.implicit_gemm_fits(strided, 64, 64, (224, 224), 112 * 112)
    assert conv_paths.runnable_dense_path("gram", True, True, bf16, 196) == "implicit_gram"
    assert conv_paths.runnable_dense_path("gram", True, True, bf16, 46341) == "gram"  # 46341² ≥ 2³¹
    assert conv_paths.runnable_dense_path("implicit_gram", True, True, bf16, 46341) == "gram"
    assert conv_paths.runnable_dense_path("implicit_gemm", True, True, bf16, 46341) == "implicit_gemm"


def test_gram_path_on_implicit_gemms_by_precision_and_only_where_runnable(monkeypatch):
    bf16, f32 = torch.bfloat16, torch.float32
    assert conv_paths.cuda_gram_path(True, True, bf16) == "implicit_gram"
    assert conv_paths.cuda_gram_path(True, True, f32) == "gram"  # TF32: unfolded patches
    assert conv_paths.cuda_gram_path(True, True, torch.float64) == "gram"
    assert conv_paths.cuda_gram_path(False, True, bf16) == "gram"  # CPU
    assert conv_paths.cuda_gram_path(True, False, bf16) == "gram"  # strided, grouped, tracking, no Triton
    assert conv_paths.runnable_dense_path("gram", True, True, bf16) == "implicit_gram"
    assert conv_paths.runnable_dense_path("gram", True, True, f32) == "gram"
    assert conv_paths.runnable_dense_path("implicit_gram", False) == "gram"
    assert conv_paths.runnable_dense_path("implicit_gemm", False) == "grouped_conv"
    assert conv_paths.runnable_dense_path("implicit_gram", True) == "implicit_gram"
    # RSP_FAST_CUDA_IMPLICIT_GRAM=0 / =1: one choice for every precision
    monkeypatch.setattr(conv_paths, "CUDA_IMPLICIT_GRAM", dict.fromkeys((2, 4), False))
    assert conv_paths.cuda_gram_path(True, True, bf16) == "gram"
    assert conv_paths.cuda_gram_slowdown(bf16) == float("inf")
    monkeypatch.setattr(conv_paths, "CUDA_IMPLICIT_GRAM", dict.fromkeys((2, 4), True))
    assert conv_paths.cuda_gram_path(True, True, f32) == "implicit_gram"
    assert conv_paths.cuda_gram_slowdown(f32) == 1.0


def test_cuda_path_variables_are_read_where_used_and_bad_values_named(monkeypatch):
    """A bad RSP_FAST_CUDA_* value raised at import (a traceback for every command, CPU runs
    included); "yes" for a 0/1 switch meant off, without a word."""
    from rsp_fast.errors import RSPError
    bf16, f32 = torch.bfloat16, torch.float32
    code = "import os; os.environ['RSP_FAST_CUDA_GRAM_SLOWDOWN'] = 'abc'; import rsp_fast.rules.conv_paths"
    here = str(Path(rsp_fast.__file__).resolve().parents[1])  # this checkout's rsp_fast, not the one installed
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, "PYTHONPATH": here}).returncode == 0
    monkeypatch.setenv("RSP_FAST_CUDA_IMPLICIT_GRAM", "1")
    assert conv_paths.cuda_gram_path(True, True, f32) == "implicit_gram" and conv_paths.cuda_gram_slowdown(f32) == 1.0
    monkeypatch.setenv("RSP_FAST_CUDA_IMPLICIT_GRAM", "0")
    monkeypatch.setenv("RSP_FAST_CUDA_GRAM_SLOWDOWN", "2.5")
    assert conv_paths.cuda_gram_path(True, True, bf16) == "gram" and conv_paths.cuda_gram_slowdown(bf16) == 2.5
    monkeypatch.setenv("RSP_FAST_CUDA_DENSE_PATH", "filter")
    assert conv_paths.cuda_dense_path(True) == "filter"
    for name, value, message in [("RSP_FAST_CUDA_DENSE_PATH", "foo", "choose one of grouped_conv, implicit_gemm, filter, conv"),
                                 ("RSP_FAST_CUDA_GRAM_SLOWDOWN", "abc", "give a number above 0"),
                                 ("RSP_FAST_CUDA_GRAM_SLOWDOWN", "-1", "give a number above 0"),
                                 ("RSP_FAST_CUDA_IMPLICIT_GRAM", "yes", "choose 1 (on) or 0 (off)")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(RSPError, match=rf"^{name}='{value}': {re.escape(message)}"):
                conv_paths.cuda_dense_path(True), conv_paths.cuda_gram_slowdown(bf16)


def test_same_padding_conv_matches_explicit_padding():
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=0).double()
    conv.__class__ = type("Conv2dSame", (nn.Conv2d,), {})  # the rule keys timm's Conv2dSame by name
    x = torch.randn(2, 4, 8, 7, dtype=D)
    geom = conv_geometry(conv, (8, 7))
    # TF "same": out = ceil(in/2); total pad = (out-1)*2 + 3 - in = 2 (width 7), 1 (height 8), odd pixel right/bottom
    assert geom.pad == (1, 1, 0, 1)
    R = torch.randn(2, 5, 4, 4, dtype=D)
    ours = inner_conv_relevance(CTX, x, R, geom)
    for n in range(2):
        ref = conv_rsp_one_sample(x[n:n + 1], R[n:n + 1], conv.weight.shape, 2, 0, 1, 1, pad4=geom.pad)
        assert rel_err(ours[n:n + 1], ref) < 1e-10


@pytest.mark.parametrize("fused", [False, True])  # True: the Triton kernels (ungrouped convs; others fall back)
@pytest.mark.parametrize("C,O,s,p,d,g", [(3, 5, 1, 1, 1, 1), (3, 5, 2, 1, 1, 1), (3, 5, 2, 0, 1, 1), (3, 4, 1, 2, 2, 1),
                                         (3, 6, 2, 1, 1, 3), (4, 6, 1, 1, 1, 2)])
def test_first_conv_zb_matches_authors_formulation(C, O, s, p, d, g, fused):
    if fused and triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    conv = nn.Conv2d(C, O, 3, stride=s, padding=p, dilation=d, groups=g).double()
    x = torch.randn(2, C, 9, 11, dtype=D)
    R = torch.randn(2, O, *conv(x).shape[-2:], dtype=D)
    ours = first_conv_relevance(CTX, x, R, conv.weight, conv_geometry(conv, (9, 11)), fused=fused)
    for n in range(2):
        ref = first_conv_one_sample(x[n:n + 1], R[n:n + 1], conv.weight.detach(), s, p, d, g)
        assert rel_err(ours[n:n + 1], ref) < 1e-10
    # z^B conserves: Σ R_in = Σ R where Z ≠ 0
    assert torch.allclose(ours.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C,O,k,s,p,d,hw", [(3, 24, 7, 2, 3, 1, (13, 14)),  # ResNet's stem, more channels than a tile
                                            (1, 8, 5, 3, (2, 0), 2, (17, 13)), (20, 6, 3, 1, "same", 1, (10, 12)),
                                            (3, 16, 2, 1, "same", 1, (8, 9))])  # even kernel: padding on one side
def test_first_conv_fused_kernels_match_the_convolutions(C, O, k, s, p, d, hw, dtype):
    """The Triton z^B kernels against the cuDNN-style path: strides, dilations, uneven
    padding, channel and output-channel blocks, channels-last input; float32 within rounding
    (the kernels sum Z's terms, all ≥ 0, in another order)."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    conv = nn.Conv2d(C, O, k, stride=s, padding=p, dilation=d).to(dtype)
    g = conv_geometry(conv, hw)
    x = torch.randn(3, C, *hw, dtype=dtype).to(memory_format=torch.channels_last)
    R = torch.randn(3, O, *g.out_size(*hw), dtype=dtype)
    expected = first_conv_relevance(CTX, x, R, conv.weight, g, fused=False)
    got = first_conv_relevance(CTX, x, R, conv.weight, g, fused=True)
    assert got.shape == x.shape and rel_err(got, expected) < (1e-12 if dtype == D else 1e-5)
    tracking = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(3, dtype=dtype))
    assert torch.equal(first_conv_relevance(tracking, x, R, conv.weight, g, fused=True), expected)  # tracking: the convolutions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_fused_first_layer_takes_half_precision_inputs(dtype):
    """The Triton z^B kernels form products in float32 for 16-bit tensors: W⁺ = max(W, 0) became
    float32 inside them while x − L stayed 16-bit, and tl.dot refused the mixed operands."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    x = torch.rand(2, 3, 9, 8, dtype=D)
    g = conv_geometry(conv, (9, 8))
    R = torch.randn(2, 8, *g.out_size(9, 8), dtype=D)
    expected = first_conv_relevance(CTX, x, R, conv.weight, g, fused=False)
    got = first_conv_relevance(CTX, x.to(dtype), R.to(dtype), conv.weight.to(dtype), g, fused=True)
    assert got.dtype == dtype and rel_err(got.double(), expected) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", ["conv", "grouped_conv", "linear"])
def test_first_layer_on_a_blank_picture_gives_nothing_and_drops_everything(layer, dtype):
    """A blank picture (x = L = H) has Z = 0 at every output: z^B gives it no relevance and drops
    all of R. Formed as conv(x, W) − L·conv(1, W⁺) − H·conv(1, W⁻), Z was rounding noise that S = R/Z
    turned into relevance as large as R (and ΣR_in ≠ ΣR − dropped); its terms (x − L)·W⁺ and
    (x − H)·W⁻ are each ≥ 0, so Z is exact here, and beside it a picture of mostly saturated
    pixels keeps float32 within rounding of float64."""
    torch.manual_seed(0)
    net = {"conv": lambda: nn.Conv2d(3, 8, 3, padding=1), "grouped_conv": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
           "linear": lambda: nn.Linear(12, 8)}[layer]().double()
    shape = (3, 12) if layer == "linear" else (3, net.in_channels, 7, 9)
    x = torch.rand(*shape, dtype=D)
    x[0] = 0.7  # blank
    x[1] = x[1].clamp(0.2, 0.8)  # mostly saturated: many pixels at L or H
    with torch.no_grad():
        R = torch.randn_like(net(x))
    tracking = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(3, dtype=dtype))
    if layer == "linear":
        from rsp_fast.rules.linear import first_linear_relevance
        rule = lambda ctx, t: first_linear_relevance(ctx, x.to(t), R.to(t), net.weight.detach().to(t))  # noqa: E731
    else:
        g = conv_geometry(net, x.shape[-2:])
        rule = lambda ctx, t: first_conv_relevance(ctx, x.to(t), R.to(t), net.weight.detach().to(t), g)  # noqa: E731
    R_in = rule(tracking, dtype)
    assert torch.equal(R_in[0], torch.zeros_like(R_in[0]))
    assert torch.isclose(tracking.dropped[0].double(), R[0].sum(), rtol=1e-6)
    kept = R.flatten(1).sum(1) - tracking.dropped.double()
    assert torch.allclose(R_in.flatten(1).sum(1).double(), kept, rtol=0, atol=1e-10 if dtype == D else 1e-4)
    exact = rule(CTX, D)
    assert rel_err(R_in[1:].double(), exact[1:]) < (1e-12 if dtype == D else 1e-5)


def test_inner_linear_matches_loops():
    x = torch.randn(3, 7, dtype=D)
    W = torch.randn(5, 7, dtype=D)
    R = torch.randn(3, 5, dtype=D)
    assert rel_err(inner_linear_relevance(CTX, x, R, W), linear_rsp_loop(x, R, W)) < 1e-10


def test_sectional_normalize_and_purge_edge_cases():
    R = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]], dtype=D)
    Ga = torch.tensor([[2.0, 5.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=D)
    Gb = torch.tensor([[7.0, 4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=D)
    Sp, Sn = sectional_normalize_reference(R, Ga, Gb)
    assert Sp.tolist() == [[0.5, 0.0, 0.0, 0.0], [0.0] * 4]  # Ga = 0 under R⁺ = 3: dropped, not inf
    assert Sn.tolist() == [[0.0, 0.5, 0.0, 0.0], [0.0] * 4]
    dx = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=D)
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=D)
    out = purge_reference(dx, x, torch.tensor([4.0, 5.0], dtype=D))
    # D = [2, 0, -6]: two active units share a shift of 4/2; an all-zero sample stays zero
    assert out.tolist() == [[0.0, 0.0, -8.0], [0.0, 0.0, 0.0]]


def _single_op_model(op):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.op = op
            self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

        def forward(self, x):
            return self.head(self.op(torch.relu(self.conv(x))))
    m = M().double()
    m(torch.randn(1, 3, 6, 6, dtype=D))
    return m.eval()


@pytest.mark.parametrize("op", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                                nn.MaxPool2d(2, 1, dilation=2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d((2, 3)),
                                nn.Upsample(scale_factor=2), nn.Upsample(size=(9, 7), mode="bilinear")])
def test_pool_rule_is_the_z_rule(op):
    """Pooling, and resizing with weights ≥ 0 (a positive linear map like average pooling)."""
    m = _single_op_model(op)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    ex = rsp_fast.RSP(m, layer="op", init="gradcam").explain(x, record=True)
    R_out = ex.initial
    a = torch.relu(m.conv(x)).detach() + 1e-9
    a.requires_grad_()
    Z = op(a)
    S = torch.where(Z != 0, R_out / Z, torch.zeros_like(Z))
    (g,) = torch.autograd.grad(Z, a, S)
    assert rel_err(ex.steps["op"], a.detach() * g) < 1e-12
    assert torch.allclose(ex.steps["op"].sum((1, 2, 3)), R_out.sum((1, 2, 3)), rtol=1e-9)


class _TinyPool(nn.Module):
    """conv → ReLU → a max pool spelled one of several ways → conv, with the activations the pool
    reads scaled by ``scale`` (the next conv's weight ÷ scale: the same forward)."""

    def __init__(self, pool, scale, three_d=False):
        super().__init__()
        conv = nn.Conv3d if three_d else nn.Conv2d
        self.c1, self.c2, self.pool = conv(3, 8, 3, padding=1), conv(8, 8, 3, padding=1), pool
        torch.manual_seed(0)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)
        with torch.no_grad():
            self.c1.weight.mul_(scale), self.c1.bias.mul_(scale), self.c2.weight.div_(scale)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.pool(torch.relu(self.c1(x))))).flatten(2).mean(2))


@pytest.mark.parametrize("pool", ["module", "function", "adaptive", "3d"])
def test_max_pools_route_by_the_maxima_at_any_activation_scale(pool):
    """Max pools other than MaxPool1d/2d modules took the z-rule through pool(x + 1e-9): where
    activations are near 1e-9's rounding, their windows tie and R went to the first element
    (float32, activations of 1e-20: 0.35 of the map's peak off the same model at scale 1)."""
    three_d = pool == "3d"
    pools = {"module": nn.MaxPool2d(2), "function": lambda x: F.max_pool2d(x, 2), "adaptive": nn.AdaptiveMaxPool2d(4),
             "3d": nn.MaxPool3d((1, 2, 2))}
    x = torch.randn((2, 3, 2, 8, 8) if three_d else (2, 3, 8, 8))
    maps = []
    for scale in (1.0, 1e-20):
        model = _TinyPool(pools[pool], scale, three_d).eval()
        explainer = rsp_fast.RSP(model, layer="c2")
        R0 = explainer.explain(x).initial if not maps else R0
        maps.append(explainer.attribute(x, initial=R0))
    assert rel_err(maps[1], maps[0]) < 1e-5


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_a_max_pool_window_that_misses_every_pixel_drops_its_relevance():
    """MaxPool2d(2, 2, padding=1, dilation=2, ceil_mode=True) on a 1×1 map: its one window reads
    only padding; PyTorch gives -inf and an index past the plane, which the rule wrote through
    (a bare RuntimeError from scatter_add_, found by the authors' parity fuzz)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 4, 7), nn.ReLU(),
                          nn.MaxPool2d(2, 2, 1, dilation=2, ceil_mode=True), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 5)).double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=D)
    ex = rsp_fast.RSP(model, layer="5", init="gradcam").explain(x, record=True)
    assert torch.isfinite(ex.attribution).all()
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)))
    # the same pool as a function (the z-rule through it): R given on the window is dropped, counted
    model[4] = _Lambda(lambda t: F.max_pool2d(t, 2, 2, 1, dilation=2, ceil_mode=True))
    ones = torch.ones(2, 4, 1, 1, dtype=D)
    ex = rsp_fast.RSP(model, layer="5").explain(x, record=True, initial=ones)
    assert torch.equal(ex.dropped, ones.sum((1, 2, 3))) and torch.equal(ex.attribution, torch.zeros_like(x))


def test_relevance_a_zero_padding_crops_away_is_counted_as_dropped():
    """A norm after a zero padding makes the border non-zero (Hugging Face BiT's stem: conv, pad,
    GroupNorm, ReLU, max pool): relevance reaches the border and the pad crops it away, which
    ``dropped`` did not count (ΣR_in + dropped fell short of ΣR₀ by up to 1e-3)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ZeroPad2d(1), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.MaxPool2d(3, 2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).double().eval()
    with torch.no_grad():
        model[2].bias.fill_(0.5)  # the border: 0.5 after the norm
    ex = rsp_fast.RSP(model, layer="6", init="gradcam").explain(torch.randn(2, 3, 17, 17, dtype=D), record=True)
    assert ex.steps["1"].sum() != ex.steps["2"].sum()  # some relevance did reach the border
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-12, atol=0)


class _MadeInForward(nn.Module):
    """Modules made inside the forward (Cadene's NASNet pads with ``nn.ZeroPad2d(...)(x)``), or
    the same modules installed once."""

    def __init__(self, fresh):
        super().__init__()
        self.fresh = fresh
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Linear(8, 5)
        self.pad, self.act, self.pool = nn.ZeroPad2d((1, 0, 1, 0)), nn.ReLU(), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = (nn.ReLU() if self.fresh else self.act)(self.c1(x))
        x = (nn.ZeroPad2d((1, 0, 1, 0)) if self.fresh else self.pad)(x)
        x = (nn.ReLU() if self.fresh else self.act)(self.c2(x))
        return self.fc((nn.AdaptiveAvgPool2d(1) if self.fresh else self.pool)(x).flatten(1))


def test_modules_made_inside_the_forward_are_traced_through():
    """fx cannot name them ('not installed as a submodule'): the model was refused as untraceable."""
    torch.manual_seed(0)
    installed = _MadeInForward(False).double().eval()
    fresh = _MadeInForward(True).double().eval()
    fresh.load_state_dict(installed.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=D)
    assert rel_err(rsp_fast.RSP(fresh, layer="c2").attribute(x), rsp_fast.RSP(installed, layer="c2").attribute(x)) < 1e-12


def test_max_pools_keep_indices_not_their_inputs():
    model = torchvision.models.vgg11(num_classes=5).eval()
    plan = rsp_fast.RSP(model).plan
    pools = [s for s in plan.steps if isinstance(s.module if hasattr(s, "module") else None, nn.MaxPool2d)]
    assert len(pools) == 4 and all(type(s).__name__ == "MaxPoolByIndices" for s in pools)
    assert not any(s.inputs[0] in plan.saved for s in pools)  # the ReLU outputs before the pools are freed


def test_add_rule_and_fan_out():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.branch = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3))

        def forward(self, x):
            s = torch.relu(self.stem(x))
            return self.head(torch.relu(self.branch(s) + s))
    m = Res().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    explainer = rsp_fast.RSP(m, init="gradcam")
    assert explainer.layer == "relu_1"  # default: the last map before flatten
    ex = explainer.explain(x, record=True)
    s = torch.relu(m.stem(x)).detach()
    b = m.branch(s).detach()
    R = ex.initial
    a_hat, b_hat = b.clamp(min=0) + 1e-9, s.clamp(min=0) + 1e-9
    names = {k for k in ex.steps if k.startswith("add")}
    assert len(names) == 1
    # the add's first input is branch(s): its relevance is â·R/(â+b̂)
    assert rel_err(ex.steps[names.pop()], a_hat * R / (a_hat + b_hat)) < 1e-12
    # fan-out: s gets the skip share plus what the branch conv sends back; all is conserved
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize("op,b_channels,features,first_share", [
    ("cat", 5, 7 * 16, lambda R: R[:, :2]),  # concatenated channels: the first 2 are a's
    ("stack", 2, 2 * 2 * 16, lambda R: R[:, :, 0]),  # stacked along dim 2: index 0 is a's
])
def test_concatenation_and_stacking_split_relevance(op, b_channels, features, first_share):
    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 2, 3, padding=1)
            self.b = nn.Conv2d(3, b_channels, 1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(features, 4))

        def forward(self, x):
            parts = [self.a(x), self.b(x)]
            return self.head(torch.relu(torch.cat(parts, 1) if op == "cat" else torch.stack(parts, 2)))
    m = Joined().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=D)
    ex = rsp_fast.RSP(m, init="gradcam").explain(x, record=True)
    name = next(k for k in ex.steps if k.startswith(op))
    assert torch.equal(ex.steps[name], first_share(ex.initial))
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.flatten(1).sum(1), rtol=1e-9)


class _Scaled(nn.Module):
    """stem → ReLU → (× factor, or ÷, or nothing) → conv → ReLU → head."""

    def __init__(self, scale=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 36, 4))
        self.scale = scale

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.scale is not None:
            h = self.scale(h)
        return self.head(torch.relu(self.body(h)))


@pytest.mark.parametrize("scale", [lambda h: h * 2.5, lambda h: 2.5 * h, lambda h: h / 0.4, lambda h: torch.mul(h, 2.5)])
def test_constant_factor_passes_relevance_unchanged(scale):
    """h·c before an inner conv is the same network as the stem's weights and bias times c;
    RSP must give the same attribution for both (the constant gets no relevance)."""
    torch.manual_seed(0)
    scaled = _Scaled(scale).double().eval()
    folded = _Scaled().double().eval()
    folded.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        folded.stem.weight.mul_(2.5), folded.stem.bias.mul_(2.5)
    x = torch.randn(3, 3, 6, 6, dtype=D)
    assert torch.allclose(scaled(x), folded(x))
    R_scaled, R_folded = rsp_fast.RSP(scaled).attribute(x), rsp_fast.RSP(folded).attribute(x)
    assert rel_err(R_scaled, R_folded) < 1e-10


def test_swish_as_a_gate_equals_silu():
    """x·σ(x) traced as a product with a sigmoid gate gives what nn.SiLU (pass-through) gives."""
    torch.manual_seed(1)
    silu = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 5, 3, padding=1), nn.SiLU(),
                         nn.Flatten(), nn.Linear(5 * 36, 4)).double().eval()

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)
    swish = nn.Sequential(*[Swish() if isinstance(m, nn.SiLU) else m for m in silu]).eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert rel_err(rsp_fast.RSP(swish, layer="3").attribute(x), rsp_fast.RSP(silu, layer="3").attribute(x)) < 1e-12


class _Gated(nn.Module):
    """h · gate(h) with the gate built five ways: squeeze-and-excitation with a Hardsigmoid
    module, the sigmoid as the last module of a wrapper (nn.Sequential), ECA's reshaped and
    expanded gate, GhostNetV2's gate computed at low resolution and resized to h, attention
    weights: a softmax over positions."""

    def __init__(self, style, c=6):
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.gate = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid()) if style == "wrapped" else nn.Hardsigmoid()
        self.body = nn.Conv2d(c, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3))

    def forward(self, x):
        h = F.hardswish(self.stem(x))
        if self.style == "se":
            g = self.gate(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        elif self.style == "wrapped":
            g = self.gate(h.mean((2, 3), keepdim=True))
        elif self.style == "eca":
            g = torch.sigmoid(h.mean((2, 3))).view(h.shape[0], -1, 1, 1).expand_as(h)
        elif self.style == "positions":  # the map is activated, the weights not: still the weights are the gate
            g = F.softmax(self.fc1(h)[:, :1].flatten(2), dim=-1).view(h.shape[0], 1, h.shape[2], h.shape[3])
        else:  # resized
            g = F.interpolate(torch.sigmoid(F.avg_pool2d(self.fc2(self.fc1(h)), 2, ceil_mode=True)), size=h.shape[-2:])
        return self.head(torch.relu(self.body(g * h)))


@pytest.mark.parametrize("style", ["se", "wrapped", "eca", "resized", "positions"])
def test_gates_send_all_relevance_to_the_signal(style):
    m = _Gated(style).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    ex = rsp_fast.RSP(m, init="gradcam").explain(x, record=True)
    mul = next(k for k in ex.steps if k.startswith("mul"))
    assert ex.steps[mul].shape == (2, 6, 5, 5)  # the signal h, not the gate
    assert torch.equal(ex.steps[mul], ex.steps["body"])  # R at the product's output, unchanged
    assert not any(k.startswith(("fc1", "fc2", "gate", "mean", "sigmoid", "interpolate", "softmax")) for k in ex.steps)
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def test_attention_pooling_of_the_last_map_by_weights_over_positions():
    """(h · softmax(a(h)) over positions).sum: the default layer is the weighted map, its
    relevance all h's, as with the weights given as a constant (one sample: a buffer)."""
    class Pooled(nn.Module):
        def __init__(self, fixed=None):
            super().__init__()
            self.stem, self.attn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 1, 1), nn.Linear(4, 3)
            self.register_buffer("fixed", fixed)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            w = self.fixed if self.fixed is not None else \
                torch.softmax(self.attn(h).flatten(2), -1).view(h.shape[0], 1, h.shape[2], h.shape[3])
            return self.fc((h * w).sum((2, 3)))
    torch.manual_seed(4)
    model, x = Pooled().double().eval(), torch.randn(1, 3, 6, 5, dtype=D)
    w = torch.softmax(model.attn(torch.relu(model.stem(x))).flatten(2), -1).view(1, 1, 6, 5)
    fixed = Pooled(w).double().eval()
    fixed.load_state_dict(model.state_dict(), strict=False)  # all but the weights
    assert torch.allclose(fixed(x), model(x))
    ex = rsp_fast.RSP(model).explain(x)
    assert ex.layer == "mul"
    assert rel_err(ex.attribution, rsp_fast.RSP(fixed).attribute(x)) < 1e-12


def test_an_accumulator_started_at_zero_passes_relevance():
    """MobileOne sums its branches into ``out = 0``: 0 + a + b explains as a + b."""
    class Branches(nn.Module):
        def __init__(self, start_at_zero):
            super().__init__()
            self.start_at_zero = start_at_zero
            self.stem, self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3))

        def forward(self, x):
            h = torch.relu(self.stem(x))
            out = 0 if self.start_at_zero else self.a(h)
            for branch in ((self.a, self.b) if self.start_at_zero else (self.b,)):
                out = out + branch(h)
            return self.head(torch.relu(out))
    torch.manual_seed(3)
    zero, plain = Branches(True).double().eval(), Branches(False).double().eval()
    plain.load_state_dict(zero.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=D)
    assert rel_err(rsp_fast.RSP(zero).attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12


class _ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm over channels-last, pointwise MLP, layer scale (a parameter
    as the factor, reshaped), residual add: ConvNeXt's block."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.linspace(-0.5, 1.0, c))
        self.head = nn.Sequential(nn.GroupNorm(2, c), nn.Flatten(), nn.Linear(c * 9, 3))

    def forward(self, x):
        h = self.stem(x)
        y = self.norm(self.dw(h).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(h + y.mul(self.gamma.reshape(1, -1, 1, 1)))


def test_unfoldable_norms_and_layer_scale_pass_relevance_through():
    m = _ConvNeXtBlock().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    explainer = rsp_fast.RSP(m, layer="head.0", init="gradcam")
    ex = explainer.explain(x, record=True)
    assert torch.equal(ex.steps["head.0"], ex.initial)  # GroupNorm: R passes through
    # the add gives the scaled branch b̂·R/(â+b̂); the layer scale passes that on unchanged
    with torch.no_grad():
        h = m.stem(x)
        b = m.fc2(F.gelu(m.fc1(m.norm(m.dw(h).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2) * m.gamma.view(1, -1, 1, 1)
    a_hat, b_hat = h.clamp(min=0) + 1e-9, b.clamp(min=0) + 1e-9
    mul = next(k for k in ex.steps if k.startswith("mul"))
    assert rel_err(ex.steps[mul], b_hat * ex.initial / (a_hat + b_hat)) < 1e-12
    assert torch.equal(ex.steps["norm"], ex.steps["fc1"])  # LayerNorm: R passes through
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)
    kinds = {type(s).__name__ for s in explainer.plan.steps}
    assert {"Scale", "PassThrough"} <= kinds


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an N×C×H×W map, written out as ConvNeXt's own code and
    Hugging Face's ConvNextLayerNorm do, or as timm's LayerNorm2d (permute, F.layer_norm)."""

    def __init__(self, c, written):
        super().__init__()
        self.written = written
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) / 10)

    def forward(self, x):
        if not self.written:
            return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)
        u = x.mean(1, keepdim=True)
        centred = x - u if self.written == "operator" else torch.sub(x, u, alpha=1)
        x = centred / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@pytest.mark.parametrize("spelling", ["operator", "torch.sub"])
def test_a_layernorm_written_out_passes_relevance_through_like_layer_norm(spelling):
    """x − x.mean(1) is a norm's centring: all of R to x, as for x / its standard deviation.
    It took the rule of a difference of two signals, and the map was 0.21 of its peak off."""
    def net(written):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _LayerNorm2d(8, written), nn.Conv2d(8, 6, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double().eval()
    torch.manual_seed(0)
    library, written = net(False), net(spelling)
    written.load_state_dict(library.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=D)
    assert torch.allclose(written(x), library(x))
    for init in ("comparative", "gradcam"):
        expected = rsp_fast.RSP(library, init=init).attribute(x)
        assert rel_err(rsp_fast.RSP(written, init=init).attribute(x), expected) < 1e-12


class _StdConv2d(nn.Conv2d):
    """Weight standardisation in the forward (timm's StdConv2d, as in BiT and NFNets)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _TwiceConv2d(nn.Conv2d):
    """A custom forward that is not one convolution: RSP cannot know what it computes."""

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.weight, None, padding=1), self.weight[:, :self.weight.shape[0]], padding=1)


def test_weight_standardised_convs_explain_as_convs_with_their_effective_weights():
    torch.manual_seed(5)

    def net(conv):
        return nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(5 * 9, 3)).double().eval()
    std, plain = net(_StdConv2d), net(nn.Conv2d)
    plain.load_state_dict(std.state_dict())
    with torch.no_grad():
        for i in (0, 2):
            w = std[i].weight
            plain[i].weight.copy_((w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5))
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(std(x), plain(x))
    explainer = rsp_fast.RSP(std)
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12
    # kept whole (its probe ran outside fx's patches): no probe or standardisation ops in the graph
    assert [n.target for n in explainer.plan.graph.nodes if n.op == "call_module"][:3] == ["0", "1", "2"]
    assert not [n for n in explainer.plan.graph.nodes if n.op == "call_function"]


class _ConvBN(nn.Conv2d):
    """A "ConvBN" block written as a Conv2d subclass: its own BatchNorm applied in its forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn = nn.BatchNorm2d(self.out_channels)

    def forward(self, x):
        return self.bn(super().forward(x))


def test_a_conv_subclass_that_changes_its_output_is_traced_into():
    """The weight probe took any subclass making one conv of its input for a conv with that weight:
    a first layer's z^B rule then left out the BatchNorm its forward applies after the conv
    (0.70 of the peak off with some γ < 0)."""
    torch.manual_seed(0)
    tail = [nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    first = _ConvBN(3, 8, 3, padding=1)
    with torch.no_grad():
        first.bn.weight.copy_(torch.tensor([1.0, -1, 0.5, -0.7, 1.2, 0.8, -1.5, 1]))
        first.bn.running_mean.uniform_(-0.2, 0.2)
        first.bn.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(first, nn.ReLU(), *tail).double().eval()
    conv = nn.Conv2d(3, 8, 3, padding=1)
    conv.load_state_dict({"weight": first.weight, "bias": first.bias})
    plain = nn.Sequential(conv, copy.deepcopy(first.bn), nn.ReLU(), *copy.deepcopy(tail)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert rel_err(model(x), plain(x)) < 1e-14
    for init in ("gradcam", "comparative"):
        ours = rsp_fast.RSP(model, layer="3", init=init).attribute(x)
        assert rel_err(ours, rsp_fast.RSP(plain, layer="4", init=init).attribute(x)) < 1e-12


class _SamePadConv2d(nn.Conv2d):
    """TF-style "same" padding worked out from the input's size, then the conv without padding
    (Hugging Face's BiT convs, efficientnet_pytorch's Conv2dDynamicSamePadding)."""

    def forward(self, x):
        pads = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclasses_that_pad_their_input_or_convolve_twice_are_traced_into():
    """The probe took a conv that pads its input first for a weight-standardised one: the pad was
    lost (a bare RuntimeError from F.fold, or inner maps without it); such forwards are now
    explained op by op, as the same ops written out."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 11, 11, dtype=D)

    def net(first, inner):
        return nn.Sequential(first, nn.ReLU(), inner, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 3)).double().eval()
    same = net(_SamePadConv2d(3, 8, 3, stride=2), _SamePadConv2d(8, 8, 3, stride=2))
    # 11 → 6 → 3: "same" pads 2 (1 + 1) at stride 2 on 11, then 1 (0 + 1) on 6
    written = net(nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 8, 3, stride=2)),
                  nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2)))
    written.load_state_dict({k.replace("0.", "0.1.", 1).replace("2.", "2.1.", 1) if k[0] in "02" else k: v
                             for k, v in same.state_dict().items()})
    assert torch.allclose(same(x), written(x))
    assert rel_err(rsp_fast.RSP(same).attribute(x), rsp_fast.RSP(written).attribute(x)) < 1e-12

    twice = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _TwiceConv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 2)).double().eval()
    convs = [nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(2)]
    apart = nn.Sequential(twice[0], twice[1], *convs, twice[3], twice[4], twice[5]).double().eval()
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(twice[2].weight)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(twice(x), apart(x))
    assert rel_err(rsp_fast.RSP(twice, layer="3").attribute(x), rsp_fast.RSP(apart, layer="4").attribute(x)) < 1e-12


def test_products_of_activations_are_refused_by_name():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 2))

        def forward(self, x):
            return self.head(torch.relu(self.a(x)) * torch.relu(self.b(x)))
    with pytest.raises(rsp_fast.UnsupportedModelError, match=r"mul: a product of two position-wise activations") as err:
        rsp_fast.RSP(Bilinear())
    assert "getattr" not in str(err.value) and "size" not in str(err.value).split("Supported")[0]


@pytest.mark.parametrize("op,named,not_named", [
    (lambda h: F.pad(h, (1, 1, 1, 1), value=0.5)[..., 1:-1, 1:-1], r"pad: padding with the constant 0.5, a border", ()),
    (nn.ConstantPad2d((1, 1, 1, 1), 1.0), r"op_module: ConstantPad2d \(padding with the constant 1.0, a border", ()),
    (lambda h: torch.where(h > 0, h, 0.1 * h), r"no RSP rule for where: torch.where \(between", ("gt",)),
    (lambda h: h.topk(2, 1).values.repeat(1, 2, 1, 1), r"no RSP rule for topk: Tensor.topk \(between", ("getattr",))],
    ids=["pad-value", "constant-pad-module", "where-mask", "topk-values"])
def test_a_refusal_names_the_op_and_why_not_its_parts(op, named, not_named):
    """A constant pad of another value than 0 was refused as a bare "F.pad" (which the supported
    list names); the comparison that makes torch.where's mask and the .values field of topk were
    named beside the op without a rule, as if they were ops of their own on the path."""
    with pytest.raises(rsp_fast.UnsupportedModelError, match=named) as err:
        rsp_fast.RSP(_Around(op).double().eval())
    said = str(err.value).split("Supported:")[0]
    assert not any(part in said for part in not_named), said


def test_an_index_write_in_the_forward_is_named():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(x)
            h[:, :4] = 0
            return self.fc(h.mean((2, 3)))
    with pytest.raises(rsp_fast.UnsupportedModelError, match=r"writes into an activation by index \(h\[:, :4\] = v\), "
                                                             "which torch.fx cannot trace: write it as torch.cat"):
        rsp_fast.RSP(Masked()).attribute(torch.randn(2, 3, 8, 8))


class _Bicubic(nn.Module):
    def __init__(self, as_module: bool):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bicubic") if as_module else None

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.up(h) if self.up is not None else F.interpolate(h, scale_factor=2, mode="bicubic")
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


@pytest.mark.parametrize("as_module", [False, True], ids=["function", "module"])
def test_resizing_with_negative_weights_is_refused_by_mode(as_module):
    with pytest.raises(rsp_fast.UnsupportedModelError, match=r"resizing in mode 'bicubic', whose weights can be negative"):
        rsp_fast.RSP(_Bicubic(as_module))


def _swap_halves(h):
    a, b = h.chunk(2, 1)
    return torch.cat([b, a], 1)


def _channel_shuffle(h):  # ShuffleNet's
    n, c, H, W = h.size()
    return h.view(n, 2, c // 2, H, W).transpose(1, 2).contiguous().view(n, c, H, W)


def _split_and_slice(h):
    first, second = torch.split(h[:, :2], 1, dim=1)
    return torch.cat([h[:, 2:], second, first], 1)


@pytest.mark.parametrize("shuffle,inverse", [
    (_swap_halves, lambda R: torch.cat([R[:, 3:], R[:, :3]], 1)),
    (_channel_shuffle, lambda R: R.view(R.shape[0], 3, 2, *R.shape[2:]).transpose(1, 2).reshape(R.shape)),
    (_split_and_slice, lambda R: torch.cat([R[:, 5:6], R[:, 4:5], R[:, :4]], 1)),
])
def test_index_maps_send_relevance_back_to_where_it_came_from(shuffle, inverse):
    """chunk / split / indexing / transpose are pure index maps: R at their input is R at
    their output moved back by the inverse map."""
    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3))

        def forward(self, x):
            return self.head(torch.relu(self.body(shuffle(torch.relu(self.stem(x))))))
    m = Shuffled().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    ex = rsp_fast.RSP(m, init="gradcam").explain(x, record=True)
    assert torch.equal(ex.steps["relu"], inverse(ex.steps["body"]))
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


class _Around(nn.Module):
    """A test model around one op: conv → op → conv → pooled head. ``op`` is a module
    (registered) or a function; ``rectified``: the op reads the first conv's ReLU output."""

    def __init__(self, op, stem_channels: int = 4, body_channels: int = 4, rectified: bool = True):
        super().__init__()
        self.op_module = op if isinstance(op, nn.Module) else None
        self.op_fn = None if self.op_module is not None else op
        self.rectified = rectified
        self.stem, self.body = nn.Conv2d(3, stem_channels, 3, padding=1), nn.Conv2d(body_channels, 5, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h) if self.rectified else h
        h = self.op_module(h) if self.op_module is not None else self.op_fn(h)
        return self.head(torch.relu(self.body(h)))


def _explained_alike(op, written, **sizes) -> None:
    """``op`` and the same computation ``written`` out give the same model output and attribution."""
    torch.manual_seed(0)
    m, twin = _Around(op, **sizes).double().eval(), _Around(written, **sizes).double().eval()
    twin.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert torch.allclose(m(x), twin(x))
    ex = rsp_fast.RSP(m).explain(x, record=True)
    assert rel_err(ex.attribution, rsp_fast.RSP(twin).attribute(x)) < 1e-12
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def _stack_of_unbound(h):
    c0, c1, c2, c3 = h.unbind(1)
    return torch.stack([c0, c1, c2, c3], 2)


def _cat_of_split_rows(h):
    p0, p1, p2, p3 = torch.split(h, 2, 2)
    return torch.cat([p0, p1, p2, p3], dim=1)


def _cat_of_halves(h, dim):
    a, b = h.chunk(2, 1)
    return torch.cat([a, b], dim)


@pytest.mark.parametrize("whole,pieces,body", [
    (lambda h: torch.cat(h.chunk(2, 1), 1), lambda h: _cat_of_halves(h, 1), 4),
    (lambda h: torch.cat(h.chunk(2, 1), 2), lambda h: _cat_of_halves(h, 2), 2),
    (lambda h: torch.stack(torch.unbind(h, 1), 2), _stack_of_unbound, 8),
    (lambda h: torch.cat(tensors=torch.split(h, 2, 2), dim=1), _cat_of_split_rows, 16),
    (lambda h: torch.cat(h.chunk(2, 1)[::-1], 1), lambda h: torch.cat([h[:, 2:], h[:, :2]], 1), 4),
    (lambda h: torch.stack(h.unbind(1)[1:3], 1), lambda h: torch.stack([h[:, 1], h[:, 2]], 1), 2),
], ids=["cat-chunk", "cat-chunk-other-dim", "stack-unbind", "cat-split-kwargs", "cat-halves-swapped", "stack-some"])
def test_a_split_handed_whole_to_cat_or_stack(whole, pieces, body):
    """torch.cat / torch.stack given a split's tuple as it is (not unpacked first), or a slice
    of it: relevance goes back as for the pieces unpacked and joined."""
    _explained_alike(whole, pieces, body_channels=body)


@pytest.mark.parametrize("cast", [lambda h: h.double(), lambda h: h.type(torch.float64), lambda h: h.to(torch.float64),
                                  lambda h: h.type_as(h)], ids=["double", "type", "to", "type_as"])
def test_casts_pass_relevance_through(cast):
    """A cast (here one that keeps every value) moves relevance unchanged."""
    _explained_alike(cast, lambda h: h)


@pytest.mark.parametrize("cast", [lambda h: h.half().double(), lambda h: h.bfloat16().double(),
                                  lambda h: h.float().double()], ids=["half", "bfloat16", "float"])
def test_rounding_casts_are_explained(cast):
    """Casts to a narrower type and back are explained (pass-through), relevance conserved."""
    m = _Around(cast).double().eval()
    ex = rsp_fast.RSP(m).explain(torch.randn(2, 3, 8, 8, dtype=D), record=True)
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def _space_to_depth(h):  # pixel_unshuffle(h, 2) written as a reshape and a permute
    N, C, H, W = h.shape
    return h.view(N, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(N, 4 * C, H // 2, W // 2)


def _depth_to_space(h):  # pixel_shuffle(h, 2)
    N, C, H, W = h.shape
    return h.view(N, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(N, C // 4, 2 * H, 2 * W)


@pytest.mark.parametrize("module,written,channels", [
    (nn.PixelUnshuffle(2), _space_to_depth, 16), (nn.PixelShuffle(2), _depth_to_space, 1),
    (nn.ChannelShuffle(2), _channel_shuffle, 4), (lambda h: F.pixel_unshuffle(h, 2), _space_to_depth, 16),
    (lambda h: torch.channel_shuffle(h, 2), _channel_shuffle, 4)])
def test_pixel_and_channel_shuffles_explain_like_their_reshape_and_permute(module, written, channels):
    """PixelShuffle / PixelUnshuffle / ChannelShuffle (modules and functions) are index maps:
    the same attribution as the same rearrangement written as view, permute and reshape."""
    _explained_alike(module, written, body_channels=channels)


def _reversed_columns(h):  # h.flip(3) written as slices and a cat
    return torch.cat([h[:, :, :, i:i + 1] for i in reversed(range(h.shape[3]))], 3)


@pytest.mark.parametrize("op,written,channels", [
    (lambda h: h.repeat(1, 2, 1, 1), lambda h: torch.cat([h, h], 1), 8),
    (lambda h: h.tile(2, 1, 1), lambda h: torch.cat([h, h], 1), 8),
    (lambda h: torch.tile(h, (1, 1, 2, 1)), lambda h: torch.cat([h, h], 2), 4),
    (lambda h: h[:, :1].expand(-1, 4, -1, -1), lambda h: torch.cat([h[:, :1]] * 4, 1), 4),
    (lambda h: h.repeat_interleave(2, dim=1), lambda h: torch.stack([h, h], 2).flatten(1, 2), 8),
    (lambda h: torch.repeat_interleave(h, 2, -3), lambda h: torch.stack([h, h], 2).flatten(1, 2), 8),
    (lambda h: h.index_select(1, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])), lambda h: torch.stack([h, h], 2).flatten(1, 2), 8),
    (lambda h: h.flip(3), _reversed_columns, 4),
    (lambda h: torch.flip(h, [-1]), _reversed_columns, 4),
    (lambda h: h.roll(3, 3), lambda h: torch.cat([h[:, :, :, -3:], h[:, :, :, :-3]], 3), 4),
    (lambda h: torch.rot90(h, 1, (2, 3)), lambda h: _reversed_columns(h).transpose(2, 3), 4)],
    ids=["repeat", "tile", "torch.tile", "expand", "repeat_interleave", "torch.repeat_interleave", "index_select", "flip",
         "torch.flip", "roll", "rot90"])
def test_copies_and_moves_within_a_sample_explain_like_slices_and_cats(op, written, channels):
    """repeat, tile, expand, repeat_interleave, flip, roll and rot90 along dims that are not the
    batch's are index maps: a copied value's relevance is the sum of its copies', as for
    torch.cat([h, h]), and a moved one's goes back where it came from."""
    _explained_alike(op, written, body_channels=channels)


@pytest.mark.parametrize("op,written", [
    (lambda h: torch.flip(dims=[3], input=h), lambda h: h.flip(3)),
    (lambda h: torch.roll(shifts=1, dims=2, input=h), lambda h: h.roll(1, 2)),
    (lambda h: torch.rot90(dims=[2, 3], input=h, k=2), lambda h: torch.rot90(h, 2, [2, 3])),
    (lambda h: torch.transpose(input=h, dim0=2, dim1=3), lambda h: h.transpose(2, 3)),
    (lambda h: torch.permute(input=h, dims=(0, 1, 3, 2)), lambda h: h.permute(0, 1, 3, 2))],
    ids=["flip", "roll", "rot90", "transpose", "permute"])
def test_an_op_given_its_tensor_by_keyword_is_explained_as_given_by_position(op, written):
    """``torch.flip(dims=[3], input=h)``: relevance goes to the keyword's tensor (it went to the
    first keyword's value, a constant: refused, or a KeyError for transpose and permute)."""
    _explained_alike(op, written)


class _GreyToColour(nn.Module):
    """A colour network given a grey image, made three channels by ``spell`` in the forward."""

    def __init__(self, spell):
        super().__init__()
        torch.manual_seed(3)
        self.spell = spell
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.net(self.spell(x))


@pytest.mark.parametrize("spell", [lambda x: x.expand(-1, 3, -1, -1), lambda x: x.repeat(1, 3, 1, 1),
                                   lambda x: x.repeat_interleave(3, 1), lambda x: x.expand(x.shape[0], 3, *x.shape[2:])],
                         ids=["expand", "repeat", "repeat_interleave", "expand-by-shape"])
def test_a_grey_image_copied_to_three_channels_in_the_forward_is_explained(spell):
    model = _GreyToColour(spell).double().eval()
    written = _GreyToColour(lambda x: torch.cat([x, x, x], 1)).double().eval()
    x = torch.rand(3, 1, 13, 11, dtype=D)
    ex = rsp_fast.RSP(model).explain(x, record=True)
    assert ex.attribution.shape == x.shape
    assert rel_err(ex.attribution, rsp_fast.RSP(written).attribute(x)) < 1e-12
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize("spell", [lambda x: torch.stack([x, x, x], 1), lambda x: torch.stack([x] * 3, -3)],
                         ids=["stack", "stack-minus-3"])
def test_a_grey_n_h_w_input_stacked_to_three_channels_is_explained(spell):
    """An N×H×W input stacked to N×3×H×W was refused as "inputs must be 4-D": the input's
    rank was taken from the first conv's, as if nothing between them changed it."""
    x = torch.rand(3, 13, 11, dtype=D)
    ours = rsp_fast.RSP(_GreyToColour(spell).double().eval()).attribute(x)
    written = rsp_fast.RSP(_GreyToColour(lambda x: torch.cat([x.unsqueeze(1)] * 3, 1)).double().eval()).attribute(x)
    assert ours.shape == x.shape and rel_err(ours, written) < 1e-12


_ALONG_THE_BATCH = "along the batch dimension, which mixes samples"
_BY_ACTIVATIONS = "an index or repeats computed from the activations: one for the whole batch"


@pytest.mark.parametrize("op,refusal", [
    (lambda h: h.flip(0), "flip " + _ALONG_THE_BATCH),
    (lambda h: h.roll(1), "roll " + _ALONG_THE_BATCH),  # no dims: over the whole flattened batch
    (lambda h: torch.rot90(h), "rot90 " + _ALONG_THE_BATCH),  # dims 0 and 1 by default
    (lambda h: h.repeat_interleave(1), "repeat_interleave " + _ALONG_THE_BATCH),  # no dim: flattened
    (lambda h: h.roll(1, -4), "roll " + _ALONG_THE_BATCH + r".*\(dim -4 of a 4-dimensional tensor is the batch's\)"),
    (lambda h: h.index_select(-4, torch.tensor([1, 0])), "index_select " + _ALONG_THE_BATCH),
    (lambda h: h.repeat(2, 1, 1, 1)[:2], "makes a 4-dimensional tensor of 4 rows from a 4-dimensional one of 2"),
    (lambda h: h.index_select(2, h[0, 0, :, 0].argsort()), _BY_ACTIVATIONS),
    (lambda h: h.repeat_interleave((h[0, 0, :, 0] > 0).long() + 1, dim=2)[:, :, :8], _BY_ACTIVATIONS),
    (lambda h: h * torch.sigmoid(h.flip(0)), "flip " + _ALONG_THE_BATCH),  # in a gate: a factor branch
    (lambda h: h * torch.sigmoid(h.flip(-4)), "flip " + _ALONG_THE_BATCH),
    (lambda h: h * torch.sigmoid(h.mean(1, keepdim=True).index_select(2, h[0, 0, :, 0].argsort())), _BY_ACTIVATIONS)],
    ids=["flip-0", "roll-without-dims", "rot90-default-dims", "repeat_interleave-without-dim", "roll-minus-4",
         "index_select-minus-4", "repeat-batch", "index-from-activations", "repeats-from-activations", "gate-flip-0",
         "gate-flip-minus-4", "gate-index-from-activations"])
def test_a_copy_or_move_across_samples_is_refused(op, refusal):
    """Along dim 0, or by an index computed from the activations (one for the whole batch), each
    sample's map would take the others' relevance: refused when the model is built where the dim
    is written as 0, when run where it counts from the end or a copy changes the batch's size;
    in a gate's branch too."""
    model = _Around(op).double().eval()
    with pytest.raises(rsp_fast.UnsupportedModelError, match=refusal):
        rsp_fast.RSP(model).attribute(torch.randn(2, 3, 8, 8, dtype=D))


_MIXES = "the model's forward mixes the samples of a batch"


@pytest.mark.parametrize("op,seen_at", [
    (lambda h: h.transpose(0, 1).flip(1).transpose(0, 1), "transpose_1"),
    (lambda h: h.permute(1, 0, 2, 3).roll(1, 1).permute(1, 0, 2, 3), "permute_1"),
    (lambda h: h.transpose(0, 1).mean(1, keepdim=True).transpose(0, 1).expand(h.shape), "expand"),
    (lambda h: torch.cat([h.transpose(0, 1)[:, 1:], h.transpose(0, 1)[:, :1]], 1).transpose(0, 1), "transpose_2"),
    (lambda h: h.reshape(1, -1, 8, 8).flip(1).reshape(h.shape), "reshape_1"),
    (lambda h: h * torch.sigmoid(h.transpose(0, 1).flip(1).transpose(0, 1)), "transpose_1"),
    (lambda h: torch.cat([h.transpose(0, 1)[:, 1:].mean(1, keepdim=True), h.transpose(0, 1)[:, 1:]], 1).transpose(0, 1),
     "transpose_2"),  # sample 0 replaced by the others' mean: it reads them, none reads it
    (lambda h: torch.cat([h.transpose(0, 1)[:, :1], h.transpose(0, 1)[:, :-1]], 1).transpose(0, 1), "transpose_2")],
    ids=["transpose-flip", "permute-roll", "transpose-mean", "transpose-cat", "reshape-flip", "gate-transpose-flip",
         "first-is-the-others-mean", "shift-by-one"])  # shift: the first sample stays, the last reads the one before
def test_a_batch_moved_and_then_mixed_is_refused_where_it_mixes(op, seen_at):
    """A batch moved off dim 0 by a transpose, permute or reshape and then flipped, rolled,
    averaged or joined along: the plan cannot see it, so a probe (the first and the last sample
    also run alone) refuses it, naming the first node where a sample's values in the batch are
    not its own. Before, each sample's map took the others' relevance silently."""
    model = _Around(op).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=D)
    with pytest.raises(rsp_fast.UnsupportedModelError, match=f"{_MIXES} \\(seen first at '{seen_at}'\\)"):
        rsp_fast.RSP(model).attribute(x)
    explainer = rsp_fast.RSP(model)
    for _ in range(2):  # refused at every call, not only the first
        with pytest.raises(rsp_fast.UnsupportedModelError, match=_MIXES):
            explainer.attribute(x)


def test_the_samples_probe_runs_on_every_batch_shape_and_before_the_pass():
    """One sample has nothing to mix with: explained, and its shapes do not use up the shapes
    probed (16 single images used to leave a batch of 3 unprobed); the model's hooks see the
    pass's batch last, not a probe's."""
    model = _Around(lambda h: h.transpose(0, 1).flip(1).transpose(0, 1)).double().eval()
    explainer = rsp_fast.RSP(model)
    for size in range(8, 8 + rsp_fast.api.MAX_FORWARD_CHECKS):
        assert explainer.attribute(torch.randn(1, 3, size, size, dtype=D)).shape == (1, 3, size, size)
    with pytest.raises(rsp_fast.UnsupportedModelError, match=_MIXES):
        explainer.attribute(torch.randn(3, 3, 8, 8, dtype=D))
    seen = []
    apart = _Around(lambda h: h.transpose(0, 1).relu().transpose(0, 1)).double().eval()
    apart.body.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    rsp_fast.RSP(apart).attribute(torch.randn(3, 3, 8, 8, dtype=D))
    assert seen[:2] == [1, 1] and set(seen[2:]) == {3}  # the first and last sample alone, then the pass (and model(x))


class _CentredHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(f - f.mean(0))  # after the saliency layer, where the plan does not judge dims


def test_a_head_that_takes_the_batch_mean_is_refused():
    """Before, its maps were all zero: R₀'s gradient, of the batch's summed scores, cancelled."""
    with pytest.raises(rsp_fast.UnsupportedModelError, match=f"{_MIXES} \\(seen first at 'sub'\\)"):
        rsp_fast.RSP(_CentredHead().double().eval()).attribute(torch.randn(3, 3, 8, 8, dtype=D))


@pytest.mark.parametrize("op", [lambda h: h.transpose(0, 1).transpose(0, 1), lambda h: h.permute(1, 0, 2, 3).relu().permute(1, 0, 2, 3),
                                lambda h: h.reshape(1, -1, 8, 8).reshape(h.shape)], ids=["transposes", "permute-relu", "reshapes"])
def test_a_batch_moved_but_kept_apart_is_explained(op):
    """The probe refuses what mixes, not what only moves the batch: these explain each sample as alone."""
    model = _Around(op).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=D)
    together = rsp_fast.RSP(model).attribute(x)
    alone = torch.cat([rsp_fast.RSP(model).attribute(x[i:i + 1]) for i in range(3)])
    assert rel_err(together, alone) < 1e-12


def test_batchnorm_is_folded_into_the_first_conv():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); bn.weight.uniform_(-2, 2); bn.bias.uniform_(-1, 1)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).double().eval()
    folded = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
    reference = nn.Sequential(folded, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).double().eval()
    reference[3].load_state_dict(model[4].state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=D)
    ours = rsp_fast.RSP(model, layer="2", init="gradcam").attribute(x)
    expected = rsp_fast.RSP(reference, layer="1", init="gradcam").attribute(x)
    assert rel_err(ours, expected) < 1e-10


class _NormedStem(nn.Module):
    """A first conv without bias, then a per-channel affine map spelled as ``spelling``, a conv
    and a pooled head; ``folded``: the stem's conv with that map folded in by hand instead."""

    SPELLINGS = {
        "module": lambda m, h: m.bn(h),
        "functional": lambda m, h: F.batch_norm(h, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.1, m.bn.eps),
        "bias-added": lambda m, h: m.bn(h + m.shift.view(1, -1, 1, 1)),
        "dropout-between": lambda m, h: m.bn(m.drop(h)),
        "two-norms": lambda m, h: m.bn2(m.bn(h)),
        "constant-statistics": lambda m, h: F.batch_norm(h, torch.zeros(4, dtype=D), torch.linspace(0.5, 2, 4, dtype=D),
                                                         None, None, False),  # fx's constants, not the model's
    }

    def __init__(self, spelling, folded=None):
        super().__init__()
        self.spelling, self.folded = spelling, folded
        self.stem, self.bn, self.bn2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.shift, self.drop = nn.Parameter(torch.randn(4)), nn.Dropout2d(0.3)
        self.body, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def affine(self, h):
        return self.SPELLINGS[self.spelling](self, h)

    def forward(self, x):
        h = self.folded(x) if self.folded is not None else self.affine(self.stem(x))
        return self.fc(torch.relu(self.body(torch.relu(h))).mean((2, 3)))


@pytest.mark.parametrize("spelling", list(_NormedStem.SPELLINGS))
def test_batchnorms_are_folded_however_they_follow_the_layer(spelling):
    """Only an nn.BatchNorm directly after the layer was folded: F.batch_norm, a BatchNorm after
    a bias added on its own, after dropout or after another BatchNorm passed R through instead
    (the first layer's z^B then read unscaled weights: 0.02–0.68 of the peak off the folded map)."""
    torch.manual_seed(0)
    model = _random_bn_statistics(_NormedStem(spelling)).double().eval()
    with torch.no_grad():  # the per-channel map a·h + c, read off on ones and zeros
        c = model.affine(torch.zeros(1, 4, 1, 1, dtype=D)).flatten()
        a = model.affine(torch.ones(1, 4, 1, 1, dtype=D)).flatten() - c
        folded = nn.Conv2d(3, 4, 3, padding=1).double()
        folded.weight.copy_(model.stem.weight * a.view(-1, 1, 1, 1))
        folded.bias.copy_(c)
    reference = _NormedStem(spelling, folded).double().eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(model(x), reference(x))
    assert rel_err(rsp_fast.RSP(model, layer="body").attribute(x), rsp_fast.RSP(reference, layer="body").attribute(x)) < 1e-10


def test_a_batchnorm_of_channels_an_add_broadcast_is_not_folded_into_the_layer():
    """conv with 1 filter, + a parameter of 8 channels, BatchNorm of 8: folding its scale into the
    one filter made 8 of it, and the input's relevance 8 times R₀'s."""
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shift, self.bn = nn.Conv2d(3, 1, 3, padding=1), nn.Parameter(torch.randn(1, 8, 1, 1)), nn.BatchNorm2d(8)
            self.body, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.stem(x) + self.shift))
            return self.fc(torch.relu(self.body(h)).mean((2, 3)))
    torch.manual_seed(0)
    model = _random_bn_statistics(Broadcast()).double().eval()
    ex = rsp_fast.RSP(model, layer="body").explain(torch.randn(2, 3, 6, 6, dtype=D), record=True)
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def _random_bn_statistics(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (-2, 2)), (m.bias, (-1, 1)), (m.running_mean, (-1, 1)), (m.running_var, (0.5, 2))):
                    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(lo, hi, generator=g))
    return model


@pytest.mark.parametrize("freeze", ["torchvision", "timm", "sync"])
def test_frozen_and_sync_batchnorms_are_folded_like_batchnorm(freeze):
    """A ResNet whose BatchNorms are frozen (detection backbones; timm's freeze_batch_norm_2d) or
    SyncBatchNorm (the DDP set-up) is explained as with BatchNorm2d: a negative γ after the first
    conv flips its z^B bounds, so an unfolded one changes the map."""
    model = _random_bn_statistics(torchvision.models.resnet18(num_classes=5)).double().eval()
    if freeze == "torchvision":
        from torchvision.ops.misc import FrozenBatchNorm2d
        frozen = torchvision.models.resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d).double().eval()
        frozen.load_state_dict(model.state_dict(), strict=False)
    elif freeze == "timm":
        from timm.layers import freeze_batch_norm_2d
        import copy
        frozen = freeze_batch_norm_2d(copy.deepcopy(model)).eval()
    else:
        import copy
        frozen = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert not any(type(m) is nn.BatchNorm2d for m in frozen.modules())
    x = torch.randn(2, 3, 32, 32, dtype=D)
    assert torch.allclose(frozen(x), model(x), rtol=1e-10, atol=1e-12)
    assert rel_err(rsp_fast.RSP(frozen).attribute(x), rsp_fast.RSP(model).attribute(x)) < 1e-10


def test_a_batchnorm1d_over_tokens_is_not_folded_into_the_features():
    """BatchNorm1d after a per-token Linear on N×T×F normalises the T tokens (dim 1): not the
    Linear's features, so it passes R through like the same affine map written by hand."""
    class Tokens(nn.Module):
        def __init__(self, T, features, by_hand):
            super().__init__()
            self.fc0, self.bn, self.fc1 = nn.Linear(5, features), nn.BatchNorm1d(T), nn.Linear(features, 3)
            self.by_hand = by_hand

        def forward(self, x):
            h = self.fc0(x)
            if self.by_hand:
                s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
                h = h * s.view(1, -1, 1) + (self.bn.bias - self.bn.running_mean * s).view(1, -1, 1)
            else:
                h = self.bn(h)
            return self.fc1(torch.relu(h)).mean(1)
    for features in (6, 7):  # T = features once: the wrong fold fitted, silently
        torch.manual_seed(features)
        model = Tokens(6, features, by_hand=False).double().eval()
        with torch.no_grad():
            model.bn.weight.uniform_(-1.5, 1.5); model.bn.running_var.uniform_(0.3, 2)
        by_hand = Tokens(6, features, by_hand=True).double().eval()
        by_hand.load_state_dict(model.state_dict())
        x = torch.randn(2, 6, 5, dtype=D)
        ours = rsp_fast.RSP(model, init="gradcam").attribute(x)
        assert rel_err(ours, rsp_fast.RSP(by_hand, init="gradcam").attribute(x)) < 1e-10


def test_comparative_init_matches_authors_numpy():
    cams = torch.randn(4, 3, 6, 5, 5, dtype=D)  # target + 3 hostile, batch 3
    cams = cams / (cams.flatten(2).amax(2).view(4, 3, 1, 1, 1) + 1e-9)
    ours = comparative_relevance(cams[0], cams[1:])
    for n in range(3):
        ref = relative_gam_numpy(cams[0, n].numpy(), [cams[h, n].numpy() for h in range(1, 4)])
        assert np.abs(ours[n].numpy() - ref).max() < 1e-12
    assert torch.allclose(ours.sum((1, 2, 3)), torch.ones(3, dtype=D), atol=1e-6)


def test_comparative_init_on_a_one_by_one_map_keeps_channels_apart():
    """Collapsing the channels of a 1×1 map leaves ΣP − ΣN = 0, whose sign is rounding noise:
    its channels are its positions, as for a map without spatial dimensions."""
    torch.manual_seed(3)
    cams = torch.randn(3, 5, 16, 1, 1, dtype=D)  # target + 2 hostile, batch 5
    cams = cams / (cams.flatten(2).amax(2).view(3, 5, 1, 1, 1) + 1e-9)
    ours = comparative_relevance(cams[0], cams[1:])
    flat = comparative_relevance(cams[0].flatten(1), cams[1:].flatten(2))
    assert torch.allclose(ours.flatten(1), flat, rtol=1e-12, atol=0)
    assert torch.allclose(ours.flatten(1).sum(1), torch.ones(5, dtype=D), atol=1e-6)
    assert torch.allclose(ours.clamp(min=0).flatten(1).sum(1), 2 * torch.ones(5, dtype=D), atol=1e-6)
    single = comparative_relevance(cams[0].float(), cams[1:].float())  # the same in float32: no sign noise
    assert rel_err(single.double(), ours) < 1e-5


def test_comparative_init_on_a_map_with_one_value_per_channel_keeps_channels_apart():
    """A 1×1 map pooled or upsampled to h×w (VGG's avgpool on a 32-pixel input) has the same
    vector at every position: its channel sums are all ΣP − ΣN = 0, rounding noise, so it is
    treated as the 1×1 map it is, spread over its positions, in float64 and float32 alike."""
    torch.manual_seed(4)
    cams = torch.randn(4, 3, 32, 1, 1, dtype=D)  # target + 3 hostile, batch 3
    cams = cams / (cams.flatten(2).amax(2).view(4, 3, 1, 1, 1) + 1e-9)
    one = comparative_relevance(cams[0], cams[1:])
    wide = cams.expand(-1, -1, -1, 5, 3)
    for dtype in (D, torch.float32):
        spread = comparative_relevance(wide[0].to(dtype), wide[1:].to(dtype))
        assert rel_err(spread.double(), (one / 15).expand(-1, -1, 5, 3)) < 1e-5
        assert torch.allclose(spread.double().sum((1, 2, 3)), torch.ones(3, dtype=D), atol=1e-5)


def test_comparative_init_in_float32_keeps_float64_accuracy_where_its_channel_sums_cancel():
    """Target and hostile classes that weigh the channels almost alike (a head's nearby rows)
    leave channel sums of P − N near 1e-4 of their terms: formed in float32, P's and N's
    rounding came out ~10⁴× larger in R₀ (2e-5 to 1e-4 of the map on EfficientNet-B0 and
    MobileNetV3). From the float32 activations and gradients as they are, R₀ is now what float64
    makes of them, rounded once."""
    from rsp_fast.init import class_gradients, initial_relevance

    torch.manual_seed(5)
    A = torch.rand(2, 64, 7, 7, requires_grad=True)
    base = torch.randn(64)
    W = torch.stack([base, base + 1e-4 * torch.randn(64), base + 1e-4 * torch.randn(64), torch.randn(64)])
    target, hostile = torch.tensor([0, 0]), torch.tensor([[1, 2], [1, 2]])
    logits = A.mean((2, 3)) @ W.T
    R0 = initial_relevance(logits, A, target, hostile, "comparative")[0]
    grads = class_gradients(logits, A, torch.cat([target.unsqueeze(1), hostile], 1))
    cams = gradcam_maps(A.detach().double(), grads.double())
    expected = comparative_relevance(cams[0], cams[1:])
    assert R0.dtype == torch.float32 and rel_err(R0.double(), expected) < 1e-6


def test_gradcam_maps_without_channel_sum():
    A = torch.rand(2, 3, 4, 5, dtype=D)
    grads = torch.randn(1, 2, 3, 4, 5, dtype=D)
    cams = gradcam_maps(A, grads)
    for n in range(2):
        raw = A[n] * grads[0, n].mean((1, 2), keepdim=True)
        assert rel_err(cams[0, n], raw / (raw.max() + 1e-9)) < 1e-12


@pytest.mark.parametrize("shape, block", [((2, 1, 5, 10), 3), ((3, 2, 7, 13), 4), ((1, 1, 4, 6), 4), ((2, 3, 9, 600), 256),
                                          ((1, 2, 6, 784), 256), ((1, 1, 3, 1031), 256)])
def test_patch_gram_equals_the_full_product(shape, block):
    from rsp_fast.rules.conv import patch_gram

    cols = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(patch_gram(cols, block=block), cols.transpose(-1, -2) @ cols, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,d,p,hw", [(3, 1, 1, (7, 9)), ((3, 5), (2, 1), (2, 1), (8, 6)), (2, 1, 0, (5, 7)), (3, 1, 0, (6, 6))])
def test_pixel_gram_products_equal_the_unfolded_ones(k, d, p, hw):
    """K from the pixels' Gram matrix (tap sums) and the back-projection X·Q equal K = XᵤᵀXᵤ and
    fold(Xᵤ·M) on the unfolded patches, for any M computed from K."""
    from rsp_fast.rules.conv import _pad, pixel_gram_products

    conv = nn.Conv2d(4, 2, k, padding=p, dilation=d, groups=2)
    g = conv_geometry(conv, hw)
    xp = _pad(torch.rand(3, 4, *hw, dtype=D), g)
    out_hw = conv(torch.zeros(1, 4, *hw)).shape[-2:]
    L, (Hp, Wp) = out_hw[0] * out_hw[1], xp.shape[-2:]
    A = torch.randn(3, 2, L, L, dtype=D)
    cols = F.unfold(xp, g.kernel, dilation=g.dilation).view(3, 2, -1, L)
    dcols = cols @ ((cols.transpose(-1, -2) @ cols) @ A)
    expected = F.fold(dcols.reshape(3, -1, L), (Hp, Wp), g.kernel, dilation=g.dilation)
    got = pixel_gram_products(xp.reshape(3, 2, 2, Hp * Wp), g, out_hw, (Hp, Wp), lambda K: K @ A, D)
    assert rel_err(got.reshape(3, 4, Hp, Wp), expected) < 1e-12


def test_pixel_gram_path_in_sample_chunks_equals_one_pass(monkeypatch):
    """Samples through the pixel-Gram path in chunks (as large maps go): the same relevance and
    the same dropped relevance as all at once."""
    from rsp_fast.rules import conv as conv_module

    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.rand(5, 4, 8, 7, dtype=D)
    x[:, :, 2:7, 1:6] = 0
    R = torch.randn(5, 6, 8, 7, dtype=D)
    results = []
    for elements in (2**25, 2 * 56**2 + 2 * 90**2):  # one pass; one sample at a time
        monkeypatch.setattr(conv_module, "GRAM_CHUNK_ELEMENTS", elements)
        ctx = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(5, dtype=D))
        results.append((inner_conv_relevance(ctx, x, R, conv_geometry(conv, (8, 7)), path="gram"), ctx.dropped))
    (whole, whole_drop), (chunked, chunked_drop) = results
    assert whole_drop.abs().min() > 1e-3
    assert rel_err(chunked, whole) < 1e-13
    torch.testing.assert_close(chunked_drop, whole_drop, rtol=1e-13, atol=1e-13)


def test_gram_path_uses_the_pixel_gram_for_stride_1_only(monkeypatch):
    from rsp_fast.rules import conv as conv_module

    calls = []
    real = conv_module.pixel_gram_products
    monkeypatch.setattr(conv_module, "pixel_gram_products", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.rand(2, 4, 9, 9, dtype=D)
    for stride, used in ((1, 1), (2, 0)):
        conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1).double()
        R = torch.randn(2, 6, *conv(x).shape[-2:], dtype=D)
        calls.clear()
        inner_conv_relevance(CTX, x, R, conv_geometry(conv, (9, 9)), path="gram")
        assert len(calls) == used


def test_pixel_gram_only_where_its_tap_sums_pay():
    """The pixel Gram trades multiply-adds for strided tap sums: not worth it on CUDA with 16-bit
    products (measured), taken on CPU and for 32-bit products."""
    from rsp_fast.rules.conv import call_geometry
    from rsp_fast.rules.conv_paths import pixel_gram_macs, tap_sums_pay

    g = call_geometry(3, padding=1)  # VGG16's conv4 at 28×28: C·P² = 512·900² < ck·L² = 4608·784²
    assert pixel_gram_macs(g, 512, (28, 28), 784) == 512 * 900**2
    assert pixel_gram_macs(g, 512, (28, 28), 784, tap_sums=tap_sums_pay(True, torch.bfloat16)) is None
    assert pixel_gram_macs(g, 512, (28, 28), 784, tap_sums=tap_sums_pay(True, torch.float32)) == 512 * 900**2
    assert tap_sums_pay(False, torch.bfloat16) and tap_sums_pay(False, torch.float64)


@pytest.mark.parametrize("L", [512, 600, 784, 1031, 3136])
def test_gram_blocks_start_on_tensor_core_boundaries(L):
    from rsp_fast.rules.conv import GEMM_ALIGN, gram_block_edges

    edges = gram_block_edges(L, 256)
    assert edges[0] == 0 and edges[-1] == L and all(b > a for a, b in zip(edges, edges[1:]))
    assert all(e % GEMM_ALIGN == 0 for e in edges[:-1])
    assert max(b - a for a, b in zip(edges, edges[1:])) <= 256 + GEMM_ALIGN  # about the block size
    assert len(edges) - 1 == -(-L // 256)




def test_layers_skip_clamping_only_inputs_that_are_non_negative_by_construction():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.Linear(6, 3))
    model = model.double().eval()
    explainer = rsp_fast.RSP(model, layer="9", init="gradcam")
    flags = {str(s.node.target): s.input_non_negative for s in explainer.plan.steps if hasattr(s, "input_non_negative") and not s.first}
    assert flags == {"2": False, "6": True, "9": True}  # after BN: may be negative; after ReLU/pool/pad/flatten: not
    x = torch.randn(2, 3, 14, 14, dtype=D)
    fast = explainer.attribute(x)
    for s in explainer.plan.steps:
        if hasattr(s, "input_non_negative"):
            s.input_non_negative = False  # clamp everywhere: the same result
    assert rel_err(explainer.attribute(x), fast) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("magnitude", [1e-22, 1e22, 1e-40])
def test_extreme_activation_scales_stay_finite_in_float32(backend, magnitude):
    """The inner rules are invariant to the scale of their input, but their responses grow
    with x̂²: activations of 1e-22 (deep randomly initialised nets) underflowed them to 0 in
    float32 and gave NaN, 1e22 overflowed them. float32 must give float64's attribution. At
    1e-40 (subnormal) the power of two that scales them up, 2^132, was inf in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 36, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[0].weight.mul_(magnitude)
        for m in (model[2], model[4], model[7]):
            m.bias.zero_()
    x = torch.randn(2, 3, 6, 6)
    attribution = {dt: rsp_fast.RSP(model.to(dt), layer="5", backend=backend).attribute(x.to(dt)) for dt in (torch.float64, torch.float32)}
    R64, R32 = attribution[torch.float64], attribution[torch.float32].double()
    assert torch.isfinite(R32).all()
    assert rel_err(R32, R64) < (1e-3 if magnitude < 1e-38 else 1e-4)  # subnormal activations: ~16 bits in the forward


def _first_layer_model(first: str) -> tuple[nn.Module, tuple]:
    """A small net whose first layer is ``first`` (saliency layer "3"), and its sample shape."""
    if first == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.ReLU(), nn.Linear(16, 5)), (3, 4, 4)
    conv, shape = (nn.Conv3d, (3, 2, 4, 4)) if first == "conv3d" else (nn.Conv2d, (3, 4, 4))
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * math.prod(shape[1:]), 5)), shape


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("first", ["conv2d", "conv3d", "linear"])
def test_a_picture_of_subnormal_values_is_explained_as_in_float64(first, backend):
    """The first-layer (z^B) rule is invariant to the scale of its input, but a float32 picture
    of about 1e-40 (subnormal values) made its Z subnormal and R/Z inf: it was refused as
    relevance that "left the range of float32". float32 must give float64's attribution."""
    torch.manual_seed(0)
    model, shape = _first_layer_model(first)
    x = torch.rand(2, *shape, dtype=torch.float64) * 1e-40
    x[1] = x[1] - 0.5e-40  # signed values too
    maps = {dt: rsp_fast.RSP(model.to(dt).eval(), layer="3", backend=backend).attribute(x.to(dt))
            for dt in (torch.float64, torch.float32)}
    assert maps[torch.float64].abs().amax() > 0
    assert rel_err(maps[torch.float32].double(), maps[torch.float64]) < 1e-4
    # float64 too (its powers of two stop at 2^±1023: 2^1024 is inf): the forward barely sees either picture,
    # and the first-layer rule does not see their scale
    explainer = rsp_fast.RSP(model.double(), layer="3", backend=backend)
    tiny = explainer.attribute(x * 1e-270)  # 1e-310: subnormal in float64
    assert rel_err(tiny, explainer.attribute(x * 1e-190)) < 1e-12 and tiny.abs().amax() > 0


class _MaxPoolSame(nn.MaxPool2d):
    """Like timm's MaxPool2dSame: TF "same" padding (with -inf) before the pool, in its own forward."""

    def forward(self, x):
        pad = [max((-(-s // self.stride) - 1) * self.stride + self.kernel_size - s, 0) for s in x.shape[-2:]]
        x = F.pad(x, (pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2), value=float("-inf"))
        return super().forward(x)


def test_max_pool_subclass_with_its_own_forward_is_run_as_it_is():
    """A MaxPool2d subclass that pads in its forward must not be re-run from its attributes
    (that lost the padding: the forward failed on shapes). After a ReLU, -inf padding and
    zero padding pick the same maxima, so a zero-padded plain pool must give the same map."""
    torch.manual_seed(0)
    conv1, conv2, head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)
    tail = [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head]
    same = nn.Sequential(conv1, nn.ReLU(), _MaxPoolSame(3, 2), conv2, *tail).double().eval()
    padded = nn.Sequential(conv1, nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2), conv2, *tail).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert same(x).shape == padded(x).shape and torch.allclose(same(x), padded(x))
    R_same, R_padded = (rsp_fast.RSP(m, layer=tail[0]).attribute(x) for m in (same, padded))
    assert rel_err(R_same, R_padded) < 1e-12


def test_a_minus_inf_padding_written_before_a_max_pool_drops_no_nan():
    """F.pad(h, value=-inf) then F.max_pool2d: the border got -inf · 0 = NaN back, which the
    crop counted into the dropped relevance (NaN with record=True; the map was right)."""
    torch.manual_seed(0)
    conv1, conv2, head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 4)
    tail = [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head]
    pool = _Lambda(lambda h: F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=float("-inf")), 3, 2))
    functional = nn.Sequential(conv1, nn.ReLU(), pool, conv2, *tail).double().eval()
    padded = nn.Sequential(conv1, nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2), conv2, *tail).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ex, expected = (rsp_fast.RSP(m, layer=tail[0]).explain(x, record=True) for m in (functional, padded))
    assert rel_err(ex.attribution, expected.attribution) < 1e-12
    assert torch.allclose(ex.dropped, expected.dropped, rtol=0, atol=1e-12)


class _Reweighted(nn.Module):
    """stem → ReLU → h·f(h) (or h/f(h)) with f a statistic of h → conv → ReLU → head. With
    ``freeze(x)`` the factor becomes a buffer holding the values it takes on x."""

    def __init__(self, style, c=6):
        super().__init__()
        self.style = style
        self.stem, self.fc, self.value = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.gamma, self.beta = nn.Parameter(torch.rand(1, c, 1, 1)), nn.Parameter(torch.rand(1, c, 1, 1))
        self.body = nn.Conv2d(c, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 25, 3))
        self.register_buffer("frozen", None)

    def factor(self, h):
        if self.style == "softmax":  # SKNet / ResNeSt attention over channels
            return torch.softmax(self.fc(h.mean((2, 3), keepdim=True)), dim=1)
        if self.style in ("grn", "grn_addcmul"):  # ConvNeXt-V2's global response norm
            g = h.norm(p=2, dim=(2, 3), keepdim=True)
            return g / (g.mean(dim=1, keepdim=True) + 1e-6)
        if self.style == "std":  # EvoNorm: divided by a group's standard deviation
            return h.var(dim=(1, 2, 3), keepdim=True).add(1e-5).sqrt().expand(h.shape)
        if self.style == "glu":  # a gated linear unit (StarNet, MambaOut): act(g)·x, position-wise
            return F.gelu(self.fc(h))
        return torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + 1e-6)  # RMS norm: one factor per position

    def freeze(self, x):
        with torch.no_grad():
            self.register_buffer("frozen", self.factor(torch.relu(self.stem(x))))
        return self

    def forward(self, x):
        h = torch.relu(self.stem(x))
        f = self.frozen if self.frozen is not None else self.factor(h)
        if self.style == "std":
            h = h / f
        elif self.style == "grn_addcmul":
            h = h + torch.addcmul(self.beta, self.gamma, h * f)
        elif self.style == "glu":
            h = self.value(h) * f
        else:
            h = h * f
        return self.head(torch.relu(self.body(h)))


@pytest.mark.parametrize("style", ["softmax", "grn", "grn_addcmul", "std", "rms", "glu"])
def test_statistic_factors_and_glu_gates_act_as_constants(style):
    """A factor computed from the activations only through reductions (attention over
    channels, a norm's scale) reweights them, as does the activated operand of a gated linear
    unit: RSP treats it as a constant, so the network explains exactly like the same network
    with that factor frozen into a buffer."""
    torch.manual_seed(0)
    live = _Reweighted(style).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    frozen = _Reweighted(style).double().eval()
    frozen.load_state_dict(live.state_dict())
    frozen.freeze(x)
    assert torch.allclose(live(x), frozen(x))
    ex = rsp_fast.RSP(live).explain(x, record=True)
    assert rel_err(ex.attribution, rsp_fast.RSP(frozen).attribute(x)) < 1e-12
    assert not any(k.startswith(("fc", "norm", "var", "softmax", "rsqrt")) for k in ex.steps)  # no relevance into f


class _Branches(nn.Module):
    """Two branches summed: a + b, or stacked and summed over the branch dimension (SKNet,
    ResNeSt), with or without keepdim."""

    def __init__(self, merge):
        super().__init__()
        self.merge = merge
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 25, 3))

    def forward(self, x):
        a, b = F.silu(self.a(x)), F.silu(self.b(x))  # negative values too: the clamp matters
        if self.merge == "add":
            h = a + b
        elif self.merge == "sum":
            h = torch.stack([a, b], 1).sum(dim=1)
        else:
            h = torch.stack([a, b], 2).sum((2,), keepdim=True).squeeze(2)
        return self.head(torch.relu(self.body(h)))


@pytest.mark.parametrize("merge", ["sum", "sum_keepdim"])
def test_a_sum_over_branches_is_the_add_rule(merge):
    torch.manual_seed(0)
    added, summed = _Branches("add").double().eval(), _Branches(merge).double().eval()
    summed.load_state_dict(added.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=D)
    assert torch.allclose(added(x), summed(x))
    assert rel_err(rsp_fast.RSP(summed).attribute(x), rsp_fast.RSP(added).attribute(x)) < 1e-12


def test_sums_and_means_over_the_batch_are_refused():
    for reduce in (lambda h: h - h.mean(0, keepdim=True), lambda h: h.sum(dim=0, keepdim=True).expand_as(h)):
        model = _Scaled(reduce)
        with pytest.raises(rsp_fast.UnsupportedModelError, match="(mean|sum)"):
            rsp_fast.RSP(model)


@pytest.mark.parametrize("difference", [lambda p, h: p - h, lambda p, h: torch.sub(p, h), lambda p, h: torch.add(p, h, alpha=-1)])
def test_a_difference_is_the_add_rule_on_the_negated_operand(difference):
    """PoolFormer's pool(h) − h: the residual-add rule with −h as the second term, as the same
    network written pool(h) + (−1)·h explains."""
    def pool(h):
        return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False)
    torch.manual_seed(0)
    subtracted = _Scaled(lambda h: difference(pool(h), h)).double().eval()
    negated = _Scaled(lambda h: pool(h) + h * -1.0).double().eval()
    negated.load_state_dict(subtracted.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(subtracted(x), negated(x))
    assert rel_err(rsp_fast.RSP(subtracted).attribute(x), rsp_fast.RSP(negated).attribute(x)) < 1e-12


@pytest.mark.parametrize("adaptive", [False, True], ids=["avg_pool2d", "adaptive_avg_pool2d"])
def test_a_regional_average_subtracted_is_the_difference_rule(adaptive):
    """f − up(pool(f)) with a pool to 4×4 regions is a difference of two position-wise signals,
    however the pool is spelled; an adaptive pool counted as a statistic (as a global one is) and
    gave all of R to f: 0.25 of the peak off the same net with F.avg_pool2d."""
    def regional(f):
        pooled = F.adaptive_avg_pool2d(f, 3) if adaptive else F.avg_pool2d(f, 2)
        return f - F.interpolate(pooled, scale_factor=2, mode="nearest")
    model = _Scaled(regional)
    explainer = rsp_fast.RSP(model)
    assert [type(s).__name__ for s in explainer.plan.steps if s.node.name.startswith("sub")] == ["Add"]


class _LayerScaled(nn.Module):
    """A residual x + γ·f(x), f a conv branch, γ a per-channel parameter (or a gate of x), written
    by ``spelling`` as torch.addcmul or as a sum of a product."""

    SPELLINGS = {
        "addcmul": (lambda m, h, f: torch.addcmul(h, m.gamma, f), lambda m, h, f: h + m.gamma * f),
        "addcmul-swapped": (lambda m, h, f: torch.addcmul(h, f, m.gamma), lambda m, h, f: h + m.gamma * f),
        "method": (lambda m, h, f: h.addcmul(m.gamma, f), lambda m, h, f: h + m.gamma * f),
        "keywords": (lambda m, h, f: torch.addcmul(input=h, tensor1=m.gamma, tensor2=f), lambda m, h, f: h + m.gamma * f),
        "value": (lambda m, h, f: torch.addcmul(h, m.gamma, f, value=-0.5), lambda m, h, f: h + (-0.5 * m.gamma) * f),
        "gate": (lambda m, h, f: torch.addcmul(h, torch.sigmoid(m.gate(h)), f), lambda m, h, f: h + torch.sigmoid(m.gate(h)) * f),
        "in-place": (lambda m, h, f: h.addcmul_(m.gamma, f), lambda m, h, f: h + m.gamma * f),
    }

    def __init__(self, spelling, fused):
        super().__init__()
        self.add = self.SPELLINGS[spelling][0 if fused else 1]
        self.stem, self.branch, self.gate = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                             nn.Conv2d(4, 4, 1))
        self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.head = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 4))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(self.add(self, h, F.silu(self.branch(h))))


@pytest.mark.parametrize("spelling", list(_LayerScaled.SPELLINGS))
def test_a_layer_scaled_residual_in_one_addcmul_is_the_add_rule(spelling):
    """torch.addcmul(x, γ, f) = x + γ·f: the residual-add rule with γ·f as the second term,
    all of its share to f. It was refused as a product of two activations."""
    torch.manual_seed(0)
    fused, written = _LayerScaled(spelling, True).double().eval(), _LayerScaled(spelling, False).double().eval()
    written.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(fused(x), written(x))
    ex = rsp_fast.RSP(fused).explain(x, record=True)
    assert rel_err(ex.attribution, rsp_fast.RSP(written).attribute(x)) < 1e-12
    assert not any(k.startswith("gate") for k in ex.steps)


def test_an_addcmul_of_two_activations_is_refused():
    model = _Scaled(lambda h: torch.addcmul(h, h + 1, h * 2))
    with pytest.raises(rsp_fast.UnsupportedModelError, match="addcmul: a product of two position-wise activations"):
        rsp_fast.RSP(model)


class _Biased(nn.Module):
    """conv without bias, then its bias added as a parameter (HGNetV2's learnable affine
    block, EvoNorm), or the plain conv with the bias."""

    def __init__(self, add=None):
        super().__init__()
        self.add = add
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=add is None)
        self.shift = nn.Parameter(torch.randn(4))
        self.body = nn.Conv2d(4, 5, 3, padding=1, bias=add is None)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 36, 4))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h if self.add is None else self.add(h, self.shift.view(1, -1, 1, 1)))
        h = self.body(h)
        return self.head(torch.relu(h if self.add is None else self.add(h, 0.5)))


@pytest.mark.parametrize("add", [lambda h, c: h + c, lambda h, c: c + h, lambda h, c: h - (-c), lambda h, c: torch.add(h, c)])
def test_a_bias_added_as_a_parameter_passes_relevance_to_the_signal(add):
    torch.manual_seed(0)
    biased = _Biased(add).double().eval()
    plain = _Biased().double().eval()
    with torch.no_grad():
        plain.stem.weight.copy_(biased.stem.weight), plain.stem.bias.copy_(biased.shift)
        plain.body.weight.copy_(biased.body.weight), plain.body.bias.fill_(0.5)
        plain.head.load_state_dict(biased.head.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(biased(x), plain(x))
    assert rel_err(rsp_fast.RSP(biased).attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12


class _Blur(nn.Module):
    """timm's BlurPool: F.conv2d with a constant filter per channel."""

    def __init__(self, filt, stride=2):
        super().__init__()
        self.register_buffer("filt", filt)
        self.stride = stride

    def forward(self, h):
        return F.conv2d(h, self.filt, stride=self.stride, groups=h.shape[1])


def test_a_constant_positive_filter_is_a_pooling():
    torch.manual_seed(0)
    blurred = _single_op_model(_Blur(torch.full((4, 1, 2, 2), 0.25, dtype=D)))
    pooled = _single_op_model(nn.AvgPool2d(2))
    pooled.load_state_dict(blurred.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(blurred(x), pooled(x))
    assert rel_err(rsp_fast.RSP(blurred).attribute(x), rsp_fast.RSP(pooled).attribute(x)) < 1e-12
    for filt in (torch.randn(4, 1, 2, 2, dtype=D), nn.Parameter(torch.rand(4, 1, 2, 2, dtype=D)),
                 nn.Parameter(torch.rand(4, 1, 2, 2, dtype=D), requires_grad=False)):
        blur = _Blur(torch.zeros(4, 1, 2, 2, dtype=D))
        del blur.filt
        blur.filt = filt  # a filter with negative entries, or a learned one (frozen too): a layer RSP has no rule for
        with pytest.raises(rsp_fast.UnsupportedModelError, match="conv2d"):
            rsp_fast.RSP(_single_op_model(blur))


class _Filtered(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)
        self.register_buffer("filt", torch.full((4, 1, 3, 3), 1 / 9))

    def forward(self, x):
        h = F.conv2d(torch.relu(self.stem(x)), self.filt, padding=1, groups=4)
        return self.fc(torch.relu(self.body(h)).mean((2, 3)))


def test_a_fixed_filter_changed_in_place_is_judged_again():
    """The filter's signs choose the rule (≥ 0: a pooling, else a conv): judged once, a buffer
    loaded with other signs after the explainer was built kept the old rule (27.8 of the peak
    off a new explainer's map, blur to sharpen; 1.02 back)."""
    torch.manual_seed(0)
    model, x = _Filtered().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    blur = model.filt.clone()
    sharpen = torch.tensor([[0., -1., 0.], [-1., 5., -1.], [0., -1., 0.]], dtype=D).expand(4, 1, 3, 3)
    for filt in (sharpen, blur):
        model.load_state_dict({**model.state_dict(), "filt": filt})  # in place: the same buffer
        assert rel_err(explainer.attribute(x), rsp_fast.RSP(model).attribute(x)) < 1e-12
    plan = explainer.plan
    model.forward = lambda x: model.fc(torch.relu(model.body(F.conv2d(  # a filter fx keeps as a constant
        torch.relu(model.stem(x)), torch.ones(4, 1, 3, 3, dtype=D) / 9, padding=1, groups=4))).mean((2, 3)))
    explainer.attribute(x)
    plan = explainer.plan
    assert plan.filter_signs and plan.is_current()  # judged again alike, not traced anew at every call


def test_a_fixed_filter_is_worked_out_again_only_after_its_buffer_changed(monkeypatch):
    """Each call checks the plan: the filter's signs are judged again when its buffer holds
    other values, not at every call (about 0.1 ms of each check on timm's resnetblur50)."""
    torch.manual_seed(0)
    model, x = _Filtered().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    judged = []
    judge = rsp_fast.rules._fixed_positive_filter
    monkeypatch.setattr(rsp_fast.rules, "_fixed_positive_filter", lambda *a: judged.append(a) or judge(*a))
    explainer.attribute(x), explainer.attribute(x)
    assert not judged
    for change in (lambda: model.filt.neg_(), lambda: model.filt.__setitem__(0, 1 / 9),
                   lambda: setattr(model, "filt", torch.full((4, 1, 3, 3), 1 / 9, dtype=D)),
                   lambda: model.filt.data.mul_(-1), lambda: setattr(model.filt, "data", -model.filt)):  # no new version
        with torch.no_grad():
            change()
        judged.clear()
        assert rel_err(explainer.attribute(x), rsp_fast.RSP(model).attribute(x)) < 1e-12
        assert judged


def test_a_filter_worked_out_from_a_buffer_follows_the_buffer():
    """``(self.k.expand(4, 1, 3, 3) / 9).to(x.dtype)``: fx worked the filter out once, from the
    buffer as traced, and kept it as a constant of the graph; after the buffer was loaded in
    place RSP's pass ran the old filter (its logits 0.54 of model(x)'s peak off)."""
    class Derived(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)
            self.register_buffer("k", torch.ones(1, 1, 3, 3))

        def forward(self, x):
            filt = (self.k.expand(4, 1, 3, 3) / 9).to(x.dtype)
            return self.fc(torch.relu(self.body(F.conv2d(torch.relu(self.stem(x)), filt, padding=1, groups=4))).mean((2, 3)))
    torch.manual_seed(0)
    model, x = Derived().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    sharpen = torch.tensor([[0., -1., 0.], [-1., 45., -1.], [0., -1., 0.]], dtype=D).view(1, 1, 3, 3)
    for k in (3 * model.k, sharpen, torch.ones_like(model.k)):
        model.load_state_dict({**model.state_dict(), "k": k})  # in place: the same buffer
        explanation = explainer.explain(x)
        with torch.no_grad():
            assert rel_err(explanation.logits, model(x)) < 1e-12
        assert rel_err(explanation.attribution, rsp_fast.RSP(model).attribute(x)) < 1e-12


class _BranchingOnBuffers(nn.Module):
    """A forward that branches on a buffer's value and loops over a buffer's size."""

    def __init__(self, as_buffers=True):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
        if as_buffers:
            self.register_buffer("enabled", torch.tensor(True)), self.register_buffer("table", torch.zeros(2, 4))
        else:
            self.enabled, self.table = True, torch.zeros(2, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.enabled:
            h = h * 2
        for row in range(self.table.shape[0]):
            h = h + self.table[row].view(1, -1, 1, 1)
        return self.fc(h.mean((2, 3)))


def test_a_forward_that_branches_on_buffers_is_traced_with_their_values():
    """Buffers are read as nodes of the graph, which fx cannot branch on: such a forward is
    traced again with the buffers as the tensors they are, as before."""
    torch.manual_seed(0)
    model, plain = _BranchingOnBuffers().double().eval(), _BranchingOnBuffers(as_buffers=False).double().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    explanation = rsp_fast.RSP(model).explain(x)
    with torch.no_grad():
        assert rel_err(explanation.logits, model(x)) < 1e-12
    assert rel_err(explanation.attribution, rsp_fast.RSP(plain).attribute(x)) < 1e-12


class _Counting(nn.Module):
    """A forward that keeps a statistic in a buffer: its calls, in place (``self.calls += 1``),
    or a running mean of its features (``self.mean = 0.9 * self.mean + 0.1 * h.mean()``)."""

    def __init__(self, keeps=None):
        super().__init__()
        self.keeps, self.stem, self.fc = keeps, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(())), self.register_buffer("mean", torch.zeros(()))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        if self.keeps == "calls":
            self.calls += 1
        elif self.keeps == "mean":
            self.mean = 0.9 * self.mean + 0.1 * h.mean()
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("keeps", ["calls", "mean"])
def test_a_buffer_written_in_forward_is_left_a_tensor(keeps):
    """Traced, the forward set an fx Proxy in the buffer's place (the running mean always, the
    count once buffers were traced as nodes): the next call failed on it with fx's own TraceError."""
    torch.manual_seed(0)
    model, plain = _Counting(keeps).double().eval(), _Counting().double().eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    explainer = rsp_fast.RSP(model)
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12
    assert all(type(b) is torch.Tensor for b in model.buffers())


class _FilterMadeInForward(nn.Module):
    """A fixed filter built inside forward (as kornia's and many hand-written blur layers do),
    or the same filter held as a buffer."""

    def __init__(self, make, as_buffer=False):
        super().__init__()
        self.make = make
        if as_buffer:
            self.register_buffer("filt", make(torch.zeros(1, 4, 1, 1, dtype=D)))

    def forward(self, h):
        filt = self.filt if hasattr(self, "filt") else self.make(h)
        return F.conv2d(h, filt, padding=1, groups=4)


def _gaussian(h):
    g = torch.exp(-(torch.arange(3, dtype=h.dtype, device=h.device) - 1.0) ** 2)
    k = g[:, None] * g[None, :]
    return (k / k.sum()).expand(4, 1, 3, 3)


FILTERS_MADE_IN_FORWARD = {
    "torch.full": lambda h: torch.full((4, 1, 3, 3), 1 / 9, dtype=h.dtype, device=h.device),
    "new_ones": lambda h: h.new_ones(4, 1, 3, 3) / 9,
    "of_its_channels": lambda h: h.new_ones(h.shape[1], 1, 3, 3) / 9,  # kornia's: sized by the input
    "expanded_to_its_channels": lambda h: (torch.ones(1, 1, 3, 3, dtype=h.dtype) / 9).expand(h.size(1), -1, -1, -1),
    "type_as": lambda h: (torch.ones(4, 1, 3, 3) / 9).type_as(h),
    "gaussian": _gaussian,
    "laplacian": lambda h: torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], dtype=h.dtype).repeat(4, 1, 1, 1),
}


@pytest.mark.parametrize("make", FILTERS_MADE_IN_FORWARD.values(), ids=FILTERS_MADE_IN_FORWARD)
def test_a_filter_made_in_forward_is_explained_as_the_same_filter_held_as_a_buffer(make):
    """A box or Gaussian filter made in forward is a pooling, as the buffer is (it was read as a
    layer with learned weights: 0.89 of the map's peak apart); x.new_ones reads only x's dtype
    (it was refused as a weight computed from the activations), x.shape[1] and x.size(1) its
    size, type_as(x) its dtype (each was a layer again, 0.74 apart, or refused); a filter with
    negative entries stays a layer either way."""
    torch.manual_seed(0)
    made = _single_op_model(_FilterMadeInForward(make))
    held = _single_op_model(_FilterMadeInForward(make, as_buffer=True))
    held.load_state_dict(made.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    assert torch.allclose(made(x), held(x))
    for backend, status in rsp_fast.backends("cpu").items():
        if status == "available":
            expected = rsp_fast.RSP(held, backend=backend).attribute(x)
            assert rel_err(rsp_fast.RSP(made, backend=backend).attribute(x), expected) < 1e-12


def test_building_an_explainer_leaves_the_random_stream_alone():
    """A filter drawn in forward (torch.rand) was evaluated at plan time as if fixed, drawing
    from the caller's random stream: the next torch.rand after a seed changed."""
    model = _single_op_model(_FilterMadeInForward(lambda h: torch.rand(4, 1, 3, 3, dtype=h.dtype)))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    explainer = rsp_fast.RSP(model)
    assert torch.equal(torch.rand(3), expected)
    assert not any(isinstance(step, rsp_fast.rules.Pool) for step in explainer.plan.steps)  # drawn anew: no fixed filter


@pytest.mark.parametrize("act", [nn.Threshold(0.3, -0.2), nn.LogSigmoid(), _Lambda(lambda t: F.threshold(t, 0.3, -0.2)),
                                 _Lambda(lambda t: F.logsigmoid(t) + 0.5), _Lambda(lambda t: t.clamp(max=-0.1) + t),
                                 _Lambda(lambda t: torch.minimum(t, torch.full_like(t, -0.05))), nn.Hardtanh(-1.0, -0.1)],
                         ids=["Threshold", "LogSigmoid", "F.threshold", "logsigmoid-shifted", "clamp-max", "minimum", "Hardtanh"])
def test_activations_that_can_turn_negative_leave_the_next_layer_its_clamp(act):
    """After a ReLU these may still output negative values; the next conv took them as x̂ without
    max(x, 0) (its input's relevance 125× the reference's peak for Threshold(0.3, −0.2)). The
    same model with an explicit ReLU after the activation must give the same map."""
    torch.manual_seed(0)
    head = [nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), act, *head).double().eval()
    clamped = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), act, nn.ReLU(), *head).double().eval()
    clamped[0].load_state_dict(model[0].state_dict())  # the head's modules are the same objects
    x, R0 = torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 5, 8, 8, dtype=D)
    for backend, status in rsp_fast.backends("cpu").items():
        if status == "available":
            got = rsp_fast.RSP(model, layer="4", backend=backend).attribute(x, initial=R0)
            expected = rsp_fast.RSP(clamped, layer="5", backend=backend).attribute(x, initial=R0)
            assert (got - expected).abs().max() <= 1e-12 * max(expected.abs().max(), 1.0)


def test_a_frozen_model_is_explained_as_the_trainable_one():
    """A conv written as F.conv2d on a parameter ≥ 0 without bias stays a layer when the model
    is frozen (requires_grad_(False)); it was taken for a blur pooling."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c3, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)
            self.w2 = nn.Parameter(torch.rand(8, 8, 3, 3))  # non-negative learned weights

        def forward(self, x):
            x = F.relu(self.c1(x))
            x = F.relu(F.conv2d(x, self.w2, padding=1) - 2.0)
            return self.fc(F.relu(self.c3(x)).mean((2, 3)))
    torch.manual_seed(0)
    model, x = Net().double().eval(), torch.randn(2, 3, 16, 16, dtype=D)
    trainable = rsp_fast.RSP(model, layer="c3").attribute(x)
    assert rel_err(rsp_fast.RSP(model.requires_grad_(False), layer="c3").attribute(x), trainable) < 1e-12


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d((1, 2, 2, 1)), nn.ReplicationPad2d(1),
                                 lambda h: F.pad(h, (2, 1, 1, 1), mode="reflect"), lambda h: F.pad(h, (1, 1, 1, 1), mode="circular")])
@pytest.mark.parametrize("kernel", [1, 3])
def test_copy_padding_returns_relevance_to_the_copied_pixels(pad, kernel):
    """Relevance that lands on a reflected, replicated or wrapped border goes back to the
    pixel it copies: checked against an index map built by padding the pixel numbers. Before
    a conv that purges (k > 1) the purge follows, over the pixels, not their copies (RSP_SPEC
    §2: a uniform shift over the active units of the layer's input): the conv's step holds
    its unpurged x̂⊙dx on the padded map."""
    torch.manual_seed(0)
    model = _Scaled(pad).double().eval()
    model.body = nn.Conv2d(4, 5, kernel).double()
    model.head[1] = nn.LazyLinear(4).double()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    model(x)
    ex = rsp_fast.RSP(model).explain(x, record=True)
    pad_step = next(k for k in ex.steps if k.startswith(("pad", "getattr")) or k == "scale")
    R_out, R_in = ex.steps["body"], ex.steps[pad_step]
    numbers = torch.arange(36, dtype=D).view(1, 1, 6, 6)
    source = pad(numbers).long().flatten().expand(2, 4, -1)
    expected = torch.zeros(2, 4, 36, dtype=D).scatter_add_(2, source, R_out.flatten(2)).view(2, 4, 6, 6)
    if kernel > 1:
        total = ex.steps["relu_1"].sum((1, 2, 3)).view(2, 1, 1, 1)  # R at the conv's output
        active = expected != 0
        expected = 2 * expected - active * total / active.sum((1, 2, 3), keepdim=True)
    assert rel_err(R_in, expected) < 1e-12


class _PaddedStem(nn.Module):
    """A stem conv padding by itself, or behind a zero padding of ``pad`` (F.pad order)."""

    def __init__(self, conv, pad, explicit):
        super().__init__()
        spatial = len(pad) // 2
        padding = tuple(pad[2 * i] for i in reversed(range(spatial)))  # symmetric pads in the conv's order
        self.pad, self.explicit = pad, explicit
        self.zero_pad = nn.ZeroPad2d(pad) if len(pad) == 4 else nn.ConstantPad1d(pad, 0.0)
        self.stem = conv(3, 6, 3, stride=2, padding=0 if explicit else padding)
        self.body = conv(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        if self.explicit == "module":
            x = self.zero_pad(x)
        elif self.explicit == "function":
            x = F.pad(x, self.pad)
        h = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(h.flatten(2).mean(-1))


@pytest.mark.parametrize("conv,pad,shape", [(nn.Conv2d, (1, 1, 2, 2), (2, 3, 11, 9)), (nn.Conv1d, (2, 2), (2, 3, 13))])
@pytest.mark.parametrize("explicit", ["module", "function"])
def test_a_zero_padding_before_the_first_conv_explains_like_the_convs_own(conv, pad, shape, explicit):
    """ZeroPad2d / F.pad then the stem conv is the stem conv padding by itself: its zeros count
    neither in z^B's bounds nor as pixels. They did: relevance fell on them and was cropped
    away, uncounted (ΣR_in 0.81 of ΣR₀ with dropped 0), and the map was 0.1–0.4 off."""
    torch.manual_seed(0)
    own = _PaddedStem(conv, pad, None).double().eval()
    padded = _PaddedStem(conv, pad, explicit).double().eval()
    padded.load_state_dict(own.state_dict())
    x = torch.rand(*shape, dtype=D) * 4 - 2  # signed: the bounds L < 0 < H
    assert torch.allclose(own(x), padded(x))
    for init in ("comparative", "gradcam"):
        expected = rsp_fast.RSP(own, init=init).explain(x, record=True)
        ours = rsp_fast.RSP(padded, init=init).explain(x, record=True)
        assert rel_err(ours.attribution, expected.attribution) < 1e-12
        assert torch.allclose(ours.attribution.flatten(1).sum(1) + ours.dropped, ours.initial.flatten(1).sum(1), rtol=1e-10)


@pytest.mark.parametrize("crop", [nn.ZeroPad2d((-1, -1, 0, 0)), nn.ConstantPad2d((0, 0, -1, -2), 0.0)])
def test_a_cropping_pad_before_the_first_conv_is_no_padding_of_it(crop):
    """Negative amounts crop: not a padding the conv could take as its own (ΣR_in fell to 0.06)."""
    torch.manual_seed(0)
    model = nn.Sequential(crop, nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double().eval()
    ex = rsp_fast.RSP(model).explain(torch.rand(2, 3, 9, 10, dtype=D), record=True)
    assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, ex.initial.flatten(1).sum(1), rtol=1e-10)


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d, (2, 3, 9)), (nn.Conv2d, (2, 3, 7, 6)), (nn.Conv3d, (2, 3, 4, 5, 5))])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_conv_padding_with_copies_purges_over_its_pixels(conv, shape, mode):
    """An inner Conv{1,2,3}d(padding_mode=...): the purge's shift is uniform over the active
    pixels of its input (RSP_SPEC §2), each pixel once, its copies summed into it first; it
    was shifted once per copy (border pixels up to four times in 2-D)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, padding=2, padding_mode=mode), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(*shape, dtype=D)
    model(x)
    ex = rsp_fast.RSP(model.eval(), layer="3").explain(x, record=True)
    unpurged = ex.steps["2"]  # x̂⊙dx on the padded map (F.conv, traced, named by its module)
    pad = lambda h: F.pad(h, (2,) * 2 * (len(shape) - 2), mode=mode)
    probe = torch.zeros(ex.steps["1"].shape, dtype=D, requires_grad=True)
    (summed,) = torch.autograd.grad(pad(probe), probe, unpurged)  # each copy back onto its pixel
    total = ex.steps["3"].flatten(1).sum(1).view(-1, *[1] * (len(shape) - 1))
    active = summed != 0
    expected = 2 * summed - active * total / active.flatten(1).sum(1).view_as(total)
    assert rel_err(ex.steps["1"], expected) < 1e-12
    assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, ex.initial.flatten(1).sum(1), rtol=1e-10)


@pytest.mark.parametrize("mode,pad", [("reflect", nn.ReflectionPad2d), ("replicate", nn.ReplicationPad2d),
                                      ("circular", nn.CircularPad2d)])
def test_convs_padding_with_copies_explain_like_an_explicit_pad_then_the_conv(mode, pad):
    """Conv2d(padding_mode=...) is F.pad with that mode, then the conv without padding: the
    same attribution as the model written that way, as a first and as an inner layer (and a
    padding_mode with no padding is a plain conv)."""
    torch.manual_seed(0)

    def net(padded: bool):
        def conv(c_in, c_out, k, p, **kw):
            if padded:
                return nn.Sequential(pad(p), nn.Conv2d(c_in, c_out, k, **kw))
            return nn.Conv2d(c_in, c_out, k, padding=p, padding_mode=mode, **kw)
        return nn.Sequential(conv(3, 6, 3, 1), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 8, 3, 2, dilation=2, stride=2), nn.ReLU(),
                             conv(8, 8, 1, 0), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    written, twin = net(False).double().eval(), net(True).double().eval()
    twin.load_state_dict(_padded_keys(written.state_dict()))
    x = torch.randn(3, 3, 11, 13, dtype=D)
    assert torch.allclose(written(x), twin(x))
    R = rsp_fast.RSP(written).attribute(x)
    assert R.shape == x.shape and rel_err(R, rsp_fast.RSP(twin).attribute(x)) < 1e-12


def _padded_keys(state: dict) -> dict:
    """A state dict's conv entries renamed for the convs behind a pad (index 1 of a Sequential)."""
    return {(f"{k.split('.')[0]}.1.{k.split('.', 1)[1]}" if k.split(".")[0] in ("0", "3", "5") else k): v
            for k, v in state.items()}


@pytest.mark.parametrize("power", [lambda h: h ** 2, lambda h: torch.square(h), lambda h: h.pow(3), lambda h: h * h])
def test_powers_pass_relevance_through(power):
    """StarReLU's s·relu(x)² + b: an elementwise function, through which R passes unchanged."""
    torch.manual_seed(0)
    model = _Scaled(power).double().eval()
    ex = rsp_fast.RSP(model).explain(torch.randn(2, 3, 6, 6, dtype=D), record=True)
    step = next(k for k in ex.steps if k.startswith(("pow", "square", "mul")))
    assert torch.equal(ex.steps[step], ex.steps["body"])


@pytest.mark.parametrize("act", [nn.Softsign(), nn.Tanhshrink(), nn.Softshrink(0.2), nn.Hardshrink(0.2), nn.LogSigmoid(),
                                 nn.Threshold(0.1, -1.0), nn.RReLU(), nn.Mish(), nn.CELU(), F.softsign, F.logsigmoid,
                                 lambda h: F.threshold(h, 0.1, 0.0), lambda h: F.softshrink(h, 0.3)])
def test_torch_elementwise_activations_pass_relevance_through(act):
    """Every elementwise activation of torch.nn, module or function: R passes through unchanged
    (the extension rule of the smooth activations), the next layer reading x̂ = max(x, 0)."""
    torch.manual_seed(0)
    ex = rsp_fast.RSP(_Around(act, rectified=False).double().eval()).explain(torch.randn(2, 3, 6, 6, dtype=D), record=True)
    act_step = next(k for k in ex.steps if k.split(".")[0] not in ("stem", "body", "relu", "head"))
    assert torch.equal(ex.steps[act_step], ex.steps["body"])
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def _written_glu(h):  # GLU over channels, written out: the first half gated by the second
    a, b = h.chunk(2, dim=1)
    return a * torch.sigmoid(b)


@pytest.mark.parametrize("glu", [nn.GLU(1), lambda h: F.glu(h, 1), lambda h: F.glu(h, dim=-3)])
def test_glu_explains_like_its_written_gate(glu):
    """nn.GLU and F.glu: a·σ(b) of the two halves, explained like the same gate written out
    (all of R to a, none to b)."""
    _explained_alike(glu, _written_glu, stem_channels=8)


@pytest.mark.parametrize("act", ["GELU", "SwishMe", "HardSwishMe", "HardSigmoid"])
def test_timm_activation_modules_pass_relevance_through(act):
    """timm's own activation classes (not torch's subclasses; the "Me" ones wrap autograd
    functions fx cannot read), alone and inside a BatchNormAct2d: pass-through like torch's."""
    timm = pytest.importorskip("timm")
    from timm.layers import activations, activations_me
    cls = getattr(activations, act, None) or getattr(activations_me, act)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), timm.layers.BatchNormAct2d(4, act_layer=cls),
                          nn.Conv2d(4, 4, 3, padding=1), cls(), nn.Flatten(), nn.Linear(4 * 36, 3)).double().eval()
    ex = rsp_fast.RSP(model, layer="3").explain(torch.randn(2, 3, 6, 6, dtype=D), record=True)
    assert torch.equal(ex.steps["3"], ex.initial) and torch.equal(ex.steps["1"], ex.steps["2"])
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


class _Thresholded(nn.Module):
    def __init__(self, act, module=None):
        super().__init__()
        self.act, self.module = act, module
        self.tau = nn.Parameter(torch.tensor(-0.1))
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 36, 4))

    def forward(self, x):
        for conv in self.convs:
            x = self.act(self, conv(x))
        return self.head(x)


@pytest.mark.parametrize("written,module", [
    (lambda m, h: h.clamp(min=0), nn.ReLU()), (lambda m, h: torch.clamp(h, 0, 6), nn.ReLU6()),
    (lambda m, h: torch.clamp_min(h, 0.0), nn.ReLU()), (lambda m, h: torch.maximum(h, m.tau), None)])
def test_thresholds_written_as_ops_explain_like_activations(written, module):
    """x.clamp(min=0) is a ReLU, clamp(x, 0, 6) a ReLU6 (same map as the modules); FRN's TLU
    max(x, τ) passes relevance through like the other activations."""
    torch.manual_seed(0)
    ops = _Thresholded(written).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    ex = rsp_fast.RSP(ops, layer="convs.1").explain(x, record=True)
    if module is not None:
        modules = _Thresholded(lambda m, h: m.module(h), module).double().eval()
        modules.load_state_dict(ops.state_dict())
        assert rel_err(ex.attribution, rsp_fast.RSP(modules, layer="convs.1").attribute(x)) < 1e-12
    step = next(k for k in ex.steps if k.startswith(("clamp", "maximum")))
    assert torch.equal(ex.steps[step], ex.steps["convs.1"])


class _PooledLast(nn.Module):
    """conv → ReLU → conv → ReLU, pooled over H and W for the head; ``channels_last``: the
    map is permuted to N×H×W×C first and pooled over dims 1 and 2 (MambaOut's head)."""

    def __init__(self, channels_last):
        super().__init__()
        self.channels_last = channels_last
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        pooled = h.permute(0, 2, 3, 1).mean((1, 2)) if self.channels_last else h.mean((2, 3))
        return self.fc(pooled)


@pytest.mark.parametrize("init", ["comparative", "gradcam"])
def test_a_channels_last_saliency_map_explains_like_its_channels_first_twin(init):
    """Grad-CAM weighs channels: on an N×H×W×C map they are the last dimension, not dim 1."""
    torch.manual_seed(0)
    first, last = _PooledLast(False).double().eval(), _PooledLast(True).double().eval()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 3, 7, 6, dtype=D)
    assert torch.allclose(first(x), last(x))
    ex_last = rsp_fast.RSP(last, init=init).explain(x)
    ex_first = rsp_fast.RSP(first, init=init).explain(x)
    assert ex_last.initial.shape == (2, 7, 6, 6)
    assert rel_err(ex_last.initial.permute(0, 3, 1, 2), ex_first.initial) < 1e-12
    assert rel_err(ex_last.attribution, ex_first.attribution) < 1e-12


class _FunctionalConvs(nn.Module):
    """The same network as ``modules`` (conv, BN, ReLU, strided conv, dilated grouped "same"
    conv, pool, linear), its convs written as F.conv2d / torch.conv2d calls on its parameters."""

    def __init__(self, modules):
        super().__init__()
        self.m = modules

    def forward(self, x):
        m = self.m
        h = F.relu(m[1](F.conv2d(x, m[0].weight, m[0].bias, padding=1)))
        h = F.relu(F.conv2d(h, m[3].weight, m[3].bias, stride=2, padding=1))
        h = F.relu(torch.conv2d(h, m[5].weight, None, 1, "same", 2, 2))
        return m[9](m[8](m[7](h)))


def test_convs_written_as_functions_explain_like_conv_modules():
    torch.manual_seed(0)
    modules = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        modules[1].running_mean.uniform_(-0.5, 0.5), modules[1].running_var.uniform_(0.5, 2)
    functional = _FunctionalConvs(modules).eval()
    x = torch.randn(2, 3, 9, 10, dtype=D)
    assert torch.allclose(functional(x), modules(x))
    R_functional = rsp_fast.RSP(functional).attribute(x)  # both: the last map before the pool
    assert rel_err(R_functional, rsp_fast.RSP(modules).attribute(x)) < 1e-12
    assert [r["path"] for r in rsp_fast.cost(functional, (3, 9, 10))["layers"]][0] == "z^B"


class _Signal1d(nn.Module):
    """A 1-D CNN (first conv, BatchNorm, a strided dilated conv, reflect padding, max pool, a
    conv written with F.conv1d) or, with ``image=True``, its 2-D twin on 1×L images."""

    def __init__(self, image: bool):
        super().__init__()
        conv, bn, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if image else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        k = (lambda n: (1, n)) if image else (lambda n: (n,))  # a 1-D size, stride, dilation as the 2-D one
        pad = (lambda n: (0, n)) if image else (lambda n: (n,))
        self.stem, self.bn = conv(2, 6, k(5), padding=pad(2)), bn(6)
        self.body = conv(6, 8, k(3), stride=k(2), dilation=k(2))
        self.pool = pool(k(2))
        self.mirror = conv(8, 8, k(3), padding=pad(1), padding_mode="reflect", groups=2)
        self.w = nn.Parameter(torch.randn(5, 8, *k(3)))
        self.conv_fn, self.fn_padding = (F.conv2d, pad(1)) if image else (F.conv1d, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.body(torch.relu(self.bn(self.stem(x))))))
        h = torch.relu(self.conv_fn(torch.relu(self.mirror(h)), self.w, padding=self.fn_padding))
        return self.head(h.flatten(2).mean(-1))


@pytest.mark.parametrize("init", ["comparative", "gradcam"])
def test_1d_convs_explain_as_2d_convs_on_one_row_images(init):
    """Conv1d (modules and F.conv1d) is the 2-D conv on a 1×L image: the same attribution as
    the twin written with Conv2d, for every backend."""
    torch.manual_seed(0)
    signal, image = _Signal1d(False).double().eval(), _Signal1d(True).double().eval()
    with torch.no_grad():
        signal.bn.running_mean.normal_(), signal.bn.running_var.uniform_(0.5, 2)
        image.bn.load_state_dict(signal.bn.state_dict())
        for name, p in signal.named_parameters():
            if not name.startswith("bn"):
                image.get_parameter(name).copy_(p.unsqueeze(-2) if p.dim() == 3 else p)
    x = torch.randn(3, 2, 41, dtype=D)
    assert torch.allclose(signal(x), image(x.unsqueeze(2)))
    expected = rsp_fast.RSP(image, init=init).attribute(x.unsqueeze(2)).squeeze(2)
    for backend in [b for b, status in rsp_fast.backends("cpu").items() if status == "available"]:
        assert rel_err(rsp_fast.RSP(signal, init=init, backend=backend).attribute(x), expected) < 1e-12, backend
    with pytest.raises(rsp_fast.RSPError, match=r"3-D \(N, C, L\)"):
        rsp_fast.RSP(signal).attribute(x.unsqueeze(2))


def test_convs_with_weights_computed_from_the_input_are_refused():
    class PerSampleWeights(nn.Module):  # CondConv-like: the filter depends on the input
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            w = h.mean((0, 2, 3)).view(1, 4, 1, 1).expand(4, 4, 1, 1).contiguous()
            return self.head(F.conv2d(h, w).mean((2, 3)))
    with pytest.raises(rsp_fast.UnsupportedModelError, match="conv2d"):
        rsp_fast.RSP(PerSampleWeights())


class _FunctionalMLP(nn.Module):
    """The MLP ``modules`` (Linear, ReLU, Linear, ReLU, Linear) with its layers written as
    F.linear calls, as x @ P + b on parameters P = Wᵀ, or as x @ W.t() (and W.T, torch.t(W),
    W.transpose(0, 1)) + b on the weights themselves."""

    def __init__(self, modules, matmul):
        super().__init__()
        self.m, self.matmul = modules, matmul
        if matmul == "param":
            self.P = nn.ParameterList([nn.Parameter(modules[i].weight.detach().T.clone()) for i in (0, 2, 4)])

    def forward(self, x):
        for k, i in enumerate((0, 2, 4)):
            lin = self.m[i]
            if self.matmul == "param":
                x = x @ self.P[k] + lin.bias
            elif self.matmul == "transposed":
                W = lin.weight
                x = [x @ W.t(), torch.matmul(x, W.T), x @ torch.t(W)][k] + lin.bias if k < 2 else x @ W.transpose(0, 1)
            else:
                x = F.linear(x, lin.weight, lin.bias)
            x = torch.relu(x) if i < 4 else x
        return x


@pytest.mark.parametrize("matmul", [None, "param", "transposed"])
def test_linear_layers_written_as_functions_explain_like_modules(matmul):
    torch.manual_seed(0)
    modules = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    if matmul == "transposed":
        modules[4].bias = None  # the last layer is x @ W.transpose(0, 1) without a bias
    functional = _FunctionalMLP(modules, matmul).double().eval()
    x = torch.randn(4, 7, dtype=D)
    assert torch.allclose(functional(x), modules(x))
    R_functional = rsp_fast.RSP(functional).attribute(x)  # default: the input of the last linear layer
    assert rel_err(R_functional, rsp_fast.RSP(modules).attribute(x)) < 1e-12


class _GlobalContext(nn.Module):
    """GCNet's block: a context vector pooled from h with softmax attention over positions,
    x @ A (or A @ x), transformed and added back to h."""

    def __init__(self, weights_first, c=5):
        super().__init__()
        self.weights_first = weights_first
        self.stem, self.attn = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 1, 1)
        self.mlp, self.body = nn.Conv2d(c, c, 1), nn.Conv2d(c, 4, 3, padding=1)
        self.head = nn.Linear(4 * 30, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        B, C, H, W = h.shape
        a = F.softmax(self.attn(h).reshape(B, 1, H * W), dim=-1)
        if self.weights_first:
            context = (a @ h.reshape(B, C, H * W).transpose(1, 2)).transpose(1, 2)
        else:
            context = h.reshape(B, C, H * W) @ a.transpose(1, 2)
        h = h + torch.relu(self.mlp(context.reshape(B, C, 1, 1)))
        return self.head(torch.relu(self.body(h)).flatten(1))


@pytest.mark.parametrize("weights_first", [False, True])
def test_attention_pooling_is_the_z_rule_with_the_weights_held_constant(weights_first):
    torch.manual_seed(0)
    model = _GlobalContext(weights_first).double().eval()
    x = torch.randn(2, 3, 5, 6, dtype=D)
    ex = rsp_fast.RSP(model).explain(x, record=True)
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)
    assert not any(k.startswith(("attn", "softmax")) for k in ex.steps)  # no relevance into the weights
    matmul = next(k for k in ex.steps if k.startswith("matmul"))
    after = list(ex.steps)[list(ex.steps).index(matmul) - 1]  # the step before it: R at the product's output
    h = torch.relu(model.stem(x)).reshape(2, 5, 30) + 1e-9
    a = F.softmax(model.attn(torch.relu(model.stem(x))).reshape(2, 1, 30), dim=-1)
    R_out = ex.steps[after].reshape(2, 5, 1)
    expected = h * a * R_out / (h @ a.transpose(1, 2))  # x' ⊙ A · R / Z over each channel's positions
    got = ex.steps[matmul].transpose(1, 2) if weights_first else ex.steps[matmul]
    assert rel_err(got.reshape(2, 5, 30), expected) < 1e-10


def test_class_gradients_are_each_samples_own():
    """∂y_c/∂A per sample and class, one backward per column of classes, against autograd on
    each sample and class alone."""
    from rsp_fast.init import class_gradients

    torch.manual_seed(3)
    A = torch.rand(3, 4, 5, 5, dtype=D, requires_grad=True)
    W = torch.randn(6, 4 * 25, dtype=D)
    logits = torch.tanh(A.flatten(1)) @ W.T
    classes = torch.tensor([[0, 5, 2], [3, 3, 1], [4, 0, 5]])
    grads = class_gradients(logits, A, classes)
    for n in range(3):
        for m in range(3):
            (alone,) = torch.autograd.grad(logits[n, classes[n, m]], A, retain_graph=True)
            assert torch.allclose(grads[m, n], alone[n]) and not alone[[i for i in range(3) if i != n]].any()


def test_a_first_explanation_does_not_import_sympy():
    """The initial relevance's gradients come from scalar outputs: a grad_outputs tensor makes
    autograd check its shape symbolically, importing sympy (0.26 s of a command's start)."""
    import subprocess
    import sys

    code = ("import sys, torch, rsp_fast\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5))\n"
            "rsp_fast.RSP(m.eval(), hostile_k=2).attribute(torch.randn(2, 3, 8, 8))\n"
            "print('sympy' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_zero_padding_before_the_first_conv_is_the_convs_own_in_every_dimension(dims):
    """ZeroPad3d (or F.pad) before a first Conv3d, as ZeroPad2d before a Conv2d: the zeros count
    neither in z^B's bounds nor as pixels, so the map is the one of the same conv padding by
    itself (in 3-D it was 0.43–0.57 of the peak away, the pixels' share cropped off as dropped)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    shape = {1: (2, 3, 9), 2: (2, 3, 7, 6), 3: (2, 3, 4, 6, 5)}[dims]
    for seed in (0, 1):
        torch.manual_seed(seed)
        own = nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten()).double()
        first = conv(3, 4, 3).double()
        first.load_state_dict(own[0].state_dict())
        x = torch.randn(*shape, dtype=D)
        head = nn.Linear(own(x).shape[1], 3).double()
        want = rsp_fast.RSP(nn.Sequential(own, head).eval(), layer="0.3").attribute(x, target=1)
        module_pad = {1: lambda: nn.ConstantPad1d(1, 0.0), 2: lambda: nn.ZeroPad2d(1), 3: lambda: nn.ZeroPad3d(1)}[dims]()
        for pad in (module_pad, _FunctionalZeroPad((1, 1) * dims)):
            padded = nn.Sequential(pad, first, *own[1:]).double()
            assert torch.allclose(own(x), padded(x))
            got = rsp_fast.RSP(nn.Sequential(padded, head).eval(), layer="0.4").attribute(x, target=1)
            assert rel_err(got, want) < 1e-12, (type(pad).__name__, seed)


class _FunctionalZeroPad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x, self.pad)


class _BatchStatisticsNorm(nn.Module):
    def forward(self, x):
        return F.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm2d(8, track_running_stats=False), _BatchStatisticsNorm])
def test_batchnorms_that_normalise_by_the_batch_are_refused_by_name(norm):
    """Without running statistics a BatchNorm normalises each batch by its own mean and variance,
    in eval mode too: a sample's map would depend on the rest of its batch (it moved by 0.1 of
    its peak when only the other samples changed), so it is refused like other batch reductions."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    with pytest.raises(rsp_fast.UnsupportedModelError, match="normalises by the batch's own mean and variance"):
        rsp_fast.RSP(model, layer="4").attribute(torch.rand(3, 3, 10, 10, dtype=D))
    tracked = nn.Sequential(*[nn.BatchNorm2d(8) if i == 1 else m for i, m in enumerate(model)]).double().eval()
    assert rsp_fast.RSP(tracked, layer="4").attribute(torch.rand(3, 3, 10, 10, dtype=D)).shape == (3, 3, 10, 10)


def test_a_linear_subclass_with_its_own_forward_is_explained_as_its_linear():
    """timm's Linear (MobileNetV3's, GhostNet's classifier) overrides forward with F.linear: it
    was refused as "no RSP rule for ...: Linear" by a message that listed Linear as supported."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)).double().eval()
    theirs = nn.Sequential(timm_layers.Linear(10, 16), nn.ReLU(), timm_layers.Linear(16, 8), nn.ReLU(),
                           timm_layers.Linear(8, 5)).double().eval()
    theirs.load_state_dict(plain.state_dict())
    x = torch.randn(3, 10, dtype=D)
    for layer in (None, "2"):
        ex = rsp_fast.RSP(theirs, layer=layer).explain(x, record=True)
        assert rel_err(ex.attribution, rsp_fast.RSP(plain, layer=layer).attribute(x)) < 1e-12
    assert "2" in ex.steps and "0" in ex.steps  # named by their module paths
