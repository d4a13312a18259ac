#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one call: build the CUDA kernels, run the
# cuda-marked tests, then the GPU benchmarks. Each step has its own time limit and writes its
# output to $OUT as it finishes, so a step that fails or runs long costs only itself.
#   OUT=dir [WHEELS=dir of extra wheels] [AUTHORS=checkout of the authors' code]
#   [STEPS="build tests paths vgg16 conv_products products precision vgg16_b128 others kernels"] bash scripts/gpu_check.sh
# (E2E_ARGS="--channels-last": the vgg16 and others steps with model and inputs channels-last)
# (TEST_ARGS="-n 8 -v": the tests step on pytest-xdist's workers, each result named as it comes (TEST_ARGS
# replaces the default -q);
# the GPU image has xdist, and the step's time goes to compiling Triton kernels, about 3.6 s a test)
# (opt-in steps: "extended" times the models that need the extension rules, "cpu_tests" runs the CPU
# tests most tied to torch's version under the GPU machine's torch, "profile" lists device time per
# RSP step, per kernel and per aten op with input shapes (PROFILE_PRECISIONS="tf32 bf16"), "gram"
# times whole passes with the Gram path weighed at several slowdowns against the implicit GEMMs
# (GRAM_MODELS="vgg16 resnet50" GRAM_PRECISIONS="tf32 bf16" GRAM_SLOWDOWNS="1 2 4 inf", GRAM_IMPLICIT="0 1":
# also with the Gram path on implicit GEMMs), "first_layer" times the first layer's z^B rule on cuDNN's
# convolutions against the fused Triton kernels, per stem and in whole passes (FIRST_LAYER_PRECISIONS="tf32 bf16"),
# "video" the heat-map video end to end on the demo clip at 320x240 and at 1080p, "memory" the peak memory one
# call adds at batch 32 against the forward pass's activations)
# The "paths" step times the ways dense layers can run on CUDA (PATHS_AUTOTUNE=1: also under cuDNN's
# autotuner), the fastest per precision last (the steps after it keep the default choice);
# "conv_products" times the Triton implicit GEMMs against cuDNN per layer (CONV_PRODUCTS_ARGS=--tiles:
# also their launch tiles; "--layers deep --paths gram implicit_gemm": against the Gram path).
set -uo pipefail
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-build tests paths vgg16 conv_products products precision vgg16_b128 others kernels}
REPEATS="--repeats ${REPEATS:-5}"
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

build() {
    # The device image's Python links extensions with its /opt/gcc/bin/g++ wrapper; an error raised
    # inside an op built that way killed the process (segfault, H100 2026-11-26), built with the
    # system compiler it is a RuntimeError (docs/gpu/h100_run2_diagnostics.log). The image sets CXX
    # itself, so the system compiler is taken whenever there is one (KEEP_CXX=1: the environment's).
    if [ -x /usr/bin/g++ ] && [ -z "${KEEP_CXX:-}" ]; then
        export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
    fi
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 $PY setup.py build_ext --inplace >/tmp/rsp_build.log 2>&1
    local rc=$?; echo "build exit $rc"; tail -n $([ $rc = 0 ] && echo 2 || echo 40) /tmp/rsp_build.log
    $PY -c "import rsp_fast; print(rsp_fast.backends('cuda'))"
}

tests() {
    timeout ${TEST_LIMIT:-180} $PY -m pytest -p no:cacheprovider -o addopts="" ${TEST_ARGS:--q} ${TEST_FILES:-tests/test_conv_products.py tests/test_ops.py \
        tests/test_gpu.py tests/test_products_kernels.py} -k "${TEST_SELECT:-cuda or reject or multiplier or gpu}" -rfE 2>&1 \
        | tee "$OUT/tests.log" | tail -25
}

paths() {  # VGG16, batch 64: how dense layers off the Gram path should run on CUDA (and what cuDNN's autotuner would add)
    timeout ${PATHS_LIMIT:-150} $PY - <<'PY' 2>&1 | tee /tmp/paths.txt "$OUT/paths.log" | tail -20
import os, sys, torch, torchvision
sys.path.insert(0, "benchmarks")
from utils import time_call
import rsp_fast
from rsp_fast.rules import conv_paths
model = torchvision.models.vgg16().eval().cuda()
x = torch.randn(64, 3, 224, 224, device="cuda")
best = {}
for autotune in (False, True) if os.environ.get("PATHS_AUTOTUNE") else (False,):
    torch.backends.cudnn.benchmark = autotune
    for precision in ("tf32", "bf16"):
        explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)
        for path in conv_paths.CUDA_DENSE_PATHS:
            conv_paths.CUDA_DENSE_PATH = path
            t = time_call(lambda: explainer.attribute(x), "cuda", repeats=3, warmup=1)["median"]
            print(f"VGG16 batch 64 {precision} dense path {path} cudnn.benchmark={autotune}: {64 / t:.1f} img/s")
            if not autotune:
                best.setdefault(precision, {})[path] = t
        conv_paths.CUDA_DENSE_PATH = None
torch.backends.cudnn.benchmark = False
for precision, times in best.items():
    print("BEST", precision, min(times, key=times.get), "default:", conv_paths.cuda_dense_path(True))
default_choice = conv_paths.tap_sums_pay  # the Gram path's layers through their pixels' Gram matrix, or through their patches
for precision in ("tf32", "bf16"):
    explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)
    for pixel in (True, False):
        conv_paths.tap_sums_pay = lambda *args: pixel
        t = time_call(lambda: explainer.attribute(x), "cuda", repeats=3, warmup=1)["median"]
        print(f"VGG16 batch 64 {precision} default dense path, pixel Gram {'on' if pixel else 'off'}: {64 / t:.1f} img/s")
conv_paths.tap_sums_pay = default_choice
PY
}

gram() {  # VGG16 and ResNet50, batch 64: the deep layers on the Gram path or the implicit GEMMs (CUDA_GRAM_SLOWDOWN)
    timeout ${GRAM_LIMIT:-120} $PY - <<'PY' 2>&1 | tee "$OUT/gram.log" | tail -20
import os, sys, torch, torchvision
sys.path.insert(0, "benchmarks")
from utils import time_call
import rsp_fast
from rsp_fast.rules import conv_paths
x = torch.randn(64, 3, 224, 224, device="cuda")
for name in os.environ.get("GRAM_MODELS", "vgg16 resnet50").split():
    model = getattr(torchvision.models, name)().eval().cuda()
    for precision in os.environ.get("GRAM_PRECISIONS", "tf32 bf16").split():
        explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)
        for implicit in os.environ.get("GRAM_IMPLICIT", "0 1").split():  # 1: the Gram path on implicit GEMMs too
            conv_paths.CUDA_IMPLICIT_GRAM = dict.fromkeys((2, 4), implicit == "1")
            for slowdown in map(float, os.environ.get("GRAM_SLOWDOWNS", "1 2 4 inf").split()):
                weight = conv_paths.cuda_gram_slowdown
                conv_paths.cuda_gram_slowdown = lambda dtype: slowdown  # for every precision, either Gram path
                t = time_call(lambda: explainer.attribute(x), "cuda", repeats=3, warmup=1)["median"]
                conv_paths.cuda_gram_slowdown = weight
                print(f"{name} batch 64 {precision} {'implicit ' if implicit == '1' else ''}Gram path counted at "
                      f"{slowdown}x: {64 / t:.1f} img/s")
PY
}

vgg16() {
    timeout ${E2E_LIMIT:-180} $PY benchmarks/bench_e2e.py --models vgg16 --batches 1 64 --precisions ${VGG_PRECISIONS:-fp32 tf32 bf16} \
        --graph $REPEATS ${E2E_ARGS:-} ${AUTHORS:+--authors-repo "$AUTHORS"} --json "$OUT/e2e_vgg16.json" --methods forward \
        "forward + input gradient" "captum LRP" "zennit EpsilonPlusFlat" "authors' RSP" "RSP (cuda)" "RSP (cuda, tf32)" \
        "RSP (cuda, tf32, graph)" "RSP (cuda, bf16)" "RSP (cuda, bf16, graph)" 2>&1 \
        | grep -v "^  " | tail -60
}

conv_products() {  # VGG16's dense layers, batch 64: cuDNN's grouped convolutions against the Triton implicit GEMMs
    timeout ${CONV_PRODUCTS_LIMIT:-120} $PY benchmarks/bench_conv_products.py ${CONV_PRODUCTS_ARGS:-} --json "$OUT/conv_products.json" 2>&1 \
        | tee "$OUT/conv_products.log" | tail -40
}

products() {
    timeout 60 $PY benchmarks/bench_products.py --model vgg16 --batch 64 --json "$OUT/products.json" 2>&1 | grep -v "^  [a-z]"
}

profile() {  # VGG16 batch 64: device time per RSP step (layer), per kernel, and per aten op and input shapes
    timeout ${PROFILE_LIMIT:-90} $PY - <<'PY' 2>&1 | tee "$OUT/profile.log" | tail -90
import os, torch, torchvision
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
import rsp_fast
model = torchvision.models.vgg16().eval().cuda()
x = torch.randn(64, 3, 224, 224, device="cuda")

def labelled(propagate, name):
    def run(ctx, R):
        with record_function(name):
            return propagate(ctx, R)
    return run

for precision in os.environ.get("PROFILE_PRECISIONS", "tf32 bf16").split():
    explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)
    explainer.attribute(x)
    for step in explainer._plan_for(x).steps:  # each rule call under its layer's name in the profile
        step.propagate = labelled(step.propagate, f"step {type(step).__name__} {step.node.name}")
    explainer.attribute(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        explainer.attribute(x)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"== {precision}: device time per step")
    for e in sorted((e for e in events if e.key.startswith("step ")), key=lambda e: -e.device_time_total):
        print(f"{e.key:50s} {e.device_time_total / 1e3:8.3f} ms")
    print(f"== {precision}: kernels")
    kernels = sorted((e for e in events if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "step "))),
                     key=lambda e: -e.self_device_time_total)
    for e in kernels[:30]:
        print(f"{e.self_device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:150]}")
    print(f"total kernel time {sum(e.self_device_time_total for e in kernels) / 1e3:.3f} ms")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=30,
                                                              max_shapes_column_width=100))
PY
}

first_layer() {  # opt-in: the first layer's z^B rule, cuDNN's convolutions against the fused Triton kernels,
    # per stem (batch 64) and in whole eager passes (VGG16 and ResNet50, batch 64, FIRST_LAYER_PRECISIONS)
    timeout ${FIRST_LAYER_LIMIT:-90} $PY benchmarks/bench_first_layer.py --json "$OUT/first_layer.json" 2>&1 \
        | tee "$OUT/first_layer.log" | tail -10
    timeout ${FIRST_LAYER_LIMIT:-90} $PY - <<'PY' 2>&1 | tee -a "$OUT/first_layer.log" | tail -8
import os, sys, torch, torchvision
sys.path.insert(0, "benchmarks")
from utils import time_interleaved
import rsp_fast
from rsp_fast.rules import conv
x = torch.randn(64, 3, 224, 224, device="cuda")
for name in ("vgg16", "resnet50"):
    model = getattr(torchvision.models, name)().eval().cuda()
    for precision in os.environ.get("FIRST_LAYER_PRECISIONS", "tf32 bf16").split():
        explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)

        def run(fused):
            conv.CUDA_FUSED_FIRST_LAYER = fused
            return explainer.attribute(x)
        times = time_interleaved({"convolutions": lambda: run(False), "fused": lambda: run(True)}, "cuda", repeats=3, warmup=1)
        conv.CUDA_FUSED_FIRST_LAYER = False
        print(f"{name} batch 64 {precision} first layer: " + ", ".join(f"{k} {64 / t['median']:.1f} img/s" for k, t in times.items()))
PY
}

precision() {
    timeout 60 $PY benchmarks/bench_precision.py --json "$OUT/precision.json" 2>&1 | tail -8
}

vgg16_b128() {
    timeout 50 $PY benchmarks/bench_e2e.py --models vgg16 --batches 128 --precisions tf32 bf16 --graph $REPEATS \
        --methods forward "RSP (cuda, tf32)" "RSP (cuda, bf16)" "RSP (cuda, bf16, graph)" --json "$OUT/e2e_vgg16_b128.json" 2>&1 \
        | grep -v "^  " | tail -8
}

memory() {  # opt-in: peak memory one call adds at batch 32, against the forward pass's activations
    timeout ${MEMORY_LIMIT:-150} $PY benchmarks/bench_e2e.py --memory --models vgg16 resnet50 efficientnet_lite0 --batches 32 \
        --precisions fp32 tf32 bf16 --methods forward "zennit EpsilonPlusFlat" "RSP (cuda)" "RSP (cuda, tf32)" \
        "RSP (cuda, bf16)" --json "$OUT/memory.json" 2>&1 | grep -v "^  " | tail -20
}

others() {
    timeout ${OTHERS_LIMIT:-100} $PY benchmarks/bench_e2e.py --models resnet50 efficientnet_lite0 --batches 64 --precisions fp32 bf16 \
        --graph $REPEATS ${E2E_ARGS:-} --methods forward "zennit EpsilonPlusFlat" "RSP (cuda)" "RSP (triton)" "RSP (cuda, bf16)" "RSP (triton, bf16)" \
        "RSP (cuda, bf16, graph)" --json "$OUT/e2e_others.json" 2>&1 | grep -v "^  " | tail -20
}

extended() {  # opt-in (STEPS=... extended): models on the extension rules (gates, smooth activations, LayerNorm)
    timeout ${EXTENDED_LIMIT:-90} $PY benchmarks/bench_e2e.py --models mobilenet_v3_large efficientnet_b0 convnext_tiny --batches 64 \
        --precisions bf16 --graph $REPEATS --methods forward "zennit EpsilonPlusFlat" "RSP (cuda, bf16)" "RSP (cuda, bf16, graph)" \
        --json "$OUT/e2e_extended.json" 2>&1 | grep -v "^  " | tail -14
}

cpu_tests() {  # the CPU tests most tied to torch's version (tracing, rules, compiled CPU kernels) under the GPU machine's torch
    timeout ${CPU_TEST_LIMIT:-150} $PY -m pytest -q -n 8 -m "not cuda" -p no:cacheprovider -o addopts="" tests/test_api.py \
        tests/test_rules.py tests/test_depthwise.py tests/test_masked.py tests/test_pointwise.py tests/test_products_kernels.py \
        tests/test_golden.py -rfE 2>&1 \
        | tee "$OUT/cpu_tests.log" | tail -15
}

video() {  # the heat-map video end to end on the GPU: the demo clip at 320x240 and at 1080p (drawing on the CPU's render pool)
    timeout ${VIDEO_LIMIT:-150} $PY benchmarks/bench_video.py --device cuda --batch-sizes 8 32 --frames 128 \
        --json "$OUT/video_small.json" 2>&1 | tail -4
    timeout ${VIDEO_LIMIT:-150} $PY benchmarks/bench_video.py --device cuda --size 1920x1080 --batch-sizes 8 32 --frames 128 \
        --json "$OUT/video_hd.json" 2>&1 | tail -4
}

kernels() {
    timeout 40 $PY benchmarks/bench_kernels.py --device cuda --json "$OUT/kernels.json" 2>&1 | tail -14
}

for s in $STEPS; do
    echo; echo "== $(date +%T) $s"
    $s
done
echo "== $(date +%T) done"
