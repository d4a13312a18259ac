"""On a CUDA GPU: every backend against the CPU float64 result, the precision modes, golden
parity and the CUDA-graph static path. Skipped without a GPU (marked ``cuda``)."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import rsp_fast
from conftest import GOLDEN_FILES, load_golden, rel_err, tf32_products
from models import golden_model
from rsp_fast.rules import conv as conv_rule
from rsp_fast.rules import conv_paths

pytestmark = pytest.mark.cuda
GPU_BACKENDS = ["torch", "cuda", "triton", "auto"]
NETS = [("vgg16", 32), ("resnet50", 48), ("mobilenet_v2", 48)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    ha, hb = rsp_fast.heatmap(a).flatten(1).double().cpu(), rsp_fast.heatmap(b).flatten(1).double().cpu()
    return F.cosine_similarity(ha, hb, dim=1).min().item()


def _net(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name,size", NETS)
def test_gpu_float64_matches_cpu(backend, name, size):
    model = _net(name).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    expected = rsp_fast.RSP(model, backend="torch").attribute(x)
    got = rsp_fast.RSP(model.cuda(), backend=backend).attribute(x.cuda())
    assert got.device.type == "cuda"
    assert rel_err(got.cpu(), expected) < 1e-9


@pytest.mark.parametrize("path", conv_paths.CUDA_DENSE_PATHS)
@pytest.mark.parametrize("name", ["vgg16", "resnext50_32x4d"])
def test_every_cuda_dense_path_matches_cpu(path, name, monkeypatch):
    """Each way dense layers can run on CUDA (grouped convs folded over the samples, batched GEMMs,
    per-sample convs), ResNeXt's grouped 3×3 convs too: float64 equals the CPU result, bf16 stays
    close to it."""
    monkeypatch.setattr(conv_paths, "CUDA_DENSE_PATH", path)
    model = _net(name)
    x = torch.randn(3, 3, 48, 48)
    exact = rsp_fast.RSP(model.double(), backend="torch").attribute(x.double())
    got = rsp_fast.RSP(model.cuda(), backend="cuda").attribute(x.double().cuda())
    assert rel_err(got.cpu(), exact) < 1e-9
    low = rsp_fast.RSP(model.float(), backend="cuda", precision="bf16").attribute(x.cuda())
    assert _cosine(low, exact) > 0.99


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_golden_on_gpu(path, backend):
    g = load_golden(path)
    model = golden_model(g).cuda()
    explainer = rsp_fast.RSP(model, layer=f"features.{g['saliency_layer']}", init=g["init"],
                             hostile_k=len(g["hostile"]), backend=backend)
    R = explainer.attribute(g["x"].cuda(), target=g["target"], hostile=g["hostile"] or None)
    assert rel_err(R.cpu(), g["R_input"]) < 1e-9


@pytest.mark.parametrize("backend", ["cuda", "triton"])
# tf32 also runs the forward pass on TF32 (its activations feed R₀): the largest error is larger than bf16's
@pytest.mark.parametrize("precision,min_cosine,max_err", [("fp32", 0.9999, 1e-3), ("tf32", 0.99, 2e-1), ("bf16", 0.99, 1e-1)])
def test_gpu_precisions_agree_with_float64(backend, precision, min_cosine, max_err):
    model = _net("vgg16")
    x = torch.randn(4, 3, 64, 64)
    exact = rsp_fast.RSP(model.double(), backend="torch").attribute(x.double())
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    got = rsp_fast.RSP(model.float().cuda(), backend=backend, precision=precision).attribute(x.cuda())
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32  # settings restored
    assert got.dtype == torch.float32
    assert _cosine(got, exact) > min_cosine
    assert rel_err(got.cpu(), exact) < max_err


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_static_graph_replays_the_eager_pass(backend):
    model = _net("resnet50").cuda()
    explainer = rsp_fast.RSP(model, backend=backend)
    x1, x2 = torch.randn(2, 4, 3, 48, 48, device="cuda")
    static = explainer.static(x1)
    got1 = static(x1)
    assert static.uses_graphs and list(static._graphs) == [False]
    got2 = static(x2)  # the same graph, new inputs
    torch.testing.assert_close(got1, explainer.attribute(x1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got2, explainer.attribute(x2), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got1, got2)
    ex, ref = static.explain(x2), explainer.explain(x2)
    assert torch.equal(ex.target, ref.target) and torch.equal(ex.hostile, ref.hostile)
    torch.testing.assert_close(ex.logits, ref.logits)
    target = torch.tensor([1, 2, 3, 4], device="cuda")
    torch.testing.assert_close(static(x2, target=target), explainer.attribute(x2, target=target), rtol=1e-4, atol=1e-6)
    assert sorted(static._graphs) == [False, True]
    with pytest.raises(rsp_fast.RSPError, match="out of range"):
        static(x2, target=10)
    with pytest.raises(rsp_fast.RSPError, match="static RSP takes inputs of shape"):
        static(x2[:2])


def test_static_graph_bf16_vgg():
    model = _net("vgg16").cuda()
    explainer = rsp_fast.RSP(model, precision="bf16")
    x = torch.randn(8, 3, 64, 64, device="cuda")
    static = explainer.static(x)
    got = static(x)
    assert static.uses_graphs
    torch.testing.assert_close(got, explainer.attribute(x), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5"])
def test_gpu_extension_rules_match_cpu(name):
    """Gates, smooth activations, split/shuffle index maps on CUDA: the CPU float64 result, as
    close as the forward passes allow (PyTorch's float64 MobileNetV3-Small logits differ by
    3.9e-7 between CUDA and CPU on an H100; RSP's result then differed by 1.2e-8)."""
    model = _net(name).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = rsp_fast.RSP(model, backend="torch").attribute(x)
    logits = model(x)
    got = rsp_fast.RSP(model.cuda()).attribute(x.cuda())
    forward_err = rel_err(model(x.cuda()).cpu(), logits)
    assert rel_err(got.cpu(), expected) < max(1e-9, forward_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_model_under_inference_mode(dtype):
    """The usual fast video setup, a half-precision model called under inference mode: rules in
    float32, close to the float32 model's result."""
    model = _net("resnet18")
    x = torch.randn(4, 3, 64, 64)
    target, hostile = [1, 2, 3, 4], [[0, 5], [6, 7], [8, 9], [0, 1]]
    expected = rsp_fast.RSP(model).attribute(x, target=target, hostile=hostile)
    half = _net("resnet18").to("cuda", dtype)
    with torch.inference_mode():
        R = rsp_fast.RSP(half).attribute(x.to("cuda", dtype), target=target, hostile=hostile)
    assert R.dtype == torch.float32 and torch.isfinite(R).all()
    assert _cosine(R, expected) > 0.99


@pytest.mark.parametrize("dtype,tf32,tol", [(torch.float64, False, 1e-12), (torch.float32, False, 1e-5),
                                            (torch.float32, True, 1e-2), (torch.bfloat16, False, 3e-2)])
@pytest.mark.parametrize("C,O,k,s,p", [(3, 64, 3, 1, 1), (3, 64, 7, 2, 3), (3, 32, 3, 2, 1)])  # VGG, ResNet, EfficientNet stems
def test_first_layer_kernels_on_cuda_match_float64(C, O, k, s, p, dtype, tf32, tol):
    """The Triton z^B kernels (RSP_FAST_CUDA_FUSED_FIRST_LAYER) against the CPU float64 path."""
    from rsp_fast.ops.dispatch import TORCH
    from rsp_fast.rules.base import Context
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, O, k, stride=s, padding=p).double()
    x = torch.randn(4, C, 45, 38, dtype=torch.float64)
    g = conv_rule.conv_geometry(conv, (45, 38))
    R = torch.randn(4, O, *g.out_size(45, 38), dtype=torch.float64)
    expected = conv_rule.first_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x, R, conv.weight, g, fused=False)
    with tf32_products(tf32):
        got = conv_rule.first_conv_relevance(Context(values={}, shapes={}, ops=TORCH), x.cuda().to(dtype), R.cuda().to(dtype),
                                             conv.weight.cuda().to(dtype), g, fused=True)
    assert got.dtype == dtype and rel_err(got.cpu(), expected) < tol


def test_gpu_video_resnet_matches_cpu():
    """Conv3d and the 3-D pools on CUDA (cuDNN's 3-D convolutions) against the CPU, float64."""
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=5).double().eval()
    clips = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    expected = rsp_fast.RSP(model, backend="torch").attribute(clips)
    got = rsp_fast.RSP(model.cuda(), backend="cuda").attribute(clips.cuda())
    assert rel_err(got.cpu(), expected) < 1e-9


def test_explain_frames_on_cuda_matches_the_cpu():
    """Full batches replay a CUDA graph, the last partial batch runs eagerly: every frame's
    map and label as on the CPU."""
    import numpy as np
    from rsp_fast.models import ModelSpec
    from rsp_fast.video import explain_frames
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(7)]
    spec = ModelSpec(_net("resnet18"), "resnet18", input_size=64)
    cpu = list(explain_frames(spec, frames, batch_size=3))
    gpu = list(explain_frames(spec, frames, batch_size=3, device="cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert a.label == b.label and a.target == b.target
        assert np.abs(a.heat - b.heat).max() <= 1e-3 * np.abs(a.heat).max()
