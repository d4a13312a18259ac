"""Random small CNNs (seeded), over images, 1-D signals and clips: geometries, paddings,
norms, activations and merges drawn at random, so that combinations no hand-written test
names are checked too. Each must be explained by every backend as by the PyTorch reference,
conserve ΣR₀ (float64), and give each sample the map it gets alone."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsp_fast
from conftest import rel_err

BACKENDS = [b for b, status in rsp_fast.backends("cpu").items() if status == "available" and b != "torch"]
# the layers of a network over images (2) or signals (1)
LAYERS = {2: dict(conv=nn.Conv2d, norm=nn.BatchNorm2d, max_pool=nn.MaxPool2d, avg_pool=nn.AvgPool2d,
                  adaptive_avg=nn.AdaptiveAvgPool2d, adaptive_max=nn.AdaptiveMaxPool2d, grid=(3, 2)),
          1: dict(conv=nn.Conv1d, norm=nn.BatchNorm1d, max_pool=nn.MaxPool1d, avg_pool=nn.AvgPool1d,
                  adaptive_avg=nn.AdaptiveAvgPool1d, adaptive_max=nn.AdaptiveMaxPool1d, grid=(6,)),
          3: dict(conv=nn.Conv3d, norm=nn.BatchNorm3d, max_pool=nn.MaxPool3d, avg_pool=nn.AvgPool3d,
                  adaptive_avg=nn.AdaptiveAvgPool3d, adaptive_max=nn.AdaptiveMaxPool3d, grid=(3, 2, 1))}
SIZES = {1: (17, 40), 2: (17, 40), 3: (10, 16)}  # input sides drawn from these ranges (clips are small)


class _Block(nn.Module):
    """conv → norm → activation, merged with its input by a residual add, a concatenation,
    or not at all, then a 1×1 conv."""

    def __init__(self, c: int, rng: random.Random, layers: dict):
        super().__init__()
        self.merge = rng.choice(["add", "cat", "none"])
        k, d = rng.choice([1, 3, 5]), rng.choice([1, 1, 2])
        self.conv = layers["conv"](c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=rng.choice([1, 1, 2, c]),
                                   bias=rng.random() < 0.5,
                                   padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
        self.norm = layers["norm"](c) if rng.random() < 0.6 else nn.Identity()
        self.act = rng.choice([nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Identity()])
        self.mix = layers["conv"](2 * c if self.merge == "cat" else c, c, 1)

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))
        if self.merge == "add":
            y = F.relu(y + x)
        elif self.merge == "cat":
            y = torch.cat([x, y], 1)
        return self.mix(y)


def _fits(layers: list, probe: torch.Tensor) -> bool:
    """Whether the layers so far run on the input and leave a map of at least 3 along each side
    (a drawn pool or stride that would shrink it further, or a reflection wider than the map,
    is not added)."""
    try:
        with torch.no_grad():
            out = nn.Sequential(*layers).eval()(probe)
    except RuntimeError:
        return False
    return min(out.shape[2:]) >= 3


def random_cnn(seed: int, dims: int = 2) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    L = LAYERS[dims]
    size = [rng.randint(*SIZES[dims]) for _ in range(dims)]
    c_in, c = rng.choice([1, 3, 4]), rng.choice([4, 6, 8])
    probe = torch.zeros(1, c_in, *size)
    k = rng.choice([3, 5, 7])
    layers = [L["conv"](c_in, c, k, stride=rng.choice([1, 2]), padding=rng.choice([0, 1, k // 2])), nn.ReLU()]

    def add(*drawn):
        if _fits(layers + list(drawn), probe):
            layers.extend(drawn)
            return True
        return False
    for _ in range(rng.randint(1, 3)):
        add(_Block(c, rng, L), nn.ReLU())
        if rng.random() < 0.5:
            add(rng.choice([L["max_pool"](2, ceil_mode=rng.random() < 0.5), L["avg_pool"](2), L["max_pool"](3, 2, 1)]))
        if rng.random() < 0.4:
            wider = rng.choice([6, 8, 12])
            if add(L["conv"](c, wider, 3, stride=rng.choice([1, 2]), padding=1), nn.ReLU()):
                c = wider
    head = rng.choice(["mean", "max_mlp", "grid"])
    if head == "mean":
        layers += [L["adaptive_avg"](1), nn.Flatten(), nn.Linear(c, 7)]
    elif head == "max_mlp":
        layers += [L["adaptive_max"](2), nn.Flatten(), nn.Linear(2 ** dims * c, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 7)]
    else:
        layers += [L["adaptive_avg"](L["grid"]), nn.Flatten(), nn.Linear(6 * c, 7)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # trained-looking BatchNorm statistics, not the identity
        if isinstance(m, L["norm"]):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(rng.choice([2, 3]), c_in, *size, dtype=torch.float64)
    return model.double().eval(), x


@pytest.mark.parametrize("dims,seed", [(2, seed) for seed in range(16)] + [(1, seed) for seed in range(8)]
                         + [(3, seed) for seed in range(6)])
def test_random_cnn_is_explained_alike_by_every_backend_and_per_sample(dims, seed):
    model, x = random_cnn(seed, dims)
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
