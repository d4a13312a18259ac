"""The attribution methods rsp_fast is measured against, each as ``make(model, layer) -> fn(x, target)``.

Baselines come from the libraries users would use (captum, zennit); the authors' RSP is
imported at run time from a checkout the user names (none of its code lives here).
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import nn

import rsp_fast


def forward(model, layer):
    def run(x, target):
        with torch.no_grad():
            return model(x)
    return run


def forward_grad(model, layer):
    def run(x, target):
        x = x.detach().requires_grad_()
        out = model(x)
        (g,) = torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), x)
        return g
    return run


def captum_gradcam(model, layer):
    from captum.attr import LayerGradCam

    method = LayerGradCam(model, model.get_submodule(layer))
    return lambda x, target: method.attribute(x, target=target)


def captum_lrp(model, layer):
    from captum.attr import LRP

    method = LRP(model)
    return lambda x, target: method.attribute(x, target=target)


def zennit_epsilon_plus_flat(model, layer):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, SequentialMergeBatchNorm

    # its canonizers rewrite the model while attributing (BatchNorms merged into the convs) and, where
    # one fails part-way (DenseNet), leave it changed: a copy, so the other methods time the model itself
    model = copy.deepcopy(model)
    residual = any(type(m).__name__ in ("Bottleneck", "BasicBlock") for m in model.modules())
    canonizers = [ResNetCanonizer()] if residual else [SequentialMergeBatchNorm()]
    composite = EpsilonPlusFlat(canonizers=canonizers)

    def run(x, target):
        with Gradient(model=model, composite=composite) as attributor:
            eye = torch.eye(model(x[:1]).shape[1], device=x.device, dtype=x.dtype)
            _, relevance = attributor(x, eye[target])
        return relevance
    return run


def rsp(backend: str, precision: str = "fp32", graph: bool = False) -> Callable:
    """rsp_fast; ``graph``: the static-shape path (a CUDA graph per input shape)."""
    def make(model, layer):
        explainer = rsp_fast.RSP(model, layer=layer, backend=backend, precision=precision)
        if not graph:
            return lambda x, target: explainer.attribute(x, target=target)
        static = {}

        def run(x, target):
            if x.shape not in static:
                static[x.shape] = explainer.static(x)
            return static[x.shape](x, target)
        return run
    return make


def authors_rsp(repo: str) -> Callable:
    """The authors' main flow (their VGG16 with their layers, Grad-CAM init, RSP), batch 1."""
    def make(model: nn.Module, layer):
        sys.path.insert(0, repo)
        from baselines.gradcam import GradCam
        from modules.vgg import vgg16

        theirs = vgg16(pretrained=False).to(next(model.parameters()).device).eval()
        theirs.load_state_dict(model.state_dict())
        bp = GradCam(theirs, target_layer=29)

        def run(x, target):
            theirs(x)
            cam = bp.generate_cam_without_sum(x, int(target[0]))
            cam = cam / (cam.max() + 1e-9)
            return theirs.RSP(R=cam.detach())
        return run
    return make


METHODS = {
    "forward": forward,
    "forward + input gradient": forward_grad,
    "captum LayerGradCam": captum_gradcam,
    "captum LRP": captum_lrp,
    "zennit EpsilonPlusFlat": zennit_epsilon_plus_flat,
}
