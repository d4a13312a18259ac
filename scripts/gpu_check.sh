#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one call: build the CUDA kernels, run the
# cuda-marked tests, then the GPU benchmarks. Each step has its own time limit and writes its
# output to $OUT as it finishes, so a step that fails or runs long costs only itself.
#   OUT=dir [WHEELS=dir of extra wheels] [AUTHORS=checkout of the authors' code] bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
step() { echo; echo "== $(date +%T) $*"; }
if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step "build (sm_90)"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 $PY setup.py build_ext --inplace >/tmp/rsp_build.log 2>&1
rc=$?; echo "build exit $rc"; tail -n $([ $rc = 0 ] && echo 2 || echo 40) /tmp/rsp_build.log
$PY -c "import rsp_fast; print(rsp_fast.backends('cuda'))"

step "cuda-marked tests"
timeout ${TEST_LIMIT:-180} $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/test_ops.py tests/test_gpu.py -rfE 2>&1 \
    | tee "$OUT/tests.log" | tail -25

B="--repeats ${REPEATS:-5}"
step "VGG16 end to end"
timeout ${E2E_LIMIT:-180} $PY benchmarks/bench_e2e.py --models vgg16 --batches 1 64 --precisions fp32 tf32 bf16 --graph $B \
    ${AUTHORS:+--authors-repo "$AUTHORS"} --json "$OUT/e2e_vgg16.json" 2>&1 | grep -v "^  " | tail -60

step "RSP products against the device's peak"
timeout 60 $PY benchmarks/bench_products.py --model vgg16 --batch 64 --json "$OUT/products.json" 2>&1 | grep -v "^  "

step "precision modes against float64 on photographs"
timeout 60 $PY benchmarks/bench_precision.py --json "$OUT/precision.json" 2>&1 | tail -8

step "dense layers off the Gram path on CUDA: batched GEMMs (filter) or cuDNN per sample (conv)"
timeout 60 $PY - <<'PY' 2>&1 | tail -8
import sys, torch, torchvision
sys.path.insert(0, "benchmarks")
from utils import time_call
import rsp_fast
from rsp_fast.rules import conv
model = torchvision.models.vgg16().eval().cuda()
x = torch.randn(64, 3, 224, 224, device="cuda")
for precision in ("bf16", "fp32"):
    explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)
    for path in ("filter", "conv"):
        conv.CUDA_DENSE_PATH = path
        t = time_call(lambda: explainer.attribute(x), "cuda", repeats=3, warmup=1)["median"]
        print(f"VGG16 batch 64 {precision} dense path {path}: {64 / t:.1f} img/s")
conv.CUDA_DENSE_PATH = "filter"
PY

step "VGG16 at batch 128"
timeout 50 $PY benchmarks/bench_e2e.py --models vgg16 --batches 128 --precisions tf32 bf16 --graph $B \
    --methods forward "RSP (cuda, tf32)" "RSP (cuda, bf16)" "RSP (cuda, bf16, graph)" --json "$OUT/e2e_vgg16_b128.json" 2>&1 | grep -v "^  " | tail -8

step "ResNet50 and EfficientNet-Lite0"
timeout ${OTHERS_LIMIT:-100} $PY benchmarks/bench_e2e.py --models resnet50 efficientnet_lite0 --batches 64 --precisions fp32 bf16 \
    --graph $B --methods forward "zennit EpsilonPlusFlat" "RSP (cuda)" "RSP (triton)" "RSP (cuda, bf16)" "RSP (triton, bf16)" \
    "RSP (cuda, bf16, graph)" --json "$OUT/e2e_others.json" 2>&1 | grep -v "^  " | tail -20

step "kernels"
timeout 40 $PY benchmarks/bench_kernels.py --device cuda --json "$OUT/kernels.json" 2>&1 | tail -12
step done
