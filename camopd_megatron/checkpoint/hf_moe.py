"""Hugging Face mixture-of-experts models <-> ``model.moe``: the supported families, their HF tensor names and
the ``config.json`` fields (pure dicts, no megatron, no I/O; :mod:`.hf` holds the tensor rules built on them).

Supported: ``Qwen3MoeForCausalLM`` (Qwen3 attention: per-head q/k norm), ``Qwen2MoeForCausalLM`` (Qwen2
attention: QKV bias; a shared expert with a sigmoid gate) and ``MixtralForCausalLM`` (Mistral attention).

config.json -> ``model.moe``:

==================================  ===========================================================
HF                                  ``model.moe``
==================================  ===========================================================
``num_experts`` / ``num_local_experts``   ``num_experts``
``num_experts_per_tok``             ``router_topk``
``moe_intermediate_size`` (Mixtral: ``intermediate_size``)   ``ffn_hidden_size``
``shared_expert_intermediate_size`` (Qwen2-MoE)   ``shared_expert_ffn_hidden_size``, ``shared_expert_gate: true``
``mlp_only_layers``, ``decoder_sparse_step``   ``layer_pattern`` (layer i is MoE unless it is in
                                    ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``)
``norm_topk_prob``                  ``router_pre_softmax`` = not ``norm_topk_prob`` (Mixtral: false)
``router_aux_loss_coef``            ``aux_loss_coeff``
==================================  ===========================================================

Routing. HF takes the softmax over all experts, then the top k; ``norm_topk_prob`` (always on for Mixtral)
renormalises those k, which equals megatron's top-k of the logits followed by a softmax over the k
(``router_pre_softmax: false``); without it the k probabilities stay as they are, megatron's
``moe_router_pre_softmax``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from camopd_megatron.config import ModelConfig
from camopd_megatron.config.moe import MoEConfig

__all__ = ["MoeFamily", "MOE_HF_ARCHITECTURES", "MOE_HF_NAMES", "MOE_STRUCTURE", "moe_structure", "moe_family",
           "moe_from_hf", "moe_hf_architecture", "moe_hf_fields"]

MoeFamily = Literal["qwen", "mixtral"]

MOE_HF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen3MoeForCausalLM": ("qwen3", "qwen3_moe"),
    "Qwen2MoeForCausalLM": ("qwen2", "qwen2_moe"),
    "MixtralForCausalLM": ("mistral", "mixtral"),
}
"""HF ``architectures[0]`` -> (our ``model.arch``: the attention it shares with a dense model, HF ``model_type``)."""

MOE_HF_NAMES: dict[MoeFamily, dict[str, str]] = {
    "qwen": dict(router="mlp.gate.weight", expert="mlp.experts.{j}.", gate="gate_proj.weight", up="up_proj.weight",
                 down="down_proj.weight"),
    "mixtral": dict(router="block_sparse_moe.gate.weight", expert="block_sparse_moe.experts.{j}.", gate="w1.weight",
                    up="w3.weight", down="w2.weight"),
}
"""Published (per-expert) names inside ``model.layers.{i}.``: router, expert prefix, SwiGLU gate / up / down."""


MOE_STRUCTURE = ("num_experts", "router_topk", "ffn_hidden_size", "shared_expert_ffn_hidden_size", "shared_expert_gate",
                 "layer_pattern", "router_pre_softmax")
"""The ``model.moe`` fields a HF config.json describes (the weights' structure and routing); the others
(dispatcher, capacity, loss coefficients, routing replay) are training settings a run may change."""


def moe_structure(moe: Any) -> Optional[dict[str, Any]]:
    """The :data:`MOE_STRUCTURE` fields of a ``model.moe`` (a :class:`MoEConfig` or a manifest's dict; None: dense)."""
    if moe is None:
        return None
    get = moe.get if isinstance(moe, dict) else lambda k: getattr(moe, k)
    return {k: get(k) for k in MOE_STRUCTURE}


def moe_family(cfg: ModelConfig) -> MoeFamily:
    """The HF naming of an MoE ``cfg``: Qwen-MoE for qwen2/qwen3 attention, Mixtral for mistral/llama."""
    return "qwen" if cfg.arch in ("qwen2", "qwen3") else "mixtral"


def _int(hf: dict[str, Any], *keys: str) -> int:
    for key in keys:
        if hf.get(key) is not None:
            return int(hf[key])
    raise ValueError(f"config.json: {' / '.join(keys)} is missing; a mixture-of-experts config.json needs it")


def moe_from_hf(hf: dict[str, Any], arch_name: str, num_layers: int) -> Optional[MoEConfig]:
    """``model.moe`` from a HF ``config.json`` (None for a dense architecture); ValueError naming the key."""
    if arch_name not in MOE_HF_ARCHITECTURES:
        return None
    topk = _int(hf, "num_experts_per_tok")
    aux = float(hf.get("router_aux_loss_coef", 0.001))
    if arch_name == "MixtralForCausalLM":
        return MoEConfig(num_experts=_int(hf, "num_local_experts", "num_experts"), router_topk=topk,
                         ffn_hidden_size=_int(hf, "intermediate_size"), aux_loss_coeff=aux)
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(num_layers)]
    shared = _int(hf, "shared_expert_intermediate_size") if arch_name == "Qwen2MoeForCausalLM" else None
    return MoEConfig(
        num_experts=_int(hf, "num_experts", "num_local_experts"), router_topk=topk,
        ffn_hidden_size=_int(hf, "moe_intermediate_size"),
        shared_expert_ffn_hidden_size=shared, shared_expert_gate=shared is not None,
        layer_pattern=None if all(pattern) else pattern,
        router_pre_softmax=not bool(hf.get("norm_topk_prob", False)), aux_loss_coeff=aux,
    )


def moe_hf_architecture(cfg: ModelConfig) -> str:
    """The HF architecture an MoE ``cfg`` exports as (ValueError when no supported one has its features)."""
    moe = cfg.moe
    assert moe is not None
    shared = moe.shared_expert_ffn_hidden_size is not None
    if moe_family(cfg) == "mixtral":
        name, bad = "MixtralForCausalLM", [
            ("a shared expert (moe.shared_expert_ffn_hidden_size)", shared),
            ("dense layers (moe.layer_pattern)", moe.has_dense_layers),
            ("moe.router_pre_softmax=true (Mixtral renormalises the top-k)", moe.router_pre_softmax),
            (f"moe.ffn_hidden_size={moe.ffn_hidden_size} != ffn_hidden_size={cfg.ffn_hidden_size} (Mixtral has one "
             "intermediate_size)", moe.ffn_hidden_size != cfg.ffn_hidden_size),
        ]
    elif cfg.arch == "qwen3":
        name, bad = "Qwen3MoeForCausalLM", [("a shared expert (moe.shared_expert_ffn_hidden_size)", shared)]
    else:
        name, bad = "Qwen2MoeForCausalLM", [
            ("no shared expert (Qwen2-MoE always has one)", not shared),
            ("a shared expert without moe.shared_expert_gate (Qwen2-MoE gates it)", shared and not moe.shared_expert_gate),
        ]
    problems = [what for what, hit in bad if hit]
    if problems:
        raise ValueError(f"model.arch={cfg.arch!r} with model.moe exports as {name}, which cannot hold "
                         + "; ".join(problems) + ": export a model that has the features of a supported MoE architecture")
    return name


def moe_hf_fields(cfg: ModelConfig, base: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The config.json fields of ``cfg.moe`` (the structural ones; with ``base``, its own spelling of the expert
    count and of the sparse layers is kept when they still describe the model)."""
    moe = cfg.moe
    assert moe is not None
    name = moe_hf_architecture(cfg)
    out: dict[str, Any] = {"num_experts_per_tok": moe.router_topk, "router_aux_loss_coef": moe.aux_loss_coeff}
    count_key = "num_local_experts" if name == "MixtralForCausalLM" else "num_experts"
    if base is not None and count_key not in base and {"num_experts", "num_local_experts"} & set(base):
        count_key = "num_local_experts" if "num_local_experts" in base else "num_experts"
    out[count_key] = moe.num_experts
    if name == "MixtralForCausalLM":
        return out
    if name == "Qwen2MoeForCausalLM":
        out["qkv_bias"] = bool(cfg.add_qkv_bias)
    out["moe_intermediate_size"] = moe.ffn_hidden_size
    out["norm_topk_prob"] = not moe.router_pre_softmax
    if moe.shared_expert_ffn_hidden_size is not None:
        out["shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
    kept = base is not None and moe_from_hf(dict(base, num_hidden_layers=cfg.num_layers), name,
                                             cfg.num_layers).layer_pattern == moe.layer_pattern
    if not kept:
        pattern = moe.layer_pattern or [1] * cfg.num_layers
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [i for i, v in enumerate(pattern) if not v]
    return out
