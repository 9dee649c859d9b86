"""Branch-conflict probe (docs/algorithm.md, diagnostics): cosine of the general and domain gradients.

Every ``logging.diagnostics_interval`` steps, before the step's update, the trainer samples a small
probe batch per branch from separate probe prompt streams (so probing never changes the training
data order), scores it with the branch's teacher, and back-propagates the vanilla MOPD loss of all
samples with r = 1 (no selection). The full-model gradients g_a and g_b (after megatron's DP
reduction) give ⟨g_a, g_b⟩ and cos(g_a, g_b) — the "recovery–preservation counteraction" the paper
measures. The optimizer is not stepped; the gradient buffers are zeroed afterwards. Probe backwards
all-reduce (``models.optimizer.whole_gradients``), so every rank reads whole gradients even where the
distributed optimizer would reduce-scatter them.

Gradient coherence (``logging.coherence_samples`` = n): on the same interval, per branch of the
step, n fresh probe samples (global over DP) are scored, the ρ-rule of the step's policy marks the
selected set S, and each sample's own gradient g_i (its CaMOPD loss with r = 1, |S| = 1) is taken
by one backward in which only the DP rank holding sample i has a row (the others join with none),
so after megatron's DP reduction every rank holds the full g_i. Coh(all), Coh(S) and
GCG = Coh(S)/Coh(all) − 1 follow (``distill.diagnostics``; TP slices summed, PP stages summed).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from camopd_megatron.distill.diagnostics import CoherenceAccumulator, branch_conflict, coherence_gain, grads_from_params
from camopd_megatron.distill.selection import SelectionResult, apply_rule
from camopd_megatron.distill.step import (
    GapSource, StepSettings, StudentState, TeacherScorer, draw_prompts, rollout, sample_scores, score_with_teachers,
    student_logprobs, train_on_selection,
)
from camopd_megatron.models.gpt import stage_info
from camopd_megatron.models.optimizer import whole_gradients, zero_grad_buffers
from camopd_megatron.ops.gaps import token_gaps

if TYPE_CHECKING:
    from camopd_megatron.data import PromptSource

logger = logging.getLogger(__name__)

PROBE_SEED_OFFSET = 7919
"""Added to run.seed for the probe's rollouts, so they never reuse a training sample's random stream."""
COHERENCE_SEED_OFFSET = 15485863
"""The same for the coherence probe's rollouts."""


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
    with whole_gradients(student.ddp_chunks):
        train_on_selection(student, batch, teacher_logp, everything, settings, GapSource.RECOMPUTE, gap)
    return _grads(student)


def _grads(student: StudentState) -> list[tuple[torch.Tensor, bool]]:
    """This rank's (DP-reduced) gradient set of the student."""
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


def probe_coherence(step: int, branches: Sequence[str], n_samples: int, student: StudentState, teachers: TeacherScorer,
                    probe_sources: Mapping[str, "PromptSource"], settings: StepSettings) -> dict[str, float]:
    """``diag/<branch>/coherence_all``, ``coherence_selected``, ``coherence_ratio`` (Coh(S)/Coh(all)),
    ``coherence_gain`` (GCG) and ``coherence_selected_samples`` from ``n_samples`` per-sample gradients
    per branch (module docstring); collective over the student role."""
    out: dict[str, float] = {}
    pgc = student.pg_collection
    for branch in branches:
        prompts, names, ids = draw_prompts(probe_sources, {branch: n_samples}, student.dp_rank, student.dp_size)
        batch = rollout(student, prompts, ids, settings, step=step, seed=settings.seed + COHERENCE_SEED_OFFSET)
        teacher_logp = score_with_teachers(teachers, [branch], batch, names, settings.teacher_temperature)
        student_logp = student_logprobs(student, batch, settings, settings.sampling.logprob_temperature)
        gap = token_gaps(teacher_logp, student_logp, batch.loss_mask_BT)
        ids_B = torch.tensor(ids, dtype=torch.int64)
        rule = apply_rule(sample_scores(gap, batch.loss_mask_BT, names, settings.policy), ids_B, names,
                          settings.policy, student.dp_group)
        selected_N = rule.rule_keep_N  # global sample id order (draw_prompts gives contiguous DP slices)
        every = SelectionResult.keep_all(torch.ones(len(batch)), {branch: 1})
        acc_all = CoherenceAccumulator(tp_group=pgc.tp, pp_group=pgc.pp)
        acc_sel = CoherenceAccumulator(tp_group=pgc.tp, pp_group=pgc.pp)
        for k in range(n_samples):  # one backward per sample; only its owner has a row
            only_k = dataclasses.replace(every, keep_B=ids_B == k, num_kept_global=1)
            with whole_gradients(student.ddp_chunks):
                train_on_selection(student, batch, teacher_logp, only_k, settings, GapSource.RECOMPUTE, gap)
            grads = _grads(student)
            acc_all.add(grads)
            if bool(selected_N[k]):
                acc_sel.add(grads)
            else:
                acc_sel.add_zero(grads)
        coh_all, coh_sel = acc_all.coherence(), acc_sel.coherence()
        out.update({f"diag/{branch}/coherence_all": coh_all, f"diag/{branch}/coherence_selected": coh_sel,
                    f"diag/{branch}/coherence_ratio": coh_sel / coh_all if coh_all > 0 else 0.0,
                    f"diag/{branch}/coherence_gain": coherence_gain(coh_sel, coh_all),
                    f"diag/{branch}/coherence_selected_samples": float(selected_N.sum())})
    zero_grad_buffers(student.ddp_chunks, student.optimizer)
    return out
