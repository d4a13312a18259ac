"""Precision modes: products in bfloat16 agree with the float64 result; tf32 needs CUDA."""
import pytest
import torch
import torch.nn.functional as F

import rsp_fast
from rsp_fast.errors import RSPError
from conftest import GOLDEN_FILES, load_golden
from models import golden_model


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the heat maps (channel sums), per sample, worst case."""
    ha, hb = rsp_fast.heatmap(a).flatten(1).double(), rsp_fast.heatmap(b).flatten(1).double()
    return F.cosine_similarity(ha, hb, dim=1).min().item()


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_bf16_products_agree_with_float64(backend):
    """With backend="triton" on the CPU (Triton's interpreter, which multiplies bf16's raw bits
    as integers) the map was noise: cosine 0.02 on ResNet18."""
    if rsp_fast.backends("cpu").get(backend, "available") != "available":
        pytest.skip(rsp_fast.backends("cpu")[backend])
    g = load_golden(next(p for p in GOLDEN_FILES if p.stem == "vgg16_narrow_comparative"))
    layer = f"features.{g['saliency_layer']}"
    exact = rsp_fast.RSP(golden_model(g), layer=layer).attribute(g["x"], target=g["target"], hostile=g["hostile"])
    model32 = golden_model(g, torch.float32)
    x = torch.cat([g["x"].float(), torch.randn(3, 3, 64, 64)])
    low = rsp_fast.RSP(model32, layer=layer, precision="bf16", backend=backend).attribute(x)
    full = rsp_fast.RSP(model32, layer=layer, precision="fp32", backend=backend).attribute(x)
    assert low.dtype == torch.float32
    assert _agreement(low[:1], exact) > 0.99
    assert _agreement(low, full) > 0.99
    assert not torch.equal(low, full)  # the products really ran in bfloat16


def test_tf32_needs_cuda_tensors():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    with pytest.raises(RSPError, match="tf32"):
        rsp_fast.RSP(model, precision="tf32").attribute(torch.randn(1, 3, 8, 8))
    with pytest.raises(RSPError, match="precision must be one of"):
        rsp_fast.RSP(model, precision="fp8")


def test_bf16_on_cpu_keeps_the_compiled_float32_kernels(monkeypatch):
    """precision="bf16" on CPU: the fused kernels (float32) still take the layers they win, so a
    depthwise conv runs fused, not on PyTorch's bfloat16 convolutions; the map agrees with fp32."""
    from rsp_fast.ops import dispatch
    from rsp_fast.rules import conv_paths

    if dispatch._availability("cpp", torch.device("cpu")) != "":
        pytest.skip("rsp_fast._C is not built")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(24, 5)).eval()
    x = torch.randn(2, 3, 24, 24)
    taken, choose = [], conv_paths.choose_path
    monkeypatch.setattr(conv_paths, "choose_path", lambda *a, **k: taken.append(choose(*a, **k)) or taken[-1])
    low = rsp_fast.RSP(model, layer="5", precision="bf16", backend="cpp").attribute(x, target=1)
    full = rsp_fast.RSP(model, layer="5", precision="fp32", backend="cpp").attribute(x, target=1)
    # only the 1×1 conv asks the cost model, in each pass: the depthwise one goes to the fused kernel
    assert len(taken) == 2
    assert _agreement(low, full) > 0.99
