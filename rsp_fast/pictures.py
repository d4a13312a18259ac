"""RGB pictures (video frames, photos) through RSP: each letterboxed into the model's input,
explained a batch at a time (on CUDA, full batches replay a CUDA graph of the whole pass), and
each map cut back onto its picture. The attribution step of the video pipeline, of
``explain_frames`` and of the image command."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import render
from .api import RSP, heatmap
from .errors import RSPError
from .graph.trace import unwrap
from .models import ModelSpec, build_model


@dataclass
class FrameMaps:
    """One batch's results: each frame's map (H×W, on the frame), predicted class, the class its
    map explains, and the predicted class's probability."""

    heat: list[np.ndarray]
    labels: list[int]
    targets: list[int]
    scores: list[float]


def as_spec(model) -> ModelSpec:
    """A ModelSpec from a module (ImageNet normalisation, 224 input), a spec, or a model name."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return build_model(model)
    if isinstance(model, nn.Module):
        return ModelSpec(model, type(model).__name__)  # RSP runs it in eval mode and restores its mode
    raise RSPError(f"model must be an nn.Module, a ModelSpec or a model name, not {type(model).__name__}")


def explainer_on(spec: ModelSpec, device: torch.device, explainer: RSP | None = None, **options) -> RSP:
    """``explainer``, or an RSP of the spec's model (``options``: RSP's keyword arguments), the
    model moved to ``device``."""
    if explainer is not None:
        check_explainer(spec, explainer)  # before the model moves
    spec.model.to(device)
    return explainer or RSP(spec.model, **options)


def check_explainer(spec: ModelSpec, explainer) -> None:
    if not isinstance(explainer, RSP):
        raise RSPError(f"explainer must be an rsp_fast.RSP, not {type(explainer).__name__}")
    if explainer.model is not unwrap(spec.model)[0]:
        raise RSPError("the explainer given was built for another model than the one to explain")


def as_rgb(picture, what: str) -> np.ndarray:
    """An H×W×3 uint8 RGB array from an RGB or grey (H×W) uint8 array, or an RSPError naming
    ``what`` (e.g. "frame 3") and what it is instead."""
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or not (picture.ndim == 2 or (picture.ndim == 3 and picture.shape[2] == 3)):
        raise RSPError(f"{what} must be an H×W×3 (RGB) or H×W (grey) uint8 array, "
                       f"not {picture.dtype} of shape {tuple(picture.shape)}")
    if picture.shape[0] == 0 or picture.shape[1] == 0:
        raise RSPError(f"{what} has no pixels (shape {tuple(picture.shape)})")
    return np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture


def iterable(values, what: str):
    """An iterator over ``values``, or an RSPError naming ``what`` (e.g. "frames")."""
    try:
        return iter(values)
    except TypeError:
        raise RSPError(f"{what} must be an iterable of pictures, not {type(values).__name__}") from None


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RSPError(f"{what} must be an int of at least 1, not {value!r}")
    return int(value)


def _takes_clips(explainer: RSP) -> bool:
    """Whether the model is a video classifier (N×C×T×H×W clips): its plan's first layer is a
    Conv3d or, for a model traced per input shape (no plan before its first call), the first
    conv it holds is."""
    if explainer.plan is not None:
        return explainer.plan.input_rank == 5
    first = next((m for m in explainer.model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return isinstance(first, nn.Conv3d)


class FrameAttributor:
    """Explains batches of uint8 RGB pictures with ``explainer``: an N×H×W×3 array (frames of a
    video share one letterbox), or a list of H×W×3 arrays of any sizes (each letterboxed on its
    own). A clip model (a video classifier: input N×C×T×H×W) explains each batch of frames as
    one clip; each frame gets its slice of the clip's map and the clip's class."""

    def __init__(self, spec: ModelSpec, explainer: RSP, device: torch.device, batch_size: int, target=None):
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))):
            raise RSPError(f"target must be one class (an int) for every picture, or None, not {target!r}")
        if target is not None and target < 0:  # the top end is the model's, known once it runs (names may be fewer)
            raise RSPError(f"target class {target} is out of range: classes count from 0")
        check_explainer(spec, explainer)  # a caller's explainer of another model explained the pictures with it
        self.spec, self.explainer, self.device, self.target = spec, explainer, device, target
        self.batch_size = positive_int(batch_size, "batch size")
        p = next(spec.model.parameters(), None)  # pictures reach the model in its own dtype (float64, half, ...)
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        self.clips = _takes_clips(explainer)
        self.graphs = {}  # input shape -> StaticRSP: every full batch of a video has one shape

    def _explain(self, x: torch.Tensor):
        if x.device.type != "cuda" or x.shape[0] != self.batch_size or self.clips:
            return self.explainer.explain(x, target=self.target)
        if x.shape not in self.graphs:
            self.graphs[x.shape] = self.explainer.static(x)
        return self.graphs[x.shape].explain(x, self.target)

    def __call__(self, frames: np.ndarray | list[np.ndarray]) -> FrameMaps:
        size, mean, std = self.spec.input_size, self.spec.mean, self.spec.std
        one_size = isinstance(frames, np.ndarray) or len({f.shape for f in frames}) == 1
        if one_size:  # one letterbox for the batch: one resize each way
            x, box = render.to_model_input(np.asarray(frames) if isinstance(frames, np.ndarray) else np.stack(frames),
                                           size, mean, std)
            boxes = [box] * len(frames)
        elif self.clips:
            raise RSPError("the frames of a clip must have one size")
        else:
            inputs = [render.to_model_input(f[None], size, mean, std) for f in frames]
            x, boxes = torch.cat([x for x, _ in inputs]), [box for _, box in inputs]
        if self.clips:  # the batch's T frames as one clip, 1×C×T×H×W
            # a video's last, shorter batch is filled up with its last frame: a clip as long as
            # the others, which the model's temporal kernels need
            x = torch.cat([x, x[-1:].expand(self.batch_size - len(x), -1, -1, -1)]) if len(x) < self.batch_size else x
            x = x.transpose(0, 1).unsqueeze(0)
        ex = self._explain(x.to(self.device, self.dtype))
        heat = heatmap(ex.attribution).detach().float().cpu()
        heat = heat[0, :len(frames)] if self.clips else heat
        if one_size:
            heats = list(render.heat_to_frame(heat, boxes[0]).numpy())
        else:
            heats = [render.heat_to_frame(heat[k:k + 1], box)[0].numpy() for k, box in enumerate(boxes)]
        probs = torch.softmax(ex.logits.float(), 1).cpu()
        labels = ex.logits.argmax(1).tolist()  # not probs.argmax: near-equal logits tie in float32 probabilities
        targets = ex.target.tolist()
        scores = [float(probs[k, c]) for k, c in enumerate(labels)]
        if self.clips:  # every frame of the clip carries the clip's class
            labels, targets, scores = (values * len(frames) for values in (labels, targets, scores))
        return FrameMaps(heats, labels, targets, scores)
