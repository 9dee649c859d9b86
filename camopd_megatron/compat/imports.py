"""What ``import megatron.core`` needs on a machine without triton / transformer-engine.

The only part of the compatibility layer that runs at import time: ``camopd_megatron/__init__.py``
calls :func:`prepare_megatron_import`, so any ``import camopd_megatron.<module>`` makes a later
``import megatron.core`` succeed. It patches nothing in megatron (the patches wait for
:func:`camopd_megatron.compat.install`); it

* puts a stub for megatron's triton-only MoE "paged stash" kernels into ``sys.modules`` when triton
  is not installed: ``megatron/core/__init__`` -> ``distributed`` -> ``finalize_model_grads`` ->
  ``pipeline_parallel/schedules.py`` imports ``transformer/moe/ops/paged_stash.py``, whose first
  line is ``import triton``, so without the stub ``import megatron.core`` fails
  (``ModuleNotFoundError: No module named 'triton'``). The kernels serve MoE paged stash only,
  which this project never uses; the stub raises if anything calls them;
* silences the warnings megatron prints at import about optional packages (TE, apex, an
  experimental config class): :mod:`camopd_megatron.deps` detects and reports those itself.

Standard library only: ``import camopd_megatron`` stays light (no torch).
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["PAGED_STASH_MODULE", "prepare_megatron_import"]

PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"

_EXPECTED_IMPORT_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"MimoModelConfig is experimental.*",
)
"""megatron warns at import time about optional packages we detect ourselves (camopd_megatron.deps)."""


def _unavailable(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("MoE paged stash needs triton, which is not installed")


def _stub_paged_stash() -> None:
    """Register the stub unless triton is installed or megatron is already imported (then it is
    too late to matter, or the real module is there)."""
    if PAGED_STASH_MODULE in sys.modules or "megatron.core" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(PAGED_STASH_MODULE)
    stub.__doc__ = "camopd_megatron stub: triton is not installed, MoE paged stash unavailable"
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
    stub.paged_stash_copy_kernel = _unavailable  # type: ignore[attr-defined]
    stub.paged_stash_pop_kernel = _unavailable  # type: ignore[attr-defined]
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]  # type: ignore[attr-defined]
    sys.modules[PAGED_STASH_MODULE] = stub


def prepare_megatron_import() -> None:
    """Make ``import megatron.core`` work here and quiet its expected import warnings (idempotent)."""
    for pattern in _EXPECTED_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    _stub_paged_stash()
