"""Seconds per image of RSP (every available backend) beside the forward pass and the
attribution peers, measured in the same run.

    python benchmarks/bench_e2e.py [--models vgg16 resnet50 efficientnet_lite0] [--batches 1 8 32]
        [--precisions fp32 tf32 bf16] [--graph] [--authors-repo PATH] [--json rows.json] [--png chart.png] [--quick]

Random weights, 224×224 inputs (--quick: 64×64, batch 1 and 2, one repeat, unless given). RSP runs with
every available backend in each precision asked for (default fp32; "RSP (cuda, bf16)"), and
with --graph also through its static-shape path (CUDA graphs: "RSP (cuda, bf16, graph)").
Prints a Markdown table; JSON rows: method, model, backend, batch, device, dtype (of RSP's
products: float32, tf32 or bfloat16; inputs are float32),
sec_per_image_median/min/max, x_forward, peak_mem_mb (CUDA: peak allocated above the
inputs; CPU: peak resident memory above the resident set before the call). Memory is
measured in its own run (--memory: one warm-up and one measured call per method, with the
allocator returning memory to the OS); timings run with freed memory kept for reuse. The
methods of one model and batch are timed in interleaved rounds (one call of each per round),
so that a slow spell of a shared machine hits them alike and "× forward" holds.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from utils import (chart_path, check_models, describe, device_arg, markdown_table, output_path,  # noqa: E402
                   parse_quick, time_interleaved)

import rsp_fast  # noqa: E402
from rsp_fast.memory import keep_freed_memory, return_freed_memory  # noqa: E402

PRODUCT_DTYPES = {"fp32": "float32", "tf32": "tf32", "bf16": "bfloat16"}
LAYERS = {"vgg16": "features.29", "resnet50": "layer4", "efficientnet_lite0": "bn2"}  # others: RSP's default


def build(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    import torchvision

    return getattr(torchvision.models, name)(weights=None).eval()


def _check_arguments(p: argparse.ArgumentParser, args) -> None:
    """Bad arguments end the run before it starts, in one line (not a traceback after minutes)."""
    check_models(p, args.models, also=("efficientnet_lite0",))
    if any(b < 1 for b in args.batches or []) or args.repeats < 1 or args.size < 1:
        p.error("--batches, --repeats and --size take positive numbers")
    if args.authors_repo:
        repo = Path(args.authors_repo)
        if not (repo / "modules" / "vgg.py").is_file() or not (repo / "baselines" / "gradcam.py").is_file():
            p.error(f"--authors-repo {str(repo)!r} is not a checkout of github.com/wjNam/Relative_Sectional_Propagation "
                    "(no modules/vgg.py and baselines/gradcam.py there)")
        if args.quick or args.size != 224:
            p.error("--authors-repo needs 224×224 inputs (the authors' VGG16 has fixed sizes): no --quick or --size")
    if "tf32" in args.precisions and torch.device(args.device).type != "cuda":
        p.error("--precisions tf32 runs on CUDA tensor cores only: not with --device cpu")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(fn, x, target, device) -> float:
    """Peak memory one call adds: CUDA allocator peak, or on CPU the resident-set high-water
    mark (reset through /proc/self/clear_refs) above the resident set before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, target)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    base = _rss_mb("VmRSS")
    fn(x, target)
    return _rss_mb("VmHWM") - base


def activation_mb(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Memory of the forward pass's activations: every leaf module's output, each storage once
    (an in-place ReLU's output is its input's storage)."""
    kept: list[torch.Tensor] = []  # alive until counted, so that no address is reused

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            kept.append(out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(storages.values()) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "efficientnet_lite0"])
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", help="subset of method names (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=rsp_fast.api.PRECISIONS,
                   help="RSP's precision modes to run (tf32 on CUDA only)")
    p.add_argument("--graph", action="store_true", help="also time RSP's static-shape path (CUDA graphs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--channels-last", action="store_true",
                   help="the model and the inputs in channels-last memory (rows then say memory_format)")
    p.add_argument("--authors-repo", help="checkout of github.com/wjNam/Relative_Sectional_Propagation")
    p.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=output_path)
    p.add_argument("--png", type=chart_path)
    args = parse_quick(p, argv, size=64, repeats=1, batches=[1, 2])
    _check_arguments(p, args)
    device = torch.device(args.device)
    if args.memory:
        return_freed_memory()  # the resident set then follows live memory: its high-water mark is the peak
    else:
        keep_freed_memory()  # as the CLI does (RSS high-water marks would then mean nothing)
    size, repeats = args.size, args.repeats
    batches = args.batches or ([1, 8, 32, 64, 128] if device.type == "cuda" else [1, 8, 32])
    methods = dict(peers.METHODS)
    variants = {}  # method name -> (backend, precision, graph)
    for b, status in rsp_fast.backends(device).items():
        if status == "available" and not (b == "triton" and device.type == "cpu"):
            for precision in args.precisions:
                if precision == "tf32" and device.type != "cuda":
                    continue
                for graph in ([False, True] if args.graph and device.type == "cuda" else [False]):
                    tags = [b] + ([precision] if precision != "fp32" else []) + (["graph"] if graph else [])
                    variants[f"RSP ({', '.join(tags)})"] = (b, precision, graph)
    methods.update({name: peers.rsp(*v) for name, v in variants.items()})
    if args.authors_repo:
        methods["authors' RSP"] = peers.authors_rsp(args.authors_repo)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:  # a method this run has not (the authors' without --authors-repo, a backend not here): said
            print(f"not run here: {', '.join(map(repr, unknown))} (methods here: {', '.join(map(repr, methods))})",
                  file=sys.stderr)
        if not set(args.methods) & set(methods):
            p.error("none of --methods runs here")
        methods = {k: v for k, v in methods.items() if k in args.methods or k == "forward"}
    rows, table = [], []
    for model_name in args.models:
        try:  # a model that fails (its forward at this size, say) is a line of the table; the others run
            _measure(args, model_name, device, size, repeats, batches, methods, variants, rows, table)
        except Exception as exc:
            table.append([model_name, "", "(the model)", "n/a", "", "", f"{type(exc).__name__}: {_first_line(exc)}"])
    layout = ", model and inputs channels-last" if args.channels_last else ""
    measured = "Peak memory" if args.memory else f"Seconds per image, median of {repeats}"
    print(f"{measured}, {describe(device)}, {size}×{size}, random weights{layout}")
    print(markdown_table(["model", "batch", "method", "s/img", "img/s", "× forward", "peak MB"], table))
    if args.json:  # NaN (times not taken in a memory run) is not JSON: null
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps(clean, indent=2))
    if args.png:
        bar_chart(rows, args.png, "peak_mem_mb" if args.memory else "x_forward")
    return 0


def _measure(args, model_name, device, size, repeats, batches, methods, variants, rows, table) -> None:
    """Time (or measure the memory of) every method on one model at every batch size: its rows and table lines."""
    model = build(model_name).to(device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    layer, layer_error = LAYERS.get(model_name), ""
    if layer is None:
        try:  # once, outside the methods: a model RSP refuses is said once, not as every peer's failure
            layer = rsp_fast.RSP(model).layer
        except Exception as exc:
            layer_error = f"{type(exc).__name__}: {_first_line(exc)}"
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=layout)
        target = model(x).argmax(1).detach()
        fwd, acts = None, None
        if args.memory:
            acts = activation_mb(model, x)
            table.append([model_name, batch, "(forward activations)", "", "", "", f"{acts:.0f}"])
        calls, memory = {}, {}
        if layer is None:
            table.append([model_name, batch, "(RSP's default layer)", "n/a", "", "", layer_error])
        for name, make in methods.items():
            if name == "authors' RSP" and (model_name != "vgg16" or batch != 1):
                continue  # their code is only right at batch 1, and only runs VGG
            try:
                fn = make(model, layer)
                fn(x, target)  # warm-up, and a peer that cannot run this model fails here
                if args.memory:
                    memory[name] = peak_memory_mb(fn, x, target, device)
            except Exception as exc:  # say so, go on
                table.append([model_name, batch, name, "n/a", "", "", f"{type(exc).__name__}: {_first_line(exc)}"])
                continue
            calls[name] = (lambda f: lambda: f(x, target))(fn)
        nan = {"median": float("nan"), "min": float("nan"), "max": float("nan")}
        try:
            times = {name: nan for name in calls} if args.memory else time_interleaved(calls, device, repeats, warmup=0)
        except torch.OutOfMemoryError:  # every method's buffers (and CUDA graphs) are held at once
            table.append([model_name, batch, "(these methods together)", "n/a", "", "",
                          "out of memory: time fewer at once (--methods)"])
            times = {}
        del calls
        if device.type == "cuda":  # the next batch's methods start from an empty cache
            gc.collect()
            torch.cuda.empty_cache()
        for name, t in times.items():
            mem = memory.get(name)
            fwd = fwd or t["median"]
            backend, precision, _ = variants.get(name, ("", "fp32", False))
            row = {"method": name, "model": model_name, "backend": backend,
                   "batch": batch, "device": str(device), "dtype": PRODUCT_DTYPES[precision],
                   "sec_per_image_median": t["median"] / batch, "sec_per_image_min": t["min"] / batch,
                   "sec_per_image_max": t["max"] / batch, "x_forward": t["median"] / fwd, "peak_mem_mb": mem}
            if acts is not None:  # what the README's memory table divides by
                row["activations_mb"] = acts
            if args.channels_last:
                row["memory_format"] = "channels_last"
            rows.append(row)
            timed = [f"{row['sec_per_image_median']:.4f}", f"{batch / t['median']:.2f}", f"{row['x_forward']:.1f}×"]
            table.append([model_name, batch, name, *(["", "", ""] if args.memory else timed),  # a memory run times nothing
                          f"{mem:.0f} ({mem / acts:.2f}× activations)" if mem is not None else ""])
            print(f"  {model_name} batch {batch} {name}: {row['sec_per_image_median']:.4f} s/img", file=sys.stderr, flush=True)


def _first_line(exc: Exception, width: int = 160) -> str:
    """An error's first line, for a table cell."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:width]


def bar_chart(rows: list[dict], path: str, value: str = "x_forward") -> None:
    """One panel per (model, batch): each method's time per image ÷ the forward pass's, or its peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 * len(groups)), squeeze=False)
    for ax, (model, batch) in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r["model"], r["batch"]) == (model, batch)]
        ax.barh([r["method"] for r in sel], [r[value] for r in sel],
                color=["tab:red" if r["method"].startswith("RSP") else "tab:gray" for r in sel])
        what = "peak memory a call adds, MB" if value == "peak_mem_mb" else "time per image ÷ forward pass"
        ax.set_title(f"{model}, batch {batch}: {what}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
