"""The attribution methods the localisation benchmark compares, each as
``make(model, layer) -> explain(x, target) -> maps (N, H, W)`` at the input's resolution.

Baselines come from the libraries users would pick (captum, zennit); only RSP is ours. Captum's
hooks cannot run through in-place ReLUs, so its methods get a copy of the model with them
switched off (same function, same weights).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import rsp_fast

sys.path.insert(0, str(Path(__file__).parents[1]))
import peers  # noqa: E402  (benchmarks/peers.py: the same baselines bench_e2e.py times)


def _channel_sum(attribution: torch.Tensor, size) -> torch.Tensor:
    maps = attribution.detach().float().sum(1, keepdim=True)
    if maps.shape[-2:] != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def _out_of_place(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return twin


def rsp(init: str) -> Callable:
    def make(model, layer):
        explainer = rsp_fast.RSP(model, layer=layer, init=init)
        return lambda x, target: _channel_sum(explainer.attribute(x, target=target), x.shape[-2:])
    return make


def gradcam(model, layer):
    from captum.attr import LayerGradCam

    twin = _out_of_place(model)
    method = LayerGradCam(twin, twin.get_submodule(layer))
    return lambda x, target: _channel_sum(method.attribute(x, target=target, relu_attributions=True), x.shape[-2:])


def _captum(name: str, **kwargs) -> Callable:
    def make(model, layer):
        import captum.attr

        method = getattr(captum.attr, name)(_out_of_place(model))
        return lambda x, target: _channel_sum(method.attribute(x.clone().requires_grad_(), target=target, **kwargs),
                                              x.shape[-2:])
    return make


def zennit_lrp(model, layer):
    run = peers.zennit_epsilon_plus_flat(model, layer)
    return lambda x, target: _channel_sum(run(x, target), x.shape[-2:])


# key in the JSON -> (label in tables and figures, maker)
METHODS: dict[str, tuple[str, Callable]] = {
    "rsp_comparative": ("RSP (comparative)", rsp("comparative")),
    "rsp_gradcam": ("RSP (Grad-CAM init)", rsp("gradcam")),
    "gradcam": ("Grad-CAM", gradcam),
    "gradient_x_input": ("gradient x input", _captum("InputXGradient")),
    "guided_backprop": ("Guided Backprop", _captum("GuidedBackprop")),
    "integrated_gradients": ("Integrated Gradients", _captum("IntegratedGradients", n_steps=32, internal_batch_size=256)),
    "lrp_epsilon_plus_flat": ("LRP eps+flat (zennit)", zennit_lrp),
}


def explain_all(fn: Callable, x: torch.Tensor, target: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch], target[i:i + batch]) for i in range(0, len(x), batch)])
