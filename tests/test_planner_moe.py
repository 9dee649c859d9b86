"""The planner's mixture-of-experts counts and the Qwen3-30B-A3B plan on 64 GPUs, against hand calculations.

Every number is worked out here from the architecture, independent of the planner's code (the same
figures, written out, are in BENCHMARKS.md, "Planner: Qwen3-30B-A3B on 64 GPUs").
"""
from __future__ import annotations

from pathlib import Path

import pytest

from camopd_megatron.config import config_from_dict, load_config
from camopd_megatron.planner import (GPU_PROFILES, active_params, count_params, expert_params, forward_flops, plan,
                                     stage_params)

REPO = Path(__file__).resolve().parents[1]

# ---- tiny MoE: layer 0 dense, layer 1 MoE ------------------------------------------------------------
# h = 64, a = 4, kv = 2, d = 16, dense FFN 128, V = 256, untied; E = 4 experts, top-2, expert FFN 32,
# a shared expert of 48 with its gate.
#   layer 0 (dense): QKV 8,192 + proj 4,096 + SwiGLU 3·64·128 = 24,576 → 36,864 matmul; norms 128
#   layer 1 (MoE):   attention 12,288; router 4·64 = 256; experts 4 × 3·64·32 = 4 × 6,144 = 24,576;
#                    shared 3·64·48 = 9,216; gate 64; norms 128 → 46,528
#   model: 36,992 + 46,528 + embedding and output 2·256·64 = 32,768 + final norm 64 = 116,352
#   active: 2 of the 4 experts → 116,352 − 2·6,144 = 104,064
TINY_MOE = {"init": "random", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
            "ffn_hidden_size": 128, "vocab_size": 256, "seq_length": 64, "tie_embeddings": False,
            "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32, "shared_expert_ffn_hidden_size": 48,
                    "shared_expert_gate": True, "layer_pattern": [0, 1]}}


def _tiny(**moe_over):
    m = {**TINY_MOE, "moe": {**TINY_MOE["moe"], **moe_over}}
    return config_from_dict({"model": m, "teachers": [{"name": "t", "init": "random", "branches": ["general", "domain"]}]}).model


def test_tiny_moe_counts_and_flops():
    m = _tiny()
    assert count_params(m) == 116_352
    assert active_params(m) == 104_064
    assert expert_params(m) == [24_576]
    # EP 4: one expert per rank → 116,352 − 3·6,144 = 97,920
    assert stage_params(m, 1, 1, ep=4) == [97_920]
    # TP 2, EP 2, ETP 1: TP-sharded (36,864 + 12,288 + 9,216)/2 = 29,184; replicated 128 + 128 + 256 + 64 = 576;
    # experts 24,576/2 = 12,288; embedding + output 32,768/2 = 16,384; final norm 64
    assert stage_params(m, 2, 1, ep=2, etp=1) == [29_184 + 576 + 12_288 + 16_384 + 64]
    # PP 2: stage 0 = dense layer + embedding, stage 1 = MoE layer + output + final norm
    assert stage_params(m, 1, 2) == [36_992 + 16_384, 46_528 + 16_384 + 64]
    # forward FLOPs, T = 24, W = 8: active matmul weights 36,864 + (12,288 + 256 + 2·6,144 + 9,216 + 64) = 70,976
    # 2·24·70,976 + attention 24·2 layers·4·24·4·16 + output 2·8·64·256
    assert forward_flops(m, 24, 8) == 2 * 24 * 70_976 + 24 * 2 * 4 * 24 * 64 + 2 * 8 * 64 * 256 == 3_963_904
    # every layer MoE (layer_pattern None), no shared expert: the experts replace the dense MLP in both layers
    every = _tiny(layer_pattern=None, shared_expert_ffn_hidden_size=None, shared_expert_gate=False)
    assert count_params(every) == 2 * (12_288 + 128 + 256 + 24_576) + 32_768 + 64


# ---- Qwen3-30B-A3B student + Qwen3-32B general teacher + 30B-A3B domain teacher on 64 GPUs -------------
# Student layer (h 2048, 32 heads / 4 kv, d 128, 128 experts top-8, expert FFN 768, qk norms):
#   QKV 2048·(32 + 2·4)·128 = 10,485,760; proj 32·128·2048 = 8,388,608 → TP-sharded 18,874,368
#   replicated: norms 2·2048 + qk norms 2·128 + router 128·2048 = 4,096 + 256 + 262,144 = 266,496
#   experts 128 · 3·2048·768 = 128 · 4,718,592 = 603,979,776
#   layer total 623,120,640 × 48 = 29,909,790,720; + embedding and output 2·151,936·2048 = 622,329,856 + 2,048
TOTAL_30B = 30_532_122_624  # Qwen3-30B-A3B: 30.5B
ACTIVE_30B = 48 * (18_874_368 + 266_496 + 8 * 4_718_592) + 622_329_856 + 2_048  # 3,353,032,704: 3.3B active
# Student rank (TP 2, EP 8, ETP 1, DP 16 = 32 ranks, SP): per layer 18,874,368/2 + 266,496 + 603,979,776/8
#   = 9,437,184 + 266,496 + 75,497,472 = 85,201,152; × 48 = 4,089,655,296; + 622,329,856/2 + 2,048
N_STUDENT = 4_400_822_272
EXPERTS_STUDENT = 48 * 75_497_472  # 3,623,878,656
DENSE_STUDENT = N_STUDENT - EXPERTS_STUDENT  # 776,943,616
PARAMS = 2 * N_STUDENT  # bf16: 8,801,644,544 B = 8.20 GiB
GRADS = 4 * N_STUDENT  # 17,603,289,088 B = 16.39 GiB
# distributed optimizer, 12 B/param: dense over DP 16, experts over expert-DP = 2·16/(8·1) = 4
OPT = 12 * DENSE_STUDENT / 16 + 12 * EXPERTS_STUDENT / 4  # 582,707,712 + 10,871,635,968 = 11,454,343,680
# activations, s = 1024 + 3072 = 4096, b = 1, SP, flash attention: per MoE layer s·b·h·(10.5 + 8 + 34)/2 with
# router 8·128/2048 = 0.5 and the expert share 8·(2 + 6·768/2048) = 34; s·b·h = 8,388,608
ACT = 48 * 8_388_608 * 52.5 / 2  # 10,569,646,080 B = 9.84 GiB
LOGITS = 4096 * 151_936 // 2 * 2  # 622,329,856
KV = 2 * 48 * 2 * 128 * 4096 * 16 * 2  # K,V · layers · kv heads/TP · d · s · rollout mb · 2 B = 3 GiB
DISPATCH = 4 * 2048 * 8 * 2048 * 2  # all-to-all: 4 buffers · (4096/2 SP tokens) · top-8 · h · 2 B = 256 MiB
STUDENT_TOTAL = PARAMS + GRADS + OPT + ACT + LOGITS + KV + DISPATCH  # 52,540,914,176 B = 48.93 GiB
# Domain teacher (the student's architecture) at TP 1, EP 8: 48·(18,874,368 + 266,496 + 75,497,472) + 622,329,858
#   - 2 (+ final norm 2,048) = 4,542,640,128 + 622,329,856 + 2,048 = 5,164,972,032 params, bf16
N_DOMAIN = 5_164_972_032
# General teacher, Qwen3-32B at TP 4: layer QKV 5120·80·128 = 52,428,800, proj 8192·5120 = 41,943,040,
#   SwiGLU 3·5120·25600 = 393,216,000 → 487,587,840/4 = 121,896,960 + norms 2·5120 + 2·128 = 10,496
#   × 64 = 7,802,077,184; + 2·151,936·5120/4 = 388,956,160 + 5,120
N_GENERAL = 8_191_038_464  # (model: 32.76B)


def _example():
    return load_config(str(REPO / "examples" / "configs" / "qwen3_30b_a3b_64gpu.yaml"))


def test_qwen3_30b_a3b_counts():
    m = _example().model
    assert count_params(m) == TOTAL_30B
    assert active_params(m) == ACTIVE_30B == 3_353_032_704
    assert stage_params(m, 2, 1, ep=8, etp=1) == [N_STUDENT]
    assert expert_params(m, 2, 1, ep=8, etp=1) == [EXPERTS_STUDENT]


def test_qwen3_30b_a3b_plan_on_64_gpus():
    """The example plans on 64 GPUs (no torch.distributed) and matches the hand calculation row by row."""
    p = plan(_example(), 64, profile=GPU_PROFILES["h100"])
    assert [(r.name, r.tp, r.pp, r.dp, r.rank_offset) for r in p.layout.roles] == [
        ("student", 2, 1, 16, 0), ("general", 4, 1, 4, 32), ("domain", 1, 1, 16, 48)]
    s = p.role("student")
    assert s.item("params").bytes == PARAMS
    assert s.item("grads").bytes == GRADS
    assert s.item("optimizer").bytes == pytest.approx(OPT)
    assert s.item("activations").bytes == pytest.approx(ACT)
    assert s.item("logits").bytes == LOGITS
    assert s.item("kv cache").bytes == KV
    assert s.item("dispatcher").bytes == DISPATCH
    assert s.total_bytes == pytest.approx(STUDENT_TOTAL)
    assert s.total_gib == pytest.approx(48.93, abs=0.005)
    assert p.role("domain").item("weights domain").bytes == 2 * N_DOMAIN
    assert p.role("domain").item("dispatcher domain").bytes == 4 * 4096 * 8 * 2048 * 2
    assert p.role("general").item("weights general").bytes == 2 * N_GENERAL
    text = p.render()
    for piece in ("30.532B total, 3.353B active per token", "experts 3.624B = /ep 8 x etp 1", "dispatcher",
                  "ESTIMATE", "rollout", "teacher domain", "suggested teacher ranks"):
        assert piece in text, piece
    assert "WARNING" not in text  # every role fits the profile's 80 GiB
    # the stage estimate counts active parameters: the student's train stage is 3 forwards of 32 samples
    # (512 prompts / DP 16) of 4096 tokens, output layer at the 3072 response positions, over its TP 2 ranks
    train = p.stages.stage("train")
    m = _example().model
    assert train.flops == pytest.approx(3 * 32 * forward_flops(m, 4096, 3072) / 2)
    # 2 FLOPs per active matmul weight and token (active minus embedding, output layer and norm weights),
    # attention over the full 4096² square, the output layer at the 3072 response positions
    matmul = ACTIVE_30B - 622_329_856 - 48 * (2 * 2048 + 2 * 128) - 2048
    assert forward_flops(m, 4096, 3072) == 2 * 4096 * matmul + 4 * 4096 * 4096 * 32 * 128 * 48 + 2 * 3072 * 2048 * 151_936


def test_teacher_suggestion_respects_the_expert_layout():
    """The suggested DP sizes pass the expert layout rules: the domain teacher (EP 8, TP 1) only in
    multiples of 8, the student (TP 2, EP 8, ETP 1: EP groups span 4 replicas) in multiples of 4."""
    from camopd_megatron.parallel import RoleLayout
    from camopd_megatron.planner import suggest_teacher_dp

    cfg = _example()
    dps, s_dp, stages = suggest_teacher_dp(cfg, RoleLayout.from_config(cfg, 64), GPU_PROFILES["h100"])
    assert dps["domain"] % 8 == 0 and s_dp % 4 == 0
    assert 4 * dps["general"] + dps["domain"] + 2 * s_dp <= 64
    roll = stages[0].seconds
    assert all(s.seconds <= roll for s in stages if s.name.startswith("teacher "))


def test_dispatcher_buffers():
    """10 tokens, h 64, top-2 of 4 experts, 2 B: all-to-all 4 buffers of 10·2·64; all-gather: the EP group's
    2·10 hidden states gathered and scattered back, their fp32 routing probabilities, the local k-fold copies."""
    from camopd_megatron.planner import dispatcher_bytes

    m = _tiny()
    assert dispatcher_bytes(m, tokens=10, ep=2, act_bytes=2) == 4 * 10 * 2 * 64 * 2 == 10_240
    ag = _tiny(token_dispatcher="allgather")
    assert dispatcher_bytes(ag, tokens=10, ep=2, act_bytes=2) == (2 * 2 * 10 * 64 + 2 * 10 * 2 * 64) * 2 + 2 * 10 * 4 * 4
    dense = config_from_dict({"model": {k: v for k, v in TINY_MOE.items() if k != "moe"},
                              "teachers": [{"name": "t", "init": "random", "branches": ["general", "domain"]}]}).model
    assert dispatcher_bytes(dense, tokens=10, ep=1, act_bytes=2) == 0.0
