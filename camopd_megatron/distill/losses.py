"""The CaMOPD branch loss (docs/algorithm.md §2-§3) on per-token tensors.

For the samples i of one micro-batch (already restricted to the kept set S_b by the caller):

    Δ_{i,t} = log π_T(y_{i,t}) − sg(log π_θ(y_{i,t}))                         gap (no gradient)
    Â_{i,t} = r_i · clip(Δ_{i,t}, −A_max, +A_max)                             advantage (clip optional)
    ρ_{i,t} = exp(sg(log π_θ) − log μ)                                         π/μ, μ = rollout log-prob
    w_{i,t} = ρ if ε_low ≤ ρ ≤ ε_high else 0            (is_mode="mask", the paper)
            = clamp(ρ, ε_low, ε_high)                   (is_mode="clamp")
    loss    = −(1/N_global) Σ_i (1/L_i) Σ_t m_{i,t} · w_{i,t} · Â_{i,t} · log π_θ(y_{i,t})

N_global (``num_samples_global``) is |S_b| counted over every data-parallel rank and every
micro-batch of the optimizer step. Each micro-batch divides by the same global count, so summing the
gradients of all micro-batches on all DP ranks (megatron's DP all-reduce must then SUM, not
average — or the caller multiplies by the DP size before a mean all-reduce) gives exactly the
gradient of the mean over S_b, independent of how the batch was split. L_i = Σ_t m_{i,t}; a row
with L_i = 0 contributes 0 (it still counts in N_global if the caller counted it).

Which student log-prob the gap uses: by default Δ is computed here from ``student_logp_BT`` (the
training forward, detached). The trainer instead passes ``gap_BT`` precomputed from the pre-update
recompute it used for selection (``selection.student_logprobs``), so the advantage of a sample is the
same quantity that selected it. On the first micro-batch of an on-policy step (no update yet) the
two coincide; after that the training forward can drift slightly, and ``gap_BT`` keeps the paper's
"pre-update gap". The IS ratio always uses the current training forward ``student_logp_BT``.

Everything except the returned loss is detached; statistics are computed in fp32 and the metrics are
float64 sums/counts that add up across micro-batches and ranks (see :func:`reduce_metric_sums` and
:func:`summarize_loss_metrics`). Positions where the mask is 0 are neutralised with ``where`` so
padding holding NaN/inf (e.g. μ = −inf) cannot leak into the loss or its gradient.

Shape legend: B = samples in the micro-batch, T = (padded) response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
import torch.distributed as dist

from camopd_megatron.ops.gaps import token_gaps

__all__ = [
    "LossOptions",
    "camopd_branch_loss",
    "reduce_metric_sums",
    "summarize_loss_metrics",
]

ISMode = Literal["mask", "clamp"]


@dataclass(frozen=True)
class LossOptions:
    """Knobs of :func:`camopd_branch_loss` (mirrors ``loss.*`` of the config)."""

    is_low: float = 0.5
    """ε_low: smallest π/μ that keeps its weight (``loss.is_low``)."""
    is_high: float = 2.0
    """ε_high: largest π/μ that keeps its weight (``loss.is_high``)."""
    is_mode: ISMode = "mask"
    """``mask``: w = 0 outside [ε_low, ε_high]; ``clamp``: w clamped to the bounds (``loss.is_mode``)."""
    adv_clip: Optional[float] = None
    """A_max: clip Â to ±A_max; None = no clip (``loss.adv_clip``)."""

    def __post_init__(self) -> None:
        if not (0.0 < self.is_low < self.is_high):
            raise ValueError(
                f"loss.is_low/loss.is_high: got {self.is_low}/{self.is_high}; expected 0 < is_low < is_high. "
                "Fix: use e.g. is_low: 0.5, is_high: 2.0"
            )
        if self.is_mode not in ("mask", "clamp"):
            raise ValueError(f"loss.is_mode: got {self.is_mode!r}; expected 'mask' or 'clamp'. Fix: use 'mask' (the paper)")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"loss.adv_clip: got {self.adv_clip}; expected a value > 0 or null. Fix: use 5.0 or null")

    @classmethod
    def from_config(cls, loss_cfg: object) -> "LossOptions":
        """Build from a :class:`camopd_megatron.config.LossConfig` (or anything with the same fields)."""
        return cls(
            is_low=float(getattr(loss_cfg, "is_low")),
            is_high=float(getattr(loss_cfg, "is_high")),
            is_mode=getattr(loss_cfg, "is_mode"),
            adv_clip=getattr(loss_cfg, "adv_clip"),
        )


def _check_shapes(name_to_tensor: Mapping[str, torch.Tensor], ref: str) -> None:
    """Every tensor must have the shape of ``name_to_tensor[ref]``, which must be 2-D."""
    ref_shape = tuple(name_to_tensor[ref].shape)
    if len(ref_shape) != 2:
        raise ValueError(f"{ref}: expected shape [B, T], got {ref_shape}")
    for name, t in name_to_tensor.items():
        if tuple(t.shape) != ref_shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} must equal {ref}'s shape {ref_shape}")


def _check_normaliser(num_samples_global: int, batch: int) -> None:
    if int(num_samples_global) != num_samples_global or num_samples_global < batch or num_samples_global <= 0:
        raise ValueError(
            f"num_samples_global: got {num_samples_global}; expected a positive integer >= the micro-batch's "
            f"{batch} samples (|S_b| over all DP ranks and micro-batches). Fix: pass the global kept count"
        )


def _inv_lengths(mask_f_BT: torch.Tensor) -> torch.Tensor:
    """1/L_i per row ([B, 1], fp32); rows with L_i = 0 get 0 so they contribute nothing."""
    lengths_B1 = mask_f_BT.sum(dim=1, keepdim=True)
    return torch.where(lengths_B1 > 0, 1.0 / lengths_B1.clamp_min(1.0), torch.zeros_like(lengths_B1))


def camopd_branch_loss(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    rollout_logp_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    adv_scale_B: torch.Tensor,
    *,
    num_samples_global: int,
    options: LossOptions,
    gap_BT: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CaMOPD loss of one micro-batch (module docstring) and its detached metric sums.

    Args:
        student_logp_BT: log π_θ of the sampled tokens from the training forward (carries grad).
        teacher_logp_BT: log π_T of the sampled tokens from this sample's branch teacher.
        rollout_logp_BT: log μ recorded by the rollout engine.
        response_mask_BT: 1/True on response tokens (bool or float 0/1).
        adv_scale_B: r_i per sample (r_b on samples the ρ-rule scales, 1.0 elsewhere; see
            :func:`camopd_megatron.distill.selection.plan_selection`).
        num_samples_global: the loss normaliser |S_b| over all DP ranks and micro-batches.
        options: IS bounds/mode and the advantage clip.
        gap_BT: precomputed Δ (pre-update recompute); None = teacher_logp − sg(student_logp).

    Returns:
        (loss, metrics): loss is a 0-dim fp32 tensor; metrics maps names to 0-dim float64 sums:
        ``samples`` (rows), ``tokens``, ``loss_sum`` (Σ_i of the per-sample objective, so the global
        loss is loss_sum/num_samples_global), ``gap_sum``, ``gap_sq_sum``, ``adv_sum``,
        ``adv_clipped_tokens``, ``is_weight_sum``, ``is_clipped_tokens`` (ratio outside the bounds:
        masked or clamped), ``is_low_tokens``, ``is_high_tokens``.
    """
    tensors = {
        "student_logp_BT": student_logp_BT,
        "teacher_logp_BT": teacher_logp_BT,
        "rollout_logp_BT": rollout_logp_BT,
        "response_mask_BT": response_mask_BT,
    }
    if gap_BT is not None:
        tensors["gap_BT"] = gap_BT
    _check_shapes(tensors, "student_logp_BT")
    batch = student_logp_BT.shape[0]
    if tuple(adv_scale_B.shape) != (batch,):
        raise ValueError(f"adv_scale_B: expected shape ({batch},), got {tuple(adv_scale_B.shape)}")
    _check_normaliser(num_samples_global, batch)

    mask_BT = response_mask_BT.to(torch.bool)
    mask_f_BT = mask_BT.to(torch.float32)
    zeros_BT = torch.zeros_like(mask_f_BT)
    with torch.no_grad():
        if gap_BT is None:
            gap_BT = token_gaps(teacher_logp_BT, student_logp_BT)
        gap_BT = torch.where(mask_BT, gap_BT.detach().float(), zeros_BT)
        # the clip bounds the gap, then r_i scales it: r_g = 2 doubles the clipped advantage instead of
        # halving the clip's reach (docs/algorithm.md §2)
        clipped_gap_BT = gap_BT.clamp(-options.adv_clip, options.adv_clip) if options.adv_clip is not None else gap_BT
        adv_BT = adv_scale_B.detach().float().unsqueeze(1) * clipped_gap_BT
        log_ratio_BT = torch.where(mask_BT, student_logp_BT.detach().float() - rollout_logp_BT.detach().float(), zeros_BT)
        ratio_BT = log_ratio_BT.exp()
        low_BT = (ratio_BT < options.is_low) & mask_BT
        high_BT = (ratio_BT > options.is_high) & mask_BT
        if options.is_mode == "mask":
            weight_BT = torch.where(low_BT | high_BT, zeros_BT, ratio_BT)
        else:
            weight_BT = ratio_BT.clamp(options.is_low, options.is_high)
        weight_BT = torch.where(mask_BT, weight_BT, zeros_BT)
        # 1/L_i and 1/N_global folded into one constant coefficient per token
        coef_BT = weight_BT * adv_BT * _inv_lengths(mask_f_BT)

    # where(): padding may hold NaN/-inf log-probs; coef is already 0 there, so the gradient is 0 too
    per_token_BT = torch.where(mask_BT, coef_BT * student_logp_BT.float(), zeros_BT)
    per_sample_B = -per_token_BT.sum(dim=1)
    loss = per_sample_B.sum() / float(num_samples_global)

    f64 = torch.float64
    metrics = {
        "samples": torch.tensor(float(batch), dtype=f64),
        "tokens": mask_f_BT.sum().to(f64),
        "loss_sum": per_sample_B.detach().sum().to(f64),
        "gap_sum": gap_BT.sum().to(f64),
        "gap_sq_sum": (gap_BT.to(f64) ** 2).sum(),
        "adv_sum": adv_BT.sum().to(f64),
        "adv_clipped_tokens": ((clipped_gap_BT != gap_BT) & mask_BT).sum().to(f64),
        "is_weight_sum": weight_BT.sum().to(f64),
        "is_clipped_tokens": (low_BT | high_BT).sum().to(f64),
        "is_low_tokens": low_BT.sum().to(f64),
        "is_high_tokens": high_BT.sum().to(f64),
    }
    return loss, {k: v.detach().cpu() for k, v in metrics.items()}


def reduce_metric_sums(
    metrics: Mapping[str, torch.Tensor | float], group: Optional[dist.ProcessGroup], *, device: torch.device | None = None
) -> dict[str, float]:
    """SUM ``metrics`` over ``group`` in one all-reduce (keys sorted so every rank packs the same order).

    ``group=None`` means no reduction (a single process), not the default group. Every rank of the
    group must pass the same keys. ``device``: where the packed tensor lives (a CUDA device for nccl).
    """
    keys = sorted(metrics)
    packed_M = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(packed_M, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, packed_M.tolist()))


def summarize_loss_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Means and rates from (reduced) metric sums of :func:`camopd_branch_loss`.

    Returns whichever of these the sums allow: ``loss`` (mean over samples), ``gap_mean``, ``gap_std``,
    ``adv_mean``, ``adv_clip_rate``, ``is_weight_mean``, ``is_clip_rate``, ``is_low_rate``,
    ``is_high_rate``, ``tokens``. Empty counts give NaN-free 0.
    """
    out: dict[str, float] = {}

    def ratio(num: str, den: str) -> float:
        d = float(sums.get(den, 0.0))
        return float(sums.get(num, 0.0)) / d if d > 0 else 0.0

    if "loss_sum" in sums:
        tokens = float(sums["tokens"])
        out["loss"] = ratio("loss_sum", "samples")
        out["tokens"] = tokens
        out["gap_mean"] = ratio("gap_sum", "tokens")
        out["gap_std"] = math.sqrt(max(ratio("gap_sq_sum", "tokens") - out["gap_mean"] ** 2, 0.0))
        out["adv_mean"] = ratio("adv_sum", "tokens")
        out["adv_clip_rate"] = ratio("adv_clipped_tokens", "tokens")
        out["is_weight_mean"] = ratio("is_weight_sum", "tokens")
        out["is_clip_rate"] = ratio("is_clipped_tokens", "tokens")
        out["is_low_rate"] = ratio("is_low_tokens", "tokens")
        out["is_high_rate"] = ratio("is_high_tokens", "tokens")
    return out
