"""The benchmark scripts run (quick mode) and write well-formed JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {"sectional_normalize", "purge"} <= {r["op"] for r in rows} <= {"sectional_normalize", "purge", "sectional_matmul"}
    assert all(r["seconds_median"] > 0 and r["speedup"] > 0 for r in rows)
    assert "| op |" in proc.stdout


def test_bench_video_on_a_demo_clip_of_any_size(tmp_path):
    out = tmp_path / "v.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_video.py"), "--size", "96x64", "--frames", "4",
                           "--batch-sizes", "2", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(out.read_text())
    assert row["batch"] == 2 and row["frames"] == 4 and row["fps"] > 0
    assert abs(row["decode_share"] + row["attribute_share"] + row["encode_share"] - 1) < 1e-9


def test_bench_video_times_frames_not_the_explainers_set_up(monkeypatch):
    """Every timed run built its own explainer (trace, first call's set-up), so a run of 32
    frames mostly timed that: one explainer, warmed before the clock, serves every run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_video

    calls = []

    def fake_explain_video(spec, src, dst, **kwargs):
        calls.append(kwargs)
        frames = kwargs.get("max_frames") or 1
        return {"totals": {"frames": frames, "decode_s": 1.0, "attribute_s": 1.0, "encode_s": 1.0}}

    monkeypatch.setattr(bench_video, "explain_video", fake_explain_video)
    assert bench_video.main(["--size", "64x48", "--frames", "4", "--batch-sizes", "1", "2"]) == 0
    explainers = {id(c.get("explainer")) for c in calls}
    assert len(calls) == 3 and len(explainers) == 1 and type(calls[0]["explainer"]).__name__ == "RSP"


def test_bench_conv_products_quick(tmp_path):
    """Both CUDA dense paths of the conv rule, run on CPU (the implicit GEMMs in Triton's
    interpreter), and the products beside another version of the kernels (here a copy of the same
    file, loaded as a module of its own: the same values)."""
    out = tmp_path / "c.json"
    baseline = tmp_path / "conv_products.py"
    baseline.write_text((ROOT / "rsp_fast" / "kernels" / "triton" / "conv_products.py").read_text())
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_conv_products.py"), "--quick", "--precisions",
                           "fp32", "--baseline-module", str(baseline), "--json", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["layer"] for r in rows] == ["8->6 at 9x9", "5->4 at 7x7"]
    assert all(r["grouped_conv_ms"] > 0 and r["implicit_gemm_ms"] > 0 and r["products_ms"] > 0 for r in rows)
    assert all(r["baselines"][str(baseline)]["products_ms"] > 0 and r["baselines"][str(baseline)]["max_rel_diff"] < 1e-12
               for r in rows)
    assert "| layer |" in proc.stdout


def test_tile_sweep_times_the_kernel_each_launch_runs():
    """bench_conv_products --tiles looked every kernel's time up under _{kernel}_kernel, but TMA
    filters run _filters_tma_kernel: the KeyError overwrote each TMA tile's measured time."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_conv_products
    from rsp_fast.kernels.triton import conv_products as cp

    tma_filters = 0
    for dtype in (torch.bfloat16, torch.float32):
        for kernel in ("filters", "responses", "back"):
            for t in bench_conv_products.candidate_tiles(dtype, kernel, True):
                name = bench_conv_products.kernel_name(kernel, t)
                assert type(getattr(cp, name)).__name__ in ("JITFunction", "InterpretedFunction"), name
                if kernel == "filters" and t is not None and t.tma:
                    tma_filters += 1
                    assert name == "_filters_tma_kernel"
    assert tma_filters > 0


def test_session21_kernels_read_tf32_as_rsp_fast_sets_it():
    """gpu_prepare.sh's baseline for bench_conv_products --baseline-module, session 21's kernels,
    read torch's legacy allow_tf32 flag, which raises once rsp_fast has set the fp32_precision
    strings: on a GPU the whole conv_products step would die at its first TF32 layer."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "069aa30^{commit}"], capture_output=True).returncode:
        pytest.skip("not a git checkout with session 21's commit")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "session21_kernels.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "matmul.allow_tf32" not in proc.stdout and 'import__("rsp_fast.tf32"' in proc.stdout
    compile(proc.stdout, "conv_products_session21.py", "exec")  # still Python


def test_bench_first_layer_quick(tmp_path):
    """The first layer's two paths per stem, the fused one in Triton's interpreter: timed, and
    the same map."""
    out = tmp_path / "f.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_first_layer.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["stem"] for r in rows] == ["VGG16 conv1_1", "ResNet50 conv1", "EfficientNet stem"]
    assert all(r["convolutions_ms"] > 0 and r["fused_ms"] > 0 and r["max_rel_diff"] < 1e-5 for r in rows)
    assert "| stem |" in proc.stdout


def test_bench_compiled_paths_quick(tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compiled_paths.py"), "--quick", "--models",
                           "vgg16", "efficientnet_lite0", "--json", str(out)], capture_output=True, text=True)
    if "rsp_fast._C is not built" in proc.stderr or "backend 'cpp' is unavailable" in proc.stderr:
        import pytest

        pytest.skip("rsp_fast._C is not built")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    vgg = [r for r in rows if r["model"] == "vgg16"]
    assert len(vgg) == 12  # VGG16's inner convs up to features.29
    assert all(r["library_ms"] > 0 and r["compiled_ms"] > 0 and 0 <= r["nonzero"] <= 1 for r in rows)
    assert all(r["compiled_path"] == "masked" and r["chosen"] in ("masked", r["library_path"]) for r in vgg)
    # behind VGG16's max pools at most one position of each 2x2 window carries relevance
    assert min(r["nonzero"] for r in vgg) <= 0.25
    depthwise = [r for r in rows if r["model"] == "efficientnet_lite0" and r["compiled_path"] == "depthwise"]
    assert len(depthwise) == 16 and all(r["chosen"] == "depthwise" for r in depthwise)  # its 16 depthwise convs
    pointwise = [r for r in rows if r["model"] == "efficientnet_lite0" and r["kernel"] == [1, 1]]
    assert len(pointwise) == 32 and all(r["pointwise_ms"] > 0 for r in pointwise)  # its 1×1 convs, all stride 1
    assert all(r["pointwise_ms"] is None for r in vgg)
    assert "| model | layer input |" in proc.stdout


def test_bench_compiled_paths_every_path_quick(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compiled_paths.py"), "--quick",
                           "--every-path", "--models", "resnet18", "regnet_x_400mf", "--json", str(out)],
                          capture_output=True, text=True)
    if "rsp_fast._C is not built" in proc.stderr or "backend 'cpp' is unavailable" in proc.stderr:
        import pytest

        pytest.skip("rsp_fast._C is not built")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    resnet = [r for r in rows if r["model"] == "resnet18"]
    assert len(resnet) == 19  # ResNet18's inner convs: 16 in its blocks, 3 shortcuts
    for r in rows:
        assert set(r["ms"]) <= set(r["macs"]) and all(ms > 0 for ms in r["ms"].values())
        assert ("masked" in r["ms"]) == (r["groups"] == 1) and r["chosen"] in r["macs"]
        assert ("conv" in r["ms"]) != (r["kernel"] == [1, 1])  # 1×1 convs: filter and fused pointwise instead
    assert any(r["groups"] > 1 for r in rows if r["model"] == "regnet_x_400mf")
    assert "| model | layer input |" in proc.stdout


def test_bench_compiled_paths_ablation_quick(tmp_path):
    out = tmp_path / "a.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compiled_paths.py"), "--quick", "--ablation",
                           "--photos", "--models", "efficientnet_lite0", "--json", str(out)], capture_output=True, text=True)
    if "rsp_fast._C is not built" in proc.stderr or "backend 'cpp' is unavailable" in proc.stderr:
        import pytest

        pytest.skip("rsp_fast._C is not built")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["kernels"] for r in rows] == ["forward", "cpp", "cpp without masked", "cpp without depthwise",
                                            "cpp without pointwise", "cpp, cost model unweighted", "torch"]
    assert all(r["ms_per_image"] > 0 for r in rows) and rows[1]["x_all_kernels"] == 1.0
    assert all(r["weights"] == "ImageNet" and r["inputs"] == "photos" for r in rows)
    assert "| model | weights | inputs | kernels |" in proc.stdout


def test_bench_e2e_quick(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--quick", "--models", "vgg16",
                           "--batches", "1", "--device", "cpu", "--json", str(out), "--png", str(tmp_path / "c.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    keys = {"method", "model", "backend", "batch", "device", "dtype", "sec_per_image_median", "sec_per_image_min",
            "sec_per_image_max", "x_forward", "peak_mem_mb"}
    assert all(set(r) == keys for r in rows)
    methods = {r["method"] for r in rows}
    assert {"forward", "forward + input gradient", "RSP (torch)"} <= methods
    assert all(r["sec_per_image_min"] <= r["sec_per_image_median"] <= r["sec_per_image_max"] for r in rows)
    assert (tmp_path / "c.png").stat().st_size > 0


def test_bench_e2e_reports_running_out_of_memory_and_goes_on(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    def out_of_memory(calls, device, repeats, warmup):
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {name: {"median": 1.0, "min": 1.0, "max": 1.0} for name in calls}

    monkeypatch.setattr(bench_e2e, "time_interleaved", out_of_memory)
    assert bench_e2e.main(["--quick", "--models", "vgg16", "--batches", "1", "--device", "cpu",
                           "--methods", "forward", "RSP (torch)"]) == 0
    out = capsys.readouterr().out
    assert "out of memory: time fewer at once (--methods)" in out
    assert bench_e2e.main(["--quick", "--models", "vgg16", "--batches", "1", "--device", "cpu", "--methods", "forward"]) == 0
    assert "| vgg16 | 1 | forward | 1.0000 |" in capsys.readouterr().out


def test_bench_e2e_goes_on_past_a_model_that_fails(tmp_path, capsys):
    """VGG16's forward fails on 16×16 inputs: the run ended in a traceback, ResNet18's rows measured
    before it lost (no table, no JSON)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    rows = tmp_path / "rows.json"
    assert bench_e2e.main(["--models", "resnet18", "vgg16", "--size", "16", "--batches", "1", "--repeats", "1",
                           "--device", "cpu", "--methods", "forward", "--json", str(rows)]) == 0
    assert [(r["model"], r["method"]) for r in json.loads(rows.read_text())] == [("resnet18", "forward")]
    assert "| vgg16 |  | (the model) | n/a |" in capsys.readouterr().out


def test_quick_mode_keeps_the_options_given(capsys):
    """--quick set --size and --repeats over the user's own (a run of 32×32 inputs measured 64×64)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import bench_e2e
    from utils import parse_quick

    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quick", action="store_true")
    assert [parse_quick(p, argv, size=64).size for argv in ([], ["--quick"], ["--quick", "--size", "32"])] == [224, 64, 32]
    assert bench_e2e.main(["--quick", "--size", "32", "--repeats", "2", "--models", "resnet18", "--batches", "1",
                           "--device", "cpu", "--methods", "forward"]) == 0
    assert "Seconds per image, median of 2, " in (out := capsys.readouterr().out) and ", 32×32, " in out


def test_bench_e2e_channels_last_runs_model_and_inputs_in_that_layout(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e
    import rsp_fast

    layouts = []
    attribute = rsp_fast.RSP.attribute

    def spy(self, inputs, *args, **kwargs):
        layouts.append((inputs.is_contiguous(memory_format=torch.channels_last),
                        self.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)))
        return attribute(self, inputs, *args, **kwargs)

    monkeypatch.setattr(rsp_fast.RSP, "attribute", spy)
    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--quick", "--models", "vgg16", "--batches", "2", "--device", "cpu", "--channels-last",
                           "--methods", "forward", "RSP (torch)", "--json", str(out)]) == 0
    assert layouts and all(layouts[i] == (True, True) for i in range(len(layouts)))
    rows = json.loads(out.read_text())
    assert rows and all(r["memory_format"] == "channels_last" for r in rows)


def test_cost_model_refuses_the_shapes_rsp_refuses():
    """An MLP's (8, 10) (the batch given too) was counted as 8 tokens: 6400 multiply-adds for 800;
    a grey CNN's (32, 32) (its channel left out) ran as one unbatched image: c1 294,912 for 36,864;
    a lazy module was initialised with random weights; a model made under inference_mode gave torch's error."""
    import torch
    from torch import nn

    import rsp_fast
    from rsp_fast.errors import RSPError

    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    assert rsp_fast.cost(mlp, (10,))["totals"]["forward_macs"] == 10 * 20  # up to the saliency layer, the last Linear's input
    with pytest.raises(RSPError, match=r"without the batch: \(10,\), not \(8, 10\)"):
        rsp_fast.cost(mlp, (8, 10))
    grey = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    assert [r["forward_macs"] for r in rsp_fast.cost(grey, (1, 32, 32))["layers"]] == [4 * 9 * 1024, 4 * 4 * 9 * 1024]
    with pytest.raises(RSPError, match=r"input_shape \(32, 32\): the model's first layer takes 3-D samples"):
        rsp_fast.cost(grey, (32, 32))
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(RSPError, match="not initialised yet"):
        rsp_fast.cost(lazy, (3, 8, 8))
    assert nn.parameter.is_lazy(lazy[0].weight)  # left as it was
    with torch.inference_mode():
        frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RSPError, match="made under torch.inference_mode"):
        rsp_fast.cost(frozen, (3, 8, 8))


class _Squeezes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).squeeze())  # a batch of one loses its batch too


class _OneSampleAtATime(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(1, -1))  # written for a batch of one


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(10, 20), torch.nn.Linear(20, 3)

    def forward(self, x):
        h = torch.relu(self.hidden(x.flatten(1)))
        return self.out(h), h


def test_cost_model_takes_the_outputs_rsp_takes():
    """cost probed one sample: a forward that squeezes its pooled features (RSP explains it at
    batch 2 and up) gave logits of shape (5,) and was refused; a model returning a tuple, which
    RSP refuses, was counted at (10,) and crashed at (8, 10) ('tuple' object has no attribute 'dim')."""
    import rsp_fast
    from rsp_fast.errors import RSPError

    counted = rsp_fast.cost(_Squeezes().eval(), (3, 8, 8))
    assert [r["forward_macs"] for r in counted["layers"]] == [4 * 3 * 9 * 64]
    # a forward written for one sample, which RSP explains at batch 1: the two-sample probe failed
    one = _OneSampleAtATime().eval()
    assert rsp_fast.RSP(one, layer="conv").attribute(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
    assert [r["forward_macs"] for r in rsp_fast.cost(one, (3, 8, 8), layer="conv")["layers"]] == [4 * 3 * 9 * 64]
    for shape in ((10,), (8, 10)):
        with pytest.raises(RSPError, match="must return logits of shape \\(N, classes\\), not a tuple|forward failed"):
            rsp_fast.cost(_TwoOutputs().eval(), shape)
    with pytest.raises(RSPError, match="must return logits of shape \\(N, classes\\), not a tuple"):
        rsp_fast.RSP(_TwoOutputs().eval()).attribute(torch.rand(2, 10))


def test_cost_model_runs_strided_1x1_convs_as_pointwise():
    import torchvision

    import rsp_fast
    from rsp_fast.ops import custom

    layers = {r["layer"]: r for r in rsp_fast.cost(torchvision.models.resnet50(), (3, 224, 224))["layers"]}
    shortcut = layers["layer2.0.downsample.0"]  # 256 -> 512, stride 2: a stride-1 1×1 conv of 28² picked pixels
    assert shortcut["path"] == ("pointwise" if custom.pointwise_kernel_built() else "filter")
    assert shortcut["rsp_macs"] == 6 * shortcut["forward_macs"]
    assert layers["layer4.0.downsample.0"]["path"] == "gram"  # 7² positions: the Gram path


def test_cost_model_takes_the_implicit_gemms_only_where_triton_runs(monkeypatch):
    """A CUDA layer's path in ``cost`` is the rule's: the implicit GEMMs where Triton runs, the
    library's grouped convolutions where it does not (cost said implicit_gemm either way)."""
    import importlib

    import torchvision

    import rsp_fast
    from rsp_fast.graph.plan import build_plan
    from rsp_fast.propagate import record_forward

    cost = importlib.import_module("rsp_fast.cost")  # the module: rsp_fast.cost is the function

    model = torchvision.models.vgg11().features[:8].eval()
    plan = build_plan(model, None)
    shapes = record_forward(model, plan, torch.zeros(1, 3, 64, 64))[3]
    conv = next(s for s in plan.steps if isinstance(s, rsp_fast.rules.conv.Conv) and not s.first)
    paths = {}
    for reason in ("", "Triton is not installed"):
        monkeypatch.setattr(cost, "triton_unavailable_reason", lambda device: reason, raising=False)
        paths[reason] = cost._conv_row(conv, shapes, torch.bfloat16, torch.device("cuda"))["path"]
    assert paths == {"": "implicit_gemm", "Triton is not installed": "grouped_conv"}


def test_cost_model_counts_vgg16():
    import torchvision

    import rsp_fast

    report = rsp_fast.cost(torchvision.models.vgg16(), (3, 224, 224))
    layers = {r["layer"]: r for r in report["layers"]}
    assert len(layers) == 13 and report["layer"] == "features.29"
    # conv1_2: 64 outputs × 64·9 weights × 224² positions, on the conv path (6×)
    assert layers["features.2"]["forward_macs"] == 64 * 64 * 9 * 224 * 224
    assert layers["features.2"]["path"] == "conv" and layers["features.2"]["rsp_macs"] == 6 * 64 * 64 * 9 * 224 * 224
    # conv5_3 at 14×14 takes the Gram path, with K and the back-projection from the 16×16 padded
    # input's pixel Gram (2·512·256², not 2·4608·196² from the patches) plus 4·512·196²
    assert layers["features.28"]["path"] == "gram"
    assert layers["features.28"]["rsp_macs"] == 2 * 512 * 256 ** 2 + 4 * 512 * 196 ** 2
    assert layers["features.0"]["path"] == "z^B"
    assert sum(r["forward_macs"] for r in report["layers"]) == 15346630656  # VGG16's 13 convs at 224²
    assert 4 < report["totals"]["rsp_over_forward_macs"] < 6


def test_cost_model_counts_first_linear_layers_half_models_and_the_pixel_gram():
    """A first Linear's z^B rule runs four products of the forward's size (two forward, two
    back), not three; a float16 model's rules run in float32 (4-byte elements); conv5_3 on the
    pixel-Gram path (conv4_3 at 112²) never unfolds its 4608×196 patches (they were 10.8 of its 15.8 MB)."""
    import torch
    import torchvision

    import rsp_fast

    mlp = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    first = rsp_fast.cost(mlp, (20,), layer="1")["layers"][0]
    assert first["forward_macs"] == 600 and first["rsp_macs"] == 4 * 600
    net = torchvision.models.resnet18()
    assert rsp_fast.cost(net.half(), (3, 64, 64))["totals"]["bytes"] == rsp_fast.cost(net.float(), (3, 64, 64))["totals"]["bytes"]
    row = {r["layer"]: r for r in rsp_fast.cost(torchvision.models.vgg16(), (3, 112, 112))["layers"]}["features.19"]
    assert row["path"] == "gram" and row["gram_macs"] == 2 * 512 * 16 ** 4 + 4 * 512 * 196 ** 2  # from the pixels
    assert row["bytes"] < 3 * (512 * 9) * 196 * 4  # less than the patches, read three times, would take alone


def test_activation_memory_counts_each_storage_once():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_e2e import activation_mb

    x = torch.rand(1, 1, 4, 4)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    in_place = torch.nn.Sequential(conv, torch.nn.ReLU(inplace=True))
    out_of_place = torch.nn.Sequential(conv, torch.nn.ReLU())
    assert activation_mb(in_place, x) * 2**20 == 2 * 16 * 4  # the ReLU's output is the conv's storage
    assert activation_mb(out_of_place, x) * 2**20 == 2 * 2 * 16 * 4


def test_product_flops_count_grouped_convolutions_and_their_gradients():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch.nn.functional as F
    from bench_products import product_flops

    x, w = torch.randn(2, 6, 10, 10), torch.randn(8, 3, 3, 3)  # 2 groups

    def conv_and_both_gradients():
        y = F.conv2d(x, w, groups=2)
        return torch.ops.aten.convolution_backward(torch.ones_like(y), x, w, None, [1, 1], [0, 0], [1, 1], False,
                                                   [0, 0], 2, [True, True, False])
    macs = 2 * 8 * 3 * 9 * 8 * 8  # N·O·(C/groups)·k²·output positions
    assert product_flops(conv_and_both_gradients) == 3 * 2 * macs
    assert product_flops(lambda: torch.randn(4, 5, 6) @ torch.randn(4, 6, 7)) == 2 * 4 * 5 * 6 * 7


def test_product_flops_count_the_implicit_gemms():
    """The conv rule's Triton implicit GEMMs (launched from Python, unseen by torch's dispatcher)
    count as the three products they compute; the purge and normalisation add nothing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_products import product_flops
    from rsp_fast.ops.dispatch import TORCH
    from rsp_fast.rules.base import Context
    from rsp_fast.rules.conv import call_geometry, inner_conv_relevance

    x, R = torch.rand(2, 5, 7, 6, dtype=torch.float64), torch.randn(2, 4, 7, 6, dtype=torch.float64)
    flops = product_flops(lambda: inner_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R,
                                                       call_geometry(3, padding=1), path="implicit_gemm"))
    assert flops == 3 * 2 * 2 * (2 * 4) * 5 * 9 * (7 * 6)


def test_busy_seconds_counts_overlapping_kernels_once():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_products import busy_seconds

    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4  # [0, 3] and [5, 6]
    assert busy_seconds([(0, 10), (2, 3), (4, 5)]) == 10  # nested
    assert busy_seconds([(3, 4), (0, 1)]) == 2  # unsorted, disjoint


def test_coverage_reports_ok_refused_and_crashes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from model_coverage import check, summarise
    from torch import nn
    from models import tiny_cnn

    ok = check("tiny", tiny_cnn(), (3, 32, 32))
    assert ok["status"] == "ok" and ok["conservation_error"] < 1e-5
    refused = check("softmax", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(1), nn.Conv2d(4, 4, 3), nn.Flatten(),
                                             nn.LazyLinear(2)), (3, 8, 8))
    assert refused["status"] == "refused" and "Softmax" in refused["message"]
    crash = {"model": "broken", "status": "crash", "message": "IndexError: boom"}

    class Counting(nn.Sequential):  # a forward that changes a plain attribute it has
        def __init__(self, *modules):
            super().__init__(*modules)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    counting = check("counting", Counting(*tiny_cnn()), (3, 32, 32))
    assert ok["plan_kept"] and not counting["plan_kept"]
    text = summarise([ok, refused, crash, counting])
    assert text.startswith("4 models: 2 ok, 1 refused, 1 crash") and "CRASH broken: IndexError: boom" in text
    assert "traced again at every call: 1 models (counting)" in text
    assert "  1 × Softmax\n" in text  # the reason alone: neither its place nor the saliency layer


@pytest.mark.parametrize("argv,message", [
    (["--models", "nosuch"], "unknown model 'nosuch'"),
    (["--batches", "0"], "positive numbers"),
    (["--repeats", "0"], "positive numbers"),
    (["--methods", "RSP(cpp)"], "none of --methods runs here"),
    (["--authors-repo", "/nonexistent"], "is not a checkout of github.com/wjNam"),
    (["--json", "/nonexistent/rows.json"], "cannot write '/nonexistent/rows.json': its folder does not exist"),
    (["--png", "/tmp"], "'/tmp' is a folder, not a file to write"),
    (["--png", "chart.xyz"], "'chart.xyz': a chart is written as .png, .svg or .pdf"),  # was found after the run
    (["--json", "/proc/rows.json"], "cannot create a file in the folder '/proc'"),
    (["--device", "gpu"], "unknown device 'gpu'"),  # tracebacks
    (["--precisions", "tf32"], "--precisions tf32 runs on CUDA tensor cores only"),  # every RSP row left out, exit 0
])
def test_bench_e2e_refuses_bad_arguments_before_it_runs(argv, message, capsys):
    """A typo in --methods ran only the forward pass and exited 0; --models nosuch, --batches 0
    and --repeats 0 ended in tracebacks; a wrong --authors-repo became a table cell."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    with pytest.raises(SystemExit) as exit_:
        bench_e2e.main(["--device", "cpu", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_return_freed_memory_undoes_keep_freed_memory():
    """``return_freed_memory`` after ``keep_freed_memory`` left mmap off and a 1 GB top pad: a
    freed 256 MB tensor stayed resident though both said True. (In a process of its own: the
    settings are process-wide.)"""
    code = """
import sys, torch
from pathlib import Path
from rsp_fast import memory
def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) // 1024
assert all(getattr(memory, step)() for step in sys.argv[1].split(","))
start = rss_mb()
t = torch.ones(64 * 2**20)  # 256 MB, touched
del t
print(rss_mb() - start)
"""
    kept = {}
    for steps in ("keep_freed_memory", "keep_freed_memory,return_freed_memory",
                  "keep_freed_memory,return_freed_memory,keep_freed_memory"):
        proc = subprocess.run([sys.executable, "-c", code, steps], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        kept[steps] = int(proc.stdout.split()[-1])
    assert kept["keep_freed_memory"] > 200 and kept["keep_freed_memory,return_freed_memory,keep_freed_memory"] > 200
    assert kept["keep_freed_memory,return_freed_memory"] < 50


def test_bench_products_counts_every_product_of_the_pass_on_the_cpu(tmp_path):
    """On the CPU it took the cpp backend, whose compiled products the FLOP counter does not
    see: VGG16's count (4.3 GFLOP per 64² image) fell below the forward pass plus RSP's own
    (cost(): 2.5 + 5.4). The torch backend runs every product through the dispatcher."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torchvision
    import bench_products

    import rsp_fast

    out = tmp_path / "p.json"
    assert bench_products.main(["--quick", "--device", "cpu", "--precisions", "fp32", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    totals = rsp_fast.cost(torchvision.models.vgg16(), (3, 64, 64))["totals"]
    assert row["backend"] == "torch"
    assert row["product_gflop_per_image"] > 2 * (totals["forward_macs"] + 0.9 * totals["rsp_macs"]) / 1e9


@pytest.mark.parametrize("script,argv,message", [
    ("bench_kernels", ["--dtype", "fp32"], "invalid choice: 'fp32'"),  # AttributeError: torch has no 'fp32'
    ("bench_kernels", ["--dtype", "bfloat16", "--device", "cpu"], "no compiled kernel set runs bfloat16 on cpu"),  # empty table
    ("bench_video", ["--size", "320"], "'320' is not a frame size WxH"),  # ValueError: not enough values to unpack
    ("bench_video", ["--frames", "0"], "'0' is not a whole number, 1 or more"),  # RSPError after the warm-up video
    ("bench_precision", ["--device", "cpu", "--precisions", "tf32"], "tf32 runs on CUDA tensor cores only"),
    ("bench_products", ["--device", "cuda:x"], "unknown device 'cuda:x'"),
])
def test_benchmark_scripts_refuse_bad_arguments_in_one_line(script, argv, message, capsys):
    """Each of these was a traceback (some after minutes of work) or an empty result with status 0."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_e2e_memory_run_reports_memory_not_times(tmp_path, capsys):
    """A --memory run printed 'nan | nan | nan×' in the time columns, drew an empty chart of time
    ratios, and left the activations every ratio divides by out of the JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_e2e

    rows, chart = tmp_path / "rows.json", tmp_path / "memory.png"
    assert bench_e2e.main(["--quick", "--memory", "--models", "resnet18", "--batches", "2", "--device", "cpu",
                           "--methods", "forward", "RSP (cpp)", "--json", str(rows), "--png", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and out.startswith("Peak memory")
    measured = json.loads(rows.read_text())
    # (a peak may read 0 here: pages earlier tests left resident take the call's allocations)
    assert measured and all(r["peak_mem_mb"] >= 0 and r["activations_mb"] > 0 for r in measured)
    assert chart.stat().st_size > 0
