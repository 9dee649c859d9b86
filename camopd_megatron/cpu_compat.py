"""Run megatron-core 0.19.2 on CPU (gloo): one compat layer, applied once per process.

Call :func:`ensure_cpu_compat` before importing ``megatron.core`` anywhere (every module of ours
that imports megatron does it first). It

* always: stubs ``megatron.core.transformer.moe.ops.paged_stash`` (Triton-only MoE kernels that
  ``import megatron.core`` pulls in unconditionally) when ``triton`` is not installed;
* only when ``torch.cuda.is_available()`` is False: applies the CPU patches of :data:`_PATCHES`.
  With CUDA nothing else is touched, so GPU runs keep upstream behaviour.

How the CUDA call sites are handled (MCORE_CPU_NOTES.md lists them, measured):

* ``torch.cuda.*`` calls and ``device="cuda"`` factory calls inside megatron modules: the module's
  global name ``torch`` is replaced by a :class:`_TorchProxy` (module-local; the real ``torch``
  module is never modified). The proxy maps ``device="cuda"`` to the CPU in tensor factories and
  serves a :class:`_CpuCudaNamespace` for ``torch.cuda`` (current_device -> "cpu", no-op streams,
  wall-clock events, synchronize no-op, CPU RNG).
* Tensor-method checks (``.type() == 'torch.cuda.FloatTensor'``, ``weight.data.cuda()``) cannot be
  reached through a module proxy: the few upstream functions that do that are wrapped so that
  ``Tensor.type`` / ``Tensor.cuda`` behave CUDA-like only *while that function runs*.
* The DistributedOptimizer + torch-native Adam checkpoint problems (upstream, not CPU-specific,
  but always hit on CPU where TE/apex Adam is absent) are fixed in ``cpu_compat_optim``.

Every patch is a small named function registered in :data:`_PATCHES` with the upstream target it
touches; :func:`applied_patches` returns the names applied in this process and
``tests/test_cpu_compat.py`` runs each one on the real code path it exists for.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"


# --------------------------------------------------------------------------------------------
# CPU stand-ins for torch.cuda objects
# --------------------------------------------------------------------------------------------
class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        """No-op (CPU ops complete in program order)."""

    def wait_event(self, event: Any) -> None:
        """No-op."""

    def record_event(self, event: Any = None) -> "_WallClockEvent":
        """Return a recorded wall-clock event."""
        event = event if event is not None else _WallClockEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always finished."""
        return True


class _WallClockEvent:
    """Stand-in for ``torch.cuda.Event`` measuring wall-clock time with ``perf_counter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        """Record the current wall-clock time."""
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        """No-op."""

    def wait(self, stream: Any = None) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always finished."""
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        """Milliseconds between this event and ``end`` (both must be recorded)."""
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time() needs both events recorded")
        return (end._t - self._t) * 1000.0


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, an int) to "cpu"."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _CpuCudaNamespace:
    """What ``torch.cuda`` looks like to a patched megatron module on a CPU-only machine.

    Attributes not overridden here are those of the real ``torch.cuda`` (``is_available`` stays
    False, ``amp``/``nvtx`` unchanged)."""

    Stream = _NoOpStream
    Event = _WallClockEvent

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        """Device used by megatron for its buffers (``device=torch.cuda.current_device()``)."""
        return "cpu"

    @staticmethod
    def current_stream(device: Any = None) -> _NoOpStream:
        """A no-op stream."""
        return _NoOpStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NoOpStream:
        """A no-op stream."""
        return _NoOpStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        """``with torch.cuda.stream(s):`` -> nothing to switch on CPU."""
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """No-op: CPU ops complete in program order."""

    @staticmethod
    def empty_cache() -> None:
        """No-op."""

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        """The CPU generator state (megatron's RNG tracker saves/restores "the CUDA" state)."""
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        """Set the CPU generator state."""
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        """Seed the CPU generator."""
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        """Seed the CPU generator."""
        torch.manual_seed(seed)


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "eye", "linspace", "empty_strided",
)


class _TorchProxy:
    """Module-local replacement for the name ``torch`` inside one megatron module.

    Delegates everything to the real ``torch`` except ``torch.cuda`` (-> :class:`_CpuCudaNamespace`)
    and tensor factories, whose ``device=`` keyword is mapped from CUDA to the CPU."""

    def __init__(self) -> None:
        self.cuda = _CpuCudaNamespace()
        for name in _FACTORIES:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(fn)
        def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _proxy_torch_in(module_names: tuple[str, ...]) -> None:
    """Give each named megatron module its own :class:`_TorchProxy` as global ``torch``."""
    for name in module_names:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "torch", None), _TorchProxy):
            if getattr(module, "torch", None) is not torch:
                raise RuntimeError(f"cpu_compat: {name}.torch is not the torch module; upstream changed")
            module.torch = _TorchProxy()


@contextlib.contextmanager
def _cuda_like_tensor_methods() -> Iterator[None]:
    """While active, ``Tensor.type()`` reports ``torch.cuda.*`` names and ``Tensor.cuda()`` is the
    identity. Used only around the few upstream functions that check or force CUDA tensors.
    Not thread-safe by design: megatron calls these on the main thread."""
    orig_type, orig_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        if dtype is None and not kw:
            name = orig_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return orig_type(self, dtype, non_blocking, **kw)

    def cuda_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.type, torch.Tensor.cuda = cuda_type, cuda_identity
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = orig_type, orig_cuda


def _with_cuda_like_tensors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so it runs inside :func:`_cuda_like_tensor_methods`."""
    if getattr(fn, "_camopd_cuda_like", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_like_tensor_methods():
            return fn(*args, **kwargs)

    wrapper._camopd_cuda_like = True  # type: ignore[attr-defined]
    return wrapper


# --------------------------------------------------------------------------------------------
# The patches
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """One CPU patch: ``name``, the upstream ``targets`` ("module:attribute") it touches, the fix."""

    name: str
    targets: tuple[str, ...]
    apply: Callable[[], None]


def _stub_paged_stash() -> None:
    """``megatron/core/transformer/moe/ops/paged_stash.py`` does ``import triton`` at import time and
    ``pipeline_parallel/schedules.py`` imports it unconditionally, so ``import megatron.core`` fails
    without triton. The module holds only Triton kernels for MoE paged stash (never used here)."""
    if PAGED_STASH_MODULE in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(PAGED_STASH_MODULE)
    stub.__doc__ = "camopd_megatron stub: triton is not installed, MoE paged stash unavailable"
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged stash needs triton, which is not installed")

    stub.paged_stash_copy_kernel = _unavailable  # type: ignore[attr-defined]
    stub.paged_stash_pop_kernel = _unavailable  # type: ignore[attr-defined]
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]  # type: ignore[attr-defined]
    sys.modules[PAGED_STASH_MODULE] = stub


_RNG_MODULE = "megatron.core.tensor_parallel.random"


def _patch_rng_tracker() -> None:
    """``tensor_parallel/random.py``: ``CudaRNGStatesTracker.add``/``fork`` and
    ``model_parallel_cuda_manual_seed`` save/restore ``torch.cuda`` RNG state through
    ``torch.cuda.get_rng_state``/``manual_seed`` and the module's ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` (default_generators, ``_lazy_call``). Every attention forward forks the
    tracker, so seeding cannot be skipped. Fix: the tracker keeps the CPU generator state."""
    rng = importlib.import_module(_RNG_MODULE)
    _proxy_torch_in((_RNG_MODULE,))

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

    rng_logger = logging.getLogger(_RNG_MODULE)
    if not any(isinstance(f, _DropCpuRngWarning) for f in rng_logger.filters):
        rng_logger.addFilter(_DropCpuRngWarning())


_DEVICE_MODULES = (
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


def _patch_device_factories() -> None:
    """Model path: ``device=torch.cuda.current_device()`` buffers in ``utils.py`` (GlobalMemoryBuffer
    used by every attention forward), ``tensor_parallel/mappings.py`` and ``layers.py`` (gathers,
    sequence parallel, GPU-style init), attention/rotary/inference helpers. Module-local torch proxy."""
    _proxy_torch_in(_DEVICE_MODULES)


_PIPELINE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)


def _patch_pipeline() -> None:
    """``pipeline_parallel/schedules.py:749,1121,2292``: every schedule (even no-pipelining) does
    ``torch.zeros([], device="cuda")``; ``p2p_communication.py`` allocates receive buffers on
    ``torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()`` (419, 263)."""
    _proxy_torch_in(_PIPELINE_MODULES)


_DDP_OPTIM_MODULES = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
)


def _patch_ddp_and_optimizer() -> None:
    """DDP ``start_grad_sync`` uses ``torch.cuda.current_stream()`` (param_and_grad_buffer.py:632)
    and the grad buffers/optimizer/clip_grads/grad_scaler create ``device='cuda'`` tensors
    (optimizer.py:315,690-702,1249; clip_grads.py:96-231). Module-local torch proxy."""
    _proxy_torch_in(_DDP_OPTIM_MODULES)


def _patch_type_checks() -> None:
    """``optimizer/clip_grads.py:174`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``
    (``clip_grad_by_total_norm_fp32``, also imported by name into ``optimizer/optimizer.py``);
    ``DistributedOptimizer._build_model_and_main_param_groups`` (distrib_optimizer.py:401/466) raises
    TypeError unless ``.type()`` is a ``torch.cuda.*`` name. Both run inside
    :func:`_cuda_like_tensor_methods`."""
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    dist_opt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    wrapped = _with_cuda_like_tensors(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    optimizer.clip_grad_by_total_norm_fp32 = wrapped
    cls = dist_opt.DistributedOptimizer
    build = cls.__dict__["_build_model_and_main_param_groups"]
    if not getattr(build.__func__, "_camopd_cuda_like", False):
        cls._build_model_and_main_param_groups = classmethod(_with_cuda_like_tensors(build.__func__))


def _patch_tied_embedding_cuda() -> None:
    """``models/common/language_module/language_module.py:307``
    (``LanguageModule.setup_embeddings_and_output_layer``) does ``weight.data = weight.data.cuda()``
    for tied embeddings with PP > 1. Run it with ``Tensor.cuda`` as the identity."""
    lm = importlib.import_module("megatron.core.models.common.language_module.language_module")
    cls = lm.LanguageModule
    cls.setup_embeddings_and_output_layer = _with_cuda_like_tensors(cls.setup_embeddings_and_output_layer)


_CKPT_MODULES = (
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _patch_dist_checkpointing() -> None:
    """dist_checkpointing save/load helpers allocate flags with ``device='cuda'`` /
    ``torch.cuda.current_device()`` (state_dict_saver.py:204,252, async_utils.py:224,698,
    exchange_utils.py:103-329) and call ``torch.cuda.synchronize()`` (filesystem_async.py:248)."""
    _proxy_torch_in(_CKPT_MODULES)


def _patch_distopt_checkpoint() -> None:
    """DistributedOptimizer checkpointing with torch-native Adam: see ``cpu_compat_optim``."""
    from camopd_megatron import cpu_compat_optim

    cpu_compat_optim.apply()


_PATCHES: tuple[Patch, ...] = (
    Patch("rng_tracker_on_cpu_generator", (f"{_RNG_MODULE}:_get_cuda_rng_state",
          f"{_RNG_MODULE}:_set_cuda_rng_state", f"{_RNG_MODULE}:CudaRNGStatesTracker"), _patch_rng_tracker),
    Patch("device_factories_model", tuple(f"{m}:torch" for m in _DEVICE_MODULES), _patch_device_factories),
    Patch("pipeline_schedules", tuple(f"{m}:torch" for m in _PIPELINE_MODULES), _patch_pipeline),
    Patch("ddp_and_optimizer_devices", tuple(f"{m}:torch" for m in _DDP_OPTIM_MODULES), _patch_ddp_and_optimizer),
    Patch("cuda_type_checks", ("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
          "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
          "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups"),
          _patch_type_checks),
    Patch("tied_embedding_tensor_cuda", ("megatron.core.models.common.language_module.language_module:"
          "LanguageModule.setup_embeddings_and_output_layer",), _patch_tied_embedding_cuda),
    Patch("dist_checkpointing_devices", tuple(f"{m}:torch" for m in _CKPT_MODULES), _patch_dist_checkpointing),
    Patch("distopt_torch_adam_checkpoint", ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",),
          _patch_distopt_checkpoint),
)


def patch_registry() -> tuple[Patch, ...]:
    """All CPU patches (applied only without CUDA), in application order."""
    return _PATCHES


@functools.lru_cache(maxsize=None)
def _apply_once() -> tuple[str, ...]:
    """Apply the layer; cached so it runs once per process. Returns the applied patch names."""
    applied: list[str] = []
    if importlib.util.find_spec("triton") is None:
        _stub_paged_stash()
        applied.append("paged_stash_stub")
    if torch.cuda.is_available():
        logger.debug("cpu_compat: CUDA available, megatron left unpatched")
        return tuple(applied)
    for patch in _PATCHES:
        patch.apply()
        applied.append(patch.name)
    logger.debug("cpu_compat: applied %s", ", ".join(applied))
    return tuple(applied)


def stub_triton_only_modules() -> None:
    """Only the import fix (no CPU patches): lets ``import megatron.core`` succeed without triton."""
    if "megatron.core" not in sys.modules:
        _stub_paged_stash()


_EXPECTED_IMPORT_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"MimoModelConfig is experimental.*",
)
"""megatron warns at import time about optional packages we detect ourselves (camopd_megatron.deps)."""


def ensure_cpu_compat() -> None:
    """Make megatron-core usable in this process (idempotent; call before importing megatron)."""
    import warnings

    for pattern in _EXPECTED_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    if "megatron.core" not in sys.modules:
        _stub_paged_stash()  # must precede the first `import megatron.core`
    _apply_once()


def applied_patches() -> tuple[str, ...]:
    """Names of the patches applied in this process (empty before :func:`ensure_cpu_compat`)."""
    if _apply_once.cache_info().currsize == 0:
        return ()
    return _apply_once()
