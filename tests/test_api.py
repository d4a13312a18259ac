"""The public API: batch independence, layer choice, model left untouched, clear errors."""
import contextlib
import copy
import functools
import io
import re
import warnings
from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import prune

import rsp_fast
from rsp_fast import api
from rsp_fast.graph.plan import Plan, build_plan
from rsp_fast.errors import BackendUnavailableError, RSPError, UnsupportedModelError
from conftest import GOLDEN_FILES, load_golden, rel_err
from models import golden_model, tiny_cnn

D = torch.float64


@pytest.fixture(scope="module")
def golden():
    return load_golden(next(p for p in GOLDEN_FILES if p.stem == "vgg16_narrow_comparative"))


def test_batch_of_8_equals_each_sample_alone(golden):
    model = golden_model(golden)
    explainer = rsp_fast.RSP(model, layer=f"features.{golden['saliency_layer']}", hostile_k=3)
    x = torch.randn(8, 3, 64, 64, dtype=D)
    x[3] = golden["x"][0]
    batch = explainer.explain(x)
    for n in range(8):
        alone = explainer.explain(x[n:n + 1])
        assert alone.target.item() == batch.target[n].item()
        assert rel_err(batch.attribution[n], alone.attribution[0]) < 1e-9
        assert rel_err(batch.initial[n], alone.initial[0]) < 1e-9
    assert rel_err(batch.attribution[3:4], golden["R_input"]) < 1e-9


def test_batch_independence_resnet_with_explicit_targets():
    model = torchvision.models.resnet18(num_classes=7).double().eval()
    explainer = rsp_fast.RSP(model)
    x = torch.randn(4, 3, 48, 48, dtype=D)
    targets = [0, 6, 3, 3]
    hostile = [[1, 2], [0, 1], [4, 5], [6, 0]]
    batch = explainer.explain(x, target=targets, hostile=hostile)
    assert batch.hostile.tolist() == hostile
    for n in range(4):
        alone = explainer.attribute(x[n:n + 1], target=targets[n], hostile=[hostile[n]])
        assert rel_err(batch.attribution[n], alone[0]) < 1e-9


class _NormInTheHead(nn.Module):
    """conv → ReLU (the layer explained) → a norm in the head, then ``head``: a residual block
    pooled by a softmax attention written as an einsum ("einsum"), a permute and a Linear over
    the channels-last positions ("permute-linear"), or a conv ("conv", run channels-last)."""

    def __init__(self, norm, head):
        super().__init__()
        self.head = head
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm, self.mask, self.lin, self.fc = norm, nn.Conv2d(8, 1, 1), nn.Linear(8, 8), nn.Linear(8, 5)
        self.shift = nn.Parameter(torch.zeros(1, 8, 1, 1))  # one sample's shape: a parameter, not a head tensor

    def forward(self, x):
        h = torch.relu(self.c1(x)) + self.shift
        if self.head == "permute-linear":
            return self.fc(torch.relu(self.lin(self.norm(h).permute(0, 2, 3, 1))).mean((1, 2)))
        if self.head == "conv":
            return self.fc(torch.relu(self.c2(self.norm(h))).mean((2, 3)))
        h = self.norm(self.c2(h)) + h
        a = self.mask(h).flatten(1).softmax(-1)
        return self.fc(torch.einsum("nci,ni->nc", h.flatten(2), a))


@pytest.mark.parametrize("head", ["einsum", "permute-linear", "conv"])
@pytest.mark.parametrize("norm", [nn.BatchNorm2d, functools.partial(nn.InstanceNorm2d, affine=True, track_running_stats=True)],
                         ids=["batch", "instance"])
def test_a_sample_alone_is_explained_as_in_a_batch_with_a_norm_in_the_head(norm, head):
    """torch 2.14's CPU BatchNorm / InstanceNorm backward in eval mode at batch 1 took the
    (1, C, H, W) gradient that einsum's backward makes, strides (C, 1, W·C, C), for channels-last
    and got it wrong, and InstanceNorm a channels-last gradient too: R₀ at batch 1 was off the
    same sample's in a batch of 3 (the map 0.44 of its peak; 1.70 behind permute and Linear)."""
    torch.manual_seed(0)
    model = _NormInTheHead(norm(8), head).double().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2)
        model.norm.running_var.uniform_(0.5, 2); model.norm.running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(3, 3, 12, 12, dtype=D)
    if head == "conv":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    explainer = rsp_fast.RSP(model, layer="c1")
    batch = explainer.explain(x, target=[0, 1, 2])
    for n in range(3):
        alone = explainer.explain(x[n:n + 1], target=[n])
        assert rel_err(alone.initial[0], batch.initial[n]) < 1e-10
        assert rel_err(alone.attribution[0], batch.attribution[n]) < 1e-10
    assert not model.shift._backward_hooks  # the model's parameters are left as they were


def test_default_layers():
    assert rsp_fast.RSP(torchvision.models.vgg16()).layer == "features.29"
    assert rsp_fast.RSP(torchvision.models.resnet50()).layer == "layer4"
    assert rsp_fast.RSP(torchvision.models.mobilenet_v2()).layer == "features"
    # heads without a Linear pool class-score maps made by a 1×1 conv: the features that conv reads
    assert rsp_fast.RSP(torchvision.models.squeezenet1_1()).layer == "features"
    assert rsp_fast.RSP(torchvision.models.video.s3d()).layer == "features"
    fcn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert rsp_fast.RSP(fcn).layer == "1"
    # ... but not where a layer follows the pool (timm's DLA: a 1×1 conv classifier after it)
    pooled_first = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Conv2d(8, 5, 1), nn.Flatten())
    assert rsp_fast.RSP(pooled_first).layer == "3"


class _GlobalPoolHead(nn.Module):
    """A conv after the last max pool, then a global pool written as a reduction."""

    def __init__(self, pool):
        super().__init__()
        self.pool, self.c1, self.c2 = pool, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.relu1, self.relu2, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.c2(F.max_pool2d(self.relu1(self.c1(x)), 2)))))


def _avgmax(t):  # timm's avgmax pooling
    return 0.5 * (F.adaptive_avg_pool2d(t, 1) + F.adaptive_max_pool2d(t, 1)).flatten(1)


def _catavgmax(t):
    return torch.cat((F.adaptive_avg_pool2d(t, 1), F.adaptive_max_pool2d(t, 1)), 1).flatten(1)[:, ::2]


def _gem(t, p=3.0):  # generalised-mean pooling (retrieval heads)
    return t.clamp(min=1e-6).pow(p).mean((-2, -1)).pow(1.0 / p)


@pytest.mark.parametrize("pool", [lambda t: t.mean((2, 3)), lambda t: t.sum((2, 3)), lambda t: t.sum((-2, -1)) / 64,
                                  lambda t: t.amax((2, 3)), lambda t: torch.amax(t, (2, 3)), _avgmax, _catavgmax,
                                  _gem, lambda t: t.sum(3).sum(2), lambda t: F.dropout2d(t, 0.2, False).mean((2, 3)),
                                  nn.Sequential(nn.Dropout2d(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten())],
                         ids=["mean", "sum", "sum_over_area", "amax", "torch_amax", "avgmax", "catavgmax", "gem", "sum-then-sum",
                              "F.dropout2d", "Dropout2d"])
def test_global_pools_written_as_reductions_mark_the_default_layer(pool):
    """avgmax and catavgmax: the pooled sum or concatenation was taken for the map (R₀ on a
    512×1×1 map in timm's ResNet18 with global_pool='avgmax', 0.57 of the peak off layer4's).
    GeM's clamp and power, and the first of two sums, were taken for the map too."""
    explainer = rsp_fast.RSP(_GlobalPoolHead(pool).eval())
    assert explainer.layer == "relu2"  # the map the head pools, not the one before the max pool
    assert explainer.attribute(torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def _shuffle_by_view(t):  # torchvision's ShuffleNetV2 spelling
    n, c, h, w = t.size()
    return t.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _shuffle_by_permute(t):
    n, c, h, w = t.shape
    return t.reshape((n, 2, c // 2, h, w)).permute(0, 2, 1, 3, 4).reshape(shape=(n, c, h, w))


@pytest.mark.parametrize("shuffle", [_shuffle_by_view, _shuffle_by_permute], ids=["view", "permute"])
def test_a_map_reshaped_last_before_the_pool_is_the_default_layer(shuffle):
    """A channel shuffle last before the global pool, written with views: the last view keeps
    the N×C×H×W map, where F.channel_shuffle's output is the default layer. It was taken for a
    flatten, and the 5-D map inside the shuffle was explained (1.10 of the peak off)."""
    torch.manual_seed(0)
    functional = _GlobalPoolHead(lambda t: F.channel_shuffle(t, 2).mean((2, 3))).double().eval()
    written = _GlobalPoolHead(lambda t: shuffle(t).mean((2, 3))).double().eval()
    written.load_state_dict(functional.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=D)
    expected = rsp_fast.RSP(functional).explain(x)
    ours = rsp_fast.RSP(written).explain(x)
    assert ours.initial.shape == expected.initial.shape == (2, 16, 8, 8)
    assert rel_err(ours.attribution, expected.attribution) < 1e-12


class _ShuffledSignal(nn.Module):
    """A 1-D CNN whose last map is channel-shuffled with views before the pool over time."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        n, c, length = h.shape
        return self.fc(h.view(n, 2, c // 2, length).transpose(1, 2).reshape(n, c, length).mean(-1))


def test_a_shuffled_signal_is_the_default_layer_not_the_shuffle_inside():
    """The shuffle's last reshape, to 3 sizes, merges back the dims its first view split: it keeps
    the N×C×L map (0.705 of the peak off with the 4-D intermediate taken instead)."""
    explainer = rsp_fast.RSP(_ShuffledSignal())
    assert explainer.layer == "reshape"
    assert explainer.explain(torch.randn(2, 3, 16)).initial.shape == (2, 8, 16)


class _FlattenedToPixel(nn.Module):
    """VGG-like features flattened into the channels of a 1×1 map for a 1×1 conv classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(4))
        self.classifier = nn.Conv2d(8 * 4 * 4, 5, 1)

    def forward(self, x):
        f = self.features(x)
        return self.classifier(f.reshape(f.shape[0], -1, 1, 1)).flatten(1)


def test_a_view_to_ones_after_its_sizes_is_a_flatten():
    """x.reshape(n, -1, 1, 1) flattens, as x.flatten(1) does (the default layer went onto the
    N×128×1×1 view: 0.88 of the peak off)."""
    assert rsp_fast.RSP(_FlattenedToPixel()).layer == "features.3"


class _NormedHead(nn.Module):
    """conv, ReLU, global pool, a LayerNorm or RMSNorm of the pooled features, Linear: the norm
    as F.layer_norm / F.rms_norm, or written out with its parameters first or last."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling, self.c1, self.c2 = spelling, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.weight, self.bias, self.fc = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16)), nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
        u, w, b = h.mean(-1, keepdim=True), self.weight, self.bias
        h = {"layer_norm": lambda: F.layer_norm(h, (16,), w, b, 1e-6),
             "layer_norm_written": lambda: b + (h - u) / torch.sqrt((h - u).pow(2).mean(-1, keepdim=True) + 1e-6) * w,
             "rms_norm": lambda: F.rms_norm(h, (16,), w, 1e-6),
             "rms_norm_written": lambda: w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))}[self.spelling]()
        return self.fc(h)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_a_norm_written_out_after_the_pool_is_part_of_the_head(norm):
    """The walk back from the logits went from w·x̂ + b to the parameter w, not x̂: it stopped
    inside the norm, whose output became the default layer. A LayerNorm was then refused
    (torch.sqrt between the input and the layer), an RMSNorm explained 0.59 of the peak off."""
    torch.manual_seed(0)
    functional = _NormedHead(norm).double().eval()
    written = _NormedHead(norm + "_written").double().eval()
    written.load_state_dict(functional.state_dict())
    x = torch.randn(2, 3, 12, 12, dtype=D)
    assert rel_err(written(x), functional(x)) < 1e-12
    explainer = rsp_fast.RSP(written)
    assert explainer.layer == rsp_fast.RSP(functional).layer == "relu_1"
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(functional).attribute(x)) < 1e-12


class _PointwiseHead(nn.Module):
    """conv, ReLU, global pool, then 1×1 convs, the last making the class scores (timm
    MobileNetV3's head), in 1, 2 or 3 dims, the convs as modules or as F.conv* on parameters."""

    def __init__(self, dims, functional):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.functional, self.dims = functional, dims
        self.body, self.relu = conv(3, 6, 3, padding=1), nn.ReLU()
        self.hidden, self.classify = conv(6, 8, 1), conv(8, 4, 1)

    def forward(self, x):
        h = self.relu(self.body(x)).mean(tuple(range(2, 2 + self.dims)), keepdim=True)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        for layer in (self.hidden, self.classify):
            h = conv(h, layer.weight, layer.bias) if self.functional else layer(h)
            h = F.hardswish(h) if layer is self.hidden else h
        return h.flatten(1)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_default_layer_is_before_the_pool_of_a_pointwise_conv_head(dims, functional):
    """Only nn.Conv2d heads were looked through: a Conv1d/Conv3d or F.conv* one made the class
    scores the default layer (Grad-CAM at the logits: 2.2e6 of the peak off)."""
    assert rsp_fast.RSP(_PointwiseHead(dims, functional)).layer == "relu"


@pytest.mark.parametrize("drop", [nn.Dropout(0.2), nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.2), nn.Identity()])
def test_an_mlps_default_layer_is_behind_any_dropout(drop):
    """Only nn.Dropout and nn.Identity were looked through (Dropout1d/2d/3d and the alpha
    dropouts are no subclasses of it; F.dropout* were not looked for either)."""
    assert rsp_fast.RSP(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), drop, nn.Linear(8, 3))).layer == "1"


class _TokenMLP(nn.Module):
    """Class scores for each token of an N×T×F input, averaged over the tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.classify = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.classify(F.relu(self.embed(x))).mean(1)


def test_per_token_class_scores_averaged_over_tokens_take_the_tokens_features_as_the_saliency_map():
    torch.manual_seed(0)
    explainer = rsp_fast.RSP(_TokenMLP().double().eval())
    assert explainer.layer == "relu" and explainer.plan.channels_last  # its features, channels last
    x = torch.randn(3, 5, 6, dtype=D)
    ex = explainer.explain(x, record=True)
    assert ex.initial.shape == (3, 5, 12)
    assert torch.allclose(ex.initial, ex.initial[..., :1].expand_as(ex.initial))  # one value per token, as per position
    assert torch.allclose(ex.initial.flatten(1).sum(1), torch.ones(3, dtype=D))  # the comparative init's ΣR₀ = 1
    assert torch.allclose(ex.attribution.flatten(1).sum(1), ex.initial.flatten(1).sum(1) - ex.dropped)


class _Reshaped(nn.Module):
    """A model that reshapes its input before its first conv: an N×L signal unsqueezed to
    N×1×L, N×784 pixels viewed as N×1×28×28, or N×C×T×H×W clips folded into N·T frames."""

    def __init__(self, kind):
        super().__init__()
        conv = (nn.Conv1d(1, 4, 5, padding=2) if kind in ("signal", "indexed") else
                nn.Conv2d(1 if kind == "pixels" else 3, 4, 3, padding=1))
        self.kind, self.features, self.fc = kind, nn.Sequential(conv, nn.ReLU()), nn.Linear(4, 3)

    def forward(self, x):
        if self.kind == "signal":
            return self.fc(self.features(x.unsqueeze(1)).mean(-1))
        if self.kind == "indexed":
            return self.fc(self.features(x[:, None]).mean(-1))
        if self.kind == "pixels":
            return self.fc(self.features(x.view(-1, 1, 28, 28)).mean((2, 3)))
        N, C, T, H, W = x.shape
        frames = self.features(x.transpose(1, 2).reshape(N * T, C, H, W)).mean((2, 3))
        return self.fc(frames.view(N, T, -1).mean(1))


def test_a_model_that_reshapes_its_input_takes_the_inputs_it_takes():
    """The input's rank was taken from the first conv: an N×L signal for a model that unsqueezes
    it was refused as "inputs must be 3-D (N, C, L)" (written x[:, None], until later). A model that
    folds clips into its batch is refused by what it does (its R₀ would have had N·T rows)."""
    torch.manual_seed(0)
    for kind, x in (("signal", torch.randn(2, 64, dtype=D)), ("indexed", torch.randn(2, 64, dtype=D)),
                    ("pixels", torch.randn(2, 784, dtype=D))):
        ex = rsp_fast.RSP(_Reshaped(kind).double().eval()).explain(x, record=True)
        assert ex.attribution.shape == x.shape
        assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, ex.initial.flatten(1).sum(1), atol=1e-12)
    with pytest.raises(UnsupportedModelError, match="the saliency layer 'features' has 8 rows for 2 samples: the model "
                                                    "folds its batch"):
        rsp_fast.RSP(_Reshaped("clips").double().eval()).explain(torch.randn(2, 3, 4, 8, 8, dtype=D))


class _ResidualTokens(nn.Module):
    """Per-token features through a residual MLP block and a LayerNorm, pooled over the tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.act = nn.Linear(6, 16), nn.Linear(16, 16), nn.ReLU()
        self.norm, self.classify = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        h = h + self.act(self.mix(h))
        return self.classify(torch.relu(self.norm(h)).mean(1))


def test_a_token_layer_before_a_residual_add_keeps_its_features_last():
    """A saliency layer whose path to the pooling passed a residual add was taken with the
    tokens as channels: Grad-CAM weights averaged over the features (1.25 of R₀'s peak off), and
    behind a LayerNorm, whose gradient sums to 0 over the features, rounding noise that moved a
    sample's map 1.6 of its peak with the batch around it."""
    torch.manual_seed(0)
    model = _ResidualTokens().double().eval()
    explainer = rsp_fast.RSP(model, layer="act", init="gradcam")
    assert explainer.plan.channels_last
    x = torch.randn(3, 7, 6, dtype=D)
    ex = explainer.explain(x)
    kept = {}
    handle = model.act.register_forward_hook(lambda m, i, out: kept.__setitem__("A", out))
    logits = model(x)
    handle.remove()
    grads = torch.autograd.grad(logits.gather(1, ex.target[:, None]).sum(), kept["A"])[0]
    cam = kept["A"] * grads.mean(1, keepdim=True)  # a weight per feature, averaged over the tokens
    assert rel_err(ex.initial, (cam / (cam.flatten(1).amax(1).view(-1, 1, 1) + 1e-9)).detach()) < 1e-12
    for i in range(3):
        alone = explainer.explain(x[i:i + 1], target=ex.target[i:i + 1])
        assert rel_err(ex.attribution[i], alone.attribution[0]) < 1e-9


class _MixedTokens(nn.Module):
    """Tokens from a conv map (``flatten(2).transpose(1, 2)``, N×T×C), per-token layers, then
    the tokens merged by ``kind`` before they are averaged: a residual add through a LayerNorm
    (MLP-Mixer's blocks), a sigmoid gate, a concatenation of sliced features, or only a norm."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.stem, self.norm6 = kind, nn.Conv2d(3, 6, 3, padding=1), nn.LayerNorm(6)
        self.lin, self.lin2, self.norm, self.fc = nn.Linear(6, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 5)
        self.fc6 = nn.Linear(6, 5)

    def tokens(self, x):
        h = F.relu(self.stem(x)).flatten(2).transpose(1, 2)
        if self.kind == "norm":
            return self.norm6(h)
        if self.kind == "norm-spelled":  # the same tokens, written otherwise
            return self.norm6(F.relu(self.stem(x)).flatten(start_dim=2, end_dim=-1).transpose(-1, -2))
        if self.kind == "norm-swapdims":
            return self.norm6(torch.swapdims(F.relu(self.stem(x)).flatten(2), 1, 2))
        h = F.gelu(self.lin(h))
        if self.kind == "residual":
            return h + self.norm(F.relu(self.lin2(h)))
        if self.kind == "gate":
            return h * torch.sigmoid(self.lin2(h))
        return torch.cat([h[:, :, :4] + F.relu(self.lin2(h))[:, :, :4], h[:, :, 4:]], 2)

    def forward(self, x):
        t = self.tokens(x)
        return (self.fc6 if self.kind.startswith("norm") else self.fc)(t.mean(1))


@pytest.mark.parametrize("kind", ["residual", "gate", "cat", "norm", "norm-spelled", "norm-swapdims"])
def test_tokens_merged_before_their_pooling_are_explained_channels_last(kind):
    """The layout walk stopped at a residual add, gate or join after a token Linear (and did not
    know a map's tokens without one): R₀ was Grad-CAM with the tokens as channels, 1.6–4.8 of
    its peak off (timm's MLP-Mixer too), and behind a LayerNorm its ΣR₀ was 0 (written with
    swapdims, still so until the transposes were listed once)."""
    torch.manual_seed(0)
    model, x = _MixedTokens(kind).double().eval(), torch.randn(2, 3, 6, 7, dtype=D)
    ex = rsp_fast.RSP(model, init="gradcam").explain(x, target=[0, 1])
    A = model.tokens(x).detach().requires_grad_()
    logits = (model.fc6 if kind.startswith("norm") else model.fc)(A.mean(1))
    grads = torch.autograd.grad(logits[[0, 1], [0, 1]].sum(), A)[0]
    cam = A * grads.mean(1, keepdim=True)  # a weight per feature, the tokens its positions
    assert ex.initial.shape == A.shape
    assert rel_err(ex.initial, (cam / (cam.flatten(1).amax(1).view(-1, 1, 1) + 1e-9)).detach()) < 1e-12


def test_a_conv_map_plus_a_linears_vector_keeps_its_channels_first():
    """h + fc(h.mean((2, 3)))[:, :, None, None] (GCNet's context added back, with a Linear): the
    map was taken as a Linear's tokens, channels last, once the layout walk crossed adds (R₀ 1.73
    of its peak off the same net with the Linear written as a 1×1 conv; their rules differ)."""
    class Context(nn.Module):
        def __init__(self, as_conv):
            super().__init__()
            self.as_conv, self.stem, self.fc, self.head = as_conv, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            pooled = h.mean((2, 3))
            if self.as_conv:
                context = F.conv2d(pooled[:, :, None, None], self.fc.weight[:, :, None, None], self.fc.bias)
            else:
                context = self.fc(pooled)[:, :, None, None]
            return self.head(F.adaptive_avg_pool2d(h + context, 1).flatten(1))
    torch.manual_seed(0)
    linear, conv = Context(False).double().eval(), Context(True).double().eval()
    conv.load_state_dict(linear.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=D)
    ours, expected = rsp_fast.RSP(linear).explain(x), rsp_fast.RSP(conv).explain(x)
    assert not rsp_fast.RSP(linear).plan.channels_last
    assert rel_err(ours.initial, expected.initial) < 1e-12


def test_timms_mlp_mixer_is_explained_with_its_tokens_as_positions():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=12)
    nn.init.normal_(model.head.weight)  # timm starts the classifier at zero
    model, x = model.double().eval(), torch.randn(2, 3, 32, 32, dtype=D)
    ex = rsp_fast.RSP(model, init="gradcam").explain(x, target=[0, 1])
    A = model.forward_features(x).detach().requires_grad_()
    grads = torch.autograd.grad(model.forward_head(A)[[0, 1], [0, 1]].sum(), A)[0]
    cam = A * grads.mean(1, keepdim=True)
    assert ex.layer == "norm" and rel_err(ex.initial, (cam / (cam.flatten(1).amax(1).view(-1, 1, 1) + 1e-9)).detach()) < 1e-12


class _ChannelsLastBlocks(nn.Module):
    """A conv stem, then two residual MLP blocks in N×H×W×C between permutes (ConvNeXt's and
    MambaOut's pattern), a conv and the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x)).permute(0, 2, 3, 1)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        x = F.relu(self.out(x.permute(0, 3, 1, 2)))
        return self.head(x.mean((2, 3)))


def _channels_last_cases():
    cases = [(_ChannelsLastBlocks, "add")]  # the first block's sum: its users are the next block's norm and sum
    try:
        import timm

        cases += [(lambda: timm.create_model("mambaout_femto"), layer) for layer in ("stages.3.downsample", "stages.2.blocks.1")]
    except ImportError:
        pass
    return cases


@pytest.mark.parametrize("make, layer", _channels_last_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_layer_between_permutes_is_explained_channels_last(make, layer):
    """A saliency layer that a permute(0, 2, 3, 1) put in N×H×W×C, chosen inside the blocks (the
    head's pooling is blocks away): R₀ takes its channels from the last dimension. It was read
    as N×C×H×W, and behind a LayerNorm (whose gradient sums to 0 over the channels) R₀ was
    rounding noise: a sample's map changed with the others in its batch (0.09 of its peak)."""
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=D)
    explainer = rsp_fast.RSP(model, layer=layer)
    assert explainer.plan.channels_last
    ex = explainer.explain(x)
    # Grad-CAM by hand (RSP_SPEC §1): one weight per channel (the last dim), the mean over (h, w)
    module, caught = dict(model.named_modules()).get(layer), {}
    if module is not None:
        hook = module.register_forward_hook(lambda m, i, o: caught.setdefault("A", o))
        logits = model(x)
        hook.remove()
    else:  # the first block's sum, as the forward makes it
        h = F.relu(model.stem(x)).permute(0, 2, 3, 1)
        caught["A"] = h + model.mlps[0](model.norms[0](h))
        y = caught["A"] + model.mlps[1](model.norms[1](caught["A"]))
        logits = model.head(F.relu(model.out(y.permute(0, 3, 1, 2))).mean((2, 3)))
    A = caught["A"]
    grad = torch.autograd.grad(logits.gather(1, ex.target[:, None]).sum(), A)[0]
    cam = A * grad.mean((1, 2), keepdim=True)  # N×H×W×C, then normalised by its peak per sample
    cam = cam / (cam.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-9)  # RSP_SPEC §1: + 1e-9
    assert rel_err(ex.cams[0], cam) < 1e-10
    alone = explainer.attribute(x[:1])
    assert rel_err(ex.attribution[:1], alone) < 1e-10  # each sample's map its own


class _Tokens(nn.Module):
    """Per-token Linear layers on N×T×F, pooled over the tokens by ``pool``, then a head; or,
    ``scores_first``, the head on each token and its scores averaged."""

    def __init__(self, pool, scores_first=False):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.pool, self.scores_first = pool, scores_first

    def forward(self, x):
        h = F.relu(self.l2(F.relu(self.l1(x))))
        return self.pool(self.head(h)) if self.scores_first else self.head(self.pool(h))


@pytest.mark.parametrize("pool", [lambda t: t.mean(1), lambda t: t.sum(1), lambda t: t.amax(1)], ids=["mean", "sum", "amax"])
def test_tokens_pooled_before_the_head_are_explained_channels_last(pool):
    """mean, sum or max over the tokens of a Linear's N×T×F output, then the head: the saliency
    map is the tokens' features, channels last (R₀ was one value for every token, features taken
    for positions; amax was refused, sum gave the pooled vector as the map)."""
    x = torch.randn(3, 7, 6, dtype=D)
    explainer = rsp_fast.RSP(_Tokens(pool).double().eval())
    assert explainer.layer == "relu_1" and explainer.plan.channels_last
    ex = explainer.explain(x, record=True)
    assert ex.initial.shape == (3, 7, 16) and not torch.allclose(ex.initial, ex.initial[:, :1].expand_as(ex.initial))
    assert torch.allclose(ex.attribution.flatten(1).sum(1), ex.initial.flatten(1).sum(1) - ex.dropped)
    if pool(torch.ones(1, 2, 1)).item() == 1:  # the mean: the head commutes with it, the same R₀ as scores averaged
        scores = rsp_fast.RSP(_Tokens(pool, scores_first=True).double().eval()).explain(x)
        assert rel_err(ex.initial, scores.initial) < 1e-12


class _LastStep(nn.Module):
    """Per-time-step features (nothing mixes the steps), the logits read from the last one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l1, self.l2, self.fc = nn.Conv1d(4, 16, 1), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        t = F.relu(self.l2(F.relu(self.l1(self.emb(x).transpose(1, 2)))))
        return self.fc(t[:, -1])


def test_one_token_read_is_not_a_pool_over_the_tokens():
    """x[:, -1] of a Linear's N×T×F output, taken for a pool over the tokens for a while (in
    review): Grad-CAM's weights spread R over every step, 94 % of it on steps the logits never
    read. Only the step read may hold relevance."""
    x = torch.rand(2, 4, 10, dtype=D)
    R = rsp_fast.RSP(_LastStep().double().eval()).attribute(x)
    assert R[..., -1].abs().sum() > 0 and R[..., :-1].abs().sum() == 0


_MEAN_OVER_TOKENS, _MAX_OVER_TOKENS = (lambda t: t.mean(1)), (lambda t: t.amax(1))


@pytest.mark.parametrize("pool,plain", [
    (lambda t: t.transpose(1, 2).mean(2), _MEAN_OVER_TOKENS), (lambda t: t.permute(0, 2, 1).mean(-1), _MEAN_OVER_TOKENS),
    (lambda t: F.adaptive_avg_pool1d(t.transpose(1, 2), 1).flatten(1), _MEAN_OVER_TOKENS),
    (lambda t: t.movedim(1, -1).amax(-1), _MAX_OVER_TOKENS), (lambda t: t.swapaxes(-1, -2).max(-1).values, _MAX_OVER_TOKENS)],
    ids=["transpose-mean", "permute-mean", "transpose-adaptive-pool", "movedim-amax", "swapaxes-max"])
def test_tokens_transposed_before_their_pooling_are_still_channels_last(pool, plain):
    """The same pooling over the tokens, written after a transpose: the layout walk stopped at
    the transpose and read the tokens as channels (3.27 of the map's peak off with Grad-CAM).
    The map's rank, known at run time, lets the walk follow it."""
    x = torch.randn(3, 7, 6, dtype=D)
    for init in ("gradcam", "comparative"):
        expected = rsp_fast.RSP(_Tokens(plain).double().eval(), layer="l2", init=init).explain(x)
        got = rsp_fast.RSP(_Tokens(pool).double().eval(), layer="l2", init=init).explain(x)
        assert rel_err(got.initial, expected.initial) < 1e-12 and rel_err(got.attribution, expected.attribution) < 1e-12


class _Signal(nn.Module):
    def __init__(self, pool, max_pool):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), *([nn.MaxPool1d(2)] if max_pool else []),
                               nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 16, 3, padding=1), nn.ReLU())
        self.fc, self.pool = nn.Linear(16, 4), pool

    def forward(self, x):
        return self.fc(self.pool(self.f(x)))


@pytest.mark.parametrize("max_pool", [False, True])
@pytest.mark.parametrize("pool", [lambda t: t.amax(-1), lambda t: t.sum(-1), lambda t: t.mean(2), lambda t: t.sum(2) / 32],
                         ids=["amax", "sum", "mean", "sum_over_length"])
def test_a_signal_cnns_global_pool_over_time_marks_the_default_layer(pool, max_pool):
    """A 1-D CNN's max or sum over time: the last conv map (amax was refused, sum gave the pooled
    vector, and behind a max pool the map before it was taken, two convs short)."""
    explainer = rsp_fast.RSP(_Signal(pool, max_pool).double().eval())
    assert explainer.layer == "f"
    x = torch.randn(3, 2, 32, dtype=D)
    assert explainer.explain(x).initial.shape == (3, 16, 16 if max_pool else 32)


def test_layer_as_module_and_result_properties():
    model = torchvision.models.vgg11(num_classes=5).eval()
    explainer = rsp_fast.RSP(model, layer=model.features[15])
    assert explainer.layer == "features.15"
    x = torch.randn(2, 3, 32, 32)
    R = explainer.attribute(x)
    assert R.shape == x.shape and R.dtype == torch.float32
    assert rsp_fast.heatmap(R).shape == (2, 32, 32)


def test_model_is_left_untouched():
    model = torchvision.models.resnet18(num_classes=5).double()
    model.train()
    model.layer2.eval()  # a mixed mode must come back as it was
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with pytest.warns(UserWarning, match="hooks registered on the model itself .* do not run"):
        explainer = rsp_fast.RSP(model)
    ex = explainer.explain(x)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(p.grad is None for p in model.parameters())
    assert calls == []  # traced graph, not the model's hooks
    model.eval()
    expected = model(x)
    assert torch.allclose(ex.logits, expected)  # explained in eval mode


class _FunctionalDropout(nn.Module):
    """Dropout written as a function of ``self.training``: fx writes the mode into the graph."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = F.dropout(F.relu(self.conv1(x)), 0.5, self.training)
        return self.fc(F.relu(self.conv2(y)).mean((2, 3)))


@pytest.mark.parametrize("make", [_FunctionalDropout, lambda: torchvision.models.efficientnet_b0(num_classes=5)],
                         ids=["functional_dropout", "stochastic_depth"])
def test_explainer_built_in_training_mode_explains_the_eval_model(make):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    expected = rsp_fast.RSP(model.eval()).explain(x)
    explainer = rsp_fast.RSP(model.train())  # traced while training: the graph must still be the eval one
    for _ in range(2):  # dropout would draw new masks on every call
        ex = explainer.explain(x)
        assert torch.allclose(ex.logits, expected.logits, rtol=0, atol=1e-12)
        assert rel_err(ex.attribution, expected.attribution) < 1e-12
    assert model.training


def test_a_training_model_is_left_as_its_own_train_sets_it():
    """A model whose train(mode) sets more than the flags (a cache it keeps in eval mode): the
    call's model.eval() switched the cache on and restoring only the flags left it on."""
    class Cached(nn.Sequential):
        def train(self, mode=True):
            self.use_cache = not mode
            return super().train(mode)
    model = Cached(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).train()
    model[1].eval()  # and a module the user set apart keeps its own mode
    rsp_fast.RSP(model).attribute(torch.randn(2, 3, 8, 8))
    assert model.training and not model.use_cache and not model[1].training and model[0].training


def test_explainers_copy_and_pickle_with_their_own_model():
    """copy.deepcopy and pickle raised a bare TypeError on the explainer's thread lock (also
    for any module holding an explainer): a copy now explains its own copy of the model."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    explainer = rsp_fast.RSP(model, layer="1")
    expected = explainer.attribute(x)
    for copied in (copy.deepcopy(explainer), pickle.loads(pickle.dumps(explainer))):
        assert copied.model is not model and copied.layer == "1"
        assert torch.equal(copied.attribute(x), expected)
        with torch.no_grad():
            copied.model[0].weight.neg_()  # the copy's model, not the original's
        assert not torch.allclose(copied.attribute(x), expected) and torch.equal(explainer.attribute(x), expected)
    static = copy.deepcopy(explainer.static(x))
    assert torch.equal(static(x), expected)


def test_record_keeps_every_call_of_a_module_run_twice():
    model = torchvision.models.resnet18(num_classes=5).double().eval()  # each block runs its `relu` twice
    explainer = rsp_fast.RSP(model)
    ex = explainer.explain(torch.randn(1, 3, 32, 32, dtype=D), record=True)
    assert len(ex.steps) == len(explainer.plan.steps)
    first, second = ex.steps["layer1.0.relu"], ex.steps["layer1.0.relu:2"]  # forward order; R at each call's input
    assert torch.equal(first, ex.steps["layer1.0.conv2"])  # a ReLU passes R through: the same as after it
    assert first.shape == second.shape and not torch.equal(first, second)


def _bias_free_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4, bias=False)).eval()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_forward_that_overflows_or_nan_weights_are_named_not_explained(backend):
    model = _bias_free_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    x = torch.rand(3, 3, 8, 8)
    x[1] *= 1e37  # finite inputs; the forward of sample 1 overflows float32
    with pytest.raises(RSPError, match=r"model's output is not finite \(NaN or Inf\) for sample\(s\) 1: its forward overflows float32"):
        rsp_fast.RSP(model, backend=backend).explain(x)
    with pytest.raises(RSPError, match=r"for sample\(s\) 1:"):  # chunks: the batch's own sample numbers
        rsp_fast.RSP(model, backend=backend, max_batch=1).explain(x)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RSPError, match=r"sample\(s\) 0, 1, 2: .* its weights hold NaN"):
        rsp_fast.RSP(model, backend=backend).attribute(x / 1e37)


class _MaskedClasses(nn.Module):
    def __init__(self, live=3):
        super().__init__()
        self.net, self.live = _bias_free_cnn(), live

    def forward(self, x):
        logits = self.net(x)
        return logits.masked_fill(torch.arange(4) >= self.live, float("-inf"))  # classes masked out


def test_a_small_initial_relevance_is_explained_as_its_scaled_up_copy():
    """The rules are linear in R: a map of c·R₀ is c times the map of R₀. In float32 an initial
    relevance of 2⁻¹⁰⁰ underflowed in the products (0.08 of the peak off; at 2⁻¹²⁰ the map was
    all zero). Relevance runs at a peak of about 1 now: a power of two, exact."""
    torch.manual_seed(0)
    explainer = rsp_fast.RSP(torchvision.models.mobilenet_v2(num_classes=10).eval())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    R0 = explainer.explain(x).initial
    expected = explainer.explain(x, initial=R0, record=True)
    c = 2.0 ** -100
    small = explainer.explain(x, initial=R0 * c, record=True)
    assert torch.equal(small.attribution / c, expected.attribution)
    assert torch.equal(small.dropped / c, expected.dropped) and small.steps.keys() == expected.steps.keys()
    assert all(rel_err(small.steps[k] / c, v) < 1e-9 for k, v in expected.steps.items())  # under c·1e-45 they are 0


def test_an_initial_relevance_near_the_top_of_float32_is_explained_as_its_scaled_down_copy():
    """At a peak of 2¹²⁷ the power of two above it, 2¹²⁸, is inf in float32: the map was all
    NaN and blamed on the activations. The scale stops at the largest power the dtype holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    explainer, x = rsp_fast.RSP(model, layer="2"), torch.randn(2, 3, 16, 16)
    R0 = explainer.explain(x).initial
    unit = R0 / R0.abs().amax()
    expected = explainer.attribute(x, initial=unit)
    assert rel_err(explainer.attribute(x, initial=unit * 2.0 ** 127) / 2.0 ** 127, expected) < 1e-6


@pytest.mark.parametrize("dtype,weight", [(torch.float32, 3e38), (torch.float16, 6e4)])
def test_a_head_that_overflows_is_an_error_though_the_map_is_finite(dtype, weight):
    """A Linear head past the dtype's range gives ±inf and NaN logits but finite gradients: the
    map was finite and returned, its target an argmax over NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    with torch.no_grad():
        model[-1].weight.copy_(torch.sign(model[-1].weight) * weight)
    model, x = model.to(dtype), (100 * torch.rand(2, 3, 8, 8)).to(dtype)
    assert not torch.isfinite(model(x)).all()
    name = str(dtype).removeprefix("torch.")
    for backend, status in rsp_fast.backends("cpu").items():
        if status == "available":
            with pytest.raises(RSPError, match=rf"output is not finite \(NaN or Inf\) for sample\(s\) 0, 1: .*overflows {name}"):
                rsp_fast.RSP(model, backend=backend).explain(x)


def test_logits_of_minus_inf_for_masked_classes_are_not_refused():
    ex = rsp_fast.RSP(_MaskedClasses().eval()).explain(torch.rand(3, 3, 8, 8), record=True)
    assert torch.isfinite(ex.attribution).all() and (ex.target != 3).all()
    assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, ex.initial.flatten(1).sum(1), rtol=1e-5)


def test_classes_masked_out_are_no_hostile_evidence():
    """With fewer live classes than hostile_k, the top-k took masked (−inf) classes, and with one
    live class the target itself: each counted in K, R₀ 0.27 of its peak off the live hostile's."""
    x = torch.rand(3, 3, 8, 8, dtype=D)
    two = rsp_fast.RSP(_MaskedClasses(live=2).double().eval(), hostile_k=3)
    ex = two.explain(x)
    assert (ex.hostile != ex.target[:, None]).all()
    expected = two.explain(x, target=ex.target, hostile=(1 - ex.target)[:, None])  # the other live class alone
    assert rel_err(ex.initial, expected.initial) < 1e-12 and rel_err(ex.attribution, expected.attribution) < 1e-12
    one = _MaskedClasses(live=1).double().eval()
    ex = rsp_fast.RSP(one, hostile_k=3).explain(x)
    assert (ex.hostile != ex.target[:, None]).all()
    assert rel_err(ex.attribution, rsp_fast.RSP(one, init="gradcam").attribute(x)) < 1e-12  # none left: Grad-CAM's


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_relevance_beyond_the_dtype_range_is_an_error_not_a_nan_map(backend):
    """Where one sample's activations span 20 orders of magnitude (half the picture ×1e-20) and
    relevance lies over the small half, float32 responses underflow: R/Ga is Inf, then NaN."""
    model = _bias_free_cnn()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=D)
    x[1, :, 8:] *= 1e-20
    R0 = torch.zeros(2, 8, 16, 16, dtype=D)
    R0[:, :, 12:] = 1.0
    R0[:, 0, 13, 3] = -2.0
    fine = rsp_fast.RSP(model.double(), layer="5", backend=backend).explain(x, initial=R0, record=True)
    assert torch.isfinite(fine.attribution).all()  # float64 holds it, and conserves ΣR₀
    assert torch.allclose(fine.attribution.flatten(1).sum(1) + fine.dropped, R0.flatten(1).sum(1), rtol=1e-9)
    explainer = rsp_fast.RSP(model.float(), layer="5", backend=backend)
    with pytest.raises(RSPError, match=r"attribution of sample\(s\) 1 is not finite .*explain in float64"):
        explainer.explain(x.float(), initial=R0.float())
    with pytest.raises(RSPError, match=r"sample\(s\) 1 is not finite \(NaN or Inf\) \(first at '[024]'\)"):
        explainer.explain(x.float(), initial=R0.float(), record=True)
    assert torch.isfinite(explainer.attribute(x[:1].float(), initial=R0[:1].float())).all()  # sample 0 alone is fine


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_callers_autocast_does_not_change_the_explanation(backend):
    """Under torch.autocast('cpu', bfloat16) the rules' products ran in bf16 (the map moved by
    6e-3 of its peak, as much as precision='bf16'): precision= chooses, autocast is off inside."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    explainer, x = rsp_fast.RSP(model, backend=backend), torch.randn(3, 3, 16, 16)
    plain = explainer.explain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = explainer.explain(x)
        assert model(x).dtype == torch.bfloat16  # the caller's own forward still autocasts
    assert inside.attribution.dtype == torch.float32
    assert torch.equal(inside.attribution, plain.attribution) and torch.equal(inside.logits, plain.logits)


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile, lambda m: nn.DataParallel(torch.compile(m))],
                         ids=["DataParallel", "compile", "both"])
def test_hooks_on_a_wrapper_are_warned_about_like_hooks_on_the_model(wrap):
    model = tiny_cnn().double().eval()
    wrapper = wrap(model)
    wrapper.register_forward_hook(lambda module, args, out: -out)  # changes what wrapper(x) predicts
    with pytest.warns(UserWarning, match=r"hooks registered on the model itself \((DataParallel|OptimizedModule)\)"):
        rsp_fast.RSP(wrapper)


def test_an_explainer_follows_submodules_replaced_after_it_was_built():
    """The forward runs the model's modules by path; the rules held the ones traced: a new first
    conv or BatchNorm set afterwards was run but not explained (0.46 of the map's peak apart)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    explainer, x = rsp_fast.RSP(model), torch.randn(2, 3, 12, 12, dtype=D)
    explainer.attribute(x)
    replacements = [("0", nn.Conv2d(3, 8, 3, padding=1)), ("1", nn.BatchNorm2d(8)),
                    ("3", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))]  # a parent of traced modules
    for name, new in replacements:
        with torch.no_grad():
            for p in new.parameters():
                p.uniform_(-1, 1)
        setattr(model, name, new.double().eval())
        fresh = rsp_fast.RSP(model).explain(x)
        ours = explainer.explain(x)
        assert torch.equal(ours.logits, fresh.logits)
        assert rel_err(ours.attribution, fresh.attribution) < 1e-12, name


class _Gate(nn.Module):
    def forward(self, x):
        return F.relu(x)


class _InheritedGate(_Gate):
    """A module whose forward is its parent class's."""


def test_an_explainer_follows_a_forward_patched_on_a_parent_class(monkeypatch):
    """The class's forward is looked up along its MRO (as inspect.getattr_static does, faster)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _InheritedGate(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    explainer, x = rsp_fast.RSP(model), torch.randn(2, 3, 12, 12, dtype=D)
    explainer.attribute(x)
    monkeypatch.setattr(_Gate, "forward", lambda self, x: F.relu(x) * 3 - 0.5)
    ours, fresh = explainer.explain(x), rsp_fast.RSP(model).explain(x)
    assert rel_err(ours.logits, model(x)) < 1e-12
    assert rel_err(ours.attribution, fresh.attribution) < 1e-12


def test_a_call_walks_the_model_for_changes_once_before_its_pass(monkeypatch):
    """Whether the model changed is checked over every module (1.3 ms on EfficientNet-B0): once
    before the pass, and once after it (what the forward wrote onto its modules). It was also
    checked a second time before the pass."""
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    checks = []
    is_current = Plan.is_current
    monkeypatch.setattr(Plan, "is_current", lambda self: checks.append(1) or is_current(self))
    explainer.attribute(x)
    assert len(checks) == 2
    model[2].alpha = -1.0  # and a change is still seen
    ours, fresh = explainer.explain(x), rsp_fast.RSP(model).explain(x)
    assert rel_err(ours.attribution, fresh.attribution) < 1e-12


def test_a_module_replaced_during_a_chunked_call_is_followed(monkeypatch):
    """A change between two chunks of a call (another thread's) was missed by the later chunks,
    and the stale plan was then kept for good (the pass took the change for what it wrote)."""
    torch.manual_seed(5)
    model, x = _skip_net(), torch.randn(4, 3, 12, 12, dtype=D)
    explainer = rsp_fast.RSP(model, max_batch=2)
    explainer.attribute(x)
    explain_checked, calls = api.RSP._explain_checked, []

    def replaced_after_the_first_chunk(self, *args, **kwargs):
        out = explain_checked(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            model[4] = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2), nn.ReLU()).double().eval()
        return out
    monkeypatch.setattr(api.RSP, "_explain_checked", replaced_after_the_first_chunk)
    during = explainer.attribute(x)
    monkeypatch.undo()
    fresh = rsp_fast.RSP(model).attribute(x)
    assert rel_err(during[2:], fresh[2:]) < 1e-12  # the second chunk ran the new plan
    assert rel_err(explainer.attribute(x), fresh) < 1e-12
    # replaced while a pass ran: not taken for what the pass wrote onto its modules
    keep = Plan.keep_what_the_pass_wrote

    def replaced_during_the_pass(plan, module):
        model[4] = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()).double().eval()
        keep(plan, module)
    monkeypatch.setattr(Plan, "keep_what_the_pass_wrote", replaced_during_the_pass)
    explainer.attribute(x[:2])
    monkeypatch.undo()
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(model).attribute(x)) < 1e-12


def test_running_statistics_dropped_after_the_explainer_was_built_are_refused_as_by_a_new_one():
    """A BatchNorm without running statistics normalises by the batch's, also in eval mode: the
    plan traced with them stayed current and mixed the samples (5.7e-2 of the peak)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    explainer, x = rsp_fast.RSP(model), torch.randn(3, 3, 8, 8)
    explainer.attribute(x)
    model[1].running_mean = model[1].running_var = None
    for fresh in (False, True):
        with pytest.raises(UnsupportedModelError, match="normalises by the batch's own mean"):
            (rsp_fast.RSP(model) if fresh else explainer).attribute(x)


class _Doubled(nn.Module):
    """A module without submodules that fx traces through."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.relu(x) * self.factor


def test_an_explainer_follows_modules_traced_through_and_a_wrappers_module_replaced():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Doubled(2.0), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    x = torch.randn(2, 3, 10, 10, dtype=D)
    wrapper = nn.DataParallel(model)
    explainer = rsp_fast.RSP(wrapper, layer="module.3")
    explainer.attribute(x)
    model[1] = nn.Hardtanh(-1.0, 1.0)  # traced through before: no module node held it
    model[2] = nn.Conv2d(8, 8, 3, padding=1).double()  # a copy-padding conv, traced into F.pad and F.conv2d
    expected = rsp_fast.RSP(model, layer="3").attribute(x)
    assert rel_err(explainer.attribute(x), expected) < 1e-12
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(-1)
    wrapper.module = other  # the wrapper now runs another model
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(other, layer="3").attribute(x)) < 1e-12


class _Skip(nn.Module):
    """A block fx traces through whose forward reads plain attributes: a scale and a flag."""

    def __init__(self):
        super().__init__()
        self.conv, self.alpha, self.use_skip = nn.Conv2d(8, 8, 3, padding=1), 1.0, True

    def forward(self, x):
        y = F.relu(self.conv(x))
        return (y + self.alpha * x if self.use_skip else y) * getattr(self, "gain", 1.0)


def _skip_net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Skip(), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()


def _halve(module, args, out):
    return out * 0.5


_CHANGES = {  # what the traced graph held besides tensors, changed after the explainer was built
    "attribute": lambda m: setattr(m[2], "alpha", -3.0),
    "flag": lambda m: setattr(m[2], "use_skip", False),
    "attribute_added": lambda m: setattr(m[2], "gain", -2.0),  # read with a default: the plan missed it
    "padding_mode": lambda m: setattr(m[4][0], "padding_mode", "reflect"),
    "first_padding_mode": lambda m: setattr(m[0], "padding_mode", "replicate"),
    "hook_on_a_block": lambda m: m[2].register_forward_hook(_halve),
    "forward_on_the_instance": lambda m: setattr(m[2], "forward", lambda x: F.relu(m[2].conv(x))),
    "appended_module": lambda m: m[4].append(nn.Conv2d(8, 8, 1).double()),
    "appended_head": lambda m: m.append(nn.Linear(5, 4).double()),
}


@pytest.mark.parametrize("change", _CHANGES)
def test_an_explainer_follows_attributes_hooks_and_modules_changed_after_it_was_built(change):
    """fx writes plain attributes, hooks on modules it traces through, and the module tree into the
    graph: each changed afterwards was ignored (the explainer's logits were not model(x): 0.07-2.0
    apart, its maps 0.14-1.1 from a new explainer's)."""
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    explainer = rsp_fast.RSP(model, init="gradcam")
    explainer.attribute(x)
    _CHANGES[change](model)
    ours, fresh = explainer.explain(x), rsp_fast.RSP(model, init="gradcam").explain(x)
    assert rel_err(ours.logits, model(x)) < 1e-12
    assert rel_err(ours.attribution, fresh.attribution) < 1e-12


class _Masked(nn.Module):
    """conv, ReLU, conv, ReLU, pool, Linear, ReLU, Linear; ``where`` masks the input of one layer
    (half its channels or features zeroed), in the forward or by a forward pre-hook on the layer."""

    def __init__(self, where, by_hook, keyword=False):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.where, self.by_hook, self.keyword = where, by_hook, keyword
        if by_hook and keyword:  # the layer called as layer(input=h), its hook given the keywords
            getattr(self, where).register_forward_pre_hook(
                lambda m, args, kwargs: (args, {**kwargs, "input": self.mask(kwargs["input"])}), with_kwargs=True)
        elif by_hook:
            getattr(self, where).register_forward_pre_hook(lambda m, args: (self.mask(args[0]),))

    def mask(self, x):
        keep = torch.arange(x.shape[1]) % 2 == 0
        return x * keep.to(x.dtype).reshape(-1, *[1] * (x.dim() - 2))

    def _in(self, name, x):
        return self.mask(x) if self.where == name and not self.by_hook else x

    def _call(self, name, x):
        layer = getattr(self, name)
        return layer(input=self._in(name, x)) if self.keyword and name == self.where else layer(self._in(name, x))

    def forward(self, x):
        h = F.relu(self._call("c2", F.relu(self._call("c1", x))))
        return self.l2(F.relu(self._call("l1", h.mean((2, 3)))))


@pytest.mark.parametrize("where,layer,keyword", [("c1", None, False), ("c2", None, False), ("l1", "l1", False),
                                                 ("c2", None, True), ("l1", "l1", True)])
def test_a_forward_pre_hook_changing_a_layers_input_is_explained_as_if_written_in_the_forward(where, layer, keyword):
    """The layer's rule read its input node's value, not what the pre-hook gave the layer: relevance
    went to channels the layer never saw (0.19 of the peak off for a first conv, 0.21 for an inner
    one, 0.27 for a Linear; a layer called with a keyword, ``c2(input=h)``, its hook taking keywords:
    0.42 after the fix for positional calls)."""
    hooked, written = _Masked(where, True, keyword).double().eval(), _Masked(where, False, keyword).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert rel_err(hooked(x), written(x)) == 0
    hooks = dict(getattr(hooked, where)._forward_pre_hooks)
    ours = rsp_fast.RSP(hooked, layer=layer).explain(x)
    expected = rsp_fast.RSP(written, layer=layer).explain(x)
    assert rel_err(ours.logits, expected.logits) == 0
    assert rel_err(ours.attribution, expected.attribution) < 1e-12
    assert dict(getattr(hooked, where)._forward_pre_hooks) == hooks  # the model's hooks as they were


def test_a_forward_pre_hook_on_a_first_conv_behind_a_zero_padding_is_followed_too():
    """A first conv reading a ZeroPad2d takes the picture from before the pad (the zeros are no
    pixels): it read the pad's input, not what the pre-hook gave the conv (0.43 of the peak off)."""
    torch.manual_seed(4)
    hooked = nn.Sequential(nn.ZeroPad2d(2), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    written = nn.Sequential(_ChannelMask(), *copy.deepcopy(hooked)).eval()
    hooked[1].register_forward_pre_hook(lambda m, args: (_ChannelMask()(args[0]),))
    x = torch.rand(2, 3, 8, 8, dtype=D)
    assert rel_err(hooked(x), written(x)) == 0
    ours = rsp_fast.RSP(hooked, layer="4", init="gradcam").attribute(x)
    assert rel_err(ours, rsp_fast.RSP(written, layer="5", init="gradcam").attribute(x)) < 1e-12


class _ChannelMask(nn.Module):
    def forward(self, x):
        return x * (torch.arange(x.shape[1]) != 1).to(x.dtype).reshape(-1, 1, 1)


def test_a_forward_pre_hook_that_changes_the_inputs_shape_is_a_clear_error():
    """A raw RuntimeError from deep inside a rule ("shape ... is invalid for input of size")."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    model[2].register_forward_pre_hook(lambda m, args: (F.pad(args[0], (1, 1, 1, 1)),))
    with pytest.raises(RSPError, match=r"a forward pre-hook on 2 changes the shape of its input \(\(2, 8, 6, 6\) -> ") as err:
        rsp_fast.RSP(model, layer="3").attribute(torch.rand(2, 3, 8, 8))
    assert "While executing" not in str(err.value)  # fx's note on the node it ran


def test_what_a_call_or_a_forward_writes_onto_modules_traces_nothing_anew():
    """A hook keeping a statistic, a forward recording its input's shape (a torch.Size, equal but
    not the same object each time), a shape-branching forward writing a size, a forward set on a
    leaf's instance: none changes what the graph computes, and none may make the plan look stale
    (each had traced at every call)."""
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    model[0].register_forward_hook(lambda module, args, out: setattr(module, "mean", float(out.detach().mean())))
    model[1].forward = lambda t: torch.relu(t)  # on a leaf's instance: it was traced anew at every call
    model[2].register_forward_hook(lambda module, args, out: setattr(module, "shape", out.shape))
    model(x)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    plan = explainer.plan
    model(torch.randn(2, 3, 12, 12, dtype=D))
    explainer.attribute(torch.randn(2, 3, 12, 12, dtype=D))
    assert explainer.plan is plan

    class Widths(_MadeInForward):  # traced per input shape
        def forward(self, x):
            self.width = x.shape[-1]
            return super().forward(x)
    model, plans = Widths(True).eval(), []
    explainer = rsp_fast.RSP(model)
    for size in (8, 10, 8, 10):
        explainer.attribute(torch.randn(1, 3, size, size))
        plans.append(explainer._plans[((1, 3, size, size), torch.float32, torch.device("cpu"))])
    assert plans[0] is plans[2] and plans[1] is plans[3]
    assert "width" not in model.__dict__  # the trace wrote it; put back


def test_changes_inside_an_attributes_dict_or_nested_tuple_are_followed():
    class Configured(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
            self.config, self.pads = {"scale": 1.0}, ((1, 1), (1, 1))

        def forward(self, x):
            x = F.pad(x, [*self.pads[0], *self.pads[1]])
            return self.fc(F.relu(self.conv(x) * self.config["scale"]).mean((2, 3)))
    torch.manual_seed(0)
    model, x = Configured().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    explainer.attribute(x)
    model.config["scale"] = -2.0
    assert rel_err(explainer.explain(x).logits, model(x)) < 1e-12
    model.pads = ((0, 2), (2, 0))
    assert rel_err(explainer.explain(x).logits, model(x)) < 1e-12


def test_a_forward_set_on_the_model_instance_is_the_one_explained():
    """fx traces the class's forward: one set on the instance (and its model's hooks) was ignored."""
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    model.forward = lambda t: nn.Sequential.forward(model, t) * 2
    assert rel_err(rsp_fast.RSP(model, init="gradcam").explain(x).logits, model(x)) < 1e-12


def test_a_graph_modules_own_constants_are_read_as_they_are_now():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net(x + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
    graph_module = torch.fx.symbolic_trace(Shifted().eval())
    x = torch.rand(2, 3, 16, 16)
    explainer = rsp_fast.RSP(graph_module)
    explainer.attribute(x)
    graph_module._tensor_constant0 = torch.tensor([-3.0, 0.0, 5.0]).view(1, 3, 1, 1)
    assert torch.allclose(explainer.explain(x).logits, graph_module(x))


def test_a_hook_removed_after_the_explainer_was_built_no_longer_runs():
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    handle = model[2].register_forward_hook(_halve)
    explainer = rsp_fast.RSP(model, init="gradcam")
    explainer.attribute(x)
    handle.remove()
    assert rel_err(explainer.explain(x).logits, model(x)) < 1e-12


def test_hooks_on_a_max_pool_run_in_the_explained_forward():
    """The max pool ran as F.max_pool2d with its indices, skipping the module's hooks: the
    logits were not model(x) (0.52 apart with a hook scaling channels)."""
    model, x = _skip_net(), torch.randn(2, 3, 12, 12, dtype=D)
    scale = torch.linspace(-1.0, 2.0, 8, dtype=D).view(1, 8, 1, 1)
    model[3].register_forward_hook(lambda module, args, out: out * scale)
    assert rel_err(rsp_fast.RSP(model).explain(x).logits, model(x)) < 1e-12


def test_tracing_leaves_no_proxy_on_the_model():
    """prune's forward pre-hook sets ``weight`` on a module fx traces through (a reflect-padding
    conv): the trace left an fx Proxy there, which broke the model until its next forward."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    model(torch.randn(1, 3, 8, 8, dtype=D))
    rsp_fast.RSP(model)
    assert isinstance(model[0].weight, torch.Tensor)
    torch.save(model, io.BytesIO())  # a Proxy cannot be pickled


def test_a_conv_traced_through_is_named_by_its_module_path():
    """A conv with padding_mode 'reflect' or 'circular' is traced into F.pad and F.conv2d: its
    step and its cost row were named "conv2d_1", not by the module path users know."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), nn.ReLU()),
                          nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).double().eval()
    steps = rsp_fast.RSP(model, layer="0").explain(torch.randn(1, 3, 8, 8, dtype=D), record=True).steps
    assert {"0.0", "0.2"} <= set(steps) and not {"conv2d", "conv2d_1"} & set(steps)
    assert [row["layer"] for row in rsp_fast.cost(model, (3, 8, 8), layer="0")["layers"]] == ["0.0", "0.2"]


class _MadeInForward(nn.Module):
    """A forward that makes a tensor from nothing (fx keeps it as a constant) and, with ``check``,
    branches on a size (traced per input shape, with an example)."""

    def __init__(self, check):
        super().__init__()
        self.check, self.conv, self.fc = check, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.scale = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        if self.check and x.dim() != 4:
            raise ValueError("4-D input expected")
        x = x * self.scale * torch.ones(1, 3, 1, 1)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_tensors_a_forward_makes_are_explained_and_left_off_the_model():
    """fx stored each trace's constants on the model (_tensor_constantN, one more per explainer:
    unbounded in a service that builds one per request), and a forward traced per input shape
    could not read them or a plain tensor attribute (KeyError, reported as untraceable)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    plain, branching = _MadeInForward(False).eval(), _MadeInForward(True).eval()
    branching.load_state_dict(plain.state_dict())
    attributes = set(plain.__dict__)
    maps = [rsp_fast.RSP(plain).attribute(x) for _ in range(3)]
    assert set(plain.__dict__) == attributes
    assert rel_err(rsp_fast.RSP(branching).attribute(x), maps[0]) < 1e-6
    assert not [k for k in branching.__dict__ if k.startswith("_tensor_constant")]


def _out_of_memory(module, args, out):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_running_out_of_memory_in_the_forward_is_not_called_a_bad_input():
    """It came back as RSPError (a ValueError, 'the model's forward failed'), which a service
    retrying with a smaller max_batch does not catch."""
    model = tiny_cnn().eval()
    model[2].register_forward_hook(_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        rsp_fast.RSP(model).attribute(torch.randn(1, 3, 16, 16))


class _Concatenated(nn.Module):
    """Two branches concatenated by a function: the default layer is that function's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1).mean((2, 3)))


@pytest.mark.parametrize("negative", [False, True])
def test_a_saliency_layer_is_explained_without_the_batchnorm_after_it(negative):
    """R₀ is the saliency layer's own output: a BatchNorm after it lies in the head. Its scale
    was folded into the layer's weights all the same, which moved the map where a scale is
    negative (ResNet18's conv1: 0.10 of the peak; a Linear then BatchNorm1d: 0.86)."""
    import copy
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    mlp = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double().eval()
    with torch.no_grad():
        for bn in (model.bn1, mlp[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.weight[::2] *= -1 if negative else 1
    for net, layer, x in ((model, "conv1", torch.randn(2, 3, 32, 32, dtype=D)), (mlp, "0", torch.randn(2, 10, dtype=D))):
        R0 = rsp_fast.RSP(net, layer=layer).explain(x).initial
        without = copy.deepcopy(net)
        setattr(without, "bn1", nn.Identity()) if net is model else without.__setitem__(1, nn.Identity())
        expected = rsp_fast.RSP(without, layer=layer).attribute(x, initial=R0)
        assert rel_err(rsp_fast.RSP(net, layer=layer).attribute(x, initial=R0), expected) < 1e-12


class _SizeCheckedBlock(nn.Module):
    """A block whose forward checks its input's size (as timm VGG's ConvMlp head does): fx keeps
    it whole when tracing without an input."""

    def __init__(self, check: bool):
        super().__init__()
        self.check, self.conv, self.act = check, nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()

    def forward(self, x):
        if self.check and x.shape[-1] < 3:
            raise ValueError("input too small")
        return self.act(self.conv(x))


def test_a_layer_inside_a_block_traced_only_with_an_input_is_explained():
    """It was refused as "part of 'block', which RSP runs as one layer", though RSP explains the
    block op by op from a trace with the input."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _SizeCheckedBlock(check), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(6, 3)).double().eval() for check in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=D)
    for layer in ("2.conv", "2.act"):
        assert rel_err(rsp_fast.RSP(models[0], layer=layer).attribute(x), rsp_fast.RSP(models[1], layer=layer).attribute(x)) < 1e-12


def test_a_module_called_twice_is_chosen_by_its_call():
    """A block's shared ReLU: its name stands for its last call, "name:1" for its first (it was
    refused as "not a module"), "name:3" says how often it is called."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    first = rsp_fast.RSP(model, layer="layer1.0.relu:1").explain(x, record=True)
    assert first.layer == "layer1.0.relu:1" and "layer1.0.conv1" in first.steps and "layer1.0.conv2" not in first.steps
    last = rsp_fast.RSP(model, layer="layer1.0.relu:2").attribute(x)
    assert torch.equal(last, rsp_fast.RSP(model, layer="layer1.0.relu").attribute(x))
    with pytest.raises(RSPError, match=r"'layer1.0.relu' is called 2 time\(s\)"):
        rsp_fast.RSP(model, layer="layer1.0.relu:3")


def test_a_layer_by_its_second_name_and_the_whole_model_as_layer():
    """A module held under two names was refused by the second ("not a module"); the model
    itself as layer was said to be "never called"."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 3)
            self.features_out = self.act

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))
    model = Aliased().eval()
    assert rsp_fast.RSP(model, layer="features_out").layer == "act"
    for whole in ("", model):
        with pytest.raises(RSPError, match="is the whole model, whose output is the logits"):
            rsp_fast.RSP(model, layer=whole)


def test_a_function_outputs_name_reported_as_the_default_layer_can_be_given_back():
    """A module ``relu`` the forward never calls (it uses F.relu, whose graph node is also named
    ``relu``): the default layer is F.relu's output, reported as "relu", and that name must work
    as layer=; the module object itself, never called, is refused. A call number written "01" is
    the first call (it was refused as a second call)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))
    model, x = Net().eval(), torch.rand(2, 3, 8, 8)
    default = rsp_fast.RSP(model)
    assert default.layer == "relu"
    assert torch.equal(rsp_fast.RSP(model, layer=default.layer).attribute(x), default.attribute(x))
    with pytest.raises(RSPError, match="'relu' is never called"):
        rsp_fast.RSP(model, layer=model.relu)
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    assert rsp_fast.RSP(resnet, layer="layer1.0.relu:01").layer == "layer1.0.relu:1"


class _PooledBranches(nn.Module):
    """Pooled maps concatenated before the classifier: of three conv branches over a signal
    (Kim's CNN for text), or of one map pooled at three scales (spatial pyramid pooling)."""

    def __init__(self, shared: bool):
        super().__init__()
        self.shared = shared
        self.convs = nn.ModuleList(nn.Conv1d(4, 6, k, padding=k // 2) for k in ((3,) if shared else (3, 4, 5)))
        self.fc = nn.Linear(6 * (1 + 2 + 4) if shared else 18, 3)
        self.over_time = lambda h: F.adaptive_max_pool1d(h, 1).squeeze(-1)

    def forward(self, x):
        if self.shared:
            h = torch.relu(self.convs[0](x))
            pooled = [F.adaptive_max_pool1d(h, n).flatten(1) for n in (1, 2, 4)]
        else:
            pooled = [self.over_time(torch.relu(conv(x))) for conv in self.convs]
        return self.fc(torch.cat(pooled, 1))


def test_the_default_layer_of_pooled_branches_is_where_they_join():
    """The default layer was the first branch's map: the others got no relevance, though each
    moves the logits. Several pools of one map still start from that map. The max over time
    written as amax, max(d).values, max(x, d)[0] or ``values, _ = h.max(d)`` is that max pooling
    (they were refused)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, dtype=D)
    model = _PooledBranches(shared=False).double().eval()
    branches = rsp_fast.RSP(model)
    assert branches.layer == "cat"
    ex = branches.explain(x, record=True)
    assert {"convs.0", "convs.1", "convs.2"} <= set(ex.steps)
    assert rsp_fast.RSP(_PooledBranches(shared=True).double().eval()).layer == "relu"
    def unpacked(h):  # the indices picked into a name nothing reads: it was refused
        values, _ = h.max(2)
        return values
    for spelling in (lambda h: h.amax(2), lambda h: h.max(dim=2).values, lambda h: torch.max(h, 2)[0], unpacked):
        model.over_time = spelling
        assert rel_err(rsp_fast.RSP(model).attribute(x), ex.attribution) < 1e-12


def test_branches_whose_own_logits_are_summed_start_from_a_map_not_from_the_logits():
    """Late fusion (each branch's Linear, their logits added): the join of the branches was
    taken for the default layer, R₀ then the logits themselves (N×classes), where the
    comparative init put +2 on a hostile class. A join is the default only of pooled maps."""
    class LateFusion(_PooledBranches):
        def __init__(self):
            super().__init__(shared=False)
            self.fcs = nn.ModuleList(nn.Linear(6, 3) for _ in self.convs)

        def forward(self, x):
            logits = [fc(self.over_time(torch.relu(conv(x)))) for fc, conv in zip(self.fcs, self.convs)]
            return logits[0] + logits[1] + logits[2]
    torch.manual_seed(0)
    explainer = rsp_fast.RSP(LateFusion().double().eval())
    assert explainer.layer == "relu"
    assert explainer.explain(torch.randn(2, 4, 16, dtype=D)).initial.shape == (2, 6, 16)


def test_two_streams_embedded_then_joined_before_the_classifier_start_from_the_join():
    """Each stream pooled and embedded by its own Linear, the embeddings joined, then the
    classifier: the late-fusion rule (for branches whose own logits are added) took the first
    stream's map, and the second stream got no relevance at all."""
    class TwoStreams(nn.Module):
        def __init__(self, join):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
            self.ea, self.eb, self.fc, self.join = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8 * (1 + (join == "cat")), 4), join

        def forward(self, x):
            left, right = x[..., :8], x[..., 8:]
            ea, eb = (e(F.relu(c(t)).mean((2, 3))) for e, c, t in ((self.ea, self.a, left), (self.eb, self.b, right)))
            return self.fc(torch.cat([ea, eb], 1) if self.join == "cat" else ea + eb)
    x = torch.rand(2, 3, 8, 16, dtype=D)
    for join in ("cat", "add"):
        explainer = rsp_fast.RSP(TwoStreams(join).double().eval())
        assert explainer.layer == join
        R = explainer.attribute(x)
        assert R[..., :8].abs().sum() > 0 and R[..., 8:].abs().sum() > 0


def test_the_default_layers_reported_name_can_be_given_back_as_layer():
    """A default layer made by a function is reported by its graph name ('cat'), which layer=
    refused ('not a module', met on BNInception's cat_9)."""
    torch.manual_seed(0)
    model, x = _Concatenated().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "cat"
    assert torch.equal(rsp_fast.RSP(model, layer=explainer.layer).attribute(x), explainer.attribute(x))


def test_bad_inputs_get_clear_errors():
    model = torchvision.models.vgg11(num_classes=5).eval()
    explainer = rsp_fast.RSP(model)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RSPError, match="NaN or Inf"):
        explainer.attribute(torch.full_like(x, float("nan")))
    bad = x.clone(); bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(RSPError, match="NaN or Inf"):
        explainer.attribute(bad)
    with pytest.raises(RSPError, match="4-D"):
        explainer.attribute(torch.randn(3, 32, 32))
    with pytest.raises(RSPError, match="class 5 is out of range"):
        explainer.attribute(x, target=5)
    with pytest.raises(RSPError, match="class -1 is out of range"):
        explainer.attribute(x, target=[-1])
    with pytest.raises(RSPError, match="one class per sample"):
        explainer.attribute(x, target=[1, 2])
    with pytest.raises(RSPError, match="hostile class equals the target"):
        explainer.attribute(x, target=1, hostile=[1, 2])
    with pytest.raises(RSPError, match="hostile class 9 is out of range"):
        explainer.attribute(x, target=1, hostile=[9])
    with pytest.raises(RSPError, match="hostile classes repeat a class"):
        explainer.attribute(x, target=1, hostile=[2, 3, 2])
    with pytest.raises(RSPError, match="hostile_k must be a non-negative int, not True"):
        rsp_fast.RSP(model, hostile_k=True)
    with pytest.raises(RSPError, match="float64 but the model's parameters are torch.float32"):
        explainer.attribute(x.double())
    with pytest.raises(RSPError, match="floating-point"):
        explainer.attribute(x.long())
    with pytest.raises(RSPError, match="forward failed") as err:
        explainer.attribute(torch.randn(1, 4, 32, 32))
    assert "expected input" in str(err.value) and "While executing" not in str(err.value)


def test_a_model_made_under_inference_mode_is_named():
    with torch.inference_mode():
        model = tiny_cnn().eval()  # its parameters are inference tensors: no autograd through the head
    with pytest.raises(RSPError, match="made under torch.inference_mode"):
        rsp_fast.RSP(model).attribute(torch.randn(1, 3, 16, 16))


class _Island(nn.Module):
    """Pools computed in another float dtype (``island``) and cast back: None, the model's own."""

    def __init__(self, island=None):
        super().__init__()
        torch.manual_seed(0)
        self.island = island
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.c0(x))
        h, dtype = F.relu(self.c1(a)), self.island or x.dtype
        h = (F.max_pool2d(h.to(dtype), 2) + F.avg_pool2d(a.to(dtype), 2)).to(x.dtype)
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("model_dtype,island,tolerance", [(torch.float64, torch.float32, 1e-6),
                                                          (torch.float32, torch.float64, 1e-5)])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_part_of_the_forward_in_another_float_dtype_is_explained(model_dtype, island, tolerance, backend):
    """The pool rules gave relevance in the island's dtype, passed on unconverted by the casts: the
    next conv's rule failed ("expected scalar type Double but found Float"), on every backend."""
    x = torch.randn(2, 3, 12, 12, dtype=model_dtype)
    ours = rsp_fast.RSP(_Island(island).to(model_dtype).eval(), backend=backend).attribute(x)
    plain = rsp_fast.RSP(_Island().to(model_dtype).eval(), backend=backend).attribute(x)
    assert ours.dtype == model_dtype and rel_err(ours, plain) < tolerance


class _Shift(nn.Module):
    def forward(self, x):
        return (x - 0.5) / 0.25


class _CallsItsOwnWay(nn.Module):
    """Preprocessing in an overridden ``__call__``, forward the network alone."""

    def __init__(self, net):
        super().__init__()
        self.net, self.shift = net, _Shift()

    def __call__(self, x, *args, **kwargs):
        return super().__call__(self.shift(x), *args, **kwargs)

    def forward(self, x):
        return self.net(x)


class _FastWeights(nn.Module):
    """Runs ``net`` with parameters of its own (meta-learning, ensembles): fx sees the stored ones."""

    def __init__(self, net, params):
        super().__init__()
        self.net, self.params = net, params

    def forward(self, x):
        return torch.func.functional_call(self.net, self.params, (x,))


def test_what_fx_cannot_see_is_refused_or_followed():
    """fx traced ``forward`` alone and took what it could not see for nothing: a
    torchvision.transforms.v2 Normalize in the model (its logits 0.09 off model(x), the map 0.65),
    functional_call's parameters (0.92, another class), an overridden __call__ (0.09). The
    traced logits are now checked against model(x) at the first call with an input shape; an
    overridden __call__ is traced through."""
    v2 = pytest.importorskip("torchvision.transforms.v2")
    torch.manual_seed(0)
    net, x = tiny_cnn().double().eval(), torch.rand(2, 3, 16, 16, dtype=D)
    with pytest.raises(RSPError, match="the traced forward's logits are .* from model\\(x\\)'s .* not seen by torch.fx"):
        rsp_fast.RSP(nn.Sequential(v2.Normalize([0.5] * 3, [0.25] * 3), net).eval()).attribute(x)
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    with pytest.raises(RSPError, match="not seen by torch.fx"):
        rsp_fast.RSP(_FastWeights(net, dict(other.named_parameters())).eval()).attribute(x)
    own = rsp_fast.RSP(_CallsItsOwnWay(net).eval()).explain(x)
    written = rsp_fast.RSP(nn.Sequential(_Shift(), net).eval()).explain(x)
    assert rel_err(own.logits, written.logits) == 0 and rel_err(own.attribution, written.attribution) < 1e-12


class _AddsIntoItsInput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.conv, self.net = nn.Conv2d(3, 3, 3, padding=1), net

    def forward(self, x):
        x += self.conv(x)  # a residual written in place on the input
        return self.net(x)


class _Autocast(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.net(x)
        return out.float()


class _TransformerHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        t = F.relu(self.conv(x)).flatten(2).transpose(1, 2)
        pad = (torch.arange(t.shape[1]) >= t.shape[1] - 4).expand(t.shape[0], -1)
        return self.fc(self.enc(t, src_key_padding_mask=pad).mean(1))


def test_the_forward_check_calls_the_model_as_the_traced_pass_runs():
    """The check's model(x) ran on the caller's tensor and without grad: a forward adding into its
    input changed the caller's tensor and the first call's map (0.020 of 0.050); a head hook that
    registers a tensor hook, and a Transformer head with a padding mask (its no-grad fused path,
    logits 0.18 off), were refused; so was a forward under its own autocast (bfloat16 rounding)."""
    torch.manual_seed(0)
    model, x = _AddsIntoItsInput(tiny_cnn()).eval(), torch.rand(2, 3, 16, 16)
    kept = x.clone()
    explainer = rsp_fast.RSP(model, layer="net.2")
    first = explainer.attribute(x)
    assert torch.equal(x, kept) and rel_err(first, explainer.attribute(x)) == 0
    hooked = tiny_cnn()

    def keep_gradient(module, args, out):  # as Grad-CAM code does on a layer of the head
        out.register_hook(lambda g: None)

    hooked[7].register_forward_hook(keep_gradient)
    assert torch.isfinite(rsp_fast.RSP(hooked).attribute(x)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
        torch.manual_seed(0)
        assert torch.isfinite(rsp_fast.RSP(_TransformerHead().eval(), layer="conv").attribute(x)).all()
    net = tiny_cnn()
    amp = rsp_fast.RSP(_Autocast(net).eval()).attribute(x)
    assert rel_err(amp, rsp_fast.RSP(net).attribute(x)) == 0  # fx does not see the with block: float32 throughout


class _FunctionalConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3), nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class _LayerScaleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.gamma = nn.Conv2d(c, c, 3, padding=1), nn.Parameter(torch.linspace(-1, 1, c).view(1, c, 1, 1))

    def forward(self, x):
        return x + self.gamma * F.relu(self.conv(x))


class _Abs(nn.Module):
    def forward(self, g):
        return g.abs()


def test_parametrized_and_scripted_modules():
    """torch.nn.utils.parametrize makes a module's class "Parametrized<Name>" in torch.nn's
    namespace, which fx kept whole: a model with weight_norm on a layer written with F.conv2d,
    or a parametrized layer scale, was refused. A TorchScript module in the head crashed RSP(...)
    with an AttributeError; before the saliency layer it was "a parameter or buffer used as an activation"."""
    from torch.nn.utils import parametrizations, parametrize
    torch.manual_seed(0)

    def net():
        torch.manual_seed(1)
        return nn.Sequential(_FunctionalConv(3, 6), nn.ReLU(), _FunctionalConv(6, 6), nn.ReLU(), _LayerScaleBlock(6),
                             nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(6, 4)).double().eval()
    model, plain = net(), net()
    parametrizations.weight_norm(model[2])
    parametrize.register_parametrization(model[4], "gamma", _Abs())
    with torch.no_grad():
        plain[2].weight.copy_(model[2].weight)
        plain[4].gamma.abs_()
    x = torch.rand(2, 3, 10, 10, dtype=D)
    assert rel_err(model(x), plain(x)) < 1e-14
    for init in ("gradcam", "comparative"):
        ours = rsp_fast.RSP(model, init=init).attribute(x)
        assert rel_err(ours, rsp_fast.RSP(plain, init=init).attribute(x)) < 1e-12
    scripted = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted[9] = torch.jit.script(scripted[9])
        assert rel_err(rsp_fast.RSP(scripted).attribute(x), rsp_fast.RSP(plain).attribute(x)) == 0  # in the head
        scripted[2] = torch.jit.trace(scripted[2], torch.rand(1, 6, 10, 10, dtype=D))
    with pytest.raises(UnsupportedModelError, match="2: TopLevelTracedModule \\(a TorchScript module, which torch.fx "
                                                    "cannot read: use the nn.Module it was scripted or traced from\\)"):
        rsp_fast.RSP(scripted)


class _CoordConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6), indexing="ij"))
        return self.fc(F.relu(self.c2(torch.cat([h, grid.expand(h.shape[0], 2, 6, 6)], 1))).mean((2, 3)))


def test_a_constant_joined_to_the_activations_is_named_as_such():
    """fx folds a grid the forward makes without the input into '_tensor_constant0', which was
    refused as "a parameter or buffer used as an activation"."""
    with pytest.raises(UnsupportedModelError, match="_tensor_constant0: a constant tensor the forward makes without "
                                                    "the input \\(e.g. a coordinate grid\\), joined to the activations"):
        rsp_fast.RSP(_CoordConv()).attribute(torch.randn(2, 3, 6, 6))


class _WithAnAuxiliaryHead(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.aux = net, nn.LazyLinear(3)  # used in training only

    def forward(self, x):
        return self.net(x)


def test_an_uninitialised_lazy_module_is_named():
    """It was torch's ValueError about UninitializedParameter, from inside the input checks."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3))
    explainer = rsp_fast.RSP(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RSPError, match="the model's 0.weight is not initialised yet .* run the model once"):
        explainer.attribute(x)
    model(x[:1])  # initialised: the same explainer works
    assert explainer.attribute(x).shape == x.shape
    aux = _WithAnAuxiliaryHead(model)  # a head the forward never calls stays lazy: it was refused ("run the model once")
    assert rel_err(rsp_fast.RSP(aux).attribute(x), explainer.attribute(x)) == 0
    assert rsp_fast.cost(aux, (3, 8, 8))["layers"][0]["forward_macs"] == 4 * 3 * 9 * 36
    assert nn.parameter.is_lazy(aux.aux.weight)
    model[4] = nn.LazyLinear(3)  # put in after the explainer was built: checked against the plan that will run
    with pytest.raises(RSPError, match="the model's 4.weight is not initialised yet"):
        explainer.attribute(x)
    assert nn.parameter.is_lazy(model[4].weight)  # not initialised by the pass with random weights
    # a replaced module beside a head that stays lazy: the new plan's modules, not every module, are checked
    # (it was refused at every later call: "run the model once", which cannot initialise a head the forward never calls)
    aux = _WithAnAuxiliaryHead(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(4, 3)))
    on_aux = rsp_fast.RSP(aux)
    on_aux.attribute(x)
    aux.net[4] = nn.Linear(4, 3)
    assert rel_err(on_aux.attribute(x), rsp_fast.RSP(aux).attribute(x)) == 0


class _SizeBranchingWithAnAuxiliaryHead(_WithAnAuxiliaryHead):
    """A forward that branches on a size: traced per input shape (no plan for every shape)."""

    def forward(self, x):
        h = self.net(x)
        return h * 2 if x.shape[-1] > 4 else h


def test_a_lazy_module_of_a_model_traced_per_shape_is_refused_where_it_runs_only():
    """An auxiliary head the forward never calls was refused ("run the model once", which cannot
    initialise it) when the forward branches on sizes; one it calls must stay refused, and not be
    initialised with random weights by the trace."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model, x = _SizeBranchingWithAnAuxiliaryHead(net).eval(), torch.randn(2, 3, 8, 8)
    explainer = rsp_fast.RSP(model)
    assert explainer.plan is None  # traced per shape
    expected = rsp_fast.RSP(nn.Sequential(net, _Scaled(2.0))).attribute(x)
    assert rel_err(explainer.attribute(x), expected) < 1e-6
    assert rsp_fast.cost(model, (3, 8, 8))["layers"][0]["forward_macs"] == 4 * 3 * 9 * 36
    assert nn.parameter.is_lazy(model.aux.weight)
    model.net[0] = nn.LazyConv2d(4, 3)  # one the forward runs
    for call in (lambda: explainer.attribute(x), lambda: rsp_fast.RSP(model).attribute(x),
                 lambda: rsp_fast.cost(model, (3, 8, 8))):
        with pytest.raises(RSPError, match="the model's net.0.weight is not initialised yet .* run the model once"):
            call()
        assert nn.parameter.is_lazy(model.net[0].weight)
    # a lazy module of the user's own (no rule: traced through, with its hooks) is refused as well
    # (the trace's pre-hook gave it random weights, then explained them at every later call)
    model.net[0] = nn.Conv2d(3, 4, 3)
    model.net[1] = _LazyGain()
    for call in (lambda: explainer.attribute(x), lambda: rsp_fast.cost(model, (3, 8, 8))):
        with pytest.raises(RSPError, match="the model's net.1.gain is not initialised yet"):
            call()
        assert nn.parameter.is_lazy(model.net[1].gain)
    model(x)
    assert rel_err(explainer.attribute(x), rsp_fast.RSP(model).attribute(x)) < 1e-12


class _LazyGain(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """A per-channel gain whose size is learnt at the first call."""

    def __init__(self):
        super().__init__()
        self.gain = nn.parameter.UninitializedParameter()

    def initialize_parameters(self, x):
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.gain.materialize((x.shape[1], 1, 1))
                self.gain.uniform_(0.5, 1.5)

    def forward(self, x):
        return F.relu(x * self.gain)


class _Scaled(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_a_quantized_module_is_named():
    """A dynamically quantized Linear head was refused with "the model's logits do not depend on
    the saliency layer … through autograd", which named neither the module nor quantization."""
    model = tiny_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError, match="the model's 7 is a quantized module "
                                                    "\\(torch.ao.nn.quantized.dynamic.*Linear\\): RSP explains float"):
        rsp_fast.RSP(quantized).attribute(torch.rand(2, 3, 16, 16))


def test_a_model_quantized_in_its_body_is_named_when_built():
    """A quantized conv between the input and the saliency layer was refused as "no RSP rule for
    2: Conv2d" (with Conv2d in the supported list beside it); it is named as quantized, when
    RSP is built."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), torch.ao.nn.quantized.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with pytest.raises(UnsupportedModelError, match="the model's 2 is a quantized module "
                                                    "\\(torch.ao.nn.quantized.*Conv2d\\): RSP explains float"):
        rsp_fast.RSP(model)


class _SkipAdd(nn.Module):
    """A residual block whose add is a FloatFunctional (as models written for quantization are) or +."""

    def __init__(self, float_functional=None):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)
        self.skip = float_functional() if float_functional else None

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.skip.add(h, self.conv2(h)) if self.skip is not None else h + self.conv2(h))
        return self.fc(h.mean((2, 3)))


def test_a_float_model_written_for_quantization_is_explained():
    """FloatFunctional, the float add of models written for quantization (torchvision's
    quantizable ResNets with quantize=False), lives in torch's quantized namespace: such models
    were refused as "a quantized module"."""
    torch.manual_seed(0)
    plain = _SkipAdd().eval()
    x = torch.rand(2, 3, 8, 8)
    expected = rsp_fast.RSP(plain, layer="conv2").attribute(x)
    for kind in (torch.ao.nn.quantized.FloatFunctional, torch.ao.nn.quantized.FXFloatFunctional):
        written = _SkipAdd(kind).eval()
        written.load_state_dict(plain.state_dict())
        assert torch.equal(rsp_fast.RSP(written, layer="conv2").attribute(x), expected)
        assert rsp_fast.cost(written, (3, 8, 8), layer="conv2")["totals"]["rsp_macs"] > 0


class _FunctionAfterNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv(x)))
        return self.fc(torch.matmul(h.flatten(2), self.fc.weight.new_ones(36, 1)).flatten(1))


def test_a_failed_forward_names_where_it_failed():
    """A layer RSP's rules do not read, cast to float64 alone: 'the forward failed … mixed dtype', not saying where."""
    model = _FunctionAfterNorm().eval()
    model.norm.double()
    with pytest.raises(RSPError, match=r"shape \(2, 3, 8, 8\) in module 'norm' \(GroupNorm\): mixed dtype"):
        rsp_fast.RSP(model, layer="conv").attribute(torch.randn(2, 3, 8, 8))
    model = _FunctionAfterNorm().eval()
    with pytest.raises(RSPError, match=r"shape \(2, 3, 9, 8\) at 'matmul': "):
        explainer = rsp_fast.RSP(model, layer="conv")
        explainer.attribute(torch.randn(2, 3, 8, 8))
        explainer.attribute(torch.randn(2, 3, 9, 8))


def test_cost_of_a_model_without_parameters():
    model = nn.Sequential(nn.AvgPool2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert rsp_fast.cost(model, (3, 8, 8))["totals"]["rsp_macs"] == 0


def test_inference_mode_callers_get_the_same_result():
    model = torchvision.models.resnet18(num_classes=6).eval()
    explainer = rsp_fast.RSP(model)
    x = torch.randn(2, 3, 32, 32)
    expected = explainer.attribute(x)
    with torch.inference_mode():
        got = explainer.attribute(x)
        frames = torch.randn(2, 3, 32, 32)  # an inference tensor, as a video loop makes them
        assert torch.isfinite(explainer.attribute(frames)).all()
    assert torch.equal(got, expected)


class _MadeInTheHead(nn.Module):
    """A head that makes a tensor in its forward (a constant of fx's graph), and optionally a
    forward that branches on a size (traced per input shape, at the first call with it)."""

    def __init__(self, branch_on_size):
        super().__init__()
        self.branch_on_size = branch_on_size
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.branch_on_size:
            assert h.shape[1] == 4
        return self.fc(h.mean((2, 3)) * torch.full((4,), 2.0, dtype=torch.float64))  # a constant to fx


@pytest.mark.parametrize("branch_on_size", [False, True], ids=["built", "first-call"])
def test_a_plan_traced_under_inference_mode_serves_later_calls(branch_on_size):
    """Traced inside a caller's inference_mode (the explainer built there, or a per-shape plan
    made at a call there), the graph's constants were inference tensors: R₀'s gradient through
    the head failed at this call and at every later one, named as the model's forward failing."""
    torch.manual_seed(0)
    model, x = _MadeInTheHead(branch_on_size).double().eval(), torch.randn(2, 3, 6, 6, dtype=D)
    expected = rsp_fast.RSP(model).attribute(x)
    with torch.inference_mode():
        explainer = rsp_fast.RSP(model)
        assert torch.equal(explainer.attribute(x), expected)
    assert torch.equal(explainer.attribute(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_explained_in_float32(dtype):
    """float16 cannot hold the rules' 1e-9 stabilisers (the result was NaN): the rules run in
    float32 on the half-precision forward pass, and agree with the float32 model's result."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    x = torch.randn(2, 3, 48, 48)
    target, hostile = [1, 4], [[0, 2], [3, 5]]
    expected = rsp_fast.RSP(model).attribute(x, target=target, hostile=hostile)
    half = torchvision.models.resnet18(num_classes=6).eval()
    half.load_state_dict(model.state_dict())
    R = rsp_fast.RSP(half.to(dtype)).attribute(x.to(dtype), target=target, hostile=hostile)
    assert R.dtype == torch.float32 and torch.isfinite(R).all()
    assert F.cosine_similarity(R.flatten(1), expected.flatten(1)).min() > 0.99
    assert torch.allclose(R.flatten(1).sum(1), torch.ones(2), atol=1e-3)  # ΣR₀ = 1, conserved


class _NamedLikeFunctions(nn.Module):
    """Modules named as fx names function calls: ``add`` (an Identity after x + y, itself
    named ``add``) and ``relu_2`` (a ReLU in the head; the third F.relu is named ``relu_2``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.add, self.relu_2, self.hid, self.fc = nn.Identity(), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        z = self.add(x + F.relu(self.c2(x)))
        return self.fc(self.relu_2(self.hid(F.relu(self.c3(z)).mean((2, 3)))))


def test_a_function_named_like_a_module_gets_a_name_of_its_own():
    """The default layer was reported as ``relu_2``, which ``layer=`` read as the module: another
    layer, explained without a word; ``record=True`` kept one step under ``add`` for two."""
    model, x = _NamedLikeFunctions().double().eval(), torch.randn(2, 3, 8, 8, dtype=D)
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "relu_2_fn"
    again = rsp_fast.RSP(model, layer=explainer.layer)
    assert again.layer == explainer.layer and torch.equal(again.attribute(x), explainer.attribute(x))
    steps = explainer.explain(x, record=True).steps
    assert {"add", "add_fn", "relu_2_fn"} <= set(steps)
    assert torch.equal(steps["add"], steps["c3"])  # the Identity's input: what c3 read
    assert rsp_fast.RSP(model, layer="relu_2").explain(x).initial.shape == (2, 8)  # the module, by its path


class _Float64Block(nn.Module):
    """A float32 model that runs one conv in float64, its input cast up and its output back."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1).double(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)).double())).float().mean((2, 3)))


def test_a_layer_in_another_dtype_is_a_clear_error():
    """Only the first parameter's dtype was checked: the pass failed inside the conv's rule
    (RuntimeError: expected scalar type Double but found Float, 13 frames deep)."""
    model, x = _Float64Block().eval(), torch.randn(2, 3, 8, 8)
    assert model(x).dtype == torch.float32
    with pytest.raises(RSPError, match="inputs are torch.float32 on cpu but c2.weight is torch.float64 on cpu"):
        rsp_fast.RSP(model).attribute(x)
    assert rsp_fast.RSP(_CountedWithAnAuxHead().eval()).attribute(x).shape == x.shape


class _CountedWithAnAuxHead(nn.Module):
    """An integer parameter first (a count), and a float64 layer the forward does not call (a
    training-only head): neither is read by a rule."""

    def __init__(self):
        super().__init__()
        self.steps = nn.Parameter(torch.zeros((), dtype=torch.long), requires_grad=False)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.aux = nn.Linear(8, 8).double()

    def forward(self, x):
        return self.net(x)


def test_bad_constructor_arguments():
    model = torchvision.models.vgg11(num_classes=5)
    with pytest.raises(RSPError, match="init must be one of"):
        rsp_fast.RSP(model, init="lrp")
    with pytest.raises(RSPError, match="hostile_k"):
        rsp_fast.RSP(model, hostile_k=-1)
    with pytest.raises(RSPError, match="'features.99' is not a module"):
        rsp_fast.RSP(model, layer="features.99")
    with pytest.raises(RSPError, match="'99' is not a module"):  # not the root's 99th call (no ':')
        rsp_fast.RSP(model.features, layer="99")
    with pytest.raises(RSPError, match="not a submodule"):
        rsp_fast.RSP(model, layer=nn.ReLU())
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        rsp_fast.RSP(model, backend="fpga")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            rsp_fast.RSP(model, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: Triton runs on CUDA tensors"):
        rsp_fast.RSP(torchvision.models.vgg11(), backend="triton")


def test_backend_from_environment(monkeypatch):
    model = torchvision.models.vgg11()
    monkeypatch.setenv("RSP_FAST_BACKEND", "torch")  # read where no backend is given
    assert rsp_fast.RSP(model).backend == "torch" and rsp_fast.RSP(model, backend="auto").backend == "auto"
    monkeypatch.setenv("RSP_FAST_BACKEND", "fpga")
    with pytest.raises(BackendUnavailableError, match="fpga"):
        rsp_fast.RSP(model)


class _WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.GELU(), nn.Softmax(dim=1))
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        h = self.body(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(torch.relu(h) * torch.tanh(h), 1))  # two activations: no gate


def test_unsupported_layers_are_named_before_any_work():
    with pytest.raises(UnsupportedModelError) as err:
        rsp_fast.RSP(_WithSoftmax())
    msg = str(err.value)
    assert "body.2: Softmax" in msg and "mul: a product of two position-wise activations" in msg and "GELU" not in msg.split("Supported:")[0]
    assert "Supported:" in msg and "Conv2d" in msg


def test_wrapped_models_are_explained_as_the_module_they_run():
    """torch.compile's and DataParallel's wrappers run the module unchanged: explained as it is
    (layer names relative to the wrapper work too); a TorchScript module is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4)).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=D)
    expected = rsp_fast.RSP(model, layer="1").attribute(x)
    for wrapped, layer in ((torch.compile(model), "_orig_mod.1"), (nn.DataParallel(model), "module.1"),
                           (torch.compile(nn.DataParallel(model)), "_orig_mod.module.1")):
        assert torch.equal(rsp_fast.RSP(wrapped, layer=layer).attribute(x), expected)
    assert rsp_fast.cost(nn.DataParallel(model), (3, 12, 12)) == rsp_fast.cost(model, (3, 12, 12))
    with pytest.raises(rsp_fast.UnsupportedModelError, match="TorchScript module"):
        rsp_fast.RSP(torch.jit.script(model))
    with pytest.raises(rsp_fast.UnsupportedModelError, match="torch.export module .* pass the nn.Module it was exported"):
        rsp_fast.RSP(torch.export.export(model, (x,)).module())


def _shift_by_a_tenth(module, args, out):
    return out + 0.1


@pytest.mark.parametrize("compiled", ["layer4", "layer4.1", "layer4.1.conv2", "layer1.0.relu", "conv1", "fc"])
def test_a_submodule_compiled_alone_is_explained_as_the_module_it_runs(compiled):
    """fx cannot trace a torch.compile'd submodule: it was kept whole, and the default layer
    moved before it (ResNet18 with layer4 compiled: layer3, 1.28 of the peak off; layer4.1:
    layer4.0, 0.56), or, on the relevance path, the call failed with dynamo's message."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    expected = rsp_fast.RSP(model).attribute(x)
    first_call = rsp_fast.RSP(model, layer="layer4.1.relu:1").attribute(x)  # a block's shared ReLU, its first call
    hooked = copy.deepcopy(model)
    hooked.get_submodule(compiled).register_forward_hook(_shift_by_a_tenth)
    parent, _, name = compiled.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, name, torch.compile(getattr(owner, name)))
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "layer4"
    assert torch.equal(explainer.attribute(x), expected)
    assert torch.equal(rsp_fast.RSP(model, layer="layer4.1.relu:1").attribute(x), first_call)  # names as before
    # a hook on the module it compiles runs, as on the module uncompiled (review: it was dropped, logits 0.57 off)
    handle = getattr(owner, name)._orig_mod.register_forward_hook(_shift_by_a_tenth)
    assert torch.equal(explainer.attribute(x), rsp_fast.RSP(hooked).attribute(x))
    handle.remove()
    # hooks on the compiled wrapper itself would not run around the module it compiles (review:
    # RSP's logits 0.57 off the model's): refused, also once the explainer was built
    getattr(owner, name).register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(rsp_fast.UnsupportedModelError, match=f"{compiled} is compiled .* register them on {compiled}._orig_mod"):
        explainer.attribute(x)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def body(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class _OneInput(_Body):
    def forward(self, x):
        return self.body(x)


class _ReadKeywords(_Body):
    def forward(self, x, **kwargs):
        if kwargs.get("flip", False):
            x = x.flip(-1)
        return self.body(x)


def _keeps_signature(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class _VarArgs(_Body):
    def forward(self, *args):
        return self.body(args[0])


class _UnreadKeywords(_Body):
    def forward(self, x, **kwargs):
        return self.body(x)


class _Decorated(_Body):
    """A forward behind a decorator's ``wrapper(self, *args, **kwargs)`` (Hugging Face's
    ``can_return_tuple`` on ConvNeXt: refused as untraceable, 'NoneType' has no 'pop')."""

    @_keeps_signature
    def forward(self, x, flip=False):
        return self.body(x.flip(-1) if flip else x)


def test_forward_signatures_with_star_arguments():
    """Forwards taking ``*args`` or ``**kwargs`` are explained as ``model(x)`` calls them: fx made
    them placeholders of their own (``*args`` a tuple: a KeyError from deep inside; ``**kwargs``
    a dict it cannot hand over empty, so a body reading it failed)."""
    x = torch.randn(2, 3, 10, 10, dtype=D)
    expected = rsp_fast.RSP(_OneInput().double().eval()).attribute(x)
    for body in (_UnreadKeywords, _VarArgs, _ReadKeywords, _Decorated):
        assert torch.equal(rsp_fast.RSP(body().double().eval()).attribute(x), expected), body.__name__


def test_fully_convolutional_heads_give_logits_with_trailing_ones():
    """A head ending in a 1×1 conv and a global pool returns (N, classes, 1, 1): explained as
    the same model flattening it; other output shapes are refused with theirs."""
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1),
                        nn.AdaptiveAvgPool2d(1)).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=D)
    assert torch.equal(rsp_fast.RSP(fcn).attribute(x), rsp_fast.RSP(nn.Sequential(*fcn, nn.Flatten())).attribute(x))
    with pytest.raises(RSPError, match=r"logits of shape \(N, classes\), not \(2, 5, 2, 2\)"):
        rsp_fast.RSP(nn.Sequential(*fcn[:-1], nn.AdaptiveAvgPool2d(2)), layer="3").attribute(x)


def test_untraceable_model_is_reported():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return self.conv(x).flatten(1) if x.sum() > 0 else x.flatten(1)

    explainer = rsp_fast.RSP(Dynamic())  # branching on values is found when tracing for the first input's shape
    with pytest.raises(UnsupportedModelError, match="could not trace Dynamic.*branches only on sizes"):
        explainer.attribute(torch.randn(2, 3, 6, 6))


class _OptionalArguments(nn.Module):
    """A forward with optional arguments: explained as ``model(x)`` runs it, at their defaults."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x, return_features=False, mask=None, *, scale=2.0):
        if x.shape[-1] > 64:  # with sizes branched on, traced per input shape: the defaults hold there too
            x = x[..., :64]
        y = F.relu(self.conv(x)) * scale
        if mask is not None:
            y = y * mask
        return y if return_features else self.fc(y.mean((2, 3)))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x, y):
        return self.conv(x + y).flatten(1)


def test_optional_forward_arguments_take_their_defaults():
    model = _OptionalArguments().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    ex = rsp_fast.RSP(model).explain(x, record=True)
    assert torch.allclose(ex.logits, model(x), rtol=0, atol=1e-12)
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), atol=1e-9)
    with pytest.raises(UnsupportedModelError, match="exactly one input; _TwoInputs.forward takes 2"):
        rsp_fast.RSP(_TwoInputs())


class _SizeCheckingHead(nn.Module):
    """Pools only maps larger than 2×2: control flow on the input's size, which fx cannot trace."""

    def __init__(self, c, classes):
        super().__init__()
        self.fc = nn.Linear(c * 4, classes)

    def forward(self, x):
        if x.shape[-1] > 2:
            x = F.adaptive_avg_pool2d(x, 2)
        return self.fc(x.flatten(1))


class _UntraceableHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = _SizeCheckingHead(6, 5)

    def forward(self, x):
        return self.head(self.features(x))


def test_untraceable_submodules_in_the_head_are_kept_whole():
    model = _UntraceableHead().double().eval()
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "features"  # its last ReLU, not the head kept whole
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ex = explainer.explain(x, record=True)
    assert torch.equal(ex.logits, model(x))
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)
    # the same features with a plain head give the same attribution (the head only sets R₀)
    plain = nn.Sequential(model.features, nn.AdaptiveAvgPool2d(2), nn.Flatten(), model.head.fc).eval()
    assert rel_err(rsp_fast.RSP(plain, layer="0.4").attribute(x), ex.attribution) < 1e-12


class _ValueCheckingBlock(nn.Module):
    """Branches on its input's values, which no trace can follow."""

    def forward(self, x):
        return x.relu() if x.mean() > 0 else x


def test_untraceable_submodule_on_the_relevance_path_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ValueCheckingBlock(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    explainer = rsp_fast.RSP(model, layer="3")
    with pytest.raises(UnsupportedModelError, match=r"1: _ValueCheckingBlock \(its forward cannot be traced: TraceError"):
        explainer.attribute(torch.randn(2, 3, 6, 6))


class _LeNet(nn.Module):
    """The classic tutorial LeNet: its forward loops over sizes (num_flat_features), checks
    the rank, and flattens with the batch size it reads; ``plain`` does the same with
    torch.flatten only, which fx traces symbolically."""

    def __init__(self, plain: bool = False):
        super().__init__()
        self.plain = plain
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 3)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 20), nn.Linear(20, 10)

    def forward(self, x):
        if not self.plain:
            assert x.dim() == 4, "needs N×C×H×W"
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        if self.plain or x.size(-1) != 4:
            x = F.adaptive_avg_pool2d(x, 4)
        x = torch.flatten(x, 1) if self.plain else x.view(x.size(0), self.num_flat_features(x))
        return self.fc2(F.relu(self.fc1(x)))

    @staticmethod
    def num_flat_features(x):
        n = 1
        for d in x.size()[1:]:
            n *= d
        return n


def test_forward_branching_on_sizes_is_traced_per_input_shape(monkeypatch):
    model = _LeNet().double().eval()
    twin = _LeNet(plain=True).double().eval()
    twin.load_state_dict(model.state_dict())
    explainer = rsp_fast.RSP(model)
    assert explainer.plan is None and explainer.layer is None  # traced at the first call
    reference = rsp_fast.RSP(twin)
    # a new batch size, a new size, a size that skips the pool (4×4 maps), an old shape again
    for shape in [(2, 1, 20, 20), (3, 1, 20, 20), (2, 1, 24, 28), (2, 1, 16, 16), (2, 1, 20, 20)]:
        x = torch.randn(shape, dtype=D)
        ex = explainer.explain(x, record=True)
        assert torch.equal(ex.logits, model(x))
        assert rel_err(ex.attribution, reference.attribute(x)) < 1e-12
        assert explainer.layer == reference.layer
    assert len(explainer._plans) == 4
    # a shape in use stays traced while more shapes than the cache holds come and go
    traced = []
    monkeypatch.setattr(api, "build_plan", lambda *a, **k: traced.append(a) or build_plan(*a, **k))
    for side in range(30, 30 + 2 * api.MAX_SHAPE_PLANS):
        explainer.attribute(torch.randn(2, 1, 20, 20, dtype=D))
        explainer.attribute(torch.randn(1, 1, side, side, dtype=D))
    assert len(traced) == 2 * api.MAX_SHAPE_PLANS and len(explainer._plans) == api.MAX_SHAPE_PLANS
    with pytest.raises(RSPError, match=r"forward failed on inputs of shape \(2, 3, 20, 20\)"):
        explainer.attribute(torch.randn(2, 3, 20, 20, dtype=D))  # 3 channels for a 1-channel conv
    with pytest.raises(RSPError, match="not a module of _LeNet"):
        rsp_fast.RSP(model, layer="conv9")  # names are still checked at once
    assert rsp_fast.cost(model, (1, 20, 20))["layers"] == rsp_fast.cost(twin, (1, 20, 20))["layers"]
    with pytest.raises(RSPError, match=r"forward failed on inputs of shape \(2, 3, 20, 20\)"):
        rsp_fast.cost(twin, (3, 20, 20))  # the cost model says so too
    with pytest.raises(RSPError, match=r"without the batch: \(1, 20, 20\), not \(2, 1, 20, 20\)"):
        rsp_fast.cost(twin, (2, 1, 20, 20))  # a batch size given too


class _EvenSizeConv(nn.Module):
    """Pads odd-sized maps to even before a stride-2 conv: branching on sizes, on the relevance path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 2, stride=2)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        return self.conv(x)


class _EvenSizeConvOffGPU(_EvenSizeConv):
    """The same, reading the device's type too (``x.device.type``, as timm's attention blocks do)."""

    def forward(self, x):
        h, w = x.shape[-2:]
        if x.device.type != "cuda" and (h % 2 or w % 2):
            x = F.pad(x, (0, w % 2, 0, h % 2))
        return self.conv(x)


@pytest.mark.parametrize("block", [_EvenSizeConv, _EvenSizeConvOffGPU])
def test_submodule_branching_on_sizes_on_the_relevance_path_is_traced(block):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), block(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3)).double().eval()
    explainer = rsp_fast.RSP(model)
    for size, pad in [(9, (0, 1, 0, 1)), (10, (0, 0, 0, 0))]:  # odd maps padded, even maps not
        plain = nn.Sequential(model[0], model[1], nn.ZeroPad2d(pad), model[2].conv, *model[3:]).eval()
        x = torch.randn(2, 3, size, size, dtype=D)
        assert rel_err(explainer.attribute(x), rsp_fast.RSP(plain).attribute(x)) < 1e-12


def test_timm_vgg_is_explained():
    """timm's VGG head (ConvMlp) checks its input size; the head is kept whole."""
    timm = pytest.importorskip("timm")
    from timm.models.vgg import VGG
    model = VGG([8, "M", 16, "M", 16, 16, "M", 16, "M", 16, "M"], num_classes=5, mlp_ratio=1 / 64).double().eval()
    explainer = rsp_fast.RSP(model)
    assert explainer.layer == "features.15"  # the last ReLU before the last max pool, as for torchvision's VGG
    x = torch.randn(2, 3, 64, 64, dtype=D)
    ex = explainer.explain(x, record=True)
    assert torch.equal(ex.logits, model(x))
    assert torch.allclose(ex.attribution.sum((1, 2, 3)) + ex.dropped, ex.initial.sum((1, 2, 3)), rtol=1e-9)


def test_comparative_without_hostile_classes_is_gradcam():
    model = torchvision.models.vgg11(num_classes=4).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=D)
    a = rsp_fast.RSP(model, hostile_k=0).attribute(x)
    b = rsp_fast.RSP(model, init="gradcam").attribute(x)
    assert torch.equal(a, b)
    assert torch.equal(rsp_fast.RSP(model).attribute(x, hostile=[]), b)  # an empty hostile list: none


def test_the_gradcam_init_reports_no_hostile_classes_even_when_given_some():
    """The gradcam init has none (K = 0): a hostile list passed to it is checked, and neither
    changes the map nor shows up as if it had been used."""
    model = torchvision.models.vgg11(num_classes=4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    explainer = rsp_fast.RSP(model, init="gradcam")
    plain, given = explainer.explain(x, target=[0, 0]), explainer.explain(x, target=[0, 0], hostile=[[1, 2], [2, 3]])
    assert given.hostile.shape == (2, 0) and given.cams.shape[0] == 1
    assert torch.equal(given.attribution, plain.attribution)
    with pytest.raises(rsp_fast.RSPError, match="hostile"):
        explainer.explain(x, target=[0, 0], hostile=[[0, 9], [1, 2]])


def test_backends_report():
    report = rsp_fast.backends("cpu")
    assert report["torch"] == "available"
    assert set(report) == {"torch", "cpp", "cuda", "triton"}


def test_package_works_without_the_compiled_extension():
    """Importing with rsp_fast._C unavailable falls back to the PyTorch engine."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['rsp_fast._C'] = None\n"  # `from .. import _C` raises ImportError: as if not built
        "import torch, rsp_fast\n"
        "from rsp_fast.ops.dispatch import select_kernels\n"
        "status = rsp_fast.backends('cpu')\n"
        "assert status['torch'] == 'available' and 'rsp_fast._C is not built' in status['cpp'], status\n"
        "assert select_kernels('auto', torch.device('cpu')).name == 'torch'\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),\n"
        "                        torch.nn.Flatten(), torch.nn.Linear(4 * 16, 3)).double().eval()\n"
        "ex = rsp_fast.RSP(m).explain(torch.randn(2, 3, 8, 8, dtype=torch.float64), record=True)\n"
        "assert torch.allclose(ex.attribution.flatten(1).sum(1) + ex.dropped, ex.initial.flatten(1).sum(1))\n"
        "try:\n"
        "    rsp_fast.RSP(m, backend='cpp')\n"
        "except rsp_fast.BackendUnavailableError as e:\n"
        "    assert 'rsp_fast._C is not built' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpp should be unavailable')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


class _CumulativeSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        return self.fc(torch.cumsum(self.a(x), 1).relu().flatten(1))


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                                mlp_dim=16, num_classes=3)


@pytest.mark.parametrize("build,culprit", [(_tiny_vit, r"self_attention: MultiheadAttention"),
                                           (_CumulativeSum, r"cumsum: torch\.cumsum")])
def test_architectures_without_rules_are_refused_by_name(build, culprit):
    with pytest.raises(UnsupportedModelError, match=culprit):
        rsp_fast.RSP(build())


def test_static_path_off_cuda_runs_the_eager_pass():
    model = tiny_cnn()
    explainer = rsp_fast.RSP(model)
    x = torch.randn(3, 3, 32, 32)
    static = explainer.static(x)
    assert not static.uses_graphs
    assert torch.equal(static(x), explainer.attribute(x))
    assert torch.equal(static(x, target=2), explainer.attribute(x, target=2))
    ex = static.explain(x)
    assert torch.equal(ex.logits, explainer.explain(x).logits) and ex.target.shape == (3,)
    with pytest.raises(rsp_fast.RSPError, match=r"static RSP takes inputs of shape \(3, 3, 32, 32\)"):
        static(torch.randn(2, 3, 32, 32))
    with pytest.raises(rsp_fast.RSPError, match="static RSP takes inputs"):
        static(x.double())
    with pytest.raises(rsp_fast.RSPError, match="must be a torch.Tensor"):
        explainer.static([1, 2])


class _GraphOnTheCPU:
    """Stands in for torch.cuda's graph API on the CPU: capture runs the pass once, replay runs
    it again into the captured outputs (StaticRSP's own code runs unchanged)."""

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            fresh = self.run()
            for kept, new in zip((self.out.attribution, self.out.logits), (fresh.attribution, fresh.logits)):
                kept.copy_(new)

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(device=None):
        return _GraphOnTheCPU.Stream()

    @staticmethod
    def graph(graph, stream=None):
        return contextlib.nullcontext()


def test_a_static_path_first_called_under_inference_mode_serves_later_calls(monkeypatch):
    """A capture under torch.inference_mode made the graph's input buffer an inference tensor:
    every later call outside inference mode failed copying into it."""
    from rsp_fast import static as static_module
    for name in ("Stream", "CUDAGraph", "stream", "current_stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(_GraphOnTheCPU, name))
    capture = static_module.StaticRSP._capture

    def capture_on_the_cpu(self, given):
        graph, x, t, out = capture(self, given)
        graph.run, graph.out = (lambda: self.explainer._explain_checked(x, t, None, trusted_target=given)), out
        return graph, x, t, out
    monkeypatch.setattr(static_module.StaticRSP, "_capture", capture_on_the_cpu)
    explainer = rsp_fast.RSP(tiny_cnn())
    x1, x2 = torch.randn(2, 2, 3, 32, 32)
    static = explainer.static(x1)
    static.uses_graphs = True
    with torch.inference_mode():
        first = static(x1)
    assert torch.equal(first, explainer.attribute(x1))
    assert torch.equal(static(x2), explainer.attribute(x2))
    assert torch.equal(static(x2, target=1), explainer.attribute(x2, target=1))
    assert static.uses_graphs and sorted(static._graphs) == [False, True]  # replayed, not run eagerly instead


def test_large_batches_run_in_chunks_with_the_same_result():
    model = torchvision.models.resnet18(num_classes=10).eval().double()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    target, hostile = [1, 2, 3, 4, 5], [[0, 6], [0, 7], [0, 8], [0, 9], [6, 7]]
    whole = rsp_fast.RSP(model, max_batch=5).explain(x, target=target, hostile=hostile, record=True)
    chunked = rsp_fast.RSP(model, max_batch=2).explain(x, target=target, hostile=hostile, record=True)
    assert rel_err(chunked.attribution, whole.attribution) < 1e-12
    for name in ("initial", "logits", "cams", "dropped"):
        assert rel_err(getattr(chunked, name), getattr(whole, name)) < 1e-12, name
    assert torch.equal(chunked.target, whole.target) and torch.equal(chunked.hostile, whole.hostile)
    assert chunked.steps.keys() == whole.steps.keys()
    assert all(rel_err(chunked.steps[k], whole.steps[k]) < 1e-12 for k in whole.steps)
    shared = rsp_fast.RSP(model, max_batch=2).explain(x, target=3, hostile=[0, 6])  # one value for every sample
    assert shared.target.tolist() == [3] * 5 and shared.hostile.tolist() == [[0, 6]] * 5
    # the same shared values as tensors: not cut into chunks' rows (a 0-d target crashed, and four
    # hostile classes for every sample went two to each chunk)
    for target, hostile in ((torch.tensor(3), torch.tensor([0, 6])), (3, torch.tensor([0, 6, 7, 8]))):
        chunked = rsp_fast.RSP(model, max_batch=2).explain(x, target=target, hostile=hostile)
        whole = rsp_fast.RSP(model, max_batch=5).explain(x, target=target, hostile=hostile.tolist())
        assert rel_err(chunked.attribution, whole.attribution) < 1e-12
        assert chunked.hostile.tolist() == [hostile.tolist()] * 5
    with pytest.raises(RSPError, match=r"one class per sample \(5\)"):
        rsp_fast.RSP(model, max_batch=2).explain(x, target=[1, 2, 3])
    with pytest.raises(RSPError, match=r"one list per sample \(5\)"):
        rsp_fast.RSP(model, max_batch=2).explain(x, hostile=[[0, 6]] * 3)
    with pytest.raises(RSPError, match="max_batch"):
        rsp_fast.RSP(model, max_batch=0)


def test_a_given_initial_relevance_is_propagated_as_the_authors_model_RSP_does():
    """``initial=`` is the authors' ``model.RSP(R=rel)``: their golden R_init, given as it is,
    comes back as their R_input; and the map comes from that R alone."""
    for name in ("vgg16_narrow_gradcam", "vgg16_narrow_comparative"):
        g = load_golden(next(p for p in GOLDEN_FILES if p.stem == name))
        explainer = rsp_fast.RSP(golden_model(g), layer=f"features.{g['saliency_layer']}", init="gradcam")
        ex = explainer.explain(g["x"], initial=g["R_init"])
        assert torch.equal(ex.initial, g["R_init"]) and rel_err(ex.attribution, g["R_input"]) < 1e-9, name
    # from a relevance at one position of the saliency map, the input map stays in its receptive field
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    explainer = rsp_fast.RSP(model, layer="3")
    x = torch.rand(2, 3, 12, 12, dtype=D) + 0.1
    R0 = torch.zeros(2, 8, 12, 12, dtype=D)
    R0[0, :, 4, 7], R0[1, :3, 9, 2], R0[1, 3:, 9, 2] = 1.0, 2.0, -1.0
    R = explainer.attribute(x, initial=R0)
    for n, (i, j) in enumerate([(4, 7), (9, 2)]):
        window = torch.zeros(12, 12, dtype=torch.bool)
        window[i - 2:i + 3, j - 2:j + 3] = True  # two 3×3 convs
        assert R[n][:, ~window].abs().max() == 0 and R[n][:, window].abs().max() > 0
        assert abs(R[n].sum().item() - R0[n].sum().item()) < 1e-9
    # RSP is homogeneous in R, sample by sample, also in chunks
    assert rel_err(rsp_fast.RSP(model, layer="3", max_batch=1).attribute(x, initial=R0 * 2.5), R * 2.5) < 1e-12
    with pytest.raises(RSPError, match=r"initial relevance has shape \(2, 8, 6, 12\), but the saliency layer '3' gives \(2, 8, 12, 12\)"):
        explainer.attribute(x, initial=R0[:, :, :6])
    with pytest.raises(RSPError, match=r"one row per sample \(2\)"):
        explainer.attribute(x, initial=R0[:1])
    with pytest.raises(RSPError, match="NaN"):
        explainer.attribute(x, initial=R0 * float("nan"))
    with pytest.raises(RSPError, match="floating-point"):
        explainer.attribute(x, initial=R0.long())


class _Returning(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.net, self.wrap = tiny_cnn(), wrap

    def forward(self, x):
        return self.wrap(self.net(x))


class _ModelOutput(OrderedDict):
    """Hugging Face's ModelOutput: an OrderedDict whose keys are also attributes."""

    def __getattr__(self, name):
        if name not in self:
            raise AttributeError(name)
        return self[name]


@pytest.mark.parametrize("wrap", [lambda y: {"logits": y}, lambda y: _ModelOutput(loss=None, logits=y)],
                         ids=["dict", "ModelOutput"])
def test_an_output_holding_logits_is_explained_through_them(wrap):
    """Hugging Face's vision CNNs return a ModelOutput: all were refused ('not a dict')."""
    x = torch.rand(2, 3, 16, 16)
    ex, plain = rsp_fast.RSP(_Returning(wrap)).explain(x), rsp_fast.RSP(tiny_cnn()).explain(x)
    assert torch.equal(ex.logits, plain.logits) and torch.equal(ex.attribution, plain.attribution)


_AuxFirst = namedtuple("_AuxFirst", ["aux_logits", "logits"])


class _WithAux(nn.Module):
    """Logits from the last stage and an auxiliary output from an earlier one, put first."""

    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.aux, self.fc, self.wrap = nn.Linear(8, 5), nn.Linear(16, 5), wrap

    def forward(self, x):
        a = self.stem(x)
        logits = self.fc(self.body(a).mean((2, 3)))
        return self.wrap(logits, self.aux(a.mean((2, 3))), a)


@pytest.mark.parametrize("wrap", [lambda y, aux, a: {"aux_logits": aux, "logits": y}, lambda y, aux, a: _AuxFirst(aux, y),
                                  lambda y, aux, a: OrderedDict(features=a, logits=y)],
                         ids=["dict", "named-tuple", "features-first"])
def test_the_default_layer_of_an_output_object_is_found_behind_its_logits(wrap):
    """The default layer was chosen behind the output's first tensor: an auxiliary head's stage
    (the map 1.18 of its peak off), or, behind a feature map, none at all."""
    x = torch.rand(2, 3, 16, 16, dtype=D)
    expected = rsp_fast.RSP(_WithAux(lambda y, aux, a: y).double().eval())
    explainer = rsp_fast.RSP(_WithAux(wrap).double().eval())
    assert explainer.layer == expected.layer == "body"
    assert torch.equal(explainer.attribute(x), expected.attribute(x))


@pytest.mark.parametrize("finish", [lambda y: F.softmax(y, dim=1), lambda y: y.log_softmax(-1), torch.sigmoid,
                                    nn.Softmax(dim=1), nn.LogSoftmax(dim=-1), lambda y: {"logits": y.softmax(1)},
                                    lambda y: F.log_softmax(y), lambda y: y[:, :, None, None].softmax(-3)],
                         ids=["softmax", "log_softmax", "sigmoid", "Softmax", "LogSoftmax", "dict-of-softmax", "implicit-dim",
                              "classes-as-dim-minus-3"])
def test_probabilities_are_explained_through_the_scores_they_normalise(finish):
    """A model returning probabilities or log-probabilities (PyTorch's MNIST example ends in
    log_softmax): R₀ came from their gradients, which saturate where the model is sure (the map
    0.41-0.76 of its peak off the logits' at 200× the scores). The scores are explained."""
    x = torch.rand(3, 3, 16, 16, dtype=D)
    plain = _Returning(lambda y: 200 * y).double().eval()
    finished = _Returning(lambda y: finish(200 * y)).double().eval()
    finished.load_state_dict(plain.state_dict())
    for init in ("gradcam", "comparative"):
        expected, ex = (rsp_fast.RSP(m, init=init).explain(x) for m in (plain, finished))
        assert torch.equal(ex.logits, expected.logits) and torch.equal(ex.target, expected.target)
        assert rel_err(ex.attribution, expected.attribution) < 1e-12


def test_a_softmax_over_another_dim_than_the_classes_is_explained_as_the_model_outputs_it():
    """softmax(-1) of an N×classes×1×1 output normalises a dim of size 1: every class scores 1,
    and the map was the scores model's, its target not the model's argmax."""
    x = torch.rand(2, 3, 16, 16, dtype=D)
    model = _Returning(lambda y: y[:, :, None, None].softmax(-1)).double().eval()
    ex = rsp_fast.RSP(model).explain(x)
    assert torch.equal(ex.logits, torch.ones_like(ex.logits)) and (ex.target == 0).all()


def test_a_model_without_classes_is_told_so():
    """Logits of shape (N, 0): an IndexError from argmax, deep inside, where no target was given."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 0))
    with pytest.raises(RSPError, match=r"logits of shape \(2, 0\): no class to explain"):
        rsp_fast.RSP(model).attribute(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("wrap, kind", [(lambda y: {"scores": y}, "dict"), (lambda y: (y, y), "tuple"), (lambda y: [y], "list")])
def test_models_returning_several_outputs_are_told_what_they_return(wrap, kind):
    class Several(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return wrap(self.net(x))
    with pytest.raises(RSPError, match=rf"must return logits of shape \(N, classes\), not a {kind} \(or an output whose 'logits'"
                                       r".*: explain a module whose forward returns the logits alone"):
        rsp_fast.RSP(Several()).attribute(torch.rand(2, 3, 16, 16))


class _RoutedConv(nn.Module):
    """CondConv's pattern: a per-sample kernel mixed from experts by weights computed from the
    input, and a forward that unpacks sizes (so it is traced with an example)."""

    def __init__(self, channels: int = 8, experts: int = 3):
        super().__init__()
        self.route = nn.Linear(channels, experts)
        self.weight = nn.Parameter(torch.randn(experts, channels * channels * 9) * 0.1)

    def forward(self, x):
        B, C, H, W = x.shape
        assert C == self.route.in_features
        kernels = (torch.sigmoid(self.route(x.mean((2, 3)))) @ self.weight).view(B * C, C, 3, 3)
        return F.conv2d(x.reshape(1, B * C, H, W), kernels, padding=1, groups=B).view(B, C, H, W)


def test_convolutions_with_weights_computed_from_the_input_are_refused_by_module():
    """Such a conv is named by its module's path with the reason; the same reason at several
    places is said once (it was said per place, and a parameter read while tracing with an
    example recursed until Python's limit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), *[_RoutedConv() for _ in range(5)], nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        rsp_fast.RSP(model).attribute(torch.rand(2, 3, 12, 12))
    message = str(info.value)
    assert re.search(r"no RSP rule for 2 \(conv2d\), 3 \(conv2d_1\), 4 \(conv2d_2\) and 2 more: a convolution whose "
                     r"weight is computed from the activations", message), message
    assert message.count("computed from the activations") == 1 and "Recursion" not in message


def test_a_layer_inside_a_module_run_whole_is_pointed_to_that_module():
    from rsp_fast.efficientnet_lite import EfficientNetLite0
    model = EfficientNetLite0(num_classes=4).eval()
    with pytest.raises(RSPError, match=r"'bn2\.act' is part of 'bn2' \(BatchNormAct2d\), which RSP runs as one layer: name 'bn2'"):
        rsp_fast.RSP(model, layer="bn2.act")

    class Holder(nn.Module):  # traced through, not run whole: its unused part is never called
        def __init__(self):
            super().__init__()
            self.net, self.spare = tiny_cnn(), nn.ReLU()

        def forward(self, x):
            return self.net(x)
    with pytest.raises(RSPError, match=r"layer 'body\.spare' is never called in Sequential.forward"):
        rsp_fast.RSP(nn.Sequential(OrderedDict(body=Holder())), layer="body.spare")


def test_hooks_of_an_in_place_relu_run():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=5).double().eval()
    calls = []
    model.features[4].register_forward_pre_hook(lambda m, i: calls.append(1))  # a ReLU(inplace=True)
    model.features[4].register_forward_hook(lambda m, i, out: out.mul_(0.5))   # a hook changing the output
    x = torch.randn(1, 3, 32, 32, dtype=D)
    explainer = rsp_fast.RSP(model)
    ex = explainer.explain(x)
    assert calls == [1, 1]  # RSP's pass, and model(x) that its trace is checked against (once per input shape)
    explainer.explain(x)
    assert calls == [1, 1, 1]
    assert torch.allclose(ex.logits, model(x), rtol=0, atol=1e-12)


class _WrittenInPlace(nn.Module):
    """A residual block whose last step is written as an in-place statement (``out.add_(x)``,
    ``out.relu_()``, ``F.relu(out, inplace=True)``, ...), or as the same op reassigned."""

    STATEMENTS = {
        "add_": (lambda m, out, x: out.add_(x), lambda m, out, x: out + x),
        "relu_": (lambda m, out, x: out.relu_(), lambda m, out, x: out.relu()),
        "F.relu_": (lambda m, out, x: F.relu_(out), lambda m, out, x: F.relu(out)),
        "relu_inplace_keyword": (lambda m, out, x: F.relu(out, inplace=True), lambda m, out, x: F.relu(out)),
        "relu_inplace_positional": (lambda m, out, x: F.relu(out, True), lambda m, out, x: F.relu(out)),
        "hardtanh_": (lambda m, out, x: F.hardtanh_(out, 0.0, 6.0), lambda m, out, x: F.hardtanh(out, 0.0, 6.0)),
        "module": (lambda m, out, x: m.relu(out), lambda m, out, x: m.relu(out)),
        "clamp_": (lambda m, out, x: out.clamp_(min=0), lambda m, out, x: out.clamp(min=0)),
        "mul_": (lambda m, out, x: out.mul_(0.5), lambda m, out, x: out * 0.5),
    }

    def __init__(self, statement: str, in_place: bool):
        super().__init__()
        self.op = self.STATEMENTS[statement][0 if in_place else 1]
        self.in_place = in_place
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.fc = nn.ReLU(inplace=True), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        out = self.c2(x)
        if self.in_place:
            self.op(self, out, x)  # the result is not used: the write is the point
        else:
            out = self.op(self, out, x)
        return self.fc(F.relu(self.c3(out)).mean((2, 3)))  # c3 reads what the statement wrote


@pytest.mark.parametrize("statement", list(_WrittenInPlace.STATEMENTS))
def test_in_place_writes_are_explained_as_the_model_computes_them(statement):
    torch.manual_seed(0)
    written = _WrittenInPlace(statement, in_place=True).double().eval()
    reassigned = _WrittenInPlace(statement, in_place=False).double().eval()
    reassigned.load_state_dict(written.state_dict())
    x = torch.randn(2, 3, 12, 12, dtype=D)
    ex = rsp_fast.RSP(written).explain(x, record=True)
    expected = rsp_fast.RSP(reassigned).explain(x)
    with torch.no_grad():
        assert torch.allclose(ex.logits, written(x.clone()), rtol=0, atol=1e-12)
    assert rel_err(ex.attribution, expected.attribution) < 1e-12
    total = ex.attribution.flatten(1).sum(1)
    assert torch.allclose(total, ex.initial.flatten(1).sum(1) - ex.dropped, rtol=0, atol=1e-9)


class _AliasWrittenInPlace(nn.Module):
    """``y += …`` on a tensor the forward also reads under another name (``z = y``) or through a
    view: fx's graph keeps the old value there, so its logits are not the model's."""

    def __init__(self, alias):
        super().__init__()
        self.alias = alias
        self.a, self.b, self.c = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.a(x)
        z = self.alias(y)
        y += self.b(x)
        return self.fc(F.relu(self.c(F.relu(z))).mean((2, 3)))


@pytest.mark.parametrize("alias", [lambda y: y, lambda y: y.view(y.shape)], ids=["name", "view"])
def test_an_in_place_write_through_an_alias_is_named_as_a_likely_cause(alias):
    model = _AliasWrittenInPlace(alias).double().eval()
    with pytest.raises(RSPError, match=r"an in-place op \(y \+= …, y.add_\(…\)\) on a tensor the forward also reads "
                                       "under another name or through a view"):
        rsp_fast.RSP(model).attribute(torch.randn(2, 3, 10, 11, dtype=D))


class _Activated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act, self.c1, self.c2, self.fc = act, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(self.act(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("in_place, twin", [(F.relu_, F.relu), (lambda t: torch.clamp_min_(t, 0), lambda t: torch.clamp_min(t, 0)),
                                            (lambda t: F.leaky_relu_(t, 0.1), lambda t: F.leaky_relu(t, 0.1)),
                                            (lambda t: F.elu_(t), F.elu), (lambda t: F.hardtanh_(t, 0.0, 6.0), F.relu6),
                                            (lambda t: -F.relu(t) + 1, lambda t: F.relu(t) * -1 + 1),
                                            (lambda t: torch.neg(-F.relu(t)), F.relu),
                                            (lambda t: F.relu(t).unflatten(1, (2, 4)).flatten(1, 2), F.relu),
                                            (lambda t: torch.unflatten(F.relu(t), 1, (2, 4)).flatten(1, 2), F.relu)],
                         ids=["relu_", "clamp_min_", "leaky_relu_", "elu_", "hardtanh_", "minus", "neg", "unflatten",
                              "torch.unflatten"])
def test_in_place_activation_functions_have_the_rules_of_their_twins(in_place, twin):
    """Also −x and x.unflatten, which were refused while x·(−1) and nn.Unflatten have rules."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12, dtype=D)
    results = []
    for act in (in_place, twin):
        torch.manual_seed(1)
        model = _Activated(act).double().eval()
        results.append(rsp_fast.RSP(model).attribute(x))
    assert rel_err(results[0], results[1]) < 1e-12


class _TestTimeAugmented(nn.Module):
    """Both orientations of each image in one batch, their logits averaged."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.conv, self.fc = dim, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        both = torch.cat([x, x.transpose(2, 3)], self.dim) if self.dim is not None else torch.cat([x, x.transpose(2, 3)])
        y = self.fc(F.relu(self.conv(both)).mean((2, 3)))
        return (y[:x.shape[0]] + y[x.shape[0]:]) / 2


@pytest.mark.parametrize("dim", [0, None, -4])
def test_concatenation_along_the_batch_is_refused(dim):
    model = _TestTimeAugmented(dim).eval()
    with pytest.raises(RSPError, match="torch.cat along the batch dimension, which mixes samples"):
        rsp_fast.RSP(model).attribute(torch.randn(2, 3, 8, 8))


class _BatchStatistic(nn.Module):
    """A statistic over the batch mixed into each sample: on the relevance path (``path``, of
    an N×C×H×W map) or in the head (``head``, of the pooled N×C features)."""

    def __init__(self, path=None, head=None):
        super().__init__()
        self.path, self.head = path, head
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(6, track_running_stats=False)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = h + self.path(h) if self.path else h
        p = F.relu(self.conv2(h)).mean((2, 3))
        return self.fc(self.head(self, p) if self.head else p)


@pytest.mark.parametrize("statistic", [
    dict(path=lambda h: h.amax(-4, keepdim=True)), dict(path=lambda h: h.max(-4, keepdim=True).values),
    dict(path=lambda h: h.mean(-4, keepdim=True)), dict(path=lambda h: torch.sum(h, dim=(-4, -1), keepdim=True)),
    dict(path=lambda h: torch.cat([h, 2 * h], -4)[:h.shape[0]]), dict(head=lambda m, p: m.norm(p)),
    dict(path=lambda h: h * torch.softmax(h, -4)), dict(path=lambda h: h * torch.sigmoid(h.mean(0, keepdim=True)))],
    ids=["amax", "max-values", "mean", "sum", "cat", "head-batchnorm", "softmax-gate", "gate-of-a-batch-mean"])
def test_statistics_over_the_batch_are_refused_however_the_dimension_is_written(statistic):
    """Written as dim -4 of an N×C×H×W map, a mean, sum or max over the batch took the pooling
    rule: sample 0's map moved 0.43–0.62 of its peak when only the other samples changed. In the
    head, where R₀'s gradient is taken, a BatchNorm by the batch's statistics was not looked at
    (1.60 of the peak). A gate's or statistic's branch gets no relevance, and was not looked at
    either (a softmax over the batch as a gate: 0.074 of the peak)."""
    model = _BatchStatistic(**statistic).double().eval()
    with pytest.raises(UnsupportedModelError, match="along the batch dimension|normalises by the batch"):
        rsp_fast.RSP(model).attribute(torch.randn(3, 3, 9, 9, dtype=D))
    if "path" in statistic:  # and the cost of what RSP refuses is refused too
        with pytest.raises(UnsupportedModelError, match="along the batch dimension"):
            rsp_fast.cost(model, (3, 9, 9))


def _tokens_first_attention(m, p):  # CLIP's attention pool and nn.MultiheadAttention's default: T×N×C, dim 0 the tokens
    tokens = torch.stack([p, 2 * p, p.relu()])  # 3×N×C
    return torch.cat([tokens.mean(0, keepdim=True), tokens]).softmax(0).mean(0) * p


@pytest.mark.parametrize("statistic", [dict(path=lambda h: h.amax(-3, keepdim=True)), dict(path=lambda h: h.mean((-2, -1), True)),
                                       dict(head=lambda m, p: p - p.mean(-1, keepdim=True)),
                                       dict(head=lambda m, p: p * p.softmax(-1)), dict(head=_tokens_first_attention),
                                       dict(head=lambda m, p: torch.stack([p, 2 * p]).amax(0))],
                         ids=["amax", "mean", "head-mean", "head-softmax", "head-tokens-first", "head-ensemble-max"])
def test_statistics_within_a_sample_written_with_negative_dimensions_explain_each_sample_alone(statistic):
    """Also heads whose dim 0 is not the batch (tokens first, an ensemble's members stacked in
    front): refused for a while as mixing the samples."""
    torch.manual_seed(0)
    explainer = rsp_fast.RSP(_BatchStatistic(**statistic).double().eval())
    x = torch.randn(3, 3, 9, 9, dtype=D)
    together = explainer.attribute(x, target=1)
    for i in range(3):
        assert rel_err(together[i:i + 1], explainer.attribute(x[i:i + 1], target=1)) < 1e-12


class _TwoBranches(nn.Module):
    """Two convs of one input merged by ``merge``, then a conv and a head."""

    def __init__(self, merge):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Conv2d(3 if i < 2 else 6, 6, 3, padding=1) for i in range(3))
        self.fc, self.merge = nn.Linear(6, 4), merge

    def forward(self, x):
        h = self.merge(self.a(x), self.b(x))
        return self.fc(F.relu(self.c(F.relu(h))).mean((2, 3)))


@pytest.mark.parametrize("merge", [lambda a, b: torch.stack([a, b]).sum(0), lambda a, b: torch.stack([a, b]).mean(0) * 2,
                                   lambda a, b: torch.stack([a, b], 1).mean(1) * 2, lambda a, b: torch.stack((a, b), dim=0).sum(dim=0),
                                   lambda a, b: torch.stack([a, b], -1).mean(4) * 2, lambda a, b: torch.stack([a, b], 4).mean(-1) * 2],
                         ids=["stack0-sum", "stack0-mean", "stack1-mean", "keywords", "signs", "signs-reversed"])
def test_branches_stacked_and_summed_away_explain_like_their_add(merge):
    """stack([a, b]).sum(0) is a + b, each sample's rows its own: it was refused as stacking
    along the batch; a mean over the stacked dimension took the pooling rule (3× the map's
    peak off a + b), now the add rule, as a sum does."""
    x = torch.randn(2, 3, 8, 8, dtype=D)
    expected = rsp_fast.RSP(_TwoBranches(lambda a, b: a + b).double().eval()).attribute(x)
    assert rel_err(rsp_fast.RSP(_TwoBranches(merge).double().eval()).attribute(x), expected) < 1e-12


def test_branches_stacked_along_the_batch_and_kept_there_are_refused():
    model = _TwoBranches(lambda a, b: torch.stack([a, b]).flatten(0, 1)[:a.shape[0]]).eval()
    with pytest.raises(RSPError, match="torch.stack along the batch dimension"):
        rsp_fast.RSP(model).attribute(torch.randn(2, 3, 8, 8))


class _HeadsInTheBatch(nn.Module):
    """Self-attention with its heads folded into the batch dimension (BoTNet's)."""

    def __init__(self, channels=8, heads=2):
        super().__init__()
        self.heads, self.conv = heads, nn.Conv2d(3, channels, 3, padding=1)
        self.qkv, self.fc = nn.Conv2d(channels, 3 * channels, 1), nn.Linear(channels, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).split(C, 1)
        q, k, v = (t.reshape(B * self.heads, C // self.heads, H * W) for t in (q, k, v))
        attended = (q.transpose(1, 2) @ k).softmax(-1) @ v.transpose(1, 2)
        return self.fc(F.relu(attended.transpose(1, 2).reshape(B, C, H, W)).mean((2, 3)))


def test_recording_a_model_with_heads_in_the_batch_keeps_one_dropped_entry_per_sample():
    torch.manual_seed(0)
    explainer = rsp_fast.RSP(_HeadsInTheBatch().double().eval())
    x = torch.randn(3, 3, 6, 6, dtype=D)
    ex = explainer.explain(x, record=True)
    assert ex.dropped.shape == (3,)
    for i in range(3):
        alone = explainer.explain(x[i:i + 1], record=True)
        assert rel_err(ex.attribution[i:i + 1], alone.attribution) < 1e-12
        assert torch.allclose(ex.dropped[i:i + 1], alone.dropped, rtol=0, atol=1e-12)


class _TwoOutputs(nn.Module):
    """Logits and an embedding from one trunk: the embedding's layer is off the logits' path."""

    def __init__(self, detach=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.emb = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.fc = nn.Linear(8, 10)
        self.detach = detach

    def forward(self, x):
        f = self.body(x)
        logits = self.fc(f.mean((2, 3)))
        return {"logits": logits.detach() if self.detach else logits, "embedding": self.emb(f).flatten(1)}


@pytest.mark.parametrize("layer,detach", [("emb.1", False), (None, True)])
def test_logits_that_do_not_depend_on_the_saliency_layer_are_named(layer, detach):
    """A layer off the logits' path, or logits the forward detaches: an RSPError that names the
    layer, not autograd's RuntimeError from inside the initial relevance."""
    model = _TwoOutputs(detach).double().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(RSPError, match=r"do not depend on the saliency layer '(emb\.1|body)' through autograd"):
        rsp_fast.RSP(model, layer=layer).attribute(x)


def test_inputs_logits_and_maps_of_the_wrong_kind_are_named():
    """Sparse or meta inputs, integer or boolean logits, and a heat map asked of something that is
    not a tensor: each an RSPError that says which, not an error from deep inside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    explainer = rsp_fast.RSP(model, layer="1")
    with pytest.raises(RSPError, match="not one of layout torch.sparse_coo"):
        explainer.attribute(x.to_sparse())
    with pytest.raises(RSPError, match="meta device"):
        explainer.attribute(x.to("meta"))
    for cast in (torch.long, torch.bool):
        rounded = nn.Sequential(model, _Cast(cast)).eval()
        with pytest.raises(RSPError, match=f"floating-point logits, not {cast}"):
            rsp_fast.RSP(rounded, layer="0.1").attribute(x)
    with pytest.raises(RSPError, match="heatmap takes a relevance tensor"):
        rsp_fast.heatmap(None)


class _Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return (x > 0).to(self.dtype)
