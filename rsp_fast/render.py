"""From frames to model inputs and from relevance back to pictures.

Frames are letterboxed into the model's square input (aspect ratio kept, nothing cropped),
and the heat map is cut out of the letterbox and resized back onto the frame. Colours: a
diverging map centred on zero, target evidence red, hostile evidence blue, symmetric scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .optional import pil


@dataclass(frozen=True)
class Letterbox:
    """Where a frame of ``frame_hw`` sits inside the square model input."""

    frame_hw: tuple[int, int]
    top: int
    left: int
    height: int
    width: int


def letterbox_geometry(frame_hw: tuple[int, int], size: int) -> Letterbox:
    h, w = frame_hw
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return Letterbox((h, w), (size - nh) // 2, (size - nw) // 2, nh, nw)


def to_model_input(frames: np.ndarray, size: int, mean, std, pad_value: float = 0.5) -> tuple[torch.Tensor, Letterbox]:
    """uint8 N×H×W×3 frames -> normalised N×3×size×size float32, and their letterbox."""
    box = letterbox_geometry(frames.shape[1:3], size)
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2)  # channels-last uint8
    if x.dtype != torch.uint8:
        x = x.float()
    # resized as uint8 (PyTorch's channels-last uint8 kernel: 15x faster on HD frames than in
    # float32, within one unit of 255 of it), then scaled to [0, 1]
    x = F.interpolate(x, size=(box.height, box.width), mode="bilinear", align_corners=False, antialias=True)
    x = x.float().div_(255)
    canvas = torch.full((x.shape[0], 3, size, size), pad_value)
    canvas[:, :, box.top:box.top + box.height, box.left:box.left + box.width] = x
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (canvas - mean_t) / std_t, box


def heat_to_frame(heat: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """N×size×size heat maps -> N×H×W on the frames (letterbox cut away, then resized)."""
    inner = heat[:, box.top:box.top + box.height, box.left:box.left + box.width]
    shrinks = box.height > box.frame_hw[0] or box.width > box.frame_hw[1]  # averaged then, not point-sampled (a thumbnail)
    return F.interpolate(inner.unsqueeze(1).float(), size=box.frame_hw, mode="bilinear", align_corners=False,
                         antialias=shrinks).squeeze(1)


def symmetric_scale(heat: np.ndarray, quantile: float = 0.995) -> float:
    """One scale for both signs: a high quantile of |heat| (pixel relevance is spiky, so the
    maximum alone would leave the map nearly white). Never zero. A map larger than 512² (a map
    resized onto an HD frame) is sampled on a regular grid of about that many pixels: its
    quantile is the same to a fraction of a percent, in a tenth of the time. NaN and ±Inf
    pixels are left out."""
    step = max(1, int((heat.size / 2 ** 18) ** 0.5)) if heat.ndim == 2 else 1
    magnitude = np.abs(heat[::step, ::step] if step > 1 else heat)
    finite = magnitude[np.isfinite(magnitude)]
    if not finite.size:
        return 1.0
    high = np.quantile(finite, quantile)
    if high > 0:
        return float(high)
    everywhere = np.abs(heat[np.isfinite(heat)])  # a sparse map (its quantile 0): its peak, not only the sample's
    return float(max(everywhere.max(initial=0.0), 1e-12))


# Colours come from tables over heat/scale clipped to [-1, 1] and quantised to 4097 levels (steps
# of 1/2048: at most a unit of 255 from the exact colour), gathered with np.take: a 1080p
# frame's overlay takes ~25 ms instead of ~96 computed pixel by pixel, which made the encoder
# thread the bottleneck of HD videos.
_LEVELS = 4097
_V = np.linspace(-1.0, 1.0, _LEVELS)
_COLOURS = np.stack([1 - np.clip(-_V, 0, 1), 1 - np.abs(_V), 1 - np.clip(_V, 0, 1)], axis=-1)  # white at 0, red +1, blue -1
_COLOURS_8 = (_COLOURS * 255 + 0.5).astype(np.uint8)


def _levels(heat: np.ndarray, scale: float) -> np.ndarray:
    """Each pixel's row in the colour tables: heat/scale in [-1, 1] -> 0 .. _LEVELS - 1."""
    half = (_LEVELS - 1) / 2
    if heat.dtype == np.float64:  # scaled before the cast: values past float32's range would become inf × 0
        v = np.clip(heat * (half / max(scale, 1e-12)), -2 * half, 2 * half).astype(np.float32)
    else:
        v = heat.astype(np.float32) * np.float32(half / max(scale, 1e-12))
    np.nan_to_num(v, copy=False, nan=0.0)  # NaN drawn as no relevance; ±Inf at the ends, clipped below
    np.clip(v, -half, half, out=v)
    v += np.float32(half + 0.5)
    return v.astype(np.intp)


def colorize(heat: np.ndarray, scale: float) -> np.ndarray:
    """H×W relevance -> H×W×3 uint8: white at 0, red for +scale, blue for -scale."""
    return np.take(_COLOURS_8, _levels(heat, scale), axis=0)


def overlay(frame: np.ndarray, heat: np.ndarray, scale: float, strength: float = 0.75) -> np.ndarray:
    """The heat map over a dimmed grey copy of the frame, opaque where relevance is strong:
    grey·(1 − α) + colour·α with α = strength·√|heat/scale|. ``frame``: H×W×3 RGB or H×W grey,
    uint8 (another dtype would wrap or be read on another scale: a clear error instead)."""
    frame, heat = np.asarray(frame), np.asarray(heat)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise ValueError(f"overlay draws on uint8 H×W×3 RGB or H×W grey frames, not a {frame.dtype} array of shape "
                         f"{frame.shape} (a float picture in [0, 1]: (frame * 255).round().astype(np.uint8))")
    if heat.shape != frame.shape[:2]:
        raise ValueError(f"the heat map's shape {heat.shape} is not the frame's {frame.shape[:2]} "
                         "(rsp_fast.render.heat_to_frame maps a model-input map onto a frame)")
    if frame.ndim == 2:
        frame = frame[..., None].repeat(3, axis=2)
    alpha = np.sqrt(np.abs(_V)) * strength
    keep = (1 - alpha).astype(np.float32)
    add = (_COLOURS_8 * alpha[:, None] + 0.5).astype(np.float32)  # + 0.5: the final cast rounds
    rows = _levels(heat, scale)
    grey = np.add(frame[..., 0], frame[..., 1], dtype=np.uint16)
    grey += frame[..., 2]
    dimmed = grey.astype(np.float32)
    dimmed *= np.float32(0.6 / 3)
    dimmed += np.float32(40)
    dimmed *= np.take(keep, rows)
    out = np.take(add, rows, axis=0)
    out += dimmed[..., None]
    return out.astype(np.uint8)  # within [0, 255.5): grey ≤ 193, colour ≤ 255


def draw_label(img: np.ndarray, text: str) -> np.ndarray:
    """The predicted label in a dark band at the top of the picture, drawn into ``img`` (a copy
    if it is read-only) and returned; only the band goes through PIL (an HD frame's round trip
    cost 5 ms)."""
    Image, ImageDraw = pil(), pil("ImageDraw")

    if not img.flags.writeable:
        img = img.copy()
    band = max(12, img.shape[0] // 18)
    rows = band + 5 + band // 2  # the band and room for descenders below it
    if 3 * rows > img.shape[0]:  # a small picture: the label would hide a third of it and more
        return img
    top = Image.fromarray(img[:rows])
    draw = ImageDraw.Draw(top)
    draw.rectangle([0, 0, img.shape[1], band + 4], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font_size=band)
    img[:rows] = np.asarray(top)
    return img


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.concatenate([left, right], axis=1)


def contact_sheet(images: list[np.ndarray], columns: int = 4, gap: int = 4) -> np.ndarray:
    """Pictures of one size in a grid on a white background."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img[:h, :w]
    return sheet


def save_png(path, img: np.ndarray) -> None:
    """Write atomically: a temporary file renamed into place, never a half-written PNG."""
    from .paths import write_atomically

    Image = pil()
    # compress_level 1: 4x faster than PIL's default (6) on 24-megapixel maps; files up to 1.5x larger
    write_atomically(Path(path), lambda tmp: Image.fromarray(img).save(tmp, compress_level=1), suffix=".png")
