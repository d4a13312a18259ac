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


# the extension rules' layers (RSP defines ReLU networks only): activations, norms that cannot be
# folded, gates, splits, products, resizing, and heads written as tensor methods
ACTIVATIONS = [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.SiLU, nn.PReLU, nn.CELU, nn.SELU, nn.Hardtanh]


class _Gate(nn.Module):
    """Squeeze-and-excitation: x times a sigmoid of its pooled channels."""

    def __init__(self, c):
        super().__init__()
        self.down, self.up = nn.Conv2d(c, max(1, c // 2), 1), nn.Conv2d(max(1, c // 2), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.up(F.relu(self.down(x.mean((2, 3), keepdim=True)))))


class _Halves(nn.Module):
    """Split the channels, a conv and an activation on one half, a residual 1×1 on the other."""

    def __init__(self, c, rng):
        super().__init__()
        self.sizes = [c // 2, c - c // 2]
        self.a, self.b, self.act = nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.Conv2d(c - c // 2, c - c // 2, 1), rng.choice(ACTIVATIONS)()

    def forward(self, x):
        a, b = torch.split(x, self.sizes, 1)
        return torch.cat([self.act(self.a(a)), b + self.b(b)], 1)


class _Branches(nn.Module):
    """A conv branch and a max-pool branch, added, gated one by the other, or concatenated."""

    def __init__(self, c, rng):
        super().__init__()
        self.mode = rng.choice(["add", "gate", "cat"])
        self.p, self.q = nn.Conv2d(c, c, 3, padding=1), nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, c, 1))
        self.out = nn.Conv2d(2 * c if self.mode == "cat" else c, c, 1)

    def forward(self, x):
        p, q = F.relu(self.p(x)), self.q(x)
        return self.out(p + q if self.mode == "add" else p * torch.sigmoid(q) if self.mode == "gate" else torch.cat([p, q], 1))


class _Resize(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.mode = rng.choice(["nearest", "bilinear"])

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode=self.mode)


class _Head(nn.Module):
    """Global mean or max, or a 2×2 pool flattened by torch.flatten or view, then an MLP."""

    def __init__(self, c, rng):
        super().__init__()
        self.kind = rng.choice(["mean", "amax", "flatten", "view"])
        self.pool = nn.AdaptiveAvgPool2d(2)
        width = c if self.kind in ("mean", "amax") else 4 * c
        self.mlp = nn.Sequential(nn.Linear(width, 16), rng.choice(ACTIVATIONS)(), nn.Dropout(0.3), nn.Linear(16, rng.choice([3, 5, 10])))

    def forward(self, x):
        if self.kind in ("mean", "amax"):
            z = x.mean((2, 3)) if self.kind == "mean" else x.amax((2, 3))
        else:
            z = torch.flatten(self.pool(x), 1) if self.kind == "flatten" else self.pool(x).view(x.size(0), -1)
        return self.mlp(z)


def random_cnn_with_extension_layers(seed: int) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([4, 6, 8])
    layers = [nn.Conv2d(3, c, 3, padding=1), rng.choice(ACTIVATIONS)()]
    for _ in range(rng.randint(1, 4)):
        layers.append(rng.choice([lambda: _Gate(c), lambda: _Halves(c, rng), lambda: _Branches(c, rng), lambda: _Resize(rng),
                                  lambda: rng.choice([nn.GroupNorm(2, c), nn.InstanceNorm2d(c, affine=True), nn.BatchNorm2d(c)]),
                                  lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2), lambda: rng.choice(ACTIVATIONS)()])())
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(nn.Sequential(*layers), _Head(c, rng))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, rng.randint(12, 24), rng.randint(12, 24), dtype=torch.float64)
    return model.double().eval(), x


def _explained_alike(model, x, layer=None):
    """Every backend as the reference; ΣR_in + dropped = ΣR₀; each sample's map as alone."""
    ex = rsp_fast.RSP(model, layer=layer, backend="torch").explain(x, record=True)
    R = ex.attribution
    assert R.shape == x.shape and torch.isfinite(R).all()
    total, magnitude = ex.initial.flatten(1).sum(1), ex.initial.flatten(1).abs().sum(1)
    assert ((R.flatten(1).sum(1) + ex.dropped - total).abs() <= 1e-9 * magnitude).all()
    alone = torch.cat([rsp_fast.RSP(model, layer=layer, backend="torch").attribute(x[i:i + 1], target=int(ex.target[i]))
                       for i in range(x.shape[0])])
    assert rel_err(alone, R) < 1e-12
    for backend in BACKENDS:
        assert rel_err(rsp_fast.RSP(model, layer=layer, backend=backend).attribute(x), R) < 1e-9, backend


@pytest.mark.parametrize("dims,seed", [(2, seed) for seed in range(16)] + [(1, seed) for seed in range(8)]
                         + [(3, seed) for seed in range(6)])
def test_random_cnn_is_explained_alike_by_every_backend_and_per_sample(dims, seed):
    _explained_alike(*random_cnn(seed, dims))


@pytest.mark.parametrize("seed", range(16))
def test_random_cnn_with_extension_layers_is_explained_alike(seed):
    """Activations other than ReLU, GroupNorm / InstanceNorm / BatchNorm after an activation,
    squeeze-and-excitation gates, channel splits, gated branches, upsampling, heads written as
    x.mean / x.amax / torch.flatten / view: the saliency layer is the whole feature extractor."""
    _explained_alike(*random_cnn_with_extension_layers(seed), layer="0")
