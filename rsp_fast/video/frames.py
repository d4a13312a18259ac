"""``explain_frames``: RSP heat maps for a stream of RGB frames from any source — an OpenCV
loop, a camera, a decoder of the user's — through the video pipeline's attribution step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..api import RSP
from ..models import checked_device
from ..pictures import FrameAttributor, as_rgb, as_spec, explainer_on, iterable


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
    an nn.Module, a ModelSpec or a model name. Bad arguments raise here, before any frame is read."""
    device = checked_device(device)
    frames = iterable(frames, "frames")
    spec = as_spec(model)
    explainer = explainer_on(spec, device, explainer, layer=layer, init=init, hostile_k=hostile_k, backend=backend,
                             precision=precision)
    return _explained(spec, FrameAttributor(spec, explainer, device, batch_size, target), frames)


def _explained(spec, attribute: FrameAttributor, frames: Iterable[np.ndarray]) -> Iterator[FrameExplanation]:
    batch: list[np.ndarray] = []

    def results(batch):
        maps = attribute(batch)
        for k in range(len(batch)):
            yield FrameExplanation(maps.heat[k], maps.labels[k], spec.label(maps.labels[k]), maps.scores[k], maps.targets[k])

    for index, frame in enumerate(frames):
        batch.append(as_rgb(frame, f"frame {index}"))
        if len(batch) == attribute.batch_size:
            yield from results(batch)
            batch = []
    if batch:
        yield from results(batch)

