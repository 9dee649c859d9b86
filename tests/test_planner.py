"""planner.py against a hand calculation: 8B Llama-style student TP=4, two 8B teachers TP=2, 4 x 8 GPUs.

All arithmetic is spelled out here, independent of the planner's code, so a change in a formula
shows up as a mismatch against numbers a reader can check on paper.
"""
from __future__ import annotations

import pytest

from camopd_megatron.config import config_from_dict
from camopd_megatron.parallel import LayoutError
from camopd_megatron.planner import count_params, plan, stage_params

LLAMA_8B = {
    "init": "random", "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_query_groups": 8,
    "ffn_hidden_size": 14336, "vocab_size": 128256, "seq_length": 4096,
}


def _cfg(**over):
    d = {
        "model": dict(LLAMA_8B),
        "parallel": {"tp": 4, "use_distributed_optimizer": True},
        "teachers": [
            {"name": "general", "init": "random", "branches": ["general"], "placement": "separate", "tp": 2},
            {"name": "domain", "init": "random", "branches": ["domain"], "placement": "separate", "tp": 2},
        ],
        "data": {"max_prompt_tokens": 1024},
        "rollout": {"max_new_tokens": 3072, "micro_batch_size": 8},
        "optim": {"micro_batch_size": 1},
        "precision": {"params_dtype": "bf16"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        d[section][name] = value
    return config_from_dict(d)


# ---- hand calculation ---------------------------------------------------------------------------
# h = 4096, a = 32 heads, kv = 8, head_dim d = 4096/32 = 128, ffn f = 14336, V = 128256
# (already a multiple of 128, so padded V = 128256), L = 32.
# One layer, unsharded:
#   fused QKV  h*(a + 2kv)*d = 4096*48*128     =  25,165,824
#   out proj   a*d*h         = 4096*4096       =  16,777,216
#   SwiGLU     3*h*f         = 3*4096*14336    = 176,160,768
#   -> TP-sharded weights                       = 218,103,808
#   2 RMSNorm weights 2*h (replicated over TP)  =       8,192
# Whole model: 32*(218,103,808 + 8,192) + 2*V*h (embedding + untied output) + h (final norm)
#   = 6,979,584,000 + 1,050,673,152 + 4,096    = 8,030,261,248  (Llama-3-8B: 8.03B)
FULL_PARAMS = 8_030_261_248
# Student rank, TP=4, PP=1:
#   layers 32*(218,103,808/4 + 8,192) = 32*54,534,144 = 1,745,092,608
#   embedding + output 2*128256*4096/4             =   262,668,288
#   final norm                                      =         4,096
N_STUDENT = 2_007_764_992
# Teacher rank, TP=2: 32*(109,051,904 + 8,192) + 2*128256*4096/2 + 4096
#   = 3,489,923,072 + 525,336,576 + 4,096
N_TEACHER = 4_015_263_744
# World: 2 teachers x 2 ranks = 4; student 32 - 4 = 28 ranks = TP 4 x DP 7.
DP = 7
# Bytes on one student rank (bf16 params):
PARAMS = 2 * N_STUDENT  # 4,015,529,984 = 3.740 GiB
GRADS = 4 * N_STUDENT  # fp32 main grads: 8,031,059,968 = 7.479 GiB
OPT_FULL = 12 * N_STUDENT  # Adam m, v + fp32 master: 24,093,179,904 = 22.438 GiB
OPT_DIST = OPT_FULL / DP  # distributed optimizer: 3,441,882,843 = 3.206 GiB
# Activations (Korthikanti et al. Table 2, flash attention: no 5as/h term), s = 1024 + 3072 = 4096,
# b = 1: s*b*h = 16,777,216; per layer s*b*h*(10 + 24/4) = 268,435,456; x 32 layers:
ACT = 32 * 16_777_216 * 16  # 8,589,934,592 = 8.0 GiB
# Full recompute: 2*s*b*h per layer stored + one layer re-materialised:
ACT_RECOMPUTE = 32 * 2 * 16_777_216 + 268_435_456  # 1,342,177,280 = 1.25 GiB
LOGITS = 4096 * 1 * 128256 // 4 * 2  # [s, b, V/4] bf16 = 262,668,288
# KV cache: 2 (K,V) * 32 layers * 8/4 kv heads * 128 * 4096 tokens * 8 prompts * 2 bytes
KV = 2 * 32 * 2 * 128 * 4096 * 8 * 2  # 1,073,741,824 = 1.0 GiB
STUDENT_TOTAL = PARAMS + GRADS + OPT_DIST + ACT + LOGITS + KV  # 25,414,817,499 B = 23.67 GiB
# Teacher rank: bf16 weights 2 * 4,015,263,744 = 8,030,527,488 (7.479 GiB)
# + one scoring micro-batch's logits 4096*1*128256/2*2 = 525,336,576
TEACHER_TOTAL = 2 * N_TEACHER + 4096 * 128256 // 2 * 2


def test_param_counts():
    cfg = _cfg()
    assert count_params(cfg.model) == FULL_PARAMS
    assert stage_params(cfg.model, 4, 1) == [N_STUDENT]
    assert stage_params(cfg.model, 2, 1) == [N_TEACHER]
    # PP=2: 16 layers each; embedding on stage 0, output + final norm on stage 1
    per_layer = 218_103_808 // 4 + 8_192
    assert stage_params(cfg.model, 4, 2) == [16 * per_layer + 131_334_144, 16 * per_layer + 131_334_144 + 4096]


def test_memory_matches_hand_calculation():
    p = plan(_cfg(), 32)
    assert [(r.name, r.tp, r.pp, r.dp, r.rank_offset) for r in p.layout.roles] == [
        ("student", 4, 1, 7, 0), ("general", 2, 1, 1, 28), ("domain", 2, 1, 1, 30),
    ]
    s = p.role("student")
    assert s.item("params").bytes == PARAMS
    assert s.item("grads").bytes == GRADS
    assert s.item("optimizer").bytes == pytest.approx(OPT_DIST)
    assert s.item("optimizer").alt_bytes == OPT_FULL
    assert s.item("activations").bytes == ACT
    assert s.item("activations").alt_bytes == ACT_RECOMPUTE
    assert s.item("logits").bytes == LOGITS
    assert s.item("kv cache").bytes == KV
    assert s.total_bytes == pytest.approx(STUDENT_TOTAL)
    assert s.total_gib == pytest.approx(23.67, abs=0.005)
    for name in ("general", "domain"):
        t = p.role(name)
        assert t.item(f"weights {name}").bytes == 2 * N_TEACHER
        assert t.total_bytes == TEACHER_TOTAL
        assert t.total_gib == pytest.approx(7.97, abs=0.005)


def test_variants_recompute_no_dist_opt_sp_and_cpu():
    p = plan(_cfg(parallel__use_distributed_optimizer=False, model__recompute="full"), 32)
    s = p.role("student")
    assert s.item("optimizer").bytes == OPT_FULL and s.item("optimizer").alt_bytes == pytest.approx(OPT_DIST)
    assert s.item("activations").bytes == ACT_RECOMPUTE and s.item("activations").alt_bytes == ACT
    assert "full recompute (uniform, 1 layer)" in s.item("activations").note
    # sequence parallel: s*b*h*34/t per layer
    sp = plan(_cfg(parallel__sequence_parallel=True), 32).role("student")
    assert sp.item("activations").bytes == 32 * 16_777_216 * 34 / 4
    # local layers keep the attention scores: + 5*a*s/(h*t) = 5*32*4096/(4096*4) = 40 per s*b*h
    local = plan(_cfg(model__transformer_impl="local"), 32).role("student")
    assert local.item("activations").bytes == 32 * 16_777_216 * (16 + 40)
    # on CPU, auto dtypes are fp32: params 4 B, no master copy (Adam 8 B/param)
    cpu = plan(_cfg(precision__params_dtype="auto"), 32, device_type="cpu").role("student")
    assert cpu.item("params").bytes == 4 * N_STUDENT
    assert cpu.item("optimizer").bytes == pytest.approx(8 * N_STUDENT / DP)


def test_recompute_variants_read_model_recompute():
    """model.recompute drives the figure: selective drops the 5as/h scores term (local layers), full
    uniform N keeps one 2sbh input per N layers and re-materialises N layers, full block N keeps the
    input of its first N layers and everything of the rest."""
    sbh = 16_777_216
    local_layer = sbh * (16 + 40)  # s*b*h*(10 + 24/4) + 5as/(h t) = 40 for the local layers (see above)
    sel = plan(_cfg(model__transformer_impl="local", model__recompute="selective"), 32).role("student")
    assert sel.item("activations").bytes == 32 * sbh * 16
    assert sel.item("activations").alt_bytes == 32 * local_layer  # beside it: no recompute
    uni = plan(_cfg(model__recompute="full", model__recompute_num_layers=4), 32).role("student")
    assert uni.item("activations").bytes == 32 // 4 * 2 * sbh + 4 * sbh * 16
    block = plan(_cfg(model__recompute="full", model__recompute_method="block", model__recompute_num_layers=24),
                 32).role("student")
    assert block.item("activations").bytes == 24 * 2 * sbh + 8 * sbh * 16 + sbh * 16
    assert "full recompute (block, 24 layers)" in block.item("activations").note


def test_render_and_layout_errors():
    text = plan(_cfg(), 32, gpu_memory_gib=16).render()
    for piece in ("student  ranks 0-27", "tp4×pp1×dp7", "ranks 28-29", "general", "kv cache", "23.67",
                  "without distributed optimizer: 22.44", "WARNING: 23.7 GiB exceeds the 16 GiB"):
        assert piece in text, piece
    big = plan(_cfg(), 512)  # 64 nodes x 8: student DP = (512 - 4) / 4 = 127
    assert big.layout.student.dp == 127
    with pytest.raises(LayoutError, match="not a positive multiple"):
        plan(_cfg(), 30)  # 26 ranks left for TP=4
    with pytest.raises(LayoutError, match="world size 32 != sum of role sizes 36"):
        plan(_cfg(parallel__dp=8), 32)
