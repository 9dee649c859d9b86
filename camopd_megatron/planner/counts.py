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
local core attention computes it), plus the output layer ``2 · h · V`` at each scored position
(:func:`forward_matmuls` lists the products one by one). The non-matmul work (norms, RoPE, softmax,
SwiGLU's activation, the output layer's log-softmax) is counted apart, in element operations
(:func:`forward_elementwise`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from camopd_megatron.config import ModelConfig

__all__ = ["dtype_bytes", "LayerParams", "layer_params", "stage_params", "count_params", "active_params", "expert_params",
           "moe_layers", "CORE_ATTENTION", "Matmul", "forward_matmuls", "forward_flops", "forward_elementwise"]


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
    if m.add_qkv_bias:
        tp += qkv_out
    moe = m.moe
    if not sparse or moe is None:
        return LayerParams(tp + 3 * h * m.ffn_hidden_size, replicated)
    expert = 3 * h * moe.ffn_hidden_size  # SwiGLU: fc1 (gate + up) h x 2f, fc2 f x h
    replicated += moe.num_experts * h  # router
    if moe.shared_expert_ffn_hidden_size:
        tp += 3 * h * moe.shared_expert_ffn_hidden_size
        if moe.shared_expert_gate:
            replicated += h
    return LayerParams(tp, replicated, moe.num_experts * expert, moe.router_topk * expert)


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


CORE_ATTENTION = ("attention scores", "attention context")
"""The :func:`forward_matmuls` names of the attention products (what selective recompute re-runs)."""


@dataclass(frozen=True)
class Matmul:
    """One matrix product of a forward, ``[rows, k] @ [k, n]`` in all, run as ``calls`` equal products of
    ``rows / calls`` rows each (attention: one per head; routed experts: one per expert)."""

    name: str
    rows: float
    k: float
    n: float
    calls: int = 1
    shard: str = ""
    """What TP splits: ``n`` (column-parallel), ``k`` (row-parallel), ``calls`` (attention heads), ``""`` (kept whole)."""

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.k * self.n

    def shape(self, tp: int = 1, batch: int = 1) -> tuple[float, float, float]:
        """``(m, k, n)`` of one of the products on one of ``tp`` ranks, for a micro-batch of ``batch``
        sequences (their rows stacked into one product; attention's stay one product per sequence and head)."""
        m, k, n = self.rows / self.calls, float(self.k), float(self.n)
        if self.shard != "calls":
            m *= batch
        if self.shard == "n":
            n = max(n / tp, 1.0)
        elif self.shard == "k":
            k = max(k / tp, 1.0)
        return m, k, n


def forward_matmuls(m: ModelConfig, tokens: int, scored: int, context: Optional[float] = None) -> list[Matmul]:
    """The matrix products of one forward over ``tokens`` positions (:func:`forward_flops` is their sum):
    per layer fused QKV, attention scores ``Q Kᵀ`` and context ``P V`` (per head, ``context`` keys,
    default ``tokens``), output projection, and the SwiGLU MLP (fc1 = gate + up, fc2) or, in an MoE
    layer, the router, the shared expert and its gate, and the top-k experts' products (spread over
    the E experts); then the output layer at the ``scored`` positions. Bias and norm weights are no
    matmul."""
    h, a, kv, d = m.hidden_size, m.num_attention_heads, m.kv_heads, m.kv_channels
    ctx = tokens if context is None else context
    out: list[Matmul] = []
    for sparse in moe_layers(m):
        out += [Matmul("qkv", tokens, h, (a + 2 * kv) * d, shard="n"),
                Matmul("attention scores", tokens * a, d, ctx, calls=a, shard="calls"),
                Matmul("attention context", tokens * a, ctx, d, calls=a, shard="calls"),
                Matmul("attention projection", tokens, a * d, h, shard="k")]
        moe = m.moe
        if not sparse or moe is None:
            out += [Matmul("fc1", tokens, h, 2 * m.ffn_hidden_size, shard="n"),
                    Matmul("fc2", tokens, m.ffn_hidden_size, h, shard="k")]
            continue
        out.append(Matmul("router", tokens, h, moe.num_experts))
        if moe.shared_expert_ffn_hidden_size:
            fs = moe.shared_expert_ffn_hidden_size
            out += [Matmul("shared fc1", tokens, h, 2 * fs, shard="n"), Matmul("shared fc2", tokens, fs, h, shard="k")]
            if moe.shared_expert_gate:
                out.append(Matmul("shared gate", tokens, h, 1))
        routed = tokens * moe.router_topk
        out += [Matmul("expert fc1", routed, h, 2 * moe.ffn_hidden_size, calls=moe.num_experts, shard="n"),
                Matmul("expert fc2", routed, moe.ffn_hidden_size, h, calls=moe.num_experts, shard="k")]
    out.append(Matmul("output layer", scored, h, m.padded_vocab_size, shard="n"))
    return out


def forward_flops(m: ModelConfig, tokens: int, scored: int, context: Optional[float] = None) -> float:
    """FLOPs of one forward over ``tokens`` positions of a sequence with the output layer at ``scored``
    positions (the response window), all ranks together (module docstring): the sum over
    :func:`forward_matmuls`. Each position attends to ``context`` keys (default ``tokens``: the full
    square; a decode step: the cache length)."""
    return sum(p.flops for p in forward_matmuls(m, tokens, scored, context))


def forward_elementwise(m: ModelConfig, tokens: int, scored: int, context: Optional[float] = None) -> float:
    """Element operations of one forward's non-matmul work (one per element of an op's operand), all ranks
    together, counted from the layer as the local (CPU) implementation runs it. Per position and layer:

    * the two RMSNorms, 4 passes over h each (square, mean, scale by the inverse RMS, weight), and
      the two residual adds (h each);
    * the split of the fused QKV output ((a + 2·kv)·d) and RoPE on q and k, 5 passes over
      (a + kv)·d (cos, rotate-half negation and concatenation, sin, add);
    * the attention probabilities: mask and softmax, 3 passes over the a·context scores;
    * SwiGLU: the split of fc1's output, silu and the product, 3 passes over f (an MoE layer: the
      shared expert's and the top-k experts' f, plus the dispatch and combine copies, h per expert);

    then the final norm (4·h) at every position and the log-softmax of the output layer (max,
    subtract, exp, sum: 4 passes over V) at the ``scored`` positions."""
    h, a, kv, d = m.hidden_size, m.num_attention_heads, m.kv_heads, m.kv_channels
    ctx = tokens if context is None else context
    per_token = 0.0
    for sparse in moe_layers(m):
        per_token += 8 * h + 2 * h + (a + 2 * kv) * d + 5 * (a + kv) * d + 3 * a * ctx
        moe = m.moe
        if not sparse or moe is None:
            per_token += 3 * m.ffn_hidden_size
            continue
        per_token += 3 * (moe.shared_expert_ffn_hidden_size or 0) + moe.router_topk * (3 * moe.ffn_hidden_size + 2 * h)
    return tokens * (per_token + 4 * h) + scored * 4.0 * m.padded_vocab_size
