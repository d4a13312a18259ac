#!/usr/bin/env bash
# Print session 21's implicit-GEMM kernels (rsp_fast/kernels/triton/conv_products.py at 069aa30),
# the baseline bench_conv_products --baseline-module times beside today's. They read torch's legacy
# allow_tf32 flag, which raises once the fp32_precision strings are set (as rsp_fast sets them since
# session 27): read through rsp_fast.tf32 instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
patched="$(git show 069aa30:rsp_fast/kernels/triton/conv_products.py \
    | sed 's/torch\.backends\.cuda\.matmul\.allow_tf32)/__import__("rsp_fast.tf32", fromlist=["matmul_tf32"]).matmul_tf32())/')"
if [[ "$patched" == *matmul.allow_tf32* ]]; then
    echo "session21_kernels: the legacy allow_tf32 read was not replaced" >&2
    exit 1
fi
printf '%s\n' "$patched"
