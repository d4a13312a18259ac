"""Explain still images: read, letterbox, attribute in batches, write heat maps and overlays."""
from __future__ import annotations

import itertools
import os
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from . import render
from .api import RSP
from .errors import RSPError
from .models import ModelSpec, checked_device
from .optional import optional_import, pil
from .paths import check_name_length, check_readable, checked_output_folder
from .pictures import FrameAttributor, as_rgb, as_spec, iterable


def read_image(path: str | Path) -> np.ndarray:
    """Any image PIL reads (grey, palette, alpha, 16-bit and float grey included) as H×W×3
    uint8 RGB, upright: a photo's EXIF orientation (a phone held sideways) is applied, as
    viewers do."""
    Image, ImageOps = pil(), pil("ImageOps")

    path = Path(path)
    try:
        with _open_still(path) as stored:
            im = ImageOps.exif_transpose(stored)
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                return _grey_to_rgb8(np.asarray(im), im.mode)
            return np.asarray(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as exc:  # pixels that fail to decode past a good header
        raise RSPError(f"cannot read image {str(path)!r}: {exc}") from None


ANIMATION_FORMATS = ("GIF", "PNG", "WEBP")


def _open_still(path: Path):
    """The opened image (a context manager), refused with a message naming the file when it
    does not open or is an animation (a GIF, PNG or WebP of several frames: its first frame
    alone would be explained without a word; the video command reads every frame). A JPEG's
    or TIFF's further pictures (a phone photo's gain map, a pyramid's levels) are not frames."""
    Image = pil()

    check_readable(path, "image")
    try:
        with warnings.catch_warnings():  # pictures of 90–179 MP: Pillow's two-line warning said nothing to do
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RSPError(f"cannot read image {str(path)!r}: {exc}") from None
    if im.format in ANIMATION_FORMATS and getattr(im, "is_animated", False):
        frames = getattr(im, "n_frames", "several")
        im.close()
        how = (f"explain its frames with `rsp-fast video {path} -o OUTPUT.mp4`" if im.format != "WEBP" else
               "FFmpeg, which `rsp-fast video` reads with, decodes no animated WebP: turn it into a GIF or a video first")
        raise RSPError(f"image {str(path)!r} is animated ({frames} frames): {how}")
    return im


def image_files(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(name, file) for each path, a folder standing for the images in it (sorted). Every file is
    checked to open as an image (its header: pixels are read when its batch comes, so a folder
    of any size fits in memory). Names are the file stems, made unique (``cat``, ``cat-2``) so
    no output overwrites another."""
    Image = pil()

    files: list[Path] = []
    for p in map(Path, paths):
        check_name_length(p, "image")
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")  # hidden: macOS's ._cat.jpg
                           and f.suffix.lower() in Image.registered_extensions())
            if not found:
                raise RSPError(f"folder {str(p)!r} holds no images")
            files += found
        else:
            files.append(p)
    named, names = [], _FileNames()
    for f in files:
        _open_still(f).close()
        named.append((names.unique(f.stem), f))
    return named


def _grey_to_rgb8(grey: np.ndarray, mode: str) -> np.ndarray:
    """16-bit or 32-bit grey (PIL's convert would clip it to white at 255) scaled to 8 bits:
    floats in [0, 1] by 255; otherwise by the 16-bit range (8-bit data stored wide kept as is)
    or, above it, by the peak (of the finite pixels). NaN is black, +Inf (saturated) white."""
    grey = grey.astype(np.float64)
    saturated = np.isposinf(grey)
    grey = np.nan_to_num(grey, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(grey.max(initial=0.0))
    if mode == "F" and peak <= 1.0:
        scale = 255.0
    else:
        scale = 1.0 if peak <= 255 else (255.0 / 65535.0 if peak <= 65535 else 255.0 / peak)
    rgb8 = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
    rgb8[saturated] = 255
    return np.repeat(rgb8[..., None], 3, axis=2)


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Photographs that ship inside scikit-image (no download)."""
    data = optional_import("skimage.data", "the demo photographs (they ship inside scikit-image)")
    return [(name, getattr(data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")]


CONTACT_SHEET_IMAGES = 64  # a sheet of a whole photo folder would be too tall to view
TILE = 512  # each image and its overlay fit a square of this side on the sheet


def explain_images(spec: ModelSpec, explainer: RSP, images: Iterable[tuple[str, np.ndarray | Path]], out_dir: str | Path,
                   target=None, batch_size: int = 8, device: str = "cpu") -> dict:
    """Write ``<name>_heatmap.png`` and ``<name>_overlay.png`` per image (an RGB array, or a
    file read when its batch comes) and a contact sheet of the first 64; return a report with
    each image's predicted label, its score, the class its map explains (``target``) and time.
    Images of any sizes share a batch: each is letterboxed into the model's input on its own."""
    out = checked_output_folder(out_dir)
    device = checked_device(device)
    spec = as_spec(spec)
    attribute = FrameAttributor(spec, explainer, device, batch_size, target)
    if attribute.clips:  # it would take each batch of unrelated images for one clip
        raise RSPError(f"{type(spec.model).__name__} is a video classifier (its input is a clip, N×C×T×H×W): "
                       "images are explained by image models; give its videos to `rsp-fast video`")
    rows, tiles, started, images, names = [], [], time.perf_counter(), iterable(images, "images"), _FileNames()
    while batch := list(itertools.islice(images, batch_size)):
        t0 = time.perf_counter()
        pictures = [(names.unique(name), read_image(img) if isinstance(img, (str, Path)) else as_rgb(img, f"image {name!r}"))
                    for name, img in map(_named, itertools.count(len(rows)), batch)]
        maps = attribute([img for _, img in pictures])
        share = (time.perf_counter() - t0) / len(batch)
        for k, (name, img) in enumerate(pictures):
            t1 = time.perf_counter()
            heat, label, score = maps.heat[k], maps.labels[k], maps.scores[k]
            scale = render.symmetric_scale(heat)
            over = render.draw_label(render.overlay(img, heat, scale), f"{spec.label(label)} ({score:.2f})")
            out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            render.save_png(out / f"{name}_heatmap.png", render.colorize(heat, scale))
            render.save_png(out / f"{name}_overlay.png", over)
            if len(tiles) < CONTACT_SHEET_IMAGES:
                tiles.append(_thumbnail(render.side_by_side(img, over), TILE))
            rows.append({"name": name, "label": label, "class_name": spec.label(label), "score": score,
                         "target": maps.targets[k], "seconds": share + time.perf_counter() - t1})
    if not rows:
        raise RSPError("no images to explain")
    sheet = out / "contact_sheet.png"
    render.save_png(sheet, render.contact_sheet(_same_size(tiles), columns=2))
    return {"images": rows, "totals": {"images": len(rows), "seconds": time.perf_counter() - started},
            "model": spec.name, "layer": explainer.layer, "init": explainer.init, "device": str(device),
            "contact_sheet": str(sheet),
            "contact_sheet_images": len(tiles)}


def _named(index: int, item) -> tuple:
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise RSPError(f"images must be (name, image) pairs; item {index} is {type(item).__name__}")
    return item


class _FileNames:
    """Names for a run's output files: each a plain file name (no folder part, which would
    write outside the output folder; a file's own ``..png`` or, on POSIX, ``a\\b.png`` is
    one), repeats made unique (``cat``, ``cat-2``)."""

    def __init__(self):
        self.used: set[str] = set()

    def unique(self, name) -> str:
        name = str(name)
        if not name or any(sep in name for sep in (os.sep, os.altsep) if sep):  # "." or ".." only prefix a name
            raise RSPError(f"image name {name!r} must be a plain file name (no folder part)")
        candidate, k = name, 1
        while candidate in self.used:  # also past a file of its own called "cat-2"
            k += 1
            candidate = f"{name}-{k}"
        self.used.add(candidate)
        return candidate


def _thumbnail(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` scaled to fit a side×side square, aspect kept (a 1×500 strip is not made 512
    wide and 256000 tall)."""
    Image = pil()

    scale = side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _same_size(tiles: list[np.ndarray]) -> list[np.ndarray]:
    """The tiles padded with white to the largest height and width among them."""
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    return [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
