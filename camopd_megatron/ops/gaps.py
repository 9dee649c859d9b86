"""Sampled-token log-prob gaps and the per-sample selection scores (docs/algorithm.md, selection).

    Δ_{i,t} = log π_T(y_{i,t}) − sg(log π_θ(y_{i,t}))            (:func:`token_gaps`)
    abs:      s(i) = (1/L_i) Σ_t |Δ_{i,t}|                          (general branch)
    positive: s(i) = (1/L_i) Σ_t max(Δ_{i,t}, 0)                    (domain branch)

L_i is the number of response tokens of sample i (the mask's row sum). A sample with L_i = 0
(an empty response) gets score 0: it carries no signal and must not produce NaN in a global
sort. Scores are computed in fp32 whatever the input dtype and never carry gradient.

Shape legend: B = samples in the batch, T = (padded) response tokens per sample.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

GapScoreKind = Literal["abs", "positive"]
GAP_SCORE_KINDS: tuple[str, ...] = ("abs", "positive")


def token_gaps(teacher_logp_BT: torch.Tensor, student_logp_BT: torch.Tensor,
               mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token gap Δ = teacher_logp − student_logp, in fp32, with both sides detached.

    The teacher side is expected to carry no gradient already (it is scored under no_grad); it is
    detached as well so Δ is always a constant advantage for the loss. With ``mask_BT`` (response
    tokens, bool or float 0/1) Δ is 0 elsewhere, whatever the log-probs hold there (``where``, so a
    NaN/inf on a padding position cannot leak).
    """
    if teacher_logp_BT.shape != student_logp_BT.shape:
        raise ValueError(
            f"student_logp_BT: shape {tuple(student_logp_BT.shape)} must equal teacher_logp_BT's "
            f"shape {tuple(teacher_logp_BT.shape)}"
        )
    gap_BT = teacher_logp_BT.detach().float() - student_logp_BT.detach().float()
    if mask_BT is None:
        return gap_BT
    if mask_BT.shape != gap_BT.shape:
        raise ValueError(f"mask_BT: shape {tuple(mask_BT.shape)} must equal teacher_logp_BT's shape {tuple(gap_BT.shape)}")
    return torch.where(mask_BT.bool(), gap_BT, torch.zeros_like(gap_BT))


def sample_gap_scores(gap_BT: torch.Tensor, mask_BT: torch.Tensor, kind: GapScoreKind) -> torch.Tensor:
    """Per-sample selection score [B] (fp32, no grad) from token gaps and a response mask.

    Args:
        gap_BT: token gaps Δ (teacher − student log-prob), any float dtype.
        mask_BT: 1/True on response tokens, 0/False on prompt/padding (bool or float 0/1).
        kind: ``"abs"`` → mean |Δ| (general branch), ``"positive"`` → mean max(Δ, 0) (domain branch).

    Returns:
        score_B where score_B[i] = Σ_t mask·f(Δ) / Σ_t mask, and 0 for rows with an empty mask.
    """
    if kind not in GAP_SCORE_KINDS:
        raise ValueError(f"kind: got {kind!r}, expected one of {GAP_SCORE_KINDS}")
    if gap_BT.dim() != 2:
        raise ValueError(f"gap_BT: expected shape [B, T], got {tuple(gap_BT.shape)}")
    if mask_BT.shape != gap_BT.shape:
        raise ValueError(f"mask_BT: shape {tuple(mask_BT.shape)} must equal gap_BT's shape {tuple(gap_BT.shape)}")
    if not gap_BT.is_floating_point():
        raise ValueError(f"gap_BT: expected a floating dtype, got {gap_BT.dtype}")
    with torch.no_grad():
        gap_BT = gap_BT.float()
        mask_f_BT = mask_BT.to(torch.float32)
        per_token_BT = gap_BT.abs() if kind == "abs" else gap_BT.clamp_min(0.0)
        # where() rather than a product so a NaN/inf gap on a padding position cannot leak in
        summed_B = torch.where(mask_f_BT > 0, per_token_BT * mask_f_BT, torch.zeros_like(per_token_BT)).sum(dim=1)
        lengths_B = mask_f_BT.sum(dim=1)
        return torch.where(lengths_B > 0, summed_B / lengths_B.clamp_min(1.0), torch.zeros_like(summed_B))
