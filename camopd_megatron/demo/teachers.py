"""Stages 1-2 of the demo: the general teacher (supervised on the general tasks) and the domain
teacher (the general teacher fine-tuned on the domain task only, which makes it forget).

Both are tiny megatron-core GPTs (TP = 1, PP = 1, CPU) trained with teacher-forced next-token loss
on the answer tokens (+ EOS) of ``[BOS] prompt answer [EOS]`` sequences, with plain
``torch.optim.AdamW`` on the model's parameters (no megatron DDP/optimizer: one rank, nothing to
reduce). They are saved in our distributed checkpoint format
(:func:`camopd_megatron.checkpoint.dist.save_checkpoint`), which is what ``teachers[i].checkpoint``
and ``model.checkpoint`` load in stage 3.

Caching: the outputs live under ``<cache_dir>/<hash of StageSettings>/`` (``general/``, ``domain/``,
``teachers.json`` with their measured accuracies); a rerun with the same settings reuses them.

Shape legend: B rows, T tokens, V vocabulary (padded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
from camopd_megatron.config import ModelConfig
from camopd_megatron.data import ByteTokenizer
from camopd_megatron.demo.evaluate import evaluate_problems
from camopd_megatron.demo.tasks import DOMAIN_TASKS, GENERAL_TASKS, Problem, sample_problems
from camopd_megatron.distributed import init_distributed
from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
from camopd_megatron.models.groups import simple_pg_collection
from camopd_megatron.models.pipeline import model_forward

__all__ = [
    "StageSettings",
    "TeacherArtifacts",
    "demo_model_config",
    "encode_sft_batch",
    "sft_train",
    "build_demo_model",
    "eval_set",
    "prepare_teachers",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """Everything that determines the teachers (the cache key is a hash of these)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    seq_length: int = 32
    seed: int = 0
    batch_size: int = 32
    general_steps: int = 800
    general_lr: float = 3e-3
    domain_steps: int = 80
    """Short on purpose: stop once the domain style is learnt, so the domain teacher keeps part of its
    general skill (partial forgetting, the paper's regime)."""
    domain_lr: float = 1e-3
    domain_replay: int = 6
    """Stage 2 trains on this many domain problems per general one (replay keeps the general jobs
    themselves; what the domain teacher loses is mostly its house style bleeding into general answers).
    Without replay this tiny model loses the general jobs before it learns the new ``#`` cue."""
    eval_per_task: int = 200
    version: int = 3
    """Bump when the tasks or the training code change (invalidates caches)."""

    def key(self) -> str:
        """Short content hash used as the cache directory name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class TeacherArtifacts:
    """Paths and measured accuracies of the two teachers."""

    general_ckpt: str
    domain_ckpt: str
    metrics: dict[str, dict[str, float]]
    """``{"general_teacher": {acc/...}, "domain_teacher": {acc/...}}`` on the eval split."""
    model: dict[str, Any]
    """The ModelConfig fields of both teachers (and the student)."""
    seconds: float = 0.0


def demo_model_config(s: StageSettings) -> ModelConfig:
    """The demo architecture (char-level vocabulary of 128), random init: stages 1-2 train it from scratch."""
    return ModelConfig(
        init="random", num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
        ffn_hidden_size=s.ffn_hidden_size, vocab_size=128, vocab_pad_multiple=128, seq_length=s.seq_length,
        transformer_impl="local",
    )


def build_demo_model(model_cfg: ModelConfig, seed: int, checkpoint: Optional[str] = None) -> tuple[Any, Any]:
    """A TP=1 GPT in the single-process world (+ its process groups), optionally loaded from a checkpoint."""
    init_distributed()
    pgc = simple_pg_collection(1, 1, 1)
    init_model_rng(seed, pgc)
    model = build_gpt_model(model_cfg, pgc)
    if checkpoint is not None:
        load_model(model, checkpoint, model_cfg=model_cfg, pg_collection=pgc)
    return model, pgc


def encode_sft_batch(problems: Sequence[Problem], tokenizer: ByteTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt answer [EOS]`` tokens and a target mask over answer+EOS positions.

    ``mask_BT[b, t] = 1`` where token ``t + 1`` is an answer/EOS token (aligned with next-token logits).
    """
    seqs, starts = [], []
    for p in problems:
        prompt = tokenizer.encode(p.prompt, add_special_tokens=True)
        seqs.append(prompt + tokenizer.encode(p.answer) + [tokenizer.eos_id])
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    tokens_BT = torch.full((len(seqs), width), tokenizer.pad_id or 0, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), width), dtype=torch.float32)
    for b, (s, p0) in enumerate(zip(seqs, starts)):
        tokens_BT[b, : len(s)] = torch.tensor(s)
        mask_BT[b, p0 - 1: len(s) - 1] = 1.0
    return tokens_BT, mask_BT


def _sft_loss(model: Any, tokens_BT: torch.Tensor, mask_BT: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits_BTV = model_forward(model, tokens_BT)[..., :vocab_size].float()
    targets_BT = torch.roll(tokens_BT, -1, dims=1)
    nll_BT = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), reduction="none").view_as(mask_BT)
    return (nll_BT * mask_BT).sum() / mask_BT.sum()


def sft_train(model: Any, tasks: Sequence[str], *, steps: int, lr: float, batch_size: int, seed: int,
              desc: str = "sft", warmup: int = 50) -> list[float]:
    """Teacher-forced training on fresh ``train``-split problems of ``tasks``; returns the loss per step.

    AdamW (betas 0.9/0.98, no weight decay), linear warmup then cosine decay to lr/10, grad clip 1.
    """
    if steps < 1:
        raise ValueError(f"steps: got {steps}; use >= 1")
    tokenizer = ByteTokenizer(128)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0)
    for step in bar:
        frac = min(1.0, (step + 1) / max(warmup, 1))
        cos = 0.55 + 0.45 * math.cos(math.pi * step / steps)
        for g in opt.param_groups:
            g["lr"] = lr * frac * cos
        problems = sample_problems(tasks, "train", batch_size, seed=seed * 1_000_003 + step)
        tokens_BT, mask_BT = encode_sft_batch(problems, tokenizer)
        loss = _sft_loss(model, tokens_BT, mask_BT, tokenizer.vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def eval_set(tasks: Sequence[str], per_task: int, seed: int = 12345) -> list[Problem]:
    """The fixed held-out eval problems (``eval`` split, unique prompts)."""
    return sample_problems(tasks, "eval", per_task * len(tasks), seed=seed, unique=True)


def _save(model: Any, pgc: Any, model_cfg: ModelConfig, path: Path, step: int) -> str:
    save_checkpoint(path, model_sharded_state_dict(model, pgc), model_cfg=model_cfg, step=step, overwrite=True)
    return str(path)


def prepare_teachers(settings: StageSettings, cache_dir: str | Path, *, force: bool = False) -> TeacherArtifacts:
    """Train (or reuse from the cache) the general and the domain teacher; measure both.

    Raises nothing on a weak testbed: the caller checks the acceptance thresholds and reports them.
    """
    root = Path(cache_dir) / settings.key()
    summary = root / "teachers.json"
    if summary.is_file() and not force:
        data = json.loads(summary.read_text())
        logger.info("stages 1-2: reusing cached teachers in %s", root)
        return TeacherArtifacts(**data)
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=1))
    model_cfg = demo_model_config(settings)
    tokenizer = ByteTokenizer(128)
    problems = eval_set(GENERAL_TASKS + DOMAIN_TASKS, settings.eval_per_task)

    logger.info("stage 1: general teacher (%d steps on %s)", settings.general_steps, ",".join(GENERAL_TASKS))
    model, pgc = build_demo_model(model_cfg, settings.seed)
    sft_train(model, GENERAL_TASKS, steps=settings.general_steps, lr=settings.general_lr,
              batch_size=settings.batch_size, seed=settings.seed, desc="stage 1 (general teacher)")
    general_metrics = evaluate_problems(model, problems, tokenizer)
    general_ckpt = _save(model, pgc, model_cfg, root / "general", settings.general_steps)
    logger.info("general teacher: %s", _fmt(general_metrics))

    logger.info("stage 2: domain teacher (%d steps on %s, %d:1 general replay)", settings.domain_steps,
                ",".join(DOMAIN_TASKS), settings.domain_replay)
    sft_train(model, DOMAIN_TASKS * settings.domain_replay + GENERAL_TASKS, steps=settings.domain_steps, lr=settings.domain_lr,
              batch_size=settings.batch_size, seed=settings.seed + 1, desc="stage 2 (domain teacher)", warmup=10)
    domain_metrics = evaluate_problems(model, problems, tokenizer)
    domain_ckpt = _save(model, pgc, model_cfg, root / "domain", settings.general_steps + settings.domain_steps)
    logger.info("domain teacher: %s", _fmt(domain_metrics))

    art = TeacherArtifacts(
        general_ckpt=general_ckpt, domain_ckpt=domain_ckpt,
        metrics={"general_teacher": general_metrics, "domain_teacher": domain_metrics},
        model=dataclasses.asdict(model_cfg), seconds=time.perf_counter() - t0,
    )
    summary.write_text(json.dumps(dataclasses.asdict(art), indent=1))
    return art


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k.removeprefix('acc/')}={v:.2f}" for k, v in sorted(metrics.items()))
