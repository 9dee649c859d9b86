"""Parameter and FLOP counts of the GPTModel we build (dense and mixture-of-experts), no torch.

Parameters are counted exactly for the Llama/Qwen/Mistral-style GPTModel: fused QKV with GQA
(``model.head_dim`` when set, else hidden/heads), SwiGLU fc1 = gate+up, RMSNorm weights replicated
over TP, untied output layer on the last stage. An MoE layer (``model.moe``, sparse where
``moe.layer_pattern`` has a 1, every layer when it is None) replaces the dense MLP by:

* the **router**, ``[E, h]`` (megatron keeps it whole on every rank: not TP-sharded);
* E **experts**, each a SwiGLU of width ``moe.ffn_hidden_size`` (3·h·f_e): sharded over the expert
  group, EP × ETP (each EP rank holds E/EP experts, each split ETP ways);
* the **shared expert** (``moe.shared_expert_ffn_hidden_size``, a SwiGLU, TP-sharded like a dense
  MLP) and its sigmoid **gate** ``[1, h]`` (replicated) when the architecture has one.

"Active" parameters are those one token goes through: everything but the experts, plus top-k
experts. FLOPs count 2 per multiply-add of each matmul (embedding lookups and norms are free):
per token, ``2 × active matmul parameters`` of the layers, plus the attention scores and their
weighted sum, ``4 · T · a · d`` per layer for a sequence of T tokens (the full T × T square, as the
local core attention computes it), plus the output layer ``2 · h · V`` at each scored position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from camopd_megatron.config import ModelConfig

__all__ = ["dtype_bytes", "LayerParams", "layer_params", "stage_params", "count_params", "active_params", "expert_params",
           "moe_layers", "forward_flops"]


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtype_bytes(name: str, device_type: str) -> int:
    """Bytes per element of a dtype setting (``auto``: bf16 on cuda, fp32 on cpu)."""
    return _BYTES["bf16" if device_type == "cuda" else "fp32"] if name == "auto" else _BYTES[name]


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer, unsharded, split by how they shard."""

    tp: int
    """TP-sharded weights: attention (QKV, output projection, QKV bias), dense MLP or shared expert."""
    replicated: int
    """Kept whole on every rank: RMSNorm weights, the router, the shared-expert gate."""
    experts: int = 0
    """All routed experts (sharded over EP × ETP)."""
    active_experts: int = 0
    """The top-k experts one token goes through."""
    elementwise: int = 0
    """The part of ``tp`` + ``replicated`` that is no matmul weight (norm weights, QKV bias): no matmul FLOPs."""

    @property
    def total(self) -> int:
        return self.tp + self.replicated + self.experts

    @property
    def active(self) -> int:
        return self.tp + self.replicated + self.active_experts


def moe_layers(m: ModelConfig) -> list[bool]:
    """Per layer: True where the layer is an MoE layer (``model.moe.layer_pattern``; all when None)."""
    moe = m.moe
    if moe is None:
        return [False] * m.num_layers
    if moe.layer_pattern is None:
        return [True] * m.num_layers
    return [bool(x) for x in moe.layer_pattern]


def layer_params(m: ModelConfig, sparse: bool) -> LayerParams:
    """One layer's parameters (``sparse``: an MoE layer of ``model.moe``)."""
    h, a, kv, d = m.hidden_size, m.num_attention_heads, m.kv_heads, m.kv_channels
    qkv_out = (a + 2 * kv) * d
    tp = h * qkv_out + a * d * h  # fused QKV, output projection
    replicated = 2 * h  # input_layernorm + pre_mlp_layernorm
    if m.qk_layernorm:
        replicated += 2 * d
    elementwise = replicated
    if m.add_qkv_bias:
        tp += qkv_out
        elementwise += qkv_out
    moe = m.moe
    if not sparse or moe is None:
        return LayerParams(tp + 3 * h * m.ffn_hidden_size, replicated, elementwise=elementwise)
    expert = 3 * h * moe.ffn_hidden_size  # SwiGLU: fc1 (gate + up) h x 2f, fc2 f x h
    replicated += moe.num_experts * h  # router
    if moe.shared_expert_ffn_hidden_size:
        tp += 3 * h * moe.shared_expert_ffn_hidden_size
        if moe.shared_expert_gate:
            replicated += h
    return LayerParams(tp, replicated, moe.num_experts * expert, moe.router_topk * expert, elementwise)


def _layers(m: ModelConfig) -> list[LayerParams]:
    return [layer_params(m, s) for s in moe_layers(m)]


def stage_params(m: ModelConfig, tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> list[int]:
    """Parameters on one rank of each pipeline stage (embedding on the first, head + final norm on the last).

    Dense weights are divided by ``tp``, routed experts by ``ep × etp`` (``etp`` None = ``tp``)."""
    etp = tp if etp is None else etp
    layers = _layers(m)
    per = m.num_layers // pp
    per_stage = [sum(lp.tp // tp + lp.replicated + lp.experts // (ep * etp) for lp in layers[i * per:(i + 1) * per])
                 for i in range(pp)]
    vh = m.padded_vocab_size * m.hidden_size // tp
    per_stage[0] += vh
    per_stage[-1] += m.hidden_size  # final norm
    if not m.tie_embeddings or pp > 1:  # tied + PP>1: the last stage keeps its own copy (megatron)
        per_stage[-1] += vh
    return per_stage


def expert_params(m: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None) -> list[int]:
    """The routed-expert part of :func:`stage_params` per stage (0 for a dense model)."""
    etp = tp if etp is None else etp
    layers = _layers(m)
    per = m.num_layers // pp
    return [sum(lp.experts // (ep * etp) for lp in layers[i * per:(i + 1) * per]) for i in range(pp)]


def count_params(m: ModelConfig) -> int:
    """Total parameters of the model (TP=PP=EP=1)."""
    return stage_params(m, 1, 1)[0]


def active_params(m: ModelConfig) -> int:
    """Parameters one token goes through: :func:`count_params` with only the top-k experts of each MoE layer."""
    return count_params(m) - sum(lp.experts - lp.active_experts for lp in _layers(m))


def forward_flops(m: ModelConfig, tokens: int, scored: int, context: Optional[float] = None) -> float:
    """FLOPs of one forward over ``tokens`` positions of a sequence with the output layer at ``scored``
    positions (the response window), all ranks together (module docstring). Each position attends
    to ``context`` keys (default ``tokens``: the full square; a decode step: the cache length)."""
    layers = _layers(m)
    matmul = sum(lp.active - lp.elementwise for lp in layers)
    ctx = tokens if context is None else context
    attention = 4.0 * ctx * m.num_attention_heads * m.kv_channels * len(layers)
    return 2.0 * tokens * matmul + tokens * attention + 2.0 * scored * m.hidden_size * m.padded_vocab_size
