"""Role layout of a torchrun world and the per-role megatron-core process groups.

A world of W ranks is split into **roles**: the student on ranks [0, S) with TP × PP × DP, then one
rank range per *separate* teacher group, each with its own TP × PP × DP. Teachers naming the same
``group`` share one range (time-shared) and must declare the same layout; *colocated* teachers live
on the student's ranks with the student's layout.

Two layers:

* :class:`RoleLayout` is pure (no torch.distributed): built from the config and the world size
  only, so every rank computes the same layout and raises the same :class:`LayoutError` (all
  problems at once) before any process group exists. It prints the rank map, answers
  "which role owns rank r" and routes each student DP replica to a teacher DP replica
  (round-robin) for the scoring service.
* :func:`build_process_groups` creates every role's groups on every rank in one fixed order
  (torch requires all ranks to take part in every ``new_group``) and returns the caller's own
  :class:`RankGroups`. megatron's global parallel state is never initialised.

Rank order inside a role follows :data:`GRID_DIMS` (first = fastest varying), the same order the
role's ``HyperCommGrid`` uses: ``rank = offset + tp + TP * (pp + PP * dp)``, so each DP replica
is a contiguous rank block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

from camopd_megatron.config.errors import ConfigError

logger = logging.getLogger(__name__)

GRID_DIMS: tuple[str, ...] = ("tp", "pp", "dp")
"""Order of the grid dimensions, fastest varying first (``HyperCommGrid`` ``dim_names`` order)."""

STUDENT = "student"
PLACEMENTS = ("separate", "colocated")
_DETAILED_RANK_MAP_MAX = 64
_REPLICAS_SHOWN = 3


class LayoutError(ConfigError):
    """One or more problems with the role layout (a :class:`ConfigError`); ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str]):
        super().__init__(problems, source="the parallel layout (parallel.*, teachers[*], model.*)")


@dataclass(frozen=True)
class ModelDims:
    """The model sizes a parallel layout must divide (``model.*`` config keys)."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int | None = None
    padded_vocab_size: int | None = None
    ffn_hidden_size: int | None = None


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher's placement (as ``TeacherConfig``). ``tp/pp/dp=None``: 1 if separate, the student's if colocated."""

    name: str
    placement: str = "colocated"
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    group: str | None = None
    model: ModelDims | None = None


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

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.size)

    @property
    def layout_str(self) -> str:
        return f"tp{self.tp}×pp{self.pp}×dp{self.dp}"

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
    """The validated split of a world into roles (build with :meth:`plan` or :meth:`from_config`)."""

    world_size: int
    roles: tuple[Role, ...]
    teacher_role: dict[str, str] = field(default_factory=dict)
    """Teacher name → name of the role hosting it (``"student"`` for colocated teachers)."""
    sequence_parallel: bool = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def plan(
        cls,
        world_size: int,
        *,
        tp: int = 1,
        pp: int = 1,
        dp: int | None = None,
        teachers: Iterable[TeacherSpec] = (),
        model: ModelDims | None = None,
        sequence_parallel: bool = False,
    ) -> "RoleLayout":
        """Validate and place the student (TP × PP × DP; ``dp=None`` → from the ranks left) and teachers.

        Raises :class:`LayoutError` listing every problem; no torch.distributed call is made.
        """
        return _plan(world_size, tp, pp, dp, tuple(teachers), model, sequence_parallel)

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> "RoleLayout":
        """Layout from the root config (``parallel``, ``teachers``, ``model`` sections)."""
        par, mcfg = cfg.parallel, cfg.model
        student_model = _model_dims(mcfg)
        teachers = []
        for t in getattr(cfg, "teachers", None) or ():
            tmodel = getattr(t, "model", None)
            teachers.append(
                TeacherSpec(
                    name=t.name,
                    placement=getattr(t, "placement", "colocated"),
                    tp=getattr(t, "tp", None),
                    pp=getattr(t, "pp", None),
                    dp=getattr(t, "dp", None),
                    group=getattr(t, "group", None),
                    model=_model_dims(tmodel) if tmodel is not None else None,
                )
            )
        return cls.plan(
            world_size,
            tp=par.tp,
            pp=par.pp,
            dp=par.dp,
            teachers=teachers,
            model=student_model,
            sequence_parallel=bool(getattr(par, "sequence_parallel", False)),
        )

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
            label = "colocated teachers" if r.kind == STUDENT else "teachers"
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


def _model_dims(m: Any) -> ModelDims:
    return ModelDims(
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=getattr(m, "num_query_groups", None),
        padded_vocab_size=getattr(m, "padded_vocab_size", None),
        ffn_hidden_size=getattr(m, "ffn_hidden_size", None),
    )


def _positive_int(value: Any, key: str, problems: list[str], *, allow_none: bool = False) -> bool:
    if value is None and allow_none:
        return True
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}={value!r}: must be a positive integer")
        return False
    return True


def _check_divides(tp: int, pp: int, model: ModelDims | None, prefix: str, who: str, problems: list[str]) -> None:
    """TP must divide heads / query groups / padded vocab / ffn; PP must divide the layers."""
    if model is None:
        return
    heads = model.num_attention_heads
    groups = model.num_query_groups if model.num_query_groups is not None else heads
    for what, key, value in (
        ("num_attention_heads", "model.num_attention_heads", heads),
        ("num_query_groups", "model.num_query_groups", groups),
        ("padded_vocab_size", "model.padded_vocab_size", model.padded_vocab_size),
        ("ffn_hidden_size", "model.ffn_hidden_size", model.ffn_hidden_size),
    ):
        if value is not None and value % tp:
            problems.append(
                f"{prefix}.tp={tp} ({who}) does not divide {key}={value}; "
                f"choose a tp that divides {what}"
            )
    if model.num_layers % pp:
        problems.append(
            f"{prefix}.pp={pp} ({who}) does not divide model.num_layers={model.num_layers}; "
            f"choose a pp that divides the layer count"
        )


def _plan(
    world_size: int,
    tp: int,
    pp: int,
    dp: int | None,
    teachers: tuple[TeacherSpec, ...],
    model: ModelDims | None,
    sequence_parallel: bool,
) -> RoleLayout:
    problems: list[str] = []
    if not _positive_int(world_size, "world size (WORLD_SIZE)", problems):
        raise LayoutError(problems)
    ok = _positive_int(tp, "parallel.tp", problems) & _positive_int(pp, "parallel.pp", problems)
    ok &= _positive_int(dp, "parallel.dp", problems, allow_none=True)
    if ok:
        _check_divides(tp, pp, model, "parallel", "student", problems)
    colocated, groups = _sort_teachers(teachers, (tp, pp, dp) if ok else None, problems)
    group_dims = _group_layouts(groups, model, problems)
    if ok and len(group_dims) == len(groups):
        dp = _student_dp(world_size, tp, pp, dp, group_dims, problems)
    if problems:
        raise LayoutError(problems)

    assert dp is not None
    roles = [Role(STUDENT, "student", tp, pp, dp, 0, tuple(colocated))]
    teacher_role = {n: STUDENT for n in colocated}
    for gname, members in groups.items():
        names = tuple(t.name for _, t in members)
        roles.append(Role(gname, "teacher", *group_dims[gname], roles[-1].ranks.stop, names))
        teacher_role.update({n: gname for n in names})
    assert roles[-1].ranks.stop == world_size, (roles, world_size)
    teacher_role = {t.name: teacher_role[t.name] for t in teachers}  # config order
    return RoleLayout(world_size, tuple(roles), teacher_role, sequence_parallel)


def _sort_teachers(
    teachers: tuple[TeacherSpec, ...],
    student: tuple[int, int, int | None] | None,
    problems: list[str],
) -> tuple[list[str], dict[str, list[tuple[int, TeacherSpec]]]]:
    """Check names and placements; split into colocated names and separate groups (role → members)."""
    seen: set[str] = set()
    colocated: list[str] = []
    groups: dict[str, list[tuple[int, TeacherSpec]]] = {}
    for i, t in enumerate(teachers):
        key = f"teachers[{i}]"
        if not t.name or not isinstance(t.name, str):
            problems.append(f"{key}.name={t.name!r}: every teacher needs a non-empty name")
        elif t.name in seen or t.name == STUDENT:
            problems.append(
                f"{key}.name={t.name!r}: duplicate (or reserved) teacher name; give each teacher a unique name"
            )
        elif t.placement not in PLACEMENTS:
            seen.add(t.name)
            problems.append(f"{key}.placement={t.placement!r}: use one of {' | '.join(PLACEMENTS)}")
        elif t.placement == "colocated":
            seen.add(t.name)
            colocated.append(t.name)
            if t.group is not None:
                problems.append(
                    f"{key}.group={t.group!r}: a colocated teacher runs on the student's ranks; "
                    f"drop 'group' or use placement: separate"
                )
            if student is not None:
                for dim, val, sval in zip(("tp", "pp", "dp"), (t.tp, t.pp, t.dp), student):
                    if val is not None and sval is not None and val != sval:
                        problems.append(
                            f"{key}.{dim}={val} (teacher {t.name!r}): a colocated teacher uses the "
                            f"student's layout (parallel.{dim}={sval}); drop {dim} or set it to {sval}"
                        )
                _check_divides(student[0], student[1], t.model, key, f"colocated teacher {t.name!r}", problems)
        elif t.group == STUDENT:
            seen.add(t.name)
            problems.append(f"{key}.group={t.group!r}: 'student' is reserved; pick another group name")
        else:
            seen.add(t.name)
            groups.setdefault(t.group or t.name, []).append((i, t))
    placed_in = {t.name: (STUDENT if t.placement == "colocated" else (t.group or t.name)) for t in teachers}
    for gname in groups:
        if gname in placed_in and placed_in[gname] != gname:
            problems.append(
                f"teacher group {gname!r} has the same name as teacher {gname!r}, which is placed elsewhere; "
                f"rename the group or the teacher"
            )
    return colocated, groups


def _group_layouts(
    groups: dict[str, list[tuple[int, TeacherSpec]]], model: ModelDims | None, problems: list[str]
) -> dict[str, tuple[int, int, int]]:
    """One (tp, pp, dp) per teacher group; members must agree and divide their models."""
    group_dims: dict[str, tuple[int, int, int]] = {}
    for gname, members in groups.items():
        layouts, valid = {}, True
        for i, t in members:
            for dim in ("tp", "pp", "dp"):
                valid &= _positive_int(getattr(t, dim), f"teachers[{i}].{dim}", problems, allow_none=True)
            layouts[t.name] = (t.tp or 1, t.pp or 1, t.dp or 1)
        if not valid:
            continue
        if len(set(layouts.values())) > 1:
            desc = ", ".join(f"{n}: tp{a}×pp{b}×dp{c}" for n, (a, b, c) in layouts.items())
            problems.append(
                f"teachers sharing group {gname!r} declare different layouts ({desc}); "
                f"teachers of one group must use the same tp/pp/dp"
            )
            continue
        group_dims[gname] = gtp, gpp, _ = next(iter(layouts.values()))
        for i, t in members:
            _check_divides(gtp, gpp, t.model or model, f"teachers[{i}]", f"teacher {t.name!r}", problems)
    return group_dims


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
    pg_collection: Any
    """``megatron.core.process_groups_config.ProcessGroupCollection`` of this rank's role."""
    role_group: Any
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
    is_student = property(lambda self: self.role.kind == STUDENT, doc="this rank is a student rank")
    hosted_teachers = property(lambda self: self.role.teachers, doc="teachers served on this rank")

    @property
    def student_pg_collection(self) -> Any:
        """The student's collection (on student ranks only; colocated teachers run on it)."""
        if not self.is_student:
            raise KeyError(f"rank {self.rank} is in role {self.role.name!r}, not the student")
        return self.pg_collection

    def teacher_pg_collection(self, teacher: str) -> Any:
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
    import datetime

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
    mine: tuple[Any, Any] | None = None
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


def role_pg_collection(role: Role, *, timeout: Any = None) -> Any:
    """A role's ``ProcessGroupCollection`` (collective over the world; see ``models.groups``)."""
    from camopd_megatron.models.groups import simple_pg_collection

    return simple_pg_collection(role.tp, role.pp, role.dp, role.rank_offset, timeout=timeout)


def _check_own_groups(groups: RankGroups) -> None:
    """Internal invariant: the groups megatron got match the layout's coordinates."""
    import torch.distributed as dist

    role, pgc = groups.role, groups.pg_collection
    for dim in ("tp", "pp", "dp"):
        pg = getattr(pgc, dim)
        expected = next(g for g in role.group_ranks(dim) if groups.rank in g)
        got = dist.get_process_group_ranks(pg)
        assert got == expected, f"{dim} group of rank {groups.rank}: {got} != layout's {expected}"
