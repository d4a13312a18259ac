"""An independent, naive whole-network RSP, written from docs/RSP_SPEC.md alone (by an audit
that had not read rsp_fast's rules), and the small networks it runs: one sample at a time,
every rule by autograd on the forward op. Nothing here imports rsp_fast. Each block's
``ref_fwd(x, first)`` returns (output, back, first_after) with back(R_out) -> R_in; the blocks
say themselves how their merges send relevance back (residual add, fan-out summed, concat split)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

D = torch.float64


def safe_div(a, b):
    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))



# ----------------------------------------------------------------- conv helpers
def conv_fn(x, W, c):
    return F.conv2d(x, W, None, c.stride, c.padding, c.dilation, c.groups)


def _pairing_grad(x, W, R, c, wrt_input):
    """The gradient of ⟨conv(x, W), R⟩ with respect to W or to x (the conv is bilinear)."""
    x, W = x.detach().requires_grad_(wrt_input), W.detach().requires_grad_(not wrt_input)
    with torch.enable_grad():
        g, = torch.autograd.grad((conv_fn(x, W, c) * R).sum(), x if wrt_input else W)
    return g


def weight_grad(x, R, wshape, c):
    """F[o,i,u,v] = sum_{p,q} R[o,p,q] * x[i, p*s+u*d-pad, ...]  (the conv weight gradient)."""
    return _pairing_grad(x, torch.zeros(wshape, dtype=x.dtype), R, c, wrt_input=False)


def conv_T(S, W, xshape, c):
    """conv_transpose with the forward conv's geometry and output size (= input gradient)."""
    return _pairing_grad(torch.zeros(xshape, dtype=S.dtype), W, S, c, wrt_input=True)


def purge(Cp, Cn, Rp, Rn, one_by_one):
    if one_by_one:
        return Cp - Cn
    Dd = 2 * (Cp - Cn)
    nz = Dd != 0
    n = int(nz.sum())
    shift = (Rp.sum() - Rn.sum()) / n if n > 0 else torch.zeros((), dtype=Dd.dtype)
    return Dd - nz.to(Dd.dtype) * shift


def conv_inner_rule(c, x, R):
    xh = x.clamp(min=0)
    Rp, Rn = R.clamp(min=0), (-R).clamp(min=0)
    wshape = c.weight.shape
    Fp = weight_grad(xh, Rp, wshape, c)
    Fn = weight_grad(xh, Rn, wshape, c)
    Ga = conv_fn(xh, Fp, c) * (Rp != 0)
    Gb = conv_fn(xh, Fn, c) * (Rn != 0)
    Sp, Sn = safe_div(Rp, Ga), safe_div(Rn, Gb)
    Cp = xh * conv_T(Sp, Fp, x.shape, c)
    Cn = xh * conv_T(Sn, Fn, x.shape, c)
    k11 = tuple(c.kernel_size) == (1, 1)
    Rin = purge(Cp, Cn, Rp, Rn, k11)
    return Rin


def conv_first_rule(c, W, x, R):
    L, H = x.min(), x.max()
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    Lx, Hx = torch.full_like(x, float(L)), torch.full_like(x, float(H))
    Z = conv_fn(x, W, c) - conv_fn(Lx, Wp, c) - conv_fn(Hx, Wn, c)
    S = safe_div(R, Z)
    Rin = x * conv_T(S, W, x.shape, c) - Lx * conv_T(S, Wp, x.shape, c) - Hx * conv_T(S, Wn, x.shape, c)
    return Rin


def linear_inner_rule(W, x, R):
    xh = x.clamp(min=0)
    Wp = W.clamp(min=0)
    Rp, Rn = R.clamp(min=0), (-R).clamp(min=0)
    Zp = xh @ Wp.t()
    Cp = xh * (safe_div(Rp, Zp) @ Wp)
    Cn = xh * (safe_div(Rn, Zp) @ Wp)
    Rin = purge(Cp, Cn, Rp, Rn, False)
    return Rin


def linear_first_rule(W, x, R):
    # z^B extended to a first Linear (README "first Conv2d / Linear"); spec is silent here.
    L, H = x.min(), x.max()
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    ones = torch.ones_like(x)
    Z = x @ W.t() - L * (ones @ Wp.t()) - H * (ones @ Wn.t())
    S = safe_div(R, Z)
    Rin = x * (S @ W) - L * (S @ Wp) - H * (S @ Wn)
    return Rin


def pool_rule(fn, x, R):
    xp = (x + 1e-9).detach().requires_grad_(True)
    with torch.enable_grad():
        Z = fn(xp)
        S = safe_div(R, Z.detach())
        g, = torch.autograd.grad((Z * S).sum(), xp)
    Rin = xp.detach() * g
    return Rin


def add_rule(a, b, R):
    ah = a.clamp(min=0) + 1e-9
    bh = b.clamp(min=0) + 1e-9
    den = ah + bh
    Ra, Rb = ah * safe_div(R, den), bh * safe_div(R, den)
    return Ra, Rb


def fold_bn(conv, bn):
    W = conv.weight.detach()
    if bn is None:
        return W
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return W * scale.view(-1, 1, 1, 1)


# ----------------------------------------------------------------- tape
PASS = (nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity, nn.BatchNorm2d, nn.BatchNorm1d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def fwd(m, x, first):
    """Returns (y, back, first_after)."""
    if isinstance(m, nn.Sequential):
        return fwd_seq(list(m), x, first)
    if hasattr(m, 'ref_fwd'):
        return m.ref_fwd(x, first)
    return fwd_seq([m], x, first)


def fwd_seq(mods, x, first):
    backs = []
    i = 0
    while i < len(mods):
        m = mods[i]
        xin = x
        if isinstance(m, nn.Conv2d):
            bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) else None
            y = m(xin)
            if bn is not None:
                y = bn(y)
                i += 1
            if first:
                W = fold_bn(m, bn)
                backs.append(lambda R, m=m, W=W, xin=xin: conv_first_rule(m, W, xin, R))
            else:
                backs.append(lambda R, m=m, xin=xin: conv_inner_rule(m, xin, R))
            first = False
            x = y
        elif isinstance(m, nn.Linear):
            y = m(xin)
            W = m.weight.detach()
            if first:
                backs.append(lambda R, W=W, xin=xin: linear_first_rule(W, xin, R))
            else:
                backs.append(lambda R, W=W, xin=xin: linear_inner_rule(W, xin, R))
            first = False
            x = y
        elif isinstance(m, PASS):
            x = m(xin)
        elif isinstance(m, nn.Flatten):
            x = m(xin)
            backs.append(lambda R, s=xin.shape: R.reshape(s))
        elif isinstance(m, POOLS):
            x = m(xin)
            backs.append(lambda R, m=m, xin=xin: pool_rule(m, xin, R))
        elif isinstance(m, nn.Sequential) or hasattr(m, 'ref_fwd'):
            x, b, first = fwd(m, xin, first)
            backs.append(b)
        else:
            raise TypeError(type(m))
        i += 1

    def back(R):
        for b in reversed(backs):
            R = b(R)
        return R
    return x, back, first


# ----------------------------------------------------------------- initial relevance
def cams(A, head, classes):
    """Grad-CAM without channel sum, each divided by (max + 1e-9)."""
    out = []
    for c in classes:
        Ar = A.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = head(Ar)
            g, = torch.autograd.grad(y[0, c], Ar)
        if A.dim() == 4:
            g = g.mean(dim=(2, 3), keepdim=True)
        cam = A * g
        out.append(cam / (cam.max() + 1e-9))
    return out


def initial(A, head, logits, mode, K, target=None, hostile=None):
    t = int(logits[0].argmax()) if target is None else target
    if mode == 'gradcam' or K == 0:
        return cams(A, head, [t])[0], t, []
    if hostile is None:
        order = torch.argsort(logits[0], descending=True).tolist()
        hostile = [c for c in order if c != t][:K]
    cs = cams(A, head, [t] + list(hostile))
    rel = K * cs[0] - sum(cs[1:])
    P = rel.clamp(min=0)
    P = P / (P.sum() + 1e-9)
    N = rel.clamp(max=0)
    N = N / N.min() if float(N.min()) < 0 else torch.zeros_like(N)
    N = N / (N.sum() + 1e-9) * P.sum()
    rel = P - N
    if A.dim() == 4:
        C = A.shape[1]
        s = rel.sum(1, keepdim=True)
    else:  # flat saliency layer: each feature its own position (README deviation), C = 1
        C = 1
        s = rel
    sp = s * (s > 0)
    sn = s * (s <= 0)
    sp = 2 * sp / (sp.sum() + 1e-9)
    sn = sn / (sn.sum() + 1e-9)
    q = sp - sn
    R0 = (q / C).expand_as(A).clone()
    return R0, t, hostile


def reference(model, x, mode="comparative", K=3):
    """Each sample's attribution (stacked) for ``model`` with ``.features`` (input → saliency
    layer) and ``.head`` (saliency layer → logits); the target is the top class."""
    outs = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        with torch.no_grad():
            A, back, _ = fwd(model.features, xi, True)
            logits = model.head(A)
        R0, _, _ = initial(A, model.head, logits, mode, K)
        with torch.no_grad():
            outs.append(back(R0))
    return torch.cat(outs)


# ---------------------------------------------------------------- networks
def rand_bn(m, g):
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g, dtype=D) * 0.2)
            mod.running_var.copy_(torch.rand(n, generator=g, dtype=D) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g, dtype=D) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g, dtype=D) * 0.2)


class Net(nn.Module):
    def __init__(self, features, head):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- blocks
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)

    def ref_fwd(self, x, first):
        a, ba, f1 = fwd_seq([self.conv1, self.bn1, self.relu, self.conv2, self.bn2], x, first)
        if self.downsample is None:
            b, bb = x, (lambda R: R)
        else:
            b, bb, _ = fwd(self.downsample, x, first)
        y = torch.relu(a + b)

        def back(R):
            Ra, Rb = add_rule(a, b, R)
            return ba(Ra) + bb(Rb)          # fan-out of x: sum
        return y, back, False


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        h = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)

    def ref_fwd(self, x, first):
        c, bc, _ = fwd(self.conv, x, first)
        if not self.use_res:
            return c, bc, False
        y = x + c

        def back(R):
            Rx, Rc = add_rule(x, c, R)
            return Rx + bc(Rc)
        return y, back, False


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(), nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)

    def ref_fwd(self, x, first):
        n, bn_, _ = fwd(self.body, x, first)
        y = torch.cat([x, n], 1)
        C = x.shape[1]

        def back(R):
            return R[:, :C] + bn_(R[:, C:])     # split by slices; fan-out of x summed
        return y, back, False


# ---------------------------------------------------------------- networks
def vgg(bn=False, ncls=10):
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1)] + ([nn.BatchNorm2d(o)] if bn else []) + [nn.ReLU()]
    feats = nn.Sequential(*cbr(3, 8), *cbr(8, 8), nn.MaxPool2d(2), *cbr(8, 16), nn.MaxPool2d(2), *cbr(16, 16), *cbr(16, 16))
    head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, ncls))
    return Net(feats, head)


def resnet(ncls=10):
    feats = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1),
                          BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, ncls))
    return Net(feats, head)


def mobilenet(ncls=10):
    feats = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          InvertedResidual(16, 24, 2, 3), InvertedResidual(24, 24, 1, 3),
                          nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, ncls))
    return Net(feats, head)


def densenet(ncls=10):
    feats = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          DenseLayer(16, 8), DenseLayer(24, 8),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), nn.AvgPool2d(2),
                          DenseLayer(16, 8),
                          nn.BatchNorm2d(24), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, ncls))
    return Net(feats, head)


def mlp(ncls=10, nin=20):
    feats = nn.Sequential(nn.Linear(nin, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU())
    head = nn.Sequential(nn.Linear(24, ncls))
    return Net(feats, head)


def poolvar(ncls=10):
    """Avg/AdaptiveAvg pools, stride/padding/dilation/groups/non-square kernels."""
    feats = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(),                  # first layer: k5 s2 p2
        nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.ReLU(),              # dilation
        nn.AvgPool2d(3, stride=1, padding=1), # count_include_pad
        nn.Conv2d(16, 16, 3, stride=2, padding=0, groups=4), nn.ReLU(),    # groups=4, pad 0, stride 2
        nn.AdaptiveAvgPool2d(5),
        nn.Conv2d(16, 16, (1, 3), padding=(0, 1)), nn.ReLU(),              # non-square kernel
        nn.Conv2d(16, 16, 1, stride=2), nn.ReLU(),                          # strided 1x1
        nn.Conv2d(16, 12, (3, 1), padding=(1, 0)), nn.ReLU())
    head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 3 * 3, ncls))
    return Net(feats, head)


def vgg_fc_saliency(ncls=10):
    """Saliency layer after a Linear: relevance goes through Linear, flatten, pool, convs."""
    feats = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU())
    head = nn.Sequential(nn.Linear(24, ncls))
    return Net(feats, head)


def poolvar2(ncls=10):
    """grouped+dilated first layer, MaxPool dilation/ceil_mode/padding, AvgPool count_include_pad=False/ceil_mode,
    Dropout/Identity in the path, depthwise with channel multiplier 2, dilated depthwise."""
    feats = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3), nn.ReLU(),     # first layer grouped + dilated
        nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Identity(),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),   # 32 -> 16 (ceil)
        nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.ReLU(),              # depthwise, multiplier 2
        nn.MaxPool2d(2, stride=2, dilation=2, ceil_mode=False),             # dilated max pool 16 -> 7
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32), nn.ReLU(), # dilated depthwise
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),  # 7 -> 4
        nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, ncls))
    return Net(feats, head)


BUILDERS = dict(vgg=vgg, vgg_bn=lambda: vgg(bn=True), resnet=resnet, mobilenet=mobilenet,
                densenet=densenet, mlp=mlp, poolvar=poolvar, poolvar2=poolvar2, vgg_fc=vgg_fc_saliency)
INPUT = dict(mlp=(20,))


def build(name, seed):
    torch.manual_seed(seed)
    m = BUILDERS[name]().to(D)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        rand_bn(m, g)
    return m.eval()


def make_input(name, n, seed):
    g = torch.Generator().manual_seed(seed + 77)
    shape = INPUT.get(name, (3, 32, 32))
    return torch.randn((n,) + shape, generator=g, dtype=D)
