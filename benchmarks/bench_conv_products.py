"""RSP's conv rule on VGG16's dense layers, per layer: cuDNN's grouped convolutions against the
Triton implicit GEMMs (kernels/triton/conv_products.py), and the implicit GEMMs' launch tiles.

    python benchmarks/bench_conv_products.py [--batch 64] [--precisions tf32 bf16] [--layers dense|deep]
        [--paths grouped_conv implicit_gemm] [--tiles] [--warm 8] [--baseline-module old/conv_products.py ...]
        [--json out.json] [--quick]

Per layer and precision: milliseconds of one rule call (products, normalisation, purge) on each
path (--paths: also "gram", for the deep layers it takes by default) and the products' TFLOP/s at the implicit GEMMs' time (one call: stacking, kernels,
allocations; on a GPU also the kernels alone, from the profiler), and on a GPU all the layers'
products against the dense peak measured in the same run; with --tiles, each kernel's time
under each candidate tile (the others at their defaults), to choose ``default_tiles`` (on a GPU
also that kernel's own time in the profiler, the median of three calls): timed on
the launch the rule makes, whose back-projection writes the purge's 2·x̂⊙dx and counts (its
epilogue holds more registers), and compiled first in --warm processes at once (Triton's
compiles, seconds each, otherwise take most of the sweep). --baseline-module: other versions
of kernels/triton/conv_products.py (files), each one's products timed beside these, call by call.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_products import peak_tflops, product_device_seconds  # noqa: E402
from utils import describe, markdown_table, output_path, parse_quick, time_interleaved  # noqa: E402

from rsp_fast.api import _matmul_precision  # noqa: E402
from rsp_fast.ops import dispatch  # noqa: E402
from rsp_fast.rules.base import Context  # noqa: E402
from rsp_fast.rules.conv import call_geometry, inner_conv_relevance  # noqa: E402

# VGG16's 3×3 layers that take the dense path at 224×224: (C, O, H)
VGG16_DENSE = [(64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56)]
# the 3×3 layers where the Gram path has fewer multiply-adds: VGG16's conv4 and conv5, ResNet50's last two stages
DEEP = [(256, 512, 28), (512, 512, 28), (512, 512, 14), (256, 256, 14), (512, 512, 7)]
LAYERS = {"dense": VGG16_DENSE, "deep": DEEP}
QUICK = [(8, 6, 9), (5, 4, 7)]
LOW = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def candidate_tiles(dtype: torch.dtype, kernel: str, prepared_only: bool = False):
    """Launch tiles to try for one kernel: one program per tile, for the responses and the
    back-projection also persistent programs (``Tiles.programs`` per multiprocessor), for TF32's
    filters also the patches read from shifted copies (``Tiles.shifted``), and for each kernel TMA
    copies (``Tiles.tma``). ``prepared_only``: only the persistent, shifted and TMA ones, and
    TF32's unspilled back-projection tiles (beside the default launch, ``None``)."""
    from rsp_fast.kernels.triton.conv_products import Tiles

    red = 128 // (torch.finfo(dtype).bits // 8)
    tiles = [Tiles(128, 128, red, 8, 3), Tiles(128, 128, red, 8, 4), Tiles(128, 128, red, 4, 4),
             Tiles(128, 128, red, 4, 3), Tiles(128, 128, red, 4, 2), Tiles(128, 64, red, 4, 4), Tiles(64, 128, red, 4, 4), Tiles(64, 128, red, 4, 3), Tiles(64, 128, red, 4, 2),
             Tiles(256, 128, red, 8, 3), Tiles(256, 128, red, 8, 2), Tiles(128, 256, red, 8, 3),
             Tiles(128, 128, 2 * red, 8, 3), Tiles(128, 128, 2 * red, 8, 2)]
    if kernel == "filters" and dtype.itemsize == 4:  # TF32: the patches from shifted copies (Tiles.shifted)
        tiles += [Tiles(128, 64, red, 4, 3, shifted=True), Tiles(128, 128, red, 8, 3, shifted=True),
                  Tiles(256, 128, red, 8, 3, shifted=True), Tiles(128, 128, red, 8, 4, shifted=True)]
    if kernel in ("responses", "back"):
        tiles += [Tiles(256, 128, red, 8, 3, 1), Tiles(128, 256, red, 8, 3, 1), Tiles(128, 128, red, 8, 3, 1),
                  Tiles(128, 128, red, 4, 3, 2), Tiles(64, 128, red, 4, 3, 2), Tiles(64, 128, red, 4, 3, 3),
                  Tiles(128, 64, red, 4, 3, 2)]
    if kernel == "responses":  # the operands copied by the tensor memory accelerator (Tiles.tma)
        tiles += [Tiles(256, 128, red, 8, 3, tma=True), Tiles(128, 128, red, 8, 3, tma=True),
                  Tiles(128, 128, red, 8, 4, tma=True), Tiles(256, 128, red, 8, 3, 1, tma=True),
                  Tiles(128, 256, red, 8, 3, 1, tma=True)]
    if kernel == "back":
        tiles += [Tiles(64, 128, red, 4, 3, tma=True), Tiles(128, 64, red, 4, 3, tma=True),
                  Tiles(128, 128, red, 8, 3, tma=True), Tiles(64, 128, red, 4, 4, tma=True)]
    if kernel == "filters":  # R read as it is (no stacked sections), by boxes of red positions
        tiles += [Tiles(128, 64, red, 4, 3, tma=True), Tiles(128, 128, red, 8, 3, tma=True),
                  Tiles(128, 128, 2 * red, 8, 3, tma=True), Tiles(256, 128, red, 8, 3, tma=True)]
    if prepared_only:  # and TF32's back-projection on tiles that do not spill with F's sections contiguous
        unspilled = [Tiles(128, 128, red, 8, 3), Tiles(64, 128, red, 4, 3)] if kernel == "back" and dtype.itemsize == 4 else []
        return [None, *unspilled] + [t for t in tiles if t.programs or t.shifted or t.tma]
    return tiles


def kernel_name(kernel: str, t) -> str:
    """The profiler's name of a kernel's launch at tiles ``t`` (None: the default launch): its
    Python function's; TMA filters have a kernel of their own."""
    return "_filters_tma_kernel" if kernel == "filters" and t is not None and t.tma else f"_{kernel}_kernel"


def layer_case(C: int, O: int, H: int, batch: int, device, dtype, low):
    """A dense layer's inputs (seeded), its rule's Context and the products' call:
    ``products(tiles, combine, module)`` (combine: the rule's epilogue)."""
    from rsp_fast.kernels.triton import conv_products as ours
    from rsp_fast.rules.base import input_scale

    torch.manual_seed(0)
    x = torch.rand(batch, C, H, H, device=device, dtype=dtype)
    R = torch.randn(batch, O, H, H, device=device, dtype=dtype)
    x_cl = x.to(low or dtype).permute(0, 2, 3, 1).contiguous()
    scale = input_scale(x, True)

    def products(tiles=None, combine=False, module=ours):
        both = module.Combination(x, scale, torch.zeros(batch, dtype=torch.int32, device=device)) if combine else None
        return module.conv_products_triton(x_cl, R.view(batch, O, H * H), (3, 3), (1, 1), (1, 1, 1, 1), (H, H), dtype,
                                           tiles=tiles, combine=both)
    return x, R, products


def _warm(job) -> str | None:
    """Compile (by one launch) a candidate tile's kernels, in a worker process; None or why it failed."""
    precision, (C, O, H), batch, kernel, tiles = job
    device = torch.device("cuda")
    low = LOW[precision]
    try:
        with _matmul_precision(precision, device):
            layer_case(C, O, H, batch, device, torch.float32, low)[2]({kernel: tiles}, combine=True)
            torch.cuda.synchronize()
    except Exception as e:  # a tile that does not fit the shared memory: reported by the timing pass
        return f"{type(e).__name__}"
    return None


def warm_sweep(precisions, layers, batch: int, kernels, processes: int, prepared_only: bool) -> None:
    """Compile every candidate tile's launch in ``processes`` worker processes at once (Triton's
    cache on disk then holds them for the timing pass)."""
    jobs = [(precision, layer, batch, kernel, t) for precision in precisions for layer in layers for kernel in kernels
            for t in candidate_tiles(LOW[precision] or torch.float32, kernel, prepared_only) if t is not None]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_warm, jobs, chunksize=1)


def load_module(path: str):
    """A conv_products.py from a file (another version of the kernels), as a module."""
    spec = importlib.util.spec_from_file_location(f"baseline_{abs(hash(str(Path(path).resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precisions", nargs="+", default=["tf32", "bf16"], choices=sorted(LOW))
    p.add_argument("--layers", default="dense", choices=sorted(LAYERS), help="VGG16's dense layers, or the deep ones")
    p.add_argument("--paths", nargs="+", default=["grouped_conv", "implicit_gemm"],
                   help="the rule's paths to time per layer (grouped_conv, implicit_gemm, gram, filter, conv)")
    p.add_argument("--tiles", action="store_true", help="also time each kernel under candidate tiles")
    p.add_argument("--tile-kernels", nargs="+", default=["filters", "responses", "back"],
                   help="with --tiles: the kernels whose tiles to try")
    p.add_argument("--tile-set", choices=["all", "prepared"], default="all",
                   help="with --tiles: every candidate, or only the persistent and shifted ones beside the default")
    p.add_argument("--warm", type=int, default=0, help="with --tiles: compile the candidates in this many processes first")
    p.add_argument("--baseline-module", nargs="+", default=[],
                   help="other versions of conv_products.py (files) whose products to time beside these")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=output_path)
    p.add_argument("--quick", action="store_true", help="tiny layers, batch 2, one repeat (tests; the CPU interpreter)")
    args = parse_quick(p, argv, batch=2, repeats=1)
    from rsp_fast.kernels.triton import triton_unavailable_reason
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if reason := triton_unavailable_reason(device):
        raise SystemExit(f"bench_conv_products: {reason}")
    layers, batch, repeats = (QUICK if args.quick else LAYERS[args.layers]), args.batch, args.repeats
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    print(describe(device))
    if args.tiles and args.warm > 1 and device.type == "cuda":
        warm_sweep(args.precisions, layers, batch, args.tile_kernels, args.warm, args.tile_set == "prepared")
    baselines = {path: load_module(path) for path in args.baseline_module}
    rows, peaks = [], {}
    for precision in args.precisions:
        if device.type == "cuda":  # the device's dense rate in this precision, measured in this run
            peaks[precision] = peak_tflops(precision, device, 8192)
        low = LOW[precision] if device.type == "cuda" else (None if precision in ("fp32", "tf32") else torch.float16)
        ctx = Context(values={}, shapes={}, ops=dispatch.select_kernels("auto", device), product_dtype=low)
        for C, O, H in layers:
            x, R, products = layer_case(C, O, H, batch, device, dtype, low)
            g = call_geometry(3, padding=1)
            flops = 2 * 6 * O * C * 9 * H * H * batch
            with _matmul_precision(precision, device):
                times = time_interleaved({path: (lambda path=path: inner_conv_relevance(ctx, x, R, g, path=path))
                                          for path in args.paths}, device, repeats, 1)
                row = {"layer": f"{C}->{O} at {H}x{H}", "precision": precision, "batch": batch, "device": describe(device),
                       **{f"{path}_ms": 1e3 * t["median"] for path, t in times.items()}}
                for path, module in baselines.items():  # each other version and ours call by call, then its kernels
                    pair = time_interleaved({"ours": products, "baseline": lambda: products(module=module)}, device,
                                            repeats, 1)
                    theirs, mine = products(module=module).double(), products().double()
                    other = row.setdefault("baselines", {})[path] = {
                        "products_ms": 1e3 * pair["baseline"]["median"], "paired_products_ms": 1e3 * pair["ours"]["median"],
                        "max_rel_diff": float((theirs - mine).abs().max() / theirs.abs().max())}
                    if device.type == "cuda":
                        _, _, per_kernel = product_device_seconds(lambda: products(module=module), device)
                        other["per_kernel_ms"] = {name: 1e3 * t for name, t in per_kernel}
                base = time_interleaved({"products": products}, device, repeats, 1)["products"]["median"]
                row["products_ms"], row["products_tflops"], row["flops"] = 1e3 * base, flops / base / 1e12, flops
                row["peak_tflops"] = peaks.get(precision)
                if device.type == "cuda":  # the three kernels alone: the union of their intervals in the profiler
                    kernels, _, per_kernel = product_device_seconds(products, device)
                    row["kernels_ms"] = 1e3 * kernels
                    row["per_kernel_ms"] = {name: 1e3 * t for name, t in per_kernel}
                if args.tiles:
                    for kernel in args.tile_kernels:
                        for t in candidate_tiles(low or dtype, kernel, args.tile_set == "prepared"):
                            entry = {"kernel": kernel, "tiles": list(t) if t else "default"}
                            call = lambda: products({kernel: t} if t else {}, combine=True)  # noqa: E731
                            try:  # the rule's launch
                                entry["products_ms"] = 1e3 * time_interleaved({"t": call}, device, repeats, 1)["t"]["median"]
                            except Exception as e:  # a tile that does not fit the shared memory
                                entry["products_ms"] = f"{type(e).__name__}"
                            if device.type == "cuda" and "products_ms" in entry and not isinstance(entry["products_ms"], str):
                                try:  # the kernel itself, steadier than the whole call's wall time
                                    entry["kernel_ms"] = 1e3 * sorted(dict(product_device_seconds(call, device)[2])[
                                        kernel_name(kernel, t)] for _ in range(3))[1]
                                except Exception as e:  # its time not found: the call's own stays
                                    entry["kernel_ms"] = f"{type(e).__name__}: {e}"
                            row.setdefault("tiles", []).append(entry)
            rows.append(row)
            print(f"{row['layer']} {precision}: " + ", ".join(f"{path} {row[path + '_ms']:.2f} ms" for path in args.paths)
                  + f" (products {row['products_ms']:.2f} ms, {row['products_tflops']:.0f} TFLOP/s"
                  + (f"; kernels {row['kernels_ms']:.2f} ms: " + ", ".join(
                      f"{name.strip('_').removesuffix('_kernel')} {ms:.2f}" for name, ms in row["per_kernel_ms"].items())
                     if "kernels_ms" in row else "") + ")")
            for path, other in row.get("baselines", {}).items():
                print(f"   {path}: products {other['products_ms']:.2f} ms against {other['paired_products_ms']:.2f} ms, "
                      f"call by call (max difference {other['max_rel_diff']:.1e} of its largest)" + (": " + ", ".join(
                          f"{name.strip('_').removesuffix('_kernel')} {ms:.2f}"
                          for name, ms in other["per_kernel_ms"].items()) if "per_kernel_ms" in other else ""))
            for t in row.get("tiles", []):
                ms = t["products_ms"]
                print(f"   {t['kernel']} {t['tiles']}: " + (ms if isinstance(ms, str) else f"products {ms:.3f} ms"
                      + (f", the kernel {t['kernel_ms']:.3f} ms" if "kernel_ms" in t else "")))
    print(markdown_table(["layer", "precision", *(f"{path} ms" for path in args.paths), "products TFLOP/s"],
                         [[r["layer"], r["precision"], *(f"{r[path + '_ms']:.2f}" for path in args.paths),
                           f"{r['products_tflops']:.0f}"] for r in rows]))
    for precision, peak in peaks.items():  # all the layers' products together: their FLOPs over their time
        mine = [r for r in rows if r["precision"] == precision]
        rate = sum(r["flops"] for r in mine) / sum(r["products_ms"] for r in mine) / 1e9
        kernels = sum(r["flops"] for r in mine) / sum(r["kernels_ms"] for r in mine) / 1e9
        print(f"{precision}: products {rate:.0f} TFLOP/s over these layers ({kernels:.0f} in their kernels alone), "
              f"{rate / peak:.0%} ({kernels / peak:.0%}) of the {peak:.0f} TFLOP/s a 8192-square matrix product reaches")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
