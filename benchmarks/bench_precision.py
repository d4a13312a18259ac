"""Agreement of each precision mode with the float64 result, on real photographs.

    python benchmarks/bench_precision.py [--device cuda] [--backend auto] [--json out.json]

The embedded EfficientNet-Lite0 (ImageNet weights) explains scikit-image's photographs
(their predicted classes) in float64 on the CPU; each precision mode then runs on the
chosen device in float32. Reported per mode: the largest error relative to the largest
magnitude of the float64 map (per image, worst image), the worst heat-map cosine
similarity, and whether the predicted class changed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from utils import describe, device_arg, markdown_table, output_path, photo_batch  # noqa: E402

import rsp_fast  # noqa: E402
from rsp_fast.models import build_model  # noqa: E402


def agreement(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(max error / max |exact| per image, heat-map cosine) in the worst image."""
    got, exact = got.double().cpu(), exact.double()
    err = ((got - exact).flatten(1).abs().amax(1) / exact.flatten(1).abs().amax(1)).max().item()
    cos = F.cosine_similarity(rsp_fast.heatmap(got).flatten(1), rsp_fast.heatmap(exact).flatten(1), dim=1).min().item()
    return err, cos


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--backend", default="auto")
    p.add_argument("--precisions", nargs="+", choices=rsp_fast.api.PRECISIONS)
    p.add_argument("--json", type=output_path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if "tf32" in (args.precisions or []) and device.type != "cuda":
        p.error("--precisions tf32 runs on CUDA tensor cores only: not on the CPU")
    precisions = args.precisions or (list(rsp_fast.api.PRECISIONS) if device.type == "cuda" else ["fp32", "bf16"])
    spec = build_model("efficientnet_lite0")
    x = photo_batch(spec.input_size, spec.mean, spec.std)
    model = spec.model
    exact = rsp_fast.RSP(model.double(), backend="torch").explain(x.double())
    model.float().to(device)
    rows, table = [], []
    for precision in precisions:
        ex = rsp_fast.RSP(model, backend=args.backend, precision=precision).explain(x.to(device), target=exact.target.to(device))
        err, cos = agreement(ex.attribution, exact.attribution)
        same_class = bool((ex.logits.argmax(1).cpu() == exact.target).all())
        rows.append({"precision": precision, "backend": args.backend, "device": describe(device), "images": len(x),
                     "max_rel_error": err, "min_heatmap_cosine": cos, "same_prediction": same_class})
        table.append([precision, f"{err:.1e}", f"{cos:.6f}", "yes" if same_class else "no"])
    print(f"Agreement with float64 (CPU), EfficientNet-Lite0 on {len(x)} photographs, {describe(device)}, backend {args.backend}")
    print(markdown_table(["precision", "max error ÷ max abs R", "min heat-map cosine", "same prediction"], table))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
