"""The masked sectional products (C++ on CPU): an inner conv's three products computed only at
R's non-zeros, against the dense reference, and the masked path inside a whole RSP pass."""
import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.kernels.reference import sectional_products_reference
from rsp_fast.ops import custom, dispatch
from rsp_fast.rules import conv as conv_rule
from models import conv_products_case

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

# (N, C, O, H, W, kernel, stride, dilation, padding (left, right, top, bottom))
GEOMETRIES = [
    (1, 5, 7, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    (3, 17, 33, 11, 10, (3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),  # stride 2, TF-style asymmetric padding
    (2, 16, 9, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),  # dilation: taps are not one contiguous row
    (2, 8, 4, 7, 7, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
    (3, 24, 16, 8, 9, (5, 3), (1, 2), (1, 1), (2, 2, 1, 1)),
    (4, 40, 12, 6, 6, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0)),  # no padding, C past two vectors
]
DENSITIES = [0.25, 0.5, 1.0]


def inputs(geometry, density=0.5, sign="mixed", dtype=torch.float64, zero_region=False):
    return conv_products_case(*geometry, density=density, sign=sign, dtype=dtype, zero_region=zero_region)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_products_equal_the_dense_reference_float64(geometry, density):
    args = inputs(geometry, density)
    expected = sectional_products_reference(*args)
    got = custom.masked_sectional_products(*args)
    assert got.shape == args[0].shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("sign", ["positive", "negative"])
@pytest.mark.parametrize("zero_region", [False, True])
def test_masked_products_one_signed_section_and_empty_patches(sign, zero_region):
    args = inputs(GEOMETRIES[0], 0.6, sign, zero_region=zero_region)
    expected = sectional_products_reference(*args)
    torch.testing.assert_close(custom.masked_sectional_products(*args), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_masked_products_float32(geometry):
    x, R, *rest = inputs(geometry, 0.3, dtype=torch.float32)
    expected = sectional_products_reference(x.double(), R.double(), *rest)
    got = custom.masked_sectional_products(x, R, *rest).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_masked_products_without_relevance_are_zero():
    x, R, *rest = inputs(GEOMETRIES[1])
    assert torch.count_nonzero(custom.masked_sectional_products(x, torch.zeros_like(R), *rest)) == 0


def test_masked_products_one_thread_and_many_agree():
    """Samples run in parallel when there are enough of them, the inside of one sample otherwise."""
    args = inputs(GEOMETRIES[4], 0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = custom.masked_sectional_products(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(custom.masked_sectional_products(*args), one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(custom.masked_sectional_products(args[0][:1], args[1][:1], *args[2:]), one[:1],
                               rtol=1e-12, atol=1e-14)


def test_masked_products_opcheck():
    torch.library.opcheck(torch.ops.rsp_fast.masked_sectional_products.default,
                          (*inputs(GEOMETRIES[1])[:2], [3, 3], [2, 2], [1, 1], [0, 1, 0, 1]))


def test_masked_products_reject_bad_arguments():
    x, R, k, s, d, p = inputs(GEOMETRIES[0])
    with pytest.raises(RuntimeError, match="is not the output of this 3x3 conv"):
        custom.masked_sectional_products(x, R[..., :-1], k, s, d, p)
    with pytest.raises(RuntimeError, match="share one dtype"):
        custom.masked_sectional_products(x.float(), R, k, s, d, p)
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        custom.masked_sectional_products(x, R, k, s, d, (-1, 1, 1, 1))


def test_choose_path_takes_the_masked_kernels_for_sparse_relevance_only():
    ck, o, L = 64 * 9, 64, 224 * 224
    assert conv_rule.choose_path(ck, o, L) == "conv"
    assert conv_rule.choose_path(ck, o, L, nonzeros=0.05 * o * L) == "masked"
    assert conv_rule.choose_path(ck, o, L, nonzeros=1.0 * o * L) == "conv"
    # deep layers with few positions: the Gram path beats even sparse masked products
    assert conv_rule.choose_path(512 * 9, 512, 14 * 14, nonzeros=0.25 * 512 * 196) == "gram"


def small_vgg() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 16, 3, stride=1, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).double().eval()


def test_rsp_with_masked_products_equals_rsp_with_dense_products(monkeypatch):
    """A whole pass where every eligible conv takes the masked kernels gives the dense result."""
    model, x = small_vgg(), torch.rand(3, 3, 32, 32, dtype=torch.float64)
    explainer = rsp_fast.RSP(model, layer="10", backend="cpp")
    taken = []
    choose = conv_rule.choose_path

    def spy(*args, **kwargs):
        taken.append(choose(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(conv_rule, "choose_path", spy)
    monkeypatch.setattr(conv_rule, "MASKED_SLOWDOWN", 1e9)
    dense = explainer.attribute(x, target=[1, 2, 3])
    assert "masked" not in taken
    taken.clear()
    monkeypatch.setattr(conv_rule, "MASKED_SLOWDOWN", 0.0)
    masked = explainer.attribute(x, target=[1, 2, 3])
    assert taken.count("masked") == 4  # every inner conv
    torch.testing.assert_close(masked, dense, rtol=1e-9, atol=1e-12 * dense.abs().max().item())
