"""The demo's evaluation hook for ``train(cfg, eval_fn=...)``: held-out graded credit per task.

The branch-conflict diagnostic (cos(g_general, g_domain), docs/algorithm.md §8) comes from the trainer's own
probe (``logging.diagnostics_interval``, :mod:`camopd_megatron.distill.probe`), logged as
``diag/grad_cosine``; :func:`camopd_megatron.demo.study.run_conflict_probe` runs it at 256 prompts x 4 samples
per branch as the testbed's conflict check.
"""
from __future__ import annotations

from typing import Any, Sequence

from camopd_megatron.config import ModelConfig
from camopd_megatron.data import ByteTokenizer
from camopd_megatron.demo.evaluate import evaluate_problems
from camopd_megatron.demo.tasks import Problem

__all__ = ["DemoEvaluator"]


class DemoEvaluator:
    """``eval_fn(step, model, pg_collection)`` for the trainer (one instance per run)."""

    def __init__(self, model_cfg: ModelConfig, eval_problems: Sequence[Problem]) -> None:
        self.model_cfg = model_cfg
        self.problems = list(eval_problems)
        self.tokenizer = ByteTokenizer(128)

    def __call__(self, step: int, model: Any, pg_collection: Any) -> dict[str, float]:
        return evaluate_problems(model, self.problems, self.tokenizer, vocab_size=self.model_cfg.vocab_size)
