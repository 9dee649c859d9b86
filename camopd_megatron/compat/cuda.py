"""The no-CUDA patches: megatron-core 0.19.2 code paths that call CUDA unconditionally.

Applied by :func:`camopd_megatron.compat.install` only when ``torch.cuda.is_available()`` is False
(registry condition ``NO_CUDA``); a GPU process keeps upstream behaviour. Each function below names
the upstream lines it works around; the mechanisms (module-local ``torch`` proxy, CUDA-like tensor
methods while one upstream function runs) are in :mod:`camopd_megatron.compat.cpu_torch`.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from camopd_megatron.compat.cpu_torch import proxy_torch_in, with_cuda_like_tensors

__all__ = [
    "patch_rng_tracker", "patch_device_factories", "patch_pipeline", "patch_ddp_and_optimizer",
    "patch_type_checks", "patch_tied_embedding_cuda", "patch_dist_checkpointing", "patch_distopt_dp_zero_gather",
    "patch_moe_devices",
    "RNG_MODULE", "DEVICE_MODULES", "PIPELINE_MODULES", "DDP_OPTIM_MODULES", "CKPT_MODULES", "MOE_MODULES",
]

RNG_MODULE = "megatron.core.tensor_parallel.random"


def patch_rng_tracker() -> None:
    """``tensor_parallel/random.py``: ``CudaRNGStatesTracker.add``/``fork`` and
    ``model_parallel_cuda_manual_seed`` save/restore ``torch.cuda`` RNG state through
    ``torch.cuda.get_rng_state``/``manual_seed`` and the module's ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` (default_generators, ``_lazy_call``). Every attention forward forks the
    tracker, so seeding cannot be skipped. Fix: the tracker keeps the CPU generator state."""
    rng = importlib.import_module(RNG_MODULE)
    proxy_torch_in((RNG_MODULE,))

    def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        if graph_safe:
            raise RuntimeError("cudagraph-safe RNG is not available on CPU")
        return torch.get_rng_state()

    def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        if graph_safe:
            raise RuntimeError("cudagraph-safe RNG is not available on CPU")
        torch.set_rng_state(new_state)

    rng._get_cuda_rng_state = _get_cpu_rng_state
    rng._set_cuda_rng_state = _set_cpu_rng_state

    # fork() warns whenever the CPU state changed inside the fork; on CPU the tracked state *is*
    # the CPU generator, so dropout inside a fork would log that warning on every call.
    class _DropCpuRngWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    rng_logger = logging.getLogger(RNG_MODULE)
    if not any(isinstance(f, _DropCpuRngWarning) for f in rng_logger.filters):
        rng_logger.addFilter(_DropCpuRngWarning())


DEVICE_MODULES = (
    # attention's GlobalMemoryBuffer (utils.py:715), check helpers
    "megatron.core.utils",
    # get_default_causal_mask (transformer/utils.py:39): attention without an explicit mask
    "megatron.core.transformer.utils",
    # gathers / SP buffers (mappings.py:95-185), GPU-style init and SP in layers.py
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
)


def patch_device_factories() -> None:
    """Model path: ``device=torch.cuda.current_device()`` buffers in ``utils.py`` (GlobalMemoryBuffer
    used by every attention forward), ``tensor_parallel/mappings.py`` and ``layers.py`` (gathers,
    sequence parallel, GPU-style init), attention/rotary/inference helpers. Module-local torch proxy."""
    proxy_torch_in(DEVICE_MODULES)


PIPELINE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)


def patch_pipeline() -> None:
    """``pipeline_parallel/schedules.py:749,1121,2292``: every schedule (even no-pipelining) does
    ``torch.zeros([], device="cuda")``; ``p2p_communication.py`` allocates receive buffers on
    ``torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()`` (419, 263)."""
    proxy_torch_in(PIPELINE_MODULES)


DDP_OPTIM_MODULES = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
)


def patch_ddp_and_optimizer() -> None:
    """DDP ``start_grad_sync`` uses ``torch.cuda.current_stream()`` (param_and_grad_buffer.py:632)
    and the grad buffers/optimizer/clip_grads/grad_scaler create ``device='cuda'`` tensors
    (optimizer.py:315,690-702,1249; clip_grads.py:96-231). Module-local torch proxy."""
    proxy_torch_in(DDP_OPTIM_MODULES)


def patch_type_checks() -> None:
    """``optimizer/clip_grads.py:174`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``
    (``clip_grad_by_total_norm_fp32``, also imported by name into ``optimizer/optimizer.py``);
    ``DistributedOptimizer._build_model_and_main_param_groups`` (distrib_optimizer.py:401/466) raises
    TypeError unless ``.type()`` is a ``torch.cuda.*`` name. Both run inside
    :func:`~camopd_megatron.compat.cpu_torch.cuda_like_tensor_methods`."""
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    dist_opt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    wrapped = with_cuda_like_tensors(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    optimizer.clip_grad_by_total_norm_fp32 = wrapped
    cls = dist_opt.DistributedOptimizer
    build = cls.__dict__["_build_model_and_main_param_groups"]
    if not getattr(build.__func__, "_camopd_cuda_like", False):
        cls._build_model_and_main_param_groups = classmethod(with_cuda_like_tensors(build.__func__))


def patch_tied_embedding_cuda() -> None:
    """``models/common/language_module/language_module.py:307``
    (``LanguageModule.setup_embeddings_and_output_layer``) does ``weight.data = weight.data.cuda()``
    for tied embeddings with PP > 1. Run it with ``Tensor.cuda`` as the identity."""
    lm = importlib.import_module("megatron.core.models.common.language_module.language_module")
    cls = lm.LanguageModule
    cls.setup_embeddings_and_output_layer = with_cuda_like_tensors(cls.setup_embeddings_and_output_layer)


CKPT_MODULES = (
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def patch_dist_checkpointing() -> None:
    """dist_checkpointing save/load helpers allocate flags with ``device='cuda'`` /
    ``torch.cuda.current_device()`` (state_dict_saver.py:204,252, async_utils.py:224,698,
    exchange_utils.py:103-329) and call ``torch.cuda.synchronize()`` (filesystem_async.py:248)."""
    proxy_torch_in(CKPT_MODULES)


def patch_distopt_dp_zero_gather() -> None:
    """``DistributedOptimizer.get_parameter_state_dp_zero`` (the gather behind the
    ``fully_reshardable`` checkpoint format) moves its buffers with ``send_tensor.cuda()``
    (distrib_optimizer.py): run it with ``Tensor.cuda`` as the identity."""
    dist_opt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = dist_opt.DistributedOptimizer
    cls.get_parameter_state_dp_zero = with_cuda_like_tensors(cls.get_parameter_state_dp_zero)


MOE_MODULES = ("megatron.core.transformer.moe.token_dispatcher", "megatron.core.transformer.moe.router")


def patch_moe_devices() -> None:
    """MoE layers. ``transformer/moe/router.py``: ``Router.gating`` moves a CPU router weight to
    ``torch.cuda.current_device()`` on every forward (line 98) and the aux-loss / routing-replay tensors
    are made on it (lines 184-247). ``transformer/moe/token_dispatcher.py``:
    ``MoEAlltoAllTokenDispatcher.__init__`` creates a ``torch.cuda.Stream()`` (the device-to-host copy
    stream of the split sizes, line 469) and ``_maybe_dtoh_and_synchronize`` switches to it with
    ``torch.cuda.stream`` / ``current_stream`` (lines 922-925). On CPU the weights and split sizes
    already live on the host: the CPU device and no-op streams (module-local torch proxy), so both the
    ``alltoall`` and the ``allgather`` dispatcher run on gloo. The same function hands the split sizes
    to ``all_to_all_single`` through ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which converts
    only CUDA tensors (line 1184 of ``moe_utils.py``): a CPU tensor stays a tensor, which torch's
    ``all_to_all_single`` refuses as a split-size list. The dispatcher's copy of that function returns
    the host array as it does on GPU."""
    proxy_torch_in(MOE_MODULES)
    dispatcher = importlib.import_module(MOE_MODULES[0])
    upstream = dispatcher.maybe_move_tensor_to_cpu
    if getattr(upstream, "_camopd_cpu", False):
        return

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy().copy()  # what the GPU path returns: a host copy as numpy
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._camopd_cpu = True  # type: ignore[attr-defined]
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
