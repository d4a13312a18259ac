"""Which way a conv's RSP products run (RSP_SPEC.md §2's three products, one result by any of
them): the paths, their multiply-adds, the rates measured for them on this project's machines,
and the choice for one layer (``choose_path``). The rule itself (``conv.py``) runs the path
chosen here."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..environment import CUDA_DENSE_PATHS, setting  # noqa: F401 (CUDA_DENSE_PATHS: read here by tests, gpu_check.sh)
from ..tf32 import matmul_tf32

if TYPE_CHECKING:
    from .conv import ConvGeometry


# How CUDA tensors run dense (not depthwise) layers off the Gram path: "grouped_conv" through
# cuDNN's grouped convolutions with the samples folded into the groups; "filter" through
# batched GEMMs on the unfolded patches; "conv" through cuDNN one sample at a time. Measured
# (VGG16, batch 64, img/s): H200 tf32 468 / 391 / 413, bf16 397 / 348 / 334; H100 tf32
# 434 / 363 / 358, bf16 488 / 409 / 416 (docs/gpu/h100_paths.log; cuDNN's autotuner changed
# grouped_conv by under 1 %). Channels-last operands for the grouped convolutions (the input
# and the sections position-major) were slower there: tf32 378, bf16 440.
# "implicit_gemm": Triton's implicit GEMMs over a channels-last copy of the input, the
# normalisation fused (kernels/triton/conv_products.py: no unfolding, no cuDNN transposes);
# stride-1 ungrouped convs only, the others take grouped_conv.
# H100, VGG16 at batch 64, img/s (docs/gpu/h100_paths_implicit_gemm.log): bfloat16 659 with
# implicit_gemm against 481 with grouped_conv, TF32 495 against 456. So products on tensor
# cores (16-bit, TF32) take implicit_gemm, exact float32 and float64 ones grouped_conv
# (``cuda_dense_path``). RSP_FAST_CUDA_DENSE_PATH chooses one path for every precision.
# (environment.py reads the variables where they are used: a bad value is an RSPError then.)
CUDA_DENSE_PATH: str | None = None  # one path for every precision, over RSP_FAST_CUDA_DENSE_PATH (tests)


# How many times slower per multiply-add the Gram path (unfolded patches, cuBLAS GEMMs, col2im)
# runs on CUDA than the implicit GEMMs, where both can take a layer: its multiply-adds are
# counted at this weight against theirs, by the products' element size. H100, batch 64
# (docs/gpu/h100_gram_vs_implicit.log), per layer: the implicit GEMMs faster where the Gram path
# saves up to 3.3× the multiply-adds (VGG16's conv4_1 in TF32 6.5 ms against 8.2), the Gram
# path faster in TF32 from 5.3× (conv4_2: 9.6 ms against 12.2); whole passes, img/s, counted at
# 1 / 2 / 4 / never taken: VGG16 TF32 495 / 495 / 505 / 450, ResNet50 TF32 691 / 842 / 841 / 729.
# In bfloat16, since the sections are stacked with aligned rows
# (docs/gpu/h100_conv_products_deep_fused.json), the implicit GEMMs are faster on every deep
# layer measured, down to 7×7 positions (VGG16's conv5 2.20 ms against 2.77, 512 channels at 7×7
# 1.59 against 1.83): no Gram path for 16-bit products where they run.
# RSP_FAST_CUDA_GRAM_SLOWDOWN sets one weight for all ("inf": no Gram path where they run).
CUDA_GRAM_SLOWDOWN = {2: math.inf, 4: 4.0}
# The Gram path as implicit GEMMs too ("implicit_gram": the patch Gram and the back-projection
# read the patches in place, kernels/triton/conv_products.py gram_products_triton), where the
# implicit GEMMs run, by the products' element size; there the Gram path's multiply-adds count
# as the implicit GEMMs' do. H100, batch 64, whole eager passes, img/s
# (docs/gpu/h100_gram_session20.log): bfloat16 VGG16 905.7 on it against 837.8 with no Gram path
# where the implicit GEMMs run, ResNet50 753.4 against 731.2; TF32 VGG16 503.1 (counted at 4×)
# against 533.4 on unfolded patches, ResNet50 715.7 against 722.5. So 16-bit products take it,
# TF32 ones the unfolded Gram path. RSP_FAST_CUDA_IMPLICIT_GRAM=1 (0) takes it for all (none).
CUDA_IMPLICIT_GRAM = {2: True, 4: False}


def _by_size(table: dict, variable: str, itemsize: int, default):
    """``table``'s entry for products of ``itemsize`` bytes, or the value of ``variable`` where it is set."""
    value = setting(variable)
    return table.get(itemsize, default) if value is None or itemsize not in table else value


def cuda_gram_slowdown(product_dtype: torch.dtype) -> float:
    """The weight of the Gram path's multiply-adds against the implicit GEMMs' for products of
    ``product_dtype`` on CUDA (1 where both are implicit GEMMs, and for products that never run
    there: float64)."""
    if _by_size(CUDA_IMPLICIT_GRAM, "RSP_FAST_CUDA_IMPLICIT_GRAM", product_dtype.itemsize, False):
        return 1.0
    return _by_size(CUDA_GRAM_SLOWDOWN, "RSP_FAST_CUDA_GRAM_SLOWDOWN", product_dtype.itemsize, 1.0)


def cuda_gram_path(is_cuda: bool, implicit_gemm_runs: bool, product_dtype: torch.dtype) -> str:
    """How the Gram path runs for products of ``product_dtype``: on the implicit GEMMs (CUDA,
    where they run, for the precisions that take them) or on unfolded patches."""
    implicit = (is_cuda and implicit_gemm_runs
                and _by_size(CUDA_IMPLICIT_GRAM, "RSP_FAST_CUDA_IMPLICIT_GRAM", product_dtype.itemsize, False))
    return "implicit_gram" if implicit else "gram"


def cuda_dense_path(tensor_cores: bool) -> str:
    """How dense layers off the Gram path run on CUDA, with products on tensor cores or not."""
    chosen = CUDA_DENSE_PATH or setting("RSP_FAST_CUDA_DENSE_PATH")
    return chosen or ("implicit_gemm" if tensor_cores else "grouped_conv")


def on_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether CUDA's products of ``dtype`` operands run on tensor cores: 16-bit ones, and float32
    ones when TF32 is allowed (as ``precision="tf32"`` sets it for the pass)."""
    return dtype.itemsize == 2 or (dtype == torch.float32 and matmul_tf32())


# The implicit GEMMs address within a sample in 32 bits (samples apart in 64): each per-sample
# tensor they read or write (input, R, S, dx, the Gram path's L×L) must have fewer elements
INT32_ELEMENTS = 2**31
SECTION_ALIGN = 16  # the sections' and the Gram's rows hold the positions padded to a multiple of this


def _aligned(positions: int) -> int:
    return -(-positions // SECTION_ALIGN) * SECTION_ALIGN


def implicit_gemm_fits(g: ConvGeometry, channels: int, outputs: int, in_hw: tuple[int, int], positions: int) -> bool:
    """Whether the implicit-GEMM kernels take this conv: stride 1, one group, and each sample's
    input, relevance and sections (2·O per position) and its filters (2·O·C per tap) within
    32-bit offsets."""
    taps = g.kernel[0] * g.kernel[1]
    per_sample = max(channels * in_hw[0] * in_hw[1], 2 * outputs * _aligned(positions), taps * 2 * outputs * channels)
    return g.stride == (1, 1) and g.groups == 1 and per_sample < INT32_ELEMENTS


def runnable_dense_path(path: str, implicit_gemm_runs: bool, is_cuda: bool = False,
                        product_dtype: torch.dtype = torch.float32, positions: int = 0) -> str:
    """``path`` as it runs: the Gram path on implicit GEMMs where ``cuda_gram_path`` says so, and
    where implicit_gemm (implicit_gram) cannot run, grouped_conv (gram). The implicit Gram path
    also needs its per-sample L×L Gram (``positions`` L) within 32-bit offsets."""
    gram_runs = implicit_gemm_runs and positions * _aligned(positions) < INT32_ELEMENTS
    if path == "gram":
        return cuda_gram_path(is_cuda, gram_runs, product_dtype)
    if gram_runs if path == "implicit_gram" else implicit_gemm_runs:
        return path
    return {"implicit_gemm": "grouped_conv", "implicit_gram": "gram"}.get(path, path)


# Each path's multiply-adds at the rate this project's CPU (2 cores, batch 8) measured for them,
# in units of the GEMM-based paths' rate (filter, Gram, fused pointwise: 70-120 GMAC/s):
# `python benchmarks/bench_compiled_paths.py --every-path` times every layer of VGG16, ResNet18/50,
# DenseNet121, RegNetX-400MF, ResNeXt50, MobileNetV2 and EfficientNet-Lite0 on every path
# (docs/bench_every_path_cpu_2026-11-27.json).
# PyTorch's dense convolutions (oneDNN) run their counted multiply-adds about twice as fast
# (140-210 GMAC/s on layers of 14×14 and more positions; about 1× at 7×7, where the Gram path wins by
# far anyway); grouped ones do not (25-90 GMAC/s).
CPU_CONV_SPEEDUP = 2.0
# The masked kernels, gathering patches at R's non-zeros, run 1.1-2 times slower than the GEMMs
# (slowest with 512-channel filters that leave the L2 cache, or very sparse R); counted at 1.5 they
# win behind max pools and ReLUs of layers up to 28×28 (ResNet's 128-channel 3×3 convs: 2.4 ms per
# image against the Gram path's 7.0), and lose to the Gram path on 14×14 ones.
MASKED_SLOWDOWN = 1.5
# The Gram path of grouped convs runs many small GEMMs and tap sums per group: 11-30 GMAC/s, about
# a third of the dense rate (RegNetX's 25-group 3×3 convs at 7×7: 0.8 ms per image against 0.5
# on the convolutions).
GROUPED_GRAM_SLOWDOWN = 3.0
MASKED_VECTOR_BYTES = 64  # the masked kernels pad each patch's channels to whole 64-byte vectors


# Depthwise convs on CPU: the three products fused per (sample, channel) plane in one C++ kernel
# (csrc/cpu/depthwise_products_cpu.cpp); kernels of up to 128 taps (11×11).
DEPTHWISE_MAX_TAPS = 128


# On 1×1 convs the masked kernels' cost per non-zero and product is better told by a fixed part
# and a part per channel than by one factor: fitted on EfficientNet-Lite0's and ResNet50's 1×1
# layers at batch 8 on this project's CPU (2 cores), 1.5 ns + 0.022 ns per channel against the
# fused pointwise kernel's 6·o·ck·L multiply-adds at about 90 GMAC/s, i.e. 135 + 2·ck
# multiply-adds' time. A single factor of 3 took the masked kernels on layers with 16 or 32 input
# channels, where they ran 2-3x slower.
MASKED_POINTWISE_SLOWDOWN, MASKED_ENTRY_MACS = 2.0, 135
POINTWISE_TILE = 32  # positions per tile of the fused pointwise kernel (float32: two 64-byte vectors)

# precision="bf16" on a CPU with bfloat16 units (AVX512-BF16, AMX): the products PyTorch runs
# (convolutions, the Gram and filter paths' GEMMs) took 1.5-3.5× less time than in float32
# (`bench_compiled_paths.py --every-path --precision bf16`, docs/bench_every_path_bf16_cpu_2026-11-27.json);
# the compiled kernels stay in float32. Their multiply-adds count at 1/CPU_BF16_SPEEDUP there.
CPU_BF16_SPEEDUP = 2.0
# Against the fused pointwise kernel the filter path also pays its passes over the o·L responses and
# ratios in memory: about 1.3 ns per element in bfloat16 (113 multiply-adds' time), which kept the
# float32 kernel ahead on 1×1 layers of 16-24 input channels (EfficientNet-Lite0's 16→96 at 112²:
# 1.3 against 2.3 ms per image) while bfloat16's GEMMs won from 40 channels on.
FILTER_PASS_MACS = 113


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (elsewhere oneDNN emulates it, slower than float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_products_speedup(is_cuda: bool, product_dtype: torch.dtype) -> float:
    """How many times faster than the float32 rates the cost model assumes PyTorch's products run in
    ``product_dtype`` (CPU_BF16_SPEEDUP for bfloat16 on a CPU with bfloat16 units; else 1)."""
    fast = not is_cuda and product_dtype == torch.bfloat16 and cpu_has_bf16_units()
    return CPU_BF16_SPEEDUP if fast else 1.0


def masked_macs(nonzeros: float, masked_ck: int, pointwise: bool) -> float:
    """The masked kernels' three products at ``nonzeros`` positions, in the GEMM paths' multiply-adds
    (``pointwise``: of a 1×1 conv)."""
    if pointwise:
        return 3 * nonzeros * (MASKED_POINTWISE_SLOWDOWN * masked_ck + MASKED_ENTRY_MACS)
    return MASKED_SLOWDOWN * 3 * nonzeros * masked_ck


def masked_channels(channels: int, element_size: int) -> int:
    """The channels as the masked kernels store them: padded to whole vectors."""
    lanes = MASKED_VECTOR_BYTES // element_size
    return -(-channels // lanes) * lanes


def gram_macs(ck: int, o: int, L: int, pixel_gram: int | None = None) -> int:
    """Multiply-adds of the Gram path for one sample and group: the patch Gram K = XᵤᵀXᵤ and the
    back-projection Xᵤ·M (ck·L² each), or both from the padded input's pixels (``pixel_gram``
    = C·P² each, from ``pixel_gram_macs``: see ``pixel_gram_products``); and G± = R±·K,
    M = R±ᵀS± (2·o·L² each)."""
    patch = ck * L * L if pixel_gram is None else pixel_gram
    return 2 * patch + 4 * o * L * L


def choose_path(ck: int, o: int, L: int, dense_pointwise: bool = False, cuda_dense: bool = False,
                nonzeros: float | None = None, masked_ck: int | None = None, pixel_gram: int | None = None,
                tensor_cores: bool = False, implicit_gemm_runs: bool = True, gram_slowdown: float = 1.0,
                fused_pointwise: bool = False, grouped: bool = False, torch_speedup: float = 1.0) -> str:
    """The cheapest way to run RSP's products for one group of one sample.

    With Xᵤ (ck×L) the unfolded input patches and R± (o×L) the sections, all paths give
    G± = R±·XᵤᵀXᵤ and dX = Xᵤ·(R⁺ᵀS⁺ − R⁻ᵀS⁻):
      filter: F± = R±·Xᵤᵀ, G± = F±·Xᵤ, dX = F±ᵀS± as batched GEMMs on the unfolded
              patches                                      ≈ 6·o·ck·L multiply-adds
      conv:   the same three products on PyTorch's convolution kernels (weight gradient,
              convolution, input gradient; one sample at a time, or with the samples
              folded into the groups: "grouped_conv"), which never
              materialise the k²-times larger patch matrix: measured 1.1–1.7× faster than
              the GEMMs on VGG16's layers on CPU, and the only sane choice for depthwise
      gram:   K = XᵤᵀXᵤ (shared by both sections),
              G± = R±·K, M = R±ᵀS±, dX = Xᵤ·M            ≈ 2·ck·L² + 4·o·L²
              (stride 1: K and dX from the pixels' Gram,   ≈ 2·C·P² + 4·o·L², ``pixel_gram`` = C·P²)
      masked: each product only at R's non-zeros (G± is needed only where R± ≠ 0; the
              filters and the back-projection sum over them) ≈ 3·nnz(R)·ck, where the
              stacked dense products cost 6·o·L·ck: behind a max pool nnz ≤ o·L/4 (8× fewer
              multiply-adds), behind a ReLU only the active units. ``nonzeros``: nnz(R) per
              sample and group when a masked kernel is available (dense layers, CPU);
              ``masked_ck``: ck with the channels padded as the masked kernels pad them.
    Deep layers with few positions take the Gram path (VGG16 conv5 at 14×14: 6× fewer
    multiply-adds); stride-1 1×1 layers, whose patch matrix is the input itself, the filter
    path (faster than the conv kernels on EfficientNet's 1×1 layers here), or where the fused
    pointwise kernel runs (``fused_pointwise``: CPU, cpp backend, one group) that kernel, the
    same multiply-adds with the last tile of POINTWISE_TILE positions padded and the masked
    kernels weighed against it by ``masked_macs``; the rest the
    conv path on CPU. On CUDA (``cuda_dense``: a CUDA tensor, not depthwise) the rest take
    ``cuda_dense_path(tensor_cores)``: Triton's implicit GEMMs or one grouped convolution per
    product, instead of a loop over the samples.
    Sparse relevance takes the masked path when it costs less, counted at MASKED_SLOWDOWN; the
    Gram path against the implicit GEMMs (where they run: ``implicit_gemm_runs``) at
    ``gram_slowdown`` (``cuda_gram_slowdown``). Against the conv path the convolutions' multiply-adds
    count at 1/CPU_CONV_SPEEDUP, or for a ``grouped`` conv (groups > 1) the Gram path's at
    GROUPED_GRAM_SLOWDOWN. The paths PyTorch runs (all but the fused and masked kernels) count at
    1/``torch_speedup`` (``torch_products_speedup``); where that makes the filter path's GEMMs,
    with their passes over the responses (FILTER_PASS_MACS per element), cheaper than the fused
    pointwise kernel, they take the layer instead.
    """
    alternative = ("pointwise" if fused_pointwise else "filter") if dense_pointwise else \
        cuda_dense_path(tensor_cores) if cuda_dense else "conv"
    # the fused pointwise kernel works on whole tiles of positions (the last one zero-padded)
    tiles = -(-L // POINTWISE_TILE) * POINTWISE_TILE if alternative == "pointwise" else L
    dense, gram = 6 * o * ck * tiles, gram_macs(ck, o, L, pixel_gram) / torch_speedup
    if alternative == "conv":  # CPU, or a depthwise conv on CUDA (whose Gram path never wins)
        dense, gram = (dense, gram * GROUPED_GRAM_SLOWDOWN) if grouped else (dense / CPU_CONV_SPEEDUP, gram)
    if alternative != "pointwise":
        dense /= torch_speedup
    elif (gemms := 6 * o * ck * L / torch_speedup + FILTER_PASS_MACS * o * L) < dense:  # bfloat16 GEMMs may outrun it
        alternative, dense = "filter", gemms
    if nonzeros is not None and masked_macs(nonzeros, masked_ck or ck, dense_pointwise) < min(dense, gram):
        return "masked"
    if alternative == "implicit_gemm" and not implicit_gemm_runs:
        alternative = "grouped_conv"
    if gram * (gram_slowdown if alternative == "implicit_gemm" else 1) < dense:
        return "gram"
    return alternative



def tap_sums_pay(is_cuda: bool, product_dtype: torch.dtype, implicit_gemm_runs: bool = False) -> bool:
    """Whether the pixel Gram's tap sums (strided adds over L×L and P×P matrices) cost less than
    the patch Gram's extra multiply-adds. Not on CUDA with 16-bit products, whose GEMMs are cheap:
    H100, VGG16 at batch 64 (docs/gpu/h100_paths_implicit_gemm.log), bfloat16 716.8 img/s
    without the pixel Gram against 667.5 with it (the tap sums took 15 of the batch's 93 ms); TF32
    485.6 against 495.1. Never where the Gram path runs on implicit GEMMs (``cuda_gram_path``),
    which form the patch Gram."""
    return (not (is_cuda and product_dtype.itemsize == 2)
            and cuda_gram_path(is_cuda, implicit_gemm_runs, product_dtype) == "gram")


def pixel_gram_macs(g: ConvGeometry, channels: int, in_hw, L: int, tap_sums: bool = True) -> int | None:
    """C·P²: the multiply-adds of the pixel Gram (and of the back-projection from it) for a stride-1
    conv of an ``in_hw`` input (P pixels once padded) with L output positions, where the Gram
    path takes it: where it applies (stride 1, not a 1×1 conv read as its own patches), costs
    less than the patch form's ck·L² and its tap sums pay (``tap_sums``: ``tap_sums_pay``).
    None otherwise."""
    if g.stride != (1, 1) or g.patches_are_input or not tap_sums:
        return None
    l, r, t, b = g.pad
    pixels = (in_hw[0] + t + b) * (in_hw[1] + l + r)
    macs = channels * pixels * pixels
    return macs if macs < channels * g.kernel[0] * g.kernel[1] * L * L else None


