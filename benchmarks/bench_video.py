"""End-to-end heat-map video throughput: frames per second and the share of time spent in
decode, attribution and encode, per batch size, on the demo clip (or --input).

    python benchmarks/bench_video.py [--batch-sizes 1 8 32] [--frames 32] [--size 1920x1080] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsp_fast.memory import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from utils import device_arg, output_path, positive_int  # noqa: E402
from rsp_fast import RSP
from rsp_fast.models import build_model
from rsp_fast.video import explain_video, make_demo_clip


def _frame_size(text: str) -> tuple[int, int]:
    """argparse type of --size: WxH, two positive whole numbers."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frame size WxH (e.g. 320x240)")
    return int(parts[0]), int(parts[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="video to use (default: the demo clip)")
    p.add_argument("--size", default="320x240", type=_frame_size, help="the demo clip's frame size, WxH (e.g. 1920x1080 for HD)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32])
    p.add_argument("--frames", type=positive_int, default=32)
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", type=output_path)
    args = p.parse_args(argv)
    keep_freed_memory()
    spec = build_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        width, height = args.size
        src = args.input or make_demo_clip(Path(tmp) / "clip.mp4", size=(width, height))
        # one explainer for every run, as a service holds one: its trace and the first call's set-up are paid here,
        # not in the frames per second (a run of 32 frames would mostly time them)
        spec.model.to(args.device)
        explainer = RSP(spec.model, backend=args.backend)
        explain_video(spec, src, Path(tmp) / "warm.mp4", max_frames=max(args.batch_sizes), batch_size=max(args.batch_sizes),
                      device=args.device, explainer=explainer, progress=False)
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            rep = explain_video(spec, src, Path(tmp) / f"out{bs}.mp4", batch_size=bs, max_frames=args.frames,
                                device=args.device, explainer=explainer, progress=False)
            t = rep["totals"]
            busy = t["decode_s"] + t["attribute_s"] + t["encode_s"]
            rows.append({"batch": bs, "frames": t["frames"], "fps": t["frames"] / (time.perf_counter() - t0),
                         "decode_share": t["decode_s"] / busy, "attribute_share": t["attribute_s"] / busy,
                         "encode_share": t["encode_s"] / busy, "device": args.device, "model": args.model})
    env = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{args.model}, {args.device}, {env}\n")
    print("| batch | frames | frames/s | decode | attribute | encode |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['frames']} | {r['fps']:.2f} | {r['decode_share']:.1%} | {r['attribute_share']:.1%} | {r['encode_share']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
