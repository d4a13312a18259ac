"""The fused depthwise path (C++ on CPU: a depthwise conv's three products per (sample,
channel) plane): the rule on it against the rule on PyTorch's depthwise convolutions, alone
and in a whole RSP pass. The kernel itself is tested against its reference in
test_products_kernels.py."""
import dataclasses

import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.ops import custom, dispatch
from rsp_fast.rules import conv as conv_rule
from rsp_fast.rules.base import Context
from models import conv_products_case
from test_products_kernels import DEPTHWISE

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")


@pytest.mark.parametrize("geometry", DEPTHWISE[:5])
def test_depthwise_rule_on_the_fused_kernel_equals_the_library_convolutions(geometry):
    """The whole inner-conv rule (products and purge): the reference is PyTorch's depthwise
    convolutions (weight gradient, convolution, input gradient), not the unfolded formula."""
    x, R, k, s, d, (left, right, top, bottom) = conv_products_case(*geometry, density=0.6)
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
