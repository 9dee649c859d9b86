"""ρ-mass selection (docs/algorithm.md §4) and the per-sample advantage scale (§5), by hand-worked examples."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from camopd_megatron.config import ConfigError, config_from_dict, load_config
from camopd_megatron.testing.configs import random_init
from tests.test_config import RANDOM
from camopd_megatron.distill.selection import (
    SelectionPolicy, SelectionResult, apply_rule, plan_selection, select_by_gap_mass,
)
from camopd_megatron.testing.multiproc import run_on_ranks

ids = lambda *xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731


def test_hand_worked_prefix():
    # total 1.0, ρ·total = 0.8; descending 0.5 (id1), 0.3 (id2) → cumulative 0.8 reaches: keep {1, 2}
    scores = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert select_by_gap_mass(scores, 0.8, ids(0, 1, 2, 3)).tolist() == [False, True, True, False]
    # ρ = 0.85 needs a third sample; 0.1 vs 0.1 tie → lower global id (0) first
    assert select_by_gap_mass(scores, 0.85, ids(0, 1, 2, 3)).tolist() == [True, True, True, False]
    # the same scores with ids reversed on the tied rows: now the last row has id 0 and wins the tie
    assert select_by_gap_mass(scores, 0.85, ids(3, 1, 2, 0)).tolist() == [False, True, True, True]
    # the single largest sample already holds >= ρ of the mass
    assert select_by_gap_mass(torch.tensor([0.0, 9.0, 1.0]), 0.9, ids(0, 1, 2)).tolist() == [False, True, False]


def test_edge_cases():
    # zero total mass (first domain step: student == domain teacher) → keep all
    assert select_by_gap_mass(torch.zeros(3), 0.5, ids(0, 1, 2)).all()
    # ρ = 1 keeps everything, zero-score samples included
    assert select_by_gap_mass(torch.tensor([0.0, 2.0, 0.0]), 1.0, ids(0, 1, 2)).all()
    assert select_by_gap_mass(torch.zeros(0), 0.8, ids()).numel() == 0
    # a tiny ρ still keeps one sample
    assert select_by_gap_mass(torch.tensor([1.0, 1.0]), 1e-6, ids(5, 4)).tolist() == [False, True]
    for bad_rho in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rho"):
            select_by_gap_mass(torch.ones(2), bad_rho, ids(0, 1))
    with pytest.raises(ValueError, match="negative"):
        select_by_gap_mass(torch.tensor([0.5, -0.1]), 0.8, ids(0, 1))
    with pytest.raises(ValueError, match="NaN"):
        select_by_gap_mass(torch.tensor([0.5, float("nan")]), 0.8, ids(0, 1))
    with pytest.raises(ValueError, match="duplicate"):
        select_by_gap_mass(torch.tensor([0.5, 0.2]), 0.8, ids(1, 1))
    with pytest.raises(ValueError, match="sample_ids"):
        select_by_gap_mass(torch.tensor([0.5, 0.2]), 0.8, torch.tensor([0.0, 1.0]))


def test_minimal_prefix_and_order_invariance():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 1 + trial
        scores = (torch.rand(n, generator=g) * 3).round(decimals=1)  # many ties
        rho = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        keep = select_by_gap_mass(scores, rho, torch.arange(n))
        s = scores.double()
        total = float(s.sum())
        if total == 0:
            assert keep.all()
            continue
        kept = s[keep]
        assert float(kept.sum()) >= rho * total - 1e-9
        assert float(kept.sum() - kept.min()) < rho * total  # shortest prefix: dropping the smallest falls short
        assert float(kept.min()) >= float(s[~keep].max()) if (~keep).any() else True
        perm = torch.randperm(n, generator=g)
        keep_perm = select_by_gap_mass(scores[perm], rho, perm)
        assert keep_perm.tolist() == keep[perm].tolist()


def policy(enabled=True, scale_only_selected=True, r_g=2.0, r_d=1.0, rho_g=0.8, rho_d=0.5):
    return SelectionPolicy(enabled=enabled, rho={"general": rho_g, "domain": rho_d},
                           score={"general": "abs", "domain": "positive"},
                           adv_scale={"general": r_g, "domain": r_d}, scale_only_selected=scale_only_selected)


SCORES = torch.tensor([0.1, 0.5, 0.3, 0.1])


@pytest.mark.parametrize(
    "kw, keep, scale, kept",
    [
        (dict(), [0, 1, 1, 0], [1, 2, 2, 1], 2),                                     # CaMOPD
        (dict(enabled=False), [1, 1, 1, 1], [1, 2, 2, 1], 4),                        # −selection
        (dict(enabled=False, r_g=1.0), [1, 1, 1, 1], [1, 1, 1, 1], 4),               # −selection −scaling
        (dict(enabled=False, scale_only_selected=False), [1, 1, 1, 1], [2, 2, 2, 2], 4),
        (dict(scale_only_selected=False), [0, 1, 1, 0], [2, 2, 2, 2], 2),
    ],
)
def test_plan_semantics(kw, keep, scale, kept):
    res = plan_selection(SCORES, ids(0, 1, 2, 3), ["general"] * 4, policy(**kw), None)
    assert res.keep_B.tolist() == [bool(k) for k in keep]
    assert res.rule_keep_B.tolist() == [False, True, True, False]
    assert res.adv_scale_B.tolist() == [float(s) for s in scale] and res.adv_scale_B.dtype == torch.float32
    assert res.num_kept_global == kept and res.num_samples_global == 4
    assert res.kept_fraction == kept / 4
    m = res.metrics()
    assert m["general/rule_kept_fraction"] == 0.5 and m["general/mass_kept"] == pytest.approx(0.8)
    assert m["kept_fraction"] == kept / 4


def test_mixed_batch_selects_within_each_branch():
    # general rows (ids 0, 2, 4): 0.6, 0.3, 0.1 with ρ_g 0.8 → keep 0, 2; domain rows (1, 3): 0.2, 0.2, ρ_d 0.5 → tie → id 1
    scores = torch.tensor([0.6, 0.2, 0.3, 0.2, 0.1])
    res = plan_selection(scores, ids(0, 1, 2, 3, 4), ["general", "domain", "general", "domain", "general"], policy(r_d=3.0), None)
    assert res.keep_B.tolist() == [True, True, True, False, False]
    assert res.adv_scale_B.tolist() == [2.0, 3.0, 2.0, 1.0, 1.0]
    assert res.num_kept_global == 3
    assert res.branch_kept == {"general": 2, "domain": 1} and res.branch_samples == {"general": 3, "domain": 2}


@pytest.mark.parametrize("kw", [dict(enabled=False, scale_only_selected=False), dict(enabled=False, r_g=1.0)])
def test_gap_free_selection_is_the_plan_of_any_scores(kw):
    """A gap-free policy decides before the gaps; the ρ-rule statistics added afterwards complete the plan."""
    pol = policy(**kw)
    assert pol.gap_free
    scores, branches = torch.tensor([0.1, 0.5, 0.3, 0.1, 0.7]), ["general", "domain", "general", "domain", "general"]
    early = pol.gap_free_selection(branches, None)
    assert early.keep_B.all() and early.num_kept_global == 5 and early.branch_samples == {"domain": 2, "general": 3}
    full = early.with_rule(apply_rule(scores, ids(0, 1, 2, 3, 4), branches, pol, None))
    ref = plan_selection(scores, ids(0, 1, 2, 3, 4), branches, pol, None)
    for f in ("keep_B", "rule_keep_B", "adv_scale_B"):
        assert torch.equal(getattr(full, f), getattr(ref, f)), f
    assert full.metrics() == ref.metrics()
    assert not ref.rule_keep_B.all()  # the statistics really came from the scores
    with pytest.raises(ValueError, match="depends on the gaps"):
        policy().gap_free_selection(branches, None)


def test_scale_mode_lr_moves_r_b_to_the_learning_rate():
    """scale_mode lr: the same kept set, every r_i = 1, and r_b as the step's learning-rate factor."""
    adv = policy()
    lr = dataclasses.replace(adv, scale_mode="lr")
    a = plan_selection(SCORES, ids(0, 1, 2, 3), ["general"] * 4, adv, None)
    b = plan_selection(SCORES, ids(0, 1, 2, 3), ["general"] * 4, lr, None)
    assert torch.equal(a.keep_B, b.keep_B) and b.adv_scale_B.tolist() == [1.0] * 4
    assert (adv.lr_scale(["general"]), lr.lr_scale(["general"]), lr.lr_scale(["domain"])) == (1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="one loss.adv_scale"):
        lr.lr_scale(["general", "domain"])  # a mixed step with r_g != r_d has no single learning rate
    assert dataclasses.replace(lr, enabled=False).gap_free_selection(["general"] * 2, None).adv_scale_B.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="selection.scale_mode"):
        dataclasses.replace(adv, scale_mode="gradient")
    # config validation: one r per step
    with pytest.raises(ConfigError, match="selection.scale_mode: got 'lr'.*different loss.adv_scale"):
        load_config(None, [*RANDOM, "selection.scale_mode=lr", "scheduler.mode=mixed"])
    with pytest.raises(ConfigError, match="scale_only_selected: false"):
        load_config(None, [*RANDOM, "selection.scale_mode=lr", "selection.enabled=false"])
    assert load_config(None, [*RANDOM, "selection.scale_mode=lr"]).selection.scale_mode == "lr"
    assert load_config(None, [*RANDOM, "selection.scale_mode=lr", "scheduler.mode=mixed", "loss.adv_scale.general=1"])


def test_keep_all():
    sel = SelectionResult.keep_all(torch.ones(3), {"general": 5})
    assert sel.keep_B.tolist() == [True] * 3 and sel.num_kept_global == sel.num_samples_global == 5
    assert sel.metrics() == {"kept_fraction": 1.0, "kept": 5.0, "general/kept_fraction": 1.0,
                             "general/rule_kept_fraction": 1.0, "general/mass_kept": 1.0}


def test_plan_errors_and_from_config():
    with pytest.raises(ValueError, match="selection.rho: got no value for branch 'code'"):
        plan_selection(SCORES, ids(0, 1, 2, 3), ["code"] * 4, policy(), None)
    with pytest.raises(ValueError, match="branches_B"):
        plan_selection(SCORES, ids(0, 1, 2, 3), ["general"] * 3, policy(), None)
    with pytest.raises(ValueError, match="loss.adv_scale.general"):
        policy(r_g=0.0)
    with pytest.raises(ValueError, match="selection.rho.domain"):
        policy(rho_d=1.2)
    cfg = config_from_dict(random_init({"selection": {"enabled": False, "rho": {"general": 0.7, "domain": 0.9}},
                            "loss": {"adv_scale": {"general": 3, "domain": 1}}}))
    p = SelectionPolicy.from_config(cfg.selection, cfg.loss)
    assert (p.enabled, p.rho["general"], p.adv_scale["general"], p.scale_only_selected) == (False, 0.7, 3.0, True)
    assert p.score_kind("domain") == "positive" and p.branches == ["domain", "general"]


# --------------------------------------------------------------------------- 2 DP ranks, unequal counts
def _dp_rank_fn(rank, world_size, cases):
    out = []
    for local in cases:
        scores, sample_ids, branches = local[rank]
        res = plan_selection(torch.tensor(scores), torch.tensor(sample_ids, dtype=torch.int64), branches,
                             policy(), dist.group.WORLD)
        out.append((res.keep_B.tolist(), res.adv_scale_B.tolist(), res.num_kept_global, res.num_samples_global,
                    res.branch_kept))
    return out


def test_dp_matches_single_process():
    g = torch.Generator().manual_seed(1)
    n = 7
    scores = (torch.rand(n, generator=g)).round(decimals=1).tolist()
    branches = ["general", "domain", "general", "general", "domain", "general", "domain"]
    perm = torch.randperm(n, generator=g).tolist()  # global ids in scrambled order
    split = [  # rank 0 holds 5 samples, rank 1 holds 2; then rank 1 holds none
        [(scores[:5], perm[:5], branches[:5]), (scores[5:], perm[5:], branches[5:])],
        [(scores, perm, branches), ([], [], [])],
    ]
    ref = plan_selection(torch.tensor(scores), torch.tensor(perm), branches, policy(), None)
    per_rank = run_on_ranks(_dp_rank_fn, 2, args=(split,), timeout_s=120, pg_timeout_s=60)
    for case, cut in enumerate((5, 7)):
        keep = per_rank[0][case][0] + per_rank[1][case][0]
        scale = per_rank[0][case][1] + per_rank[1][case][1]
        assert keep == ref.keep_B.tolist() and scale == ref.adv_scale_B.tolist()
        for r in range(2):
            assert per_rank[r][case][2:] == (ref.num_kept_global, ref.num_samples_global, ref.branch_kept)
        assert len(per_rank[0][case][0]) == cut
