"""Conservation: Σ R_input = Σ R₀ − dropped per sample (float64), where ``dropped`` is the
relevance that reached positions with no support (RSP_SPEC.md §3). On the real models the
inputs are such that nothing is dropped, so there the identity is exact conservation."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st
from torch import nn

import rsp_fast

D = torch.float64


def _assert_conserved(explainer, x, expect_no_drop=False):
    ex = explainer.explain(x, record=True)
    total_in = ex.attribution.flatten(1).sum(1)
    total_0 = ex.initial.flatten(1).sum(1)
    assert torch.allclose(total_in + ex.dropped, total_0, rtol=1e-6, atol=1e-9), (total_in, ex.dropped, total_0)
    if expect_no_drop:
        assert ex.dropped.abs().max() < 1e-9 * total_0.abs().max()
        assert torch.allclose(total_in, total_0, rtol=1e-6)
    assert (ex.attribution > 0).any() and (ex.attribution < 0).any()
    return ex


def calibrated(model: nn.Module, size: int, bias: float = 1.0) -> nn.Module:
    """Random weights with BatchNorm statistics taken from random inputs (as training would
    set them), then positive BN shifts so that few units are exactly zero."""
    model = model.double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, dtype=D))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, bias)
    return model.eval()


@pytest.mark.parametrize("name,size,no_drop", [
    ("vgg16", 64, True), ("resnet18", 64, True), ("resnet50", 64, True), ("mobilenet_v2", 64, False)])
@pytest.mark.parametrize("init", ["comparative", "gradcam"])
def test_torchvision_models_conserve(name, size, no_drop, init):
    model = calibrated(getattr(torchvision.models, name)(), size)
    x = torch.randn(2, 3, size, size, dtype=D)
    _assert_conserved(rsp_fast.RSP(model, init=init), x, expect_no_drop=no_drop)


def test_efficientnet_lite0_conserves():
    timm = pytest.importorskip("timm")
    model = calibrated(timm.create_model("tf_efficientnet_lite0", pretrained=False), 64)
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "bn2"
    _assert_conserved(explainer, torch.randn(2, 3, 64, 64, dtype=D))


# Random small CNNs and MLPs built from the supported layers.
@st.composite
def small_cnns(draw):
    layers, c = [], 3
    size = draw(st.integers(8, 14))
    for i in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 9))
        k = draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.sampled_from([1, 2]))
        groups = c if (i > 0 and draw(st.booleans()) and out % c == 0) else 1
        layers.append(nn.Conv2d(c, out, k, stride=stride, padding=k // 2, groups=groups, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out))
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.LeakyReLU(0.1)])))
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True), nn.Identity()])))
        c = out
    residual = draw(st.booleans())
    tail = draw(st.sampled_from(["none", "gate", "shuffle", "upsample"]))
    return layers, c, size, residual, draw(st.integers(2, 6)), tail


class _Net(nn.Module):
    def __init__(self, layers, c, classes, residual, tail="none"):
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) if residual else None
        self.tail = tail
        self.gate = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid())
        self.last = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.body(x)
        if self.block is not None:
            x = torch.relu(self.block(x) + x)
        if self.tail == "gate":  # squeeze-and-excitation
            x = x * self.gate(x.mean((2, 3), keepdim=True))
        elif self.tail == "shuffle":  # reverse the channels through a split and a concatenation
            pieces = x.split(1, dim=1)
            x = torch.cat([pieces[i] for i in reversed(range(self.fc.in_features))], 1)
        elif self.tail == "upsample":
            x = F.interpolate(x, scale_factor=2, mode="bilinear")
        if self.tail != "none":
            x = torch.relu(self.last(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@settings(max_examples=25, deadline=None)
@given(spec=small_cnns(), seed=st.integers(0, 2**16), init=st.sampled_from(["comparative", "gradcam"]))
def test_random_cnns_conserve(spec, seed, init):
    layers, c, size, residual, classes, tail = spec
    torch.manual_seed(seed)
    model = _Net(layers, c, classes, residual, tail).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2); m.bias.uniform_(0, 1)
    x = torch.randn(3, 3, size, size, dtype=D)
    ex = rsp_fast.RSP(model, init=init, hostile_k=min(2, classes - 1)).explain(x, record=True)
    total_in, total_0 = ex.attribution.flatten(1).sum(1), ex.initial.flatten(1).sum(1)
    assert torch.allclose(total_in + ex.dropped, total_0, rtol=1e-6, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=3), features=st.integers(3, 20), seed=st.integers(0, 2**16))
def test_random_mlps_conserve(widths, features, seed):
    torch.manual_seed(seed)
    layers, c = [], features
    for w in widths:
        layers += [nn.Linear(c, w), nn.ReLU()]
        c = w
    model = nn.Sequential(*layers, nn.Dropout(), nn.Linear(c, 4)).double().eval()
    x = torch.randn(3, features, dtype=D)
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == str(len(layers) - 1)  # the input of the last Linear
    ex = explainer.explain(x, record=True)
    total_in, total_0 = ex.attribution.sum(1), ex.initial.sum(1)
    assert torch.allclose(total_in + ex.dropped, total_0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["densenet121", "googlenet", "regnet_x_400mf", "mnasnet0_5", "resnext50_32x4d"])
def test_more_torchvision_architectures_conserve(name):
    """Concatenation (DenseNet, Inception), grouped convs (RegNet, ResNeXt), depthwise (MNASNet)."""
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = calibrated(getattr(torchvision.models, name)(num_classes=10, **kwargs), 64)
    _assert_conserved(rsp_fast.RSP(model), torch.randn(2, 3, 64, 64, dtype=D))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x0_5", "convnext_tiny"])
def test_architectures_on_the_extension_rules_conserve(name):
    """Hardswish / SiLU activations, squeeze-and-excitation gates (x·σ(g)), stochastic depth;
    ShuffleNet's chunk and channel shuffle; ConvNeXt's LayerNorm, GELU and layer scale."""
    model = calibrated(getattr(torchvision.models, name)(num_classes=10), 64)
    _assert_conserved(rsp_fast.RSP(model), torch.randn(2, 3, 64, 64, dtype=D))


def test_timm_mobilenetv3_explains_the_map_before_its_head():
    """timm's MobileNetV3 head runs a 1×1 conv, a norm and Hardswish on the pooled map: the
    default saliency layer is the last spatial map before that pool, not the head's output."""
    timm = pytest.importorskip("timm")
    model = calibrated(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10), 64)
    explainer = rsp_fast.RSP(model)
    assert not explainer.layer.startswith(("conv_head", "norm_head", "act2", "global_pool"))
    ex = _assert_conserved(explainer, torch.randn(2, 3, 64, 64, dtype=D))
    assert ex.initial.shape[-2:] == (2, 2)  # 64 / 32


@pytest.mark.parametrize("name", ["resnest14d", "skresnet18", "convnextv2_atto", "ese_vovnet39b_evos", "hgnetv2_b0",
                                  "convnext_zepto_rms", "poolformer_s12", "densenetblur121d", "starnet_s050",
                                  "mambaout_femto", "gcresnet33ts"])
def test_timm_architectures_on_statistic_factors_sums_and_blur_conserve(name):
    """Split attention and selective kernels (x·softmax of pooled features, summed over the
    branches), ConvNeXt-V2's response norm, EvoNorm (x / std), HGNetV2's learnable affine
    blocks (x·s + b) and its head, an RMS-norm head, PoolFormer's pool(x) − x, blur pooling
    (a constant filter after reflect padding), gated units act(g)·x (StarNet, MambaOut, whose
    maps are N×H×W×C), attention pooling (GCNet). The default layer is the last spatial map; R₀ is the same in every channel."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = calibrated(timm.create_model(name, pretrained=False, num_classes=10), 64)
    explainer = rsp_fast.RSP(model)
    ex = _assert_conserved(explainer, torch.randn(2, 3, 64, 64, dtype=D))
    channel = -1 if explainer.plan.channels_last else 1
    assert ex.initial.movedim(channel, 1).shape[-2:] == (2, 2)
    assert torch.allclose(ex.initial, ex.initial.mean(channel, keepdim=True).expand_as(ex.initial))
