"""megatron-core 0.19.2 on this project's machines: one compatibility layer, applied once.

* :func:`prepare_megatron_import` (:mod:`.imports`) is the only part that runs at import time
  (``camopd_megatron/__init__.py`` calls it): ``import megatron.core`` then works without triton,
  and megatron's warnings about optional packages are quiet. It patches nothing.
* :func:`install` (:mod:`.registry`) applies the patches, once per process; it is called by
  :func:`camopd_megatron.distributed.init_distributed`, and by whatever uses megatron without it
  (single-process tests). Each patch is keyed on the condition its bug depends on:
  no CUDA (:mod:`.cuda`, built on the CPU stand-ins of :mod:`.cpu_torch`), megatron's
  torch-native-Adam fallback when TE/apex are absent (:mod:`.optim`), or always (:mod:`.logs`).
  :func:`patch_registry` lists them, :func:`applied_patches` says what this process applied;
  ``tests/test_cpu_compat.py`` runs each one on the real upstream code path it exists for.
* :func:`param_groups_aligned_over` (:mod:`.optim`) is the one scoped workaround: entered around
  megatron's optimizer build so that it aligns param groups within a role, not over the world.

docs/architecture.md ("CPU compatibility layer") explains the layer in the project's context.
"""
from __future__ import annotations

import importlib
from typing import Any

from camopd_megatron.compat.imports import prepare_megatron_import

__all__ = [
    "prepare_megatron_import", "install", "applied_patches", "patch_registry", "patches_for", "detect_facts",
    "Condition", "Facts", "Patch", "param_groups_aligned_over",
]

_LAZY = {
    "install": "registry", "applied_patches": "registry", "patch_registry": "registry", "patches_for": "registry",
    "detect_facts": "registry", "Condition": "registry", "Facts": "registry", "Patch": "registry",
    "param_groups_aligned_over": "optim",
}


def __getattr__(name: str) -> Any:
    """The patch modules import torch: loaded on first use so that ``import camopd_megatron``
    (which runs :func:`prepare_megatron_import`) stays light."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"camopd_megatron.compat.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
