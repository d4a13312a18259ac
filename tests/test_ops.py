"""Every kernel (C++ CPU, Triton, CUDA) against the PyTorch reference (kernels/reference.py)."""
import pytest
import torch

from rsp_fast.kernels.reference import purge_reference, sectional_normalize_reference, stacked_sections
from rsp_fast.kernels.triton import triton_unavailable_reason
from rsp_fast.ops import custom, dispatch
from conftest import tf32_products

SHAPES = [(1, 3, 7, 9), (5, 17, 13, 13), (5, 64, 1, 1), (2, 17), (1, 1, 1, 1),
          (3, 5, 100, 80), (1, 3, 200, 100)]  # samples of several chunks of the CPU purge: whole samples per thread, or chunks
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CASES = ["random", "zero", "positive", "negative", "mixed"]


def _kernel_sets(device):
    return [pytest.param(name, marks=pytest.mark.cuda if name == "cuda" else ()) for name in ("cpp", "triton", "cuda")
            if (name == "cuda") == (device == "cuda") or name == "triton"]


def _kernels(name, device):
    reason = dispatch._availability(name, torch.device(device))
    if reason:
        pytest.skip(reason)
    return dispatch.SETS[name]


def _signed_case(t: torch.Tensor, case: str) -> torch.Tensor:
    """The signed operand of a kernel test set to one of the edge cases."""
    if case == "zero":
        return torch.zeros_like(t)
    if case == "positive":
        return t.abs()
    if case == "negative":
        return -t.abs()
    return t


def purge_inputs(shape, dtype, device="cpu", case="random"):
    dx = _signed_case(torch.randn(shape, dtype=dtype, device=device), case)
    x = torch.randn(shape, dtype=dtype, device=device).clamp(min=0)
    total = torch.randn(shape[0], dtype=dtype, device=device)
    if case == "mixed" and shape[0] > 1:
        dx[0].zero_()  # a sample with nothing active
        x[-1].zero_()
    return dx, x, total


def normalize_inputs(shape, dtype, device="cpu", case="random"):
    """R and a stacked response [Ga; Gb] whose halves are passed as (non-contiguous) views."""
    R = _signed_case(torch.randn(shape, dtype=dtype, device=device), case)
    G = torch.rand((2,) + tuple(shape), dtype=dtype, device=device) + 0.1
    G[0].view(-1)[::3] = 0  # zeros in the responses, under both signs of R
    G[1].view(-1)[1::4] = 0
    if case == "mixed" and shape[0] > 1:
        R[0] = R[0].abs()  # a sample with an empty hostile section
        R[-1] = -R[-1].abs()
    return R, G[0], G[1]


def _check_purge(kernels, device, dtype, shape, case):
    dx, x, total = purge_inputs(shape, dtype, device, case)
    out = kernels.purge(dx, x, total)
    ref = purge_reference(dx.double(), x.double(), total.double()).to(dtype)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def _check_normalize(kernels, device, dtype, shape, case):
    R, Ga, Gb = normalize_inputs(shape, dtype, device, case)
    sp, sn = kernels.sectional_normalize(R, Ga, Gb)
    rp, rn = sectional_normalize_reference(R.double(), Ga.double(), Gb.double())
    torch.testing.assert_close(sp, rp.to(dtype), **TOL[dtype])
    torch.testing.assert_close(sn, rn.to(dtype), **TOL[dtype])
    assert (sp >= 0).all() and (sn >= 0).all()


@pytest.mark.parametrize("name", _kernel_sets("cpu"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernels_cpu(name, shape, dtype, case):
    kernels = _kernels(name, "cpu")
    _check_purge(kernels, "cpu", dtype, shape, case)
    _check_normalize(kernels, "cpu", dtype, shape, case)


def stacked_inputs(shape, dtype, device="cpu", case="random"):
    """Rs = [R⁺; R⁻] and Gs = [Ga; Gb] along dim −2, and what the unstacked op makes of them."""
    R, Ga, Gb = normalize_inputs(shape, dtype, device, case)
    Sp, Sn = sectional_normalize_reference(R, Ga, Gb)
    return stacked_sections(R, dim=-2), torch.cat([Ga, Gb], dim=-2), R.shape[-2], torch.cat([Sp, -Sn], dim=-2)


@pytest.mark.parametrize("name", ["torch"] + _kernel_sets("cpu"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_stacked_normalize_equals_the_two_sections_concatenated(name, shape, dtype, case):
    kernels = _kernels(name, "cpu")
    Rs, Gs, half, expected = stacked_inputs(shape, dtype, case=case)
    torch.testing.assert_close(kernels.sectional_normalize_stacked(Rs, Gs, half), expected, **TOL[dtype])
    # non-contiguous operands
    got = kernels.sectional_normalize_stacked(Rs.transpose(-1, -2).contiguous().transpose(-1, -2), Gs, half)
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_stacked_normalize_cuda(name, dtype, case):
    kernels = _kernels(name, "cuda")
    for shape in SHAPES:
        Rs, Gs, half, expected = stacked_inputs(shape, dtype, "cuda", case)
        got = kernels.sectional_normalize_stacked(Rs, Gs, half)
        assert got.is_contiguous() and got.dtype == dtype
        torch.testing.assert_close(got, expected, **TOL[dtype])
        got = kernels.sectional_normalize_stacked(Rs.transpose(-1, -2).contiguous().transpose(-1, -2), Gs, half)
        torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("name", _kernel_sets("cpu"))
def test_kernels_accept_non_contiguous_inputs(name):
    kernels = _kernels(name, "cpu")
    dx, x, total = purge_inputs((4, 6, 5, 3), torch.float64)
    dx_t, x_t = dx.transpose(1, 3), x.transpose(1, 3)
    assert not dx_t.is_contiguous()
    torch.testing.assert_close(kernels.purge(dx_t, x_t, total), purge_reference(dx_t, x_t, total))
    R, Ga, Gb = normalize_inputs((3, 4, 5), torch.float64)
    assert not Ga.is_contiguous() or Ga.storage_offset() == 0
    R_t = R.transpose(1, 2)
    for ours, ref in zip(kernels.sectional_normalize(R_t, Ga.transpose(1, 2), Gb.transpose(1, 2)),
                         sectional_normalize_reference(R_t, Ga.transpose(1, 2), Gb.transpose(1, 2))):
        torch.testing.assert_close(ours, ref)


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
def test_compiled_ops_reject_bad_arguments():
    dx, x, total = purge_inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="differ in shape"):
        custom.purge(dx, x[:, :2], total)
    with pytest.raises(RuntimeError, match="total must have shape"):
        custom.purge(dx, x, total[:1])
    with pytest.raises(RuntimeError, match="share one dtype"):
        custom.purge(dx, x.double(), total)
    R, Ga, Gb = normalize_inputs((2, 3), torch.float32)
    with pytest.raises(RuntimeError, match="differ in shape"):
        custom.sectional_normalize(R, Ga[:1], Gb)
    Rs, Gs, half, _ = stacked_inputs((2, 3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="must be twice half = 4"):
        custom.sectional_normalize_stacked(Rs, Gs, half + 1)
    with pytest.raises(RuntimeError, match=f"must be twice half = {2**62}"):  # was "2 * half = -9223372036854775808"
        custom.sectional_normalize_stacked(Rs, Gs, 2**62)


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_opcheck(shape):
    torch.library.opcheck(torch.ops.rsp_fast.purge.default, purge_inputs(shape, torch.float64))
    torch.library.opcheck(torch.ops.rsp_fast.sectional_normalize.default, normalize_inputs(shape, torch.float64))
    torch.library.opcheck(torch.ops.rsp_fast.sectional_normalize_stacked.default, stacked_inputs(shape, torch.float64)[:3])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernels_cuda(name, dtype, case):
    kernels = _kernels(name, "cuda")
    for shape in SHAPES:
        _check_purge(kernels, "cuda", dtype, shape, case)
        _check_normalize(kernels, "cuda", dtype, shape, case)


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
def test_fakes_check_what_the_kernels_check():
    """torch.compile traces the ops through their fakes: a channels-last dx gave the purge's fake
    dx's strides where the kernel returns a contiguous tensor (opcheck and compiled calls failed);
    a meta tensor among CPU ones dispatched to a fake that handed back uninitialised CPU memory;
    shapes, dtypes and devices the kernels refuse were taken while tracing."""
    dx, x, total = purge_inputs((2, 3, 4, 6), torch.float64)
    torch.library.opcheck(torch.ops.rsp_fast.purge.default, (dx.to(memory_format=torch.channels_last), x, total))
    compiled = torch.compile(custom.purge, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(dx.transpose(2, 3), x.transpose(2, 3), total),
                               custom.purge(dx.transpose(2, 3).contiguous(), x.transpose(2, 3).contiguous(), total))
    with pytest.raises(RuntimeError, match="on one device"):
        custom.purge(dx, x.to("meta"), total)
    R, Ga, Gb = normalize_inputs((2, 3), torch.float32)
    with pytest.raises(RuntimeError, match="on one device"):
        custom.sectional_normalize(R, Ga.to("meta"), Gb)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, R = torch.rand(2, 3, 8, 8), torch.randn(2, 4, 50, 50)
        with pytest.raises(RuntimeError, match="is not the output of this 3x3 conv"):
            custom.masked_sectional_products(x, R, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
        with pytest.raises(RuntimeError, match="share one dtype"):
            custom.purge(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, dtype=torch.float64))


_X, _R = torch.rand(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
_REFUSED_BY_THE_KERNELS = {  # op, arguments: what the CPU kernels refuse
    "float16": ("masked_sectional_products", (_X.half(), _R.half(), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))),
    "int32": ("sectional_normalize", (_R.int(), _R.int(), _R.int())),
    "bfloat16 purge": ("purge", (_X.bfloat16(), _X.bfloat16(), _X[:, 0, 0, 0].bfloat16())),
    "kernel 0": ("masked_sectional_products", (_X, _R, (0, 0), (1, 1), (1, 1), (0, 0, 0, 0))),
    "stride 0": ("masked_sectional_products", (_X, _R, (1, 1), (0, 1), (1, 1), (0, 0, 0, 0))),
    "negative padding": ("masked_sectional_products", (_X, _R[..., :3, :3], (1, 1), (1, 1), (1, 1), (-1, -1, -1, -1))),
    "stride 2^40": ("masked_sectional_products", (_X, _R[..., :1, :1], (1, 1), (2**40, 2**40), (1, 1), (0, 0, 0, 0))),
    "12x12 depthwise": ("depthwise_sectional_products", (torch.rand(2, 4, 12, 12), torch.rand(2, 4, 1, 1), (12, 12),
                                                         (1, 1), (1, 1), (0, 0, 0, 0))),
    "1-D pointwise": ("pointwise_sectional_products", (torch.rand(5), torch.rand(5))),
    "0-d purge": ("purge", (torch.tensor(1.0), torch.tensor(1.0), torch.ones(1))),
}


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
@pytest.mark.parametrize("case", _REFUSED_BY_THE_KERNELS)
def test_fakes_refuse_what_the_kernels_refuse(case):
    """torch.compile traces through the fakes: each of these was taken while tracing (or failed with a
    ZeroDivisionError / IndexError of the fake's own) and failed only when the kernel ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op, args = _REFUSED_BY_THE_KERNELS[case]
    with pytest.raises(RuntimeError):
        getattr(torch.ops.rsp_fast, op)(*args)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=f"^{op}: "):  # the fake's own check (torch's "no fake" names the op too)
            getattr(torch.ops.rsp_fast, op)(*fakes)


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
def test_an_empty_depthwise_layer_passes_opcheck():
    """C = O = 0: the kernel returns an empty result, the fake refused ("0 output channels are not a multiple of 0")."""
    x, R = torch.rand(2, 0, 5, 5), torch.rand(2, 0, 5, 5)
    torch.library.opcheck(torch.ops.rsp_fast.depthwise_sectional_products.default,
                          (x, R, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]))


@pytest.mark.parametrize("name", ["torch"] + _kernel_sets("cpu"))
def test_a_purge_with_an_infinite_total_leaves_inactive_units_at_zero(name):
    """R_in = D − [D≠0]·total/n: the reference and the C++ kernel computed D − [D≠0]·shift, and
    0·inf made the inactive units NaN (Triton and CUDA select instead)."""
    kernels = _kernels(name, "cpu")
    dx = torch.tensor([[1.0, 0, 2, 0], [0, 3, 0, 0]], dtype=torch.float64)
    out = kernels.purge(dx, torch.ones_like(dx), torch.tensor([float("inf"), 1.0], dtype=torch.float64))
    assert out[0].tolist() == [float("-inf"), 0, float("-inf"), 0] and out[1].tolist() == [0, 5, 0, 0]


def test_sectional_matmul_triton_takes_empty_operands():
    """K = 0 (no input column) or M = 0: 'cannot reshape tensor of 0 elements into shape [-1, 4, 0]'."""
    from rsp_fast.kernels.reference import sectional_matmul_reference
    kernels = _kernels("triton", "cpu")
    for batch, M, K, N in [(3, 4, 0, 5), (2, 0, 3, 4)]:
        A, B, Rs = torch.rand(batch, M, K), torch.rand(batch, K, N), torch.rand(batch, M, N)
        got = kernels.sectional_matmul(A, B, Rs, M // 2)
        assert torch.equal(got, sectional_matmul_reference(A, B, Rs, M // 2))


@pytest.mark.parametrize("name", ["torch"] + _kernel_sets("cpu"))
def test_normalize_keeps_an_infinity_in_its_own_section(name):
    """S⁺ = R/Ga where R > 0 and Ga ≠ 0, else 0: masks multiplied in (0·inf) made an infinite R
    or response a NaN in the other section (the C++ kernel, and the reference for an infinite G)."""
    kernels = _kernels(name, "cpu")
    inf = float("inf")
    R, Ga, Gb = (torch.tensor(v, dtype=torch.float64) for v in ([1, -1, inf, -inf], [inf, inf, 1, 1], [1, inf, 1, 1]))
    S_pos, S_neg = kernels.sectional_normalize(R, Ga, Gb)
    assert S_pos.tolist() == [0, 0, inf, 0] and S_neg.tolist() == [0, 0, 0, inf]
    if kernels.sectional_normalize_stacked is not None:
        stacked = kernels.sectional_normalize_stacked(stacked_sections(R.view(1, 4), 0), torch.stack([Ga, Gb]), 1)
        assert stacked.tolist() == [[0, 0, inf, 0], [0, 0, 0, -inf]]


@pytest.mark.parametrize("name", ["torch"] + _kernel_sets("cpu"))
def test_normalize_passes_a_nan_on_as_the_reference_does(name):
    """A NaN R (relevance that left the dtype's range) is NaN in both sections where the response
    is not 0, so that the map is NaN and refused: the kernels wrote 0 there, a finite map."""
    kernels = _kernels(name, "cpu")
    nan = float("nan")
    R, Ga, Gb = (torch.tensor(v, dtype=torch.float64) for v in ([nan, nan, nan, 1, -1], [2, 0, 2, nan, 1], [2, 2, 0, 1, nan]))
    expected = sectional_normalize_reference(R, Ga, Gb)
    for ours, reference in zip(kernels.sectional_normalize(R, Ga, Gb), expected):
        torch.testing.assert_close(ours, reference, equal_nan=True, rtol=0, atol=0)
    assert expected[0].isnan().tolist() == [True, False, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_reference_purge_counts_active_units_beyond_half_precision(dtype):
    """70,000 active units: a float16 count was inf (no shift: ΣR_in off by the whole total),
    a bfloat16 count 70,144; the count is an integer, the shift float32, as in the kernels."""
    dx = torch.full((1, 70000), 0.25, dtype=dtype)
    x = torch.ones(1, 70000, dtype=dtype)
    total = torch.tensor([1000.0], dtype=dtype)
    out = purge_reference(dx, x, total)
    expected = torch.tensor(0.5 - 1000 / 70000, dtype=torch.float64).to(dtype)
    assert (out == expected).all(), out[0, :3]


@pytest.mark.parametrize("op,R_hw,stride,padding", [
    ("masked_sectional_products", (1, 1), 2**31 - 1, (2**29, 2**29 - 1, 2**29, 2**29 - 1)),  # Hp·Wp·Cp wrapped to 0
    ("depthwise_sectional_products", (4, 4), 2**30, (2**31 - 1,) * 4)])  # the phase planes' size wrapped to 0
def test_products_refuse_planes_whose_size_overflows(op, R_hw, stride, padding):
    """Paddings and strides each below 2^31 whose padded plane passes 2^62 elements wrapped the
    kernels' size checks to 0: a buffer of 64 bytes, then a segfault. A RuntimeError now."""
    _kernels("cpp", "cpu")
    x, R = torch.ones(1, 1, 1, 1), torch.ones(1, 1, *R_hw)
    with pytest.raises(RuntimeError, match="passes 2\\^31 elements a plane"):
        getattr(custom, op)(x, R, (1, 1), (stride, stride), (1, 1), padding)


def test_triton_purge_takes_more_samples_than_a_launch(monkeypatch):
    """A grid's second dimension holds 65535 samples on CUDA (an MLP's large tabular batch has
    more): the purge launches in parts past it, with the same result (here parts of 2)."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    from rsp_fast.kernels.triton import purge

    dx, x, total = purge_inputs((5, 3, 7), torch.float64)
    monkeypatch.setattr(purge, "MAX_GRID_Y", 2)
    torch.testing.assert_close(purge.purge_triton(dx, x, total), purge_reference(dx, x, total), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not custom.HAVE_C, reason="rsp_fast._C is not built")
def test_ops_refuse_to_be_differentiated():
    """No op has a derivative: backward() through one raised only a warning and left the
    gradient at None; now it is an error."""
    dx, x, total = purge_inputs((2, 3, 4, 4), torch.float64)
    dx.requires_grad_()
    with pytest.raises(RuntimeError, match="not implemented"):
        custom.purge(dx, x, total).sum().backward()


@pytest.mark.cuda
def test_opcheck_cuda():
    torch.library.opcheck(torch.ops.rsp_fast.purge.default, purge_inputs((3, 5, 7, 9), torch.float32, "cuda"))
    torch.library.opcheck(torch.ops.rsp_fast.sectional_normalize.default, normalize_inputs((3, 5, 7), torch.float32, "cuda"))
    torch.library.opcheck(torch.ops.rsp_fast.sectional_normalize_stacked.default,
                          stacked_inputs((3, 5, 7), torch.float32, "cuda")[:3])


MATMUL_SHAPES = [(1, 1, 2, 5, 7), (2, 3, 6, 37, 45), (5, 1, 34, 9, 33), (2, 1, 200, 70, 300)]  # batch dims, 2·half, K, N
MATMUL_TOL = {torch.float64: TOL[torch.float64], torch.float32: dict(rtol=1e-4, atol=1e-4),
              torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.float64),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
                                          pytest.param("cuda", torch.float64, marks=pytest.mark.cuda),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", MATMUL_SHAPES)
def test_sectional_matmul_triton(shape, device, dtype):
    from rsp_fast.kernels.reference import sectional_matmul_reference

    kernels = _kernels("triton", device)
    *batch, M, K, N = shape
    A = torch.randn(*batch, M, K, dtype=dtype, device=device).abs()  # as in RSP: sections and patches are non-negative
    B = torch.rand(*batch, K, N, dtype=dtype, device=device)
    B[..., :, 0] = 0  # a column of zero responses
    R = torch.randn(*batch, M // 2, N, dtype=dtype, device=device)
    R[..., 1] = 0
    Rs = torch.cat([R.clamp(min=0), (-R).clamp(min=0)], dim=-2)
    got = kernels.sectional_matmul(A, B.transpose(-1, -2).contiguous().transpose(-1, -2), Rs, M // 2)  # strided B
    # the reference in float64 from the same (rounded) operands: the kernel accumulates in float32 or better
    ref = sectional_matmul_reference(A.double(), B.double(), Rs.double(), M // 2)
    torch.testing.assert_close(got.double(), ref, **MATMUL_TOL[dtype])
    assert (got[..., :, 1] == 0).all() and (got[..., :, 0] == 0).all()  # R = 0 and G = 0 give 0


def test_sectional_matmul_triton_splits_batches_beyond_the_grid(monkeypatch):
    """CUDA's grid holds at most 65535 (samples × groups) in z: larger batches (ResNeXt's grouped
    convs on the Gram path from batch 2048) are launched in parts; here with parts of 2."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    from rsp_fast.kernels.reference import sectional_matmul_reference
    from rsp_fast.kernels.triton import sectional_matmul as module

    monkeypatch.setattr(module, "MAX_GRID_Z", 2)
    A, B = torch.rand(5, 4, 7, dtype=torch.float64), torch.rand(5, 7, 9, dtype=torch.float64)
    Rs = torch.randn(5, 4, 9, dtype=torch.float64).clamp(min=0)
    got = module.sectional_matmul_triton(A, B, Rs, 2)
    torch.testing.assert_close(got, sectional_matmul_reference(A, B, Rs, 2), **TOL[torch.float64])


def test_sectional_matmul_triton_refuses_batches_that_differ():
    """S was sized by Rs's batch and the launch by A's: a smaller Rs was written past its end
    (heap corruption), a B of another batch read past or mixed up silently."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    from rsp_fast.kernels.triton.sectional_matmul import sectional_matmul_triton

    A, B, Rs = torch.rand(4, 6, 5), torch.rand(4, 5, 7), torch.rand(4, 6, 7)
    for a, b, r in [(A, B, Rs[:1]), (A[:2], B[:3], Rs[:2]), (A[:3], B[:1], Rs[:3])]:
        with pytest.raises(ValueError, match="do not fit"):
            sectional_matmul_triton(a, b, r, 3)


@pytest.mark.cuda
def test_sectional_matmul_triton_tf32():
    from rsp_fast.kernels.reference import sectional_matmul_reference

    A, B = torch.rand(2, 64, 300, device="cuda"), torch.rand(2, 300, 200, device="cuda")
    Rs = torch.randn(2, 64, 200, device="cuda").clamp(min=0)
    ref = sectional_matmul_reference(A.double(), B.double(), Rs.double(), 32)
    with tf32_products(True):
        got = dispatch.TRITON.sectional_matmul(A, B, Rs, 32)
    err = ((got.double() - ref).abs() / ref.abs().clamp_min(1e-3)).median().item()
    assert 1e-6 < err < 1e-2  # TF32 operands (10-bit mantissa): neither exact nor far off
