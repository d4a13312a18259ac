"""End to end: every available backend gives what the PyTorch reference gives."""
import pytest
import torch
import torchvision

import rsp_fast
from conftest import rel_err

AVAILABLE = [b for b, status in rsp_fast.backends("cpu").items() if status == "available" and b != "torch"]


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("name,size", [("vgg16", 32), ("resnet50", 48), ("mobilenet_v2", 48)])
def test_backend_matches_torch(backend, name, size):
    model = getattr(torchvision.models, name)(num_classes=10).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    expected = rsp_fast.RSP(model, backend="torch").attribute(x)
    got = rsp_fast.RSP(model, backend=backend).attribute(x)
    assert rel_err(got, expected) < 1e-9


def test_auto_prefers_compiled_kernels_on_cpu():
    from rsp_fast.ops.dispatch import select_kernels
    expected = "cpp" if rsp_fast.backends("cpu")["cpp"] == "available" else "torch"
    assert select_kernels("auto", torch.device("cpu")).name == expected


def test_auto_falls_back_for_dtypes_the_kernels_do_not_handle():
    model = torchvision.models.resnet18(num_classes=5).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    R = rsp_fast.RSP(model).attribute(x)  # auto: cpp handles float32/64 only, so torch runs
    assert R.dtype == torch.bfloat16 and torch.isfinite(R.float()).all()
    assert torch.equal(R, rsp_fast.RSP(model, backend="torch").attribute(x))
    if rsp_fast.backends("cpu")["cpp"] == "available":
        with pytest.raises(rsp_fast.BackendUnavailableError, match="handle float32, float64, not bfloat16"):
            rsp_fast.RSP(model, backend="cpp").attribute(x)
