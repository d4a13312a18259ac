"""A run-time check that a model keeps the samples of a batch apart.

RSP explains each sample by itself (RSP_SPEC.md: the authors' code mixes the batch; we do
not). The plan refuses what it can see mixes samples (a mean or a cat along dim 0), but not
an op along a batch dimension that a transpose, permute or reshape moved elsewhere first
(``h.transpose(0, 1).flip(1).transpose(0, 1)``), nor a head's ``fc(f - f.mean(0))``. Such a
model's map of one sample would take the others' relevance silently. So, once per input
shape, the first and the last sample are also run alone (two forwards of one sample, before
the pass's own forward, so that the model's hooks see the batch last), and the batch's
logits of those samples must be theirs alone: the first reads whatever a later sample
gives (a flip, a roll, a mean of the others), the last whatever an earlier one does (a
shift by one). Mixing that cancels in the forward, or that only some values set off, is
not seen (README, Limits).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .errors import UnsupportedModelError
from .graph.plan import Plan
from .graph.trace import TRACE_GATE, attributes_kept
from .propagate import FORWARD_TOLERANCE, FORWARD_TOLERANCE_DEFAULT, _Recorder, _where, class_scores, values_apart
from .tf32 import conv_tf32, matmul_tf32

CUDA_TF32_TOLERANCE = 1e-2  # TF32 and other algorithms per batch size: a sample alone rounds otherwise


def samples_alone(model: torch.nn.Module, plan: Plan, x: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """The logits of the batch's first and last sample, each run alone; None where there is no
    other sample, or where the model does not run on one sample (a forward made for its batch
    size): then nothing is checked."""
    if x.shape[0] < 2:
        return None
    try:
        return {i: _logits_alone(model, plan, x[i:i + 1]) for i in (0, x.shape[0] - 1)}
    except (torch.OutOfMemoryError, MemoryError):
        raise  # the pass, on the whole batch, would not fit either
    except Exception:
        return None


def check_samples_apart(model: torch.nn.Module, plan: Plan, x: torch.Tensor, logits: torch.Tensor,
                        alone: dict[int, torch.Tensor] | None) -> None:
    """Refuse, naming where, a batch whose first or last sample's logits are not its own alone."""
    if alone is None:
        return
    for i, own in alone.items():
        gap = _gap(logits[i:i + 1], own)
        if gap is not None:
            where = _where(model, _first_mixing_node(model, plan, x, i))
            raise UnsupportedModelError(
                f"the model's forward mixes the samples of a batch{f' (seen first{where})' if where else ''}: sample "
                f"{i}'s logits in a batch of {x.shape[0]} {gap}. "
                "RSP explains each sample by itself, and one sample's map would take the others' relevance. E.g. a "
                "batch dimension moved by a transpose, permute or reshape, then reduced, flipped, rolled or joined "
                "along, or a head that takes the batch's mean (fc(f - f.mean(0))): keep each sample's computation "
                "its own, or explain one sample at a time")


class _OutputsRecorder(_Recorder):
    """The traced forward, keeping one sample's row of every node's output that is one row per sample."""

    def __init__(self, model: torch.nn.Module, plan: Plan, rows: int, row: int):
        super().__init__(model, plan)
        self.rows, self.row, self.kept = rows, row, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == self.rows and out.is_floating_point():
            self.kept[n] = out[self.row:self.row + 1].detach()
        return out


def _logits_alone(model: torch.nn.Module, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    rec = _Recorder(model, plan)
    return class_scores(rec.pass_output(_run(rec, model, x))).detach()


def _outputs(model: torch.nn.Module, plan: Plan, x: torch.Tensor, row: int) -> dict[fx.Node, torch.Tensor]:
    rec = _OutputsRecorder(model, plan, x.shape[0], row)
    _run(rec, model, x)
    return rec.kept


def _run(rec: _Recorder, model: torch.nn.Module, x: torch.Tensor):
    with attributes_kept(model), torch.no_grad(), TRACE_GATE.forward():  # not the user's call: no state kept
        return rec.run(x)


def _gap(batch: torch.Tensor, alone: torch.Tensor) -> str | None:
    """How a sample's ``batch`` row differs from its ``alone`` one beyond the tolerance of its dtype
    and device ("are 0.0056 (of 0.37) from …"), else None (also where the shapes differ: nothing to compare)."""
    if batch.shape != alone.shape:
        return None
    tf32 = batch.is_cuda and batch.dtype == torch.float32 and (matmul_tf32() or conv_tf32())
    tolerance = CUDA_TF32_TOLERANCE if tf32 else FORWARD_TOLERANCE.get(batch.dtype, FORWARD_TOLERANCE_DEFAULT)
    apart = values_apart(batch, alone, tolerance)
    if apart is None:
        return None
    gap, scale, alike = apart
    if not alike:
        return "are not finite where its logits alone are, or the reverse"
    return f"are {gap:.3g} (of {scale:.3g}) from its logits alone"


def _first_mixing_node(model: torch.nn.Module, plan: Plan, x: torch.Tensor, row: int) -> fx.Node | None:
    """The first node, in the forward's order, whose output for sample ``row`` differs in the batch and alone."""
    in_batch, alone = _outputs(model, plan, x, row), _outputs(model, plan, x[row:row + 1], 0)
    return next((n for n in plan.graph.nodes if n in in_batch and n in alone and _gap(in_batch[n], alone[n])), None)
