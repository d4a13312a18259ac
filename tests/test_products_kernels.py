"""The compiled products kernels (C++ on CPU), each against its pure-PyTorch reference:
``masked_sectional_products`` (a dense conv's three products at R's non-zeros only),
``depthwise_sectional_products`` (a depthwise conv's three products fused per plane) and
``pointwise_sectional_products`` (a stride-1 1×1 conv's three products fused per tile)."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from rsp_fast import RSPError
from rsp_fast.kernels.reference import depthwise_products_reference, sectional_products_reference
from rsp_fast.ops import custom, dispatch
from models import conv_products_case

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

# (N, C, O, H, W, kernel, stride, dilation, padding (left, right, top, bottom))
DENSE = [
    (1, 5, 7, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (3, 17, 33, 11, 10, (3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),  # stride 2, TF-style asymmetric padding
    (2, 16, 9, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),  # dilation: taps are not one contiguous row
    (2, 8, 4, 7, 7, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
    (3, 24, 16, 8, 9, (5, 3), (1, 2), (1, 1), (2, 2, 1, 1)),
    (4, 40, 12, 6, 6, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0)),  # no padding, C past two vectors
]
# the same for depthwise convs: O = multiplier × C
DEPTHWISE = [
    (2, 5, 5, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (3, 4, 4, 11, 10, (3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),  # stride 2, TF-style asymmetric padding
    (2, 3, 6, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),  # channel multiplier 2, dilation 2
    (2, 6, 6, 13, 9, (5, 5), (2, 2), (1, 1), (1, 2, 1, 2)),  # 5×5, stride 2
    (1, 2, 6, 8, 9, (5, 3), (1, 2), (1, 1), (2, 2, 1, 1)),  # uneven kernel and stride, multiplier 3
    (2, 4, 4, 7, 7, (3, 3), (3, 3), (2, 1), (0, 0, 0, 0)),  # stride 3, rows left over
    (2, 3, 3, 5, 6, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),  # 1×1, stride 2
    (2, 3, 3, 40, 37, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),  # rows past two vectors, many steps of four vectors
    (1, 4, 8, 30, 27, (7, 7), (2, 2), (1, 1), (3, 3, 3, 3)),  # 7×7, stride 2, multiplier 2, a long tap reach
]

# stride-1 1×1 convs: positions past whole tiles, channels past whole blocks, many filter tiles
POINTWISE = [(N, C, O, H, W, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)) for N, C, O, H, W in [
    (2, 5, 7, 9, 9),
    (3, 17, 33, 11, 10),
    (2, 16, 9, 12, 12),
    (2, 8, 4, 7, 7),
    (3, 24, 300, 41, 43),  # the filters' sweep takes several tiles of positions
    (1, 40, 12, 1, 1),  # one position
]]


def pointwise_products(x, R, kernel, stride, dilation, padding):
    return custom.pointwise_sectional_products(x, R)


@dataclass(frozen=True)
class Kernel:
    op: Callable
    reference: Callable
    geometries: list
    name: str


KERNELS = [Kernel(custom.masked_sectional_products, sectional_products_reference, DENSE, "masked_sectional_products"),
           Kernel(custom.depthwise_sectional_products, depthwise_products_reference, DEPTHWISE,
                  "depthwise_sectional_products"),
           Kernel(pointwise_products, sectional_products_reference, POINTWISE, "pointwise_sectional_products")]
CONV_KERNELS = KERNELS[:2]  # the ones given the conv's geometry
CASES = [(k, g) for k in KERNELS for g in k.geometries]


def case_id(value):
    return value.name.split("_")[0] if isinstance(value, Kernel) else None


@pytest.mark.parametrize("kernel, geometry", CASES, ids=[f"{k.name.split('_')[0]}-{i}" for i, (k, _) in enumerate(CASES)])
@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_kernel_equals_its_reference_float64(kernel, geometry, density):
    args = conv_products_case(*geometry, density=density)
    expected = kernel.reference(*args)
    got = kernel.op(*args)
    assert got.shape == args[0].shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("kernel", KERNELS, ids=case_id)
@pytest.mark.parametrize("sign", ["positive", "negative"])
@pytest.mark.parametrize("zero_region", [False, True])
def test_kernel_one_signed_section_and_empty_patches(kernel, sign, zero_region):
    args = conv_products_case(*kernel.geometries[1], density=0.6, sign=sign, zero_region=zero_region)
    torch.testing.assert_close(kernel.op(*args), kernel.reference(*args), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS, ids=case_id)
def test_kernel_float32(kernel):
    for geometry in kernel.geometries[:4]:
        x, R, *rest = conv_products_case(*geometry, density=0.3, dtype=torch.float32)
        expected = kernel.reference(x.double(), R.double(), *rest)
        got = kernel.op(x, R, *rest).double()
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("geometry", DEPTHWISE[-2:])
def test_depthwise_kernel_float32_on_planes_of_many_vectors(geometry):
    """float32 fills a vector with 16 positions, float64 with 8: these planes take the kernel's
    four-vector steps, single-vector steps and rows cut in a vector, for both."""
    x, R, *rest = conv_products_case(*geometry, density=0.5, dtype=torch.float32)
    expected = depthwise_products_reference(x.double(), R.double(), *rest)
    got = custom.depthwise_sectional_products(x, R, *rest).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_depthwise_kernel_at_each_vector_width(capability, monkeypatch):
    """The depthwise kernel is compiled once per vector width (16, 32, 64 bytes) and runs the
    widest the CPU has, or a narrower one where RSP_FAST_CPU_CAPABILITY asks (one the CPU lacks
    runs as its widest): every width against the reference, float64 and float32."""
    monkeypatch.setenv("RSP_FAST_CPU_CAPABILITY", capability)
    for geometry in DEPTHWISE:
        args = conv_products_case(*geometry, density=0.5)
        expected = depthwise_products_reference(*args)
        torch.testing.assert_close(custom.depthwise_sectional_products(*args), expected, rtol=1e-10,
                                   atol=1e-12 * expected.abs().max().item())
    for geometry in DEPTHWISE[-2:]:
        x, R, *rest = conv_products_case(*geometry, density=0.5, dtype=torch.float32)
        expected = depthwise_products_reference(x.double(), R.double(), *rest)
        assert (custom.depthwise_sectional_products(x, R, *rest).double() - expected).abs().max() <= \
            1e-4 * expected.abs().max()


def test_an_unknown_cpu_capability_is_named(monkeypatch):
    """By the library as the other tuning variables are (an RSPError: it was the kernel's RuntimeError),
    and by the kernel itself for a caller of the op."""
    monkeypatch.setenv("RSP_FAST_CPU_CAPABILITY", "avx1024")
    x, R, *geometry = conv_products_case(*DEPTHWISE[0])
    with pytest.raises(RSPError, match="RSP_FAST_CPU_CAPABILITY='avx1024': choose one of avx512, avx2, default"):
        custom.depthwise_sectional_products(x, R, *geometry)
    with pytest.raises(RuntimeError, match="RSP_FAST_CPU_CAPABILITY is 'avx1024': it takes avx512, avx2 or default"):
        torch.ops.rsp_fast.depthwise_sectional_products.default(x, R, *map(list, geometry))


@pytest.mark.parametrize("kernel", KERNELS, ids=case_id)
def test_kernel_without_relevance_gives_zero(kernel):
    x, R, *rest = conv_products_case(*kernel.geometries[1])
    assert torch.count_nonzero(kernel.op(x, torch.zeros_like(R), *rest)) == 0


@pytest.mark.parametrize("kernel", KERNELS, ids=case_id)
def test_kernel_passes_a_nan_on_as_the_reference_does(kernel):
    """A NaN in R (a model whose activations overflowed) is neither > 0 nor < 0: the masked and
    pointwise kernels filed it with the zeros and returned a finite, plausible map. It now
    reaches its sample's output, as in the reference; the other samples are untouched."""
    x, R, *rest = conv_products_case(*kernel.geometries[1])
    clean = kernel.op(x, R, *rest)
    R = R.clone()
    R[0, 0, 0, 0] = float("nan")
    out, expected = kernel.op(x, R, *rest), kernel.reference(x, R, *rest)
    assert torch.isnan(expected[0]).any() and torch.isnan(out[0]).any()
    torch.testing.assert_close(out[1:], clean[1:], rtol=0, atol=0)


@pytest.mark.parametrize("kernel", KERNELS, ids=case_id)
def test_kernel_one_thread_and_many_agree(kernel):
    """Samples (masked, pointwise) or planes (depthwise) run in parallel; the inside of one sample too."""
    args = conv_products_case(*kernel.geometries[4], density=0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.op(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(kernel.op(*args), one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kernel.op(args[0][:1], args[1][:1], *args[2:]), one[:1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", CONV_KERNELS, ids=case_id)
def test_kernel_opcheck(kernel):
    x, R, *_ = conv_products_case(*kernel.geometries[1])
    torch.library.opcheck(getattr(torch.ops.rsp_fast, kernel.name).default, (x, R, [3, 3], [2, 2], [1, 1], [0, 1, 0, 1]))


@pytest.mark.parametrize("kernel", CONV_KERNELS, ids=case_id)
def test_kernel_rejects_bad_arguments(kernel):
    x, R, k, s, d, p = conv_products_case(*kernel.geometries[0])
    with pytest.raises(RuntimeError, match=f"{kernel.name}: R .* is not the output of this 3x3 conv"):
        kernel.op(x, R[..., :-1], k, s, d, p)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernel.op(x.float(), R, k, s, d, p)
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        kernel.op(x, R, k, s, d, (-1, 1, 1, 1))


@pytest.mark.parametrize("kernel", CONV_KERNELS, ids=case_id)
def test_kernel_refuses_geometry_that_would_overflow(kernel):
    """Padding, kernel or dilation near 2⁶³ wrapped the checks' int64 sums: the padded height came
    out small enough to "match" R, then the kernels wrote out of bounds (heap corruption, a
    segfault) or read outside their buffer. Each argument is now bounded first."""
    x, R = torch.rand(1, 2, 5, 5, dtype=torch.float64), torch.randn(1, 2, 3, 5, dtype=torch.float64)
    for k, d, p in [((1, 1), (1, 1), (0, 0, 2**63 - 1, 2**63 - 1)), ((2**62 + 1, 4), (4, 1), (0, 0, 0, 0))]:
        with pytest.raises(RuntimeError, match="must be below 2\\^31"):
            kernel.op(x, R, k, (1, 1), d, p)


@pytest.mark.parametrize("kernel", CONV_KERNELS, ids=case_id)
@pytest.mark.parametrize("empty", ["samples", "channels"])
def test_kernel_on_empty_inputs_gives_an_empty_result(kernel, empty):
    """No samples, or no channels (the masked kernel divided by its zero-byte rows: SIGFPE)."""
    N, C = (0, 4) if empty == "samples" else (2, 0)
    O = 4 if kernel.name.startswith("masked") else C
    x, R = torch.rand(N, C, 5, 5, dtype=torch.float64), torch.randn(N, O, 5, 5, dtype=torch.float64)
    out = kernel.op(x, R, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_depthwise_kernel_memory_does_not_grow_with_a_stride_past_the_plane():
    """One output position per row and column reads the same taps at any stride past the padded
    plane; the kernel's phase planes took stride² memory (stride 10⁵: bad_alloc; 2³¹: a 30 s loop)."""
    x, R = torch.rand(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 1, 1, dtype=torch.float64)
    expected = custom.depthwise_sectional_products(x, R, (3, 3), (5, 5), (1, 1), (0, 0, 0, 0))
    for stride in (10**5, 2**31 - 1):
        got = custom.depthwise_sectional_products(x, R, (3, 3), (stride, stride), (1, 1), (0, 0, 0, 0))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(expected, depthwise_products_reference(x, R, (3, 3), (5, 5), (1, 1), (0, 0, 0, 0)))


def test_depthwise_kernel_needs_whole_channel_multipliers():
    x, R, k, s, d, p = conv_products_case(*DEPTHWISE[0])
    with pytest.raises(RuntimeError, match="not a multiple of"):
        custom.depthwise_sectional_products(x, R[:, :-1], k, s, d, p)


def test_pointwise_kernel_opcheck_and_bad_arguments():
    x, R, *_ = conv_products_case(*POINTWISE[1])
    torch.library.opcheck(torch.ops.rsp_fast.pointwise_sectional_products.default, (x, R))
    with pytest.raises(RuntimeError, match="pointwise_sectional_products: x_pos .* same positions"):
        custom.pointwise_sectional_products(x, R[..., :-1])
    with pytest.raises(RuntimeError, match="share one dtype"):
        custom.pointwise_sectional_products(x.float(), R)


def test_pointwise_kernel_takes_any_number_of_position_dims():
    """1-D signals (N, C, L) go through as they are: only the positions' count matters."""
    x, R, *geometry = conv_products_case(*POINTWISE[1])
    flat = custom.pointwise_sectional_products(x.flatten(2), R.flatten(2))
    torch.testing.assert_close(flat, custom.pointwise_sectional_products(x, R).flatten(2), rtol=0, atol=0)
