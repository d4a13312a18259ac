"""A run-time check that a model keeps the samples of a batch apart.

RSP explains each sample by itself (RSP_SPEC.md: the authors' code mixes the batch; we do
not). The plan refuses what it can see mixes samples (a mean or a cat along dim 0), but not
an op along a batch dimension that a transpose, permute or reshape moved elsewhere first
(``h.transpose(0, 1).flip(1).transpose(0, 1)``). Such a model's map of one sample would take
the others' relevance silently; this probe finds it by changing sample 0 and watching the
other samples' logits, once per input shape, and names the first node where it shows.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .errors import UnsupportedModelError
from .graph.plan import Plan
from .graph.trace import TRACE_GATE, attributes_kept
from .propagate import FORWARD_TOLERANCE, FORWARD_TOLERANCE_DEFAULT, _Recorder, _where, class_scores


def check_samples_apart(model: torch.nn.Module, plan: Plan, x: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse, naming where, a forward in which sample 0's input changes another sample's logits."""
    probe = _with_sample_zero_changed(x)
    if probe is None:
        return
    try:
        probed = _run(model, plan, probe)
    except Exception:  # a forward that takes no other value at sample 0 (it ran on x): nothing to learn
        return
    probed_logits = class_scores(probed.pass_output(probed.output))
    gap = _gap(logits[1:], probed_logits[1:])
    if gap is None:
        return
    where = _where(model, _first_mixing_node(model, plan, x, probed))
    raise UnsupportedModelError(
        f"the model's forward mixes the samples of a batch{f' (seen first{where})' if where else ''}: changing sample 0 changes the "
        f"other samples' logits (by {gap[0]:.3g}, of {gap[1]:.3g}). RSP explains each sample by itself, and one "
        "sample's map would take the others' relevance. E.g. a batch dimension moved by a transpose, permute or "
        "reshape, then reduced, flipped, rolled or joined along, or a head that takes the batch's mean "
        "(fc(f - f.mean(0))): keep each sample's computation its own, or explain one sample at a time")


class _RowsRecorder(_Recorder):
    """The traced forward, keeping rows 1… of every node's output that is one row per sample."""

    def __init__(self, model: torch.nn.Module, plan: Plan, rows: int):
        super().__init__(model, plan)
        self.rows, self.kept = rows, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == self.rows and out.is_floating_point():
            self.kept[n] = out[1:].detach()
        return out


def _run(model: torch.nn.Module, plan: Plan, x: torch.Tensor) -> _RowsRecorder:
    rec = _RowsRecorder(model, plan, x.shape[0])
    with attributes_kept(model), torch.no_grad(), TRACE_GATE.forward():  # not the user's call: no state kept
        rec.output = rec.run(x)
    return rec


def _with_sample_zero_changed(x: torch.Tensor) -> torch.Tensor | None:
    """The batch with sample 0 changed (noise added to a floating-point input; another sample's
    value for an index input), or None when there is no other sample to watch."""
    if x.shape[0] < 2:
        return None  # one sample: nothing to mix with
    probe = x.clone()
    if x.is_floating_point():
        noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        spread = x.double().std().item()
        probe[0] += (noise * (spread if spread > 0 else 1.0)).to(x.device, x.dtype)
        return probe
    other = next((i for i in range(1, x.shape[0]) if not torch.equal(x[i], x[0])), None)
    if other is None:
        return None
    probe[0] = x[other]
    return probe


def _gap(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float] | None:
    """(largest change, scale) when ``after`` is not ``before`` to the forward check's tolerance, else None."""
    if before.shape != after.shape:
        return 1.0, 0.0
    tolerance = FORWARD_TOLERANCE.get(before.dtype, FORWARD_TOLERANCE_DEFAULT)
    before, after = before.detach().double(), after.detach().double()
    finite = torch.isfinite(before)
    if not torch.equal(finite, torch.isfinite(after)):
        return float("nan"), float("nan")
    scale = before[finite].abs().amax().item() if finite.any() else 0.0
    gap = (before[finite] - after[finite]).abs().amax().item() if finite.any() else 0.0
    return None if gap <= tolerance * scale + torch.finfo(torch.float64).tiny else (gap, scale)


def _first_mixing_node(model: torch.nn.Module, plan: Plan, x: torch.Tensor, probed: _RowsRecorder) -> fx.Node | None:
    """The first node, in the forward's order, whose rows 1… changed with sample 0."""
    kept = _run(model, plan, x).kept
    for node in plan.graph.nodes:
        if node in kept and node in probed.kept and _gap(kept[node], probed.kept[node]) is not None:
            return node
    return None
