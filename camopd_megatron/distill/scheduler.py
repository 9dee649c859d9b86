"""Which branch(es) each optimizer step trains on (docs/algorithm.md §6: decoupling; vanilla mixing).

Two modes (``scheduler.mode``):

- ``alternating`` (CaMOPD): step s trains only on branch ``pattern[s % len(pattern)]`` with all of
  ``rollout.prompts_per_step`` prompts; default pattern ``[general, general, general, domain]``
  (n_g = 3). Any branch names and any length.
- ``mixed`` (vanilla MOPD, the −decoupling ablation): every step holds every branch of
  ``scheduler.mixed_shares``, with integer prompt counts proportional to the shares and summing to
  ``prompts_per_step``. Rounding is largest remainder: floors first, the leftover prompts go to the
  largest fractional parts, ties to the branch listed first. The counts are the same every step.

Steps are 0-based schedule positions. :meth:`BranchScheduler.plan` is a pure function of the
position; the object also keeps a cursor (:meth:`BranchScheduler.next_plan`) whose
``state_dict``/``load_state_dict`` make resume explicit. The cursor equals the run's step index
unless a step was skipped for non-finite teacher scores: :meth:`BranchScheduler.repeat_last` then
re-issues the same position, so a skip never drops a branch's turn from the G,G,G,D pattern.
Pure Python, no torch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from camopd_megatron.config.errors import ConfigError, problem

__all__ = ["StepPlan", "BranchScheduler", "largest_remainder_counts"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclass(frozen=True)
class StepPlan:
    """The branches of one optimizer step and how many prompts each gets (global over DP)."""

    step: int
    """0-based schedule position (the run's step index minus the steps skipped before it)."""
    phase: int
    """Position in the alternating pattern (``step % len(pattern)``); always 0 in mixed mode."""
    prompts: dict[str, int] = field(default_factory=dict)
    """Branch → prompts this step, in schedule order; alternating: exactly one entry."""

    @property
    def branches(self) -> list[str]:
        """Branches with at least one prompt this step."""
        return [b for b, n in self.prompts.items() if n > 0]

    @property
    def branch(self) -> Optional[str]:
        """The single branch of an alternating step; None when several branches share the step."""
        active = self.branches
        return active[0] if len(active) == 1 else None


def largest_remainder_counts(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Integer counts ∝ ``shares`` summing to ``total`` (largest remainder; ties → first listed).

    Example: shares {general: 3, domain: 1}, total 6 → exact 4.5 / 1.5 → floors 4 / 1, one left,
    tie of remainders 0.5 / 0.5 → general: {general: 5, domain: 1}.
    """
    names = list(shares)
    weight_sum = math.fsum(float(shares[b]) for b in names)
    exact = [total * float(shares[b]) / weight_sum for b in names]
    counts = [int(math.floor(x)) for x in exact]
    left = total - sum(counts)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return dict(zip(names, counts))


class BranchScheduler:
    """The branch schedule (module docstring), validated against the teachers and the prompt data."""

    def __init__(
        self,
        mode: str,
        pattern: Sequence[str],
        mixed_shares: Mapping[str, float],
        prompts_per_step: int,
        *,
        teacher_branches: Optional[Mapping[str, Sequence[str]]] = None,
        data_branches: Optional[Sequence[str]] = None,
    ) -> None:
        """Validate and build.

        Args:
            mode: ``alternating`` or ``mixed`` (``scheduler.mode``).
            pattern: branch names, one per step of a period (``scheduler.pattern``; alternating).
            mixed_shares: branch → relative share (``scheduler.mixed_shares``; mixed).
            prompts_per_step: prompts per optimizer step over all DP ranks (``rollout.prompts_per_step``).
            teacher_branches: teacher name → the branches it scores, in ``teachers`` order; every
                scheduled branch needs a teacher and every teacher must serve a scheduled branch.
                None skips both checks.
            data_branches: branches that have prompt files (``data.branches``); None = synthetic
                prompts for every branch (no check).

        Raises:
            ConfigError (a ValueError) listing every problem, each naming the config key.
        """
        self.mode = mode
        self.pattern = list(pattern)
        self.mixed_shares = {str(k): float(v) for k, v in mixed_shares.items()}
        self.prompts_per_step = prompts_per_step
        problems = self._validate(teacher_branches, data_branches)
        if problems:
            raise ConfigError(problems)
        self._mixed_counts = (
            largest_remainder_counts(self.mixed_shares, prompts_per_step) if mode == "mixed" else {}
        )
        self._next_step = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "BranchScheduler":
        """Build from a root :class:`camopd_megatron.config.Config` (scheduler, rollout, teachers, data)."""
        sched = cfg.scheduler
        return cls(
            sched.mode,
            sched.pattern,
            sched.mixed_shares,
            cfg.rollout.prompts_per_step,
            teacher_branches={t.name: list(t.branches) for t in cfg.teachers},
            data_branches=list(cfg.data.branches) if cfg.data.branches else None,
        )

    # ------------------------------------------------------------------ validation
    @property
    def _key(self) -> str:
        return "scheduler.pattern" if self.mode == "alternating" else "scheduler.mixed_shares"

    @property
    def branches(self) -> list[str]:
        """The scheduled branches in first-use order."""
        names = self.pattern if self.mode == "alternating" else list(self.mixed_shares)
        return list(dict.fromkeys(names))

    def _validate(
        self, teacher_branches: Optional[Mapping[str, Sequence[str]]], data_branches: Optional[Sequence[str]]
    ) -> list[str]:
        problems: list[str] = []
        if self.mode not in ("alternating", "mixed"):
            return [problem("scheduler.mode", self.mode, "'alternating' or 'mixed'", "use alternating (CaMOPD) or mixed (vanilla MOPD)")]
        if not (isinstance(self.prompts_per_step, int) and self.prompts_per_step > 0):
            problems.append(problem("rollout.prompts_per_step", self.prompts_per_step, "an integer > 0", "use e.g. 512"))
        if self.mode == "alternating":
            if not self.pattern or not all(isinstance(b, str) and b for b in self.pattern):
                problems.append(problem("scheduler.pattern", self.pattern, "a non-empty list of branch names",
                                        "e.g. [general, general, general, domain]"))
        else:
            if not self.mixed_shares:
                problems.append(problem("scheduler.mixed_shares", self.mixed_shares, "at least one branch", "e.g. {general: 1, domain: 1}"))
            for b, share in self.mixed_shares.items():
                if not (math.isfinite(share) and share > 0):
                    problems.append(problem(f"scheduler.mixed_shares.{b}", share, "a finite share > 0",
                                            "remove the branch or give it a positive share"))
            if not problems:
                counts = largest_remainder_counts(self.mixed_shares, self.prompts_per_step)
                starved = [b for b, n in counts.items() if n == 0]
                if starved:
                    problems.append(problem(
                        "rollout.prompts_per_step", self.prompts_per_step,
                        f"enough prompts for every mixed branch (counts {counts}; {starved} get none)",
                        "raise rollout.prompts_per_step or the starved branches' scheduler.mixed_shares",
                    ))
        scheduled = self.branches
        if teacher_branches is not None:
            served = {b for bs in teacher_branches.values() for b in bs}
            for b in scheduled:
                if b not in served:
                    problems.append(problem(self._key, b, f"a branch some teacher serves (served: {sorted(served)})",
                                            f"add {b!r} to a teacher's branches or drop it from {self._key}"))
            for i, (name, bs) in enumerate(teacher_branches.items()):
                if not set(bs) & set(scheduled):
                    problems.append(problem(
                        f"teachers[{i}].branches", list(bs),
                        f"at least one branch the schedule trains ({self._key} trains {scheduled}; teacher {name!r} "
                        "would never be used)",
                        f"add one of {list(bs)} to {self._key} (e.g. n_g >= 1) or remove teacher {name!r}",
                    ))
        if data_branches is not None:
            for b in scheduled:
                if b not in data_branches:
                    problems.append(problem(self._key, b, f"a branch with prompts in data.branches ({sorted(data_branches)})",
                                            f"add data.branches.{b}.paths or drop {b!r} from {self._key}"))
        return problems

    # ------------------------------------------------------------------ schedule
    def _check_step(self, step: int) -> None:
        if not (isinstance(step, int) and step >= 0):
            raise ValueError(f"step: got {step!r}; expected a 0-based optimizer step >= 0")

    def phase(self, step: int) -> int:
        """Position of ``step`` in the pattern (``step % len(pattern)``); 0 in mixed mode."""
        self._check_step(step)
        return step % len(self.pattern) if self.mode == "alternating" else 0

    def plan(self, step: int) -> dict[str, int]:
        """Branch → prompts for ``step`` (global over DP; sums to ``prompts_per_step``)."""
        self._check_step(step)
        if self.mode == "alternating":
            return {self.pattern[step % len(self.pattern)]: self.prompts_per_step}
        return dict(self._mixed_counts)

    def step_plan(self, step: int) -> StepPlan:
        """:meth:`plan` and :meth:`phase` of ``step`` as one :class:`StepPlan`."""
        return StepPlan(step=step, phase=self.phase(step), prompts=self.plan(step))

    def next_plan(self) -> StepPlan:
        """The plan at the cursor, then advance the cursor (the trainer calls this once per step)."""
        out = self.step_plan(self._next_step)
        self._next_step += 1
        return out

    def repeat_last(self) -> None:
        """Step the cursor back by one: the last plan's step was skipped (no update; non-finite teacher
        log-probs), so the next :meth:`next_plan` re-issues the same branch(es) and phase."""
        if self._next_step == 0:
            raise ValueError("scheduler.repeat_last: no plan was issued yet")
        self._next_step -= 1

    @property
    def next_step(self) -> int:
        """The step :meth:`next_plan` returns next."""
        return self._next_step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Cursor and the schedule definition (plain Python; JSON/pickle friendly)."""
        return {
            "version": _STATE_VERSION,
            "next_step": self._next_step,
            "mode": self.mode,
            "pattern": list(self.pattern),
            "mixed_shares": dict(self.mixed_shares),
            "prompts_per_step": self.prompts_per_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor. A different saved schedule is allowed (changing it on resume is a
        user decision) but logged as a warning; the current config's schedule wins."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"scheduler state: got version {state.get('version')!r}; expected {_STATE_VERSION}. "
                             "Fix: resume with the code version that wrote the checkpoint")
        step = state.get("next_step")
        if not (isinstance(step, int) and step >= 0):
            raise ValueError(f"scheduler state: got next_step {step!r}; expected an integer >= 0")
        mine = self.state_dict()
        changed = [k for k in ("mode", "pattern", "mixed_shares", "prompts_per_step") if state.get(k) != mine[k]]
        if changed:
            logger.warning(
                "scheduler: resuming with a different schedule (%s): checkpoint %s, config %s",
                ", ".join(changed), {k: state.get(k) for k in changed}, {k: mine[k] for k in changed},
            )
        self._next_step = step
