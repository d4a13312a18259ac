"""The compiled CPU paths against PyTorch's, layer by layer, on the relevance of a real pass.

    python benchmarks/bench_compiled_paths.py [--models vgg16 efficientnet_lite0] [--batch 8] [--json out.json] [--quick]
    python benchmarks/bench_compiled_paths.py --ablation [--models ...]    # whole passes without each kernel
    python benchmarks/bench_compiled_paths.py --every-path [--precision bf16] [--models ...]

One RSP pass (cpp backend, random weights, 224×224; --quick: 64×64, batch 2 unless given) records every
inner conv's input and incoming relevance. Each dense (groups = 1) layer then runs with the
dense path ``choose_path`` would take without the compiled kernels, with the masked path and,
for stride-1 1×1 layers, with the fused pointwise kernel; each depthwise layer with PyTorch's
convolutions ("conv") and with the fused depthwise kernel (median of interleaved repeats).
Columns: the share of R that is non-zero, the times per image, the speed-up of the path RSP
takes, that path, and for dense layers the masked kernels' measured slowdown per multiply-add
against the library path's (the cost model counts it at MASKED_SLOWDOWN against the Gram path,
MASKED_SLOWDOWN × CPU_CONV_SPEEDUP against the convolutions).
``--ablation``: whole passes (batch 8, 224×224, comparative R₀ of the top class) with all the
compiled kernels, then without each of the masked, depthwise and pointwise kernels, with the
path cost model's per-path weights undone, and on the PyTorch reference alone, timed in
interleaved rounds: what each piece buys end to end (``--photos``: on scikit-image's
photographs, EfficientNet-Lite0 with its ImageNet weights).
``--every-path``: each dense or grouped layer timed on every path beside the multiply-adds
the cost model counts for it (what its weights are fitted to); ``--precision bf16``: the
layers recorded and run with bfloat16 products.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import LAYERS, build  # noqa: E402
from utils import describe, markdown_table, output_path, parse_quick, photo_batch, time_interleaved  # noqa: E402

import rsp_fast  # noqa: E402
from rsp_fast.memory import keep_freed_memory  # noqa: E402
from rsp_fast.models import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402
from rsp_fast.ops import dispatch  # noqa: E402
from rsp_fast.rules import conv as conv_rule, conv_paths  # noqa: E402


def recorded_layers(model, layer: str, x: torch.Tensor, precision: str = "fp32") -> list[tuple]:
    """(context, input, relevance, geometry, input_non_negative) of every inner conv."""
    calls, inner, depth = [], conv_rule.inner_conv_relevance, [0]

    def record(ctx, x, R, g, path=None, non_negative=False, deferred=None):
        if depth[0] == 0:  # not a strided 1×1 conv's own stride-1 call
            calls.append((ctx, x, R, g, non_negative))
        depth[0] += 1
        try:
            return inner(ctx, x, R, g, path, non_negative, deferred)
        finally:
            depth[0] -= 1

    conv_rule.inner_conv_relevance = record
    try:
        rsp_fast.RSP(model, layer=layer, backend="cpp", precision=precision).attribute(x, target=1)
    finally:
        conv_rule.inner_conv_relevance = inner
    return calls


class Layer(NamedTuple):
    """What the cost model reads of a recorded layer, per sample (and per group where it says so)."""
    N: int
    O: int
    L: int
    ck: int  # per group
    o: int  # per group
    nonzeros: float  # nnz(R), exact
    pointwise: bool  # an unpadded dense 1×1 conv, strided ones included (they run as stride-1 ones)
    pixel_gram: int | None
    masked_ck: int


def layer(x, R, g) -> Layer:
    N, C = x.shape[:2]
    O, k2 = R.shape[1], g.kernel[0] * g.kernel[1]
    L = R.shape[-2] * R.shape[-1]
    return Layer(N, O, L, C // g.groups * k2, O // g.groups, int(torch.count_nonzero(R)) / N,
                 g.groups == 1 and g.is_pointwise and not any(g.pad),
                 conv_paths.pixel_gram_macs(g, C // g.groups, x.shape[-2:], L),
                 conv_paths.masked_channels(C, x.element_size()) * k2)


def timed_paths(ctx, x, R, g, non_negative, paths, repeats: int) -> dict[str, float]:
    """Milliseconds per image of the layer on each path (medians of interleaved rounds)."""
    run = lambda path: conv_rule.inner_conv_relevance(ctx, x, R, g, path, non_negative)  # noqa: E731
    times = time_interleaved({p: (lambda p: lambda: run(p))(p) for p in paths}, repeats=repeats, warmup=1)
    return {p: times[p]["median"] / x.shape[0] * 1e3 for p in paths}


def compare(ctx, x, R, g, non_negative, repeats: int) -> dict:
    t = layer(x, R, g)
    row = {"input": list(x.shape[1:]), "out_channels": t.O, "kernel": list(g.kernel), "stride": list(g.stride),
           "nonzero": t.nonzeros / (t.O * t.L)}
    if g.groups == 1:
        library = conv_paths.choose_path(t.ck, t.O, t.L, t.pointwise, pixel_gram=t.pixel_gram)
        compiled = "masked"
        chosen = conv_paths.choose_path(t.ck, t.O, t.L, t.pointwise, nonzeros=t.nonzeros, masked_ck=t.masked_ck,
                                       pixel_gram=t.pixel_gram, fused_pointwise=t.pointwise)
    else:
        library, compiled, chosen = "conv", "depthwise", "depthwise"
    paths = [library, compiled] + (["pointwise"] if t.pointwise and library != "pointwise" else [])
    ms = timed_paths(ctx, x, R, g, non_negative, paths, repeats)
    row.update(library_path=library, library_ms=ms[library], compiled_path=compiled, compiled_ms=ms[compiled],
               pointwise_ms=ms.get("pointwise"), chosen=chosen, speedup=ms[library] / ms.get(chosen, ms[library]))
    if g.groups == 1:
        dense_macs = min(6 * t.O * t.ck * t.L, conv_paths.gram_macs(t.ck, t.O, t.L, t.pixel_gram))
        row["slowdown_per_mac"] = dense_macs / (3 * max(t.nonzeros, 1) * t.masked_ck) * ms[compiled] / ms[library]
    return row


def every_path(ctx, x, R, g, non_negative, repeats: int) -> dict:
    """A dense or grouped layer timed on every path that can run it on CPU, beside each path's
    multiply-adds per sample as ``choose_path`` counts them (per group, times the groups): the
    data the cost model's weights are fitted to."""
    t, G = layer(x, R, g), g.groups
    tiles = -(-t.L // conv_paths.POINTWISE_TILE) * conv_paths.POINTWISE_TILE
    dense = 6 * t.O * t.ck * t.L
    macs = {"gram": G * conv_paths.gram_macs(t.ck, t.o, t.L, t.pixel_gram)}
    if G == 1:
        macs["masked"] = 3 * t.nonzeros * t.masked_ck
    macs.update({"filter": dense, "pointwise": 6 * t.O * t.ck * tiles} if t.pointwise else {"conv": dense})
    if macs["gram"] > 4 * dense:  # far out of the running, and its L×L matrices may not fit in memory
        del macs["gram"]
    ms = timed_paths(ctx, x, R, g, non_negative, macs, repeats)
    chosen = conv_paths.choose_path(t.ck, t.o, t.L, t.pointwise, nonzeros=t.nonzeros if G == 1 else None,
                                   masked_ck=t.masked_ck, pixel_gram=t.pixel_gram, fused_pointwise=t.pointwise,
                                   grouped=G > 1,
                                   torch_speedup=conv_paths.torch_products_speedup(x.is_cuda, ctx.product_dtype or x.dtype))
    return {"input": list(x.shape[1:]), "out_channels": t.O, "groups": G, "kernel": list(g.kernel),
            "stride": list(g.stride), "nonzero": t.nonzeros / (t.O * t.L), "chosen": chosen, "macs": macs, "ms": ms}


# The cost model's weights before they were fitted per path (every path's multiply-adds at one
# rate, the masked kernels' at three times it): what fitting them buys end to end.
UNWEIGHTED = {"CPU_CONV_SPEEDUP": 1.0, "MASKED_SLOWDOWN": 3.0, "GROUPED_GRAM_SLOWDOWN": 1.0}


def ablation(names: list[str], batch: int, size: int, repeats: int, photos: bool = False) -> list[dict]:
    """Whole passes with every compiled kernel, without each one, with the cost model unweighted
    (UNWEIGHTED) and on the reference alone. ``photos``: real photographs, and the embedded
    EfficientNet-Lite0 with its ImageNet weights."""
    full = dispatch.COMPILED
    sets = {"cpp": (full, {}), "cpp without masked": (dataclasses.replace(full, masked_products=None), {}),
            "cpp without depthwise": (dataclasses.replace(full, depthwise_products=None), {}),
            "cpp without pointwise": (dataclasses.replace(full, pointwise_products=None), {}),
            "cpp, cost model unweighted": (full, UNWEIGHTED), "torch": (dispatch.TORCH, {})}
    rows = []
    for name in names:
        torch.manual_seed(0)
        trained = photos and name == "efficientnet_lite0"
        model = build_model(name).model if trained else build(name)
        x = photo_batch(size, IMAGENET_MEAN, IMAGENET_STD, batch) if photos else torch.randn(batch, 3, size, size)
        explainer = rsp_fast.RSP(model, layer=LAYERS.get(name), backend="cpp")

        def run(kernels, weights):
            def call():
                fitted = {k: getattr(conv_paths, k) for k in weights}
                dispatch.SETS["cpp"] = kernels
                for k, v in weights.items():
                    setattr(conv_paths, k, v)
                try:
                    return explainer.attribute(x)
                finally:
                    dispatch.SETS["cpp"] = full
                    for k, v in fitted.items():
                        setattr(conv_paths, k, v)
            return call

        calls = {"forward": lambda: model(x)}
        calls.update({label: run(*variant) for label, variant in sets.items()})
        with torch.no_grad():
            times = time_interleaved(calls, repeats=repeats, warmup=1)
        forward = times["forward"]["median"]
        for label, t in times.items():
            rows.append({"model": name, "weights": "ImageNet" if trained else "random", "inputs":
                         "photos" if photos else "noise", "batch": batch, "kernels": label,
                         "ms_per_image": t["median"] / batch * 1e3,
                         "x_forward": t["median"] / forward, "x_all_kernels": t["median"] / times["cpp"]["median"]})
            print(f"  {name} {label}: {t['median'] / batch * 1e3:.2f} ms per image", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16", "efficientnet_lite0"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=output_path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ablation", action="store_true", help="whole passes without each compiled kernel")
    p.add_argument("--every-path", action="store_true",
                   help="time each dense or grouped layer on every path, beside the multiply-adds the cost model counts")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="with --every-path: the products' precision (bf16: the GEMM and conv paths in bfloat16)")
    p.add_argument("--photos", action="store_true",
                   help="ablation on scikit-image's photographs (EfficientNet-Lite0 with its ImageNet weights)")
    args = parse_quick(p, batch=2, repeats=1)
    keep_freed_memory()
    size, batch, repeats = (64 if args.quick else 224), args.batch, args.repeats
    if args.ablation:
        rows = ablation(args.models, batch, size, repeats, args.photos)
        print(f"Whole RSP passes, {describe('cpu')}, {size}×{size}, batch {batch}; median of "
              f"{repeats} interleaved rounds\n")
        print(markdown_table(["model", "weights", "inputs", "kernels", "ms per image", "× forward", "× all kernels"],
                             [[r["model"], r["weights"], r["inputs"], r["kernels"], f"{r['ms_per_image']:.2f}",
                               f"{r['x_forward']:.2f}", f"{r['x_all_kernels']:.3f}"] for r in rows]))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    rows = []
    if args.every_path:
        for name in args.models:
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size)
            for call in recorded_layers(build(name), LAYERS.get(name), x, args.precision):
                if call[3].groups < call[1].shape[1]:  # not depthwise
                    rows.append({"model": name, "batch": batch, "precision": args.precision,
                                 **every_path(*call, repeats)})
                    r = rows[-1]
                    print(f"  {name} {r['input']} -> {r['out_channels']}: " + ", ".join(
                        f"{p} {ms:.2f} ms" for p, ms in r["ms"].items()), file=sys.stderr, flush=True)
        print(f"Milliseconds per image on each path, {describe('cpu')}, {size}×{size}, batch {batch}, "
              f"precision {args.precision}\n")
        paths = ["conv", "filter", "pointwise", "gram", "masked"]
        print(markdown_table(
            ["model", "layer input", "out", "groups", "k", "stride", "R non-zero", *paths, "fastest", "RSP takes"],
            [[r["model"], "×".join(map(str, r["input"])), r["out_channels"], r["groups"], "×".join(map(str, r["kernel"])),
              r["stride"][0], f"{r['nonzero']:.2f}", *(f"{r['ms'][p]:.2f}" if p in r["ms"] else "–" for p in paths),
              min(r["ms"], key=r["ms"].get), r["chosen"]] for r in rows]))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    for name in args.models:
        torch.manual_seed(0)
        model = build(name)
        x = torch.randn(batch, 3, size, size)
        for call in recorded_layers(model, LAYERS.get(name), x):
            if call[3].groups not in (1, call[1].shape[1]):  # grouped, neither dense nor depthwise
                continue
            rows.append({"model": name, "batch": batch, **compare(*call, repeats)})
            r = rows[-1]
            print(f"  {name} {r['input']} -> {r['out_channels']}: {r['library_path']} {r['library_ms']:.2f} ms, "
                  f"{r['compiled_path']} {r['compiled_ms']:.2f} ms", file=sys.stderr, flush=True)
    print(f"Milliseconds per image, {describe('cpu')}, {size}×{size}, batch {batch}, random weights\n")
    print(markdown_table(
        ["model", "layer input", "out", "k", "stride", "R non-zero", "library path", "ms", "compiled path", "ms",
         "pointwise ms", "RSP takes", "speed-up", "slowdown per MAC"],
        [[r["model"], "×".join(map(str, r["input"])), r["out_channels"], "×".join(map(str, r["kernel"])), r["stride"][0],
          f"{r['nonzero']:.2f}", r["library_path"], f"{r['library_ms']:.2f}", r["compiled_path"], f"{r['compiled_ms']:.2f}",
          f"{r['pointwise_ms']:.2f}" if r["pointwise_ms"] is not None else "–", r["chosen"], f"{r['speedup']:.2f}×",
          f"{r['slowdown_per_mac']:.1f}" if "slowdown_per_mac" in r else "–"]
         for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
