"""Hugging Face <-> megatron-core naming: config translation, a declarative key map and the reshapes.

Pure functions over dicts and tensors (no megatron import, no I/O); :mod:`.hf_io` does the
streaming reads and writes on top of them.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (QKV bias),
``Qwen3ForCausalLM`` (per-head q/k RMSNorm). All are pre-norm RMSNorm + SwiGLU + RoPE decoders.

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
  with a leading layer axis: ``decoder.layers.<name>`` of shape ``[L, ...]``.

Config dialects: transformers 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``)
are both read; export keeps the dialect of the imported ``config.json``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch

from camopd_megatron.config import ModelConfig
from camopd_megatron.config.sections import MCORE_LLAMA3_ROPE

logger = logging.getLogger(__name__)

__all__ = [
    "HF_ARCHITECTURES",
    "TensorRule",
    "KEY_MAP",
    "active_rules",
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
}
"""HF ``architectures[0]`` -> our ``model.arch``."""

_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}

IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""Non-parameter buffers some older checkpoints carry; recomputed from the config, never converted."""

Reshape = Literal["copy", "qkv", "gate_up", "vocab"]


@dataclass(frozen=True)
class TensorRule:
    """One megatron tensor and the HF tensor(s) it is made of."""

    mcore: str
    """Megatron sharded-tensor key (``decoder.layers.*`` keys are stacked over layers)."""
    hf: tuple[str, ...]
    """HF names; ``{i}`` is the layer index."""
    reshape: Reshape
    """How the HF tensors become the megatron one (see the module docstring)."""
    needs: Optional[str] = None
    """Only present when this holds: ``qkv_bias``, ``qk_norm`` or ``untied``."""

    @property
    def per_layer(self) -> bool:
        """Stacked over layers (one chunk per layer)."""
        return self.mcore.startswith("decoder.layers.")


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
    TensorRule("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "gate_up"),
    TensorRule("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy"),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    TensorRule("output_layer.weight", ("lm_head.weight",), "vocab", needs="untied"),
)
"""The whole mapping, in HF file order (embedding, layer tensors, final norm, head)."""

EXTRA_STATE_KEYS: tuple[str, ...] = tuple(
    f"decoder.layers.{m}._extra_state"
    for m in ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
)
"""Per-layer ``_extra_state`` objects megatron's local-spec linears checkpoint (their value is None)."""


def head_dim(cfg: ModelConfig) -> int:
    """Per-head width (megatron's ``kv_channels``)."""
    return cfg.kv_channels


def active_rules(cfg: ModelConfig) -> list[TensorRule]:
    """The rules that apply to ``cfg`` (bias / q-k norm / untied head only when present)."""
    flags = {"qkv_bias": cfg.add_qkv_bias, "qk_norm": cfg.qk_layernorm, "untied": not cfg.tie_embeddings}
    return [r for r in KEY_MAP if r.needs is None or flags[r.needs]]


def mcore_shape(rule: TensorRule, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of ONE layer's megatron tensor (without the stacked layer axis)."""
    h, d, n, g, f = cfg.hidden_size, head_dim(cfg), cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_hidden_size
    name = rule.mcore
    if rule.reshape == "vocab":
        return (cfg.padded_vocab_size, h)
    if rule.reshape == "qkv":
        return ((n + 2 * g) * d, h) if name.endswith("weight") else ((n + 2 * g) * d,)
    if rule.reshape == "gate_up":
        return (2 * f, h)
    if "q_layernorm" in name or "k_layernorm" in name:
        return (d,)
    if name.endswith("linear_proj.weight"):
        return (h, n * d)
    if name.endswith("linear_fc2.weight"):
        return (h, f)
    return (h,)  # norms


def hf_shapes(rule: TensorRule, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` (one layer)."""
    d, n, g, f, h = head_dim(cfg), cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_hidden_size, cfg.hidden_size
    if rule.reshape == "vocab":
        return [(cfg.vocab_size, h)]
    if rule.reshape == "qkv":
        tail = (h,) if rule.mcore.endswith("weight") else ()
        return [(n * d, *tail), (g * d, *tail), (g * d, *tail)]
    if rule.reshape == "gate_up":
        return [(f, h), (f, h)]
    return [mcore_shape(rule, cfg)]


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
        add_qkv_bias=arch == "qwen2",
        qk_layernorm=arch == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=head_dim_field,
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
    if base is not None:
        out = dict(base)
        out.update(values)
    else:
        out = dict(
            architectures=[_ARCH_TO_HF[cfg.arch]], model_type=cfg.arch, hidden_act="silu",
            max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base,
            rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None, head_dim=head_dim(cfg),
            attention_dropout=0.0, **values,
        )
        if cfg.arch != "qwen2":
            out["attention_bias"] = False
    if dtype is not None:
        out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a TP/PP layout the model cannot be split into (our checkpoint itself is layout-free)."""
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}={value!r}: must be a positive integer")
    problems = cfg.layout_problems(tp, pp, tp_key="--tp", pp_key="--pp")
    if problems:
        raise ValueError(
            "the model cannot run at this layout: " + "; ".join(problems)
            + " (the converted checkpoint itself loads at any valid layout)"
        )
