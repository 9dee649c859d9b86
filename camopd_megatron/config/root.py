"""The root :class:`Config` and its cross-section checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from camopd_megatron.config.errors import closest, problem
from camopd_megatron.config.moe import expert_layout_problems
from camopd_megatron.config.sections import (
    CONVERT_HINT,
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
    """The student's architecture and initial weights (each teacher's: ``teachers[i]``)."""
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
        problems += self._check_init()
        problems += self._check_teachers()
        problems += self._check_branches()
        problems += self._check_scale_mode()
        problems += self._check_layout()
        return problems

    def _check_scale_mode(self) -> list[str]:
        """``selection.scale_mode: lr`` needs one r for the whole step (docs/algorithm.md §5)."""
        sel = self.selection
        if sel.scale_mode != "lr":
            return []
        problems: list[str] = []
        if self.scheduler.mode == "mixed":
            scales = {b: self.loss.adv_scale.get(b) for b in self.scheduler.branches}
            if len(set(scales.values())) > 1:
                problems.append(problem(
                    "selection.scale_mode", "lr",
                    f"one learning-rate factor per step, but the mixed branches have different loss.adv_scale {scales}",
                    "use scale_mode: advantage, scheduler.mode: alternating, or equal loss.adv_scale",
                ))
        if not sel.enabled and sel.scale_only_selected and any(r != 1.0 for r in self.loss.adv_scale.values()):
            problems.append(problem(
                "selection.scale_mode", "lr",
                "r_b on every kept sample, but selection.enabled: false with scale_only_selected: true scales only "
                "the samples the rho-rule would keep",
                "set selection.scale_only_selected: false, or use scale_mode: advantage",
            ))
        return problems

    # ------------------------------------------------------------------ roles' models
    def teacher_model(self, index: int) -> tuple[ModelConfig, str]:
        """Teacher ``index``'s model config and the key its architecture is set under.

        ``teachers[i].model`` when given; a random-init teacher without one has the student's
        architecture (``model``); a checkpoint teacher without one has every architecture field
        unset until :func:`camopd_megatron.checkpoint.inputs.resolve_inputs` reads its manifest.
        The run settings (``seq_length``, ``transformer_impl``) are always the student's.
        """
        t = self.teachers[index]
        run = {"seq_length": self.model.seq_length, "transformer_impl": self.model.transformer_impl}
        if t.model is not None:
            return replace(t.model, **run), f"teachers[{index}].model"
        if t.init == "random":
            return replace(self.model, init="random", checkpoint=None), "model"
        return ModelConfig(init="checkpoint", checkpoint=t.checkpoint, **run), f"teachers[{index}].model"

    def _check_init(self) -> list[str]:
        """``init: checkpoint`` needs a checkpoint and ``init: random`` takes none: random weights are a choice."""
        problems: list[str] = []
        roles = [("model", self.model.init, self.model.checkpoint)]
        roles += [(f"teachers[{i}]", t.init, t.checkpoint) for i, t in enumerate(self.teachers)]
        for key, init, checkpoint in roles:
            if init == "checkpoint" and not checkpoint:
                problems.append(problem(
                    f"{key}.checkpoint", checkpoint, f"a converted checkpoint directory ({key}.init: checkpoint)",
                    CONVERT_HINT.format(key=f"{key}.checkpoint") + f"; or set {key}.init: random to train from random weights",
                ))
            elif init == "random" and checkpoint:
                problems.append(problem(
                    f"{key}.checkpoint", checkpoint, f"no checkpoint: {key}.init is random",
                    f"drop {key}.checkpoint, or set {key}.init: checkpoint",
                ))
        for i, t in enumerate(self.teachers):
            if t.model is None:
                continue
            for name in ("seq_length", "transformer_impl"):
                mine, student = getattr(t.model, name), getattr(self.model, name)
                if mine != student and mine != getattr(ModelConfig(), name):
                    problems.append(problem(
                        f"teachers[{i}].model.{name}", mine, f"the student's model.{name}={student!r} (a run setting every role shares)",
                        f"drop teachers[{i}].model.{name}",
                    ))
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
        """Separate teachers sharing a rank group must declare one layout; a group name is not another teacher's.

        A separate teacher's rank group is its ``group``, or its own name without one
        (:attr:`TeacherConfig.role_name`), so ``group: x`` next to a separate teacher named ``x``
        joins that teacher's group.
        """
        problems: list[str] = []
        first: dict[str, int] = {}
        named = {t.name: i for i, t in enumerate(self.teachers)}
        for i, t in enumerate(self.teachers):
            if t.placement != "separate":
                continue
            role = t.role_name
            j = first.setdefault(role, i)
            k = named.get(role)
            if j == i and k is not None and self.teachers[k].role_name != role:  # first use of the group name
                where = ("on the student's ranks" if self.teachers[k].placement == "colocated"
                         else f"in group {self.teachers[k].role_name!r}")
                problems.append(problem(
                    f"teachers[{i}].group", t.group, f"a group name that is not the name of teachers[{k}] (placed {where})",
                    "rename the group or the teacher",
                ))
            ref = self.teachers[j]
            for dim, mine, theirs in zip(("tp", "pp", "dp", "ep", "etp"), t.separate_layout + t.separate_experts,
                                         ref.separate_layout + ref.separate_experts):
                if dim == "etp" and t.etp is None and ref.etp is None:
                    continue  # both follow their own tp: a tp that differs is reported already
                if mine != theirs:
                    problems.append(problem(
                        f"teachers[{i}].{dim}", getattr(t, dim),
                        f"the layout of group {role!r} (teachers[{j}].{dim}={theirs})",
                        f"give every teacher of group {role!r} the same tp/pp/dp/ep/etp",
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
        if self.optim.branch_state == "per_branch" and self.scheduler.mode != "alternating":
            problems.append(problem(
                "optim.branch_state", self.optim.branch_state,
                f"shared with scheduler.mode={self.scheduler.mode!r} (a mixed step holds several branches, "
                "so it has no single branch's Adam moments to use)",
                "set optim.branch_state: shared, or scheduler.mode: alternating",
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
        """Every layout the model is split into (the student's, each separate teacher's) must divide it."""
        m, par = self.model, self.parallel
        problems = m.layout_problems(par.tp, par.pp, tp_key="parallel.tp", pp_key="parallel.pp")
        problems += m.recompute_problems(par.pp, pp_key="parallel.pp")
        if par.overlap_param_gather and not par.use_distributed_optimizer:
            problems.append(problem(
                "parallel.overlap_param_gather", True,
                "parallel.use_distributed_optimizer=true (only the distributed optimizer gathers parameters)",
                "set parallel.use_distributed_optimizer: true or parallel.overlap_param_gather: false",
            ))
        problems += self._check_experts()
        for i, t in enumerate(self.teachers):
            tm, prefix = self.teacher_model(i)
            if t.placement == "colocated":
                # runs on the student's ranks with the student's layout: its own architecture must split there too
                if prefix != "model":
                    problems += tm.layout_problems(par.tp, par.pp, tp_key="parallel.tp", pp_key="parallel.pp", prefix=prefix)
                for dim in ("tp", "pp", "dp", "ep", "etp"):
                    mine, student = getattr(t, dim), getattr(par, dim)
                    if mine is not None and student is not None and mine != student:
                        problems.append(problem(
                            f"teachers[{i}].{dim}", mine,
                            f"the student's parallel.{dim}={student} (a colocated teacher uses the student's layout)",
                            f"drop teachers[{i}].{dim}, set it to {student}, or use placement: separate",
                        ))
                continue
            tp, pp, _ = t.separate_layout
            problems += tm.layout_problems(tp, pp, tp_key=f"teachers[{i}].tp", pp_key=f"teachers[{i}].pp", prefix=prefix)
        return problems

    def _check_experts(self) -> list[str]:
        """Expert parallelism of every role (:func:`~camopd_megatron.config.moe.expert_layout_problems`): the
        student's (with the colocated teachers, which run on its groups) and each separate teacher group's."""
        par = self.parallel
        keys = {"tp": "parallel.tp", "dp": "parallel.dp", "ep": "parallel.ep", "etp": "parallel.etp",
                "sp": "parallel.sequence_parallel"}
        problems: list[str] = []
        on_student = [(self.model, "model.moe", par.sequence_parallel)]  # only the student trains: SP rule
        on_student += [(tm, f"{key}.moe", None) for tm, key in
                       (self.teacher_model(i) for i, t in enumerate(self.teachers) if t.placement == "colocated")
                       if key != "model"]
        if par.ep > 1 and all(m.moe is None and not m.arch_unset for m, _, _ in on_student):
            problems += expert_layout_problems(None, tp=par.tp, dp=par.dp, ep=par.ep, etp=par.etp, keys=keys,
                                               moe_key="model.moe")
        for m, moe_key, sp in on_student:
            if m.moe is not None:
                problems += expert_layout_problems(m.moe, tp=par.tp, dp=par.dp, ep=par.ep, etp=par.etp, keys=keys,
                                                   moe_key=moe_key, sequence_parallel=sp)
        for i, t in enumerate(self.teachers):
            if t.placement != "separate":
                continue
            tm, key = self.teacher_model(i)
            tp, _, dp = t.separate_layout
            tkeys = {d: f"teachers[{i}].{d}" for d in ("tp", "dp", "ep", "etp")}
            if tm.moe is None and tm.arch_unset:
                continue  # read from the checkpoint first
            problems += expert_layout_problems(tm.moe, tp=tp, dp=dp, ep=t.ep or 1, etp=t.etp, keys=tkeys,
                                               moe_key=f"{key}.moe")
        for i in range(len(self.teachers)):
            tm, key = self.teacher_model(i)
            if key != "model" and tm.moe is not None and tm.moe.routing_replay:
                problems.append(problem(f"{key}.moe.routing_replay", True, "false: routing replay replays the "
                                        "student's rollout in its own update; a teacher never trains",
                                        f"drop {key}.moe.routing_replay"))
        return problems


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = closest(word, choices)
    return f" (did you mean {close!r}?)" if close else ""
