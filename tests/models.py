"""Small models built from torch.nn only, and test cases for the kernels, shared by the tests and benchmarks."""
from __future__ import annotations

import torch
from torch import nn


def make_vgg_features(cfg, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class GoldenVGG(nn.Module):
    """The VGG of ../shared/golden: features -> flatten -> Linear, ReLU, Dropout, Linear."""

    def __init__(self, cfg, flat_features: int, num_classes: int):
        super().__init__()
        self.features = make_vgg_features(cfg)
        self.classifier = nn.Sequential(nn.Linear(flat_features, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def golden_model(golden: dict, dtype: torch.dtype = torch.float64) -> GoldenVGG:
    sd = golden["state_dict"]
    model = GoldenVGG(golden["cfg"], sd["classifier.0.weight"].shape[1], golden["num_classes"]).double()
    model.load_state_dict(sd)  # load in float64 so no precision is lost before the cast
    return model.to(dtype).eval()


def failing_factory() -> nn.Module:
    """A ``--model package.module:factory`` whose own code fails."""
    raise RuntimeError("no weights for this net")


def tiny_cnn(num_classes: int = 5) -> nn.Module:
    """A small CNN any input size fits (used by the CLI and video tests through
    ``--model models:tiny_cnn``)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)).eval()


def tiny_clip_spec():
    """A small video classifier (3-D convs) as a ModelSpec with its own input size and class
    names (used by the CLI test through ``--model models:tiny_clip_spec``)."""
    from rsp_fast.models import ModelSpec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3))
    return ModelSpec(model, "tiny clips", input_size=32, class_names=["walk", "run", "jump"])


def conv_products_case(N, C, O, H, W, kernel, stride, dilation, padding, density=0.5, sign="mixed",
                       dtype=torch.float64, zero_region=False):
    """Arguments of a products kernel for a conv of that geometry: (x̂, R, kernel, stride,
    dilation, padding (left, right, top, bottom)), R with about ``density`` of it non-zero and
    ``sign`` "mixed", "positive" or "negative"; with ``zero_region`` the input's top half is
    zero (patches with no input at all, whose responses are 0: S must be 0 there)."""
    left, right, top, bottom = padding
    x = torch.randn(N, C, H, W, dtype=dtype).clamp(min=0)
    if zero_region:
        x[:, :, : H // 2] = 0
    h = (H + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w = (W + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    R = torch.randn(N, O, h, w, dtype=dtype) * (torch.rand(N, O, h, w) < density)
    R = {"mixed": R, "positive": R.abs(), "negative": -R.abs()}[sign]
    return x, R, kernel, stride, dilation, padding
