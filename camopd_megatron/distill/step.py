"""One CaMOPD optimizer step, reading like the algorithm (CAMOPD.md §2, §4; ARCHITECTURE.md step 1-5).

    plan     = scheduler.next_plan()                     which branch(es), how many prompts
    prompts  = draw(plan)                                global batch, this DP replica's slice
    rollout  = generate(student, prompts)                responses + μ (rollout log-probs)
    teacher  = teachers.score(branch, rollout)           log π_T, one float per token
    student  = recompute(student, rollout)               log π_θ before the update (no grad)
    Δ, s_i   = teacher − student, per-sample scores      mean |Δ| (general) / mean max(Δ,0) (domain)
    S        = select(s, ρ) over all DP ranks            global ρ-mass prefix; r_i per sample
    update   = Σ_micro-batches ∇ L(S) ; optimizer.step   loss normalised by the global |S|

Fused recompute. When the selection does not depend on the gaps (``SelectionPolicy.gap_free``: selection
off and r_i = r_b for every sample, e.g. ``vanilla_mopd``), nothing needs log π_θ before training, and
the pre-update log π_θ IS the training forward's detached log-prob (same weights, no update until every
micro-batch is done). The no-grad recompute forward is then skipped: the loss takes Δ from the training
forward, which also returns it for the selection metrics (the plan is computed before training from
the branches alone and re-checked against the gaps after).

Every rank of the student role runs this function; collectives inside: rollout (the replica's TP/PP
groups), teacher scoring (student ↔ teacher groups), selection (DP group), the pipeline schedule and
DDP (role groups), metric reduction (role group). Shapes: B samples on this replica, T tokens.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from camopd_megatron.distill.losses import LossOptions, camopd_branch_loss, reduce_metric_sums, summarize_loss_metrics
from camopd_megatron.distill.rollout import RolloutBatch, SamplingParams, generate
from camopd_megatron.distill.scheduler import StepPlan
from camopd_megatron.distill.selection import SelectionPolicy, plan_selection
from camopd_megatron.models.gpt import output_weight, stage_info, unwrap_model
from camopd_megatron.models.logprobs import next_token_logprobs
from camopd_megatron.models.optimizer import optimizer_step, zero_grad_buffers
from camopd_megatron.models.pipeline import output_window, run_microbatches
from camopd_megatron.ops.gaps import sample_gap_scores

logger = logging.getLogger(__name__)


class NonFiniteTeacherError(RuntimeError):
    """A teacher returned NaN/inf log-probs on response tokens."""


class StageTimer:
    """Wall-clock seconds per named stage of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class StudentState:
    """Everything the step needs about the student on this rank."""

    ddp_model: Any
    """The megatron-DDP-wrapped model chunk (training forward/backward)."""
    ddp_chunks: list
    optimizer: Any
    lr_scheduler: Any
    pg_collection: Any
    role_group: Any
    """All ranks of the student role (metric reduction)."""
    vocab_size: int
    max_seq_len: int

    @property
    def model(self) -> Any:
        """The bare GPTModel (rollout, no-grad recompute)."""
        return unwrap_model(self.ddp_model)

    @property
    def dp_group(self) -> Any:
        return self.pg_collection.dp

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.pg_collection.dp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.pg_collection.dp)


@dataclass
class StepSettings:
    """Algorithm settings of the step (from the config, resolved once)."""

    sampling: SamplingParams
    policy: SelectionPolicy
    loss_options: LossOptions
    seed: int
    micro_batch_size: int
    rollout_micro_batch_size: int
    use_kv_cache: bool = True
    recompute_student: bool = True
    """``selection.student_logprobs == "recompute"``; False uses μ for the gaps."""


@dataclass
class StepOutput:
    """What one step produced (metrics are identical on every rank of the student role)."""

    step: int
    plan: StepPlan
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def draw_prompts(sources: dict[str, Any], plan: StepPlan, dp_rank: int, dp_size: int
                 ) -> tuple[list[list[int]], list[str], list[int]]:
    """The step's global prompt batch (branches in plan order, sample ids 0..N-1) and this
    replica's contiguous slice of it: (prompt ids, branch per sample, global sample ids)."""
    ids: list[list[int]] = []
    branches: list[str] = []
    for branch, n in plan.prompts.items():
        if n <= 0:
            continue
        for p in sources[branch].next_batch(n):
            ids.append(list(p.ids))
            branches.append(branch)
    total = len(ids)
    lo, hi = (dp_rank * total) // dp_size, ((dp_rank + 1) * total) // dp_size
    return ids[lo:hi], branches[lo:hi], list(range(lo, hi))


def broadcast_from_last_stage(t: torch.Tensor, pg_collection: Any) -> torch.Tensor:
    """Give every pipeline stage of the replica the last stage's tensor (same shape/dtype known)."""
    stage = stage_info(pg_collection)
    if stage.pp_size == 1:
        return t
    src = dist.get_global_rank(pg_collection.pp, stage.pp_size - 1)
    t = t.contiguous()
    dist.broadcast(t, src=src, group=pg_collection.pp)
    return t


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    pad = torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def make_microbatches(tensors: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, Any]]:
    """Split [B, ...] tensors into equal-shape micro-batches (the pipeline needs one shape).

    The last micro-batch is padded with zero rows; ``n_real`` says how many rows count. B = 0 gives
    one all-padding micro-batch so this rank still joins the schedule's collectives. With a ``mask``
    (aligned with the outputs), each micro-batch gets the ``output_window`` of its scored positions
    (the model then returns final hidden states of those positions; see ``models.pipeline``).
    """
    b = next(iter(tensors.values())).shape[0]
    mbs = max(1, min(micro_batch_size, b)) if b else 1
    out = []
    for lo in range(0, max(b, 1), mbs):
        mb = {k: _pad_rows(v[lo:lo + mbs], mbs) for k, v in tensors.items()}
        mb["n_real"] = max(0, min(mbs, b - lo))
        if "mask" in mb:
            mb["output_window"] = output_window(mb["mask"])
        out.append(mb)
    return out


def recompute_logprobs(student: StudentState, batch: RolloutBatch, micro_batch_size: int,
                       temperature: float) -> torch.Tensor:
    """log π_θ of the rollout tokens before the update (no grad), [B, T] on every stage."""
    tokens = batch.tokens_BT
    if tokens.shape[0] == 0:
        return torch.zeros(tokens.shape, dtype=torch.float32)
    tp = student.pg_collection.tp
    mbs = make_microbatches({"tokens": tokens, "mask": batch.loss_mask_BT}, micro_batch_size)

    def loss_fn(mb: dict[str, Any], hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logp = next_token_logprobs(hidden, mb["tokens"], tp, vocab_size=student.vocab_size, temperature=temperature,
                                   mask_BT=mb["mask"], first_position=mb["output_window"][0], output_weight=weight)
        return hidden.new_zeros(()), {"logp": logp[: mb["n_real"]]}

    model = student.model
    weight = output_weight(model) if stage_info(student.pg_collection).is_last else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = run_microbatches(model, student.pg_collection, mbs, loss_fn, forward_only=True)
    finally:
        model.train(was_training)
    logp = torch.cat([o["logp"] for o in outs], 0) if outs else torch.zeros(tokens.shape, dtype=torch.float32)
    return broadcast_from_last_stage(logp, student.pg_collection)


def sample_scores(gap_BT: torch.Tensor, mask_BT: torch.Tensor, branches: Sequence[str],
                  policy: SelectionPolicy) -> torch.Tensor:
    """Per-sample score with each sample's branch kind (mean |Δ| or mean max(Δ, 0))."""
    scores = torch.zeros(gap_BT.shape[0], dtype=torch.float32)
    for kind in {policy.score_kind(b) for b in branches}:
        rows = torch.tensor([policy.score_kind(b) == kind for b in branches], dtype=torch.bool)
        scores[rows] = sample_gap_scores(gap_BT[rows], mask_BT[rows], kind).float()
    return scores


def score_with_teachers(client: Any, plan: StepPlan, batch: RolloutBatch, branches: Sequence[str]) -> torch.Tensor:
    """log π_T [B, T] from each sample's branch teacher. Every branch of the plan is requested in
    plan order on every rank (possibly with zero rows), so the teacher protocol stays in step."""
    out = torch.zeros(batch.tokens_BT.shape, dtype=torch.float32)
    for branch in plan.branches:
        rows = torch.tensor([b == branch for b in branches], dtype=torch.bool)
        idx = rows.nonzero().flatten()
        sub = batch.select(idx.tolist()) if idx.numel() else None
        tokens = sub.tokens_BT if sub is not None else torch.zeros((0, 1), dtype=torch.int64)
        mask = sub.loss_mask_BT if sub is not None else torch.zeros((0, 1), dtype=torch.float32)
        logp = client.score(branch, tokens, mask)
        if idx.numel():
            out[idx, : logp.shape[1]] = logp.float()
    return out


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------
def camopd_step(
    step: int,
    plan: StepPlan,
    student: StudentState,
    teachers: Any,
    sources: dict[str, Any],
    settings: StepSettings,
) -> StepOutput:
    """Run one optimizer step (see the module docstring); returns role-wide metrics."""
    timer = StageTimer()
    t_start = time.perf_counter()
    with timer("data"):
        prompts, branches, sample_ids = draw_prompts(sources, plan, student.dp_rank, student.dp_size)
    with timer("rollout"):
        batch = generate(
            student.model, student.pg_collection, prompts, settings.sampling, sample_ids=sample_ids,
            seed=settings.seed, step=step, vocab_size=student.vocab_size, max_seq_len=student.max_seq_len,
            use_kv_cache=settings.use_kv_cache, micro_batch_size=settings.rollout_micro_batch_size,
        ) if prompts else None
    batch = batch if batch is not None else RolloutBatch.empty()
    mask_BT = batch.loss_mask_BT
    with timer("teacher"):
        teacher_logp_BT = score_with_teachers(teachers, plan, batch, branches)
    bad = ~torch.isfinite(teacher_logp_BT) & mask_BT.bool()
    n_bad = torch.tensor([float(bad.sum())])
    dist.all_reduce(n_bad, group=student.role_group)
    if n_bad.item() > 0:
        return StepOutput(step, plan, {"teacher_nonfinite_tokens": n_bad.item()}, skipped=True)
    ids_B = torch.tensor(sample_ids, dtype=torch.int64)
    fused = settings.recompute_student and settings.policy.gap_free
    if fused:  # Δ comes out of the training forward (module docstring)
        with timer("select"):
            sel = plan_selection(torch.zeros(len(branches)), ids_B, branches, settings.policy, student.dp_group)
        with timer("train"):
            loss_sums, student_logp_BT = train_on_selection(student, batch, teacher_logp_BT, None, sel, settings)
        gap_BT = _gaps(teacher_logp_BT, student_logp_BT, mask_BT)
        with timer("select"):
            sel = _replan_gap_free(sel, sample_scores(gap_BT, mask_BT, branches, settings.policy), ids_B, branches,
                                   settings.policy, student.dp_group)
    else:
        with timer("recompute"):
            if settings.recompute_student:
                student_logp_BT = recompute_logprobs(student, batch, settings.micro_batch_size,
                                                     settings.sampling.logprob_temperature)
            else:
                student_logp_BT = batch.rollout_logp_BT
        gap_BT = _gaps(teacher_logp_BT, student_logp_BT, mask_BT)
        with timer("select"):
            scores_B = sample_scores(gap_BT, mask_BT, branches, settings.policy)
            sel = plan_selection(scores_B, ids_B, branches, settings.policy, student.dp_group)
        with timer("train"):
            loss_sums, _ = train_on_selection(student, batch, teacher_logp_BT, gap_BT, sel, settings)
    with timer("optimizer"):
        ok, grad_norm, _ = optimizer_step(student.optimizer, student.lr_scheduler)
    metrics = _step_metrics(student, batch, branches, gap_BT, sel, loss_sums, timer, t_start)
    metrics.update(grad_norm=float(grad_norm or 0.0), lr=float(student.lr_scheduler.get_lr()),
                   update_skipped=float(not ok), phase=float(plan.phase))
    return StepOutput(step, plan, metrics, skipped=not ok)


def _gaps(teacher_logp_BT: torch.Tensor, student_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Δ = log π_T − log π_θ on response tokens, 0 elsewhere."""
    return torch.where(mask_BT.bool(), teacher_logp_BT - student_logp_BT, torch.zeros_like(mask_BT))


def _replan_gap_free(sel: Any, scores_B: torch.Tensor, ids_B: torch.Tensor, branches: Sequence[str],
                     policy: SelectionPolicy, dp_group: Any) -> Any:
    """The selection plan with the real gap scores (its metrics), checked against the gap-free plan the
    step trained on: the kept set and every r_i must be the same."""
    real = plan_selection(scores_B, ids_B, branches, policy, dp_group)
    if not (torch.equal(real.keep_B, sel.keep_B) and torch.equal(real.adv_scale_B, sel.adv_scale_B)):
        raise RuntimeError("fused recompute: the selection plan depends on the gaps although the policy is gap-free; "
                           "this is a bug — set selection.student_logprobs: rollout to bypass it and report it")
    return real


def train_on_selection(student: StudentState, batch: RolloutBatch, teacher_logp_BT: torch.Tensor,
                       gap_BT: Optional[torch.Tensor], sel: Any, settings: StepSettings
                       ) -> tuple[dict[str, float], torch.Tensor]:
    """Forward/backward of the kept samples in micro-batches.

    ``gap_BT=None`` takes Δ from the training forward (fused recompute; every sample must be kept).
    Returns this rank's loss metric sums (last stage, TP rank 0 only, so a SUM over the role counts every
    sample once) and the training forward's detached log π_θ of the kept rows, ``[kept, T]`` on every
    pipeline stage when ``gap_BT`` is None (an empty tensor otherwise: nothing is broadcast).
    """
    keep = sel.keep_B.nonzero().flatten()
    fused = gap_BT is None
    if fused and keep.numel() != sel.keep_B.numel():
        raise ValueError("train_on_selection: gap_BT=None (Δ from the training forward) needs every sample kept")
    tensors = {
        "tokens": batch.tokens_BT[keep], "mask": batch.loss_mask_BT[keep], "mu": batch.rollout_logp_BT[keep],
        "teacher": teacher_logp_BT[keep], "scale": sel.adv_scale_B[keep].float(),
    }
    if not fused:
        tensors["gap"] = gap_BT[keep]
    if not tensors["tokens"].shape[1]:
        tensors = {k: (v if v.dim() == 1 else v.new_zeros((v.shape[0], 1))) for k, v in tensors.items()}
    tp = student.pg_collection.tp
    n_global = max(sel.num_kept_global, 1)
    temperature = settings.sampling.logprob_temperature
    sums: dict[str, float] = {}

    weight = output_weight(student.model) if stage_info(student.pg_collection).is_last else None

    def loss_fn(mb: dict[str, Any], hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        n = mb["n_real"]
        if n == 0:  # a rank with nothing kept still runs the schedule (DDP/pipeline collectives)
            return (hidden.sum() + weight.sum()) * 0.0, {}
        logp = next_token_logprobs(hidden[:n], mb["tokens"][:n], tp, vocab_size=student.vocab_size,
                                   temperature=temperature, mask_BT=mb["mask"][:n], first_position=mb["output_window"][0],
                                   output_weight=weight)
        loss, m = camopd_branch_loss(
            logp, mb["teacher"][:n], mb["mu"][:n], mb["mask"][:n], mb["scale"][:n],
            num_samples_global=n_global, options=settings.loss_options, gap_BT=mb["gap"][:n] if not fused else None,
        )
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        return loss, ({"logp": logp.detach()} if fused else {})

    zero_grad_buffers(student.ddp_chunks, student.optimizer)
    student.ddp_model.train()
    outs = run_microbatches(student.ddp_model, student.pg_collection,
                            make_microbatches(tensors, settings.micro_batch_size), loss_fn, forward_only=False)
    logp_BT = torch.zeros((0,) + tuple(tensors["tokens"].shape[1:]), dtype=torch.float32)
    if fused:
        shape = tuple(batch.tokens_BT.shape)
        parts = [o["logp"] for o in outs if "logp" in o]  # an all-padding micro-batch (B = 0) has none
        logp_BT = torch.cat(parts, 0) if parts else torch.zeros(shape, dtype=torch.float32)
        logp_BT = broadcast_from_last_stage(logp_BT.float(), student.pg_collection)
    return (sums if dist.get_rank(tp) == 0 else {}), logp_BT


_LOSS_KEYS = ("samples", "tokens", "loss_sum", "gap_sum", "gap_sq_sum", "adv_sum", "adv_clipped_tokens",
              "is_weight_sum", "is_clipped_tokens", "is_low_tokens", "is_high_tokens")


def _step_metrics(student: StudentState, batch: RolloutBatch, branches: Sequence[str], gap_BT: torch.Tensor,
                  sel: Any, loss_sums: dict[str, float], timer: StageTimer, t_start: float) -> dict[str, float]:
    """Role-wide metrics: one SUM all-reduce over the student role of per-replica partial sums."""
    # rollout-side numbers are identical on every rank of a replica: count them on its first rank only
    first_of_replica = dist.get_rank(student.pg_collection.tp) == 0 and stage_info(student.pg_collection).is_first
    w = 1.0 if first_of_replica else 0.0
    sums: dict[str, float] = {f"train/{k}": float(loss_sums.get(k, 0.0)) for k in _LOSS_KEYS}
    mask = batch.loss_mask_BT.bool()
    sums["rollout/samples"] = w * batch.tokens_BT.shape[0]
    sums["rollout/response_tokens"] = w * float(batch.response_lens_B.sum())
    sums["rollout/tokens"] = w * float((batch.prompt_lens_B + batch.response_lens_B).sum())
    sums["rollout/eos"] = w * sum(r != "length" for r in batch.finish_reasons)
    for b in sorted(sel.branch_samples):
        rows = torch.tensor([x == b for x in branches], dtype=torch.bool)
        g = gap_BT[rows][mask[rows]].double()
        sums[f"gap/{b}/sum"] = w * float(g.sum())
        sums[f"gap/{b}/sq_sum"] = w * float((g * g).sum())
        sums[f"gap/{b}/tokens"] = w * float(g.numel())
    red = reduce_metric_sums(sums, student.role_group)
    out: dict[str, float] = {}
    loss_part = summarize_loss_metrics({k.removeprefix("train/"): v for k, v in red.items() if k.startswith("train/")})
    out.update({f"train/{k}": v for k, v in loss_part.items()})
    n = max(red["rollout/samples"], 1.0)
    out["rollout/response_len_mean"] = red["rollout/response_tokens"] / n
    out["rollout/eos_fraction"] = red["rollout/eos"] / n
    out["rollout/samples"] = red["rollout/samples"]
    for b in sorted(sel.branch_samples):
        t = max(red[f"gap/{b}/tokens"], 1.0)
        mean = red[f"gap/{b}/sum"] / t
        out[f"gap/{b}/mean"] = mean
        out[f"gap/{b}/std"] = math.sqrt(max(red[f"gap/{b}/sq_sum"] / t - mean * mean, 0.0))
    out.update({f"select/{k}": v for k, v in sel.metrics().items()})
    elapsed = time.perf_counter() - t_start
    out.update({f"time/{k}": v for k, v in timer.seconds.items()})
    out["time/step"] = elapsed
    out["throughput/train_tokens_per_s"] = red["rollout/tokens"] / max(elapsed, 1e-9)
    out["throughput/generated_tokens_per_s"] = red["rollout/response_tokens"] / max(timer.seconds.get("rollout", 0.0), 1e-9)
    return out


def settings_from_config(cfg: Any, eos_token_id: Optional[int]) -> StepSettings:
    """Resolve the algorithm settings of :func:`camopd_step` from the config."""
    return StepSettings(
        sampling=SamplingParams.from_config(cfg.rollout, eos_token_id),
        policy=SelectionPolicy.from_config(cfg.selection, cfg.loss),
        loss_options=LossOptions.from_config(cfg.loss),
        seed=cfg.run.seed,
        micro_batch_size=cfg.optim.micro_batch_size,
        rollout_micro_batch_size=cfg.rollout.micro_batch_size,
        use_kv_cache=cfg.rollout.use_kv_cache,
        recompute_student=cfg.selection.student_logprobs == "recompute",
    )
