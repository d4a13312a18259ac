"""Each fused RSP op against the unfused PyTorch composition it replaces, same process.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--json out.json] [--quick]

Shapes are those of VGG16 layers at 224×224 (batch 8). Prints a Markdown table (median of
repeated runs; speed-up over the reference; on a GPU the achieved fraction of the device's
peak memory bandwidth) and writes JSON rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from utils import describe, device_arg, markdown_table, output_path, parse_quick, peak_bandwidth_gbs, time_call  # noqa: E402

from rsp_fast.memory import keep_freed_memory  # noqa: E402
from rsp_fast.ops import dispatch  # noqa: E402

SHAPES = {"conv1_2 (64×224²)": (8, 64, 224, 224), "conv3_3 (256×56²)": (8, 256, 56, 56), "conv5_3 (512×14²)": (8, 512, 14, 14)}


def inputs(op: str, shape, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    if op == "sectional_matmul":  # the filter path's responses: [F⁺; F⁻] (2·O×C·9) · X̂ᵤ (C·9×L)
        N, O, H, W = shape
        A = torch.randn(N, 2 * O, O * 9, device=device, dtype=dtype, generator=g)
        B = torch.rand(N, O * 9, H * W, device=device, dtype=dtype, generator=g)
        Rs = torch.rand(N, 2 * O, H * W, device=device, dtype=dtype, generator=g)
        return (A, B, Rs, O), (A.numel() + B.numel() + 2 * Rs.numel()) * A.element_size()
    if op == "sectional_normalize":
        R = torch.randn(shape, device=device, dtype=dtype, generator=g)
        G = torch.rand((2,) + shape, device=device, dtype=dtype, generator=g)
        return (R, G[0], G[1]), 5 * R.numel() * R.element_size()  # 3 reads, 2 writes
    dx = torch.randn(shape, device=device, dtype=dtype, generator=g)
    x = torch.rand(shape, device=device, dtype=dtype, generator=g)
    total = torch.randn(shape[0], device=device, dtype=dtype, generator=g)
    return (dx, x, total), 5 * dx.numel() * dx.element_size()  # read 2, write 1, read+write 1 (two passes)


def reference_op(op: str):
    """The unfused PyTorch composition each op replaces."""
    if op == "sectional_matmul":
        from rsp_fast.kernels.reference import sectional_matmul_reference

        return sectional_matmul_reference
    return getattr(dispatch.TORCH, op)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="float16 and bfloat16 on CUDA only (the CPU kernels take float32 and float64)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (tests)")
    p.add_argument("--json", type=output_path)
    args = parse_quick(p, argv, repeats=2)
    keep_freed_memory()  # as the CLI does: neither side pays fresh page faults
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = {"small (2×17×13²)": (2, 17, 13, 13)} if args.quick else SHAPES
    repeats = args.repeats
    backends = [b for b in ("cpp", "cuda", "triton") if not dispatch._availability(b, device, dtype)]
    if device.type == "cpu" and not args.quick:
        backends = [b for b in backends if b != "triton"]  # the Triton interpreter is for testing, not timing
    if not backends:
        p.error(f"no compiled kernel set runs {args.dtype} on {device.type} here")
    peak = peak_bandwidth_gbs(device)
    rows, table = [], []
    for op in ("sectional_normalize", "purge", "sectional_matmul"):
        fused = [b for b in backends if getattr(dispatch.SETS[b], op, None) is not None]
        if not fused:
            continue
        for label, shape in shapes.items():
            args_, nbytes = inputs(op, shape, device, dtype)
            reference = reference_op(op)
            ref = time_call(lambda: reference(*args_), device, repeats)
            for b in fused:
                t = time_call(lambda: getattr(dispatch.SETS[b], op)(*args_), device, repeats)
                gbs = nbytes / t["median"] / 1e9
                row = {"op": op, "shape": list(shape), "backend": b, "device": str(device), "dtype": args.dtype,
                       "seconds_median": t["median"], "reference_seconds_median": ref["median"],
                       "speedup": ref["median"] / t["median"], "GB_per_s": gbs,
                       "fraction_of_peak_bandwidth": gbs / peak if peak else None}
                rows.append(row)
                table.append([op, label, b, f"{ref['median'] * 1e3:.2f}", f"{t['median'] * 1e3:.2f}", f"{row['speedup']:.2f}×",
                              f"{gbs:.1f}" + (f" ({gbs / peak:.0%} of peak)" if peak else "")])
    print(f"RSP ops vs the unfused PyTorch composition ({describe(device)}, {args.dtype}, median of {repeats})")
    print(markdown_table(["op", "shape", "backend", "torch ms", "kernel ms", "speed-up", "GB/s"], table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
