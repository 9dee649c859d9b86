"""Smoke test of the end-to-end step benchmark (``camopd_megatron.bench.step``) on a micro model."""
from __future__ import annotations

import json

from camopd_megatron.testing.multiproc import run_on_ranks

MICRO = {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64, "new_tokens": 4}
PEER_FIELDS = ("steps", "wall_s", "step_s_first", "step_s_steady_mean", "gen_s", "generated_tokens", "train_tokens",
               "gen_tokens_per_s", "train_tokens_per_s", "peak_rss_mb")


def _bench_worker(rank: int, world_size: int, work: str) -> dict:
    from pathlib import Path

    from camopd_megatron.bench.step import run_setting

    return run_setting(size="small", teachers=1, layout="single", steps=2, threads=1, work=Path(work), dims=MICRO,
                       probe_each_step=True)


def test_two_steps_of_a_micro_model_report_the_peer_fields_and_stages(tmp_path):
    (rec,) = run_on_ranks(_bench_worker, 1, args=(str(tmp_path),), timeout_s=240)
    for key in PEER_FIELDS:
        assert key in rec and rec[key] is not None, key
    assert rec["steps"] == 2
    # fixed-length responses (the tokenizer declares no EOS): 8 prompts x 4 tokens per step
    assert rec["generated_tokens"] == 2 * 8 * 4
    assert rec["response_len_mean"] == 4.0
    assert rec["train_tokens"] == 2 * 8 * (32 + 4)
    assert rec["train_tokens_per_s"] > 0 and rec["peak_rss_mb"] > 0
    for stage in ("data", "rollout", "teacher", "select", "train", "optimizer", "step"):
        assert stage in rec["stages_s"], stage
    assert "recompute" not in rec["stages_s"]  # selection off: the gaps come out of the training forward
    # the vocabulary of 64 is padded to 128 rows (model.vocab_pad_multiple), as megatron builds and multiplies it
    assert rec["params"] == 1 * (32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 2 * 128 * 32 + 32
    # the train stage's FLOP floor beside the measurement: 3 x (layers over 8 x 36 positions + output layer over
    # the 8 x 4 response positions), at a matmul rate measured in the same process
    linear = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64
    flops = 3 * (8 * (2 * linear * 36 + 4 * 36 * 36 * 32) + 2 * 8 * 4 * 128 * 32)
    floor = rec["floor"]
    assert floor["train_gflop"] == round(flops / 1e9, 2) and floor["matmul_gflops"] > 0
    assert floor["train_floor_s"] > 0 and floor["train_over_floor"] > 0
    # the spread from step to step: one steady step here, so min, median and max are its ratio, and the mean's
    lo, mid, hi = floor["train_over_floor_steps"]
    assert lo == mid == hi == floor["train_over_floor"]
    # of the train stage (within the rounding of the ~2 ms floor to 0.1 ms)
    assert abs(floor["train_over_floor"] * floor["train_floor_s"] / rec["stages_s"]["train"] - 1) <= 0.05
    # at one thread, also on the stage thread's CPU clock: the same FLOPs at the CPU clock's rate, against the
    # stage's CPU time (at most its wall time; what is left is the time off the core)
    cpu, cpu_train = floor["cpu"], rec["stages_cpu_s"]["train"]
    assert 0 < cpu_train <= rec["stages_s"]["train"] + 1e-3
    assert abs(cpu["train_floor_s"] * cpu["matmul_gflops"] * 1e9 / flops - 1) <= 0.1
    assert abs(cpu["train_over_floor"] * cpu["train_floor_s"] / cpu_train - 1) <= 0.05
    assert abs(cpu["off_core_s"] - (rec["stages_s"]["train"] - cpu_train)) <= 1e-3
    # probed around every step too: the one steady step at the better of the probes after steps 1 and 2, on both
    # clocks (the rate rounded to 0.1 GFLOP/s here)
    assert rec["probe_each_step"] is True
    for paired, train in ((floor["paired"], rec["stages_s"]["train"]), (floor["paired"]["cpu"], cpu_train)):
        (gflops,) = paired["matmul_gflops_steps"]
        assert gflops > 0 and paired["train_over_floor_steps"] == [paired["train_over_floor"]] * 3
        assert abs(paired["train_over_floor"] / (train * gflops * 1e9 / flops) - 1) <= 0.05
    json.dumps(rec)  # the --json line


def test_paired_floor_takes_each_step_at_the_better_probe_around_it():
    import pytest

    from camopd_megatron.bench.step import paired_floor, run_setting, train_stage_flops

    cfg = {"model": dict(hidden_size=32, ffn_hidden_size=64, vocab_size=64, num_layers=1, num_attention_heads=2,
                         num_query_groups=1), "rollout": {"prompts_per_step": 8, "max_new_tokens": 4},
           "data": {"max_prompt_tokens": 32}}
    flops = train_stage_flops(cfg)["total"]
    # three steps of 1 s: the host at 1x, 2x, then 1x its speed before and after each
    out = paired_floor(cfg, [1.0, 1.0, 1.0], [(flops, flops), (2 * flops, flops), (flops, flops / 2)])
    assert out["matmul_gflops_steps"] == [round(flops / 1e9, 1), round(2 * flops / 1e9, 1), round(flops / 1e9, 1)]
    assert out["train_over_floor_steps"] == [1.0, 1.0, 2.0] and out["train_over_floor"] == round(4 / 3, 3)
    with pytest.raises(ValueError, match="2 probe pairs for 3 steps"):
        paired_floor(cfg, [1.0, 1.0, 1.0], [(1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="probe_each_step.*layout='sep2'"):
        run_setting(size="small", teachers=1, layout="sep2", steps=1, threads=1, probe_each_step=True)


def test_the_loop_clock_leaves_its_probes_out_of_the_wall_time_and_the_peak_memory():
    import time

    import pytest
    import torch

    from camopd_megatron.bench.step import _LoopClock, _reset_hwm, _vm_kb

    def probe():  # 0.3 s and ~400 MB touched, between the steps
        big = torch.ones(100_000_000)
        time.sleep(0.3)
        return [float(big[0])]

    if not _reset_hwm():
        pytest.skip("this kernel cannot reset VmHWM (/proc/self/clear_refs)")
    base_kb = _vm_kb("VmRSS")
    clock = _LoopClock(probe)
    t0 = time.perf_counter()
    for step in range(3):  # the trainer's calls: before step 1, after steps 1 and 2 (the steps take no time here)
        clock(step, None, None)
    assert time.perf_counter() - t0 >= 0.9 and clock.probes == [[1.0]] * 3
    assert 0 <= clock.loop_wall_s() < 0.1  # the two probes inside the loop are left out, the last one is after it
    assert clock.hwm_kb is not None and clock.hwm_kb < base_kb + 100 * 1024
    assert _vm_kb("VmHWM") < base_kb + 100 * 1024  # reset after the last probe as well
    plain = _LoopClock()  # no probe: the span of the stamps, the process's peak as it is
    plain(0, None, None)
    time.sleep(0.05)
    plain(1, None, None)
    assert plain.loop_wall_s() >= 0.05 and plain.hwm_kb == _vm_kb("VmHWM")


def test_train_floor_counts_the_qwen_vocabulary_output_layer():
    from camopd_megatron.bench.step import SIZES, train_stage_flops

    d = SIZES["qwen"]
    cfg = {"model": {"hidden_size": d["hidden"], "ffn_hidden_size": d["ffn"], "vocab_size": d["vocab"],
                     "num_layers": d["layers"], "num_attention_heads": d["heads"], "num_query_groups": d["kv_heads"]},
           "rollout": {"prompts_per_step": 8, "max_new_tokens": d["new_tokens"]}, "data": {"max_prompt_tokens": 32}}
    f = train_stage_flops(cfg)
    assert d["vocab"] == 151936
    assert f["output_layer"] == 3 * 2 * 8 * 64 * 151936 * 256  # forward + dL/dh + dL/dW over the 512 scored tokens
    assert 110e9 < f["output_layer"] < 130e9 and f["layers"] < 0.15 * f["total"]


def test_an_moe_student_setting_is_a_valid_config_and_counts_its_active_experts(tmp_path):
    """``--moe-experts 4 --moe-topk 2``: every layer has 4 experts of FFN/2, so a token's matmuls are the dense
    ones plus the router; the parameters count all 4 experts."""
    from camopd_megatron.bench.step import _count_params, bench_config_dict, train_stage_flops
    from camopd_megatron.config import config_from_dict

    dense = bench_config_dict(tmp_path / "d", size="small", teachers=2, layout="single", steps=2, dims=MICRO)
    moe = bench_config_dict(tmp_path / "m", size="small", teachers=2, layout="single", steps=2, dims=MICRO,
                            moe_experts=4, moe_topk=2)
    model = config_from_dict(moe).model
    assert model.moe is not None and (model.moe.num_experts, model.moe.router_topk, model.moe.ffn_hidden_size) == (4, 2, 32)
    router = 4 * 32
    assert _count_params(moe) - _count_params(dense) == 4 * 3 * 32 * 32 - 3 * 32 * 64 + router
    f_dense, f_moe = train_stage_flops(dense), train_stage_flops(moe)
    assert f_moe["output_layer"] == f_dense["output_layer"]
    assert f_moe["layers"] - f_dense["layers"] == 3 * 8 * 2 * 36 * router


def test_prompt_and_tokenizer_files_match_the_peer(tmp_path):
    from camopd_megatron.bench.step import write_prompts, write_tokenizer
    from camopd_megatron.data import load_tokenizer

    tok = load_tokenizer(str(write_tokenizer(tmp_path / "tok", 100)))
    assert tok.vocab_size == 100 and tok.eos_id is None and tok.bos_id == 2
    path = write_prompts(tmp_path / "p.jsonl", 3, 32, 100, seed=0)
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(len(tok.encode(r)) == 32 for r in rows)


def test_vs_trl_finds_the_peer_through_flags_relative_to_the_repository(tmp_path):
    from pathlib import Path

    import pytest

    from camopd_megatron.bench import vs_trl

    repo = Path(__file__).resolve().parents[1]
    assert vs_trl.REPO == repo
    assert vs_trl.DEFAULT_PEER_DIR == repo.parent / "shared" / "peers" / "trl"
    with pytest.raises(ValueError, match="--peer-dir=.*no run_peer.py"):
        vs_trl.main(["--peer-dir", str(tmp_path)])
    (tmp_path / "run_peer.py").write_text("")
    # the venv defaults to where the peer's README creates it, inside the peer dir
    with pytest.raises(ValueError, match=r"--trl-python=.*\.venv-trl/bin/python.*does not exist"):
        vs_trl.main(["--peer-dir", str(tmp_path)])
