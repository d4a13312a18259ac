"""Masked products against the dense path, layer by layer, on the relevance of a real pass.

    python benchmarks/bench_masked.py [--models vgg16 efficientnet_lite0] [--batch 8] [--json out.json] [--quick]

One RSP pass (cpp backend, random weights, 224×224; --quick: 64×64, batch 2) records every
dense (groups = 1) inner conv's input and incoming relevance; each layer then runs with the
dense path ``choose_path`` would take without the masked kernels and with the masked path
(median of interleaved repeats). Columns: the share of R that is non-zero, both times per image, the
speed-up, the path the cost model takes, and the masked kernels' measured slowdown per
multiply-add against the dense path's: the figure MASKED_SLOWDOWN stands for.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import LAYERS, build  # noqa: E402
from utils import describe, markdown_table, time_interleaved  # noqa: E402

import rsp_fast  # noqa: E402
from rsp_fast.memory import keep_freed_memory  # noqa: E402
from rsp_fast.rules import conv as conv_rule  # noqa: E402


def recorded_layers(model, layer: str, x: torch.Tensor) -> list[tuple]:
    """(context, input, relevance, geometry, input_non_negative) of every dense inner conv."""
    calls, inner = [], conv_rule.inner_conv_relevance

    def record(ctx, x, R, g, path=None, non_negative=False):
        if g.groups == 1:
            calls.append((ctx, x, R, g, non_negative))
        return inner(ctx, x, R, g, path, non_negative)

    conv_rule.inner_conv_relevance = record
    try:
        rsp_fast.RSP(model, layer=layer, backend="cpp").attribute(x, target=1)
    finally:
        conv_rule.inner_conv_relevance = inner
    return calls


def compare(ctx, x, R, g, non_negative, repeats: int) -> dict:
    N, C = x.shape[:2]
    O, L = R.shape[1], R.shape[-2] * R.shape[-1]
    ck = C * g.kernel[0] * g.kernel[1]
    masked_ck = conv_rule.masked_channels(C, x.element_size()) * g.kernel[0] * g.kernel[1]
    dense_path = conv_rule.choose_path(ck, O, L, g.patches_are_input)
    nonzeros = int(torch.count_nonzero(R)) / N
    chosen = conv_rule.choose_path(ck, O, L, g.patches_are_input, nonzeros=nonzeros, masked_ck=masked_ck)
    run = lambda path: conv_rule.inner_conv_relevance(ctx, x, R, g, path, non_negative)  # noqa: E731
    times = time_interleaved({"dense": lambda: run(dense_path), "masked": lambda: run("masked")}, repeats=repeats, warmup=1)
    dense, masked = times["dense"]["median"] / N, times["masked"]["median"] / N
    dense_macs = min(6 * O * ck * L, (2 * ck * L + 4 * O * L) * L)
    return {"input": list(x.shape[1:]), "out_channels": O, "kernel": list(g.kernel), "nonzero": nonzeros / (O * L),
            "dense_path": dense_path, "dense_ms": dense * 1e3, "masked_ms": masked * 1e3, "speedup": dense / masked,
            "chosen": chosen, "slowdown_per_mac": dense_macs / (3 * max(nonzeros, 1) * masked_ck) * masked / dense}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16", "efficientnet_lite0"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    keep_freed_memory()
    size, batch, repeats = (64, 2, 1) if args.quick else (224, args.batch, args.repeats)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = build(name)
        x = torch.randn(batch, 3, size, size)
        for call in recorded_layers(model, LAYERS[name], x):
            rows.append({"model": name, "batch": batch, **compare(*call, repeats)})
            r = rows[-1]
            print(f"  {name} {r['input']} -> {r['out_channels']}: dense {r['dense_ms']:.2f} ms, masked {r['masked_ms']:.2f} ms",
                  file=sys.stderr, flush=True)
    print(f"Milliseconds per image, {describe('cpu')}, {size}×{size}, batch {batch}, random weights\n")
    print(markdown_table(
        ["model", "layer input", "out", "k", "R non-zero", "dense path", "dense ms", "masked ms", "speed-up", "chosen",
         "slowdown per MAC"],
        [[r["model"], "×".join(map(str, r["input"])), r["out_channels"], "×".join(map(str, r["kernel"])),
          f"{r['nonzero']:.2f}", r["dense_path"], f"{r['dense_ms']:.2f}", f"{r['masked_ms']:.2f}",
          f"{r['speedup']:.2f}×", r["chosen"], f"{r['slowdown_per_mac']:.1f}"] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
