"""Whole RSP passes (VGG16, batch 64) with the implicit GEMMs' default launches of session 26
against session 21's (TF32 filters on the channels-last input, responses one program per tile),
interleaved call by call, and the largest difference between the two maps."""
import sys
import torch
import torchvision
sys.path.insert(0, "benchmarks")
from utils import time_interleaved  # noqa: E402
import rsp_fast  # noqa: E402
from rsp_fast.kernels.triton import conv_products as cp  # noqa: E402

new = cp.default_tiles


def session21(kernel, columns, dtype, device):
    t = new(kernel, columns, dtype, device)
    if kernel == "filters" and t.shifted:
        return cp.Tiles(256, 128, t.red, 8, 3) if t.rows == 256 else cp.Tiles(128, min(128, max(32, columns)), t.red, 4, 3)
    if kernel == "responses" and t.programs:
        return cp.Tiles(128, 256, t.red, 8, 3) if dtype.itemsize == 2 else cp.Tiles(128, 128, 2 * t.red, 8, 3)
    return t


model = torchvision.models.vgg16().eval().cuda()
x = torch.randn(64, 3, 224, 224, device="cuda")
for precision in ("tf32", "bf16"):
    explainer = rsp_fast.RSP(model, backend="cuda", precision=precision)

    def run(chooser):
        cp.default_tiles = chooser
        try:
            return explainer.attribute(x)
        finally:
            cp.default_tiles = new
    a, b = run(session21).double(), run(new).double()
    diff = float((a - b).abs().max() / a.abs().max())
    times = time_interleaved({"session 21 launches": lambda: run(session21), "session 26 launches": lambda: run(new)},
                             "cuda", repeats=7, warmup=2)
    print(f"VGG16 batch 64 {precision}: " + ", ".join(f"{k} {64 / t['median']:.1f} img/s (min {64 / t['max']:.1f}, "
          f"max {64 / t['min']:.1f})" for k, t in times.items()) + f"; maps differ by {diff:.1e} of the largest")
