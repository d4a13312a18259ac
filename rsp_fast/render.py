"""From frames to model inputs and from relevance back to pictures.

Frames are letterboxed into the model's square input (aspect ratio kept, nothing cropped),
and the heat map is cut out of the letterbox and resized back onto the frame. Colours: a
diverging map centred on zero, target evidence red, hostile evidence blue, symmetric scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255)
    x = F.interpolate(x, size=(box.height, box.width), mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.full((x.shape[0], 3, size, size), pad_value)
    canvas[:, :, box.top:box.top + box.height, box.left:box.left + box.width] = x
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (canvas - mean_t) / std_t, box


def heat_to_frame(heat: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """N×size×size heat maps -> N×H×W on the frames (letterbox cut away, then resized)."""
    inner = heat[:, box.top:box.top + box.height, box.left:box.left + box.width]
    return F.interpolate(inner.unsqueeze(1).float(), size=box.frame_hw, mode="bilinear", align_corners=False).squeeze(1)


def symmetric_scale(heat: np.ndarray, quantile: float = 0.995) -> float:
    """One scale for both signs: a high quantile of |heat| (pixel relevance is spiky, so the
    maximum alone would leave the map nearly white). Never zero."""
    return float(max(np.quantile(np.abs(heat), quantile), 1e-12))


def colorize(heat: np.ndarray, scale: float) -> np.ndarray:
    """H×W relevance -> H×W×3 uint8: white at 0, red for +scale, blue for -scale."""
    v = np.clip(heat / scale, -1.0, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(frame: np.ndarray, heat: np.ndarray, scale: float, strength: float = 0.75) -> np.ndarray:
    """The heat map over a dimmed grey copy of the frame, opaque where relevance is strong."""
    grey = frame.astype(np.float32).mean(-1, keepdims=True) * 0.6 + 40
    alpha = np.clip(np.abs(heat) / scale, 0, 1)[..., None] ** 0.5 * strength
    out = grey * (1 - alpha) + colorize(heat, scale).astype(np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_label(img: np.ndarray, text: str) -> np.ndarray:
    """The predicted label in a dark band at the top of the picture."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    band = max(12, img.shape[0] // 18)
    draw.rectangle([0, 0, img.shape[1], band + 4], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font_size=band)
    return np.asarray(pil)


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
    import os

    from PIL import Image

    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
