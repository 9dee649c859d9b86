"""Role layout of a torchrun world and the per-role megatron-core process groups.

A world of W ranks is split into **roles**: the student on ranks [0, S) with TP × PP × DP, then one
rank range per *separate* teacher group, each with its own TP × PP × DP. Teachers naming the same
``group`` share one range (time-shared) and must declare the same layout; *colocated* teachers live
on the student's ranks with the student's layout.

Two layers:

* :class:`RoleLayout` is pure (no torch.distributed): built from the validated config and the
  world size only, so every rank computes the same layout and raises the same error before any
  process group exists. The config's own validation checks every rule it can see (divisibility,
  teacher names, placements, group layouts); the layout adds the one rule that needs the world
  size: the student and the teacher groups must fill it exactly (:class:`LayoutError`). It prints
  the rank map, answers "which role owns rank r" and routes each student DP replica to a teacher
  DP replica (round-robin) for the scoring service.
* :func:`build_process_groups` creates every role's groups on every rank in one fixed order
  (torch requires all ranks to take part in every ``new_group``) and returns the caller's own
  :class:`RankGroups`. megatron's global parallel state is never initialised.

Rank order inside a role follows :data:`GRID_DIMS` (first = fastest varying), the same order the
role's ``HyperCommGrid`` uses: ``rank = offset + tp + TP * (pp + PP * dp)``, so each DP replica
is a contiguous rank block.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

from camopd_megatron.config import Config, ConfigError
from camopd_megatron.config.errors import problem
from camopd_megatron.config.moe import expert_layout_problems, lock_step_needed
from camopd_megatron.config.sections import STUDENT_ROLE

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

GRID_DIMS: tuple[str, ...] = ("tp", "pp", "dp")
"""Order of the grid dimensions, fastest varying first (``HyperCommGrid`` ``dim_names`` order)."""

_DETAILED_RANK_MAP_MAX = 64
_REPLICAS_SHOWN = 3


class LayoutError(ConfigError):
    """The config's layout does not fit the world size (a :class:`ConfigError`); ``problems`` lists every problem."""

    def __init__(self, problems: Sequence[str]):
        super().__init__(problems, source="the role layout for this world size (parallel.*, teachers[*])")


@dataclass(frozen=True)
class RankCoords:
    """Position of a rank inside its role's grid."""

    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class Role:
    """A contiguous rank range running one TP × PP × DP grid (the student, or one teacher group)."""

    name: str
    kind: Literal["student", "teacher"]
    tp: int
    pp: int
    dp: int
    rank_offset: int
    teachers: tuple[str, ...] = ()
    """Teachers hosted on these ranks (for the student: the colocated teachers)."""
    ep: int = 1
    """Expert-parallel size of the MoE layers (``models.groups``: the TP x DP ranks of a stage regrouped)."""
    etp: int = 0
    """Expert tensor-parallel size; 0 = :attr:`tp` (see :attr:`expert_tp`)."""

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size (``etp``, or ``tp`` when 0)."""
        return self.etp or self.tp

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.size)

    @property
    def layout_str(self) -> str:
        experts = "" if self.ep == 1 and self.expert_tp == self.tp else f" (ep{self.ep}×etp{self.expert_tp})"
        return f"tp{self.tp}×pp{self.pp}×dp{self.dp}{experts}"

    def coords(self, rank: int) -> RankCoords:
        """Grid coordinates of a global ``rank`` of this role."""
        if rank not in self.ranks:
            raise KeyError(f"rank {rank} is not in role {self.name!r} (ranks {_span(self.ranks)})")
        local = rank - self.rank_offset
        return RankCoords(tp=local % self.tp, pp=(local // self.tp) % self.pp, dp=local // (self.tp * self.pp))

    def rank_at(self, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        """Global rank at grid coordinates (inverse of :meth:`coords`)."""
        assert 0 <= tp < self.tp and 0 <= pp < self.pp and 0 <= dp < self.dp, (tp, pp, dp, self)
        return self.rank_offset + tp + self.tp * (pp + self.pp * dp)

    def replica_ranks(self, dp: int) -> tuple[int, ...]:
        """All ranks of DP replica ``dp`` (one model copy: TP × PP ranks)."""
        return tuple(self.rank_at(t, p, dp) for p in range(self.pp) for t in range(self.tp))

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Expected rank lists of every ``dim`` group (``tp``, ``pp`` or ``dp``) of this role."""
        sizes = {"tp": self.tp, "pp": self.pp, "dp": self.dp}
        if dim not in sizes:
            raise KeyError(f"unknown grid dimension {dim!r}; use one of {sorted(sizes)}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for r in self.ranks:
            c = self.coords(r)
            key = tuple(getattr(c, d) for d in GRID_DIMS if d != dim)
            groups.setdefault(key, []).append(r)
        return list(groups.values())


@dataclass(frozen=True)
class Route:
    """Which student ranks talk to which teacher ranks for one student DP replica.

    The student's ``student_rank`` (TP 0 of the last pipeline stage, where the loss is computed)
    sends token ids to ``teacher_input_rank`` (TP 0, first stage of the serving teacher replica)
    and receives the per-token log-probs from ``teacher_output_rank`` (TP 0, last stage). Both
    sides broadcast inside their replica as needed. Colocated teachers need no messages.
    """

    teacher: str
    student_dp: int
    teacher_dp: int
    student_ranks: tuple[int, ...]
    teacher_ranks: tuple[int, ...]
    student_rank: int
    teacher_input_rank: int
    teacher_output_rank: int
    colocated: bool


@dataclass(frozen=True)
class RoleLayout:
    """The validated split of a world into roles (build with :meth:`from_config`)."""

    world_size: int
    roles: tuple[Role, ...]
    teacher_role: dict[str, str] = field(default_factory=dict)
    """Teacher name → name of the role hosting it (``"student"`` for colocated teachers)."""
    sequence_parallel: bool = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "RoleLayout":
        """Place the student (``parallel.*``; ``dp: null`` → from the ranks left) and the teachers (``teachers[*]``).

        Raises :class:`ConfigError` with the config's own problems if it does not validate, then
        :class:`LayoutError` if the roles do not fill ``world_size`` exactly; no torch.distributed
        call is made.
        """
        problems = cfg.validate()
        if problems:
            raise ConfigError(problems)
        return _plan(cfg, world_size)

    # ---------------------------------------------------------------- queries
    @property
    def student(self) -> Role:
        return self.roles[0]

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(self.teacher_role)

    def role(self, name: str) -> Role:
        """Role by name (``"student"`` or a teacher group name)."""
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(f"no role named {name!r}; roles are {[r.name for r in self.roles]}")

    def role_of(self, rank: int) -> Role:
        """The role owning global ``rank``."""
        for r in self.roles:
            if rank in r.ranks:
                return r
        raise KeyError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def ranks_of(self, role: str) -> range:
        """Global ranks of a role (a role name, or a teacher name → its hosting role)."""
        if role in self.teacher_role:
            role = self.teacher_role[role]
        return self.role(role).ranks

    def teacher_groups(self) -> dict[str, tuple[str, ...]]:
        """Role name → the teachers it hosts (colocated teachers under ``"student"``)."""
        return {r.name: r.teachers for r in self.roles if r.teachers}

    def routes(self, teacher: str) -> list[Route]:
        """One :class:`Route` per student DP replica: student replica d → teacher replica d mod DP_t."""
        if teacher not in self.teacher_role:
            raise KeyError(f"unknown teacher {teacher!r}; teachers are {list(self.teacher_role)}")
        s, t = self.student, self.role(self.teacher_role[teacher])
        out = []
        for d in range(s.dp):
            td = d if t is s else d % t.dp
            out.append(
                Route(
                    teacher=teacher,
                    student_dp=d,
                    teacher_dp=td,
                    student_ranks=s.replica_ranks(d),
                    teacher_ranks=t.replica_ranks(td),
                    student_rank=s.rank_at(0, s.pp - 1, d),
                    teacher_input_rank=t.rank_at(0, 0, td),
                    teacher_output_rank=t.rank_at(0, t.pp - 1, td),
                    colocated=t is s,
                )
            )
        return out

    # ---------------------------------------------------------------- printing
    def summary(self) -> str:
        """One line per role: name, rank range, layout, hosted teachers."""
        w = max(len(r.name) for r in self.roles)
        lines = [f"world {self.world_size} ranks, {len(self.roles)} role(s), grid order {'-'.join(GRID_DIMS)}"]
        for r in self.roles:
            hosted = ", ".join(r.teachers) if r.teachers else "-"
            label = "colocated teachers" if r.kind == "student" else "teachers"
            lines.append(
                f"  {r.name:<{w}}  ranks {_span(r.ranks):<11} {r.layout_str:<14} ({r.size} ranks)  {label}: {hosted}"
            )
        return "\n".join(lines)

    def rank_map(self, detailed: bool | None = None) -> str:
        """Printable rank → role table; compact (rank ranges per replica) for large worlds.

        ``detailed=None`` prints one row per rank up to 64 ranks, rank ranges beyond.
        """
        if detailed is None:
            detailed = self.world_size <= _DETAILED_RANK_MAP_MAX
        if detailed:
            rows = [("rank", "role", "teachers", "tp", "pp", "dp")]
            for r in self.roles:
                hosted = ",".join(r.teachers) or "-"
                for rank in r.ranks:
                    c = r.coords(rank)
                    rows.append((str(rank), r.name, hosted, str(c.tp), str(c.pp), str(c.dp)))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            return "\n".join("  ".join(v.ljust(wd) for v, wd in zip(row, widths)).rstrip() for row in rows)
        lines = []
        for r in self.roles:
            hosted = ",".join(r.teachers) or "-"
            lines.append(
                f"ranks {_span(r.ranks)}: {r.name} {r.layout_str} teachers={hosted} "
                f"(rank = {r.rank_offset} + tp + {r.tp}*pp + {r.tp * r.pp}*dp)"
            )
            shown = list(range(min(r.dp, _REPLICAS_SHOWN)))
            if r.dp > _REPLICAS_SHOWN:
                shown.append(r.dp - 1)
            for i, d in enumerate(shown):
                if i == _REPLICAS_SHOWN and d != shown[i - 1] + 1:
                    lines.append(f"    ... {d - shown[i - 1] - 1} more replica(s)")
                reps = r.replica_ranks(d)
                lines.append(f"    dp {d}: ranks {min(reps)}-{max(reps)}")
        return "\n".join(lines)


# -------------------------------------------------------------------- planning (pure)
def _span(ranks: range) -> str:
    return f"{ranks.start}" if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


def _plan(cfg: Config, world_size: int) -> RoleLayout:
    """The layout of a validated config: colocated teachers on the student, one role per separate group."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError([f"world size (WORLD_SIZE)={world_size!r}: must be a positive integer; launch at least one rank"])
    par = cfg.parallel
    colocated = [t.name for t in cfg.teachers if t.placement == "colocated"]
    groups: dict[str, list[str]] = {}
    group_dims: dict[str, tuple[int, int, int]] = {}
    group_experts: dict[str, tuple[int, int]] = {}
    for t in cfg.teachers:
        if t.placement == "separate":
            groups.setdefault(t.role_name, []).append(t.name)
            group_dims.setdefault(t.role_name, t.separate_layout)  # members agree (config validation)
            group_experts.setdefault(t.role_name, t.separate_experts)
    problems: list[str] = []
    dp = _student_dp(world_size, par.tp, par.pp, par.dp, group_dims, problems)
    if problems:
        raise LayoutError(problems)

    assert dp is not None
    if par.dp is None:  # derived here: the expert groups must tile it (config validation could not check)
        keys = {"tp": "parallel.tp", "dp": "parallel.dp (derived from the world size)", "ep": "parallel.ep",
                "etp": "parallel.etp"}
        models = [(cfg.model, "model.moe")] + [cfg.teacher_model(i) for i, t in enumerate(cfg.teachers)
                                               if t.placement == "colocated"]
        for m, key in models:
            if m.moe is not None:
                problems += expert_layout_problems(m.moe, tp=par.tp, dp=dp, ep=par.ep, etp=par.etp, keys=keys,
                                                   moe_key=key if key.endswith(".moe") else f"{key}.moe")
        if problems:
            raise LayoutError(sorted(set(problems)))
    roles = [Role(STUDENT_ROLE, "student", par.tp, par.pp, dp, 0, tuple(colocated), par.ep, par.etp or par.tp)]
    for gname, names in groups.items():
        roles.append(Role(gname, "teacher", *group_dims[gname], roles[-1].ranks.stop, tuple(names),
                          *group_experts[gname]))
    assert roles[-1].ranks.stop == world_size, (roles, world_size)
    problems += _lock_step_routing_problems(cfg, roles)
    if problems:
        raise LayoutError(problems)
    teacher_role = {t.name: t.role_name for t in cfg.teachers}  # config order
    return RoleLayout(world_size, tuple(roles), teacher_role, par.sequence_parallel)


def _lock_step_routing_problems(cfg: Config, roles: list[Role]) -> list[str]:
    """A teacher group whose MoE teachers run in lock-step (EP groups across its replicas) needs the same
    requests on every replica: each must serve the same number of student replicas (``routes``: student
    replica d → teacher replica d mod DP_t), so the student's DP must be a multiple of the group's."""
    problems: list[str] = []
    student = roles[0]
    for role in roles[1:]:
        first = next(i for i, t in enumerate(cfg.teachers) if t.name in role.teachers)
        moe = any(cfg.teacher_model(i)[0].moe is not None for i, t in enumerate(cfg.teachers) if t.name in role.teachers)
        if moe and lock_step_needed(role.tp, role.ep, role.expert_tp) and student.dp % role.dp:
            problems.append(problem(
                f"teachers[{first}].dp", role.dp,
                f"a divisor of the student's DP={student.dp}: its expert-parallel groups span its replicas, which "
                "therefore run in lock-step and must each serve the same number of student replicas",
                f"set teachers[{first}].dp to a divisor of {student.dp} (or teachers[{first}].ep so that its EP "
                "groups stay inside one replica)"))
    return problems


def _student_dp(
    world_size: int, tp: int, pp: int, dp: int | None, group_dims: dict[str, tuple[int, int, int]], problems: list[str]
) -> int | None:
    """The student's DP (derived when None); the world must be exactly student + teacher groups."""
    teacher_total = sum(a * b * c for a, b, c in group_dims.values())
    sizes = " + ".join(f"teacher group {g!r} {a * b * c} (tp{a}×pp{b}×dp{c})" for g, (a, b, c) in group_dims.items())
    if dp is None:
        left = world_size - teacher_total
        if left >= tp * pp and left % (tp * pp) == 0:
            return left // (tp * pp)
        problems.append(
            f"parallel.dp=null: the {left} rank(s) left for the student after the teacher groups "
            f"({sizes or 'none'}) out of world size {world_size} are not a positive multiple of "
            f"parallel.tp×parallel.pp={tp * pp}; change the world size or set parallel.dp"
        )
        return None
    total = tp * pp * dp + teacher_total
    if total != world_size:
        parts = f"student {tp * pp * dp} (tp{tp}×pp{pp}×dp{dp})" + (f" + {sizes}" if sizes else "")
        problems.append(
            f"world size {world_size} != sum of role sizes {total} = {parts}; "
            f"launch {total} ranks or change parallel.* / teachers[*].tp/pp/dp"
        )
    return dp


# -------------------------------------------------------------------- process groups
@dataclass
class RankGroups:
    """This rank's role and its megatron-core process groups (other roles' groups are not kept).

    ``pg_collection`` is what ``GPTModel(pg_collection=...)``, the pipeline schedules, DDP and the
    optimizer take. On the student's ranks it also serves the colocated teachers.
    """

    layout: RoleLayout
    rank: int
    role: Role
    pg_collection: ProcessGroupCollection
    """This rank's role's process groups."""
    role_group: ProcessGroup
    """A process group over all of this role's ranks."""

    @property
    def role_name(self) -> str:
        return self.role.name

    @property
    def coords(self) -> RankCoords:
        return self.role.coords(self.rank)

    @property
    def ranks(self) -> range:
        return self.role.ranks

    tp_rank = property(lambda self: self.coords.tp, doc="TP rank inside the role")
    pp_rank = property(lambda self: self.coords.pp, doc="PP stage inside the role")
    dp_rank = property(lambda self: self.coords.dp, doc="DP replica inside the role")
    tp_size = property(lambda self: self.role.tp, doc="the role's TP size")
    pp_size = property(lambda self: self.role.pp, doc="the role's PP size")
    dp_size = property(lambda self: self.role.dp, doc="the role's DP size")
    is_student = property(lambda self: self.role.kind == "student", doc="this rank is a student rank")
    hosted_teachers = property(lambda self: self.role.teachers, doc="teachers served on this rank")

    @property
    def student_pg_collection(self) -> ProcessGroupCollection:
        """The student's collection (on student ranks only; colocated teachers run on it)."""
        if not self.is_student:
            raise KeyError(f"rank {self.rank} is in role {self.role.name!r}, not the student")
        return self.pg_collection

    def teacher_pg_collection(self, teacher: str) -> ProcessGroupCollection:
        """Collection a hosted teacher's model runs on (the student's for colocated teachers)."""
        if teacher not in self.role.teachers:
            raise KeyError(
                f"teacher {teacher!r} is not hosted on rank {self.rank} (role {self.role.name!r} "
                f"hosts {list(self.role.teachers)})"
            )
        return self.pg_collection


def build_process_groups(layout: RoleLayout, rank: int, *, timeout_s: float | None = None) -> RankGroups:
    """Create every role's process groups (collective over the world) and return this rank's.

    Every rank must call this with the same ``layout``: torch requires all ranks to take part in
    every group creation, in the same order, members or not. megatron's global parallel state is
    not touched. ``timeout_s`` applies to the intra-role group (None: torch's default).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed; call init_distributed() first")
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(
            [f"the layout was planned for world size {layout.world_size} but torch.distributed has "
             f"{dist.get_world_size()} ranks; plan the layout with the launched world size"]
        )
    own = layout.role_of(rank)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    mine: tuple[ProcessGroupCollection, ProcessGroup] | None = None
    for role in layout.roles:  # same order on every rank
        pgc = role_pg_collection(role, timeout=timeout)
        role_group = dist.new_group(list(role.ranks), timeout=timeout)
        if role is own:
            mine = (pgc, role_group)
    assert mine is not None
    groups = RankGroups(layout, rank, own, mine[0], mine[1])
    _check_own_groups(groups)
    logger.info(
        "rank %d: role %s tp %d/%d pp %d/%d dp %d/%d", rank, own.name,
        groups.tp_rank, own.tp, groups.pp_rank, own.pp, groups.dp_rank, own.dp,
    )
    return groups


def role_pg_collection(role: Role, *, timeout: datetime.timedelta | None = None) -> ProcessGroupCollection:
    """A role's ``ProcessGroupCollection`` (collective over the world; see ``models.groups``)."""
    from camopd_megatron.models.groups import simple_pg_collection

    return simple_pg_collection(role.tp, role.pp, role.dp, role.rank_offset, timeout=timeout, ep=role.ep,
                                etp=role.expert_tp)


def _check_own_groups(groups: RankGroups) -> None:
    """Internal invariant: the groups megatron got match the layout's coordinates."""
    import torch.distributed as dist

    role, pgc = groups.role, groups.pg_collection
    for dim in ("tp", "pp", "dp"):
        pg = getattr(pgc, dim)
        expected = next(g for g in role.group_ranks(dim) if groups.rank in g)
        got = dist.get_process_group_ranks(pg)
        assert got == expected, f"{dim} group of rank {groups.rank}: {got} != layout's {expected}"
