"""The first layer's z^B rule per stem: the convolutions (cuDNN on CUDA) against the fused
Triton kernels (kernels/triton/first_layer.py, RSP_FAST_CUDA_FUSED_FIRST_LAYER=1).

    python benchmarks/bench_first_layer.py [--batch 64] [--precisions fp32 tf32] [--json out.json] [--quick]

Per stem and precision: milliseconds of one rule call on each path, timed side by side, their
ratio, and the largest difference between the two maps relative to the largest value.
"fp32" runs the products in float32, "tf32" on TF32 tensor cores (CUDA only, as
``precision="tf32"``; "bf16" keeps the first layer in float32 too, so it times like one of these).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from utils import describe, device_arg, markdown_table, output_path, parse_quick, time_interleaved  # noqa: E402

from rsp_fast.api import _matmul_precision  # noqa: E402
from rsp_fast.kernels.triton import triton_unavailable_reason  # noqa: E402
from rsp_fast.ops.dispatch import TORCH  # noqa: E402
from rsp_fast.rules.base import Context  # noqa: E402
from rsp_fast.rules.conv import conv_geometry, first_conv_relevance  # noqa: E402

# (name, in channels, out channels, kernel, stride, padding) at 224×224
STEMS = [("VGG16 conv1_1", 3, 64, 3, 1, 1), ("ResNet50 conv1", 3, 64, 7, 2, 3), ("EfficientNet stem", 3, 32, 3, 2, 1)]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=output_path)
    ap.add_argument("--quick", action="store_true", help="1 image of 12×12, 16 output channels at most, 1 call (tests)")
    args = parse_quick(ap, argv, batch=1, size=12, repeats=1)
    warmup, channels = (0, 16) if args.quick else (2, None)
    device = torch.device(args.device)
    if reason := triton_unavailable_reason(device):
        raise SystemExit(f"bench_first_layer: Triton unavailable on {device}: {reason}")
    precisions = [p for p in args.precisions if p == "fp32" or device.type == "cuda"]
    print(f"# first layer z^B rule, batch {args.batch}, {args.size}×{args.size}, {describe(device)}")
    rows = []
    for name, C, O, k, s, p in STEMS:
        torch.manual_seed(0)
        conv = nn.Conv2d(C, min(O, channels or O), k, stride=s, padding=p).to(device)
        x = torch.randn(args.batch, C, args.size, args.size, device=device)
        g = conv_geometry(conv, (args.size, args.size))
        R = torch.randn(args.batch, conv.out_channels, *g.out_size(args.size, args.size), device=device)
        ctx = Context(values={}, shapes={}, ops=TORCH)
        weight = conv.weight.detach()
        for precision in precisions:
            with _matmul_precision(precision, device):
                calls = {path: (lambda fused=path == "fused": first_conv_relevance(ctx, x, R, weight, g, fused=fused))
                         for path in ("convolutions", "fused")}
                times = time_interleaved(calls, device, repeats=args.repeats, warmup=warmup)
                maps = {path: fn() for path, fn in calls.items()}
            diff = ((maps["fused"] - maps["convolutions"]).abs().max() / maps["convolutions"].abs().max()).item()
            ms = {path: 1e3 * t["median"] for path, t in times.items()}
            rows.append({"stem": name, "precision": precision, "batch": args.batch, "device": device.type,
                         "convolutions_ms": ms["convolutions"], "fused_ms": ms["fused"],
                         "speedup": ms["convolutions"] / ms["fused"], "max_rel_diff": diff})
    print(markdown_table(["stem", "precision", "convolutions ms", "fused ms", "speedup", "max rel diff"],
                         [[r["stem"], r["precision"], f"{r['convolutions_ms']:.3f}", f"{r['fused_ms']:.3f}",
                           f"{r['speedup']:.2f}×", f"{r['max_rel_diff']:.1e}"] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
