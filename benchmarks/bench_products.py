"""How close RSP's matrix products come to the device's dense peak, per precision.

    python benchmarks/bench_products.py [--model vgg16] [--batch 64] [--backend cuda] [--json out.json] [--quick]

The peak is measured in the same run (a large square matrix product in each precision).
RSP's product FLOPs (the forward pass's and the head's gradients' too) come from
``torch.utils.flop_counter``'s formulas (mm, bmm) and ``conv_flops`` (convolutions and their gradients, groups counted) and ``implicit_gemm_flops``
(the Triton implicit GEMMs of the conv rule's CUDA dense path); on CUDA their time is
the time during which kernels the profiler names as GEMMs or convolutions ran (cuDNN's
layout transposes for them included), so the product rate excludes normalisation, purge
and copies. The whole pass is reported too (its time, and the share of it spent in products).
The ``triton`` backend's ``sectional_matmul`` (filter and Gram paths) and the ``cpp`` backend's
compiled products are not counted, so the script takes a backend whose other products are
PyTorch's: ``cuda`` (the default on a GPU) or ``torch`` (on the CPU).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
from utils import check_models, describe, device_arg, markdown_table, output_path, parse_quick, sync, time_call  # noqa: E402

import rsp_fast  # noqa: E402
from rsp_fast.api import _matmul_precision  # noqa: E402

PEAK_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
# cuBLAS (nvjet, xmma, cutlass), cuDNN (implicit GEMM, wgrad/dgrad, winograd) and ATen's own conv kernels
TOP = 25  # kernels listed per precision in the JSON
# and rsp_fast's Triton implicit GEMMs (kernels/triton/conv_products.py)
PRODUCT_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|conv|dgrad|wgrad|winograd|cudnn|fft|_filters_kernel|_responses_kernel|"
                            r"_back_kernel", re.IGNORECASE)


def peak_tflops(precision: str, device: torch.device, n: int) -> float:
    """Dense matrix-product rate of an n×n×n product, in TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=PEAK_DTYPES[precision]) for _ in range(2))
    with _matmul_precision(precision, device):  # TF32 off for fp32, on for tf32, as RSP sets it
        t = time_call(lambda: a @ b, device, repeats=10, warmup=3)["median"]
    return 2 * n**3 / t / 1e12


def conv_flops(func, args, out) -> int | None:
    """FLOPs of a (non-transposed) convolution or of the pieces of its backward that are asked
    for: each is 2·N·O·(C/groups)·k²·(output positions). (torch's formula for the weight
    gradient ignores the groups: N times too many for RSP's samples-in-groups convolutions.)"""
    if func is torch.ops.aten.convolution.default and not args[6]:
        x, w = args[0], args[1]
        return 2 * x.shape[0] * w.numel() * out.shape[2:].numel()
    if func is torch.ops.aten.convolution_backward.default and not args[7]:
        grad_out, w, mask = args[0], args[2], args[10]
        return 2 * grad_out.shape[0] * w.numel() * grad_out.shape[2:].numel() * (int(mask[0]) + int(mask[1]))
    return None


class _CountFlops(TorchDispatchMode):
    """FLOPs of every op torch's FLOP counter has a formula for, convolutions by ``conv_flops``.
    (FlopCounterMode itself also tracks modules with backward hooks, which autograd.grad
    inside RSP does not allow.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flops = conv_flops(func, args, out)
        if flops is None and func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        self.total += flops or 0
        return out


def implicit_gemm_flops(x_cl: torch.Tensor, R: torch.Tensor, kernel, *args, **kwargs) -> int:
    """FLOPs of the Triton implicit GEMMs' three products (filters, responses, back-projection),
    counted as the grouped convolutions they replace are: 2·N·(2·O)·C·k²·L each."""
    N, _, _, C = x_cl.shape
    O, L = R.shape[1:]
    return 3 * 2 * N * 2 * O * C * kernel[0] * kernel[1] * L


def implicit_gram_flops(x_cl: torch.Tensor, R: torch.Tensor, kernel, *args, **kwargs) -> int:
    """FLOPs of the Gram path's products on implicit GEMMs: the patch Gram and the
    back-projection (2·N·ck·L² each), [R⁺; R⁻]·K and Sᵀ·[R⁺; R⁻] (2·N·2·O·L² each)."""
    N, _, _, C = x_cl.shape
    O, L = R.shape[1:]
    return 2 * N * (2 * C * kernel[0] * kernel[1] * L * L + 2 * 2 * O * L * L)


def product_flops(fn) -> int:
    """FLOPs of one call's matrix products: torch's ops (their dispatch), and the Triton implicit
    GEMMs (launched from Python, invisible to the dispatcher) from their operands' shapes."""
    try:
        from rsp_fast.kernels.triton import conv_products
    except ImportError:  # no Triton: no implicit GEMMs either
        conv_products = None
    with _CountFlops() as counter:
        if conv_products is None:
            fn()
            return counter.total
        counts = {"conv_products_triton": implicit_gemm_flops, "gram_products_triton": implicit_gram_flops}
        real = {name: getattr(conv_products, name) for name in counts}

        def counted(name):
            def launch(*args, **kwargs):
                counter.total += counts[name](*args, **kwargs)
                return real[name](*args, **kwargs)
            return launch
        for name in counts:
            setattr(conv_products, name, counted(name))
        try:
            fn()
        finally:
            for name, launch in real.items():
                setattr(conv_products, name, launch)
    return counter.total


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: kernels that overlap count once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def product_device_seconds(fn, device: torch.device) -> tuple[float, float, list[tuple[str, float]]]:
    """Seconds during which GEMM/convolution kernels ran, seconds during which any kernel ran,
    and every kernel's summed seconds (longest first), for one call, from the profiler's
    kernel intervals. cuDNN runs grouped convolutions as concurrent kernels, so times are
    unions of intervals, not sums."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    spans, product_spans, per_kernel = [], [], {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA:
            continue
        span = (evt.time_range.start / 1e6, evt.time_range.end / 1e6)
        spans.append(span)
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + span[1] - span[0]
        if PRODUCT_KERNEL.search(evt.name):
            product_spans.append(span)
    return busy_seconds(product_spans), busy_seconds(spans), sorted(per_kernel.items(), key=lambda k: -k[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backend", default=None, choices=["cuda", "torch"], help="default: cuda on a GPU, torch on CPU")
    p.add_argument("--precisions", nargs="+", choices=list(PEAK_DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=output_path)
    args = parse_quick(p, argv, size=64, batch=2)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    import torchvision

    check_models(p, [args.model])
    if (args.batch is not None and args.batch < 1) or args.size < 1:
        p.error("--batch and --size take positive numbers")
    size = args.size
    batch = args.batch or (64 if cuda else 8)
    backend = args.backend or ("cuda" if cuda else "torch")
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if cuda else ["fp32", "bf16"])
    n = 512 if args.quick else (8192 if cuda else 2048)
    model = getattr(torchvision.models, args.model)(weights=None).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    rows, table = [], []
    for precision in precisions:
        peak = peak_tflops(precision, device, n)
        explainer = rsp_fast.RSP(model, backend=backend, precision=precision)
        fn = lambda: explainer.attribute(x)  # noqa: E731
        t = time_call(fn, device, repeats=1 if args.quick else 5, warmup=1)["median"]
        flops = product_flops(fn)
        row = {"model": args.model, "batch": batch, "backend": backend, "precision": precision, "device": describe(device),
               "peak_tflops": peak, "product_gflop_per_image": flops / batch / 1e9, "sec_per_image": t / batch,
               "whole_pass_tflops": flops / t / 1e12}
        if cuda:
            prod_s, kernel_s, kernels = product_device_seconds(fn, device)
            row.update(product_tflops=flops / prod_s / 1e12, product_fraction_of_peak=flops / prod_s / 1e12 / peak,
                       product_share_of_kernel_time=prod_s / kernel_s,
                       top_kernels=[{"kernel": name[:160], "ms_per_image": 1e3 * sec / batch, "share": sec / kernel_s,  # summed
                                     "product": bool(PRODUCT_KERNEL.search(name))} for name, sec in kernels[:TOP]])
            print(f"  {precision}: where the kernel time goes (ms per image)", file=sys.stderr)
            for k in row["top_kernels"][:12]:
                print(f"    {k['ms_per_image']:.4f} {k['share']:5.1%} {'P' if k['product'] else ' '} {k['kernel'][:110]}", file=sys.stderr)
        rows.append(row)
        table.append([precision, f"{peak:.1f}", f"{row['product_gflop_per_image']:.1f}", f"{batch / t:.1f}",
                      f"{row['whole_pass_tflops']:.2f}",
                      f"{row['product_tflops']:.1f} ({row['product_fraction_of_peak']:.0%})" if cuda else "n/a (no profiler)",
                      f"{row['product_share_of_kernel_time']:.0%}" if cuda else ""])
        print(f"  {precision}: {batch / t:.1f} img/s", file=sys.stderr, flush=True)
    print(f"RSP products on {describe(device)}: {args.model} {size}×{size}, batch {batch}, backend {backend}")
    print(markdown_table(["precision", f"measured peak TFLOP/s ({n}³)", "product GFLOP/img", "img/s",
                          "whole pass TFLOP/s", "products TFLOP/s (of peak)", "products' share of kernel time"], table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
