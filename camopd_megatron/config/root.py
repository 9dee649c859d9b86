"""The root :class:`Config` and its cross-section checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from camopd_megatron.config.errors import closest, problem
from camopd_megatron.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
    RunConfig,
    SchedulerConfig,
    SelectionConfig,
    TeacherConfig,
)

__all__ = ["Config", "default_teachers"]


def default_teachers() -> list[TeacherConfig]:
    """The default pair: ``general`` scores the general branch, ``domain`` the domain branch."""
    return [
        TeacherConfig(name="general", branches=["general"]),
        TeacherConfig(name="domain", branches=["domain"]),
    ]


@dataclass
class Config:
    """The whole run: one section per part of the trainer."""

    run: RunConfig = field(default_factory=RunConfig)
    """Seed, length, output directory, log level."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student's (and teachers') architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The student's TP x PP x DP layout and backend."""
    teachers: list[TeacherConfig] = field(default_factory=default_teachers)
    """The frozen teachers, one per branch."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt files per branch, tokenizer, chat template."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """On-policy sampling."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Which branch each step trains on."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Gap-based sample selection."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and learning-rate schedule."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Parameter dtype and FP8."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard, diagnostics."""

    def validate(self) -> list[str]:
        """Every problem: each section's own checks, then the cross-section checks."""
        problems: list[str] = []
        for name in ("run", "model", "parallel", "data", "rollout", "scheduler", "selection", "loss",
                     "optim", "precision", "checkpoint", "eval", "logging"):
            problems += getattr(self, name).validate(name)
        for i, teacher in enumerate(self.teachers):
            problems += teacher.validate(f"teachers[{i}]")
        problems += self._check_teachers()
        problems += self._check_branches()
        problems += self._check_layout()
        return problems

    # ------------------------------------------------------------------ teachers
    def _check_teachers(self) -> list[str]:
        problems: list[str] = []
        if not self.teachers:
            problems.append(problem("teachers", [], "at least one teacher", "add a teacher per scheduled branch"))
        seen: dict[str, int] = {}
        owner: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            if t.name in seen:
                problems.append(problem(
                    f"teachers[{i}].name", t.name, f"a unique name (teachers[{seen[t.name]}] has it)", "rename one of them",
                ))
            seen.setdefault(t.name, i)
            if not t.branches:
                problems.append(problem(
                    f"teachers[{i}].branches", t.branches, f"the branches teacher {t.name!r} scores",
                    "list its branches (e.g. [general]) or remove the teacher",
                ))
            for b in t.branches:
                if b in owner and owner[b] != i:
                    problems.append(problem(
                        f"teachers[{i}].branches", t.branches,
                        f"branch {b!r} served by one teacher only (teachers[{owner[b]}] serves it)",
                        f"remove {b!r} from one of the two teachers",
                    ))
                owner.setdefault(b, i)
        problems += self._check_groups()
        return problems

    def _check_groups(self) -> list[str]:
        """Teachers sharing a rank group must declare the same layout."""
        problems: list[str] = []
        first: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            if t.group is None or t.placement != "separate":
                continue
            j = first.setdefault(t.group, i)
            ref = self.teachers[j]
            for dim in ("tp", "pp", "dp"):
                mine, theirs = getattr(t, dim) or 1, getattr(ref, dim) or 1
                if mine != theirs:
                    problems.append(problem(
                        f"teachers[{i}].{dim}", getattr(t, dim),
                        f"the layout of group {t.group!r} (teachers[{j}].{dim}={theirs})",
                        f"give every teacher of group {t.group!r} the same tp/pp/dp",
                    ))
        return problems

    # ------------------------------------------------------------------ branches
    def _check_branches(self) -> list[str]:
        problems: list[str] = []
        sched = self.scheduler.branches
        sched_key = "scheduler.pattern" if self.scheduler.mode == "alternating" else "scheduler.mixed_shares"
        served = [b for t in self.teachers for b in t.branches]
        data = list(self.data.branches)
        for b in sched:
            if b not in served:
                problems.append(problem(
                    sched_key, b, f"a branch some teacher serves (served: {sorted(set(served))})",
                    f"add {b!r} to one teacher's branches, or drop it from {sched_key}" + _did_you_mean(b, served),
                ))
            if data and b not in data:
                problems.append(problem(
                    sched_key, b, f"a branch of data.branches ({sorted(data)})",
                    f"add data.branches.{b}.paths, or drop {b!r} from {sched_key}" + _did_you_mean(b, data),
                ))
        known = set(sched) | set(served) | set(data)
        for key, mapping in (("selection.rho", self.selection.rho), ("selection.score", self.selection.score),
                             ("loss.adv_scale", self.loss.adv_scale)):
            for b in sched:
                if b not in mapping:
                    problems.append(problem(
                        key, mapping, f"a value for scheduled branch {b!r}", f"add {key}.{b}",
                    ))
            for b in mapping:
                if b not in known:
                    problems.append(problem(
                        f"{key}.{b}", mapping[b], f"a known branch (known: {sorted(known)})",
                        f"remove {b!r} or rename it" + _did_you_mean(b, known),
                    ))
        return problems

    # ------------------------------------------------------------------ layout
    def _check_layout(self) -> list[str]:
        problems: list[str] = []
        m = self.model
        _divides(problems, "parallel.tp", self.parallel.tp, m)
        _divides_layers(problems, "parallel.pp", self.parallel.pp, m)
        for i, t in enumerate(self.teachers):
            if t.placement == "colocated":
                # runs on the student's ranks with the student's layout (checked above)
                for dim in ("tp", "pp", "dp"):
                    mine, student = getattr(t, dim), getattr(self.parallel, dim)
                    if mine is not None and student is not None and mine != student:
                        problems.append(problem(
                            f"teachers[{i}].{dim}", mine,
                            f"the student's parallel.{dim}={student} (a colocated teacher uses the student's layout)",
                            f"drop teachers[{i}].{dim}, set it to {student}, or use placement: separate",
                        ))
                continue
            _divides(problems, f"teachers[{i}].tp", t.tp if t.tp is not None else 1, m)
            _divides_layers(problems, f"teachers[{i}].pp", t.pp if t.pp is not None else 1, m)
        return problems


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = closest(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


def _divides(problems: list[str], key: str, tp: Optional[int], m: ModelConfig) -> None:
    """TP must divide the padded vocabulary, the head count and the key/value head count."""
    if tp is None or tp <= 0:
        return  # reported by the section's own checks
    sizes = [("model.padded_vocab_size", m.padded_vocab_size), ("model.num_attention_heads", m.num_attention_heads)]
    if m.num_query_groups is not None:
        sizes.append(("model.num_query_groups", m.num_query_groups))
    for name, size in sizes:
        if size > 0 and size % tp:
            fix = f"use a TP size that divides {size}"
            if name == "model.padded_vocab_size" and m.vocab_pad_multiple > 0:
                fix += f" (or set model.vocab_pad_multiple to a multiple of {math.lcm(m.vocab_pad_multiple, tp)})"
            problems.append(problem(key, tp, f"a divisor of {name}={size}", fix))


def _divides_layers(problems: list[str], key: str, pp: Optional[int], m: ModelConfig) -> None:
    """PP must divide the number of layers (equal stages)."""
    if pp is None or pp <= 0 or m.num_layers <= 0:
        return
    if m.num_layers % pp:
        problems.append(problem(key, pp, f"a divisor of model.num_layers={m.num_layers}", "use a PP size that divides the layer count"))
