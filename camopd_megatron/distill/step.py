"""One CaMOPD optimizer step, reading like the algorithm (docs/algorithm.md; docs/architecture.md, one step).

    plan     = scheduler.next_plan()                     which branch(es), how many prompts
    prompts  = draw(plan)                                global batch, this DP replica's slice
    rollout  = generate(student, prompts)                responses + μ (rollout log-probs)
    teacher  = teachers.score(branch, rollout)           log π_T, one float per token
    student  = log π_θ before the update                 see "where Δ comes from" below
    Δ, s_i   = teacher − student, per-sample scores      mean |Δ| (general) / mean max(Δ,0) (domain)
    S        = select(s, ρ) over all DP ranks            global ρ-mass prefix; r_i per sample
    update   = Σ_micro-batches ∇ L(S) ; optimizer.step   loss normalised by the global |S|

Where Δ comes from (:class:`GapSource`, from ``selection.student_logprobs`` and the policy):

* ``RECOMPUTE``: a no-grad forward of the student before the update (``models.scoring.score_logprobs``).
* ``ROLLOUT``: μ, the rollout's own log-probs (no extra forward).
* ``TRAINING_FORWARD`` (the fused recompute): when the selection does not depend on the gaps
  (``SelectionPolicy.gap_free``: selection off and r_i = r_b for every sample, e.g. ``vanilla_mopd``),
  nothing needs log π_θ before training, and the pre-update log π_θ IS the training forward's detached
  log-prob (same weights, no update until every micro-batch is done). The no-grad forward is skipped:
  the selection is known up front (every sample, r_b), each micro-batch's loss takes Δ from its own
  forward, and training returns Δ for the metrics and the ρ-rule's statistics.

Teachers overlapped with the rollout (``rollout.overlap_teachers``, :class:`StreamedScoring`): with a
separate teacher, each rollout micro-batch is streamed to it while it is decoded, in blocks of
``rollout.teacher_block_positions`` new positions (``TeacherClient.stream``: the sends and the reply's
receive are posted and the student goes on); a teacher that extends a KV cache scores each block on
arrival, any other scores the micro-batch at its last block. With the RECOMPUTE gap source the student's
no-grad forward also runs before the results are gathered, while the teacher scores the last block;
with TRAINING_FORWARD (every teacher separate, PP = 1) the results are gathered by the first
micro-batch's loss, after its forward (:class:`DeferredTeacher`; a step with non-finite teacher
log-probs is then skipped after the backward, before the optimizer). Nothing computed changes beyond
float rounding: the same tokens are decoded (the noise is keyed per sample and position,
``distill.sampling``), a teacher scores each row on its own (its log-probs do not depend on the rows it
shares a request with, nor on later positions), and the results are gathered into the same [B, T]
before anything reads them.

Every rank of the student role runs this function; collectives inside: rollout (the replica's TP/PP
groups), teacher scoring (student ↔ teacher groups), selection (DP group), the pipeline schedule and
DDP (role groups), metric reduction (role group). Shapes: B samples on this replica, T tokens.
"""
from __future__ import annotations

import enum
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Protocol, Sequence, cast

import torch
import torch.distributed as dist

from camopd_megatron.config.moe import lock_step_needed
from camopd_megatron.distill.losses import LossOptions, camopd_branch_loss, reduce_metric_sums, summarize_loss_metrics
from camopd_megatron.distill.rollout import DecodeListener, RolloutBatch, SamplingParams, generate
from camopd_megatron.distill.scheduler import StepPlan
from camopd_megatron.distill.selection import SelectionPolicy, SelectionResult, apply_rule, plan_selection
from camopd_megatron.models.gpt import finish_param_gather, output_weight, stage_info, unwrap_model
from camopd_megatron.models.logprobs import next_token_logprobs
from camopd_megatron.models.moe import RoutingStats
from camopd_megatron.models.optimizer import optimizer_step, zero_grad_buffers
from camopd_megatron.models.pipeline import last_stage_to_all, make_microbatches, run_microbatches
from camopd_megatron.models.scoring import score_logprobs
from camopd_megatron.ops.fused_output import KeptSoftmaxBuffer
from camopd_megatron.ops.gaps import sample_gap_scores, token_gaps

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    from camopd_megatron.config import Config
    from camopd_megatron.data import PromptSource
    from camopd_megatron.models.optimizer import BranchMoments, LRScheduler
    from camopd_megatron.teachers.client import PendingScore

logger = logging.getLogger(__name__)


class TeacherScorer(Protocol):
    """What the step needs of the teachers (``teachers.TeacherClient``): log π_T per branch."""

    def score(self, branch: str, tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor, *,
              temperature: float = 1.0) -> torch.Tensor:
        """float32 [B, T] log-probs of the branch teacher at softmax ``temperature`` (collective over
        the student role)."""
        ...

    def is_separate(self, branch: str) -> bool:
        """The branch's teacher runs on its own ranks (its scoring can overlap the rollout)."""
        ...

    def stream(self, branch: str, rows: int, capacity: int, *, temperature: float = 1.0) -> "PendingScore":
        """Open a stream of blocks to the branch's separate teacher (``TeacherClient.stream``): ``.extend()``
        sends a block, ``.result()`` gives what :meth:`score` would return for the whole sequences."""
        ...


class GapSource(enum.Enum):
    """Where the pre-update log π_θ of Δ = log π_T − log π_θ comes from (module docstring)."""

    RECOMPUTE = "recompute"
    ROLLOUT = "rollout"
    TRAINING_FORWARD = "training_forward"

    @classmethod
    def choose(cls, recompute_student: bool, policy: SelectionPolicy) -> "GapSource":
        """``selection.student_logprobs`` (``recompute`` or ``rollout``); a recompute for a gap-free
        policy is fused into the training forward."""
        if not recompute_student:
            return cls.ROLLOUT
        return cls.TRAINING_FORWARD if policy.gap_free else cls.RECOMPUTE


class StageTimer:
    """Seconds per named stage of a step: wall clock (``seconds``) and the CPU time of the thread that ran
    the stage (``cpu_seconds``). Wall minus CPU is time the thread did not compute: waiting (for teachers, a
    collective, a GPU), or, on a virtual machine, time the hypervisor gave its core to another guest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.thread_time() - c0


@dataclass
class StudentState:
    """Everything the step needs about the student on this rank."""

    ddp_model: "DistributedDataParallel"
    """The megatron-DDP-wrapped model chunk (training forward/backward)."""
    ddp_chunks: list["DistributedDataParallel"]
    optimizer: "MegatronOptimizer"
    lr_scheduler: "LRScheduler"
    pg_collection: "ProcessGroupCollection"
    role_group: dist.ProcessGroup
    """All ranks of the student role (metric reduction)."""
    vocab_size: int
    max_seq_len: int
    moments: Optional["BranchMoments"] = None
    """Per-branch Adam moments (``optim.branch_state: per_branch``); None: one shared state."""
    kept_softmax: KeptSoftmaxBuffer = field(default_factory=KeptSoftmaxBuffer)
    """The training forward's kept softmax tiles, in memory reused from step to step (ops/fused_output.py)."""

    @property
    def model(self) -> torch.nn.Module:
        """The bare GPTModel (rollout, no-grad recompute)."""
        return unwrap_model(self.ddp_model)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.pg_collection.dp

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.pg_collection.dp)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.pg_collection.dp)

    def lock_step(self, settings: "StepSettings") -> Optional[dist.ProcessGroup]:
        """The group whose replicas run in lock-step (the DP group), or None (``StepSettings.lock_step``)."""
        return self.pg_collection.dp if settings.lock_step else None


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
    timeout_s: Optional[float] = None
    """Bound on the last pipeline stage → other stages broadcasts (``parallel.timeout_s``; None: the
    process group's own timeout)."""
    clip_grad: float = 0.0
    """``optim.clip_grad`` (0: off), for the ``grad_clipped`` metric."""
    teacher_temperature_override: Optional[float] = None
    """``loss.teacher_temperature``; None: :attr:`teacher_temperature` follows the student's."""
    lock_step: bool = False
    """Every DP replica runs the same number of forwards (rollout decode steps and micro-batches, recompute
    and training micro-batches, padded with dummies): an MoE student with expert parallelism, whose
    all-to-alls span replicas (``models.pipeline``, "Lock-step"). Results are those without it."""
    overlap_teachers: bool = True
    """``rollout.overlap_teachers``: separate teachers score each rollout micro-batch while it is decoded
    (:class:`StreamedScoring`)."""
    teacher_block_positions: int = 0
    """``rollout.teacher_block_positions``: positions per block streamed to the teachers (0: each rollout
    micro-batch whole, once decoded)."""

    @property
    def teacher_temperature(self) -> float:
        """The softmax temperature the teachers score at: ``loss.teacher_temperature``, by default the
        temperature of the student's log-probs π and μ (``SamplingParams.logprob_temperature``)."""
        if self.teacher_temperature_override is not None:
            return self.teacher_temperature_override
        return self.sampling.logprob_temperature

    @property
    def gap_source(self) -> GapSource:
        return GapSource.choose(self.recompute_student, self.policy)


@dataclass
class StepRecord:
    """What one step trained on, as this rank saw it (its DP replica's rows; the same on the replica's
    TP/PP ranks): the inputs of the loss, for a ``train(..., on_step=...)`` callback (an independent
    check of the update, a custom log). References to the step's own tensors, nothing is copied."""

    sample_ids: list[int]
    """Global sample index of each row (the step batch is 0..N-1 over the DP group)."""
    branches: list[str]
    """Branch of each row."""
    batch: RolloutBatch
    """Tokens, response mask and μ (``rollout_logp_BT``) of the rows."""
    teacher_logp_BT: torch.Tensor
    """log π_T of each row from its branch teacher."""
    selection: SelectionResult
    """Kept rows (``keep_B``), r_i (``adv_scale_B``) and |S| (``num_kept_global``)."""


@dataclass
class StepOutput:
    """What one step produced (metrics are identical on every rank of the student role)."""

    step: int
    plan: StepPlan
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    record: Optional[StepRecord] = None
    """The step's loss inputs (None for a step skipped before selection)."""


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def draw_prompts(sources: Mapping[str, "PromptSource"], prompts: Mapping[str, int], dp_rank: int, dp_size: int
                 ) -> tuple[list[list[int]], list[str], list[int]]:
    """The step's global prompt batch (``prompts``: branch → count, in that order; sample ids 0..N-1)
    and this replica's contiguous slice of it: (prompt ids, branch per sample, global sample ids)."""
    ids: list[list[int]] = []
    branches: list[str] = []
    for branch, n in prompts.items():
        if n <= 0:
            continue
        for p in sources[branch].next_batch(n):
            ids.append(list(p.ids))
            branches.append(branch)
    total = len(ids)
    lo, hi = (dp_rank * total) // dp_size, ((dp_rank + 1) * total) // dp_size
    return ids[lo:hi], branches[lo:hi], list(range(lo, hi))


def rollout(student: StudentState, prompts: list[list[int]], sample_ids: list[int], settings: StepSettings, *,
            step: int, seed: int, sampling: Optional[SamplingParams] = None,
            listener: Optional[DecodeListener] = None) -> RolloutBatch:
    """The student's responses to this replica's prompts (an empty batch for no prompts; collective
    over the replica either way). ``listener``: see :func:`~camopd_megatron.distill.rollout.generate`
    (blocks of ``settings.teacher_block_positions``)."""
    # the rollout reads every weight first: finish the optimizer step's pending parameter all-gathers
    # (parallel.overlap_param_gather) here, on every DP rank, even one with no prompts (collective)
    finish_param_gather(student.model)
    lock_step = student.lock_step(settings)
    if not prompts and lock_step is None:
        return RolloutBatch.empty()
    return generate(  # under lock-step also without prompts: this replica decodes dummies
        student.model, student.pg_collection, prompts, sampling or settings.sampling, sample_ids=sample_ids,
        seed=seed, step=step, vocab_size=student.vocab_size, max_seq_len=student.max_seq_len,
        use_kv_cache=settings.use_kv_cache, micro_batch_size=settings.rollout_micro_batch_size,
        timeout_s=settings.timeout_s, lock_step=lock_step, listener=listener,
        block_positions=settings.teacher_block_positions,
    )


def _router_tensors(batch: RolloutBatch, rows: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The MoE router inputs of ``batch``'s ``rows`` (all: None) for ``models.pipeline``'s micro-batches: each row's
    length (the padding mask) and, with routing replay, the rollout's expert choices."""
    pick = (lambda x: x) if rows is None else (lambda x: x[rows.to(x.device)])
    out = {"seq_lens": pick(batch.prompt_lens_B + batch.response_lens_B)}
    if batch.routes_BTLK is not None:
        out["routes"] = pick(batch.routes_BTLK)
    return out


def student_logprobs(student: StudentState, batch: RolloutBatch, settings: StepSettings,
                     temperature: float) -> torch.Tensor:
    """log π_θ of the rollout tokens with the current weights (no grad), [B, T] on every stage (an MoE
    student with routing replay routes as the rollout did)."""
    logp_BT = score_logprobs(student.model, student.pg_collection, batch.tokens_BT, batch.loss_mask_BT,
                             micro_batch=settings.micro_batch_size, vocab_size=student.vocab_size,
                             temperature=temperature, timeout_s=settings.timeout_s,
                             lock_step=student.lock_step(settings), extra=_router_tensors(batch))
    return cast(torch.Tensor, logp_BT)  # to_all_stages (the default): a tensor on every stage


def sample_scores(gap_BT: torch.Tensor, mask_BT: torch.Tensor, branches: Sequence[str],
                  policy: SelectionPolicy) -> torch.Tensor:
    """Per-sample score with each sample's branch kind (mean |Δ| or mean max(Δ, 0))."""
    scores = torch.zeros(gap_BT.shape[0], dtype=torch.float32)
    for kind in {policy.score_kind(b) for b in branches}:
        rows = torch.tensor([policy.score_kind(b) == kind for b in branches], dtype=torch.bool)
        scores[rows] = sample_gap_scores(gap_BT[rows], mask_BT[rows], kind).float()
    return scores


def score_with_teachers(client: TeacherScorer, branch_order: Sequence[str], batch: RolloutBatch,
                        branches: Sequence[str], temperature: float) -> torch.Tensor:
    """log π_T [B, T] at softmax ``temperature`` from each sample's branch teacher. Every branch of ``branch_order`` (the step's
    branches, the same list on every rank) is requested in that order on every rank (possibly with
    zero rows), so the teacher protocol stays in step."""
    out = torch.zeros(batch.tokens_BT.shape, dtype=torch.float32)
    for branch in branch_order:
        rows = torch.tensor([b == branch for b in branches], dtype=torch.bool)
        idx = rows.nonzero().flatten()
        sub = batch.select(idx.tolist()) if idx.numel() else None
        tokens = sub.tokens_BT if sub is not None else torch.zeros((0, 1), dtype=torch.int64)
        mask = sub.loss_mask_BT if sub is not None else torch.zeros((0, 1), dtype=torch.float32)
        logp = client.score(branch, tokens, mask, temperature=temperature)
        if idx.numel():
            out[idx, : logp.shape[1]] = logp.float()
    return out


class StreamedScoring:
    """Teacher scoring overlapped with the rollout (module docstring), the rollout's
    :class:`~camopd_megatron.distill.rollout.DecodeListener`: :meth:`begin` opens one stream per
    separate-teacher branch of the step (in ``branch_order``, with that branch's rows of the micro-batch,
    possibly none), :meth:`block` sends each stream its rows of the newly decoded columns, :meth:`gather`
    scores the colocated branches and collects every reply into the [B, T] that
    :func:`score_with_teachers` returns.

    A shared teacher replica serves its student replicas in turn, one micro-batch each (protocol
    "Streams"), so every replica streams ``chunks`` micro-batches, :meth:`pad` adding empty ones:
    ``chunks`` is the largest replica's number of rollout micro-batches (:meth:`count`), the same on
    every rank.
    """

    def __init__(self, client: TeacherScorer, branch_order: Sequence[str], branches: Sequence[str],
                 temperature: float) -> None:
        self.client, self.branches, self.temperature = client, list(branches), temperature
        self.separate = [b for b in branch_order if client.is_separate(b)]
        self.colocated = [b for b in branch_order if not client.is_separate(b)]
        self.streams: list[tuple[list[int], "PendingScore"]] = []
        """Every stream of the step: (its batch rows, the stream)."""
        self._open: list[tuple[list[int], "PendingScore"]] = []
        """The micro-batch's streams: (their rows within the micro-batch, the stream)."""
        self.chunks = 0

    @staticmethod
    def count(total_prompts: int, dp_size: int, micro_batch_size: Optional[int]) -> int:
        """Rollout micro-batches of the largest DP replica (``draw_prompts`` gives ⌈N / DP⌉ at most)."""
        most = -(-total_prompts // dp_size)
        return -(-most // (micro_batch_size or max(most, 1)))

    def begin(self, rows: list[int], capacity: int) -> None:
        """A micro-batch of the batch rows ``rows`` starts decoding: open its streams (all before any block)."""
        self.chunks += 1
        self._open = []
        for branch in self.separate:
            local = [i for i, r in enumerate(rows) if self.branches[r] == branch]
            stream = self.client.stream(branch, len(local), capacity, temperature=self.temperature)
            self._open.append((local, stream))
            self.streams.append(([rows[i] for i in local], stream))

    def block(self, start: int, tokens_Bn: torch.Tensor, mask_Bn: torch.Tensor, *, last: bool) -> None:
        """Columns [start, start + n) of the micro-batch are decoded: each stream gets its rows; returns at once."""
        for local, stream in self._open:
            stream.extend(start, tokens_Bn[local], mask_Bn[local], last=last)

    def pad(self, chunks: int) -> None:
        """Empty micro-batches up to ``chunks`` (a replica with fewer micro-batches or no prompts)."""
        while self.chunks < chunks:
            self.begin([], 1)
            self.block(0, torch.zeros((0, 1), dtype=torch.int64), torch.zeros((0, 0)), last=True)

    def gather(self, batch: RolloutBatch) -> torch.Tensor:
        """log π_T [B, T] of ``batch`` (the whole rollout): colocated branches scored now, the separate
        teachers' replies collected in the order they were requested."""
        out = score_with_teachers(self.client, self.colocated, batch, self.branches, self.temperature)
        for rows, stream in self.streams:
            logp = stream.result()
            if rows:
                out[rows, : logp.shape[1]] = logp.float()
        self.streams.clear()
        return out


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------
def camopd_step(
    step: int,
    plan: StepPlan,
    student: StudentState,
    teachers: TeacherScorer,
    sources: Mapping[str, "PromptSource"],
    settings: StepSettings,
) -> StepOutput:
    """Run one optimizer step (see the module docstring); returns role-wide metrics."""
    timer = StageTimer()
    t_start = time.perf_counter()
    with timer("data"):
        prompts, branches, sample_ids = draw_prompts(sources, plan.prompts, student.dp_rank, student.dp_size)
    source = settings.gap_source
    overlap = settings.overlap_teachers and any(teachers.is_separate(b) for b in plan.branches)
    streamed = StreamedScoring(teachers, plan.branches, branches, settings.teacher_temperature) if overlap else None
    with timer("rollout"):
        batch = rollout(student, prompts, sample_ids, settings, step=step, seed=settings.seed, listener=streamed)
        if streamed is not None:
            streamed.pad(StreamedScoring.count(sum(max(n, 0) for n in plan.prompts.values()), student.dp_size,
                                             settings.rollout_micro_batch_size))
    mask_BT = batch.loss_mask_BT
    student_logp_BT: Optional[torch.Tensor] = None
    if streamed is not None and source is GapSource.RECOMPUTE:
        with timer("recompute"):  # while the teachers score the last chunk
            student_logp_BT = student_logprobs(student, batch, settings, settings.sampling.logprob_temperature)
    # TRAINING_FORWARD, every teacher separate, PP = 1: the replies are first needed by the first
    # micro-batch's loss, so they are gathered there, after its forward (DeferredTeacher)
    deferred = (streamed is not None and source is GapSource.TRAINING_FORWARD and not streamed.colocated
                and stage_info(student.pg_collection).pp_size == 1)
    teacher_logp_BT: Optional[torch.Tensor] = None
    if not deferred:
        with timer("teacher"):
            teacher_logp_BT = (streamed.gather(batch) if streamed is not None else
                               score_with_teachers(teachers, plan.branches, batch, branches,
                                                   settings.teacher_temperature))
        n_bad = _nonfinite_tokens(teacher_logp_BT, mask_BT, student.role_group)
        if n_bad > 0:
            return StepOutput(step, plan, {"teacher_nonfinite_tokens": n_bad}, skipped=True)
    ids_B = torch.tensor(sample_ids, dtype=torch.int64)
    gap_BT: Optional[torch.Tensor] = None  # Δ before training (RECOMPUTE, ROLLOUT); TRAINING_FORWARD: after
    if source is not GapSource.TRAINING_FORWARD:
        with timer("recompute"):
            if student_logp_BT is None:
                student_logp_BT = (student_logprobs(student, batch, settings, settings.sampling.logprob_temperature)
                                   if source is GapSource.RECOMPUTE else batch.rollout_logp_BT)
            gap_BT = token_gaps(cast(torch.Tensor, teacher_logp_BT), student_logp_BT, mask_BT)
    with timer("select"):
        if gap_BT is not None:
            sel = plan_selection(sample_scores(gap_BT, mask_BT, branches, settings.policy), ids_B, branches,
                                 settings.policy, student.dp_group)
        else:  # gap-free: every sample, r_b, whatever Δ turns out to be
            sel = settings.policy.gap_free_selection(branches, student.dp_group)
    with timer("train"):
        teacher_in = DeferredTeacher(lambda: cast(StreamedScoring, streamed).gather(batch), timer) if deferred \
            else cast(torch.Tensor, teacher_logp_BT)
        loss_sums, gap_BT = train_on_selection(student, batch, teacher_in, sel, settings, source, gap_BT)
    if isinstance(teacher_in, DeferredTeacher):
        teacher_logp_BT = teacher_in.get()
        n_bad = _nonfinite_tokens(teacher_logp_BT, mask_BT, student.role_group)
        if n_bad > 0:  # as if skipped before training: the optimizer does not run (the next step zeroes the grads)
            return StepOutput(step, plan, {"teacher_nonfinite_tokens": n_bad}, skipped=True)
    teacher_logp_BT = cast(torch.Tensor, teacher_logp_BT)
    if source is GapSource.TRAINING_FORWARD:
        with timer("select"):  # the ρ-rule's statistics of the real gaps (metrics; the kept set is unchanged)
            sel = sel.with_rule(apply_rule(sample_scores(gap_BT, mask_BT, branches, settings.policy), ids_B,
                                           branches, settings.policy, student.dp_group))
    lr_scale = settings.policy.lr_scale(plan.branches)  # r_b under selection.scale_mode: lr, else 1
    with timer("optimizer"):
        if student.moments is not None:  # per-branch Adam: this branch's moments (swapped by pointer)
            student.moments.use(plan.branch)
        ok, grad_norm, _ = optimizer_step(student.optimizer, student.lr_scheduler, lr_scale=lr_scale)
    metrics = _step_metrics(student, batch, branches, gap_BT, sel, loss_sums, timer, t_start)
    lr = float(student.lr_scheduler.get_lr())
    grad_norm = float(grad_norm or 0.0)
    metrics.update(grad_norm=grad_norm, lr=lr, lr_effective=lr * lr_scale, update_skipped=float(not ok),
                   phase=float(plan.phase),
                   grad_clipped=float(settings.clip_grad > 0 and grad_norm > settings.clip_grad))
    return StepOutput(step, plan, metrics, skipped=not ok,
                      record=StepRecord(sample_ids, branches, batch, teacher_logp_BT, sel))


def _nonfinite_tokens(teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor, group: dist.ProcessGroup) -> float:
    """Scored tokens with a non-finite teacher log-prob over the student role (a step with any is skipped)."""
    n_bad = torch.tensor([float((~torch.isfinite(teacher_logp_BT) & mask_BT.bool()).sum())])
    dist.all_reduce(n_bad, group=group)
    return float(n_bad.item())


class DeferredTeacher:
    """log π_T [B, T] gathered on first use (:meth:`get`, timed as the ``teacher`` stage, which then
    lies inside ``train``): the overlapped teachers score the rollout's last chunk during the first
    training forward. PP = 1 only (every rank of the replica computes the first micro-batch's loss,
    so all of them join the gather's broadcast at the same point)."""

    def __init__(self, gather: Callable[[], torch.Tensor], timer: StageTimer) -> None:
        self._gather, self._timer = gather, timer
        self._value: Optional[torch.Tensor] = None

    def get(self) -> torch.Tensor:
        if self._value is None:
            with self._timer("teacher"):
                self._value = self._gather()
        return self._value


def train_on_selection(student: StudentState, batch: RolloutBatch, teacher_logp_BT: "torch.Tensor | DeferredTeacher",
                       sel: SelectionResult, settings: StepSettings, source: GapSource,
                       gap_BT: Optional[torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    """Forward/backward of the kept samples in micro-batches (``teacher_logp_BT`` possibly deferred:
    taken by the first loss that needs it, and by every rank after the schedule).

    Δ per ``source``: ``gap_BT`` [B, T] computed before training (RECOMPUTE, ROLLOUT), or, for
    TRAINING_FORWARD (``gap_BT`` None; every sample must be kept), each micro-batch's
    log π_T − sg(log π_θ) of its own training forward.
    Returns this rank's loss metric sums (last stage, TP rank 0 only, so a SUM over the role counts every
    sample once) and Δ [B, T] on every pipeline stage (the given one, or the training forward's).
    """
    from_forward = source is GapSource.TRAINING_FORWARD
    if from_forward != (gap_BT is None):
        raise ValueError(f"train_on_selection: gap source {source.name} needs gap_BT "
                         f"{'None (Δ from the training forward)' if from_forward else '[B, T] (Δ before training)'}")
    keep = sel.keep_B.nonzero().flatten()
    if from_forward and keep.numel() != sel.keep_B.numel():
        raise ValueError("train_on_selection: Δ from the training forward needs every sample kept (a gap-free policy)")
    deferred = teacher_logp_BT if isinstance(teacher_logp_BT, DeferredTeacher) else None
    tensors = {
        "tokens": batch.tokens_BT[keep], "mask": batch.loss_mask_BT[keep], "mu": batch.rollout_logp_BT[keep],
        "scale": sel.adv_scale_B[keep].float(),
        # deferred: each micro-batch's rows, to read their teacher log-probs once they are gathered
        **({"row": keep} if deferred is not None else {"teacher": cast(torch.Tensor, teacher_logp_BT)[keep]}),
    }
    if gap_BT is not None:
        tensors["gap"] = gap_BT[keep]
    tensors.update(_router_tensors(batch, keep))
    if not tensors["tokens"].shape[1]:
        tensors = {k: (v if v.dim() == 1 else v.new_zeros((v.shape[0], 1) + tuple(v.shape[2:])))
                   for k, v in tensors.items()}
    tp = student.pg_collection.tp
    n_global = max(sel.num_kept_global, 1)
    temperature = settings.sampling.logprob_temperature
    sums: dict[str, float] = {}

    weight = output_weight(student.model) if stage_info(student.pg_collection).is_last else None

    def loss_fn(mb: dict[str, torch.Tensor], hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = mb["n_real"]
        if n == 0:  # nothing kept here, or a lock-step dummy: the schedule still runs (DDP/pipeline/EP
            return (hidden.sum() + weight.sum()) * 0.0, {}  # collectives), every gradient exactly zero
        mask = mb["mask"][:n]
        logp = next_token_logprobs(hidden[:n], mb["tokens"][:n], tp, vocab_size=student.vocab_size,
                                   temperature=temperature, mask_BT=mask, first_position=mb["output_window"][0],
                                   output_weight=weight, kept_buffer=student.kept_softmax)
        teacher = mb["teacher"][:n] if deferred is None else deferred.get()[mb["row"][:n]][:, : mask.shape[1]]
        gap = token_gaps(teacher, logp, mask) if from_forward else mb["gap"][:n]
        loss, m = camopd_branch_loss(logp, teacher, mb["mu"][:n], mask, mb["scale"][:n],
                                     num_samples_global=n_global, options=settings.loss_options, gap_BT=gap)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        return loss, ({"gap": gap} if from_forward else {})

    zero_grad_buffers(student.ddp_chunks, student.optimizer)
    RoutingStats.of(student.model)  # an MoE student: count the update's routing (metrics moe/*)
    student.ddp_model.train()
    outs = run_microbatches(student.ddp_model, student.pg_collection,
                            make_microbatches(tensors, settings.micro_batch_size), loss_fn, forward_only=False,
                            lock_step=student.lock_step(settings), timeout_s=settings.timeout_s)
    if deferred is not None:
        deferred.get()  # a replica with nothing kept gathers its (empty) replies here
    if from_forward:
        parts = [o["gap"] for o in outs if "gap" in o]  # an all-padding micro-batch (B = 0) has none
        gap_BT = torch.cat(parts, 0) if parts else torch.zeros(tuple(batch.tokens_BT.shape), dtype=torch.float32)
        gap_BT = last_stage_to_all(gap_BT, student.pg_collection, timeout_s=settings.timeout_s,
                                   what="the training forward's gaps")
    return (sums if dist.get_rank(tp) == 0 else {}), gap_BT
_LOSS_KEYS = ("samples", "tokens", "loss_sum", "gap_sum", "gap_sq_sum", "adv_sum", "adv_clipped_tokens",
              "is_weight_sum", "is_clipped_tokens", "is_low_tokens", "is_high_tokens")


def _step_metrics(student: StudentState, batch: RolloutBatch, branches: Sequence[str], gap_BT: torch.Tensor,
                  sel: SelectionResult, loss_sums: dict[str, float], timer: StageTimer, t_start: float) -> dict[str, float]:
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
    routing = RoutingStats.of(student.model)
    if routing is not None:  # collective over the role, like the sums above
        out.update(routing.metrics(student.role_group, student.pg_collection.tp))
    elapsed = time.perf_counter() - t_start
    out.update({f"time/{k}": v for k, v in timer.seconds.items()})
    out.update({f"cpu_time/{k}": v for k, v in timer.cpu_seconds.items()})
    out["time/step"] = elapsed
    out["throughput/train_tokens_per_s"] = red["rollout/tokens"] / max(elapsed, 1e-9)
    out["throughput/generated_tokens_per_s"] = red["rollout/response_tokens"] / max(timer.seconds.get("rollout", 0.0), 1e-9)
    return out


def settings_from_config(cfg: "Config", eos_token_id: Optional[int]) -> StepSettings:
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
        timeout_s=cfg.parallel.timeout_s,
        teacher_temperature_override=cfg.loss.teacher_temperature,
        clip_grad=cfg.optim.clip_grad,
        lock_step=cfg.model.moe is not None and lock_step_needed(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.etp),
        overlap_teachers=cfg.rollout.overlap_teachers,
        teacher_block_positions=cfg.rollout.teacher_block_positions,
    )
