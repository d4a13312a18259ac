"""``explain_frames``: RSP heat maps for a stream of RGB frames from any source — an OpenCV
loop, a camera, a decoder of the user's — through the video pipeline's attribution step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..api import RSP
from ..errors import RSPError
from ..models import checked_device
from ..pictures import FrameAttributor, as_spec, explainer_on


@dataclass
class FrameExplanation:
    """One frame's result from ``explain_frames``."""

    heat: np.ndarray  # H×W relevance on the frame: target evidence > 0, hostile < 0
    label: int  # the predicted class
    name: str  # its name
    score: float  # its softmax probability
    target: int  # the class the map explains (the label unless a target was given)


def explain_frames(model, frames: Iterable[np.ndarray], *, layer=None, init: str = "comparative", hostile_k: int = 3,
                   target: int | None = None, batch_size: int = 8, device: str = "cpu", backend: str | None = None,
                   precision: str = "fp32", explainer: RSP | None = None) -> Iterator[FrameExplanation]:
    """Yield a ``FrameExplanation`` per frame, in order, for H×W×3 uint8 RGB frames (or H×W
    grey; OpenCV's BGR frames reversed: ``frame[..., ::-1]``) from any iterable, explained
    ``batch_size`` at a time (frames of any sizes: each is letterboxed on its own). ``model``:
    an nn.Module, a ModelSpec or a model name."""
    if batch_size < 1:
        raise RSPError(f"batch size must be at least 1, not {batch_size}")
    device = checked_device(device)
    spec = as_spec(model)
    explainer = explainer_on(spec, device, explainer, layer=layer, init=init, hostile_k=hostile_k, backend=backend,
                             precision=precision)
    attribute = FrameAttributor(spec, explainer, device, batch_size, target)
    batch: list[np.ndarray] = []

    def results(batch):
        maps = attribute(batch)
        for k in range(len(batch)):
            yield FrameExplanation(maps.heat[k], maps.labels[k], spec.label(maps.labels[k]), maps.scores[k], maps.targets[k])

    for index, frame in enumerate(frames):
        batch.append(_rgb(frame, index))
        if len(batch) == batch_size:
            yield from results(batch)
            batch = []
    if batch:
        yield from results(batch)


def _rgb(frame, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise RSPError(f"frame {index} must be an H×W×3 (RGB) or H×W (grey) uint8 array, "
                       f"not {frame.dtype} of shape {tuple(frame.shape)}")
    return np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame
