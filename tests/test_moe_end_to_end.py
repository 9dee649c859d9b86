"""The whole CaMOPD step with an MoE student on 4 gloo ranks: trains and resumes.

Student: ranks 0-1, DP = 2, EP = 2 (each EP group spans both replicas, so the step runs in lock-step,
``models.pipeline``), distributed optimizer, KV-cached rollout with routing replay (the update routes every
token as the rollout did); two dense teachers (their own
architecture) on ranks 2 and 3. An odd prompt count and ρ < 1 give the replicas unequal prompts, rollout
micro-batches, response lengths and kept samples: a deadlock would fail the run at ``parallel.timeout_s``
(a lock-step all-reduce is bounded) and the launcher's own bound, never hang it. Resume: 2 steps, saved,
then resumed to 3, equals the uninterrupted 3-step run bitwise (CPU).
"""
from __future__ import annotations

from pathlib import Path

from camopd_megatron.testing.multiproc import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
STUDENT = {"init": "random", "checkpoint": None, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
           "ffn_hidden_size": 64, "vocab_size": 128, "seq_length": 64,
           "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32, "layer_pattern": [1, 1],
                   "routing_replay": True}}
TEACHER = {"init": "random", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 96,
           "vocab_size": 128}


def _cfg(out: str, steps: int):
    from camopd_megatron.config import load_config
    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge

    base = config_to_dict(load_config(str(REPO / "examples/configs/camopd.yaml")))
    over = {
        "run": {"steps": steps, "output_dir": out, "seed": 9, "log_level": "WARNING"},
        "model": STUDENT,
        "parallel": {"ep": 2, "use_distributed_optimizer": True, "timeout_s": 120},
        "teachers": [
            {"name": "general", "init": "random", "branches": ["general"], "placement": "separate", "model": TEACHER},
            {"name": "domain", "init": "random", "branches": ["domain"], "placement": "separate",
             "model": {**TEACHER, "ffn_hidden_size": 64}},
        ],
        "scheduler": {"pattern": ["general", "domain"]},
        "selection": {"rho": {"general": 0.6, "domain": 0.6}},
        "rollout": {"prompts_per_step": 5, "max_new_tokens": 8, "micro_batch_size": 2},
        "optim": {"lr": 3e-3, "micro_batch_size": 1},
        "data": {"max_prompt_tokens": 24},
        "checkpoint": {"save_interval": 2, "keep_last": 2},
        "logging": {"progress_bar": False},
        "eval": {"interval": 0},
    }
    return config_from_dict(deep_merge(base, over))


def _train(rank: int, world_size: int, cfgs: list) -> list:
    from camopd_megatron.trainer import train

    return [{"role": (res := train(cfg)).role, "history": res.history} for cfg in cfgs]


def _steps(history: list[dict]) -> list[dict]:
    return [h for h in history if "phase" in h]


def test_moe_student_ep2_with_separate_dense_teachers_trains_and_resumes(tmp_path):
    from camopd_megatron.distill.step import settings_from_config

    full, first, second = (_cfg(str(tmp_path / d), n) for d, n in (("full", 3), ("resumed", 2), ("resumed", 3)))
    assert settings_from_config(full, None).lock_step  # EP = 2 spans the two replicas
    res = run_on_ranks(_train, 4, args=([full, first, second],), timeout_s=900, pg_timeout_s=150)
    assert [r[0]["role"] for r in res] == ["student", "student", "general", "domain"]
    a, b = _steps(res[0][0]["history"]), _steps(res[0][2]["history"])
    assert len(a) == 3 and [int(h["step"]) for h in b] == [3]
    for h in a:
        assert h["update_skipped"] == 0.0 and h["train/loss"] == h["train/loss"]  # finite, applied
    assert any(h["select/kept_fraction"] < 1.0 for h in a)  # ρ < 1: unequal kept counts across the replicas
    # replayed: the rollout ran the weights the update starts from, so the router agrees with its record
    assert all(0.0 <= h["moe/replay_mismatch"] < 0.05 for h in a), [h.get("moe/replay_mismatch") for h in a]
    for k in ("train/loss", "grad_norm", "select/kept_fraction", "rollout/response_len_mean"):
        assert a[2][k] == b[0][k], (k, a[2][k], b[0][k])  # resume is exact
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000002" / "camopd.json").is_file()


def test_moe_teacher_group_in_lock_step_serves_an_idle_replica(tmp_path):
    """Both teachers MoE in one time-shared group at DP = 2, EP = 2 (ranks 2-3: lock-step across its two
    replicas), a dense student at DP = 2 with ONE prompt per step: student replica 1 sends empty requests,
    and its teacher replica joins replica 0's forwards with dummies instead of deadlocking them."""
    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge

    moe_teacher = {**TEACHER, "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32}}
    base = config_to_dict(_cfg(str(tmp_path / "t"), 2))
    dense = {k: v for k, v in STUDENT.items() if k != "moe"}
    over = {"model": dense, "parallel": {"ep": 1, "use_distributed_optimizer": False},
            "rollout": {"prompts_per_step": 1}, "checkpoint": {"save_interval": 0}}
    d = deep_merge(base, over)
    d["model"].pop("moe", None)
    d["teachers"] = [{"name": n, "init": "random", "branches": [n], "placement": "separate", "group": "experts",
                      "dp": 2, "ep": 2, "model": moe_teacher} for n in ("general", "domain")]
    cfg = config_from_dict(d)
    res = run_on_ranks(_train, 4, args=([cfg],), timeout_s=900, pg_timeout_s=150)
    assert [r[0]["role"] for r in res] == ["student", "student", "experts", "experts"]
    hist = _steps(res[0][0]["history"])
    assert len(hist) == 2 and all(h["rollout/samples"] == 1.0 for h in hist)
    assert any(h.get("gap/general/mean", 0.0) != 0.0 for h in hist)  # the MoE teacher really scored


def test_a_lock_step_teacher_group_needs_an_even_share_of_student_replicas(tmp_path):
    """Student DP = 3 and an MoE teacher group at DP = 2 with EP across its replicas: one teacher replica
    would serve two student replicas, the other one, and lock-step would deadlock; the layout says so."""
    import pytest

    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge
    from camopd_megatron.parallel import LayoutError, RoleLayout

    d = config_to_dict(_cfg(str(tmp_path), 1))
    moe_teacher = {**TEACHER, "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32}}
    d = deep_merge(d, {"model": {"moe": None}, "parallel": {"ep": 1, "dp": 3}})
    d["teachers"] = [{"name": n, "init": "random", "branches": [n], "placement": "separate", "group": "experts",
                      "dp": 2, "ep": 2, "model": moe_teacher} for n in ("general", "domain")]
    with pytest.raises(LayoutError, match=r"teachers\[0\]\.dp: got 2; expected a divisor of the student's DP=3"):
        RoleLayout.from_config(config_from_dict(d), 5)
    assert RoleLayout.from_config(config_from_dict(deep_merge(d, {"parallel": {"dp": 4}})), 6).student.dp == 4
