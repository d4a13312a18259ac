"""Parity with the authors' code itself, beyond the four golden files: random VGG-style
networks (widths, depths, pools, non-square inputs, seeds) explained by their RSP and ours,
float64, batch 1, Grad-CAM init; and their layer rules against ours, layer by layer, on random
conv geometries (kernels, strides, paddings, pools), a batch against single images. Needs a checkout of github.com/wjNam/Relative_Sectional_Propagation
(imported at run time, none of it in this repository):

    RSP_FAST_AUTHORS_REPO=/path/to/checkout bash scripts/test.sh tests/test_authors_parity.py

Skipped without it (CI cannot download it)."""
import os
import random
import sys

import pytest
import torch

import rsp_fast
from conftest import rel_err
from models import GoldenVGG

REPO = os.environ.get("RSP_FAST_AUTHORS_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set RSP_FAST_AUTHORS_REPO to a checkout of the authors' code")


def _random_vgg(seed: int):
    """A VGG-style cfg (2–4 stages of 1–3 convs, each stage ending in a 2×2 max pool), an input
    whose sides the pools divide, and the number of classes."""
    rng = random.Random(seed)
    cfg = []
    for _ in range(rng.randint(2, 4)):
        cfg += [rng.choice([4, 6, 8, 12, 16])] * rng.randint(1, 3) + ["M"]
    pools = cfg.count("M")
    H = rng.choice([32, 48, 64])
    return cfg, (H, rng.choice([H, H + 2 ** pools])), rng.choice([5, 10])


@pytest.mark.parametrize("seed", range(12))
def test_random_vgg_matches_the_authors_rsp(seed):
    sys.path.insert(0, REPO)
    from baselines.gradcam import GradCam
    from modules.layers import Dropout, Linear, ReLU, Sequential
    from modules.vgg import VGG, make_layers

    cfg, (H, W), classes = _random_vgg(seed)
    torch.manual_seed(seed)
    flat = [c for c in cfg if c != "M"][-1] * (H >> cfg.count("M")) * (W >> cfg.count("M"))
    ours = GoldenVGG(cfg, flat, classes).double().eval()
    theirs = VGG(make_layers(cfg), num_classes=classes, init_weights=False)
    theirs.classifier = Sequential(Linear(flat, 32), ReLU(True), Dropout(), Linear(32, classes))
    theirs.load_state_dict(ours.state_dict())
    theirs.double().eval()
    x = torch.randn(1, 3, H, W, dtype=torch.float64)
    saliency = len(theirs.features) - 2  # the last ReLU before the last max pool, as their VGG16 flow
    cam = GradCam(theirs, target_layer=saliency).generate_cam_without_sum(x.clone(), None)
    expected = theirs.RSP(R=(cam / (cam.max() + 1e-9)).detach())
    explainer = rsp_fast.RSP(ours, layer=f"features.{saliency}", init="gradcam")
    got = explainer.attribute(x, target=int(ours(x).argmax()))
    assert rel_err(got, expected) < 1e-9


def _random_geometry(seed: int):
    """Conv + ReLU layers of kernel 1–7, stride 1–3, padding 0–k//2, max pools (overlapping,
    ceil mode) between them, on an input of odd or even sides; widths other than 3 (their conv
    takes the z^B rule whenever its input has 3 channels, rsp_fast only on the raw input: see
    the README), square kernels (their "1×1, no purge" reads the kernel's height alone)."""
    rng = random.Random(seed)
    layers, channels, size = [], 3, (rng.choice([33, 40, 47, 57]), rng.choice([35, 48, 57]))
    input_size = size
    for i in range(rng.randint(2, 5)):
        k = rng.choice([1, 3, 3, 5, 7]) if i else rng.choice([3, 5, 7])
        s, p = rng.choice([1, 1, 2, 3]), rng.randint(0, k // 2)
        out = tuple((n + 2 * p - k) // s + 1 for n in size)
        if min(out) < 4:
            break
        width = rng.choice([4, 5, 7, 9, 12])
        layers.append(("conv", channels, width, k, s, p))
        channels, size = width, out
        if rng.random() < 0.4 and min(size) >= 8:
            pk, ps, ceil = rng.choice([(2, 2, False), (3, 2, False), (2, 2, True), (3, 2, True)])
            layers.append(("pool", pk, ps, ceil))
            size = tuple(-(-(n - pk) // ps) + 1 if ceil else (n - pk) // ps + 1 for n in size)
    return layers, input_size


@pytest.mark.parametrize("seed", range(8))
def test_layer_rules_match_the_authors_step_by_step_on_random_geometries(seed):
    """A relevance given at the last ReLU (their model.RSP(R=rel)), compared at every layer's
    input; and a batch of 3 against their three single-image passes."""
    sys.path.insert(0, REPO)
    from modules import layers as theirs_layers

    spec, input_size = _random_geometry(seed)
    torch.manual_seed(seed)
    ours, theirs = [], []
    for kind, *args in spec:
        if kind == "conv":
            c_in, c_out, k, s, p = args
            ours += [torch.nn.Conv2d(c_in, c_out, k, s, p), torch.nn.ReLU()]
            theirs += [theirs_layers.Conv2d(c_in, c_out, k, s, p), theirs_layers.ReLU()]
        else:
            k, s, ceil = args
            ours.append(torch.nn.MaxPool2d(k, s, ceil_mode=ceil))
            theirs.append(theirs_layers.MaxPool2d(k, s, ceil_mode=ceil))
    saliency = max(i for i, m in enumerate(ours) if isinstance(m, torch.nn.ReLU))
    features = torch.nn.Sequential(*ours)
    model = torch.nn.Sequential(features, torch.nn.Flatten(), torch.nn.LazyLinear(5)).double().eval()
    xs = torch.randn(3, 3, *input_size, dtype=torch.float64)
    model(xs)  # sizes the lazy head
    authors = theirs_layers.Sequential(*theirs).double().eval()
    authors.load_state_dict(features.state_dict())
    shape = features[:saliency + 1](xs).shape
    R0 = torch.randn(shape, dtype=torch.float64) * (torch.rand(shape) < 0.6)

    got = rsp_fast.RSP(model, layer=f"0.{saliency}").explain(xs, initial=R0, record=True)
    for i in range(3):
        with torch.enable_grad():
            authors(xs[i:i + 1].clone())  # their layers record their inputs in the forward
            R = R0[i:i + 1]
            for j in range(saliency, -1, -1):
                R = authors[j].RSP_relprop(R)
                assert rel_err(got.steps[f"0.{j}"][i:i + 1], R.detach()) < 1e-12, f"layer {j}: {spec}"
