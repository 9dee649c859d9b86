"""Input checks before the expensive part, and every role's architecture read from its checkpoint.

:func:`resolve_inputs` runs on every rank before any model is built (``trainer.train``) and in
``camopd-train --dry-run``. It reads only small files (manifests, DCP metadata, the tokenizer) and
reports every problem at once in one :class:`~camopd_megatron.config.ConfigError`:

* each role's checkpoint (``model.checkpoint``, ``teachers[i].checkpoint``, ``checkpoint.load``):
  present, complete, safe metadata;
* each role's architecture: fields left out of the YAML are read from its checkpoint's manifest, a
  field set in the YAML that disagrees is an error naming both values (roles may differ in
  architecture and size; a random-init teacher without ``teachers[i].model`` has the student's);
* one vocabulary: every role's ``vocab_size`` equal, and the tokenizer (``data.tokenizer``) fits it;
* prompt files (``data.branches.<b>.paths``) present;
* the config's rules once more with the real architectures (TP / PP divisibility of every role,
  colocated teachers included).

It returns the config with every architecture filled in; the model builders read it from there.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from camopd_megatron.checkpoint.dist import CheckpointError, check_checkpoint, read_manifest
from camopd_megatron.config import Config, ConfigError, ModelConfig
from camopd_megatron.config.errors import problem
from camopd_megatron.config.sections import ARCH_FIELDS
from camopd_megatron.data import model_tokenizer

__all__ = ["resolve_inputs", "resolve_models", "saved_arch", "path_problems"]

INPUTS_SOURCE = "the run's inputs (checkpoints, tokenizer, prompt files)"
"""The ``source`` of the ConfigError raised by :func:`resolve_inputs`."""


def saved_arch(manifest: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields a checkpoint's manifest records (``model_config``, then the checked ``model``)."""
    saved: dict[str, Any] = {}
    for section in ("model_config", "model"):
        part = manifest.get(section)
        if isinstance(part, dict):
            saved.update({k: v for k, v in part.items() if k in ARCH_FIELDS})
    return saved


def _resolve_role(model_cfg: ModelConfig, key: str, ckpt_key: str) -> tuple[ModelConfig, list[str]]:
    """One role's model config with its architecture read from its checkpoint (random init: as given)."""
    if model_cfg.init == "random" or not model_cfg.checkpoint:
        return model_cfg, []  # the config's own rules name a missing checkpoint / size field
    path = model_cfg.checkpoint
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return model_cfg, [f"{ckpt_key}={path!r}: {e}"]
    resolved, problems = model_cfg.from_saved(saved_arch(manifest), key=key, path=path)
    try:  # intact: every recorded size, the small files' checksums, safe metadata (as a resume checks)
        check_checkpoint(path)
    except CheckpointError as e:
        problems.append(f"{ckpt_key}={path!r}: {e}; check it with tools/verify_checkpoint.py")
    return resolved, problems


def resolve_models(cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with the student's and every teacher's architecture read from its checkpoint, and the problems.

    A teacher's resolved architecture goes to ``teachers[i].model`` (a random-init teacher without
    one keeps the student's). Every role must have the student's ``vocab_size`` (one tokenizer).
    """
    student, problems = _resolve_role(cfg.model, "model", "model.checkpoint")
    out = replace(cfg, model=student)
    teachers = []
    for i, t in enumerate(out.teachers):
        tm, key = out.teacher_model(i)
        if key == "model":  # random init with the student's architecture
            teachers.append(t)
            continue
        resolved, found = _resolve_role(tm, key, f"teachers[{i}].checkpoint")
        problems += found
        teachers.append(replace(t, model=resolved))
        mine, theirs = resolved.vocab_size, student.vocab_size
        if mine is not None and theirs is not None and mine != theirs:
            where = f"teachers[{i}].checkpoint={t.checkpoint!r}: " if t.init == "checkpoint" else f"{key}.vocab_size: "
            problems.append(
                f"{where}the teacher's vocabulary has {mine!r} tokens but the student's model.vocab_size={theirs}; "
                "teachers and student must share one tokenizer (convert every model with the student's tokenizer)")
    return replace(out, teachers=teachers), problems


def path_problems(cfg: Config) -> list[str]:
    """Missing input files other than the models' checkpoints: prompt files and ``checkpoint.load``."""
    problems: list[str] = []
    for name, branch in cfg.data.branches.items():
        for j, path in enumerate(branch.paths):
            if not Path(path).is_file():
                problems.append(problem(
                    f"data.branches.{name}.paths[{j}]", path, "an existing prompt file (.jsonl or .parquet)",
                    "fix the path (relative paths are from the directory you launch in)",
                ))
    if cfg.checkpoint.load is not None:
        try:
            read_manifest(cfg.checkpoint.load)
        except CheckpointError as e:
            problems.append(f"checkpoint.load={cfg.checkpoint.load!r}: {e}; check it with tools/verify_checkpoint.py, "
                            "or point checkpoint.load at another checkpoint")
    return problems


def _tokenizer_problems(cfg: Config) -> list[str]:
    if cfg.model.vocab_size is None:
        return []  # unknown: the student's checkpoint problem is reported
    try:
        model_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    except (ValueError, OSError) as e:
        return [str(e)]
    return []


def resolve_inputs(cfg: Config, *, source: Optional[str] = None) -> Config:
    """Check every input of ``cfg`` and read every role's architecture; raise one ConfigError listing all problems.

    Cheap and deterministic, so every rank runs it (and reaches the same verdict) before any model
    is built or any collective runs.
    """
    resolved, problems = resolve_models(cfg)
    problems += path_problems(resolved)
    problems += _tokenizer_problems(resolved)
    if not problems:  # the config's rules with the real architectures (unread fields made them skip)
        problems += resolved.validate()
    if problems:
        raise ConfigError(problems, source=source or INPUTS_SOURCE)
    return resolved
