"""The localisation benchmark runs end to end (quick mode) and writes what it promises."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import eval_localization  # noqa: E402
from localization.models import ARCHITECTURES  # noqa: E402

import rsp_fast  # noqa: E402


def test_quick_run_writes_table_json_details_and_figure(tmp_path):
    env = dict(os.environ, RSP_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_localization.py"), "--quick", "--model", "vgg",
                           "--out", str(tmp_path), "--seed", "3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval_vgg.json").read_text())
    assert set(results) == set(eval_localization.METHODS), proc.stderr[-3000:]  # every method ran
    for method, row in results.items():
        assert set(row) == set(eval_localization.MAIN_KEYS), method
        for key, value in row.items():
            assert 0.0 <= value <= 1.0 and not math.isnan(value), (method, key, value)
    details = json.loads((tmp_path / "eval_vgg_details.json").read_text())
    assert details["seed"] == 3 and 0.5 < details["accuracy"]["label_accuracy"] <= 1.0
    for method, extra in details["methods"].items():
        assert -1.0 <= extra["randomization_spearman"] <= 1.0, method
        assert 0.0 <= extra["discriminative_mass_share"] <= 1.0, method
    photo_methods = details["photos"]["methods"]
    assert any("deletion_auc" in m for m in photo_methods.values())
    for m in photo_methods.values():
        assert "error" in m or (0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1)
    table = (tmp_path / "eval_vgg.md").read_text()
    assert "| RSP (comparative) |" in table and "| Grad-CAM |" in table and table in proc.stdout + "\n"
    assert (tmp_path / "eval_vgg.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
    assert list((tmp_path / "cache" / "eval").glob("vgg-64-*.pt"))  # the trained weights are cached


def test_both_architectures_are_explained_by_rsp_and_the_baselines_layer_exists():
    for name, arch in ARCHITECTURES.items():
        model = arch.build().eval()
        x = torch.rand(2, 1, 64, 64)
        explainer = rsp_fast.RSP(model, layer=arch.layer)
        R = explainer.attribute(x, target=torch.tensor([1, 2]))
        assert R.shape == x.shape and torch.isfinite(R).all(), name
        for top in arch.top:
            model.get_submodule(top)


def test_randomisation_changes_only_the_top_modules():
    arch = ARCHITECTURES["resnet"]
    model = arch.build().eval()
    twin = eval_localization.randomized_top(model, arch.top, seed=0)
    changed = 0
    for name, p in model.named_parameters():
        q = twin.get_parameter(name)
        if any(name.startswith(t + ".") for t in arch.top):
            changed += p.dim() > 1 and not torch.equal(p, q)  # conv/linear weights are redrawn
        else:
            assert torch.equal(p, q), name
    assert changed == sum(p.dim() > 1 for n, p in model.named_parameters() if n.split(".")[0] in arch.top)
