"""The dry-run's stage-time estimate (planner/stages.py), FLOP counts (planner/counts.py) and device
profiles (planner/profiles.py) against hand formulas written out here.

Tiny dense model: L = 2 layers, h = 64, a = 4 heads, kv = 2 groups, head dim d = 16, SwiGLU f = 128,
V = 256 (a multiple of 128: no padding), untied. One layer's matmul weights:
  QKV h·(a + 2kv)·d = 64·8·16 = 8,192; output projection a·d·h = 4,096; SwiGLU 3·h·f = 24,576 → 36,864.
"""
from __future__ import annotations

import json

import pytest

from camopd_megatron import cli
from camopd_megatron.config import config_from_dict
from camopd_megatron.parallel import RoleLayout
from camopd_megatron.planner import (GPU_PROFILES, DeviceProfile, count_params, estimate_stages, forward_flops,
                                     load_profile, plan, suggest_teacher_dp)
from camopd_megatron.planner.stages import optimizer_bytes_per_param

TINY = {"init": "random", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "vocab_size": 256, "seq_length": 64, "tie_embeddings": False}
LAYER_MATMUL = 8_192 + 4_096 + 24_576
CPU = DeviceProfile("test-cpu", peak_flops=1e12, mem_bandwidth=1e10, device_type="cpu")


def _fwd(T: int, W: int, ctx: float | None = None) -> float:
    """Hand formula: 2 FLOPs per MAC of the layer matmuls at T positions, attention scores + weighted sum
    4·ctx·a·d per position and layer, output layer 2·h·V at the W scored positions."""
    ctx = T if ctx is None else ctx
    return 2 * T * 2 * LAYER_MATMUL + T * 2 * 4 * ctx * 4 * 16 + 2 * W * 64 * 256


def _cfg(**over):
    d = {
        "model": dict(TINY),
        "teachers": [{"name": "general", "init": "random", "branches": ["general"], "placement": "colocated"}],
        "data": {"max_prompt_tokens": 16},
        "rollout": {"max_new_tokens": 8, "prompts_per_step": 8, "micro_batch_size": 4},
        "optim": {"micro_batch_size": 4},
        "selection": {"enabled": False, "scale_only_selected": False, "rho": {"general": 0.8},
                      "score": {"general": "abs"}},
        "loss": {"adv_scale": {"general": 1.0}},
        "precision": {"params_dtype": "auto"},
        "scheduler": {"mode": "mixed", "mixed_shares": {"general": 1.0}},
    }
    for key, value in over.items():
        if "__" not in key:
            d[key] = value
            continue
        section, name = key.split("__")
        d[section][name] = value
    return config_from_dict(d)


def test_forward_flops_dense_hand_formula():
    m = _cfg().model
    assert forward_flops(m, 24, 8) == _fwd(24, 8) == 2 * 24 * 2 * 36_864 + 24 * 12_288 + 262_144 == 4_096_000
    assert forward_flops(m, 1, 1, context=20.0) == _fwd(1, 1, 20.0)
    # QKV bias and qk norms are elementwise: they add parameters but no matmul FLOPs
    biased = _cfg(model__add_qkv_bias=True, model__qk_layernorm=True).model
    assert count_params(biased) == count_params(m) + 2 * (8 * 16 + 2 * 16)
    assert forward_flops(biased, 24, 8) == forward_flops(m, 24, 8)


def test_stage_estimate_hand_formula():
    """World 1, CPU profile (fp32: 4 B/param), 8 prompts, rollout micro-batch 4: two decode passes."""
    cfg = _cfg()
    p = plan(cfg, 1, profile=CPU)
    est = p.stages
    assert est is not None and [s.name for s in est.stages] == ["rollout", "teacher general", "train", "optimizer"]
    n = count_params(cfg.model)  # 2·(36,864 + 2·64) + 2·256·64 + 64 = 106,816
    assert n == 106_816
    # train: 3 forwards of 8 samples of T = 24 tokens, W = 8 scored; compute bound
    assert est.stage("train").seconds == pytest.approx(3 * 8 * _fwd(24, 8) / 1e12)
    # teacher (colocated, the student's architecture): one forward each, weights read per micro-batch of 4
    t = est.stage("teacher general")
    assert t.flops == 8 * _fwd(24, 8) and t.bytes == 2 * n * 4
    assert t.seconds == pytest.approx(max(8 * _fwd(24, 8) / 1e12, 2 * n * 4 / 1e10))
    # rollout: prefill 8 x 16 prompt tokens (output layer at 1 position), then 2 passes x 8 decode steps of 4 rows,
    # each reading every weight but the input embedding and the KV cache at mean length 16 + 8/2 = 20
    kv = 2 * 2 * 2 * 16 * 20 * 4 * 4  # K and V, L, kv groups, d, ctx, rows, 4 B
    step_bytes = (n - 256 * 64) * 4 + kv
    step_flops = 4 * _fwd(1, 1, 20.0)
    per_step = max(step_bytes / 1e10, step_flops / 1e12)
    assert est.stage("rollout").seconds == pytest.approx(8 * _fwd(16, 1) / 1e12 + 2 * 8 * per_step)
    assert est.stage("rollout").bound == "memory"
    # optimizer: fp32 params, no master copy: 4·2 grad reads + 16 Adam + 8 param + 4 zeroing = 36 B/param
    assert optimizer_bytes_per_param(4) == 36 and optimizer_bytes_per_param(2) == 38
    assert est.stage("optimizer").seconds == pytest.approx(n * 36 / 1e10)
    # selection on: a separate recompute forward; full activation recompute: 4 forwards
    sel = plan(_cfg(selection__enabled=True, model__recompute="full"), 1, profile=CPU).stages
    assert sel.stage("recompute").seconds == pytest.approx(8 * _fwd(24, 8) / 1e12)
    assert sel.stage("train").seconds == pytest.approx(4 * 8 * _fwd(24, 8) / 1e12)
    text = p.render()
    assert "ESTIMATE" in text and "test-cpu" in text and "colocated teachers always add" in text


def _separate(teacher_layers: int):
    """64 prompts of 16 + 32 tokens, one micro-batch each way; a separate teacher of ``teacher_layers`` layers."""
    return _cfg(teachers=[{"name": "general", "init": "random", "branches": ["general"], "placement": "separate",
                           "model": {**TINY, "num_layers": teacher_layers}}],
                rollout__prompts_per_step=64, rollout__micro_batch_size=64, rollout__max_new_tokens=32,
                optim__micro_batch_size=64)


def test_teacher_suggestion_keeps_scoring_under_the_rollout():
    cfg = _separate(16)  # an 8x deeper teacher: at dp 1 its scoring (compute) outlasts the rollout (bandwidth)
    layout = RoleLayout.from_config(cfg, 16)
    stages = estimate_stages(cfg, layout, CPU)
    roll, teach = stages[0].seconds, stages[1].seconds
    assert teach > roll
    dps, s_dp, best = suggest_teacher_dp(cfg, layout, CPU)
    assert s_dp == 16 - dps["general"]
    assert best[1].seconds <= best[0].seconds  # teacher <= rollout at the suggestion
    fewer = estimate_stages(cfg, layout, CPU, teacher_dp={"general": dps["general"] - 1}, student_dp=s_dp + 1)
    assert fewer[1].seconds > fewer[0].seconds  # one replica fewer would not do
    assert dps == {"general": 4}  # 1.07 ms scoring vs 1.49 ms rollout; dp 3: 1.48 > 1.43 ms
    text = plan(cfg, 16, profile=CPU).render()
    assert "ON the critical path" in text and f"general dp {dps['general']}" in text
    # a teacher that is cheap already needs one replica
    small = _separate(2)
    assert suggest_teacher_dp(small, RoleLayout.from_config(small, 4), CPU)[0] == {"general": 1}


def test_profiles_builtin_and_json(tmp_path):
    h100 = load_profile("H100")
    assert h100 is GPU_PROFILES["h100"] and h100.peak_flops == 989e12 and h100.mem_bandwidth == 3.35e12
    assert {"a100", "h100", "h200", "b200"} <= set(GPU_PROFILES)
    f = tmp_path / "cpu.json"
    f.write_text(json.dumps({"name": "cpu-2t", "device_type": "cpu", "peak_flops": 1.5e11, "mem_bandwidth": 1e10}))
    prof = load_profile(str(f))
    assert prof.peak_flops == 1.5e11 and prof.device_type == "cpu"
    assert json.loads(prof.to_json())["mem_bandwidth"] == 1e10
    with pytest.raises(ValueError, match="neither a built-in profile"):
        load_profile(str(tmp_path / "missing.json"))
    f.write_text(json.dumps({"name": "x", "peak_flops": 1.0, "flops": 2}))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['mem_bandwidth'\]; unknown key\(s\) \['flops'\]"):
        load_profile(str(f))
    f.write_text(json.dumps({"name": "x", "peak_flops": 0, "mem_bandwidth": 1.0}))
    with pytest.raises(ValueError, match="must be positive"):
        load_profile(str(f))
    # the GPU profile's memory becomes the warning threshold; a device mismatch is refused
    assert plan(_cfg(), 1, profile=h100).gpu_memory_gib == 80
    with pytest.raises(ValueError, match="is for cpu"):
        plan(_cfg(), 1, device_type="cuda", profile=prof)


def test_cli_dry_run_with_profile(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": TINY, "teachers": [{"name": "general", "init": "random", "branches": ["general"],
                                                            "placement": "colocated"}],
                               "selection": {"rho": {"general": 0.8}, "score": {"general": "abs"}},
                               "loss": {"adv_scale": {"general": 1.0}},
                               "scheduler": {"mode": "mixed", "mixed_shares": {"general": 1.0}}}))
    assert cli.main(["--config", str(cfg), "--dry-run", "--world-size", "1", "--device-profile", "h200"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "h200" in out and "rollout" in out
    assert cli.main(["--config", str(cfg), "--dry-run", "--world-size", "1", "--device-profile", "nope"]) == 2
    assert "neither a built-in profile" in capsys.readouterr().err
    assert cli.main(["--config", str(cfg), "--dry-run", "--world-size", "1", "--device", "cpu",
                     "--device-profile", "h100"]) == 2


def test_calibrate_writes_a_loadable_profile(tmp_path):
    """bench.calibrate measures only a matmul and a memory read; its JSON is what --device-profile takes."""
    from camopd_megatron.bench import calibrate

    rec = calibrate.measure(1, sizes=(64, 128), mib=4, reps=2)
    assert rec["peak_flops"] == max(rec["raw"]["matmul_flops"].values()) > 0 and rec["mem_bandwidth"] > 0
    f = tmp_path / "cpu.json"
    calibrate.main(["--threads", "1", "--sizes", "64", "--mib", "4", "--reps", "1", "--out", str(f)])
    prof = load_profile(str(f))
    assert prof.device_type == "cpu" and prof.dtype == "fp32" and prof.peak_flops > 0
    assert plan(_cfg(), 1, profile=prof).stages.stage("train").seconds > 0
