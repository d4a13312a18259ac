"""The masked path (C++ on CPU: an inner conv's three products computed only at R's
non-zeros): when the cost model takes it, and a whole RSP pass on it against the dense
paths. The kernel itself is tested against its reference in test_products_kernels.py."""
import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.ops import dispatch
from rsp_fast.rules import conv_paths

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

def test_choose_path_takes_the_masked_kernels_for_sparse_relevance_only():
    ck, o, L = 64 * 9, 64, 224 * 224
    assert conv_paths.choose_path(ck, o, L) == "conv"
    assert conv_paths.choose_path(ck, o, L, nonzeros=0.05 * o * L) == "masked"
    assert conv_paths.choose_path(ck, o, L, nonzeros=1.0 * o * L) == "conv"
    # deep layers with few positions: the Gram path beats even sparse masked products
    assert conv_paths.choose_path(512 * 9, 512, 14 * 14, nonzeros=0.25 * 512 * 196) == "gram"


def test_choose_path_weighs_each_path_by_its_measured_cpu_rate():
    """The paths' multiply-adds as bench_compiled_paths.py --every-path timed them on CPU: the
    convolutions count at half (they ran twice the GEMMs' rate), masked products at 1.5×, and a
    grouped conv's Gram path at 3×."""
    pixels = lambda C, side: C * (side + 2) ** 4  # noqa: E731 -- the pixel Gram of a padded 3×3 conv
    # ResNet50's 128-channel 3×3 convs at 28×28, 48-60 % of R non-zero: masked (2.4-2.7 ms per image
    # against 3.7 on the convolutions and 7.0 on the Gram path, whose multiply-adds are fewer)
    ck, o, L = 128 * 9, 128, 28 * 28
    assert conv_paths.choose_path(ck, o, L, nonzeros=0.6 * o * L, pixel_gram=pixels(128, 28)) == "masked"
    assert conv_paths.choose_path(ck, o, L, pixel_gram=pixels(128, 28)) == "conv"  # no masked kernel
    # its 256-channel ones at 14×14: the Gram path (1.0 ms against 2.5 masked and 4.5 on the convolutions)
    ck, o, L = 256 * 9, 256, 14 * 14
    assert conv_paths.choose_path(ck, o, L, nonzeros=0.5 * o * L, pixel_gram=pixels(256, 14)) == "gram"
    # RegNetX-400MF's 3×3 convs of 25 groups of 16 channels at 7×7: the convolutions (0.5 ms against 0.8)
    ck, o, L = 16 * 9, 16, 7 * 7
    assert conv_paths.choose_path(ck, o, L, pixel_gram=pixels(16, 7), grouped=True) == "conv"


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
    choose = conv_paths.choose_path

    def spy(*args, **kwargs):
        taken.append(choose(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(conv_paths, "choose_path", spy)
    monkeypatch.setattr(conv_paths, "MASKED_SLOWDOWN", 1e9)
    dense = explainer.attribute(x, target=[1, 2, 3])
    assert "masked" not in taken
    taken.clear()
    monkeypatch.setattr(conv_paths, "MASKED_SLOWDOWN", 0.0)
    masked = explainer.attribute(x, target=[1, 2, 3])
    assert taken.count("masked") == 4  # every inner conv
    torch.testing.assert_close(masked, dense, rtol=1e-9, atol=1e-12 * dense.abs().max().item())
