"""The Triton implicit-GEMM conv products (kernels/triton/conv_products.py) against the unfolded
reference (kernels/reference.py), on CPU in Triton's interpreter and on CUDA; and the conv rule's
"implicit_gemm" path against the other dense paths."""
import pytest
import torch
from torch import nn

from rsp_fast.kernels.reference import sectional_products_reference
from rsp_fast.kernels.triton import triton_unavailable_reason
from rsp_fast.ops.dispatch import TORCH
from rsp_fast.rules.base import Context
from rsp_fast.rules.conv import conv_geometry, inner_conv_relevance
from conftest import rel_err, tf32_products
from models import conv_products_case

# (N, C, O, H, W, kernel, dilation, padding (left, right, top, bottom)), stride 1
GEOMETRIES = [
    (1, 5, 7, 9, 9, (3, 3), (1, 1), (1, 1, 1, 1)),
    (2, 16, 9, 8, 11, (3, 3), (2, 2), (2, 2, 2, 2)),  # dilation: a tap moves by two pixels
    (2, 8, 4, 7, 7, (1, 1), (1, 1), (0, 0, 0, 0)),  # 1×1
    (2, 6, 5, 8, 9, (5, 3), (1, 1), (2, 2, 1, 1)),  # uneven kernel
    (2, 40, 36, 6, 6, (3, 3), (1, 1), (0, 0, 0, 0)),  # no padding; channels and sections past one tile
    (1, 9, 4, 7, 8, (2, 2), (1, 1), (0, 1, 0, 1)),  # even kernel, padding on one side only (TF "same")
    (2, 6, 5, 1, 23, (1, 5), (1, 2), (4, 4, 0, 0)),  # a Conv1d's 1×L image, dilated
    (1, 72, 130, 5, 6, (3, 3), (1, 1), (1, 1, 1, 1)),  # on a GPU, the tiles of 128+ channels and 256+ section columns
]
LARGE = GEOMETRIES[-1]


def _skip_where_the_interpreter_repeats(geometry=None, device="cpu", persistent=False) -> None:
    """The large geometry's tiles of 128+ channels and 256+ section columns, and persistent
    programs, are what a GPU runs; Triton's interpreter takes 10-27 s a case for them, and covers
    them once: the large geometry in test_conv_products_match_the_unfolded_reference (float64),
    persistent TMA launches in test_persistent_launches_give_the_same_products."""
    if device == "cpu" and (geometry == LARGE or persistent):
        pytest.skip("covered once in the interpreter (see _skip_where_the_interpreter_repeats)")


DEVICES = [("cpu", torch.float64), ("cpu", torch.float16),  # bfloat16 is not exact in the interpreter; fp16 is
           pytest.param("cuda", torch.float64, marks=pytest.mark.cuda),
           pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TOL_TF32 = 5e-3  # float32 operands rounded to TF32's 10-bit mantissa


def _products(N, C, O, H, W, kernel, dilation, padding, device, dtype, zero_region=False, splits=None, tiles=None):
    from rsp_fast.kernels.triton.conv_products import conv_products_triton

    if reason := triton_unavailable_reason(torch.device(device)):
        pytest.skip(reason)
    torch.manual_seed(0)
    x, R, *_ = conv_products_case(N, C, O, H, W, kernel, (1, 1), dilation, padding, zero_region=zero_region)
    x, R = x.to(device), R.to(device)
    h, w = R.shape[-2:]
    work = dtype if dtype == torch.float64 else torch.float32  # the normalisation's precision
    x_low = x.to(dtype)
    got = conv_products_triton(x_low.permute(0, 2, 3, 1).contiguous(), R.reshape(N, O, h * w).to(work), kernel, dilation,
                               padding, (h, w), work, splits=splits, tiles=tiles)
    # the reference in float64 from the input the kernels read (the sections are rounded for the
    # filters only: the normalisation reads them unrounded, so a rounding tolerance stays)
    expected = sectional_products_reference(x_low.double(), R.double(), kernel, (1, 1), dilation, padding)
    return got, expected


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_products_match_the_unfolded_reference(geometry, device, dtype):
    if dtype != torch.float64:
        _skip_where_the_interpreter_repeats(geometry, device)
    got, expected = _products(*geometry, device, dtype)
    assert got.shape == expected.shape
    assert rel_err(got.double().cpu(), expected.cpu()) < TOL[dtype]


@pytest.mark.parametrize("device,dtype,tf32", [
    ("cpu", torch.float64, False), ("cpu", torch.float16, False),
    *(pytest.param("cuda", dtype, tf32, marks=pytest.mark.cuda)
      for dtype, tf32 in [(torch.float32, True), (torch.bfloat16, False)])])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_filters_from_shifted_copies_match_the_unfolded_reference(geometry, splits, device, dtype, tf32):
    """The filters reading their patches from shifted positions-major copies of the padded input
    (``Tiles.shifted``, TF32's aligned variant), positions on the padded grid: the same products
    for every kernel shape, dilation and padding, also with the positions cut into parts (on a
    GPU, the 16-byte copies this variant exists for, in TF32 too)."""
    from rsp_fast.kernels.triton.conv_products import default_tiles

    _skip_where_the_interpreter_repeats(geometry, device)
    filters = default_tiles("filters", geometry[1], dtype, torch.device(device))._replace(shifted=True)
    with tf32_products(tf32):
        got, expected = _products(*geometry, device, dtype, splits=splits, tiles={"filters": filters})
        plain, _ = _products(*geometry, device, dtype, splits=splits)
    tol = TOL_TF32 if tf32 else TOL[dtype]
    assert rel_err(got.double().cpu(), expected.cpu()) < tol
    assert rel_err(got.double().cpu(), plain.double().cpu()) < (1e-13 if dtype == torch.float64 else 2 * tol)


@pytest.mark.parametrize("one_sample_per_launch", [False, True])
@pytest.mark.parametrize("dtype,align,width,slots", [(torch.float64, 2, 10, 2), (torch.float32, 4, 12, 4)])
def test_shifted_operands_hold_the_padded_input_and_the_sections_on_its_grid(dtype, align, width, slots,
                                                                             one_sample_per_launch, monkeypatch):
    """Each copy slot s holds the padded pixel f + s at f, the sections sit at l = i·width + j
    with zeros in the columns past the output's width, and both are long enough for the last
    tap. Widths and shifts go by 16 bytes: 2 float64 elements, 4 float32 ones. The copies'
    grid z is samples × slots: past CUDA's 65535 the samples go in several launches (here
    forced to one each by a limit of ``slots``)."""
    from rsp_fast.kernels.triton import conv_products as cp
    from rsp_fast.kernels.triton.conv_products import shifted_operands

    grids, launch = [], cp._shifted_copies_kernel
    if one_sample_per_launch:
        monkeypatch.setattr(cp, "MAX_GRID_YZ", slots)

        class Recorded:  # the launches' grids, then the real kernel
            def __getitem__(self, grid):
                grids.append(grid)
                return launch[grid]
        monkeypatch.setattr(cp, "_shifted_copies_kernel", Recorded())

    N, C, O, H, W = 2, 3, 4, 5, 6
    pad = (1, 2, 0, 1)  # left, right, top, bottom: a 2×4 kernel keeps the size, 6 rows of 9 padded
    x = torch.rand(N, H, W, C, dtype=dtype)
    R = torch.randn(N, O, H * W, dtype=torch.float32)
    op = shifted_operands(x, R, (2, 4), (1, 1), pad, (H, W), 16)
    assert (op.align, op.width, op.copies.shape[0]) == (align, width, slots)  # 9 rounded up; shifts kx mod align
    assert op.positions == -(-H * width // 16) * 16 and op.sections.dtype == op.copies.dtype == dtype
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), pad)  # N, C, 6, 9
    for s in range(slots):
        for f in range(op.copies.shape[-1]):
            y, col = divmod(f + s, width)
            want = padded[:, :, y, col] if y < H + 1 and col < 9 else torch.zeros(N, C, dtype=dtype)
            assert torch.equal(op.copies[s, :, :, f], want), (s, f)
    grid = op.sections[:, :, :H * width].view(N, O, 2, H, width)
    assert torch.equal(grid[:, :, 0, :, :W], R.view(N, O, H, W).clamp(min=0).to(dtype))
    assert torch.equal(grid[:, :, 1, :, :W], (-R).view(N, O, H, W).clamp(min=0).to(dtype))
    assert not grid[..., W:].any() and not op.sections[..., H * width:].any()
    assert op.copies.shape[-1] >= op.positions + width + 3  # the last tap (1, 3) starts width + 3 past its position
    assert all(grid[2] <= cp.MAX_GRID_YZ for grid in grids) and len(grids) == (N if one_sample_per_launch else 0)


@pytest.mark.cuda
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_products_on_cuda_in_tf32_match_the_unfolded_reference(geometry):
    """TF32 launches (float32 operands, allow_tf32): the back-projection reads its sections-
    contiguous copy of F (``_filters_for_back``)."""
    with tf32_products(True):
        got, expected = _products(*geometry, "cuda", torch.float32)
    assert rel_err(got.double().cpu(), expected.cpu()) < TOL_TF32


def test_shifted_operands_refuse_samples_past_32_bit_offsets():
    """A sample whose padded copy passes 2³¹ elements is refused before anything is allocated
    (the inputs here are expanded views: no memory behind them); ``shifted_fits``, which the
    default launch asks before it takes the copies, says so, and a side short of it fits."""
    from rsp_fast.kernels.triton.conv_products import shifted_fits, shifted_operands

    side = 46_341  # side² > 2³¹
    x = torch.zeros(1, 1, 1, 1).expand(1, side, side, 1)
    R = torch.zeros(1, 1, 1).expand(1, 1, side * side)
    with pytest.raises(ValueError, match="32-bit"):
        shifted_operands(x, R, (3, 3), (1, 1), (1, 1, 1, 1), (side, side), 32)
    geometry = ((3, 3), (1, 1), (1, 1, 1, 1), (side, side), 32)
    assert not shifted_fits(x, 1, *geometry)
    small = 30_000  # 2 sections × (30002 rounded up to 30004) × 30000 positions < 2³¹
    x, R = x[:, :small, :small], R[..., :small * small]
    assert shifted_fits(x, 1, (3, 3), (1, 1), (1, 1, 1, 1), (small, small), 32)
    assert not shifted_fits(x, 2 ** 14, (3, 3), (1, 1), (1, 1, 1, 1), (small, small), 32)  # the sections pass it


def test_default_shifted_filters_fall_back_where_the_copies_would_not_fit(monkeypatch):
    """Where the default launch reads the patches from shifted copies (TF32 on a GPU) and a
    sample's copies would pass 32-bit offsets, the filters read the channels-last input instead:
    the products still come, and no copy is made. (Shown on the interpreter with the default
    made shifted and every sample made too large.)"""
    from rsp_fast.kernels.triton import conv_products as cp

    chosen = cp.default_tiles
    monkeypatch.setattr(cp, "default_tiles", lambda kernel, *args: chosen(kernel, *args)._replace(
        shifted=kernel == "filters"))
    monkeypatch.setattr(cp, "shifted_fits", lambda *args: False)

    def no_copies(*args):
        raise AssertionError("shifted copies made where they do not fit")
    monkeypatch.setattr(cp, "shifted_operands", no_copies)
    got, expected = _products(2, 6, 5, 10, 9, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", torch.float64)
    assert rel_err(got.double(), expected) < TOL[torch.float64]
    with pytest.raises(AssertionError, match="shifted copies"):  # asked for by name, the copies are taken
        _products(2, 6, 5, 10, 9, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", torch.float64,
                  tiles={"filters": chosen("filters", 6, torch.float64, torch.device("cpu"))._replace(shifted=True)})


def test_conv_products_patches_without_input_give_nothing():
    """The top half of the input is zero: responses there are 0, and so is what S passes back."""
    got, expected = _products(2, 6, 5, 10, 9, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", torch.float64, zero_region=True)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 1e-12
    assert (got[:, :, :3] == 0).all()  # rows read only by patches with no input


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])  # 16-bit: the parts add up in float32
def test_conv_products_filters_summed_in_parts(splits, dtype):
    """The filters' sum over positions cut into parts (what a GPU does at small batches) adds up
    to the same."""
    whole, expected = _products(2, 7, 6, 9, 8, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", dtype, splits=1)
    parts, _ = _products(2, 7, 6, 9, 8, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", dtype, splits=splits)
    assert rel_err(parts.double(), whole.double()) < (1e-13 if dtype == torch.float64 else 2e-3)
    assert rel_err(parts.double(), expected) < TOL[dtype]


@pytest.mark.parametrize("geometry", [GEOMETRIES[4], GEOMETRIES[6]])
def test_back_projection_reads_filters_with_their_sections_contiguous(geometry, monkeypatch):
    """The back-projection reads F at its strides: the copy with the sections contiguous that
    TF32 launches give it (``_filters_for_back``) yields the same values, bit for bit, as F as
    the filters wrote it."""
    from rsp_fast.kernels.triton import conv_products as kernels

    as_written, expected = _products(*geometry, "cpu", torch.float64)
    monkeypatch.setattr(kernels, "_filters_for_back", lambda F, flags: F.transpose(2, 3).contiguous().transpose(2, 3))
    sections_major, _ = _products(*geometry, "cpu", torch.float64)
    assert torch.equal(sections_major, as_written)
    assert rel_err(sections_major, expected) < 1e-12


def test_conv_products_reject_operands_that_do_not_fit():
    from rsp_fast.kernels.triton.conv_products import conv_products_triton

    x = torch.rand(2, 5, 6, 3, dtype=torch.float64)  # N, H, W, C
    R = torch.rand(2, 4, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not fit"):  # 30 positions, not 5×5
        conv_products_triton(x, R, (3, 3), (1, 1), (1, 1, 1, 1), (5, 5), torch.float64)
    with pytest.raises(ValueError, match="do not fit"):  # channels not contiguous
        conv_products_triton(x.transpose(1, 3).contiguous().transpose(1, 3), R, (3, 3), (1, 1), (1, 1, 1, 1),
                             (5, 6), torch.float64)
    with pytest.raises(ValueError, match="do not fit"):  # R of another batch
        conv_products_triton(x, R[:1], (3, 3), (1, 1), (1, 1, 1, 1), (5, 6), torch.float64)


@pytest.mark.parametrize("C,O,k,p,d,groups,stride", [(5, 6, 3, 1, 1, 1, 1), (4, 5, 3, 2, 2, 1, 1), (6, 4, 3, 1, 1, 2, 1),
                                                    (5, 6, 3, 1, 1, 1, 2)])
def test_rule_on_the_implicit_gemm_path_matches_the_filter_path(C, O, k, p, d, groups, stride):
    """The rule's "implicit_gemm" path, and its fall-back to the grouped convolutions where the
    kernels do not apply (groups, stride) or where the dropped relevance is tracked."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    conv = nn.Conv2d(C, O, k, padding=p, dilation=d, groups=groups, stride=stride).double()
    x = torch.rand(2, C, 9, 8, dtype=torch.float64)
    x[:, :, 2:7, 1:6] = 0  # patches with no input: relevance there is dropped
    R = torch.randn(2, O, *conv(x).shape[-2:], dtype=torch.float64)
    g = conv_geometry(conv, (9, 8))
    results = []
    for path in ("filter", "implicit_gemm"):
        ctx = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(2, dtype=torch.float64))
        results.append((inner_conv_relevance(ctx, x, R, g, path=path), ctx.dropped))
        plain = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path=path)
        assert rel_err(plain, results[0][0]) < 1e-12
    (expected, expected_drop), (got, drop) = results
    assert rel_err(got, expected) < 1e-12
    torch.testing.assert_close(drop, expected_drop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["signed", "tiny", "huge", "channels_last", "pointwise_padded", "one_sample"])
def test_rule_on_the_implicit_gemm_path_forms_the_input_and_purges_as_the_others(case):
    """The implicit path rectifies and scales the input as it copies it and purges in the
    back-projection's epilogue: the same values as the filter path's separate passes, for a
    signed input (not known non-negative), activations that would under- or overflow the
    responses unscaled, a channels-last input, a padded 1×1 conv (combined, not purged) and a
    batch of one."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(3)
    k, p, N = (1, 1, 2) if case == "pointwise_padded" else (3, 1, 1 if case == "one_sample" else 3)
    conv = nn.Conv2d(6, 5, k, padding=p).double()
    x = torch.randn(N, 6, 8, 7, dtype=torch.float64)
    if case != "signed":
        x = x.abs() * {"tiny": 1e-160, "huge": 1e150}.get(case, 1.0)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    R = torch.randn(N, 5, *conv(x).shape[-2:], dtype=torch.float64)
    g = conv_geometry(conv, (8, 7))
    expected = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="filter")
    got = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="implicit_gemm")
    assert torch.isfinite(expected).all() and expected.abs().sum() > 0
    assert rel_err(got, expected) < 1e-12
    if not g.is_pointwise:  # the purge conserves the relevance
        torch.testing.assert_close(got.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("where", ["R", "x"])
def test_a_nan_reaches_the_map_on_the_implicit_gemm_path(k, where):
    """The kernels rectified with tl.maximum, which drops a NaN (R's sections, the input x̂), and
    the normalisation selected its sections with r > 0 and r < 0: through a 1×1 conv (no purge)
    or from the input, the implicit-GEMM path gave a finite map where the other paths give NaN,
    so a map RSP must refuse came out as an explanation."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, k, padding=k // 2)
    x, R = torch.rand(1, 3, 5, 5), torch.randn(1, 4, 5, 5)
    (R if where == "R" else x)[0, 1, 2, 2] = float("nan")
    g = conv_geometry(conv, (5, 5))
    expected = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="filter")
    got = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="implicit_gemm")
    assert expected.isnan().any()
    assert torch.equal(got.isnan(), expected.isnan())


def test_implicit_gemm_path_reads_a_column_at_its_row_stride():
    """A one-pixel-wide input (a 1×H row transposed) is "contiguous" to PyTorch whatever its
    width's stride, which the kernels took as the pixel stride: they read other memory (NaN, or
    values of 1e251). Its pixels lie at its row stride."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    from rsp_fast.kernels.triton.conv_products import pack_input

    torch.manual_seed(2)
    x = torch.rand(2, 3, 1, 9, dtype=torch.float64).transpose(2, 3)  # (2, 3, 9, 1), strides (27, 9, 1, 9)
    scale = torch.ones(2, dtype=torch.float64)
    assert torch.equal(pack_input(x, scale, torch.float64), x.permute(0, 2, 3, 1).contiguous())
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    R = torch.randn(2, 4, 9, 1, dtype=torch.float64)
    g = conv_geometry(conv, (9, 1))
    expected = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x.contiguous(), R, g, path="filter")
    for path in ("implicit_gemm", "implicit_gram"):
        assert rel_err(inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path=path), expected) < 1e-12


def test_rule_on_the_implicit_gemm_path_takes_more_samples_than_a_launch(monkeypatch):
    """Past the samples one launch's grid holds, the rule runs the batch in parts (here 2 samples
    a launch for a 3×3 conv) with the same result, and the kernels refuse a batch that big."""
    from rsp_fast.kernels.triton import conv_products

    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    x, R = torch.rand(5, 4, 6, 5, dtype=torch.float64), torch.randn(5, 3, 6, 5, dtype=torch.float64)
    g = conv_geometry(conv, (6, 5))
    whole = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="implicit_gemm")
    monkeypatch.setattr(conv_products, "MAX_GRID_YZ", 18)
    parts = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="implicit_gemm")
    assert rel_err(parts, whole) < 1e-13
    with pytest.raises(ValueError, match="more than the 2 one launch takes"):
        conv_products.conv_products_triton(x.permute(0, 2, 3, 1).contiguous(), R.reshape(5, 3, 30), (3, 3), (1, 1),
                                           (1, 1, 1, 1), (6, 5), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_packed_and_sections_stacked_in_one_pass_each(dtype, channels_last):
    from rsp_fast.kernels.reference import stacked_sections
    from rsp_fast.kernels.triton.conv_products import pack_input, stack_sections

    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(0)
    x = torch.randn(3, 70, 5, 9, dtype=torch.float64)  # channels past one block
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scale = torch.tensor([0.5, 4.0, 1.0], dtype=torch.float64)
    packed = pack_input(x, scale, dtype)
    assert packed.shape == (3, 5, 9, 70) and packed.is_contiguous() and packed.dtype == dtype
    assert torch.equal(packed, (x.clamp(min=0) * scale.view(3, 1, 1, 1)).permute(0, 2, 3, 1).to(dtype))
    R = torch.randn(2, 7, 1100, dtype=torch.float64)  # positions past one block
    assert torch.equal(stack_sections(R, dtype), stacked_sections(R, 1, dtype))
    interleaved = stack_sections(R, dtype, interleave=True)  # rows R⁺ₒ, R⁻ₒ per output o
    assert torch.equal(interleaved[:, 0::2], R.clamp(min=0).to(dtype))
    assert torch.equal(interleaved[:, 1::2], (-R).clamp(min=0).to(dtype))
    padded = stack_sections(R[..., :1090], dtype, align=16)  # rows padded to 1104 positions with zeros
    assert padded.shape == (2, 14, 1104)
    assert torch.equal(padded[..., :1090], stacked_sections(R[..., :1090], 1, dtype)) and not padded[..., 1090:].any()


def test_kernels_compile_for_the_h100():
    """The interpreter runs the kernels as Python; the compiler must also take them (every
    precision and epilogue, at the default tiles), down to an sm_90 cubin, without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    assert compiled == {"filters", "responses", "back", "pack", "stack", "shifted", "first"} and "FAILED" not in proc.stdout
    products = [line for line in proc.stdout.splitlines() if (line.split()[1] in ("filters", "responses", "back")
                and "fp64" not in line) or (line.startswith("ok first layer") and " tf32:" in line)]
    assert len([p for p in products if "first layer" in p]) == 2
    assert all(" 0 wgmma" not in line for line in products)  # on Hopper's tensor cores
    # the back-projection's operands both copied 16 bytes at a time, TF32 too (no transposing
    # 4-byte copies of F), but where F is given with its channels contiguous for comparison
    back = [line for line in products if line.startswith("ok back") and "gram=False" in line]
    assert back and all((" 0 4-byte" in line) != ("channels-contiguous F" in line) for line in back)
    # the filters' TF32 variant on shifted copies likewise, where the channels-last patches are not
    filters = [line for line in products if line.startswith("ok filters tf32") and " box" not in line]
    assert len(filters) == 4 and all((" 0 4-byte" in line) == ("shifted" in line) for line in filters)
    # the TMA launches (Tiles.tma) of the three kernels: R, the sections, patches and filters come
    # by the tensor memory accelerator alone (the back-projection's epilogue reads x as before)
    tma = [line for line in products if " box" in line]
    assert len(tma) == 12 and all(" 0 TMA" not in line for line in tma)
    assert all(" 0 16-byte and 0 4-byte cp.async" in line for line in tma if not line.startswith("ok back"))
    assert all(" 0 TMA" in line for line in products if " box" not in line)


@pytest.mark.parametrize("arch", [80, 86])
def test_default_launches_fit_the_shared_memory_of_smaller_gpus(arch):
    """The tiles measured on an H100 (up to 208 KiB of shared memory per block there) exceeded an
    A100's 163 KiB (TF32's persistent responses: 224 KiB on sm_80) and the 99 KiB of sm_86/sm_89
    GPUs (bf16's and TF32's responses): Triton refuses such a launch, and nothing else would run
    the layer. Compiled without a GPU at the tiles those GPUs get (the responses are the launches
    fitted), each within its architecture's shared memory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
    proc = subprocess.run([sys.executable, str(script), "--arch", str(arch), "--defaults-only", "--only", "responses"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok responses")]
    assert len(compiled) == 9 and "FAILED" not in proc.stdout


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gram_products_match_the_unfolded_reference(geometry, device, dtype):
    """The Gram path on implicit GEMMs (the patch Gram and the back-projection reading the
    patches in place) gives the filters' back-projection."""
    from rsp_fast.kernels.triton.conv_products import gram_products_triton

    if reason := triton_unavailable_reason(torch.device(device)):
        pytest.skip(reason)
    N, C, O, H, W, kernel, dilation, padding = geometry
    torch.manual_seed(0)
    x, R, *_ = conv_products_case(N, C, O, H, W, kernel, (1, 1), dilation, padding)
    x, R = x.to(device), R.to(device)
    h, w = R.shape[-2:]
    work = dtype if dtype == torch.float64 else torch.float32
    x_low = x.to(dtype)
    got = gram_products_triton(x_low.permute(0, 2, 3, 1).contiguous(), R.reshape(N, O, h * w).to(work), kernel,
                               dilation, padding, (h, w), work)
    expected = sectional_products_reference(x_low.double(), R.double(), kernel, (1, 1), dilation, padding)
    assert got.shape == expected.shape
    assert rel_err(got.double().cpu(), expected.cpu()) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("gram", [False, True])
def test_persistent_launches_give_the_same_products(device, dtype, gram):
    """The responses (or the Gram path's patch Gram) and the back-projection with the purge's
    epilogue on persistent programs, each looping over tiles of several samples: the same values
    and non-zero counts as one program per tile, bit for bit."""
    from rsp_fast.kernels.triton import conv_products as kernels

    if reason := triton_unavailable_reason(torch.device(device)):
        pytest.skip(reason)
    N, C, O, H, W = 2, 40, 36, 9, 10  # 3 row blocks × 3 column blocks × 2 samples of 32-tiles
    torch.manual_seed(0)
    x, R, *_ = conv_products_case(N, C, O, H, W, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    work = dtype if dtype == torch.float64 else torch.float32
    x, R = x.to(device, work), R.to(device, work).reshape(N, O, H * W)
    scale = torch.rand(N, device=device, dtype=work) + 0.5
    x_cl = kernels.pack_input(x, scale, dtype)
    products = kernels.gram_products_triton if gram else kernels.conv_products_triton
    cuda = torch.device(device)
    responses = kernels.default_tiles("patch_gram" if gram else "responses", H * W if gram else 2 * O, dtype, cuda)
    back = kernels.default_tiles("gram_back" if gram else "back", C, dtype, cuda)

    def run(programs, tma=False):
        counts = torch.zeros(N, dtype=torch.int32, device=device)
        out = products(x_cl, R, (3, 3), (1, 1), (1, 1, 1, 1), (H, W), work, combine=kernels.Combination(x, scale, counts),
                       tiles={"responses": responses._replace(programs=programs, tma=tma),
                              "back": back._replace(programs=programs, tma=tma)})
        return out, counts

    prior = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # so torch.empty fills with NaN: a tile left unwritten shows
    try:
        (classic, classic_counts), (persistent, counts) = run(0), run(2)
        # TMA launches (Tiles.tma; not on the Gram path), whose boxes pass the image's edges (9×10
        # in boxes of 32 pixels): the pixels past them are neither written nor counted
        boxed = None if gram else run(2, tma=True)
    finally:
        torch.use_deterministic_algorithms(prior)
    assert torch.equal(classic, persistent) and torch.equal(classic_counts, counts)
    if boxed is not None:
        assert rel_err(boxed[0].double().cpu(), classic.double().cpu()) < (1e-13 if dtype == torch.float64 else TOL[dtype])
        assert torch.equal(boxed[1], counts)
    x_hat = x.double().clamp(min=0) * scale.double().view(N, 1, 1, 1)
    dx = sectional_products_reference(x_cl.permute(0, 3, 1, 2).double(), R.double().reshape(N, O, H, W), (3, 3), (1, 1),
                                      (1, 1), (1, 1, 1, 1))
    expected = 2 * x_hat.cpu() * dx.cpu()
    assert rel_err(persistent.double().cpu(), expected) < TOL[dtype]
    assert counts.tolist() == [int((persistent[i] != 0).sum()) for i in range(N)]


@pytest.mark.parametrize("C,O,k,p,d", [(5, 6, 3, 1, 1), (4, 5, 3, 2, 2), (6, 4, 1, 1, 1)])
def test_rule_on_the_implicit_gram_path_matches_the_filter_path(C, O, k, p, d):
    """The rule's "implicit_gram" path (purge fused like implicit_gemm's), and its fall-back to
    the unfolded Gram path where the dropped relevance is tracked."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    torch.manual_seed(2)
    conv = nn.Conv2d(C, O, k, padding=p, dilation=d).double()
    x = torch.randn(3, C, 7, 6, dtype=torch.float64)
    x[:, :, 1:4, 1:3] = 0
    R = torch.randn(3, O, *conv(x).shape[-2:], dtype=torch.float64)
    g = conv_geometry(conv, (7, 6))
    expected = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="filter")
    got = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="implicit_gram")
    assert rel_err(got, expected) < 1e-12
    tracked = Context(values={}, shapes={}, ops=TORCH, dropped=torch.zeros(3, dtype=torch.float64))
    assert rel_err(inner_conv_relevance(tracked, x, R, g, path="implicit_gram"), expected) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_kernel_backends_choose_the_implicit_gemms(backend, monkeypatch):
    """backend="torch" is the pure-PyTorch reference: where the cost model takes Triton's
    implicit GEMMs (as on a GPU with tensor-core products), it runs PyTorch's convolutions; a
    kernel backend runs the implicit GEMMs. Same values either way."""
    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("Triton unavailable")
    from rsp_fast.kernels.triton import conv_products as kernels
    from rsp_fast.ops.dispatch import SETS
    from rsp_fast.rules import conv_paths

    choose = conv_paths.choose_path

    def as_on_a_gpu(ck, o, L, dense_pointwise=False, cuda_dense=False, nonzeros=None, masked_ck=None, pixel_gram=None,
                    tensor_cores=False, implicit_gemm_runs=True, *rest, **kwargs):
        return choose(ck, o, L, dense_pointwise, True, None, masked_ck, None, True, implicit_gemm_runs, *rest, **kwargs)

    launches = []
    products = kernels.conv_products_triton
    monkeypatch.setattr(conv_paths, "choose_path", as_on_a_gpu)
    monkeypatch.setattr(kernels, "conv_products_triton", lambda *a, **k: launches.append(1) or products(*a, **k))
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, padding=1).double()
    x, g = torch.randn(2, 5, 7, 6, dtype=torch.float64), conv_geometry(conv, (7, 6))
    R = torch.randn(2, 6, 7, 6, dtype=torch.float64)
    expected = inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, g, path="filter")
    got = inner_conv_relevance(Context(values={}, shapes={}, ops=SETS[backend]), x, R, g)
    assert rel_err(got, expected) < 1e-12
    assert bool(launches) == (backend != "torch")


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("kernel,programs,splits", [("responses", 0, None), ("responses", 2, None), ("back", 0, None),
                                                    ("back", 2, None), ("filters", 0, None), ("filters", 0, 3)])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tma_launches_match_the_unfolded_reference(geometry, kernel, programs, splits, device, dtype):
    """Each kernel with its operands copied by the tensor memory accelerator (``Tiles.tma``:
    tensor descriptors, a tile's positions or pixels a box of the output or input, zero past its
    edges by the copy itself; the filters forming R's sections from R in registers), one program
    per tile or persistent, the filters' positions in one part or three: the same products as the
    default launch, for every kernel shape, dilation and padding where the operands' rows are
    16-byte aligned; elsewhere a ValueError that names the alignment."""
    from rsp_fast.kernels.triton.conv_products import default_tiles

    _skip_where_the_interpreter_repeats(geometry, device, persistent=programs > 0)
    N, C, O, H, W, kernel_hw, dilation, padding = geometry
    columns = {"responses": 2 * O, "back": C, "filters": C}[kernel]
    t = default_tiles(kernel, columns, dtype, torch.device(device))._replace(programs=programs, tma=True)
    out_w = W + padding[0] + padding[1] - dilation[1] * (kernel_hw[1] - 1)
    work_size = 8 if dtype == torch.float64 else 4  # R's precision, which the filters read
    row_bytes = {"responses": [C * dtype.itemsize], "back": [C * dtype.itemsize, 2 * O * dtype.itemsize],
                 "filters": [C * dtype.itemsize, out_w * work_size]}[kernel]
    if any(size % 16 for size in row_bytes):
        with pytest.raises(ValueError, match="16-byte aligned"):
            _products(*geometry, device, dtype, tiles={kernel: t}, splits=splits)
        return
    got, expected = _products(*geometry, device, dtype, tiles={kernel: t}, splits=splits)
    plain, _ = _products(*geometry, device, dtype)
    assert rel_err(got.double().cpu(), expected.cpu()) < TOL[dtype]
    assert rel_err(got.double().cpu(), plain.double().cpu()) < (1e-13 if dtype == torch.float64 else TOL[dtype])


@pytest.mark.parametrize("rows,out_hw,box", [
    (256, (224, 224), (8, 32)),  # 224 = 7·32 and 8 | 224: the boxes tile VGG16's first layers exactly
    (256, (112, 112), (16, 16)),
    (128, (14, 14), (8, 16)),  # 2 boxes of 8×16 cover 14×14 (256 positions; 64×2 boxes would take 896)
    (32, (1, 23), (1, 32)),  # a Conv1d's one row
    (64, (7, 5), (8, 8)),  # a box past both edges beats any taller one: 7 rows need 8, 5 columns 8
])
def test_position_box_covers_the_output_with_the_fewest_positions_past_its_edges(rows, out_hw, box):
    from rsp_fast.kernels.triton.conv_products import position_box

    assert position_box(rows, out_hw) == box


@pytest.mark.parametrize("rows,out_hw,min_width,box", [
    (64, (64, 1), 4, (16, 4)),  # a column one output wide: a 16-byte float32 box, not 1 wide (4 bytes)
    (64, (64, 1), 8, (8, 8)),  # bfloat16
    (2, (64, 1), 4, (1, 2)),  # fewer rows than that: as wide as the rows go
])
def test_position_box_is_as_wide_as_tma_reads_where_the_width_is_innermost(rows, out_hw, min_width, box):
    """R's TMA box in the filters has the output's width innermost: TMA needs 16 bytes of it."""
    from rsp_fast.kernels.triton.conv_products import position_box

    assert position_box(rows, out_hw) == (rows, 1)  # without the floor: one column, all rows
    assert position_box(rows, out_hw, min_width) == box


def test_tma_launches_do_not_exist_on_the_gram_path():
    """The Gram path's kernels have no TMA launch: asked for one, they say so instead of ignoring
    it; nor do the filters have a persistent one."""
    from rsp_fast.kernels.triton.conv_products import default_tiles, gram_products_triton

    cpu = torch.device("cpu")
    t = default_tiles("filters", 8, torch.float64, cpu)._replace(programs=2)
    with pytest.raises(ValueError, match="no persistent launch"):
        _products(1, 8, 3, 6, 6, (3, 3), (1, 1), (1, 1, 1, 1), "cpu", torch.float64, tiles={"filters": t})
    x, R = torch.rand(1, 6, 6, 8, dtype=torch.float64), torch.randn(1, 3, 36, dtype=torch.float64)
    for kernel, default in (("responses", "patch_gram"), ("back", "gram_back")):
        tiles = {kernel: default_tiles(default, 36, torch.float64, cpu)._replace(tma=True)}
        with pytest.raises(ValueError, match="no TMA launch"):
            gram_products_triton(x, R, (3, 3), (1, 1), (1, 1, 1, 1), (6, 6), torch.float64, tiles=tiles)
