"""CPU stand-ins for what megatron-core expects of ``torch.cuda`` (used by the no-CUDA patches).

Two mechanisms, each touching as little as possible:

* ``torch.cuda.*`` calls and ``device="cuda"`` factory calls inside a megatron module: the module's
  global name ``torch`` is replaced by a :class:`_TorchProxy` (module-local; the real ``torch``
  module is never modified). The proxy maps ``device="cuda"`` to the CPU in tensor factories and
  serves a :class:`_CpuCudaNamespace` for ``torch.cuda`` (current_device -> "cpu", no-op streams,
  wall-clock events, synchronize no-op, CPU RNG).
* Tensor-method checks (``.type() == 'torch.cuda.FloatTensor'``, ``weight.data.cuda()``) cannot be
  reached through a module proxy: the few upstream functions that do that are wrapped by
  :func:`with_cuda_like_tensors`, so ``Tensor.type`` / ``Tensor.cuda`` behave CUDA-like only
  *while that function runs*.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import time
from typing import Any, Callable, Iterator

import torch

__all__ = ["cuda_like_tensor_methods", "proxy_torch_in", "with_cuda_like_tensors"]


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


def proxy_torch_in(module_names: tuple[str, ...]) -> None:
    """Give each named megatron module its own :class:`_TorchProxy` as global ``torch``."""
    for name in module_names:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "torch", None), _TorchProxy):
            if getattr(module, "torch", None) is not torch:
                raise RuntimeError(f"camopd_megatron.compat: {name}.torch is not the torch module; upstream changed")
            module.torch = _TorchProxy()


@contextlib.contextmanager
def cuda_like_tensor_methods() -> Iterator[None]:
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


def with_cuda_like_tensors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so it runs inside :func:`cuda_like_tensor_methods`."""
    if getattr(fn, "_camopd_cuda_like", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cuda_like_tensor_methods():
            return fn(*args, **kwargs)

    wrapper._camopd_cuda_like = True  # type: ignore[attr-defined]
    return wrapper
