"""Shared benchmark helpers: timing (median of repeats), environment description, tables, photographs."""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def photo_batch(size: int, mean, std, batch: int | None = None) -> torch.Tensor:
    """scikit-image's photographs letterboxed into ``size``² and normalised as the model expects;
    with ``batch``, repeated to that many."""
    from rsp_fast.images import sample_photos
    from rsp_fast.render import to_model_input

    x = torch.cat([to_model_input(img[None], size, mean, std)[0] for _, img in sample_photos()])
    return x if batch is None else x[torch.arange(batch) % len(x)]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device="cpu", repeats: int = 7, warmup: int = 2) -> dict:
    """Median, min and max seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    return time_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], device="cpu", repeats: int = 7, warmup: int = 2) -> dict:
    """Median, min and max seconds of each function, timed in rounds of one call each: a slow
    spell of a shared machine then hits every function alike, and their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}


def describe(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_bandwidth_gbs(device="cuda") -> float | None:
    """The GPU's theoretical memory bandwidth from its clock and bus width, if torch reports them."""
    if torch.device(device).type != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def output_path(value: str) -> str:
    """argparse type of an output file: a folder that does not exist (or a file where a folder
    should be, or one nothing can be written into) is said before the run, not after it, with
    its results lost."""
    from rsp_fast.errors import RSPError
    from rsp_fast.paths import checked_output_file

    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder, not a file to write")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: its folder does not exist")
    try:
        checked_output_file(value, "output file")
    except RSPError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def chart_path(value: str) -> str:
    """argparse type of a chart to write: an output file matplotlib can write by its extension."""
    output_path(value)
    if Path(value).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise argparse.ArgumentTypeError(f"{value!r}: a chart is written as .png, .svg or .pdf")
    return value


def parse_quick(parser: argparse.ArgumentParser, argv=None, **quick) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the ``quick`` values replace the defaults, so options given still win."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def positive_int(value: str) -> int:
    """argparse type: a whole number, 1 or more."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number, 1 or more")
    return number


def device_arg(value: str) -> str:
    """argparse type of --device: a device torch knows and this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {value!r} (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is available here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {value!r}: the benchmarks run on cpu or cuda")
    return value


def check_models(parser: argparse.ArgumentParser, names, also=()) -> None:
    """Each name a torchvision classifier (or one of ``also``), else the parser's one-line error."""
    import torchvision

    for name in names:
        if name not in also and not callable(getattr(torchvision.models, name, None)):
            parser.error(f"unknown model {name!r}: {' or '.join([*also, 'a torchvision classifier (vgg16, resnet50, ...)'])}")
