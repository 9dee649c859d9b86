"""Branch scheduler: alternating patterns, mixed shares with largest-remainder rounding, validation, state."""
import logging

import pytest

from camopd_megatron.config import ConfigError, config_from_dict
from camopd_megatron.testing.configs import random_init
from camopd_megatron.distill.scheduler import BranchScheduler, largest_remainder_counts

TEACHERS = {"general": ["general"], "domain": ["domain"]}
G3D = ["general", "general", "general", "domain"]


def alt(pattern, n=8, **kw):
    return BranchScheduler("alternating", pattern, {"general": 1.0}, n, **kw)


def mixed(shares, n=8, **kw):
    return BranchScheduler("mixed", [], shares, n, **kw)


def test_alternating_default_pattern():
    s = alt(G3D, teacher_branches=TEACHERS)
    seq = [s.step_plan(i).branch for i in range(8)]
    assert seq == ["general"] * 3 + ["domain"] + ["general"] * 3 + ["domain"]
    assert [s.phase(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert s.plan(3) == {"domain": 8} and s.plan(4) == {"general": 8}
    assert s.branches == ["general", "domain"]


def test_alternating_any_names_and_length():
    s = alt(["code", "domain", "code", "math", "domain"], n=5)
    assert [next(iter(s.plan(i))) for i in range(7)] == ["code", "domain", "code", "math", "domain", "code", "domain"]
    assert s.phase(6) == 1


@pytest.mark.parametrize(
    "shares, n, expected",
    [
        ({"general": 1, "domain": 1}, 8, {"general": 4, "domain": 4}),
        ({"general": 1, "domain": 1}, 7, {"general": 4, "domain": 3}),   # tie → first listed
        ({"domain": 1, "general": 1}, 7, {"domain": 4, "general": 3}),
        ({"general": 3, "domain": 1}, 8, {"general": 6, "domain": 2}),
        ({"general": 3, "domain": 1}, 6, {"general": 5, "domain": 1}),   # 4.5 / 1.5 → tie → general
        ({"a": 1, "b": 1, "c": 1}, 10, {"a": 4, "b": 3, "c": 3}),
        ({"a": 0.5, "b": 0.3, "c": 0.2}, 7, {"a": 4, "b": 2, "c": 1}),  # 3.5, 2.1, 1.4 → floors 3,2,1; .5 largest
    ],
)
def test_largest_remainder(shares, n, expected):
    got = largest_remainder_counts(shares, n)
    assert got == expected and sum(got.values()) == n
    s = mixed(shares, n)
    assert s.plan(0) == expected == s.plan(13) and s.phase(5) == 0
    assert s.step_plan(2).branch is None and s.step_plan(2).branches == list(expected)


def problems(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


def test_validation_names_the_key():
    # n_g = 0 with a general teacher: the general teacher would never be used
    p = problems(lambda: alt(["domain"], teacher_branches=TEACHERS))
    assert len(p) == 1 and p[0].startswith("teachers[0].branches") and "'general' would never be used" in p[0]
    # a scheduled branch without a teacher
    p = problems(lambda: alt(["general", "code"], teacher_branches={"general": ["general"]}))
    assert len(p) == 1 and p[0].startswith("scheduler.pattern: got 'code'") and "teacher" in p[0]
    # a scheduled branch without prompts
    p = problems(lambda: mixed({"general": 1, "domain": 1}, data_branches=["general"]))
    assert len(p) == 1 and p[0].startswith("scheduler.mixed_shares: got 'domain'") and "data.branches.domain.paths" in p[0]
    # shares <= 0, empty pattern, bad mode, bad prompts_per_step
    p = problems(lambda: mixed({"general": 1, "domain": 0}))
    assert p[0].startswith("scheduler.mixed_shares.domain: got 0.0")
    assert problems(lambda: mixed({"general": -1.0}))[0].startswith("scheduler.mixed_shares.general")
    assert problems(lambda: alt([]))[0].startswith("scheduler.pattern")
    assert problems(lambda: BranchScheduler("round_robin", G3D, {}, 8))[0].startswith("scheduler.mode")
    assert problems(lambda: alt(G3D, n=0))[0].startswith("rollout.prompts_per_step")
    # a mixed branch that would get 0 prompts every step
    p = problems(lambda: mixed({"general": 3, "domain": 1}, n=2))
    assert p[0].startswith("rollout.prompts_per_step: got 2") and "['domain'] get none" in p[0]
    # several problems reported together
    assert len(problems(lambda: alt(["code"], n=0, teacher_branches=TEACHERS, data_branches=["general"]))) == 5
    with pytest.raises(ValueError, match="step"):
        alt(G3D).plan(-1)


def test_state_dict_roundtrip(caplog):
    s = alt(G3D)
    assert [s.next_plan().branch for _ in range(5)] == ["general"] * 3 + ["domain", "general"]
    state = s.state_dict()
    assert state["next_step"] == 5
    t = alt(G3D)
    t.load_state_dict(state)
    assert t.next_step == 5 and t.next_plan().step == 5 and t.state_dict()["next_step"] == 6
    # a changed schedule on resume is allowed, with a warning naming what changed
    u = alt(["general", "domain"])
    with caplog.at_level(logging.WARNING, logger="camopd_megatron.distill.scheduler"):
        u.load_state_dict(state)
    assert "pattern" in caplog.text and u.next_plan().branch == "domain"
    with pytest.raises(ValueError, match="version"):
        u.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="next_step"):
        u.load_state_dict({**state, "next_step": -1})


def test_repeat_last_reissues_the_skipped_position():
    # the trainer's protocol: next_plan per step; a step skipped for non-finite teacher scores calls
    # repeat_last, so the trained steps still follow G,G,G,D (a skip never drops a branch's turn)
    s = BranchScheduler("alternating", ["general", "general", "general", "domain"], {}, 4)
    trained = []
    for step in range(7):
        plan = s.next_plan()
        if step in (3, 4):  # the domain step is skipped twice
            s.repeat_last()
            continue
        trained.append((plan.branch, plan.phase))
    assert trained == [("general", 0), ("general", 1), ("general", 2), ("domain", 3), ("general", 0)]
    assert s.next_step == 5 and s.state_dict()["next_step"] == 5
    with pytest.raises(ValueError, match="no plan was issued"):
        BranchScheduler("alternating", ["general"], {}, 4).repeat_last()


def test_from_config():
    cfg = config_from_dict(random_init({"rollout": {"prompts_per_step": 12}}))
    s = BranchScheduler.from_config(cfg)
    assert s.plan(3) == {"domain": 12} and s.plan(0) == {"general": 12}
    cfg = config_from_dict(random_init({"scheduler": {"mode": "mixed", "mixed_shares": {"general": 3, "domain": 1}}}))
    assert BranchScheduler.from_config(cfg).plan(0) == {"general": 6, "domain": 2}
    # n_g = 0 while the general teacher exists: the root config does not catch it, the scheduler does
    cfg = config_from_dict(random_init({"scheduler": {"pattern": ["domain"]}}))
    p = problems(lambda: BranchScheduler.from_config(cfg))
    assert p[0].startswith("teachers[0].branches")
