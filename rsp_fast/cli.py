"""The ``rsp-fast`` command line: ``video``, ``image`` and ``demo``.

Errors print one line on stderr and exit with status 2 (a traceback only with --debug);
Ctrl-C stops cleanly with status 130. Outputs appear only when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import traceback
from fractions import Fraction
from pathlib import Path

from .environment import check_settings
from .errors import BackendUnavailableError, RSPError
from .paths import check_outputs_spare_inputs, checked_output_file, checked_output_folder, write_atomically


class _Parser(argparse.ArgumentParser):
    """Option errors as one line on stderr with status 2, as every other bad input (argparse's
    own prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _frame_rate(text: str) -> float:
    """--fps: a number, or a fraction as video rates are written (30000/1001), checked before
    any work (the demo writes its clip first)."""
    try:
        rate = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a frame rate: {text!r} (a number or a fraction, e.g. 30000/1001)") from None
    if not Fraction(1, 1001) <= rate <= 1000:
        raise argparse.ArgumentTypeError(f"frame rate must be from 1/1001 to 1000 frames per second, not {text}")
    return float(rate)


def _add_model_options(p: argparse.ArgumentParser, batch_size: int = 8) -> None:
    p.add_argument("--model", default="efficientnet_lite0", help="efficientnet_lite0 (default), vgg16, resnet50 or package.module:factory")
    p.add_argument("--weights", help="weights file (torch state dict loaded with weights_only=True, or .safetensors)")
    p.add_argument("--layer", help="saliency layer (module name); default: last feature map before pooling")
    p.add_argument("--init", default="comparative", choices=["comparative", "gradcam"],
                   help="initial relevance (default comparative: the target against its hostile classes)")
    p.add_argument("--hostile-k", type=int, default=3, help="hostile classes for comparative (default 3)")
    p.add_argument("--target", type=int, help="class to explain (default: the top-1 class of each frame or image)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"frames or images per pass (default {batch_size}); for a video classifier (3-D convs), frames per clip")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if there is one)")
    p.add_argument("--backend", choices=["auto", "torch", "cpp", "cuda", "triton"],
                   help="kernels to run (default: $RSP_FAST_BACKEND, else auto: the fastest available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="RSP's products in float32 (default), TF32 (CUDA) or bfloat16")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_video_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=_frame_rate, help="output frames evenly at this rate, a number or a fraction (30000/1001), "
                   "without the sound (default: each input frame keeps its time)")
    p.add_argument("--max-frames", type=int, help="explain only the first N frames (default: all)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--overlay", dest="mode", action="store_const", const="overlay", help="heat map over the frame (default)")
    layout.add_argument("--side-by-side", dest="mode", action="store_const", const="side-by-side", help="frame and heat map side by side")
    p.set_defaults(mode="overlay")
    p.add_argument("--scale", default="frame", choices=["frame", "running"],
                   help="colour scale per frame (default) or smoothed over time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rsp-fast", description="Relative Sectional Propagation heat maps")
    sub = parser.add_subparsers(dest="command", required=True)
    video = sub.add_parser("video", help="a heat-map video of every frame")
    video.add_argument("input")
    video.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    _add_model_options(video)
    _add_video_options(video)
    image = sub.add_parser("image", help="heat map and overlay PNGs for images")
    image.add_argument("images", nargs="+", help="image files, or folders of them")
    image.add_argument("-o", "--output", required=True, help="output folder")
    _add_model_options(image)
    demo = sub.add_parser("demo", help="the embedded default: EfficientNet-Lite0 on a clip made from scikit-image photographs")
    demo.add_argument("-o", "--output", default="out/demo", help="output folder (default: out/demo)")
    _add_model_options(demo)
    _add_video_options(demo)
    info = sub.add_parser("info", help="what this installation runs: versions, the compiled kernels, each backend")
    info.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _spec(args):
    from .models import build_model, checked_device

    device = checked_device(args.device)  # before the model is built: a typo fails at once
    spec = build_model(args.model, args.weights)
    spec.model.to(device)
    return spec


def _video_kwargs(args) -> dict:
    return dict(layer=args.layer, init=args.init, hostile_k=args.hostile_k, target=args.target, batch_size=args.batch_size,
                device=args.device, backend=args.backend, precision=args.precision, fps=args.fps, max_frames=args.max_frames, mode=args.mode,
                scale=args.scale, progress=False if args.quiet else None)


def _report_path(args, default: Path | None = None, inputs=()) -> Path | None:
    """Where --report goes (or ``default``), checked before any work (a link: its target)."""
    path = default if args.report is None else args.report
    return None if path is None else checked_output_file(path, "report", inputs)


def _write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), "report")


def _summary(report: dict) -> str:
    t = report["totals"]
    return (f"{t['frames']} frames on {report['device']} in {t['wall_s']:.1f} s ({t['fps']:.2f} fps; decode {t['decode_s']:.1f} s, "
            f"attribute {t['attribute_s']:.1f} s, encode {t['encode_s']:.1f} s)"
            + (f"; sound {report['audio']}" if report.get("audio") else ""))


def cmd_video(args) -> None:
    from .video import explain_video

    report_path = _report_path(args, None, [("input video", args.input), ("output video", args.output)])
    report = explain_video(_spec(args), args.input, args.output, **_video_kwargs(args))
    if report_path:
        _write_report(report, report_path)
    _print(f"wrote {args.output}: {_summary(report)}")


def cmd_image(args) -> None:
    from .api import RSP
    from .images import explain_images, image_files

    images = image_files(args.images)
    out = checked_output_folder(args.output)
    for given in args.images:  # its maps would be pictures of the next run there (heat maps of heat maps)
        if out.is_dir() and Path(given).is_dir() and os.path.samefile(given, out):
            raise RSPError(f"output folder {args.output!r} is the input folder {given!r}: the maps would be "
                           "read as pictures by the next run there; choose another output folder")
    inputs = [("input image", path) for _, path in images]
    outputs = [("output", out / f"{name}_{kind}.png") for name, _ in images for kind in ("heatmap", "overlay")]
    outputs += [("contact sheet", out / "contact_sheet.png")]
    check_outputs_spare_inputs(outputs, inputs)
    report_path = _report_path(args, out / "report.json", inputs + outputs + [("output folder", out)])
    spec = _spec(args)
    explainer = RSP(spec.model, layer=args.layer, init=args.init, hostile_k=args.hostile_k, backend=args.backend,
                    precision=args.precision)
    report = explain_images(spec, explainer, images, args.output, target=args.target, batch_size=args.batch_size, device=args.device)
    _write_report(report, report_path)
    for row in report["images"]:
        _print(f"{row['name']}: {row['class_name']} ({row['score']:.2f}) in {row['seconds']:.2f} s")
    _print(f"wrote {args.output} ({len(report['images'])} images on {report['device']})")


def cmd_demo(args) -> None:
    from . import render
    from .video import explain_video, make_demo_clip
    from .video.io import read_frames

    out = checked_output_folder(args.output)
    # its own files too, before any work (a folder there failed the run at its end; a link: its target)
    files = [("demo clip", out / "demo_input.mp4"), ("output video", out / "demo_rsp.mp4"),
             ("contact sheet", out / "contact_sheet.png")]
    clip, video, sheet = (checked_output_file(path, what, [f for f in files if f[1] != path]) for what, path in files)
    report_path = _report_path(args, out / "report.json", [("output folder", out), *files])
    made = [p for p in (out, *out.parents) if not p.exists()]  # a failed run removes what it made
    out.mkdir(parents=True, exist_ok=True)
    had_clip = clip.exists()
    try:  # writing the clip may fail too (a full disk, Ctrl-C)
        report = explain_video(_spec(args), make_demo_clip(clip), video, **_video_kwargs(args))
    except BaseException:
        _remove_made(None if had_clip else clip, made)
        raise
    n = report["totals"]["frames"]
    picks = sorted({round(i * (n - 1) / 7) for i in range(8)})
    render.save_png(sheet, render.contact_sheet(read_frames(video, picks), columns=4))
    _write_report(report, report_path)
    _print(f"wrote {out / 'demo_rsp.mp4'}, {out / 'contact_sheet.png'} and the report: {_summary(report)}")


def _remove_made(file, folders) -> None:
    """Remove ``file`` (if any) and then ``folders``, innermost first, where they are empty."""
    try:
        if file is not None:
            file.unlink(missing_ok=True)
        for folder in folders:
            folder.rmdir()
    except OSError:  # a folder that holds something else stays; the run's own error is what to report
        pass


def cmd_info(args) -> None:
    """Versions, the compiled extension (built or not, for which torch) and each backend's
    availability per device, with the reason where one cannot run: what an install is checked by."""
    import platform

    import torch

    from . import __version__
    from .ops import custom
    from .ops.dispatch import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    _print(f"rsp-fast {__version__}, torch {torch.__version__}, Python {platform.python_version()}, Triton {triton_version}")
    if custom.HAVE_C:
        from . import _C

        kernels = "CPU and CUDA kernels" if custom.cuda_kernels_built() else "CPU kernels"
        _print(f"rsp_fast._C: {kernels}, built against torch {getattr(_C, 'TORCH_VERSION', '(not recorded)')}")
    else:
        _print(f"rsp_fast._C: {custom.C_ERROR}")
    devices = [("cpu", f"{torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        devices.append(("cuda", torch.cuda.get_device_name()))
    for device, what in devices:
        _print(f"backends on {device} ({what}):")
        for backend, status in backends(device).items():
            _print(f"  {backend:<7} {status}")


COMMANDS = {"video": cmd_video, "image": cmd_image, "demo": cmd_demo, "info": cmd_info}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, ``docker stop``, a closed terminal): stops the run the
    way Ctrl-C does, so no temporary file is left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def _stopping_signals() -> dict:
    """Make SIGTERM and SIGHUP raise Stopped; returns the handlers they had (signals can only
    be caught in the main thread: elsewhere, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in _stopping_signal_numbers()}


def _stopping_signal_numbers() -> list[int]:
    return [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # no SIGHUP on Windows


def _print(line: str) -> None:
    """``line`` on stdout, at once. Every command prints after its files were written, so a
    stdout that cannot take it (a full disk) is reported as that, with the line it held, not as
    a failed run ("No space left on device" read as the video's)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:  # the reader stopped early: main's own case
        raise
    except OSError as exc:
        _drop_stdout()
        raise RSPError(f"cannot write to standard output ({exc.strerror or exc}); it was to say: {line}") from None


def _drop_stdout() -> None:
    """What stdout still holds, and will be given, goes nowhere: the flush at exit would fail
    again, with a traceback and status 120."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO)
        pass


def _say(line: str) -> None:
    """``line`` on stderr; nowhere where fd 2 was closed at start-up (sys.stderr None, where
    print would take stdout, the output of `info` or of a script): the status says it."""
    if sys.stderr is not None:
        print(line, file=sys.stderr)


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8, a class name a Latin-1 terminal cannot show
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    previous = _stopping_signals()
    try:
        check_settings()  # a bad RSP_FAST_CUDA_* value is a mistake even where no CUDA path runs
        import torch

        from .memory import keep_freed_memory
        from .models import current_folder_importable

        keep_freed_memory()
        torch.set_grad_enabled(True)
        with current_folder_importable():  # as `python -m rsp_fast` has it, the `rsp-fast` script too
            COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader stopped early (`rsp-fast info | head -1`): nothing is wrong here
        _drop_stdout()
        return 128 + signal.SIGPIPE
    except (RSPError, BackendUnavailableError, OSError, ModuleNotFoundError) as exc:
        if args.debug and sys.stderr is not None:  # the traceback, then the same one line and status as without --debug
            traceback.print_exc()
        if isinstance(exc, ModuleNotFoundError):  # an optional dependency (Pillow for a picture, ...)
            from .optional import missing_dependency

            exc = missing_dependency(exc)
            if exc is None:
                raise
        _say(f"rsp-fast: error: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        _say("\nrsp-fast: interrupted; no half-written file was left behind")
        return 128 + exc.signum if isinstance(exc, Stopped) else 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def run() -> None:
    """The ``rsp-fast`` command: ``main``, then, where Ctrl-C, SIGTERM or SIGHUP stopped it, that
    same signal again with its default action once the clean-up is done, so that the caller sees
    the process ended by it (a shell loop over videos stops at Ctrl-C instead of going on to the
    next one; a shell still shows 128 + the signal's number)."""
    code = main()
    signum = code - 128
    if signum in (signal.SIGINT, *_stopping_signal_numbers()):
        for stream in filter(None, (sys.stdout, sys.stderr)):  # None: closed at start-up
            try:
                stream.flush()
            except OSError:  # a reader that has gone: nothing more to say to it
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(code)


if __name__ == "__main__":
    run()
