"""Greedy-decoding evaluation of a (TP=1, PP=1) demo model on held-out problems.

Decoding is a plain full-recompute greedy loop over right-padded rows: with a causal mask, the pad
tokens after a row's current end never influence the logits at its last real position, so rows of
different prompt lengths share one batch without left padding or position offsets. The demo
models are tiny (context ≤ 32), so recomputing the prefix each step costs less than a KV cache's
bookkeeping. Scores are graded credit per problem (:func:`~camopd_megatron.demo.tasks.credit`: the share
of answer positions right), and the exact-match rate per branch alongside.

Shape legend: B rows, T tokens, V vocabulary (padded).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from camopd_megatron.data import ByteTokenizer
from camopd_megatron.demo.tasks import MAX_ANSWER_CHARS, NO_EOS, Problem, branch_of, per_task_accuracy
from camopd_megatron.models.pipeline import model_forward

__all__ = ["greedy_generate", "evaluate_problems", "accuracy_metrics"]


@torch.no_grad()
def greedy_generate(model: Any, prompts: Sequence[str], tokenizer: ByteTokenizer, *,
                    max_new_tokens: int = MAX_ANSWER_CHARS + 1, vocab_size: int = 128,
                    batch_size: int = 256) -> list[str]:
    """Greedy responses (text before EOS) of ``model`` to ``prompts`` (plain template: BOS + prompt)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: got {max_new_tokens}; use >= 1")
    was_training = model.training
    model.eval()
    out: list[str] = []
    eos = tokenizer.eos_id
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer.encode(p, add_special_tokens=True) for p in prompts[start:start + batch_size]]
        lens_B = torch.tensor([len(ids) for ids in chunk])
        total = int(lens_B.max()) + max_new_tokens
        tokens_BT = torch.full((len(chunk), total), tokenizer.pad_id or 0, dtype=torch.long)
        for b, ids in enumerate(chunk):
            tokens_BT[b, : len(ids)] = torch.tensor(ids)
        cur_B = lens_B.clone()
        done_B = torch.zeros(len(chunk), dtype=torch.bool)
        rows = torch.arange(len(chunk))
        for _ in range(max_new_tokens):
            width = int(cur_B.max())
            logits_BTV = model_forward(model, tokens_BT[:, :width].contiguous())
            next_B = logits_BTV[rows, cur_B - 1, :vocab_size].argmax(-1)
            next_B = torch.where(done_B, torch.full_like(next_B, eos), next_B)
            tokens_BT[rows, cur_B] = next_B
            done_B |= next_B == eos
            cur_B = torch.where(done_B, cur_B, cur_B + 1)
            if bool(done_B.all()):
                break
        for b in range(len(chunk)):
            resp = tokens_BT[b, int(lens_B[b]):].tolist()
            if eos in resp:
                out.append(tokenizer.decode(resp[: resp.index(eos)]))
            else:
                out.append(NO_EOS + tokenizer.decode(resp))  # earns no credit
    model.train(was_training)
    return out


def accuracy_metrics(problems: Sequence[Problem], responses: Sequence[str]) -> dict[str, float]:
    """``acc/<task>`` (mean graded credit) per task, ``acc/general`` / ``acc/domain`` (mean of the branch's
    tasks), and ``exact/general`` / ``exact/domain`` (the same means of the exact-match rates)."""
    metrics: dict[str, float] = {}
    for prefix, graded in (("acc", True), ("exact", False)):
        per_task = per_task_accuracy(problems, responses, graded=graded)
        if graded:
            metrics.update({f"acc/{t}": v for t, v in per_task.items()})
        for branch in ("general", "domain"):
            vals = [v for t, v in per_task.items() if branch_of(t) == branch]
            if vals:
                metrics[f"{prefix}/{branch}"] = sum(vals) / len(vals)
    return metrics


def evaluate_problems(model: Any, problems: Sequence[Problem], tokenizer: ByteTokenizer, *,
                      vocab_size: int = 128) -> dict[str, float]:
    """Greedy-decoding scores of ``model`` on ``problems`` (see :func:`accuracy_metrics`)."""
    responses = greedy_generate(model, [p.prompt for p in problems], tokenizer, vocab_size=vocab_size)
    return accuracy_metrics(problems, responses)
