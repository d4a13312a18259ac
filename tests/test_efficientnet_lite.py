"""The embedded default's own EfficientNet-Lite0 (rsp_fast/efficientnet_lite.py) against
timm's ``tf_efficientnet_lite0``, the architecture its weights were made for: the same
state-dict layout, the same logits and the same RSP maps, at the model's size and at odd
ones (where TensorFlow's "same" padding puts the odd pixel after)."""
import os
import subprocess
import sys

import pytest
import torch

import rsp_fast
from rsp_fast.efficientnet_lite import EfficientNetLite0
from rsp_fast.models import efficientnet_lite0, imagenet_class_names

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def pair():
    ours = efficientnet_lite0().model  # the ImageNet weights
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [tuple(t.shape) for t in ours.state_dict().values()] == [tuple(t.shape) for t in ref.state_dict().values()]
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (1, 3, 97, 131), (1, 3, 225, 223)])
def test_same_logits_and_maps_as_timm(pair, shape):
    ours, ref = pair
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=0, atol=1e-5)
    a, b = (rsp_fast.RSP(m).explain(x) for m in (ours, ref))
    assert a.layer == b.layer == "bn2"
    assert torch.equal(a.target, b.target) and torch.equal(a.hostile, b.hostile)
    scale = b.attribution.abs().max()
    assert scale > 0 and (a.attribution - b.attribution).abs().max() <= 1e-5 * scale


def test_random_weights_and_class_count_match_timm():
    ours = EfficientNetLite0(num_classes=10).eval()
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=0, atol=1e-5)


def test_class_names_are_imagenets():
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    assert imagenet_class_names() == [info.index_to_description(i) for i in range(1000)]


def test_the_default_model_on_a_cpu_imports_neither_timm_torchvision_nor_triton():
    """Their imports cost about 2 s of every command here (Triton's 0.07 s); explaining with the
    default model on a CPU needs none of them."""
    code = ("import sys, torch, rsp_fast; from rsp_fast.models import build_model; from rsp_fast import cli, video; "
            "rsp_fast.RSP(build_model('efficientnet_lite0').model).attribute(torch.rand(1, 3, 64, 64)); "
            "print(sorted(m for m in ('timm', 'torchvision', 'triton') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests' own setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
