"""Independent formulations of RSP's rules, written the authors' way (autograd on the
forward op, one sample at a time), for the rule-level tests. Nothing here imports rsp_fast."""
import torch
import torch.nn.functional as F


def safe_divide(a, b):
    return a / (b + b.eq(0).type(b.type()) * 1e-9) * b.ne(0).type(b.type())


def conv_rsp_one_sample(x, R, weight_shape, stride, padding, dilation, groups, pad4=None):
    """Inner-conv RSP for one sample (batch 1), via weight/input gradients of F.conv2d."""
    x = x.detach()
    if pad4 is not None:
        x_full = F.pad(x.clamp(min=0), pad4)
        padding = 0
    else:
        x_full = x.clamp(min=0)
    x_pos = x_full.clone().requires_grad_()
    w = torch.zeros(weight_shape, dtype=x.dtype, requires_grad=True)
    conv = lambda inp, ww: F.conv2d(inp, ww, None, stride, padding, dilation, groups)
    R_pos, R_neg = R.clamp(min=0), -R.clamp(max=0)
    Fp = torch.autograd.grad(conv(x_pos, w), w, R_pos, retain_graph=True)[0]
    Fn = torch.autograd.grad(conv(x_pos, w), w, R_neg)[0]
    Ga = conv(x_pos, Fp) * R_pos.ne(0)
    Gb = conv(x_pos, Fn) * R_neg.ne(0)
    C1 = x_pos * torch.autograd.grad(Ga, x_pos, safe_divide(R_pos, Ga))[0]
    C2 = x_pos * torch.autograd.grad(Gb, x_pos, safe_divide(R_neg, Gb))[0]
    if pad4 is not None:
        l, r, t, b = pad4
        crop = lambda c: c[..., t:c.shape[-2] - b, l:c.shape[-1] - r]
        C1, C2 = crop(C1), crop(C2)
    if weight_shape[-1] == 1 and weight_shape[-2] == 1:
        return (C1 - C2).detach()
    C = 2 * (C1 - C2)
    nonzero = C.ne(0).type(C.type())
    shift = safe_divide((R_pos - R_neg).sum(), nonzero.sum()) * nonzero
    return (C - shift).detach()


def first_conv_one_sample(x, R, W, stride, padding, dilation=1, groups=1):
    """z^B for one sample, the authors' final_backward (constant images L, H; conv_transpose by autograd)."""
    L = torch.full_like(x, x.min().item())
    H = torch.full_like(x, x.max().item())
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    xs = [t.clone().requires_grad_() for t in (x, L, H)]
    conv = lambda t, w: F.conv2d(t, w, None, stride, padding, dilation, groups)  # noqa: E731
    Z = conv(xs[0], W) - conv(xs[1], pw) - conv(xs[2], nw)
    S = safe_divide(R, Z)
    gx, gl, gh = torch.autograd.grad(Z, xs, S)
    # d/dL of -conv(L, W+) = -convT(S, W+), so L*gl = -L*convT(S, W+): the rule's sign is built in.
    return (x * gx + L * gl + H * gh).detach()


def linear_rsp_loop(x, R, W):
    """Inner Linear (rsp_fast extension) with explicit loops over samples, outputs and inputs."""
    N, Fin = x.shape
    O = W.shape[0]
    out = torch.zeros_like(x)
    Wp = W.clamp(min=0)
    for n in range(N):
        xp = x[n].clamp(min=0)
        Cp = torch.zeros(Fin, dtype=x.dtype)
        Cn = torch.zeros(Fin, dtype=x.dtype)
        for o in range(O):
            z = sum(xp[i] * Wp[o, i] for i in range(Fin))
            if z == 0:
                continue
            r = R[n, o]
            for i in range(Fin):
                share = xp[i] * Wp[o, i] / z
                if r > 0:
                    Cp[i] += r * share
                elif r < 0:
                    Cn[i] += -r * share
        D = 2 * (Cp - Cn)
        active = D != 0
        out[n] = D - active * (R[n].sum() / active.sum() if active.any() else 0)
    return out


def relative_gam_numpy(cams_target, cams_hostile):
    """The authors' relative_GAM (main.py), numpy, one sample: cams already max-normalised."""
    import numpy as np

    K = len(cams_hostile)
    rel_tmp = cams_target * K - np.sum(cams_hostile, 0)
    pos = np.maximum(rel_tmp, 0)
    neg = np.minimum(rel_tmp, 0)
    pos = pos / (pos.sum() + 1e-9)
    neg = neg / neg.min() if neg.min() < 0 else np.zeros_like(neg)
    neg = neg / (neg.sum() + 1e-9) * pos.sum()
    rel = pos - neg
    rel_sum = rel.sum(0, keepdims=True)
    pos_val = (rel_sum > 0) * rel_sum
    neg_val = (rel_sum <= 0) * rel_sum
    pos_val = pos_val / (pos_val.sum() + 1e-9) * 2
    neg_val = neg_val / (neg_val.sum() + 1e-9)
    return np.ones_like(rel) * (pos_val - neg_val) / rel.shape[0]
