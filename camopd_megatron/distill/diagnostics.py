"""Gradient diagnostics of docs/algorithm.md §8 on megatron-sharded parameters.

- Branch conflict: dot product and cosine of two full-parameter gradients (g_g vs g_d on probe
  batches).
- Gradient coherence of a set A of per-sample gradients: Coh(A) = ‖Σ_{i∈A} g_i‖ / Σ_{i∈A} ‖g_i‖
  (1 when all point the same way, → 0 when they cancel), and the coherence gain of the selected
  set S over the full batch B: GCG = Coh(S) / Coh(B) − 1.

A gradient set is this rank's list of ``(grad, is_tensor_parallel_sharded)`` pairs in a fixed
parameter order (:func:`grads_from_params` builds it from megatron parameters). Reductions:

- TP-sharded params (``param.tensor_model_parallel``): each TP rank holds a disjoint slice, so
  their partial dot products are SUMmed over ``tp_group``.
- Replicated params (layer norms, biases of row-parallel layers...) are identical on every TP rank
  and counted once (not reduced).
- Pipeline stages hold disjoint params: the per-stage totals are SUMmed over ``pp_group``.

Call after megatron's grad finalisation (DP all-reduce, sequence-parallel layer-norm all-reduce,
tied-embedding sync) and exclude the duplicated copy of a tied embedding on the last pipeline stage,
or it is counted twice. A ``None`` group means "no reduction along that axis" (a single rank).
All arithmetic is float64.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "GradSet",
    "grads_from_params",
    "grad_dots",
    "BranchConflict",
    "branch_conflict",
    "CoherenceAccumulator",
    "gradient_coherence",
    "coherence_gain",
]

logger = logging.getLogger(__name__)

GradSet = Sequence[tuple[torch.Tensor, bool]]
"""One gradient set on this rank: (grad tensor, is TP-sharded) per parameter, fixed order."""


def grads_from_params(params: Iterable[torch.nn.Parameter], *, clone: bool = True) -> list[tuple[torch.Tensor, bool]]:
    """The gradient set of ``params``: megatron's ``main_grad`` when present, else ``.grad`` (zeros if None).

    ``is_sharded`` is megatron's ``param.tensor_model_parallel`` attribute. ``clone`` copies the
    gradients (to keep g_g while the next backward overwrites the buffers).
    """
    out: list[tuple[torch.Tensor, bool]] = []
    for p in params:
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None:
            g = torch.zeros_like(p)
        g = g.detach()
        out.append((g.clone() if clone else g, bool(getattr(p, "tensor_model_parallel", False))))
    return out


def _check_pair(a: GradSet, b: GradSet, names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names[1]}: got {len(b)} gradients for {len(a)} in {names[0]}; expected the same parameter list")
    for i, ((ga, sa), (gb, sb)) in enumerate(zip(a, b)):
        if ga.shape != gb.shape or sa != sb:
            raise ValueError(
                f"{names[1]}[{i}]: got shape {tuple(gb.shape)} sharded={sb}; expected {names[0]}[{i}]'s shape "
                f"{tuple(ga.shape)} sharded={sa} (same parameter order on both sets)"
            )


def _local_dot(ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    return torch.dot(ga.reshape(-1).to(torch.float64), gb.reshape(-1).to(torch.float64))


def _reduce(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def grad_dots(
    pairs: Sequence[tuple[GradSet, GradSet]],
    *,
    tp_group: Optional[dist.ProcessGroup],
    pp_group: Optional[dist.ProcessGroup],
    device: Optional[torch.device] = None,
) -> list[float]:
    """Full-model dot products ⟨a, b⟩ for each pair (one TP and one PP all-reduce for all pairs).

    Every rank of both groups must call with the same number of pairs. ``device``: where the packed
    partial sums live for the collectives (a CUDA device for nccl); default = the first grad's device.
    """
    if device is None:
        device = next((g.device for a, _ in pairs for g, _ in a), torch.device("cpu"))
    sharded_P = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    replicated_P = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    for k, (a, b) in enumerate(pairs):
        _check_pair(a, b, ("a", "b"))
        for (ga, sharded), (gb, _) in zip(a, b):
            target = sharded_P if sharded else replicated_P
            target[k] += _local_dot(ga, gb).to(device)
    total_P = _reduce(sharded_P, tp_group) + replicated_P
    total_P = _reduce(total_P, pp_group)
    return total_P.tolist()


@dataclass(frozen=True)
class BranchConflict:
    """Dot product, cosine and norms of two full-model gradients (e.g. general vs domain)."""

    dot: float
    cosine: float
    """dot / (‖a‖ ‖b‖); 0 when either norm is 0."""
    norm_a: float
    norm_b: float

    def metrics(self, prefix: str = "conflict") -> dict[str, float]:
        """Flat scalars for logging."""
        return {f"{prefix}/dot": self.dot, f"{prefix}/cosine": self.cosine,
                f"{prefix}/norm_a": self.norm_a, f"{prefix}/norm_b": self.norm_b}


def branch_conflict(
    grads_a: GradSet,
    grads_b: GradSet,
    *,
    tp_group: Optional[dist.ProcessGroup],
    pp_group: Optional[dist.ProcessGroup],
) -> BranchConflict:
    """⟨g_a, g_b⟩ and cos(g_a, g_b) over the whole (TP/PP-sharded) model, identical on every rank."""
    _check_pair(grads_a, grads_b, ("grads_a", "grads_b"))
    dot, aa, bb = grad_dots([(grads_a, grads_b), (grads_a, grads_a), (grads_b, grads_b)], tp_group=tp_group, pp_group=pp_group)
    norm_a, norm_b = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    cosine = dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
    return BranchConflict(dot=dot, cosine=cosine, norm_a=norm_a, norm_b=norm_b)


class CoherenceAccumulator:
    """Streams per-sample gradients g_i into Σ g_i and Σ ‖g_i‖ (one gradient in memory at a time).

    The trainer runs one backward per probe sample, calls :meth:`add` with its gradient set, and
    :meth:`coherence` at the end. Samples may be spread over DP ranks: pass ``dp_group`` to
    :meth:`coherence` to sum over them (it all-reduces the running sum tensors).
    """

    def __init__(self, *, tp_group: Optional[dist.ProcessGroup], pp_group: Optional[dist.ProcessGroup]) -> None:
        self.tp_group = tp_group
        self.pp_group = pp_group
        self._sum: Optional[list[tuple[torch.Tensor, bool]]] = None
        self._norm_sum = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Gradients added on this rank."""
        return self._count

    def add(self, grads: GradSet) -> float:
        """Add one sample's gradient set (collective over TP and PP); returns its norm ‖g_i‖."""
        if self._sum is None:
            self._sum = [(g.detach().to(torch.float64).clone(), s) for g, s in grads]
        else:
            _check_pair(self._sum, grads, ("the first gradient set", "grads"))
            for (acc, _), (g, _) in zip(self._sum, grads):
                acc.add_(g.detach().to(torch.float64))
        (sq,) = grad_dots([(grads, grads)], tp_group=self.tp_group, pp_group=self.pp_group)
        norm = math.sqrt(max(sq, 0.0))
        self._norm_sum += norm
        self._count += 1
        return norm

    def coherence(self, dp_group: Optional[dist.ProcessGroup] = None) -> float:
        """Coh = ‖Σ g_i‖ / Σ ‖g_i‖ over every added gradient (over ``dp_group`` too); 0 for none/zero grads.

        Every rank of the groups must call, having added at least one gradient set of the same
        parameter list (a DP rank without probe samples adds a zero set via :meth:`add_zero`).
        """
        if self._sum is None:
            raise ValueError("CoherenceAccumulator.coherence: no gradients were added on this rank; expected >= 1 "
                             "(a DP rank without samples calls add_zero(grads) with its parameter layout)")
        summed = self._sum
        norm_sum = torch.tensor([self._norm_sum], dtype=torch.float64, device=summed[0][0].device if summed else None)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            summed = [(t.clone(), s) for t, s in summed]
            for t, _ in summed:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dp_group)
            dist.all_reduce(norm_sum, op=dist.ReduceOp.SUM, group=dp_group)
        (sq,) = grad_dots([(summed, summed)], tp_group=self.tp_group, pp_group=self.pp_group)
        denom = float(norm_sum.item())
        return math.sqrt(max(sq, 0.0)) / denom if denom > 0 else 0.0

    def add_zero(self, grads: GradSet) -> None:
        """Register the parameter layout without a sample (a DP rank that holds no probe sample)."""
        if self._sum is None:
            self._sum = [(torch.zeros(g.shape, dtype=torch.float64, device=g.device), s) for g, s in grads]


def gradient_coherence(
    per_sample: Sequence[GradSet],
    *,
    tp_group: Optional[dist.ProcessGroup],
    pp_group: Optional[dist.ProcessGroup],
    dp_group: Optional[dist.ProcessGroup] = None,
) -> float:
    """Coh(A) of a list of per-sample gradient sets (see :class:`CoherenceAccumulator`)."""
    if not per_sample:
        raise ValueError("per_sample: got no gradient sets; expected at least one")
    acc = CoherenceAccumulator(tp_group=tp_group, pp_group=pp_group)
    for grads in per_sample:
        acc.add(grads)
    return acc.coherence(dp_group)


def coherence_gain(coh_selected: float, coh_all: float) -> float:
    """GCG = Coh(S) / Coh(B) − 1, the relative coherence gain of the selected set; 0 when Coh(B) = 0."""
    return coh_selected / coh_all - 1.0 if coh_all > 0 else 0.0
