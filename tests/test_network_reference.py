"""Whole networks against an independent, naive RSP written from the spec alone
(tests/reference_network.py): BatchNorm folded, residual adds with their fan-out summed,
concatenations split, depthwise and grouped convs, pools of every kind, Linear layers,
a saliency layer after a Linear. Float64, every sample of a batch as the reference gives it alone."""
import pytest
import torch

import rsp_fast
from reference_network import BUILDERS, build, make_input, reference

BACKENDS = [b for b, status in rsp_fast.backends("cpu").items() if status == "available"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init,hostile_k", [("gradcam", 0), ("comparative", 3)])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_whole_network_matches_the_independent_reference(name, init, hostile_k, backend):
    for seed in (0, 1):
        model, x = build(name, seed), make_input(name, 2, seed)
        ours = rsp_fast.RSP(model, layer="features", init=init, hostile_k=hostile_k, backend=backend).attribute(x)
        theirs = reference(model, x, init, hostile_k)
        scale = theirs.flatten(1).abs().max(1).values
        assert (scale > 0).all()
        err = ((ours - theirs).flatten(1).abs().max(1).values / scale).max().item()
        assert err < 1e-10, f"{name}, seed {seed}: {err:.2e} of the map's largest value"
