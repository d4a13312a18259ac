"""Compiled custom ops against the PyTorch reference (kernels/reference.py)."""
import pytest
import torch

from rsp_fast.kernels.reference import purge_reference
from rsp_fast.ops import custom

pytestmark = pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")

SHAPES = [(1, 3, 7, 9), (5, 17, 13, 13), (5, 64, 1, 1), (2, 17), (1, 1, 1, 1)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def purge_inputs(shape, dtype, device="cpu", case="random"):
    dx = torch.randn(shape, dtype=dtype, device=device)
    x = torch.randn(shape, dtype=dtype, device=device).clamp(min=0)
    total = torch.randn(shape[0], dtype=dtype, device=device)
    if case == "zero":
        dx.zero_()
    elif case == "positive":
        dx = dx.abs()
    elif case == "negative":
        dx = -dx.abs()
    elif case == "mixed" and shape[0] > 1:
        dx[0].zero_()  # a sample with nothing active
        x[-1].zero_()
    return dx, x, total


def _check(device, dtype, shape, case):
    dx, x, total = purge_inputs(shape, dtype, device, case)
    out = custom.purge(dx, x, total)
    ref = purge_reference(dx.double(), x.double(), total.double()).to(dtype)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", "zero", "positive", "negative", "mixed"])
def test_purge_cpu(shape, dtype, case):
    _check("cpu", dtype, shape, case)


def test_purge_cpu_non_contiguous():
    dx, x, total = purge_inputs((4, 6, 5, 3), torch.float64)
    dx_t, x_t = dx.transpose(1, 3), x.transpose(1, 3)
    assert not dx_t.is_contiguous()
    torch.testing.assert_close(custom.purge(dx_t, x_t, total), purge_reference(dx_t, x_t, total))


def test_purge_rejects_bad_arguments():
    dx, x, total = purge_inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="differ in shape"):
        custom.purge(dx, x[:, :2], total)
    with pytest.raises(RuntimeError, match="total must have shape"):
        custom.purge(dx, x, total[:1])
    with pytest.raises(RuntimeError, match="share one dtype"):
        custom.purge(dx, x.double(), total)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_purge_opcheck(shape):
    torch.library.opcheck(torch.ops.rsp_fast.purge.default, purge_inputs(shape, torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "zero", "mixed"])
def test_purge_cuda(dtype, case):
    for shape in SHAPES:
        _check("cuda", dtype, shape, case)


@pytest.mark.cuda
def test_purge_cuda_opcheck():
    torch.library.opcheck(torch.ops.rsp_fast.purge.default, purge_inputs((3, 5, 7, 9), torch.float32, "cuda"))
