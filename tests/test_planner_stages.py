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
                                     load_profile, plan, profile_from_dict, suggest_teacher_dp)
from camopd_megatron.planner.counts import forward_elementwise, forward_matmuls
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
    """bench.calibrate measures only micro-benchmarks (matmuls, elementwise ops, a memory read); its JSON is
    what --device-profile takes, the matmul table and the elementwise rate included."""
    from camopd_megatron.bench import calibrate

    rec = calibrate.measure(1, sizes=(64, 128), mib=4, reps=2, grid=((8, 16), (8,), (8, 16)), elementwise_numel=4096)
    assert rec["peak_flops"] == max(rec["raw"]["matmul_flops"].values()) > 0 and rec["mem_bandwidth"] > 0
    assert [(r["m"], r["k"], r["n"]) for r in rec["matmul_rates"]] == [(8, 8, 8), (8, 8, 16), (16, 8, 8), (16, 8, 16)]
    assert all(r["flops"] > 0 for r in rec["matmul_rates"]) and rec["elementwise_rate"] > 0
    assert profile_from_dict(rec).matmul_flops(16, 8, 8) == rec["matmul_rates"][2]["flops"]
    f = tmp_path / "cpu.json"
    calibrate.main(["--threads", "1", "--sizes", "64", "--mib", "4", "--reps", "1", "--grid-m", "8", "--grid-k", "8",
                    "--grid-n", "8", "16", "--elementwise-numel", "2048", "--out", str(f)])
    written = json.loads(f.read_text())
    assert [(r["m"], r["k"], r["n"]) for r in written["matmul_rates"]] == [(8, 8, 8), (8, 8, 16)]
    prof = load_profile(str(f))
    assert prof.device_type == "cpu" and prof.dtype == "fp32" and prof.peak_flops > 0
    assert len(prof.matmul_rates) == 2 and prof.elementwise_rate == written["elementwise_rate"] > 0
    assert plan(_cfg(), 1, profile=prof).stages.stage("train").seconds > 0
    # without a table or elementwise rate (the flags), the profile is the old two-number one
    calibrate.main(["--threads", "1", "--sizes", "64", "--mib", "4", "--reps", "1", "--no-table",
                    "--elementwise-numel", "0", "--out", str(f)])
    assert not {"matmul_rates", "elementwise_rate"} & set(json.loads(f.read_text()))
    # at a run config's shapes: micro-batch 4 of 24 tokens, 8 scored (module docstring's model)
    assert calibrate.config_grid(_cfg()) == ((24, 32, 96), (16, 24, 64, 128), (16, 24, 64, 128, 256))
    # a table too costly to measure (a large model's shapes) is refused before anything runs
    with pytest.raises(SystemExit):
        calibrate.main(["--grid-m", "4096", "--grid-k", "4096", "--grid-n", "151936", "--out", str(f)])


TABLE = DeviceProfile("test-table", peak_flops=9e12, mem_bandwidth=1e10, device_type="cpu",
                      matmul_rates=((1, 1, 64, 1e11), (1, 1, 256, 4e11)), elementwise_rate=1e9)
"""A table whose rate depends on n alone (one m, one k): 1e11 FLOP/s at n <= 64, 4e11 at n >= 256."""


def test_matmul_table_lookup():
    # corners exactly; between two grid values linear in log(rate) over log(n): n = 128 is halfway, sqrt(1e11 4e11)
    assert TABLE.matmul_flops(1, 1, 64) == 1e11 and TABLE.matmul_flops(1, 1, 256) == 4e11
    assert TABLE.matmul_flops(1, 1, 128) == pytest.approx(2e11)
    assert TABLE.matmul_flops(1, 1, 90.5) == pytest.approx(1e11 * 4 ** 0.25, rel=1e-3)
    # clamped outside the grid, in every dimension
    assert TABLE.matmul_flops(5000, 3, 16) == 1e11 and TABLE.matmul_flops(1, 1, 10 ** 6) == 4e11
    # trilinear: a 2 x 2 x 2 grid, rate = 1e9 * m * k * n at the corners, so at the geometric centre it is the
    # same product of the centre's values
    cube = DeviceProfile("cube", 1.0, 1.0, matmul_rates=tuple((m, k, n, 1e9 * m * k * n) for m in (1, 4)
                                                              for k in (1, 16) for n in (2, 8)))
    assert cube.matmul_flops(2, 4, 4) == pytest.approx(1e9 * 2 * 4 * 4)
    assert cube.matmul_flops(4, 1, 2) == 1e9 * 8
    # no table: the peak (what the GPU data-sheet profiles have)
    assert CPU.matmul_flops(7, 7, 7) == CPU.peak_flops
    with pytest.raises(ValueError, match="do not form a grid"):
        DeviceProfile("x", 1.0, 1.0, matmul_rates=((1, 1, 64, 1e11), (2, 1, 256, 4e11)))


def test_gpu_profiles_unchanged():
    """The data-sheet profiles carry no table and no elementwise rate: every stage at FLOPs / peak, as before."""
    for prof in GPU_PROFILES.values():
        assert prof.matmul_rates is None and prof.elementwise_rate is None
        assert "matmul_rates" not in json.loads(prof.to_json())
    h100 = GPU_PROFILES["h100"]
    est = plan(_cfg(), 1, profile=h100).stages
    assert est.stage("train").seconds == 3 * 8 * _fwd(24, 8) / 989e12
    t = est.stage("teacher general")
    assert t.seconds == max(8 * _fwd(24, 8) / 989e12, t.bytes / 3.35e12)
    sel = plan(_cfg(model__recompute="selective"), 1, profile=h100).stages
    assert sel.stage("train").seconds == pytest.approx((3 * 8 * _fwd(24, 8) + 8 * 2 * 4 * 24 * 24 * 4 * 16) / 989e12)


def test_table_profile_sums_the_matmuls():
    """With a table, a pass is the sum over its products of FLOPs / rate(shape), plus the elementwise work.
    The module docstring's model at T = 24, W = 8 (rates by n: TABLE's docstring)."""
    names = [p.name for p in forward_matmuls(_cfg().model, 24, 8)]
    assert names == 2 * ["qkv", "attention scores", "attention context", "attention projection", "fc1", "fc2"] \
        + ["output layer"]
    per_layer = (2 * 24 * 64 * 128 / 2e11  # QKV, n = (4 + 2·2)·16 = 128: halfway, 2e11
                 + 2 * (2 * 24 * 4 * 16 * 24) / 1e11  # scores (n = 24 keys) and context (n = d = 16), per head
                 + 2 * 24 * 64 * 64 / 1e11  # projection, n = h = 64
                 + 2 * 24 * 64 * 256 / 4e11  # fc1 (gate + up), n = 2f = 256
                 + 2 * 24 * 128 * 64 / 1e11)  # fc2, n = h
    matmul_s = 2 * per_layer + 2 * 8 * 64 * 256 / 4e11  # + the output layer at the 8 scored positions, n = V
    # element operations per position and layer: norms 8h + residual 2h + QKV split (a + 2kv)d + RoPE 5(a + kv)d
    # + mask/softmax 3·a·T + SwiGLU 3f = 640 + 128 + 480 + 288 + 384 = 1920; final norm 4h; log-softmax 4V
    elementwise = 24 * (2 * 1920 + 4 * 64) + 8 * 4 * 256
    assert forward_elementwise(_cfg().model, 24, 8) == elementwise == 106_496
    est = plan(_cfg(), 1, profile=TABLE).stages
    assert est.stage("train").seconds == pytest.approx(3 * 8 * (matmul_s + elementwise / 1e9))
    assert est.stage("train").flops == 3 * 8 * _fwd(24, 8)  # the FLOPs themselves are unchanged
    assert est.stage("teacher general").seconds == pytest.approx(8 * (matmul_s + elementwise / 1e9))
    text = est.render()
    assert "table of 2 shapes" in text and "1 G element-ops/s" in text
    # TP splits the shape: at tp 2 the QKV's n is 64 on a rank (1e11), fc1's 128 (2e11)
    fc1 = next(p for p in forward_matmuls(_cfg().model, 24, 8) if p.name == "fc1")
    assert fc1.shape(2, batch=4) == (96.0, 64.0, 128.0) and TABLE.matmul_flops(*fc1.shape(2)) == pytest.approx(2e11)


def test_profile_json_round_trip_and_old_files(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(TABLE.to_json())
    assert json.loads(f.read_text())["matmul_rates"][1] == {"m": 1, "k": 1, "n": 256, "flops": 4e11}
    assert load_profile(str(f)) == TABLE
    # a profile written before the table (two numbers) loads as it did, the estimate at peak
    f.write_text(json.dumps({"name": "cpu-2t", "device_type": "cpu", "dtype": "fp32", "peak_flops": 1e12,
                             "mem_bandwidth": 1e10, "memory_gib": None, "source": "old"}))
    old = load_profile(str(f))
    assert old.matmul_rates is None and old.elementwise_rate is None
    assert plan(_cfg(), 1, profile=old).stages.stage("train").seconds == pytest.approx(3 * 8 * _fwd(24, 8) / 1e12)
    f.write_text(json.dumps({"name": "x", "peak_flops": 1.0, "mem_bandwidth": 1.0, "matmul_rates": [{"m": 1}]}))
    with pytest.raises(ValueError, match=r"p.json: matmul_rates must be a list"):
        load_profile(str(f))
    f.write_text(json.dumps({"name": "x", "peak_flops": 1.0, "mem_bandwidth": 1.0,
                             "matmul_rates": [{"m": 1, "k": 1, "n": 1, "flops": 1.0},
                                              {"m": 2, "k": 2, "n": 1, "flops": 1.0}]}))
    with pytest.raises(ValueError, match=r"p.json: matmul_rates: 2 entries do not form a grid"):
        load_profile(str(f))
    f.write_text(json.dumps({"name": "x", "peak_flops": 1.0, "mem_bandwidth": 1.0, "elementwise_rate": 0}))
    with pytest.raises(ValueError, match="elementwise_rate must be positive"):
        load_profile(str(f))


def test_sizing_combines_calibrations_and_prints_the_ratios():
    """bench.sizing's profile arithmetic (no training here): the mean / median of several calibrations rate by
    rate, the peak-only cut, and the report line with the target verdict."""
    import statistics

    from camopd_megatron.bench import sizing

    def cal(x: float) -> dict:
        return {"name": "cpu-1t", "device_type": "cpu", "peak_flops": x, "mem_bandwidth": 2 * x, "elementwise_rate": 3 * x,
                "matmul_rates": [{"m": 1, "k": 1, "n": n, "flops": n * x} for n in (1, 2)], "raw": {}}

    mean = sizing.combine([cal(1.0), cal(3.0)], statistics.mean)
    assert (mean["peak_flops"], mean["mem_bandwidth"], mean["elementwise_rate"]) == (2.0, 4.0, 6.0)
    assert [r["flops"] for r in mean["matmul_rates"]] == [2.0, 4.0]
    assert profile_from_dict(mean).matmul_flops(1, 1, 2) == 4.0
    assert set(sizing.peak_only(mean)) == {"name", "device_type", "peak_flops", "mem_bandwidth", "raw"}
    row = {"size": "small", "teachers": 1, "threads": 1, "steps": 6,
           "calibration": {"peak_flops": [1e11] * 3, "mem_bandwidth": [1e10] * 3, "elementwise_rate": [3e9] * 3,
                           "matmul_table": {"shapes": 72, "median_flops": [9e10, 1.8e11]}},
           "stages": {"teacher": {"estimate_s": 0.06, "measured_s": 0.07, "ratio": 0.85, "ratio_range": [0.8, 0.9],
                                  "ratio_median_calibration": 0.8, "ratio_peak_only": 0.59},
                      "train": {"estimate_s": 0.1, "measured_s": 0.2, "ratio": 0.5, "ratio_range": [0.4, 0.6],
                                "ratio_median_calibration": 0.5, "ratio_peak_only": 0.4}}}
    text = sizing.format_row(row)
    assert "at the median calibration 0.80 (peak FLOP/s only: 0.59)" in text
    assert text.splitlines()[-1].endswith("teacher 0.80 yes, train 0.50 NO")
