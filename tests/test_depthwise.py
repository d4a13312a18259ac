"""The fused depthwise products (C++ on CPU): a depthwise conv's three products per
(sample, channel) plane, against the unfolded reference and against the library-convolution
path, alone and inside a whole RSP pass."""
import dataclasses

import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.kernels.reference import depthwise_products_reference
from rsp_fast.ops import custom, dispatch
from rsp_fast.rules import conv as conv_rule
from rsp_fast.rules.base import Context
from models import conv_products_case

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

# (N, C, multiplier, H, W, kernel, stride, dilation, padding (left, right, top, bottom))
GEOMETRIES = [
    (2, 5, 1, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (3, 4, 1, 11, 10, (3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),  # stride 2, TF-style asymmetric padding
    (2, 3, 2, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),  # channel multiplier 2, dilation 2
    (2, 6, 1, 13, 9, (5, 5), (2, 2), (1, 1), (1, 2, 1, 2)),  # 5×5, stride 2
    (1, 2, 3, 8, 9, (5, 3), (1, 2), (1, 1), (2, 2, 1, 1)),  # uneven kernel and stride
    (2, 4, 1, 7, 7, (3, 3), (3, 3), (2, 1), (0, 0, 0, 0)),  # stride 3, rows left over
    (2, 3, 1, 5, 6, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),  # 1×1, stride 2
]


def inputs(geometry, density=0.6, sign="mixed", dtype=torch.float64, zero_region=False):
    N, C, m, *conv = geometry
    return conv_products_case(N, C, C * m, *conv, density=density, sign=sign, dtype=dtype, zero_region=zero_region)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_fused_depthwise_products_equal_the_reference_float64(geometry, density):
    args = inputs(geometry, density)
    expected = depthwise_products_reference(*args)
    got = custom.depthwise_sectional_products(*args)
    assert got.shape == args[0].shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("sign", ["positive", "negative"])
@pytest.mark.parametrize("zero_region", [False, True])
def test_fused_depthwise_products_one_signed_section_and_empty_patches(sign, zero_region):
    args = inputs(GEOMETRIES[1], 0.7, sign, zero_region=zero_region)
    expected = depthwise_products_reference(*args)
    torch.testing.assert_close(custom.depthwise_sectional_products(*args), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_fused_depthwise_products_float32(geometry):
    x, R, *rest = inputs(geometry, dtype=torch.float32)
    expected = depthwise_products_reference(x.double(), R.double(), *rest)
    got = custom.depthwise_sectional_products(x, R, *rest).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_fused_depthwise_products_without_relevance_are_zero():
    x, R, *rest = inputs(GEOMETRIES[0])
    assert torch.count_nonzero(custom.depthwise_sectional_products(x, torch.zeros_like(R), *rest)) == 0


def test_fused_depthwise_products_one_thread_and_many_agree():
    args = inputs(GEOMETRIES[3])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = custom.depthwise_sectional_products(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(custom.depthwise_sectional_products(*args), one, rtol=0, atol=0)


def test_fused_depthwise_products_opcheck():
    torch.library.opcheck(torch.ops.rsp_fast.depthwise_sectional_products.default,
                          (*inputs(GEOMETRIES[1])[:2], [3, 3], [2, 2], [1, 1], [0, 1, 0, 1]))


def test_fused_depthwise_products_reject_bad_arguments():
    x, R, k, s, d, p = inputs(GEOMETRIES[0])
    with pytest.raises(RuntimeError, match="is not the output of this 3x3 conv"):
        custom.depthwise_sectional_products(x, R[..., :-1], k, s, d, p)
    with pytest.raises(RuntimeError, match="not a multiple of"):
        custom.depthwise_sectional_products(x, R[:, :-1], k, s, d, p)
    with pytest.raises(RuntimeError, match="share one dtype"):
        custom.depthwise_sectional_products(x.float(), R, k, s, d, p)
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        custom.depthwise_sectional_products(x, R, k, s, d, (-1, 1, 1, 1))


@pytest.mark.parametrize("geometry", GEOMETRIES[:5])
def test_depthwise_rule_on_the_fused_kernel_equals_the_library_convolutions(geometry):
    """The whole inner-conv rule (products and purge): the reference is PyTorch's depthwise
    convolutions (weight gradient, convolution, input gradient), not the unfolded formula above."""
    x, R, k, s, d, (left, right, top, bottom) = inputs(geometry)
    g = conv_rule.ConvGeometry(k, s, d, x.shape[1], (left, right, top, bottom))
    library = conv_rule.inner_conv_relevance(Context(values={}, shapes={}, ops=dispatch.TORCH), x, R, g, path="conv")
    ctx = Context(values={}, shapes={}, ops=dispatch.COMPILED)
    fused = conv_rule.inner_conv_relevance(ctx, x, R, g)  # the path it takes by itself
    torch.testing.assert_close(fused, library, rtol=1e-10, atol=1e-12 * library.abs().max().item())


def small_mobilenet() -> nn.Module:
    torch.manual_seed(5)

    def block(c_in, c_mid, c_out, k, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_mid, 1), nn.BatchNorm2d(c_mid), nn.ReLU6(),
                             nn.Conv2d(c_mid, c_mid, k, stride, k // 2, groups=c_mid), nn.BatchNorm2d(c_mid), nn.ReLU6(),
                             nn.Conv2d(c_mid, c_out, 1), nn.BatchNorm2d(c_out))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU6(), block(8, 16, 12, 3, 1), block(12, 24, 16, 5, 2),
                          nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.ReLU(), block(32, 24, 20, 3, 2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def test_rsp_with_fused_depthwise_products_equals_rsp_with_library_convolutions(monkeypatch):
    model, x = small_mobilenet(), torch.rand(3, 3, 40, 40, dtype=torch.float64)
    calls = []

    def counted(*args):
        calls.append(args[2])
        return custom.depthwise_sectional_products(*args)

    monkeypatch.setitem(dispatch.SETS, "cpp", dataclasses.replace(dispatch.COMPILED, depthwise_products=counted))
    fused = rsp_fast.RSP(model, backend="cpp").attribute(x, target=[1, 2, 3])
    assert calls == [(3, 3)] * 2 + [(5, 5), (3, 3)]  # every depthwise conv (one with a channel multiplier of 2)
    library = rsp_fast.RSP(model, backend="torch").attribute(x, target=[1, 2, 3])
    torch.testing.assert_close(fused, library, rtol=1e-9, atol=1e-12 * library.abs().max().item())
