"""The two classifiers the localisation benchmark explains, trained here, reproducibly, and cached.

A VGG-style CNN (3×3 convs with BatchNorm as in torchvision's vgg_bn, ReLU, max-pools, global average pool, one Linear) and a small ResNet
built from torchvision's ``BasicBlock`` (so zennit's ResNet canonizer applies), both multi-label:
one logit per digit class, trained with binary cross-entropy on canvases from ``data.py``.
Weights are cached under the user's cache folder (``$RSP_FAST_CACHE`` or
``$XDG_CACHE_HOME/rsp_fast``), keyed by everything that determines them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import NUM_CLASSES, make_canvases


def vgg_small(width: int = 16) -> nn.Sequential:
    w = [width, 2 * width, 4 * width, 8 * width]

    def block(cin, cout, convs):
        layers = []
        for i in range(convs):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        return layers

    features = nn.Sequential(*block(1, w[0], 2), nn.MaxPool2d(2), *block(w[0], w[1], 2), nn.MaxPool2d(2),
                             *block(w[1], w[2], 2), nn.MaxPool2d(2), *block(w[2], w[3], 1), nn.MaxPool2d(2))
    return nn.Sequential(OrderedDict(features=features, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                     classifier=nn.Linear(w[3], NUM_CLASSES)))


class ResNetSmall(nn.Module):
    """Stem conv, four stages of one ``BasicBlock`` each (strides 2, 2, 2, 1: the last feature map is
    1/8 of the canvas, like the VGG's), average pool, Linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, stride in enumerate((2, 2, 2, 1)):
            cout = width * 2 ** i
            down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            stages.append(BasicBlock(cin, cout, stride=stride, downsample=down))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class Architecture:
    build: Callable[[], nn.Module]
    layer: str  # saliency layer of Grad-CAM-style methods: the last spatial feature map
    top: tuple[str, ...]  # the modules the randomisation sanity check re-initialises


ARCHITECTURES = {
    "vgg": Architecture(vgg_small, "features.23", ("classifier", "features.21", "features.22")),
    "resnet": Architecture(ResNetSmall, "layer4", ("fc", "layer4")),
}


def cache_dir() -> Path:
    if os.environ.get("RSP_FAST_CACHE"):
        return Path(os.environ["RSP_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rsp_fast"


def train(name: str, size: int, samples: int, epochs: int, seed: int = 0, batch: int = 64, lr: float = 2e-3,
          log=print) -> nn.Module:
    """Train ``name`` on ``samples`` fresh training canvases of ``size``² (seeded: same result each time)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name].build()
    data = make_canvases(samples, size, seed=10_000 + seed, split="train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((samples + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order, total = torch.randperm(samples, generator=gen), 0.0
        for start in range(0, samples, batch):
            idx = order[start:start + batch]
            x = data.images[idx]
            loss = loss_fn(model(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
        log(f"  [{name}] epoch {epoch + 1}/{epochs}: loss {total / samples:.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def load_or_train(name: str, size: int, samples: int, epochs: int, seed: int = 0, log=print) -> nn.Module:
    """The cached model for this configuration, trained first if there is none."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(ARCHITECTURES)}")
    config = {"name": name, "size": size, "samples": samples, "epochs": epochs, "seed": seed, "version": 1,
              "torch": torch.__version__.split("+")[0]}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"{name}-{size}-{key}.pt"
    if path.is_file():
        model = ARCHITECTURES[name].build()
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            log(f"  [{name}] cached weights {path}")
            return model.eval()
        except (RuntimeError, OSError, EOFError) as exc:  # a damaged cache entry is retrained, not fatal
            log(f"  [{name}] ignoring unreadable cache {path}: {exc}")
    log(f"  [{name}] training on {samples} canvases of {size}² for {epochs} epochs (cached at {path})")
    model = train(name, size, samples, epochs, seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
