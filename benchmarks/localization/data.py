"""Multi-digit canvases from scikit-learn's bundled handwritten digits, with their boxes known.

Every canvas holds two to four *different* digits (so each class present has exactly one box),
each scaled up from 8×8 to a random size and placed where it overlaps no other digit, plus
clutter (small stroke fragments away from the digits) and a little noise. The digit images are
split once: canvases for training use the first 70 % of scikit-learn's digits, canvases for
evaluation the rest, so the models are evaluated on handwriting they never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
TRAIN_FRACTION = 0.7


@dataclass
class Canvases:
    images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]
    labels: torch.Tensor  # (N, 10) multi-hot float32
    boxes: list[dict[int, tuple[int, int, int, int]]]  # per canvas: class -> (y0, x0, y1, x1), end exclusive

    def __len__(self) -> int:
        return len(self.boxes)

    def box_mask(self, index: int, cls: int) -> torch.Tensor:
        """(S, S) bool mask of one class's box on one canvas."""
        S = self.images.shape[-1]
        mask = torch.zeros(S, S, dtype=torch.bool)
        y0, x0, y1, x1 = self.boxes[index][cls]
        mask[y0:y1, x0:x1] = True
        return mask


def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images.astype(np.float32) / 16.0, digits.target
    cut = int(len(images) * TRAIN_FRACTION)
    if split == "train":
        return images[:cut], targets[:cut]
    if split == "test":
        return images[cut:], targets[cut:]
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def _scaled(digit: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(digit)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _ink_box(img: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(img.max(1) > threshold)[0], np.nonzero(img.max(0) > threshold)[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_canvases(n: int, size: int = 96, seed: int = 0, split: str = "test", digits: tuple[int, int] = (2, 4),
                  digit_size: tuple[float, float] = (0.2, 0.38), clutter: int = 5, noise: float = 0.03) -> Canvases:
    """``n`` canvases of ``size``×``size``; the same arguments always give the same canvases.

    ``digit_size`` is the range of a digit's side as a fraction of the canvas side.
    """
    pool, pool_targets = _digit_pool(split)
    by_class = [np.nonzero(pool_targets == c)[0] for c in range(NUM_CLASSES)]
    rng = np.random.default_rng(seed)
    lo, hi = (max(6, int(round(f * size))) for f in digit_size)
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, NUM_CLASSES), np.float32)
    boxes: list[dict[int, tuple[int, int, int, int]]] = []
    for i in range(n):
        canvas, placed = images[i], {}
        for cls in rng.choice(NUM_CLASSES, size=rng.integers(digits[0], digits[1] + 1), replace=False):
            for _ in range(100):  # rejection sampling of a free spot; a crowded canvas keeps fewer digits
                side = int(rng.integers(lo, hi + 1))
                img = _scaled(pool[rng.choice(by_class[cls])], side) * rng.uniform(0.7, 1.0)
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                by0, bx0, by1, bx1 = _ink_box(img)
                box = (y + by0, x + bx0, y + by1, x + bx1)
                if all(not _overlaps(box, other, gap=2) for other in placed.values()):
                    np.maximum(canvas[y:y + side, x:x + side], img, out=canvas[y:y + side, x:x + side])
                    placed[int(cls)] = box
                    labels[i, cls] = 1.0
                    break
        _add_clutter(canvas, placed.values(), pool, rng, clutter)
        canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
        np.clip(canvas, 0.0, 1.0, out=canvas)
        boxes.append(placed)
    return Canvases(torch.from_numpy(images)[:, None], torch.from_numpy(labels), boxes)


def _add_clutter(canvas: np.ndarray, boxes, pool: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Stroke fragments (random 3×3 pieces of digits, scaled) that touch no digit box."""
    size = canvas.shape[0]
    for _ in range(count):
        for _ in range(20):
            piece = pool[rng.integers(len(pool))]
            r, c = (int(v) for v in rng.integers(0, 6, size=2))
            side = int(rng.integers(max(3, size // 24), max(4, size // 10) + 1))
            frag = _scaled(np.ascontiguousarray(piece[r:r + 3, c:c + 3]), side) * rng.uniform(0.4, 0.9)
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(not _overlaps((y, x, y + side, x + side), b, gap=1) for b in boxes):
                np.maximum(canvas[y:y + side, x:x + side], frag, out=canvas[y:y + side, x:x + side])
                break
