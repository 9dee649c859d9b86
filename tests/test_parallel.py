"""Role layout (pure) and per-role megatron-core process groups (one 4-rank launch)."""
from __future__ import annotations

import pytest

from camopd_megatron.config import (
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SelectionConfig,
    TeacherConfig,
    config_from_dict,
)
from camopd_megatron.parallel import LayoutError, RoleLayout

TINY = dict(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
            ffn_hidden_size=256)
"""The tiny model's sizes (padded vocabulary 128)."""


def teacher(name: str, placement: str = "separate", **kw) -> TeacherConfig:
    """A teacher scoring the branch named after it."""
    return TeacherConfig(name=name, init="random", branches=[name], placement=placement, **kw)  # type: ignore[arg-type]


def config(*teachers: TeacherConfig, model: dict = TINY, **parallel) -> Config:
    """A Config with these teachers and the given ``parallel.*``; every teacher's branches are scheduled."""
    branches = list(dict.fromkeys(b for t in teachers for b in t.branches))
    return Config(
        model=ModelConfig(**model), parallel=ParallelConfig(**parallel), teachers=list(teachers),
        scheduler=SchedulerConfig(pattern=branches), loss=LossConfig(adv_scale={b: 1.0 for b in branches}),
        selection=SelectionConfig(rho={b: 0.8 for b in branches}, score={b: "abs" for b in branches}),
    )


# ------------------------------------------------------------------ pure layout
def test_student_and_two_separate_teachers():
    lay = RoleLayout.from_config(config(teacher("general"), teacher("domain"), tp=2), 4)
    assert [r.name for r in lay.roles] == ["student", "general", "domain"]
    assert (lay.student.tp, lay.student.pp, lay.student.dp) == (2, 1, 1)  # dp derived
    assert list(lay.ranks_of("student")) == [0, 1]
    assert list(lay.ranks_of("general")) == [2] and list(lay.ranks_of("domain")) == [3]
    assert [lay.role_of(r).name for r in range(4)] == ["student", "student", "general", "domain"]
    assert lay.teacher_role == {"general": "general", "domain": "domain"}
    with pytest.raises(KeyError):
        lay.role_of(4)
    rows = lay.rank_map().splitlines()
    assert rows[0].split() == ["rank", "role", "teachers", "tp", "pp", "dp"]
    assert rows[2].split() == ["1", "student", "-", "1", "0", "0"]
    assert rows[4].split() == ["3", "domain", "domain", "0", "0", "0"]


def test_coordinates_and_groups_follow_grid_order():
    lay = RoleLayout.from_config(config(teacher("t", tp=2, pp=1, dp=2), tp=2, pp=2, dp=3), 2 * 2 * 3 + 4)
    s, t = lay.student, lay.role("t")
    assert [s.coords(r) for r in (0, 1, 2, 5)] == [
        s.coords(0).__class__(0, 0, 0), s.coords(0).__class__(1, 0, 0),
        s.coords(0).__class__(0, 1, 0), s.coords(0).__class__(1, 0, 1),
    ]
    assert all(s.rank_at(**vars(s.coords(r))) == r for r in s.ranks)
    assert s.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert s.group_ranks("pp")[0] == [0, 2] and s.group_ranks("dp")[0] == [0, 4, 8]
    assert s.replica_ranks(1) == (4, 5, 6, 7)
    assert list(t.ranks) == [12, 13, 14, 15] and t.group_ranks("dp") == [[12, 14], [13, 15]]


def test_shared_group_colocated_and_routing():
    teachers = [
        teacher("general", tp=2, dp=2, group="pool"),
        teacher("domain", tp=2, dp=2, group="pool"),
        teacher("tiny", placement="colocated"),
    ]
    lay = RoleLayout.from_config(config(*teachers, tp=2, pp=1, dp=None), 10)
    assert lay.student.dp == 3 and list(lay.ranks_of("pool")) == [6, 7, 8, 9]
    assert lay.role("pool").teachers == ("general", "domain")
    assert lay.ranks_of("general") == lay.ranks_of("domain") == range(6, 10)
    assert lay.teacher_role["tiny"] == "student" and lay.student.teachers == ("tiny",)
    assert lay.teacher_groups() == {"student": ("tiny",), "pool": ("general", "domain")}
    routes = lay.routes("general")
    assert [(r.student_dp, r.teacher_dp) for r in routes] == [(0, 0), (1, 1), (2, 0)]  # round-robin
    assert [r.student_rank for r in routes] == [0, 2, 4]
    assert [r.teacher_input_rank for r in routes] == [6, 8, 6]
    assert routes[2].teacher_ranks == (6, 7) and routes[2].student_ranks == (4, 5)
    assert not any(r.colocated for r in routes)
    co = lay.routes("tiny")
    assert all(r.colocated and r.student_ranks == r.teacher_ranks for r in co)
    summary = lay.summary()
    assert "pool" in summary and "general, domain" in summary and "tiny" in summary


def test_pipeline_routes_use_first_and_last_stage():
    lay = RoleLayout.from_config(config(teacher("t", tp=2, pp=2, dp=1), tp=1, pp=2, dp=2), 8)
    r0, r1 = lay.routes("t")
    assert (r0.student_rank, r1.student_rank) == (1, 3)  # last pipeline stage of each replica
    assert (r0.teacher_input_rank, r0.teacher_output_rank) == (4, 6)
    assert r1.teacher_dp == 0


def test_from_config_reads_sections():
    cfg = Config(
        parallel=ParallelConfig(tp=2, sequence_parallel=True),
        model=ModelConfig(**{**TINY, "vocab_size": 100}),  # padded to 128
        teachers=[
            TeacherConfig(name="general", init="random", branches=["general"], placement="separate"),
            TeacherConfig(name="domain", init="random", branches=["domain"], placement="separate"),
            TeacherConfig(name="tiny", init="random", branches=["x"]),  # config default: colocated
        ],
    )
    lay = RoleLayout.from_config(cfg, 4)
    assert lay.sequence_parallel and [r.name for r in lay.roles] == ["student", "general", "domain"]
    assert lay.student.dp == 1 and lay.teacher_role["tiny"] == "student"
    cfg.model.num_attention_heads, cfg.model.vocab_size, cfg.model.vocab_pad_multiple = 3, 101, 101
    with pytest.raises(ConfigError) as err:  # a config built in code is validated here
        RoleLayout.from_config(cfg, 4)
    assert not isinstance(err.value, LayoutError)
    assert "model.num_attention_heads=3" in str(err.value) and "model.padded_vocab_size=101" in str(err.value)


def test_all_config_errors_reported_together():
    """Every rule the config can check is checked by config validation, all at once, before the world size."""
    teachers = [
        teacher("a", tp=2, group="g"),
        teacher("b", tp=1, group="g"),
        TeacherConfig(name="a", init="random", branches=["a2"], placement="separate"),
        teacher("d", placement="colocated", tp=4, group="x"),
        teacher("e", tp=0),
        teacher("student"),
    ]
    with pytest.raises(ConfigError) as err:
        RoleLayout.from_config(config(*teachers, tp=3, pp=3, dp=1), 7)
    msg, probs = str(err.value), err.value.problems
    for needle in (
        "parallel.tp: got 3; expected a divisor of model.num_attention_heads=4, model.num_query_groups=2, "
        "model.ffn_hidden_size=256, model.padded_vocab_size=128",
        "parallel.pp: got 3; expected a divisor of model.num_layers=2",
        "teachers[2].name: got 'a'; expected a unique name (teachers[0] has it)",
        "teachers[3].group: got 'x'; expected no group for a colocated teacher",
        "teachers[3].tp: got 4; expected the student's parallel.tp=3",
        "teachers[4].tp: got 0; expected a value > 0",
        "teachers[5].name: got 'student'; expected a name other than 'student'",
        "teachers[1].tp: got 1; expected the layout of group 'g' (teachers[0].tp=2)",
    ):
        assert needle in msg, needle
    assert len(probs) == 8, probs
    assert isinstance(err.value, ValueError) and not isinstance(err.value, LayoutError)
    # a placement that is not one of the choices is refused when the config is read
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.placement"):
        config_from_dict({"teachers": [{"name": "general", "branches": ["general"], "placement": "colo"},
                                       {"name": "domain", "branches": ["domain"]}]})


def test_world_size_mismatch_lists_sizes():
    with pytest.raises(LayoutError) as err:
        RoleLayout.from_config(config(teacher("g"), teacher("d", tp=2), tp=2, dp=1), 6)
    (p,) = err.value.problems
    assert "world size 6 != sum of role sizes 5" in p
    assert "student 2 (tp2×pp1×dp1)" in p and "'g' 1" in p and "'d' 2 (tp2×pp1×dp1)" in p
    with pytest.raises(LayoutError, match=r"parallel.dp=null: the 3 rank\(s\) left"):
        RoleLayout.from_config(config(teacher("g", tp=2), tp=2), 5)
    with pytest.raises(LayoutError, match=r"world size \(WORLD_SIZE\)=0"):
        RoleLayout.from_config(config(teacher("g")), 0)
    # rules that need no world size are the config's, whatever the world size
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.group: got 'g'; expected a group name that is not the name "
                                          r"of teachers\[0\] \(placed on the student's ranks\)"):
        RoleLayout.from_config(config(teacher("g", placement="colocated"), teacher("x", group="g")), 3)
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.tp: got 4; expected a divisor of model.num_query_groups=2"):
        RoleLayout.from_config(config(teacher("g", tp=4)), 5)


def test_512_rank_summary_and_map_are_compact():
    big = dict(init="random", hidden_size=64, num_layers=32, num_attention_heads=32, num_query_groups=8, vocab_size=152064, ffn_hidden_size=14336)
    teachers = [teacher("general", tp=8, pp=2, dp=8, group="g"), teacher("domain", tp=8, pp=2, dp=8, group="g")]
    lay = RoleLayout.from_config(config(*teachers, model=big, tp=8, pp=4), 512)
    assert lay.student.dp == 12 and list(lay.ranks_of("g")) == list(range(384, 512))
    summary, rmap = lay.summary(), lay.rank_map()
    assert len(summary.splitlines()) == 3 and "0-383" in summary and "384-511" in summary
    assert len(rmap.splitlines()) <= 14, rmap
    assert "dp 11: ranks 352-383" in rmap and "more replica" in rmap
    assert len(lay.rank_map(detailed=True).splitlines()) == 513
    assert lay.role_of(400).name == "g" and lay.role("g").coords(511).dp == 7


# ------------------------------------------------------------------ process groups (one 4-rank launch)
SEQ, BATCH, SEED = 16, 2, 1234


def _pg_fields(pgc) -> dict:
    """Every process group set on a ProcessGroupCollection (lists flattened)."""
    out = {}
    for name, value in vars(pgc).items():
        for i, g in enumerate(value if isinstance(value, list) else [value]):
            if g is not None:
                out[f"{name}[{i}]" if isinstance(value, list) else name] = g
    return out


def _tiny_model(pgc, tp: int, seed: int):
    """The notes' tiny GPT (local spec, fp32, CPU init) on the given groups, via our builder."""
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng

    cfg = ModelConfig(**TINY, seq_length=SEQ)
    init_model_rng(seed, pgc)
    return build_gpt_model(cfg, pgc).eval()


def _loss(model, vocab: int, seed: int) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        per_token = model(tokens[:, :-1], pos, causal, labels=tokens[:, 1:])
    return per_token.float().mean().item()


def _four_rank_roles(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from camopd_megatron.parallel import Role, build_process_groups, role_pg_collection

    result: dict = {}
    # a layout for another world size is refused before any group exists, identically on every rank
    try:
        build_process_groups(RoleLayout.from_config(config(teacher("c", placement="colocated"), tp=2, dp=4), 8), rank)
    except LayoutError as e:
        result["wrong_world"] = str(e)

    lay = RoleLayout.from_config(config(teacher("general"), teacher("domain"), tp=2), 4)
    groups = build_process_groups(lay, rank, timeout_s=60)
    role_ranks = set(lay.role_of(rank).ranks)
    spans = {name: dist.get_process_group_ranks(g) for name, g in _pg_fields(groups.pg_collection).items()}
    spans["role_group"] = dist.get_process_group_ranks(groups.role_group)
    result.update(
        role=groups.role_name, tp=(groups.tp_rank, groups.tp_size), dp=(groups.dp_rank, groups.dp_size),
        spans=spans, outside=[n for n, rs in spans.items() if not set(rs) <= role_ranks],
    )
    # a TP=1 reference collection on every rank: all ranks create all singleton groups, keep their own
    single = [role_pg_collection(Role(f"ref{r}", "student", 1, 1, 1, r)) for r in range(world_size)][rank]

    # the student (TP=2) and the general teacher (TP=1) share a seed; the domain teacher does not
    seed = SEED + (1 if groups.role_name == "domain" else 0)
    model = _tiny_model(groups.pg_collection, groups.tp_size, seed)
    result["loss"] = _loss(model, TINY["vocab_size"], seed=7)
    if groups.is_student:
        ref = _tiny_model(single, 1, seed)
        result["ref_loss"] = _loss(ref, TINY["vocab_size"], seed=7)
    result["losses"] = [None] * world_size
    dist.all_gather_object(result["losses"], result["loss"])

    # colocated teachers run on the student's collection
    colo = RoleLayout.from_config(config(teacher("c", placement="colocated"), tp=2, dp=None), 4)
    cg = build_process_groups(colo, rank, timeout_s=60)
    result["colocated_same_pgc"] = cg.teacher_pg_collection("c") is cg.student_pg_collection
    result["colocated_dp"] = (cg.dp_rank, cg.dp_size)
    result["global_state"] = parallel_state.model_parallel_is_initialized()
    return result


def test_four_ranks_student_tp2_and_two_teachers():
    """Student TP=2 on ranks 0-1, teachers TP=1 on ranks 2 and 3: three models, groups stay in their role."""
    from camopd_megatron.testing.multiproc import run_on_ranks

    _check_four_rank_results(run_on_ranks(_four_rank_roles, 4, timeout_s=240, pg_timeout_s=60))


def _check_four_rank_results(out: list[dict]) -> None:
    assert all("world size 8" in o["wrong_world"] and "4 ranks" in o["wrong_world"] for o in out)
    assert [o["role"] for o in out] == ["student", "student", "general", "domain"]
    assert [o["tp"] for o in out] == [(0, 2), (1, 2), (0, 1), (0, 1)]
    for o in out:
        assert not o["outside"], o["spans"]  # no group of this rank's collection leaves its role
        assert {"tp", "pp", "dp", "role_group"} <= o["spans"].keys()
    assert out[0]["spans"]["tp"] == [0, 1] and out[3]["spans"]["role_group"] == [3]
    losses = out[0]["losses"]
    assert losses[0] == losses[1]
    assert abs(out[0]["loss"] - out[0]["ref_loss"]) < 1e-5, (out[0]["loss"], out[0]["ref_loss"])
    assert abs(losses[0] - losses[2]) < 1e-5  # same seed, TP=2 on ranks 0-1 vs TP=1 on rank 2
    assert abs(losses[3] - losses[2]) > 1e-4  # the domain teacher is an independent model
    assert all(o["colocated_same_pgc"] for o in out)
    assert [o["colocated_dp"] for o in out] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert not any(o["global_state"] for o in out)
