"""The ``rsp-fast`` command line: ``image`` and ``demo``.

Errors print one line on stderr and exit with status 2 (a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import BackendUnavailableError, RSPError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", help="efficientnet_lite0 (default), vgg16, resnet50 or package.module:factory")
    p.add_argument("--weights", help="weights file (torch state dict loaded with weights_only=True, or .safetensors)")
    p.add_argument("--layer", help="saliency layer (module name); default: last feature map before pooling")
    p.add_argument("--init", default="comparative", choices=["comparative", "gradcam"])
    p.add_argument("--hostile-k", type=int, default=3)
    p.add_argument("--target", type=int, help="class to explain (default: top-1 per image)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "cuda", "triton"])
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsp-fast", description="Relative Sectional Propagation heat maps")
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="heat map and overlay PNGs for images")
    image.add_argument("images", nargs="+")
    image.add_argument("-o", "--output", required=True, help="output folder")
    _add_model_options(image)
    demo = sub.add_parser("demo", help="the embedded default: EfficientNet-Lite0 on photographs shipped with scikit-image")
    demo.add_argument("-o", "--output", default="out/demo", help="output folder")
    _add_model_options(demo)
    return parser


def _explainer(args):
    import torch

    from .api import RSP
    from .models import build_model

    torch.set_grad_enabled(True)
    spec = build_model(args.model, args.weights)
    spec.model.to(args.device)
    return spec, RSP(spec.model, layer=args.layer, init=args.init, hostile_k=args.hostile_k, backend=args.backend)


def run(args) -> dict:
    from .images import explain_images, read_image, sample_photos

    spec, explainer = _explainer(args)
    if args.command == "demo":
        images = sample_photos()
    else:
        images = [(Path(p).stem, read_image(p)) for p in args.images]
    t0 = time.perf_counter()
    report = explain_images(spec, explainer, images, args.output, target=args.target, batch_size=args.batch_size, device=args.device)
    report["totals"]["wall_s"] = time.perf_counter() - t0
    report_path = Path(args.report) if args.report else Path(args.output) / "report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    for row in report["images"]:
        print(f"{row['name']}: {row['class_name']} ({row['score']:.2f}) in {row['seconds']:.2f} s")
    print(f"wrote {args.output} (contact sheet: {report['contact_sheet']}, report: {report_path})")
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (RSPError, BackendUnavailableError, OSError) as exc:
        if args.debug:
            raise
        print(f"rsp-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsp-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
