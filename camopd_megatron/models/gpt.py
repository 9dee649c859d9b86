"""Build a megatron-core ``GPTModel`` for Llama / Qwen2 / Qwen3 / Mistral-style configs.

The only module that constructs megatron models (GPTModel is deprecated upstream in favour of
HybridModel, but it is what 0.19.2 supports for this; a later switch stays local to this file).

All architectures here are pre-norm decoders with RMSNorm, SwiGLU, RoPE and no linear biases:
``qwen2`` adds the QKV bias, ``qwen3`` the per-head q/k RMSNorm; GQA, tied embeddings and the RoPE
base come from :class:`~camopd_megatron.config.ModelConfig`. With ``model.moe`` the layers it marks
use megatron-core's ``MoELayer`` (top-k router, the configured token dispatcher, experts as a
``SequentialMLP`` of SwiGLU MLPs, optionally a gated shared expert): :func:`moe_kwargs`.

Layout independence. The embedding/output vocabulary is ``model.padded_vocab_size`` (the tokenizer
vocabulary padded to ``model.vocab_pad_multiple``), never a TP-dependent size, and every TP size of
the run must divide it. On CPU the weights are created with ``use_cpu_initialization=True``: the
full master weight is drawn from the (seeded) CPU generator and then split, so the initial weights
are the same at TP = 1, 2, 4 (pipeline stages draw in another order: compare PP through a
checkpoint).

Process groups are explicit: the role's ``ProcessGroupCollection`` goes to ``GPTModel``; megatron's
global parallel state is never initialised. Two process-local megatron singletons remain and are set
by :func:`init_model_rng` (they hold no process group): the attention global memory buffer and the
RNG tracker (seeded with the role's explicit TP rank).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from camopd_megatron.config import ConfigError, ModelConfig
from camopd_megatron.config.sections import MCORE_LLAMA3_ROPE
from camopd_megatron.deps import resolve_transformer_impl
from camopd_megatron.ops.embedding import embedding_lookup

logger = logging.getLogger(__name__)

__all__ = [
    "StageInfo",
    "stage_info",
    "transformer_config_from",
    "recompute_kwargs",
    "moe_kwargs",
    "build_gpt_model",
    "init_model_rng",
    "unwrap_model",
    "LocalNorm",
    "sequence_parallel_off",
    "run_forward_pre_hooks",
    "finish_param_gather",
]

_CPU_FUSIONS_OFF = dict(
    gradient_accumulation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)
"""Fused kernels are CUDA-only; on CPU every fusion is off (docs/architecture.md, the CPU compatibility layer)."""


@dataclass(frozen=True)
class StageInfo:
    """Where this rank sits in its role's pipeline."""

    pp_rank: int
    pp_size: int

    @property
    def is_first(self) -> bool:
        """First stage: owns the input embedding."""
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        """Last stage: owns the output layer (logits, losses)."""
        return self.pp_rank == self.pp_size - 1


def stage_info(pg_collection: Any) -> StageInfo:
    """Pipeline position of this rank from the role's ``pg_collection.pp`` group."""
    import torch.distributed as dist

    pp = getattr(pg_collection, "pp", None)
    if pp is None:
        return StageInfo(0, 1)
    return StageInfo(dist.get_rank(pp), dist.get_world_size(pp))


def _group_size(pg_collection: Any, name: str) -> int:
    import torch.distributed as dist

    group = getattr(pg_collection, name, None)
    return 1 if group is None else dist.get_world_size(group)


def moe_kwargs(model_cfg: ModelConfig, *, ep: int = 1, etp: Optional[int] = None) -> dict[str, Any]:
    """megatron ``TransformerConfig`` kwargs of ``model.moe`` (empty for a dense model) at expert-parallel
    size ``ep`` and expert-TP size ``etp`` (None = TP).

    Experts are a ``SequentialMLP`` (``moe_grouped_gemm=False``: one SwiGLU MLP per local expert, parameter
    names ``mlp.experts.local_experts.{j}.linear_fc{1,2}``, on CPU and GPU alike). The router scores in
    fp32 (``moe_router_dtype``) whatever the parameter dtype, as HF's Mixtral/Qwen-MoE do. The aux loss is
    megatron's ``aux_loss`` load balancing (the HF formula: num_experts x sum_e f_e P_e per micro-batch),
    its gradient injected by ``MoEAuxLossAutoScaler`` (scaled per micro-batch: ``models.moe``).
    """
    moe = model_cfg.moe
    if moe is None:
        return {}
    kwargs: dict[str, Any] = dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_layer_freq=list(moe.layer_pattern) if moe.layer_pattern is not None else 1,
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff if moe.z_loss_coeff > 0 else None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_enable_routing_replay=moe.routing_replay,
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    return kwargs


def transformer_config_from(
    model_cfg: ModelConfig,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    extra: Optional[dict[str, Any]] = None,
    ep: int = 1,
    etp: Optional[int] = None,
) -> TransformerConfig:
    """The megatron ``TransformerConfig`` for ``model_cfg`` at this role's TP/PP (and EP / expert TP).

    ``extra`` overrides/extends the kwargs (e.g. FP8 settings from ``models.precision``).
    """
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.kv_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        kv_channels=model_cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Full master weights drawn on the CPU then split: initial weights independent of TP.
        use_cpu_initialization=True,
        perform_initialization=True,
        # megatron's default "full" means the same (graph the whole layer, when CUDA graphs are on)
        # but is deprecated and warns on every config built; [] is its documented replacement
        cuda_graph_modules=[],
    )
    kwargs.update(moe_kwargs(model_cfg, ep=ep, etp=etp))
    if not on_gpu:
        kwargs.update(_CPU_FUSIONS_OFF)
        # p2p on gloo: no torch.cuda.synchronize() after batched isend/irecv
        kwargs["batch_p2p_comm"] = False
    if extra:
        kwargs.update(extra)
    return TransformerConfig(**kwargs)


def recompute_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """megatron ``TransformerConfig`` kwargs of ``model.recompute`` (the student's training model; frozen
    models never recompute). ``selective`` recomputes megatron's default module, the core attention
    (the [s, s] scores of the local layers; TE's fused attention stores none), and takes no layer
    count; ``full`` recomputes whole layers chosen by ``recompute_method`` / ``recompute_num_layers``.
    megatron recomputes only in training mode (``module.train()``), never in a forward-only pass."""
    if model_cfg.recompute == "none":
        return {}
    if model_cfg.recompute == "selective":
        return {"recompute_granularity": "selective"}
    return {"recompute_granularity": "full", "recompute_method": model_cfg.recompute_method,
            "recompute_num_layers": model_cfg.recompute_num_layers}


class LocalNorm:
    """The local layer spec's norms: torch ``RMSNorm`` (``LayerNorm``), with sequence parallelism.

    megatron's ``WrappedTorchNorm`` builds the same torch module but refuses ``sequence_parallel``: under SP
    each TP rank normalises only its ``s / TP`` positions, so a norm weight's gradient on one rank is a
    partial sum, and megatron completes it only for parameters flagged ``sequence_parallel`` (an all-reduce
    over TP in ``finalize_model_grads``). This builder flags them as ``TENorm`` and apex's
    ``FusedLayerNorm`` flag theirs (with the config's value, so the flag is False without SP; the q/k
    norms see whole sequences and are all-reduced by megatron under ``qk_layernorm`` either way).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("LocalNorm: layernorm_zero_centered_gamma is not supported by the torch norms; "
                             "use model.transformer_impl=te")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"LocalNorm: normalization={config.normalization!r}; expected RMSNorm or LayerNorm")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _layer_spec(model_cfg: ModelConfig, impl: str, config: TransformerConfig, pp_rank: int) -> Any:
    """The layer spec (TE) or, for the local spec, this stage's block spec with :class:`LocalNorm` everywhere:
    each layer's two norms (and q/k norms) and the final norm, which megatron would otherwise take from
    whatever TE / apex / torch it finds installed (apex's FusedLayerNorm has no RMSNorm)."""
    if model_cfg.moe is not None:  # megatron's per-layer dense / MoE block spec (config.moe_layer_freq)
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=impl == "te", normalization="RMSNorm",
                                           pp_rank=pp_rank)
        if impl == "te":
            return block
        for layer in {id(spec): spec for spec in block.layer_specs}.values():
            _local_norms(layer, model_cfg)
        block.layer_norm = LocalNorm
        return block
    if impl == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm)
    layer = get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm, normalization="RMSNorm")
    _local_norms(layer, model_cfg)
    n_layers = get_num_layers_to_build(config, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=LocalNorm)


def _local_norms(layer: Any, model_cfg: ModelConfig) -> None:
    """:class:`LocalNorm` for a local layer spec's two norms (and q/k norms)."""
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = LocalNorm
    if model_cfg.qk_layernorm:
        attn = sub.self_attention.submodules
        attn.q_layernorm = attn.k_layernorm = LocalNorm


def _rope_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """RoPE scaling: Llama-3.1 style (``rope_type: llama3``) is what megatron's GPTModel implements."""
    scaling = model_cfg.rope_scaling
    if not scaling:
        return {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ConfigError(
            [f"model.rope_scaling: rope_type={rope_type!r} is not supported (only 'llama3'); drop rope_scaling or convert the model"]
        )
    for name, value in MCORE_LLAMA3_ROPE.items():
        if name in scaling and float(scaling[name]) != value:
            raise ConfigError(
                [f"model.rope_scaling.{name}={scaling[name]!r}: megatron-core implements llama3 scaling with {name}={value:g} only"]
            )
    return {"rope_scaling": True, "rope_scaling_factor": float(scaling.get("factor", 8.0))}


class MainGradEmbedding(VocabParallelEmbedding):
    """megatron's vocab-parallel embedding whose lookup adds its weight gradient into the looked-up rows of the
    DDP ``main_grad`` instead of a dense [V / TP, H] gradient (:func:`camopd_megatron.ops.embedding.embedding_lookup`),
    then reduces over TP as megatron does: all-reduce, or with sequence parallelism a reduce-scatter of the
    ``[s, b, h]`` output. Megatron's deterministic mode, its inference reduce-scatter and its GTP weight
    rematerialisation run megatron's own forward. Same parameters, state dict and checkpoint layout: the
    builder only switches the class of the module megatron built."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        rs_inference = (self.reduce_scatter_embeddings and not self.training
                        and getattr(self, "use_inference_optimized_reduce_scatter", False))
        if self.deterministic_mode or getattr(self, "gtp_remat_size", 1) > 1 or rs_inference:
            return super().forward(input_)
        sharded = self.tp_group.size() > 1  # ids outside this shard: zero rows, no gradient; the reduce sums them
        out = embedding_lookup(input_, self.weight, self.vocab_start_index if sharded else None)
        if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], then scattered along s
            return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=self.tp_group)
        if sharded:
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out


def build_gpt_model(
    model_cfg: ModelConfig,
    pg_collection: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    config_extra: Optional[dict[str, Any]] = None,
) -> GPTModel:
    """Build this rank's piece of the model (its TP shard of its pipeline stage).

    Args:
        model_cfg: the architecture.
        pg_collection: the role's process groups (``models.groups.simple_pg_collection``).
        params_dtype: parameter / compute dtype.
        sequence_parallel: megatron sequence parallelism (needs TP > 1).
        pre_process / post_process: default to first / last pipeline stage.
        config_extra: extra ``TransformerConfig`` kwargs (FP8 settings, recompute, ...).

    Returns:
        The ``GPTModel``; its forward returns vocab-sharded logits ``[B, T, V_pad / TP]``.
    """
    tp, pp = _group_size(pg_collection, "tp"), _group_size(pg_collection, "pp")
    ep, etp = _group_size(pg_collection, "ep"), _group_size(pg_collection, "expt_tp")
    problems = model_cfg.layout_problems(tp, pp, tp_key="TP size", pp_key="PP size")
    if problems:  # the config's own check, for models built outside a validated config (tools, tests)
        raise ConfigError(problems)
    impl = resolve_transformer_impl(model_cfg.transformer_impl)
    if sequence_parallel and tp == 1:
        raise ConfigError(["parallel.sequence_parallel=true needs parallel.tp > 1; set it to false"])
    stage = stage_info(pg_collection)
    config = transformer_config_from(
        model_cfg, tp=tp, pp=pp, params_dtype=params_dtype, sequence_parallel=sequence_parallel, extra=config_extra,
        ep=ep, etp=etp,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(model_cfg, impl, config, stage.pp_rank),
        vocab_size=model_cfg.padded_vocab_size,
        max_sequence_length=model_cfg.seq_length,
        pre_process=stage.is_first if pre_process is None else pre_process,
        post_process=stage.is_last if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rotary_base),
        pg_collection=pg_collection,
        **_rope_kwargs(model_cfg),
    )
    if model.pre_process and type(model.embedding.word_embeddings) is VocabParallelEmbedding:
        model.embedding.word_embeddings.__class__ = MainGradEmbedding
    if params_dtype != torch.float32:
        model = model.to(params_dtype)
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    return model


def init_model_rng(seed: int, pg_collection: Any) -> None:
    """Seed this process for building/running a role's model (call before :func:`build_gpt_model`).

    * ``torch.manual_seed(seed)``: the CPU master weights (the same on every rank of the role, so
      the TP shards are slices of one model);
    * megatron's RNG tracker (dropout inside TP regions), seeded with the role's explicit TP rank —
      the tracker is per process, so one role per rank;
    * the attention global memory buffer (a process-local scratch allocator, no process group).
    """
    import torch.distributed as dist

    torch.manual_seed(seed)
    def rank_in(name: str) -> int:
        group = getattr(pg_collection, name, None)
        return 0 if group is None else dist.get_rank(group)

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    # the expert-parallel tracker (dropout inside experts) is seeded per EP / expert-TP rank, as megatron does
    model_parallel_cuda_manual_seed(seed, tp_rank=rank_in("tp"), ep_rank=rank_in("ep"), etp_rank=rank_in("expt_tp"),
                                    force_reset_rng=True)
    torch.manual_seed(seed)  # the tracker draws from the default generator while seeding


def unwrap_model(model: Any) -> Any:
    """Strip DDP / Float16Module wrappers (``.module`` chains) down to the GPTModel."""
    while hasattr(model, "module") and not isinstance(model, GPTModel):
        model = model.module
    return model


def output_weight(model: Any) -> Any:
    """The output projection's weight rows on this rank, [V_pad / TP, H]: the output layer's own, or the
    word embeddings when they are tied (last pipeline stage)."""
    inner = unwrap_model(model)
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
"""The module attributes that carry megatron's sequence-parallel switch (the list of megatron's own
``set_model_to_sequence_parallel``); the config's ``sequence_parallel`` is read at forward time."""


@contextmanager
def sequence_parallel_off(model: Any) -> Iterator[None]:
    """Run ``model`` without sequence parallelism inside the block; every switch is restored after.

    What megatron-core 0.19.2 itself does for static-batching inference (its text-generation controller
    turns SP off, ``transformer.utils.set_model_to_sequence_parallel``): a decode step feeds one position,
    which cannot be split over the TP group, and the static inference path slices the last position of the
    (sharded) sequence. With SP off the same weights compute the same function, the activations replicated
    over TP instead of sharded along the sequence. megatron's helper caches the modules per ``id(model)``
    in a process-global dict (stale after a model is freed and the id reused); this walks the modules each
    time and restores each attribute to its own previous value. Forward only: the modules' gradient
    reductions were chosen at construction for SP.
    """
    inner = unwrap_model(model)
    config = inner.config
    if not getattr(config, "sequence_parallel", False):
        yield
        return
    saved = [(m, a, getattr(m, a)) for m in inner.modules() for a in _SP_ATTRS if isinstance(getattr(m, a, None), bool)]
    try:
        config.sequence_parallel = False
        for m, a, _ in saved:
            setattr(m, a, False)
        yield
    finally:
        config.sequence_parallel = True
        for m, a, v in saved:
            setattr(m, a, v)


def run_forward_pre_hooks(module: torch.nn.Module) -> None:
    """Run ``module``'s own forward pre-hooks as its forward would, without running the forward.

    For code that reads a module's weights directly instead of calling it (the output window's fused
    output projection, the lean rollout decoder, a checkpoint save): megatron DDP with
    ``overlap_param_gather`` waits for a parameter's asynchronous all-gather in the forward pre-hook of
    the module that owns it (``DistributedDataParallel._make_forward_pre_hook``, which then dispatches
    the next bucket's gather), so a direct read must trigger the same wait or it sees the shards other
    DP ranks updated still un-gathered. Hooks' return values (changed inputs) are ignored: there are no
    inputs. Without overlap no hook is registered and this does nothing."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())


def finish_param_gather(model: Any) -> None:
    """Wait for every pending parameter all-gather of ``model`` (bare or DDP-wrapped): the forward
    pre-hooks of all its modules, in forward order (embedding, layers, output layer), so the buckets
    are gathered in megatron's dispatch order.

    Collective over the data-parallel group when gathers are pending (each bucket's all-gather is
    issued by the first rank that reaches it): call it on every DP rank at the same point of the
    step, e.g. before the rollout even on a rank with no prompts. A no-op without
    ``parallel.overlap_param_gather``."""
    for module in unwrap_model(model).modules():
        run_forward_pre_hooks(module)
