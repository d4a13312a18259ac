"""The masked path (C++ on CPU: an inner conv's three products computed only at R's
non-zeros): when the cost model takes it, and a whole RSP pass on it against the dense
paths. The kernel itself is tested against its reference in test_products_kernels.py."""
import pytest
import torch
from torch import nn

import rsp_fast
from rsp_fast.ops import dispatch
from rsp_fast.rules import conv as conv_rule

pytestmark = pytest.mark.skipif(dispatch._availability("cpp", torch.device("cpu")) != "",
                                reason="rsp_fast._C is not built")

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
