"""Hugging Face <-> megatron-core naming: config translation, a declarative key map and the reshapes.

Pure functions over dicts and tensors (no megatron import, no I/O); :mod:`.hf_io` does the
streaming reads and writes on top of them.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (QKV bias),
``Qwen3ForCausalLM`` (per-head q/k RMSNorm), and the mixture-of-experts ``Qwen3MoeForCausalLM``,
``Qwen2MoeForCausalLM`` (shared expert with a sigmoid gate) and ``MixtralForCausalLM`` (:mod:`.hf_moe`:
their config fields and tensor names). All are pre-norm RMSNorm + SwiGLU + RoPE decoders.

Layouts (legend: L layers, H hidden, d head dim, n query heads, g kv heads, F ffn, V vocab,
Vp padded vocab):

* **QKV** — HF keeps ``q_proj [n*d, H]``, ``k_proj [g*d, H]``, ``v_proj [g*d, H]``; megatron fuses them
  into ``linear_qkv [(n + 2g)*d, H]`` grouped per kv head: for each group ``[q heads of the group
  (n/g*d rows), k (d rows), v (d rows)]`` (so a TP shard is a contiguous row block). Biases alike.
* **SwiGLU** — ``linear_fc1 [2F, H] = cat(gate_proj, up_proj)`` (megatron's checkpoint keeps the
  full gate block first whatever the TP size: its swiglu sharded factory writes them as two halves).
* **RoPE** — both HF (``rotate_half``) and megatron (``rotary_interleaved=False``) rotate the two
  halves of each head, so q/k need no permutation (unlike Meta's original checkpoints).
* **Vocab** — megatron's embedding and output layer have ``Vp`` rows (``model.padded_vocab_size``):
  zero rows are appended on import and cut on export.
* **Layers** — megatron's checkpoint stacks the per-layer tensors of one name into one global tensor
  with a leading layer axis: ``decoder.layers.<name>`` of shape ``[L, ...]``; a model whose layers differ
  (an MoE ``layer_pattern`` with dense layers) has per-layer keys ``decoder.layers.<i>.<name>`` instead
  (:func:`placement`).
* **Experts** — each routed expert is a SwiGLU MLP (``experts.{j}.gate_proj/up_proj/down_proj``; Mixtral
  ``block_sparse_moe.experts.{j}.w1/w3/w2``) -> ``mlp.experts.experts.linear_fc1/linear_fc2`` with an expert
  axis after the layer axis (``[L, E, 2I, H]``), which expert parallelism splits; the router
  (``mlp.gate`` / ``block_sparse_moe.gate``, ``[E, H]``) -> ``mlp.router.weight``; Qwen2-MoE's shared expert
  -> ``mlp.shared_experts.linear_fc1/linear_fc2`` and its gate ``[1, H]`` -> ``shared_experts.gate_weight``.
  transformers 5.x's fused in-memory layout is read too (:func:`fused_expert_sources`); the export writes the
  published per-expert one.

Config dialects: transformers 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``)
are both read; export keeps the dialect of the imported ``config.json``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Sequence

import torch

from camopd_megatron.checkpoint.hf_moe import (
    MOE_HF_ARCHITECTURES, MOE_HF_NAMES, MoeFamily, moe_family, moe_from_hf, moe_hf_architecture, moe_hf_fields,
)
from camopd_megatron.config import ModelConfig
from camopd_megatron.config.moe import expert_layout_problems
from camopd_megatron.config.sections import MCORE_LLAMA3_ROPE

logger = logging.getLogger(__name__)

__all__ = [
    "HF_ARCHITECTURES",
    "TensorRule",
    "KEY_MAP",
    "active_rules",
    "rule_applies",
    "is_moe_layer",
    "stacked_layers",
    "Placement",
    "placement",
    "extra_state_objects",
    "iter_tensors",
    "hf_names",
    "fused_expert_sources",
    "head_dim",
    "mcore_shape",
    "hf_shapes",
    "to_mcore",
    "to_hf",
    "model_config_from_hf",
    "hf_config_from_model",
    "check_layout",
    "IGNORED_HF_SUFFIXES",
]

HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    **{name: arch for name, (arch, _) in MOE_HF_ARCHITECTURES.items()},
}
"""HF ``architectures[0]`` -> our ``model.arch`` (an MoE model: the attention it shares with a dense one, plus
``model.moe``)."""

_ARCH_TO_HF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
"""A dense ``model.arch`` -> its HF architecture (MoE: :func:`.hf_moe.moe_hf_architecture`)."""

IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""Non-parameter buffers some older checkpoints carry; recomputed from the config, never converted."""

Reshape = Literal["copy", "qkv", "gate_up", "vocab"]
Needs = Literal["qkv_bias", "qk_norm", "untied", "dense_mlp", "moe", "shared_expert", "shared_gate"]
Ffn = Literal["dense", "expert", "shared"]


@dataclass(frozen=True)
class TensorRule:
    """One megatron tensor and the HF tensor(s) it is made of."""

    mcore: str
    """Megatron sharded-tensor key in its stacked form (``decoder.layers.<name>``; see :func:`placement`)."""
    hf: tuple[str, ...]
    """HF names; ``{i}`` is the layer index, ``{j}`` the expert index."""
    reshape: Reshape
    """How the HF tensors become the megatron one (see the module docstring)."""
    needs: Optional[Needs] = None
    """Only present when this holds: ``qkv_bias``, ``qk_norm``, ``untied`` (whole model); ``dense_mlp`` /
    ``moe`` (the layer is dense / an MoE layer), ``shared_expert`` / ``shared_gate`` (MoE layers with them)."""
    ffn: Optional[Ffn] = None
    """Whose SwiGLU width a ``gate_up`` / ``linear_fc2`` tensor has: the dense MLP's, one expert's, the shared expert's."""

    @property
    def per_layer(self) -> bool:
        """Stacked over layers (one chunk per layer)."""
        return self.mcore.startswith("decoder.layers.")

    @property
    def per_expert(self) -> bool:
        """One tensor per routed expert (the HF names carry ``{j}``)."""
        return "{j}" in self.hf[0]


_L = "model.layers.{i}."
KEY_MAP: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorRule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), "copy"),
    TensorRule(
        "decoder.layers.self_attention.linear_qkv.weight",
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv",
    ),
    TensorRule(
        "decoder.layers.self_attention.linear_qkv.bias",
        tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", needs="qkv_bias",
    ),
    TensorRule("decoder.layers.self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "copy", needs="qk_norm"),
    TensorRule("decoder.layers.self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "copy", needs="qk_norm"),
    TensorRule("decoder.layers.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "copy"),
    TensorRule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), "copy"),
    TensorRule("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "gate_up",
               needs="dense_mlp", ffn="dense"),
    TensorRule("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy", needs="dense_mlp", ffn="dense"),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    TensorRule("output_layer.weight", ("lm_head.weight",), "vocab", needs="untied"),
)
"""The dense mapping, in HF file order (embedding, layer tensors, final norm, head)."""


def _moe_rules(family: MoeFamily) -> tuple[TensorRule, ...]:
    """The MoE layer's tensors (published per-expert HF names): router, experts, shared expert and its gate."""
    n = MOE_HF_NAMES[family]
    e = _L + n["expert"]
    rules = [
        TensorRule("decoder.layers.mlp.router.weight", (_L + n["router"],), "copy", needs="moe"),
        TensorRule("decoder.layers.mlp.experts.experts.linear_fc1.weight", (e + n["gate"], e + n["up"]), "gate_up",
                   needs="moe", ffn="expert"),
        TensorRule("decoder.layers.mlp.experts.experts.linear_fc2.weight", (e + n["down"],), "copy", needs="moe", ffn="expert"),
    ]
    if family == "qwen":
        s = _L + "mlp.shared_expert."
        rules += [
            TensorRule("decoder.layers.mlp.shared_experts.linear_fc1.weight", (s + "gate_proj.weight", s + "up_proj.weight"),
                       "gate_up", needs="shared_expert", ffn="shared"),
            TensorRule("decoder.layers.mlp.shared_experts.linear_fc2.weight", (s + "down_proj.weight",), "copy",
                       needs="shared_expert", ffn="shared"),
            TensorRule("decoder.layers.mlp.shared_experts.gate_weight", (_L + "mlp.shared_expert_gate.weight",), "copy",
                       needs="shared_gate"),
        ]
    return tuple(rules)


_LAYER_OBJECTS: dict[Optional[str], tuple[str, ...]] = {
    None: ("self_attention.linear_proj", "self_attention.linear_qkv"),
    "dense_mlp": ("mlp.linear_fc1", "mlp.linear_fc2"),
    "moe": ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2"),
    "shared_expert": ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"),
}
"""Per layer, the local-spec linears whose ``_extra_state`` megatron checkpoints as a ShardedObject (its value
is None), by the condition they exist under; the routed experts' ones are one object per expert."""


def head_dim(cfg: ModelConfig) -> int:
    """Per-head width (megatron's ``kv_channels``)."""
    return cfg.kv_channels


def _whole_model_flags(cfg: ModelConfig) -> dict[str, bool]:
    moe = cfg.moe
    return {"qkv_bias": bool(cfg.add_qkv_bias), "qk_norm": bool(cfg.qk_layernorm), "untied": not cfg.tie_embeddings,
            "shared_expert": moe is not None and moe.shared_expert_ffn_hidden_size is not None,
            "shared_gate": moe is not None and moe.shared_expert_gate}


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Layer ``layer`` is an MoE layer (``model.moe.layer_pattern``; every layer when None)."""
    moe = cfg.moe
    return moe is not None and (moe.layer_pattern is None or bool(moe.layer_pattern[layer]))


def rule_applies(rule: TensorRule, cfg: ModelConfig, layer: Optional[int]) -> bool:
    """``rule`` has a tensor in layer ``layer`` (None: a whole-model tensor) of ``cfg``."""
    if rule.needs is None:
        return True
    if rule.needs in ("dense_mlp", "moe"):
        return layer is not None and is_moe_layer(cfg, layer) == (rule.needs == "moe")
    flag = _whole_model_flags(cfg)[rule.needs]
    return flag and (rule.needs not in ("shared_expert", "shared_gate") or (layer is not None and is_moe_layer(cfg, layer)))


def active_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The rules with a tensor somewhere in ``cfg`` (bias / q-k norm / untied head / MoE parts only when present)."""
    rules = list(KEY_MAP)
    if cfg.moe is not None:
        at = rules.index(next(r for r in rules if r.mcore == "decoder.layers.mlp.linear_fc2.weight")) + 1
        rules[at:at] = _moe_rules(moe_family(cfg))
    layers = range(cfg.num_layers)
    return [r for r in rules if any(rule_applies(r, cfg, i) for i in (layers if r.per_layer else [None]))]


def stacked_layers(cfg: ModelConfig) -> bool:
    """megatron's checkpoint stacks the layers' tensors into one ``[L, ...]`` tensor per name only when all layers
    are alike: with an MoE ``layer_pattern`` (megatron ``moe_layer_freq`` as a list, ``models.gpt.moe_kwargs``) its
    ``TransformerBlock.sharded_state_dict`` writes per-layer keys ``decoder.layers.<i>.<name>`` instead."""
    return cfg.moe is None or cfg.moe.layer_pattern is None


@dataclass(frozen=True)
class Placement:
    """Where one layer's (one expert's, or all experts') piece of a tensor sits in the checkpoint."""

    key: str
    """Sharded key (fqn)."""
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def placement(rule: TensorRule, cfg: ModelConfig, layer: Optional[int], expert: Optional[int] = None) -> Placement:
    """The checkpoint key, global shape and chunk of ``rule``'s tensor in ``layer`` (for expert ``expert``; None:
    all experts of the layer), as ``GPTModel.sharded_state_dict()`` lays it out: a leading layer axis when
    :func:`stacked_layers` (else the layer in the key), then an expert axis for the routed experts."""
    shape = mcore_shape(rule, cfg)
    key = rule.mcore
    lead: list[tuple[int, int, int]] = []  # (global size, offset, chunk size) of the leading axes
    if rule.per_layer:
        assert layer is not None
        if stacked_layers(cfg):
            lead.append((cfg.num_layers, layer, 1))
        else:
            key = key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)
    if rule.per_expert:
        n = cfg.moe.num_experts
        lead.append((n, 0, n) if expert is None else (n, expert, 1))
    return Placement(key, (*(g for g, _, _ in lead), *shape), (*(o for _, o, _ in lead), *(0,) * len(shape)),
                     (*(c for _, _, c in lead), *shape))


def extra_state_objects(cfg: ModelConfig, layer: int) -> list[str]:
    """Unique keys of the per-layer ``_extra_state`` ShardedObjects of ``layer`` (megatron's
    ``ShardedObject.unique_key``: ``<key>/shard_<offsets>_<shape>``, dot-joined)."""
    kinds: list[Optional[str]] = [None, "moe" if is_moe_layer(cfg, layer) else "dense_mlp"]
    if is_moe_layer(cfg, layer) and _whole_model_flags(cfg)["shared_expert"]:
        kinds.append("shared_expert")
    stacked = stacked_layers(cfg)
    out = []
    for kind in kinds:
        for module in _LAYER_OBJECTS[kind]:
            key = (f"decoder.layers.{module}._extra_state" if stacked
                   else f"decoder.layers.{layer}.{module}._extra_state")
            offs, shape = ([layer], [cfg.num_layers]) if stacked else ([0], [1])
            if kind == "moe":
                n = cfg.moe.num_experts
                offs, shape = (offs if stacked else []), (shape if stacked else [])
                for j in range(n):
                    out.append(f"{key}/shard_{'.'.join(map(str, offs + [j]))}_{'.'.join(map(str, shape + [n]))}")
            else:
                out.append(f"{key}/shard_{'.'.join(map(str, offs))}_{'.'.join(map(str, shape))}")
    return out


def iter_tensors(cfg: ModelConfig) -> Iterator[tuple[TensorRule, Optional[int], Optional[int]]]:
    """Every (rule, layer, expert) of the model in HF file order: the embedding, each layer's tensors (experts
    one by one), the final norm and the head. Layer / expert are None where the tensor has none."""
    rules = active_rules(cfg)
    for rule in rules:
        if not rule.per_layer and "embedding" in rule.mcore:
            yield rule, None, None
    for i in range(cfg.num_layers):
        for rule in rules:
            if rule.per_layer and rule_applies(rule, cfg, i):
                for j in (range(cfg.moe.num_experts) if rule.per_expert else [None]):
                    yield rule, i, j
    for rule in rules:
        if not rule.per_layer and "embedding" not in rule.mcore:
            yield rule, None, None


def hf_names(rule: TensorRule, layer: Optional[int], expert: Optional[int]) -> list[str]:
    """The HF tensor names of ``rule`` in ``layer`` / for ``expert``."""
    return [n.format(i=layer, j=expert) for n in rule.hf]


def _ffn(rule: TensorRule, cfg: ModelConfig) -> int:
    if rule.ffn == "expert":
        return cfg.moe.ffn_hidden_size
    if rule.ffn == "shared":
        return cfg.moe.shared_expert_ffn_hidden_size
    return cfg.ffn_hidden_size


def mcore_shape(rule: TensorRule, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of ONE layer's (one expert's) megatron tensor (without the stacked layer / expert axes)."""
    h, d, n, g = cfg.hidden_size, head_dim(cfg), cfg.num_attention_heads, cfg.kv_heads
    name = rule.mcore
    if rule.reshape == "vocab":
        return (cfg.padded_vocab_size, h)
    if rule.reshape == "qkv":
        return ((n + 2 * g) * d, h) if name.endswith("weight") else ((n + 2 * g) * d,)
    if rule.reshape == "gate_up":
        return (2 * _ffn(rule, cfg), h)
    if "q_layernorm" in name or "k_layernorm" in name:
        return (d,)
    if name.endswith("linear_proj.weight"):
        return (h, n * d)
    if name.endswith("linear_fc2.weight"):
        return (h, _ffn(rule, cfg))
    if name.endswith("router.weight"):
        return (cfg.moe.num_experts, h)
    if name.endswith("gate_weight"):
        return (1, h)
    return (h,)  # norms


def hf_shapes(rule: TensorRule, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` (one layer, one expert)."""
    d, n, g, h = head_dim(cfg), cfg.num_attention_heads, cfg.kv_heads, cfg.hidden_size
    if rule.reshape == "vocab":
        return [(cfg.vocab_size, h)]
    if rule.reshape == "qkv":
        tail = (h,) if rule.mcore.endswith("weight") else ()
        return [(n * d, *tail), (g * d, *tail), (g * d, *tail)]
    if rule.reshape == "gate_up":
        f = _ffn(rule, cfg)
        return [(f, h), (f, h)]
    return [mcore_shape(rule, cfg)]


FusedSource = tuple[str, Optional[int], Optional[tuple[int, int]]]
"""(fused HF name, expert index or None for the whole tensor, row range or None)."""


def fused_expert_sources(cfg: ModelConfig, names: set[str]) -> dict[str, FusedSource]:
    """The transformers 5.x in-memory expert layout, read as the published one.

    transformers >= 5 holds an MoE layer's routed experts fused, ``model.layers.{i}.mlp.experts.gate_up_proj``
    ``[E, 2I, H]`` (gate rows first, then up) and ``...experts.down_proj`` ``[E, H, I]``, with the router at
    ``mlp.gate.weight`` for every family (Mixtral included), while published checkpoints (and its own
    ``save_pretrained``) store one tensor per expert. For each fused tensor present in ``names`` this gives the
    published names it stands for (published name -> :data:`FusedSource`)."""
    if cfg.moe is None:
        return {}
    family, n_exp, f = moe_family(cfg), cfg.moe.num_experts, cfg.moe.ffn_hidden_size
    pub = MOE_HF_NAMES[family]
    out: dict[str, FusedSource] = {}
    for i in range(cfg.num_layers):
        base = _L.format(i=i)
        exp = base + pub["expert"]
        gate_up, down, router = base + "mlp.experts.gate_up_proj", base + "mlp.experts.down_proj", base + "mlp.gate.weight"
        for j in range(n_exp):
            e = exp.format(j=j)
            if gate_up in names:
                out[e + pub["gate"]] = (gate_up, j, (0, f))
                out[e + pub["up"]] = (gate_up, j, (f, 2 * f))
            if down in names:
                out[e + pub["down"]] = (down, j, None)
        if router in names and base + pub["router"] != router:
            out[base + pub["router"]] = (router, None, None)
    return out


# ------------------------------------------------------------------------------------------------
# reshapes
# ------------------------------------------------------------------------------------------------
def to_mcore(rule: TensorRule, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """HF tensor(s) of one layer -> the megatron tensor of ``rule``."""
    if rule.reshape == "copy":
        return tensors[0]
    if rule.reshape == "vocab":
        (w_VH,) = tensors
        pad = cfg.padded_vocab_size - w_VH.shape[0]
        return torch.cat([w_VH, w_VH.new_zeros(pad, w_VH.shape[1])]) if pad else w_VH
    if rule.reshape == "gate_up":
        return torch.cat(list(tensors), dim=0)
    q, k, v = tensors
    g, d = cfg.kv_heads, head_dim(cfg)
    per = cfg.num_attention_heads // g
    tail = q.shape[1:]
    qkv = torch.cat([q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
    return qkv.reshape(-1, *tail)


def to_hf(rule: TensorRule, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The megatron tensor of ``rule`` (one layer) -> its HF tensor(s), contiguous, in ``rule.hf`` order."""
    if rule.reshape == "copy":
        return [tensor.contiguous()]
    if rule.reshape == "vocab":
        return [tensor[: cfg.vocab_size].contiguous()]
    if rule.reshape == "gate_up":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    g, d = cfg.kv_heads, head_dim(cfg)
    per = cfg.num_attention_heads // g
    tail = tensor.shape[1:]
    q, k, v = torch.split(tensor.reshape(g, (per + 2) * d, *tail), [per * d, d, d], dim=1)
    return [q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()]


# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ------------------------------------------------------------------------------------------------
def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, scaling) from either dialect; scaling None for plain RoPE."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:  # transformers 5.x
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # transformers 4.x
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"config.json: rope scaling rope_type={rope_type!r} is not supported (only 'default' and 'llama3', "
            "which megatron-core's GPTModel implements); convert a model without that rope scaling"
        )
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = "llama3"
    fixed = [f"{k}={scaling[k]!r}" for k, v in MCORE_LLAMA3_ROPE.items() if k in scaling and float(scaling[k]) != v]
    if fixed:
        raise ValueError(
            f"config.json: llama3 rope scaling with {', '.join(fixed)} is not supported: megatron-core's GPTModel "
            "implements it with " + ", ".join(f"{k}={v:g}" for k, v in MCORE_LLAMA3_ROPE.items())
            + " only (every Llama 3.x release uses those; only 'factor' may differ); convert a model with them"
        )
    return float(theta), scaling


def model_config_from_hf(hf: dict[str, Any], *, vocab_pad_multiple: int = 128) -> ModelConfig:
    """Translate a HF ``config.json`` dict into our :class:`ModelConfig` (ValueError naming the key)."""
    archs = hf.get("architectures") or []
    arch_name = archs[0] if archs else None
    if arch_name not in HF_ARCHITECTURES:
        raise ValueError(
            f"config.json: architectures={archs!r} is not supported; supported: {sorted(HF_ARCHITECTURES)}"
        )
    arch = HF_ARCHITECTURES[arch_name]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported; only 'silu' (SwiGLU) models convert")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    hd = hf.get("head_dim")
    # Qwen3 (and others) may set a per-head width other than hidden/heads: megatron's kv_channels
    head_dim_field = int(hd) if hd is not None and heads and int(hd) * heads != hidden else None
    if arch in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        raise ValueError(f"config.json: attention_bias=true ({arch_name}) adds an o_proj bias we do not model; not supported")
    if hf.get("mlp_bias"):
        raise ValueError(f"config.json: mlp_bias=true ({arch_name}) is not supported (bias-free SwiGLU only)")
    theta, scaling = _rope_from_hf(hf)
    seq = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    window_on = hf.get("use_sliding_window", arch == "mistral")
    if window and window_on and int(window) < seq:
        logger.warning(
            "config.json: sliding_window=%s < max_position_embeddings=%d; our model attends over the full causal "
            "context, which equals sliding-window attention only up to %s tokens: model.seq_length set to %s",
            window, seq, window, window,
        )
        seq = int(window)
    cfg = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        vocab_pad_multiple=vocab_pad_multiple,
        seq_length=seq,
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        # Qwen2-MoE spells its QKV bias out (qkv_bias, default true); Qwen2 always has it
        add_qkv_bias=arch == "qwen2" and bool(hf.get("qkv_bias", True)),
        qk_layernorm=arch == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=head_dim_field,
        moe=moe_from_hf(hf, arch_name, int(hf["num_hidden_layers"])),
    )
    problems = cfg.validate("model")
    if problems:
        raise ValueError("config.json does not give a valid model: " + "; ".join(problems))
    return cfg


_STRUCTURAL = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "tie_word_embeddings")


def hf_config_from_model(cfg: ModelConfig, *, base: Optional[dict[str, Any]] = None,
                         dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """A HF ``config.json`` dict for ``cfg``.

    With ``base`` (the imported model's config.json) everything else — rope dialect and scaling,
    token ids, sliding window — is kept and only the structural fields are (re)written; without it a
    transformers 4.x-dialect config (readable by 4.x and 5.x) is generated from ``cfg``.
    """
    values = dict(
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if cfg.head_dim is not None:
        values["head_dim"] = cfg.head_dim
    if cfg.moe is not None:
        values.update(moe_hf_fields(cfg, base))
    if base is not None:
        out = dict(base)
        out.update(values)
    else:
        name = moe_hf_architecture(cfg) if cfg.moe is not None else _ARCH_TO_HF[cfg.arch]
        out = dict(
            architectures=[name], model_type=MOE_HF_ARCHITECTURES[name][1] if cfg.moe is not None else cfg.arch,
            hidden_act="silu",
            max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
            rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None, head_dim=head_dim(cfg),
            attention_dropout=0.0, **values,
        )
        if cfg.arch != "qwen2":
            out["attention_bias"] = False
    if dtype is not None:
        out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def check_layout(cfg: ModelConfig, tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> None:
    """Refuse a TP/PP (and EP / expert-TP) layout the model cannot be split into (our checkpoint itself is
    layout-free)."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", 1 if etp is None else etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}={value!r}: must be a positive integer")
    problems = cfg.layout_problems(tp, pp, tp_key="--tp", pp_key="--pp")
    problems += expert_layout_problems(cfg.moe, tp=tp, dp=None, ep=ep, etp=etp, moe_key="model.moe",
                                       keys={"tp": "--tp", "dp": "dp", "ep": "--ep", "etp": "--etp", "sp": "sp"})
    if problems:
        raise ValueError(
            "the model cannot run at this layout: " + "; ".join(problems)
            + " (the converted checkpoint itself loads at any valid layout)"
        )
