"""RSP on a stream of RGB frames: the attribution step of the heat-map video, also usable on its
own (``explain_frames``) for frames from any source — an OpenCV loop, a camera, a decoder of
the user's. Frames are letterboxed into the model's input, explained a batch at a time (on CUDA
full batches replay a CUDA graph of the whole pass), and each map is cut back onto its frame."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .. import render
from ..api import RSP, heatmap
from ..errors import RSPError
from ..models import ModelSpec, build_model, checked_device


@dataclass
class FrameMaps:
    """One batch's results: each frame's map (H×W, on the frame), predicted class, the class its
    map explains, and the predicted class's probability."""

    heat: np.ndarray
    labels: list[int]
    targets: list[int]
    scores: list[float]


@dataclass
class FrameExplanation:
    """One frame's result from ``explain_frames``."""

    heat: np.ndarray  # H×W relevance on the frame: target evidence > 0, hostile < 0
    label: int  # the predicted class
    name: str  # its name
    score: float  # its softmax probability
    target: int  # the class the map explains (the label unless a target was given)


def as_spec(model) -> ModelSpec:
    """A ModelSpec from a module (ImageNet normalisation, 224 input), a spec, or a model name."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return build_model(model)
    if isinstance(model, nn.Module):
        return ModelSpec(model, type(model).__name__)  # RSP runs it in eval mode and restores its mode
    raise RSPError(f"model must be an nn.Module, a ModelSpec or a model name, not {type(model).__name__}")


class FrameAttributor:
    """Explains N×H×W×3 uint8 frame batches with ``explainer``. A clip model (a video
    classifier: input N×C×T×H×W) explains each batch as one clip; each frame gets its slice of
    the clip's map and the clip's class."""

    def __init__(self, spec: ModelSpec, explainer: RSP, device: torch.device, batch_size: int, target=None):
        self.spec, self.explainer, self.device, self.batch_size, self.target = spec, explainer, device, batch_size, target
        self.clips = explainer.plan is not None and explainer.plan.input_rank == 5
        self.graphs = {}  # input shape -> StaticRSP: every full batch of a video has one shape

    def _explain(self, x: torch.Tensor):
        if x.device.type != "cuda" or x.shape[0] != self.batch_size or self.clips:
            return self.explainer.explain(x, target=self.target)
        if x.shape not in self.graphs:
            self.graphs[x.shape] = self.explainer.static(x)
        return self.graphs[x.shape].explain(x, self.target)

    def __call__(self, frames: np.ndarray) -> FrameMaps:
        x, box = render.to_model_input(frames, self.spec.input_size, self.spec.mean, self.spec.std)
        if self.clips:  # the batch's T frames as one clip, 1×C×T×H×W
            x = x.transpose(0, 1).unsqueeze(0)
        ex = self._explain(x.to(self.device))
        heat = heatmap(ex.attribution).detach().float().cpu()
        heat = render.heat_to_frame(heat[0] if self.clips else heat, box).numpy()
        probs = torch.softmax(ex.logits.float(), 1).cpu()
        labels = ex.logits.argmax(1).tolist()  # not probs.argmax: near-equal logits tie in float32 probabilities
        targets = ex.target.tolist()
        scores = [float(probs[k, c]) for k, c in enumerate(labels)]
        if self.clips:  # every frame of the clip carries the clip's class
            labels, targets, scores = (values * len(frames) for values in (labels, targets, scores))
        return FrameMaps(heat, labels, targets, scores)


def explain_frames(model, frames: Iterable[np.ndarray], *, layer=None, init: str = "comparative", hostile_k: int = 3,
                   target: int | None = None, batch_size: int = 8, device: str = "cpu", backend: str = "auto",
                   precision: str = "fp32", explainer: RSP | None = None) -> Iterator[FrameExplanation]:
    """Yield a ``FrameExplanation`` per frame, in order, for H×W×3 uint8 RGB frames (or H×W
    grey; OpenCV's BGR frames reversed: ``frame[..., ::-1]``) from any iterable; frames are explained ``batch_size`` at a time (a change of frame
    size starts a new batch). ``model``: an nn.Module, a ModelSpec or a model name."""
    if batch_size < 1:
        raise RSPError(f"batch size must be at least 1, not {batch_size}")
    device = checked_device(device)
    spec = as_spec(model)
    spec.model.to(device)
    explainer = explainer or RSP(spec.model, layer=layer, init=init, hostile_k=hostile_k, backend=backend, precision=precision)
    attribute = FrameAttributor(spec, explainer, device, batch_size, target)
    batch: list[np.ndarray] = []

    def results(batch):
        maps = attribute(np.stack(batch))
        for k in range(len(batch)):
            yield FrameExplanation(maps.heat[k], maps.labels[k], spec.label(maps.labels[k]), maps.scores[k], maps.targets[k])

    for index, frame in enumerate(frames):
        frame = _rgb(frame, index)
        if batch and frame.shape != batch[0].shape:
            yield from results(batch)
            batch = []
        batch.append(frame)
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
