"""Parity with the authors' code itself, beyond the four golden files: random VGG-style
networks (widths, depths, pools, non-square inputs, seeds) explained by their RSP and ours,
float64, batch 1, Grad-CAM init. Needs a checkout of github.com/wjNam/Relative_Sectional_Propagation
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
