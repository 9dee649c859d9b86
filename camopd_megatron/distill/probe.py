"""Branch-conflict probe (docs/algorithm.md, diagnostics): cosine of the general and domain gradients.

Every ``logging.diagnostics_interval`` steps, before the step's update, the trainer samples a small
probe batch per branch from separate probe prompt streams (so probing never changes the training
data order), scores it with the branch's teacher, and back-propagates the vanilla MOPD loss of all
samples with r = 1 (no selection). The full-model gradients g_a and g_b (after megatron's DP
reduction) give ⟨g_a, g_b⟩ and cos(g_a, g_b) — the "recovery–preservation counteraction" the paper
measures. The optimizer is not stepped; the gradient buffers are zeroed afterwards.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from camopd_megatron.distill.diagnostics import branch_conflict, grads_from_params
from camopd_megatron.distill.selection import SelectionResult
from camopd_megatron.distill.step import (
    GapSource, StepSettings, StudentState, TeacherScorer, draw_prompts, rollout, score_with_teachers, student_logprobs,
    train_on_selection,
)
from camopd_megatron.models.gpt import stage_info
from camopd_megatron.models.optimizer import zero_grad_buffers
from camopd_megatron.ops.gaps import token_gaps

if TYPE_CHECKING:
    from camopd_megatron.data import PromptSource

logger = logging.getLogger(__name__)

PROBE_SEED_OFFSET = 7919
"""Added to run.seed for the probe's rollouts, so they never reuse a training sample's random stream."""


def _branch_gradient(step: int, branch: str, n_prompts: int, student: StudentState, teachers: TeacherScorer,
                     probe_sources: Mapping[str, "PromptSource"],
                     settings: StepSettings) -> list[tuple[torch.Tensor, bool]]:
    """This rank's gradient set of the branch loss on a fresh probe batch (all samples, r = 1)."""
    prompts, branches, ids = draw_prompts(probe_sources, {branch: n_prompts}, student.dp_rank, student.dp_size)
    batch = rollout(student, prompts, ids, settings, step=step, seed=settings.seed + PROBE_SEED_OFFSET)
    teacher_logp = score_with_teachers(teachers, [branch], batch, branches, settings.teacher_temperature)
    student_logp = student_logprobs(student, batch, settings, settings.sampling.logprob_temperature)
    gap = token_gaps(teacher_logp, student_logp, batch.loss_mask_BT)
    everything = SelectionResult.keep_all(torch.ones(len(batch)), {branch: n_prompts})
    train_on_selection(student, batch, teacher_logp, everything, settings, GapSource.RECOMPUTE, gap)
    stage = stage_info(student.pg_collection)
    params = [p for p in student.model.parameters()
              # a tied embedding's copy on the last stage would be counted twice
              if not (getattr(p, "shared_embedding", False) and stage.pp_size > 1 and not stage.is_first)]
    return grads_from_params(params)


def probe_branch_conflict(step: int, branches: Sequence[str], n_prompts: int, student: StudentState,
                          teachers: TeacherScorer, probe_sources: Mapping[str, "PromptSource"],
                          settings: StepSettings) -> dict[str, float]:
    """``diag/grad_cosine`` and ``diag/grad_dot`` (and norms) of the first two branches' gradients."""
    a, b = branches[0], branches[1]
    ga = _branch_gradient(step, a, n_prompts, student, teachers, probe_sources, settings)
    gb = _branch_gradient(step, b, n_prompts, student, teachers, probe_sources, settings)
    zero_grad_buffers(student.ddp_chunks, student.optimizer)
    conflict = branch_conflict(ga, gb, tp_group=student.pg_collection.tp, pp_group=student.pg_collection.pp)
    return {"diag/grad_cosine": conflict.cosine, "diag/grad_dot": conflict.dot,
            f"diag/grad_norm_{a}": conflict.norm_a, f"diag/grad_norm_{b}": conflict.norm_b}
