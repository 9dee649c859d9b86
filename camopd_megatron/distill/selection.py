"""Gap-based sample selection (docs/algorithm.md §4) and the per-sample advantage scale r_i (§5).

The ρ-mass rule on one branch's samples (:func:`select_by_gap_mass`, pure):

    sort the scores s_i descending (ties: lower global sample index first);
    keep the shortest prefix whose cumulative score reaches ρ · Σ_i s_i.

Edge cases, decided here **[ours]** and relied on by the tests:
- Zero total mass (every s_i = 0, e.g. the first domain step where student == T_d): keep all.
- ρ = 1 keeps every sample, including zero-score ones (the literal rule would drop a zero-score
  tail; ``selection.rho: 1.0`` is documented as "keep all").
- "Reaches" is tested in float64 with a relative slack of 1e-9 of the total, so a prefix whose
  mass equals ρ · total up to rounding counts (0.5 + 0.3 reaches 0.8 of 1.0).
- Scores are means of |Δ| or max(Δ, 0), hence ≥ 0: a negative or non-finite score is a caller bug
  (NaN from a teacher must be caught before selection) and raises ValueError.

The step-level plan (:func:`plan_selection`) is two parts. :func:`apply_rule` gathers (score, global
index, branch) over the data-parallel group (unequal per-rank counts are padded) and applies the rule
per branch on the *global* batch — identical on every rank, so the result does not depend on the DP
size; :meth:`SelectionResult.from_rule` then decides this rank's kept rows and r_i. A gap-free policy
(:attr:`SelectionPolicy.gap_free`) decides without any score (:meth:`SelectionPolicy.gap_free_selection`);
the ρ-rule's statistics are added once the gaps are known (:meth:`SelectionResult.with_rule`). Config semantics (``selection.enabled``, ``selection.scale_only_selected``,
``loss.adv_scale``):

    rule_keep_i = the ρ-rule keeps i (within its branch)
    keep_i      = rule_keep_i if enabled else True                 (−selection: all kept)
    r_i         = r_b if (rule_keep_i or not scale_only_selected) else 1.0
    −selection −scaling = enabled: false with loss.adv_scale all 1.0.

With ``selection.scale_mode: lr`` every r_i is 1 and r_b multiplies the step's learning rate instead
(:meth:`SelectionPolicy.lr_scale`; one r per step, which the config validation guarantees).

The loss normaliser is the global kept count |S| (``SelectionResult.num_kept_global``).

Shape legend: B = samples on this rank, N = samples over the DP group.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from camopd_megatron.ops.gaps import GAP_SCORE_KINDS

__all__ = ["SelectionPolicy", "SelectionResult", "RuleOutcome", "select_by_gap_mass", "plan_selection", "apply_rule",
           "gather_scores"]

logger = logging.getLogger(__name__)

_REL_SLACK = 1e-9
"""Relative slack of the "cumulative mass reaches ρ · total" test (float64 rounding)."""


def _check_rho(rho: float, key: str = "rho") -> None:
    if not (isinstance(rho, (int, float)) and 0.0 < rho <= 1.0):
        raise ValueError(f"{key}: got {rho!r}; expected a fraction in (0, 1]. Fix: use e.g. 0.8 (1.0 keeps all)")


def _check_scores(scores_N: torch.Tensor, sample_ids_N: torch.Tensor) -> None:
    if scores_N.dim() != 1:
        raise ValueError(f"scores: expected a 1-D tensor [N], got shape {tuple(scores_N.shape)}")
    if tuple(sample_ids_N.shape) != tuple(scores_N.shape):
        raise ValueError(f"sample_ids: shape {tuple(sample_ids_N.shape)} must equal scores' shape {tuple(scores_N.shape)}")
    if sample_ids_N.is_floating_point() or sample_ids_N.is_complex():
        raise ValueError(f"sample_ids: expected an integer tensor of global sample indices, got dtype {sample_ids_N.dtype}")
    if scores_N.numel() == 0:
        return
    if not bool(torch.isfinite(scores_N).all()):
        raise ValueError(
            "scores: got a NaN/inf selection score; expected finite scores >= 0. Fix: skip the step when a "
            "teacher or the student returns non-finite log-probs (check before selection)"
        )
    if bool((scores_N < 0).any()):
        raise ValueError(
            f"scores: got a negative score ({float(scores_N.min())}); expected scores >= 0 (mean |gap| or mean "
            "max(gap, 0)). Fix: compute scores with ops.gaps.sample_gap_scores"
        )
    if torch.unique(sample_ids_N).numel() != sample_ids_N.numel():
        raise ValueError("sample_ids: got duplicate global sample indices; expected one unique index per sample. "
                         "Fix: number the samples of the step batch 0..N-1 across all DP ranks")


def select_by_gap_mass(scores: torch.Tensor, rho: float, sample_ids: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask [N] of the ρ-mass rule (module docstring) on the scores of one branch.

    Args:
        scores: per-sample scores s_i ≥ 0, any float dtype (compared in float64).
        rho: cumulative mass fraction to keep, in (0, 1].
        sample_ids: unique global sample indices (integers), same shape; ties in score are broken by
            the lower index first, so the result does not depend on the order of the inputs.

    Returns:
        keep mask aligned with ``scores`` (bool, on the CPU). Empty input → empty mask.
    """
    _check_rho(rho)
    _check_scores(scores, sample_ids)
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    scores_N = scores.detach().to("cpu", torch.float64)
    ids_N = sample_ids.detach().to("cpu", torch.int64)
    total = float(scores_N.sum())
    if total <= 0.0 or rho >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    # order: by id ascending, then a stable sort by score descending keeps ids ascending among ties
    by_id_N = torch.argsort(ids_N)
    by_score_N = torch.sort(scores_N[by_id_N], descending=True, stable=True).indices
    order_N = by_id_N[by_score_N]
    cum_N = torch.cumsum(scores_N[order_N], dim=0)
    target = rho * total - _REL_SLACK * total
    reached_N = cum_N >= target
    # the last element always reaches (cum = total >= rho · total), so argmax finds a True
    count = int(torch.argmax(reached_N.to(torch.int8))) + 1
    keep_N = torch.zeros(n, dtype=torch.bool)
    keep_N[order_N[:count]] = True
    return keep_N


@dataclass(frozen=True)
class SelectionPolicy:
    """What :func:`plan_selection` does per branch (``selection.*`` and ``loss.adv_scale``)."""

    enabled: bool
    """Keep only the ρ-rule's samples (``selection.enabled``); false keeps all."""
    rho: Mapping[str, float]
    """Branch → ρ_b (``selection.rho``)."""
    score: Mapping[str, str]
    """Branch → score kind ``abs`` / ``positive`` (``selection.score``); used by the caller for
    :func:`camopd_megatron.ops.gaps.sample_gap_scores`."""
    adv_scale: Mapping[str, float]
    """Branch → r_b (``loss.adv_scale``)."""
    scale_only_selected: bool = True
    """r_b only on the samples the ρ-rule keeps (``selection.scale_only_selected``); else on all."""
    scale_mode: str = "advantage"
    """``advantage``: r_b scales the advantage (r_i); ``lr``: r_i = 1 and r_b scales the step's learning
    rate (``selection.scale_mode``)."""

    def __post_init__(self) -> None:
        if self.scale_mode not in ("advantage", "lr"):
            raise ValueError(f"selection.scale_mode: got {self.scale_mode!r}; expected 'advantage' or 'lr'. "
                             "Fix: use 'advantage' (the paper's formula)")
        for b, rho in self.rho.items():
            _check_rho(rho, f"selection.rho.{b}")
        for b, kind in self.score.items():
            if kind not in GAP_SCORE_KINDS:
                raise ValueError(f"selection.score.{b}: got {kind!r}; expected one of {GAP_SCORE_KINDS}. Fix: use 'abs' "
                                 "(general) or 'positive' (domain)")
        for b, r in self.adv_scale.items():
            if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
                raise ValueError(f"loss.adv_scale.{b}: got {r!r}; expected a finite scale > 0. Fix: use 1.0 for no scaling")

    @classmethod
    def from_config(cls, selection_cfg: object, loss_cfg: object) -> "SelectionPolicy":
        """Build from ``cfg.selection`` (:class:`SelectionConfig`) and ``cfg.loss`` (:class:`LossConfig`)."""
        return cls(
            enabled=bool(getattr(selection_cfg, "enabled")),
            rho=dict(getattr(selection_cfg, "rho")),
            score=dict(getattr(selection_cfg, "score")),
            adv_scale={k: float(v) for k, v in getattr(loss_cfg, "adv_scale").items()},
            scale_only_selected=bool(getattr(selection_cfg, "scale_only_selected")),
            scale_mode=str(getattr(selection_cfg, "scale_mode")),
        )

    @property
    def branches(self) -> list[str]:
        """Every branch with a ρ, a score kind and a scale (sorted: the wire code of a branch)."""
        return sorted(set(self.rho) & set(self.score) & set(self.adv_scale))

    def _require(self, branch: str) -> None:
        for key, mapping in (("selection.rho", self.rho), ("selection.score", self.score), ("loss.adv_scale", self.adv_scale)):
            if branch not in mapping:
                raise ValueError(f"{key}: got no value for branch {branch!r} (have {sorted(mapping)}). Fix: add {key}.{branch}")

    @property
    def gap_free(self) -> bool:
        """True when no sample's fate depends on the gaps: selection off and r_i = r_b on every sample
        (``scale_only_selected`` off, or every r_b = 1). Then the step needs no gap before training."""
        return not self.enabled and (not self.scale_only_selected or self.scale_mode == "lr"
                                     or all(r == 1.0 for r in self.adv_scale.values()))

    def advantage_scale(self, branch: str) -> float:
        """r_b as a factor of the advantage: r_b under ``scale_mode: advantage``, 1 under ``lr``."""
        self._require(branch)
        return float(self.adv_scale[branch]) if self.scale_mode == "advantage" else 1.0

    def lr_scale(self, branches: Sequence[str]) -> float:
        """The factor on the learning rate of a step over ``branches``: 1 under ``scale_mode: advantage``;
        under ``lr`` their common r_b (ValueError when they differ: one step has one learning rate)."""
        if self.scale_mode == "advantage" or not branches:
            return 1.0
        for b in branches:
            self._require(b)
        scales = {float(self.adv_scale[b]) for b in branches}
        if len(scales) != 1:
            raise ValueError(f"selection.scale_mode: lr needs one loss.adv_scale for the step's branches {list(branches)}, "
                             f"got {sorted(scales)}. Fix: equal scales, or scale_mode: advantage")
        return scales.pop()

    def score_kind(self, branch: str) -> str:
        """The score kind of ``branch`` (``abs`` or ``positive``)."""
        self._require(branch)
        return self.score[branch]

    def gap_free_selection(self, branches_B: Sequence[str], group: Optional[dist.ProcessGroup]) -> "SelectionResult":
        """The selection of a gap-free policy, known before any gap: every sample kept with r_i = r_b
        (what :func:`plan_selection` decides for any scores under this policy). Collective over
        ``group`` (one all-reduce of the per-branch sample counts). The ρ-rule statistics follow with
        :meth:`SelectionResult.with_rule` once the gaps are known."""
        if not self.gap_free:
            raise ValueError("gap_free_selection: this selection policy depends on the gaps (selection.enabled, or "
                             "r_b != 1 with selection.scale_only_selected); plan it with plan_selection")
        for b in dict.fromkeys(branches_B):
            self._require(b)
        known = self.branches
        counts_K = torch.zeros(len(known), dtype=torch.int64)
        for b in branches_B:
            counts_K[known.index(b)] += 1
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts_K, group=group)
        scale_B = torch.tensor([self.advantage_scale(b) for b in branches_B], dtype=torch.float32)
        return SelectionResult.keep_all(scale_B, {b: int(c) for b, c in zip(known, counts_K.tolist()) if c > 0})


@dataclass
class SelectionResult:
    """The selection of one optimizer step, from the view of one DP rank."""

    keep_B: torch.Tensor
    """bool [B]: this rank's samples that enter the loss."""
    rule_keep_B: torch.Tensor
    """bool [B]: this rank's samples the ρ-rule keeps (= keep_B when selection is enabled)."""
    adv_scale_B: torch.Tensor
    """float32 [B]: r_i per local sample (pass ``adv_scale_B[keep_B]`` to the loss)."""
    num_kept_global: int
    """|S|: kept samples over the DP group (all branches) — the loss normaliser."""
    num_samples_global: int
    """Samples over the DP group."""
    branch_kept: dict[str, int]
    """Branch → kept samples over the DP group (branches present in the step only)."""
    branch_rule_kept: dict[str, int]
    """Branch → samples the ρ-rule keeps over the DP group (the paper's "kept fraction" numerator)."""
    branch_samples: dict[str, int]
    """Branch → samples over the DP group."""
    branch_mass_kept: dict[str, float]
    """Branch → fraction of the branch's score mass on the ρ-rule's kept samples (1.0 for zero mass)."""

    @classmethod
    def keep_all(cls, adv_scale_B: torch.Tensor, branch_samples: Mapping[str, int]) -> "SelectionResult":
        """Every sample kept with the given r_i (no ρ-rule: its statistics say "all kept, all mass").

        ``branch_samples``: samples per branch over the DP group (their sum is |S|). Used for a gap-free
        policy (:meth:`SelectionPolicy.gap_free_selection`) and by the conflict probe (every sample, r = 1).
        """
        n = int(adv_scale_B.numel())
        counts = {b: int(c) for b, c in branch_samples.items()}
        total = sum(counts.values())
        keep_B = torch.ones(n, dtype=torch.bool, device=adv_scale_B.device)
        return cls(keep_B=keep_B, rule_keep_B=keep_B.clone(), adv_scale_B=adv_scale_B.float(), num_kept_global=total,
                   num_samples_global=total, branch_kept=dict(counts), branch_rule_kept=dict(counts),
                   branch_samples=dict(counts), branch_mass_kept={b: 1.0 for b in counts})

    @classmethod
    def from_rule(cls, rule: "RuleOutcome", policy: SelectionPolicy) -> "SelectionResult":
        """Keep and r_i of this rank's samples from the ρ-rule's outcome (module docstring)."""
        rule_keep_N, codes_N, known = rule.rule_keep_N, rule.codes_N, policy.branches
        scale_N = torch.ones(rule_keep_N.numel(), dtype=torch.float32)
        for code in sorted(set(codes_N.tolist())):
            rows = (codes_N == code).nonzero().flatten()
            r = policy.advantage_scale(known[code])
            keep = rule_keep_N[rows]
            scale_N[rows] = torch.where(keep | (not policy.scale_only_selected), torch.tensor(r), torch.tensor(1.0))
        keep_N = rule_keep_N if policy.enabled else torch.ones_like(rule_keep_N)
        branch_kept = {
            b: (rule.branch_rule_kept[b] if policy.enabled else rule.branch_samples[b]) for b in rule.branch_samples
        }
        logger.debug("selection: kept %d/%d (rule kept %s of %s)", int(keep_N.sum()), keep_N.numel(),
                     rule.branch_rule_kept, rule.branch_samples)
        return cls(
            keep_B=keep_N[rule.mine].to(rule.device),
            rule_keep_B=rule_keep_N[rule.mine].to(rule.device),
            adv_scale_B=scale_N[rule.mine].to(rule.device),
            num_kept_global=int(keep_N.sum()),
            num_samples_global=int(keep_N.numel()),
            branch_kept=branch_kept,
            branch_rule_kept=dict(rule.branch_rule_kept),
            branch_samples=dict(rule.branch_samples),
            branch_mass_kept=dict(rule.branch_mass_kept),
        )

    def with_rule(self, rule: "RuleOutcome") -> "SelectionResult":
        """This selection (kept rows, r_i, |S| unchanged) with the ρ-rule's statistics of ``rule``: the
        metrics of a gap-free selection once the gaps are known."""
        return dataclasses.replace(
            self, rule_keep_B=rule.rule_keep_N[rule.mine].to(rule.device),
            branch_rule_kept=dict(rule.branch_rule_kept), branch_mass_kept=dict(rule.branch_mass_kept))

    @property
    def kept_fraction(self) -> float:
        """|S| / N over the DP group (1.0 for an empty step)."""
        return self.num_kept_global / self.num_samples_global if self.num_samples_global else 1.0

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging: ``kept_fraction``, ``kept``, and per branch ``<b>/kept_fraction``,
        ``<b>/rule_kept_fraction``, ``<b>/mass_kept``."""
        out = {"kept_fraction": self.kept_fraction, "kept": float(self.num_kept_global)}
        for b, n in self.branch_samples.items():
            out[f"{b}/kept_fraction"] = self.branch_kept[b] / n if n else 1.0
            out[f"{b}/rule_kept_fraction"] = self.branch_rule_kept[b] / n if n else 1.0
            out[f"{b}/mass_kept"] = self.branch_mass_kept[b]
        return out


def gather_scores(
    scores_B: torch.Tensor, sample_ids_B: torch.Tensor, codes_B: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """All-gather (score, global index, branch code) over ``group``, padding unequal per-rank counts.

    Two collectives on the scores' device: the per-rank counts, then one float64 [max_B, 3] block
    per rank (exact for indices < 2**53 and for fp32 scores). ``group=None`` = a single process.

    Returns (scores_N float64, ids_N int64, codes_N int64, counts): rank-major order, all on the CPU.
    """
    device = scores_B.device
    packed_B3 = torch.stack(
        [scores_B.detach().to(torch.float64), sample_ids_B.to(device, torch.float64), codes_B.to(device, torch.float64)], dim=1
    )
    if group is None or dist.get_world_size(group) == 1:
        cpu = packed_B3.cpu()
        return cpu[:, 0], cpu[:, 1].to(torch.int64), cpu[:, 2].to(torch.int64), [scores_B.numel()]
    world = dist.get_world_size(group)
    count_1 = torch.tensor([scores_B.numel()], dtype=torch.int64, device=device)
    counts_W = [torch.zeros_like(count_1) for _ in range(world)]
    dist.all_gather(counts_W, count_1, group=group)
    counts = [int(c.item()) for c in counts_W]
    width = max(max(counts), 1)
    padded_B3 = torch.zeros(width, 3, dtype=torch.float64, device=device)
    padded_B3[: scores_B.numel()] = packed_B3
    blocks = [torch.zeros_like(padded_B3) for _ in range(world)]
    dist.all_gather(blocks, padded_B3, group=group)
    all_N3 = torch.cat([blk[:n] for blk, n in zip(blocks, counts)], dim=0).cpu()
    return all_N3[:, 0], all_N3[:, 1].to(torch.int64), all_N3[:, 2].to(torch.int64), counts


@dataclass
class RuleOutcome:
    """The ρ-rule applied per branch to the scores of the whole DP group (:func:`apply_rule`)."""

    rule_keep_N: torch.Tensor
    """bool [N]: the samples the ρ-rule keeps, rank-major over the DP group (CPU)."""
    codes_N: torch.Tensor
    """int64 [N]: each sample's branch as an index into ``SelectionPolicy.branches``."""
    mine: slice
    """This rank's rows of the N."""
    device: torch.device
    """Where this rank's scores were (its per-sample results go there)."""
    branch_samples: dict[str, int]
    branch_rule_kept: dict[str, int]
    branch_mass_kept: dict[str, float]


def apply_rule(
    scores_B: torch.Tensor,
    sample_ids_B: torch.Tensor,
    branches_B: Sequence[str],
    policy: SelectionPolicy,
    group: Optional[dist.ProcessGroup],
) -> RuleOutcome:
    """Gather this rank's scores over ``group`` and apply the ρ-mass rule per branch (collective).

    Args: as :func:`plan_selection`.
    """
    if len(branches_B) != scores_B.numel():
        raise ValueError(f"branches_B: got {len(branches_B)} names for {scores_B.numel()} scores; expected one branch per sample")
    known = policy.branches
    for b in dict.fromkeys(branches_B):
        policy._require(b)
    codes_B = torch.tensor([known.index(b) for b in branches_B], dtype=torch.int64)
    if scores_B.dim() != 1:
        raise ValueError(f"scores_B: expected a 1-D tensor [B], got shape {tuple(scores_B.shape)}")
    scores_N, ids_N, codes_N, counts = gather_scores(scores_B, sample_ids_B, codes_B, group)
    if torch.unique(ids_N).numel() != ids_N.numel():
        raise ValueError("sample_ids_B: got duplicate global sample indices over the DP group; expected unique "
                         "indices. Fix: number the step batch 0..N-1 across all DP ranks (e.g. dp_rank * B + i)")

    rule_keep_N = torch.zeros(ids_N.numel(), dtype=torch.bool)
    branch_samples: dict[str, int] = {}
    branch_rule_kept: dict[str, int] = {}
    branch_mass: dict[str, float] = {}
    for code in sorted(set(codes_N.tolist())):
        b = known[code]
        rows = (codes_N == code).nonzero().flatten()
        keep = select_by_gap_mass(scores_N[rows], float(policy.rho[b]), ids_N[rows])
        rule_keep_N[rows] = keep
        total = float(scores_N[rows].sum())
        branch_samples[b] = rows.numel()
        branch_rule_kept[b] = int(keep.sum())
        branch_mass[b] = float(scores_N[rows][keep].sum()) / total if total > 0 else 1.0
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    start = sum(counts[:rank])
    return RuleOutcome(rule_keep_N=rule_keep_N, codes_N=codes_N, mine=slice(start, start + counts[rank]),
                       device=scores_B.device, branch_samples=branch_samples, branch_rule_kept=branch_rule_kept,
                       branch_mass_kept=branch_mass)


def plan_selection(
    scores_B: torch.Tensor,
    sample_ids_B: torch.Tensor,
    branches_B: Sequence[str],
    policy: SelectionPolicy,
    group: Optional[dist.ProcessGroup],
) -> SelectionResult:
    """Global ρ-mass selection and per-sample r_i for one optimizer step (module docstring).

    Args:
        scores_B: this rank's per-sample scores (from ``sample_gap_scores`` with
            ``policy.score_kind(branch)``), ≥ 0 and finite.
        sample_ids_B: this rank's global sample indices in the step batch (unique over the group;
            the tie-break order).
        branches_B: the branch of each local sample (one name repeated in alternating mode; several
            in a mixed batch, each branch selected within itself with its own ρ_b).
        policy: :class:`SelectionPolicy` from the config.
        group: the student's data-parallel group (every rank of it must call); None = one process.

    Returns:
        :class:`SelectionResult`; identical global numbers on every rank of ``group``.
    """
    return SelectionResult.from_rule(apply_rule(scores_B, sample_ids_B, branches_B, policy, group), policy)
