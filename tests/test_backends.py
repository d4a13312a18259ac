"""End to end: every available backend gives what the PyTorch reference gives."""
import os
import subprocess
import sys

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


def test_half_precision_models_run_the_kernels_in_float32():
    """The rules of a bfloat16 model run in float32, so every backend handles them (the
    compiled kernels take float32 and float64 only)."""
    model = torchvision.models.resnet18(num_classes=5).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    R = rsp_fast.RSP(model).attribute(x)
    assert R.dtype == torch.float32 and torch.isfinite(R).all()
    assert rel_err(R, rsp_fast.RSP(model, backend="torch").attribute(x)) < 1e-5
    if rsp_fast.backends("cpu")["cpp"] == "available":
        assert rel_err(rsp_fast.RSP(model, backend="cpp").attribute(x), R) < 1e-5


@pytest.mark.parametrize("capability,cuda,triton", [((7, 0), False, False), ((7, 5), True, False), ((8, 0), True, True),
                                                     ((9, 0), True, True)])
def test_gpus_older_than_the_kernels_are_turned_down_with_a_reason(monkeypatch, capability, cuda, triton):
    """The CUDA kernels are built for 7.5 and later, the Triton kernels' bf16 and TF32 dots need
    8.0: on a V100 or a T4 ``auto`` picked them and the launch failed ("no kernel image").
    (No GPU here: the device's answers are stood in for.)"""
    from rsp_fast.ops import custom, dispatch
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(custom, "HAVE_C", True)
    monkeypatch.setattr(custom, "cuda_kernels_built", lambda: True)
    status = rsp_fast.backends("cuda")
    have = f"Some GPU has {capability[0]}.{capability[1]}"
    assert status["cuda"] == "available" if cuda else status["cuda"] == (
        f"rsp_fast._C's CUDA kernels are built for compute capability 7.5 and later; {have}")
    assert status["triton"] == "available" if triton else status["triton"] == (
        f"the Triton kernels (bf16 and TF32 dots) need compute capability 8.0 and later; {have}")
    expected = "cuda" if cuda else "triton" if triton else "torch"
    assert dispatch.select_kernels("auto", torch.device("cuda")).name == expected


def test_triton_interpreter_turned_on_after_triton_was_imported_is_a_reason_not_a_crash():
    """TRITON_INTERPRET=1 set after torchvision imported triton: the backend said "available",
    then failed deep inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    pytest.importorskip("triton")
    script = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import rsp_fast\n"
        "from rsp_fast.errors import BackendUnavailableError\n"
        "print(rsp_fast.backends('cpu')['triton'])\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))\n"
        "try:\n"
        "    rsp_fast.RSP(model, backend='triton').attribute(torch.rand(1, 3, 8, 8))\n"
        "except BackendUnavailableError as exc:\n"
        "    print('refused:', exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    status, refused = out.stdout.splitlines()[-2:]
    assert "set after triton was imported" in status
    assert refused.startswith("refused:") and "before the first import" in refused
