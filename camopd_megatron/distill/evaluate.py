"""Built-in periodic evaluation: how close the student is to each branch's teacher on held-out prompts.

Every ``eval.interval`` steps the student answers ``eval.num_prompts`` fixed held-out prompts per
branch greedily; the branch teacher scores the answers. Reported per branch:

* ``eval/<b>/teacher_logp``: mean per-token log π_T of the student's greedy answer — the teacher's
  judgement of the answer (higher is better; the quantity on-policy distillation pushes up);
* ``eval/<b>/gap``: mean per-token log π_T − log π_θ on those answers (→ 0 as the student matches
  the teacher on its own outputs);
* ``eval/<b>/response_len`` and ``eval/<b>/eos_fraction``.

Prompts come from the branch's held-out split (``data.heldout_fraction`` > 0); without one (or for
synthetic prompts) a separate, fixed prompt stream is used and a warning says it is not held out.
Task-specific scorers (exact-match accuracy, ...) plug in through ``train(cfg, eval_fn=...)``.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import torch

from camopd_megatron.distill.step import (
    StepSettings, StudentState, TeacherScorer, rollout, score_with_teachers, student_logprobs,
)
from camopd_megatron.ops.gaps import token_gaps

if TYPE_CHECKING:
    from camopd_megatron.config import Config
    from camopd_megatron.data import Tokenizer

logger = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 104729


def eval_prompt_sets(cfg: "Config", branches: Sequence[str], tokenizer: "Tokenizer", dp_rank: int,
                     dp_size: int) -> dict[str, list[list[int]]]:
    """This DP rank's share of each branch's fixed evaluation prompts (ids lists), and a warning
    where they are not a held-out split."""
    from camopd_megatron.data import build_prompt_sources, rank_slice

    sources = build_prompt_sources(cfg.data, branches, tokenizer, cfg.run.seed + EVAL_SEED_OFFSET)
    n = cfg.eval.num_prompts
    out: dict[str, list[list[int]]] = {}
    for b in branches:
        dataset = getattr(sources[b], "dataset", None)
        if dataset is not None and cfg.data.heldout_fraction > 0:
            prompts = list(itertools.islice(dataset.heldout_prompts(), n))
        else:
            logger.warning("eval prompts of branch %r are not a held-out split (set data.heldout_fraction > 0)", b)
            prompts = sources[b].next_batch(n)
        out[b] = [list(p.ids) for p in rank_slice(prompts, dp_rank, dp_size)]
    return out


def evaluate_branches(step: int, prompt_sets: dict[str, list[list[int]]], student: StudentState,
                      teachers: TeacherScorer, settings: StepSettings, max_new_tokens: int) -> dict[str, float]:
    """Greedy answers per branch, scored by the branch teacher; role-wide means (collective)."""
    from camopd_megatron.distill.losses import reduce_metric_sums
    from camopd_megatron.models.gpt import stage_info

    greedy = replace(settings.sampling, greedy=True, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
    # every rank of a replica holds the same answers: count them on the replica's first rank only
    first = torch.distributed.get_rank(student.pg_collection.tp) == 0 and stage_info(student.pg_collection).is_first
    w = 1.0 if first else 0.0
    sums: dict[str, float] = {}
    for b, prompts in prompt_sets.items():
        batch = rollout(student, prompts, list(range(len(prompts))), settings, step=step,
                        seed=settings.seed + EVAL_SEED_OFFSET, sampling=greedy)
        # greedy answers: student and teacher both at T = 1 (loss.teacher_temperature is for training)
        teacher = score_with_teachers(teachers, [b], batch, [b] * len(batch), 1.0)
        mask = batch.loss_mask_BT
        gap = token_gaps(teacher, student_logprobs(student, batch, settings, 1.0), mask)
        mask = mask.bool()
        sums[f"{b}/teacher_logp"] = w * float(teacher[mask].double().sum())
        sums[f"{b}/gap"] = w * float(gap[mask].double().sum())
        sums[f"{b}/tokens"] = w * float(mask.sum())
        sums[f"{b}/samples"] = w * batch.tokens_BT.shape[0]
        sums[f"{b}/eos"] = w * sum(r != "length" for r in batch.finish_reasons)
    red = reduce_metric_sums(sums, student.role_group)
    out: dict[str, float] = {}
    for b in prompt_sets:
        tokens, samples = max(red[f"{b}/tokens"], 1.0), max(red[f"{b}/samples"], 1.0)
        out[f"eval/{b}/teacher_logp"] = red[f"{b}/teacher_logp"] / tokens
        out[f"eval/{b}/gap"] = red[f"{b}/gap"] / tokens
        out[f"eval/{b}/response_len"] = red[f"{b}/tokens"] / samples
        out[f"eval/{b}/eos_fraction"] = red[f"{b}/eos"] / samples
    return out
