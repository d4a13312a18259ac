"""The fused pointwise path (C++ on CPU: a stride-1 1×1 conv's three products a tile of
positions at a time): when the cost model takes it, and a whole RSP pass on it against the
PyTorch reference. The kernel itself is tested against its reference in
test_products_kernels.py."""
import dataclasses

import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.ops import custom, dispatch
from rsp_fast.rules import conv_paths
from test_depthwise import small_mobilenet

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

FUSED = dict(dense_pointwise=True, fused_pointwise=True)


def test_choose_path_weighs_the_masked_kernels_against_the_pointwise_kernel():
    # EfficientNet-Lite0's expansion at 112×112, 16 channels in, 59 % of R non-zero: the masked
    # kernels' cost per non-zero outweighs their fewer multiply-adds (measured 35 against 11 ms)
    o, L = 96, 112 * 112
    assert conv_paths.choose_path(16, o, L, nonzeros=0.59 * o * L, masked_ck=16, **FUSED) == "pointwise"
    # bfloat16 products on a CPU with bfloat16 units, where the fused kernel (float32) is not offered:
    # the filter path's GEMMs (2.3 against 2.6 ms per image masked at 30 % non-zero)
    assert conv_paths.choose_path(16, o, L, nonzeros=0.3 * o * L, masked_ck=16, dense_pointwise=True,
                                 torch_speedup=2.0) == "filter"
    # its expansion at 14×14, 112 channels in, a quarter of R non-zero: masked (3.5 against 10 ms)
    o, L = 672, 14 * 14
    assert conv_paths.choose_path(112, o, L, nonzeros=0.24 * o * L, masked_ck=112, **FUSED) == "masked"
    assert conv_paths.choose_path(112, o, L, **FUSED) == "pointwise"  # no masked kernel
    assert conv_paths.choose_path(1152, 192, 7 * 7, **FUSED) == "gram"  # few positions: the Gram path
    # the fused kernel pads the positions to whole tiles of 32: 25 positions cost 32
    assert conv_paths.choose_path(24, 20, 5 * 5, dense_pointwise=True) == "filter"
    assert conv_paths.choose_path(24, 20, 5 * 5, **FUSED) == "gram"


def test_bfloat16_gemms_take_the_1x1_layers_they_outrun_the_float32_kernel_on():
    """precision="bf16" on a CPU with bfloat16 units (torch_speedup 2): the filter path's GEMMs
    against the fused float32 kernel, their passes over the o·L responses counted."""
    bf16 = dict(FUSED, torch_speedup=2.0)
    # ResNet50's 256→64 at 56²: bfloat16 GEMMs 1.45 against the kernel's 2.4 ms per image
    assert conv_paths.choose_path(256, 64, 56 * 56, **bf16) == "filter"
    assert conv_paths.choose_path(256, 64, 56 * 56, **FUSED) == "pointwise"  # float32
    # EfficientNet-Lite0's 16→96 at 112²: few channels, the kernel still wins (1.3 against 2.3 ms)
    assert conv_paths.choose_path(16, 96, 112 * 112, **bf16) == "pointwise"
    assert conv_paths.torch_products_speedup(True, torch.bfloat16) == 1.0  # CUDA: weighed elsewhere
    assert conv_paths.torch_products_speedup(False, torch.float32) == 1.0


def test_rsp_with_fused_pointwise_products_equals_the_reference(monkeypatch):
    # 64×64: the last block's 8×8 map has positions enough for the dense products (not the Gram path)
    model, x = small_mobilenet(), torch.rand(3, 3, 64, 64, dtype=torch.float64)
    calls = []

    def counted(x_pos, R):
        calls.append((x_pos.shape[1], R.shape[1]))
        return custom.pointwise_sectional_products(x_pos, R)

    # without the masked kernels every 1×1 conv takes the fused kernel
    monkeypatch.setitem(dispatch.SETS, "cpp", dataclasses.replace(dispatch.COMPILED, pointwise_products=counted,
                                                                  masked_products=None))
    fused = rsp_fast.RSP(model, backend="cpp").attribute(x, target=[1, 2, 3])
    assert sorted(calls) == sorted([(8, 16), (16, 12), (12, 24), (24, 16), (32, 24), (24, 20)])
    reference = rsp_fast.RSP(model, backend="torch").attribute(x, target=[1, 2, 3])
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12 * reference.abs().max().item())


def test_strided_1x1_conv_takes_the_pointwise_kernel_on_the_pixels_it_reads(monkeypatch):
    """ResNet's downsampling shortcut (1×1, stride 2) runs as a stride-1 1×1 conv of every
    other pixel: the fused kernel serves it too, and the result is the reference's."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1, stride=2), nn.ReLU(),
                          nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 5)).double().eval()
    x = torch.rand(2, 3, 17, 17, dtype=torch.float64)
    calls = []

    def counted(x_pos, R):
        calls.append(tuple(x_pos.shape))
        return custom.pointwise_sectional_products(x_pos, R)

    monkeypatch.setitem(dispatch.SETS, "cpp", dataclasses.replace(dispatch.COMPILED, pointwise_products=counted,
                                                                  masked_products=None))
    fused = rsp_fast.RSP(model, layer="5", backend="cpp").attribute(x, target=[0, 4])
    assert calls == [(2, 8, 9, 9)]
    reference = rsp_fast.RSP(model, layer="5", backend="torch").attribute(x, target=[0, 4])
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12 * reference.abs().max().item())
