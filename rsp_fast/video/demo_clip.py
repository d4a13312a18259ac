"""The demo's input: a short clip built from photographs that ship inside scikit-image, the
camera panning and zooming across each (no download, deterministic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..images import sample_photos
from ..optional import pil
from .io import write_video


def _camera_move(photo: np.ndarray, frames: int, size: tuple[int, int], zoom: float, pan: float) -> list[np.ndarray]:
    """Crops of ``photo`` sliding and tightening over ``frames`` steps, resized to ``size`` (W, H)."""
    Image = pil()

    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    base_w = min(w, h * aspect)
    picture = Image.fromarray(photo)
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        cw = base_w / (1 + (zoom - 1) * t)
        ch = cw / aspect
        cx = w / 2 + pan * (t - 0.5) * (w - cw)
        cy = h / 2
        left, top = np.clip(cx - cw / 2, 0, w - cw), np.clip(cy - ch / 2, 0, h - ch)
        out.append(np.asarray(picture.resize(size, Image.BILINEAR, box=(left, top, left + cw, top + ch))))
    return out


def make_demo_clip(path: str | Path, frames_per_photo: int = 16, size: tuple[int, int] = (320, 240), fps: int = 8) -> Path:
    """Write the demo clip to ``path`` and return it."""
    frames = []
    for i, (_, photo) in enumerate(sample_photos()):
        frames += _camera_move(photo, frames_per_photo, size, zoom=1.35, pan=0.6 if i % 2 == 0 else -0.6)
    return write_video(path, frames, fps)
