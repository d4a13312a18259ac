"""Parity with the authors' code (tests/golden = ../shared/golden, float64, batch 1)."""
import pytest
import torch

import rsp_fast
from conftest import GOLDEN_FILES, load_golden, rel_err
from models import golden_model

BACKENDS = [b for b, status in rsp_fast.backends("cpu").items() if status == "available"]


def _explain(golden, dtype, backend):
    model = golden_model(golden, dtype)
    explainer = rsp_fast.RSP(model, layer=f"features.{golden['saliency_layer']}", init=golden["init"],
                             hostile_k=len(golden["hostile"]), backend=backend)
    hostile = golden["hostile"] or None
    return explainer.explain(golden["x"].to(dtype), target=golden["target"], hostile=hostile, record=True)


def test_golden_files_present():
    assert len(GOLDEN_FILES) == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_float64_parity_every_step(path, backend):
    g = load_golden(path)
    ex = _explain(g, torch.float64, backend)
    assert ex.attribution.dtype == torch.float64
    assert ex.target.tolist() == [g["target"]]
    assert rel_err(ex.logits, g["logits"]) < 1e-12
    assert rel_err(ex.initial, g["R_init"]) < 1e-9
    for step in g["steps"]:
        ours = ex.steps[f"features.{step['index']}"]
        assert ours.shape == step["relevance"].shape
        assert rel_err(ours, step["relevance"]) < 1e-9, f"step features.{step['index']} ({step['module']})"
    assert rel_err(ex.attribution, g["R_input"]) < 1e-9


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_float64_cams_match(path):
    g = load_golden(path)
    ex = _explain(g, torch.float64, "torch")
    cams = g["cams"].squeeze(1)
    # The gradcam files store the raw map, the comparative ones the max-normalised map.
    peak = cams.flatten(1).amax(1).view(-1, 1, 1, 1)
    if not torch.allclose(peak, torch.ones_like(peak)):
        cams = cams / (peak + 1e-9)
    assert rel_err(ex.cams[:, 0], cams) < 1e-9


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_float32_parity(path):
    g = load_golden(path)
    ex = _explain(g, torch.float32, "auto")
    assert ex.attribution.dtype == torch.float32
    assert rel_err(ex.initial, g["R_init"]) < 1e-4
    for step in g["steps"]:
        assert rel_err(ex.steps[f"features.{step['index']}"], step["relevance"]) < 1e-4
    assert rel_err(ex.attribution, g["R_input"]) < 1e-4


def test_golden_attribution_is_bipolar():
    g = load_golden(next(p for p in GOLDEN_FILES if "comparative" in p.stem))
    R = _explain(g, torch.float64, "torch").attribution
    heat = rsp_fast.heatmap(R)
    assert heat.shape == (1, *g["x"].shape[-2:])
    assert (heat > 0).any() and (heat < 0).any()
