"""Localisation and faithfulness metrics on saliency maps; each takes maps shaped (N, H, W).

Conventions (stated once, used everywhere):
- Positive values are evidence for the target. A map with no positive value points nowhere: it
  misses in the pointing games and selects nothing for the IoU.
- Pointing Game (TorchRay protocol): the map's maximum is a hit when it lies within ``tolerance``
  pixels of the target's mask (TorchRay uses 15 px at 224 px; callers scale it to the canvas).
- IoU binarises the positive map at its mean over the canvas (parameter-free, so no method is
  favoured by a threshold tuned to it).
- Deletion/insertion (Petsiuk et al., RISE): pixels ranked by relevance, highest first, with a seeded
  random order among equal values; the AUC is the mean of the trapezoids under the target's
  score over the fraction of pixels removed/inserted, so it lies in [0, 1] for probabilities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def _disk_dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Every pixel within ``radius`` (Euclidean) of a mask pixel, for (N, H, W) bool masks."""
    if radius <= 0:
        return masks
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]
    grown = F.conv2d(masks.float()[:, None], disk, padding=radius)[:, 0]
    return grown > 0


def max_points(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each map's maximum (the first one when several are equal)."""
    N, H, W = maps.shape
    flat = maps.reshape(N, -1).argmax(1)
    return flat // W, flat % W


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """(N,) bool: the map's maximum is positive and within ``tolerance`` px of the mask."""
    rows, cols = max_points(maps)
    near = _disk_dilate(masks, tolerance)[torch.arange(len(maps)), rows, cols]
    return near & (maps.flatten(1).amax(1) > 0)


def discriminative_hits(maps: torch.Tensor, target_masks: torch.Tensor, other_masks: torch.Tensor,
                        tolerance: int = 0) -> torch.Tensor:
    """(N,) bool: the map for class A points at A's box (within tolerance) and not into B's box."""
    rows, cols = max_points(maps)
    idx = torch.arange(len(maps))
    return pointing_hits(maps, target_masks, tolerance) & ~other_masks[idx, rows, cols]


def mass_share(maps: torch.Tensor, target_masks: torch.Tensor, other_masks: torch.Tensor) -> torch.Tensor:
    """(N,) share of the positive relevance inside A's box out of that inside A's and B's boxes;
    NaN where neither box holds any."""
    pos = maps.clamp(min=0)
    a = (pos * target_masks).flatten(1).sum(1)
    b = (pos * other_masks).flatten(1).sum(1)
    total = a + b
    return torch.where(total > 0, a / total.clamp(min=torch.finfo(pos.dtype).tiny), torch.full_like(a, float("nan")))


def iou(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of {positive map > its mean over the canvas} with the mask."""
    pos = maps.clamp(min=0)
    thr = pos.flatten(1).mean(1).view(-1, 1, 1)
    on = (pos > thr) & (pos > 0)
    inter = (on & masks).flatten(1).sum(1).float()
    union = (on | masks).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def relevance_order(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, H·W) rank of each pixel: 0 = most relevant; ties in a seeded random order."""
    N = maps.shape[0]
    flat = maps.reshape(N, -1).double()
    gen = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(flat.shape[1], generator=gen) for _ in range(N)])
    shuffled = flat.gather(1, shuffle)
    order = shuffle.gather(1, torch.argsort(shuffled, dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand(N, -1).contiguous())
    return ranks


def perturbation_curves(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                        maps: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor, mode: str,
                        steps: int = 16, chunk: int = 256, seed: int = 0) -> torch.Tensor:
    """(N, steps + 1) target scores while the most relevant pixels are deleted (replaced by the
    baseline) or inserted (into the baseline), ``k/steps`` of them at step k.

    ``score(x, target) -> (n,)`` is the model's score for each image's target (e.g. a probability).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', not {mode!r}")
    N, C, H, W = images.shape
    ranks = relevance_order(maps, seed)
    counts = torch.round(torch.linspace(0, H * W, steps + 1)).long()
    out = torch.empty(N, steps + 1)
    for i in range(N):
        chosen = (ranks[i][None] < counts[:, None]).view(steps + 1, 1, H, W)  # pixels moved at each step
        if mode == "deletion":
            batch = torch.where(chosen, baseline[i:i + 1], images[i:i + 1])
        else:
            batch = torch.where(chosen, images[i:i + 1], baseline[i:i + 1])
        with torch.no_grad():
            out[i] = torch.cat([score(batch[s:s + chunk], target[i].expand(len(batch[s:s + chunk])))
                                for s in range(0, steps + 1, chunk)]).float()
    return out


def auc(curves: torch.Tensor) -> torch.Tensor:
    """(N,) area under each curve sampled at equal steps over [0, 1] (trapezoids)."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Spearman rank correlation of each pair of maps (ties share their average rank)."""
    from scipy.stats import spearmanr

    vals = []
    for x, y in zip(a.reshape(len(a), -1).double().numpy(), b.reshape(len(b), -1).double().numpy()):
        vals.append(np.nan if x.std() == 0 or y.std() == 0 else spearmanr(x, y).statistic)
    return torch.tensor(vals, dtype=torch.float64)
