"""The demo's evaluation hook for ``train(cfg, eval_fn=...)``: accuracy + a branch-conflict probe.

At every evaluation the student is measured (greedy exact match on the fixed held-out problems of
every task) and, when probing is on, the paper's branch-conflict diagnostic (CAMOPD.md §5) is
computed on a fixed probe batch per branch: the student samples one response per probe prompt
(T = 1), the branch's teacher scores the sampled tokens, and the vanilla per-branch loss
``L_b = − mean_i (1/L_i) Σ_t Δ_{i,t} · log π_θ(y_{i,t} | h_{i,t})`` gives the gradient ``g_b``
(``torch.autograd.grad``: nothing is accumulated into the trainer's gradient buffers). Reported:
``cos(g_general, g_domain)`` from :func:`camopd_megatron.distill.diagnostics.branch_conflict`.

Shape legend: B rows, T tokens, V vocabulary (padded).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from camopd_megatron.checkpoint.dist import load_model
from camopd_megatron.config import ModelConfig
from camopd_megatron.data import ByteTokenizer
from camopd_megatron.demo.evaluate import evaluate_problems
from camopd_megatron.demo.tasks import MAX_ANSWER_CHARS, Problem
from camopd_megatron.distill.diagnostics import branch_conflict
from camopd_megatron.models.gpt import build_gpt_model
from camopd_megatron.models.pipeline import model_forward

__all__ = ["DemoEvaluator", "sample_responses", "branch_loss"]


@torch.no_grad()
def sample_responses(model: Any, prompts: Sequence[str], tokenizer: ByteTokenizer, *, seed: int,
                     max_new_tokens: int = MAX_ANSWER_CHARS + 1, vocab_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """T = 1 samples (full recompute). Returns right-padded ``tokens_BT`` and ``mask_BT`` over the
    positions whose *next* token is a response token (aligned with next-token log-probs)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    lens_B = torch.tensor([len(x) for x in ids])
    width = int(lens_B.max()) + max_new_tokens
    tokens_BT = torch.full((len(ids), width), tokenizer.pad_id or 0, dtype=torch.long)
    for b, x in enumerate(ids):
        tokens_BT[b, : len(x)] = torch.tensor(x)
    cur_B, done_B, rows = lens_B.clone(), torch.zeros(len(ids), dtype=torch.bool), torch.arange(len(ids))
    mask_BT = torch.zeros(tokens_BT.shape)
    for _ in range(max_new_tokens):
        logits_BV = model_forward(model, tokens_BT[:, : int(cur_B.max())].contiguous())[rows, cur_B - 1, :vocab_size]
        next_B = torch.multinomial(torch.softmax(logits_BV.float(), -1), 1, generator=gen).squeeze(1)
        live = ~done_B
        tokens_BT[rows[live], cur_B[live]] = next_B[live]
        mask_BT[rows[live], cur_B[live] - 1] = 1.0
        done_B |= next_B == tokenizer.eos_id
        cur_B = torch.where(live, cur_B + 1, cur_B)
        if bool(done_B.all()):
            break
    return tokens_BT, mask_BT


def _logp(model: Any, tokens_BT: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits_BTV = model_forward(model, tokens_BT)[..., :vocab_size].float()
    targets_BT = torch.roll(tokens_BT, -1, dims=1)
    return torch.log_softmax(logits_BTV, -1).gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def branch_loss(student: Any, teacher: Any, tokens_BT: torch.Tensor, mask_BT: torch.Tensor,
                vocab_size: int = 128) -> torch.Tensor:
    """Vanilla MOPD loss of one branch (r = 1, w = 1: the probe is on-policy, π = μ)."""
    with torch.no_grad():
        teacher_BT = _logp(teacher, tokens_BT, vocab_size)
    student_BT = _logp(student, tokens_BT, vocab_size)
    gap_BT = (teacher_BT - student_BT.detach()) * mask_BT
    per_seq_B = (gap_BT * student_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp_min(1.0)
    return -per_seq_B.mean()


class DemoEvaluator:
    """``eval_fn(step, model, pg_collection)`` for the trainer (one instance per run)."""

    def __init__(self, model_cfg: ModelConfig, eval_problems: Sequence[Problem], *,
                 teacher_ckpts: Optional[dict[str, str]] = None, probe_prompts: Optional[dict[str, list[str]]] = None,
                 probe_seed: int = 0) -> None:
        self.model_cfg = model_cfg
        self.problems = list(eval_problems)
        self.tokenizer = ByteTokenizer(128)
        self.teacher_ckpts = teacher_ckpts or {}
        self.probe_prompts = probe_prompts or {}
        self.probe_seed = probe_seed
        self._teachers: dict[str, Any] = {}

    def _teacher(self, branch: str, pg_collection: Any) -> Any:
        if branch not in self._teachers:
            with torch.random.fork_rng(devices=[]):  # building draws init weights: keep the trainer's RNG
                model = build_gpt_model(self.model_cfg, pg_collection)
            load_model(model, self.teacher_ckpts[branch], model_cfg=self.model_cfg, pg_collection=pg_collection,
                       key=f"demo.teachers.{branch}")
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._teachers[branch] = model
        return self._teachers[branch]

    def grad_cosine(self, step: int, model: Any, pg_collection: Any) -> dict[str, float]:
        """cos(g_general, g_domain) of the vanilla per-branch losses on the probe batches."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = {}
        for i, branch in enumerate(("general", "domain")):
            tokens_BT, mask_BT = sample_responses(model, self.probe_prompts[branch], self.tokenizer,
                                                  seed=self.probe_seed * 7919 + step * 2 + i)
            with torch.enable_grad():
                loss = branch_loss(model, self._teacher(branch, pg_collection), tokens_BT, mask_BT)
                g = torch.autograd.grad(loss, params, allow_unused=True)
            grads[branch] = [(torch.zeros_like(p) if gi is None else gi, bool(getattr(p, "tensor_model_parallel", False)))
                             for gi, p in zip(g, params)]
        c = branch_conflict(grads["general"], grads["domain"], tp_group=pg_collection.tp, pp_group=pg_collection.pp)
        return {"diag/grad_cosine": c.cosine, "diag/grad_dot": c.dot}

    def __call__(self, step: int, model: Any, pg_collection: Any) -> dict[str, float]:
        metrics = evaluate_problems(model, self.problems, self.tokenizer, vocab_size=self.model_cfg.vocab_size)
        if self.teacher_ckpts and self.probe_prompts:
            metrics.update(self.grad_cosine(step, model, pg_collection))
        return metrics
