"""Where propagation starts: the initial relevance at the saliency layer (RSP_SPEC.md §1).

Grad-CAM maps without channel sum, cam_c = A ⊙ mean_hw(∂y_c/∂A), each normalised by its
own max; ``gradcam`` starts from the target's map, ``comparative`` contrasts it with K
hostile classes. Each class's gradients come from one backward through the head. Every
reduction is per sample. For a saliency layer without spatial dimensions (an MLP's hidden
layer) each feature is its own position: the gradient is not averaged and channels are
not collapsed (an rsp_fast extension). A 1×1 map (ResNet's layer4 on a 32-pixel input), and
one whose positions all hold the same values (a 1×1 map pooled or upsampled), is treated the
same way by the comparative init: collapsing its channels leaves ΣP − ΣN = 0 at every
position, so the map's sign would be rounding noise.
"""
from __future__ import annotations

import torch

from .errors import RSPError

CAM_EPS = 1e-9


def class_gradients(logits: torch.Tensor, A: torch.Tensor, classes: torch.Tensor,
                    layer: str = "the saliency layer") -> torch.Tensor:
    """∂y_c/∂A for each column of ``classes`` (N×M): returns M×(shape of A). One backward per
    column, from the scalar Σ_n y[n, classes[n, m]]: samples are independent, so its gradient at
    sample n is ∂y_c/∂A there (what a one-hot vector-Jacobian product gives). A scalar needs no
    grad_outputs tensor, whose shape check imports sympy (0.26 s once per process here). An
    RSPError where the logits do not depend on A (``layer`` names it) through autograd."""
    picked = logits.gather(1, classes)  # N×M
    unconnected = RSPError(f"the model's logits do not depend on {layer} through autograd: the layer is off their "
                           "path (choose one on it), or the forward detaches them (or computes them under no_grad)")
    if not picked.requires_grad:
        raise unconnected
    # the graph is kept, as a vector-Jacobian product with retain_graph keeps it: callers may ask again
    grads = [torch.autograd.grad(picked[:, m].sum(), A, retain_graph=True, allow_unused=True)[0]
             for m in range(classes.shape[1])]
    if any(g is None for g in grads):
        raise unconnected
    return torch.stack(grads)


def _reduced_per_sample(t: torch.Tensor, op: str, lead: int) -> torch.Tensor:
    """Reduce all but the first ``lead`` dimensions, keeping them for broadcasting."""
    flat = t.reshape(t.shape[:lead] + (-1,))
    red = getattr(torch, op)(flat, dim=-1)
    return red.view(t.shape[:lead] + (1,) * (t.dim() - lead))


def gradcam_maps(A: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Normalised Grad-CAM maps without channel sum: M×N×C×h×w for grads M×N×C×h×w."""
    spatial = tuple(range(3, grads.dim()))
    weights = grads.mean(dim=spatial, keepdim=True) if spatial else grads
    cams = A.detach().unsqueeze(0) * weights
    return cams / (_reduced_per_sample(cams, "amax", 2) + CAM_EPS)


def comparative_relevance(cam_target: torch.Tensor, cam_hostile: torch.Tensor,
                          counted: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' ``relative_GAM`` per sample: cam_target N×…, cam_hostile K×N×…; ΣR₀ = 1.
    ``counted`` (N×K bool): the hostile classes that count, K per sample those of its own."""
    if counted is None:
        rel = cam_hostile.shape[0] * cam_target - cam_hostile.sum(0)
    else:
        w = counted.t().to(cam_target.dtype).view(counted.shape[::-1] + (1,) * (cam_target.dim() - 1))
        rel = w.sum(0) * cam_target - (w * cam_hostile).sum(0)
    P = rel.clamp(min=0)
    P = P / (_reduced_per_sample(P, "sum", 1) + CAM_EPS)
    Nn = rel.clamp(max=0)
    low = _reduced_per_sample(Nn, "amin", 1)
    Nn = torch.where(low < 0, Nn / torch.where(low < 0, low, torch.ones_like(low)), torch.zeros_like(Nn))
    Nn = Nn / (_reduced_per_sample(Nn, "sum", 1) + CAM_EPS) * _reduced_per_sample(P, "sum", 1)
    rel = P - Nn
    if rel[0, 0].numel() == 1:  # one position: channels are the positions (see the module's docstring)
        return _two_to_one(rel)
    s = rel.sum(1, keepdim=True)
    collapsed = (_two_to_one(s) / rel.shape[1]).expand_as(rel)
    # A map whose positions all hold the same channel vector (a 1×1 map pooled or upsampled to
    # h×w) collapses to (ΣP − ΣN)/hw = 0 at every position: its sign is rounding noise (measured
    # up to 3e-13 of Σ_c|rel| in float64, 6e-8 in float32; real maps' channel sums reach 1e-2 and
    # more). Such a sample keeps its channels apart, as a 1×1 map does.
    scale = _reduced_per_sample(rel.abs().sum(1, keepdim=True), "amax", 1)
    noise = _reduced_per_sample(s.abs(), "amax", 1) <= CANCELLED * scale
    return torch.where(noise, _two_to_one(rel), collapsed).contiguous()


CANCELLED = 1e-5  # channel sums below this share of the largest position's absolute sum, everywhere: noise


def _two_to_one(s: torch.Tensor) -> torch.Tensor:
    """Step 3 of RSP_SPEC §1 on ``s`` (N×…): positive part scaled to sum 2, the rest to −1."""
    s_pos, s_neg = s * (s > 0), s * (s <= 0)
    s_pos = 2 * s_pos / (_reduced_per_sample(s_pos, "sum", 1) + CAM_EPS)
    s_neg = s_neg / (_reduced_per_sample(s_neg, "sum", 1) + CAM_EPS)
    return s_pos - s_neg


def initial_relevance(logits, A, target, hostile, init: str, channels_last: bool = False,
                      layer: str = "the saliency layer"):
    """R₀ and the normalised maps (target first) for ``init`` in {"gradcam", "comparative"}.
    ``channels_last``: A is N×H×W×C; R₀ and the maps come back in that layout."""
    classes = torch.cat([target.unsqueeze(1), hostile], dim=1) if init == "comparative" else target.unsqueeze(1)
    grads = class_gradients(logits, A, classes, layer)
    if channels_last:  # computed with channels at dim 1, as everywhere else
        A, grads = A.movedim(-1, 1), grads.movedim(-1, 2)
    if init == "comparative":
        # P − N cancels in its channel sums (to about 1e-4 of their terms on EfficientNet-B0 and
        # MobileNetV3), which amplifies the rounding of P and N ~10⁴×; the maps are C·h·w per
        # sample, so they are formed in float64 (from the activations and gradients as they are)
        cams = gradcam_maps(A.double(), grads.double())
        # a class the model masks out (a logit of −inf; the top-k take such ties where too few
        # classes are left, the target's own index among them) is no hostile evidence: not counted
        counted = torch.isfinite(logits.detach().gather(1, hostile)) & (hostile != target.unsqueeze(1))
        R0 = comparative_relevance(cams[0], cams[1:], counted)
        alone = ~counted.any(1).view((-1,) + (1,) * (R0.dim() - 1))  # no hostile class left: its Grad-CAM map
        R0, cams = torch.where(alone, cams[0], R0).to(A.dtype), cams.to(A.dtype)
    else:
        cams = gradcam_maps(A, grads)
        R0 = cams[0]
    if channels_last:
        R0, cams = R0.movedim(1, -1), cams.movedim(2, -1)
    return R0.contiguous(), cams
