"""Random small CNNs (seeded): geometries, paddings, norms, activations and merges drawn
at random, so that combinations no hand-written test names are checked too. Each must be
explained by every backend as by the PyTorch reference, conserve ΣR₀ (float64), and give
each sample the map it gets alone."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsp_fast
from conftest import rel_err

BACKENDS = [b for b, status in rsp_fast.backends("cpu").items() if status == "available" and b != "torch"]


class _Block(nn.Module):
    """conv → norm → activation, merged with its input by a residual add, a concatenation,
    or not at all, then a 1×1 conv."""

    def __init__(self, c: int, rng: random.Random):
        super().__init__()
        self.merge = rng.choice(["add", "cat", "none"])
        k, d = rng.choice([1, 3, 5]), rng.choice([1, 1, 2])
        self.conv = nn.Conv2d(c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=rng.choice([1, 1, 2, c]),
                              bias=rng.random() < 0.5, padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
        self.norm = nn.BatchNorm2d(c) if rng.random() < 0.6 else nn.Identity()
        self.act = rng.choice([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Identity()])
        self.mix = nn.Conv2d(2 * c if self.merge == "cat" else c, c, 1)

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))
        if self.merge == "add":
            y = F.relu(y + x)
        elif self.merge == "cat":
            y = torch.cat([x, y], 1)
        return self.mix(y)


def random_cnn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c_in, c = rng.choice([1, 3, 4]), rng.choice([4, 6, 8])
    k = rng.choice([3, 5, 7])
    layers = [nn.Conv2d(c_in, c, k, stride=rng.choice([1, 2]), padding=rng.choice([0, 1, k // 2])), nn.ReLU()]
    for _ in range(rng.randint(1, 3)):
        layers += [_Block(c, rng), nn.ReLU()]
        if rng.random() < 0.5:
            layers.append(rng.choice([nn.MaxPool2d(2, ceil_mode=rng.random() < 0.5), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1)]))
        if rng.random() < 0.4:
            wider = rng.choice([6, 8, 12])
            layers += [nn.Conv2d(c, wider, 3, stride=rng.choice([1, 2]), padding=1), nn.ReLU()]
            c = wider
    head = rng.choice(["mean", "max_mlp", "grid"])
    if head == "mean":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 7)]
    elif head == "max_mlp":
        layers += [nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(4 * c, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 7)]
    else:
        layers += [nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(6 * c, 7)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # trained-looking BatchNorm statistics, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(rng.choice([2, 3]), c_in, rng.randint(17, 40), rng.randint(17, 40), dtype=torch.float64)
    return model.double().eval(), x


@pytest.mark.parametrize("seed", range(16))
def test_random_cnn_is_explained_alike_by_every_backend_and_per_sample(seed):
    model, x = random_cnn(seed)
    ex = rsp_fast.RSP(model, backend="torch").explain(x, record=True)
    R = ex.attribution
    assert R.shape == x.shape and torch.isfinite(R).all()
    total = ex.initial.flatten(1).sum(1)
    assert ((R.flatten(1).sum(1) + ex.dropped - total).abs() <= 1e-9 * total.abs()).all()
    alone = torch.cat([rsp_fast.RSP(model, backend="torch").attribute(x[i:i + 1], target=int(ex.target[i]))
                       for i in range(x.shape[0])])
    assert rel_err(alone, R) < 1e-12
    for backend in BACKENDS:
        assert rel_err(rsp_fast.RSP(model, backend=backend).attribute(x), R) < 1e-9, backend
