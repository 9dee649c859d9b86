"""The patch registry: every megatron patch, the condition it is keyed on, and :func:`install`.

Each :class:`Patch` names the upstream ``targets`` it replaces ("module:attribute.path", or
"logging:<logger>" for a log filter) and the :class:`Condition` under which the bug it fixes exists:

* ``NO_CUDA``: CUDA calls in megatron code that has no CPU path (:mod:`.cuda`);
* ``NO_FUSED_ADAM``: bugs of megatron's torch-native-Adam fallback, taken when neither
  transformer-engine nor apex provides a fused Adam (:mod:`.optim`), with CUDA or without;
* ``ALWAYS``: behaviour we change on every machine (:mod:`.logs`).

:func:`install` is called by :func:`camopd_megatron.distributed.init_distributed` (and by anything
that uses megatron without it, e.g. single-process tests). It applies each patch whose condition
holds, once per process. Importing megatron is the expensive part (seconds), so a process that
has not imported ``megatron.core`` yet is not made to: the patches are then applied right after
its first ``import megatron.core`` completes, before any of its classes are used. Either way
:func:`applied_patches` lists what was applied; nothing is patched before :func:`install`.
"""
from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.util
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from camopd_megatron.compat import cuda, logs, optim
from camopd_megatron.compat.imports import prepare_megatron_import

__all__ = ["Condition", "Facts", "Patch", "applied_patches", "detect_facts", "install", "patch_registry", "patches_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Facts:
    """What the patches are keyed on, for this process."""

    cuda: bool
    """``torch.cuda.is_available()``."""
    fused_adam: bool
    """megatron's DistributedOptimizer uses a fused Adam (TE's, else apex's), not ``torch.optim.Adam``."""


def detect_facts() -> Facts:
    """The facts of this process. ``fused_adam`` is megatron's own choice
    (``distrib_optimizer.HAVE_APEX_OR_TE``, made when it imports TE's or apex's FusedAdam): the bugs
    live in megatron's fallback path, and TE can be installed yet unusable (no CUDA), which
    :mod:`camopd_megatron.deps` (installed or not) cannot see. Imports megatron-core."""
    prepare_megatron_import()
    dist_opt = importlib.import_module(optim.DISTOPT_MODULE)
    return Facts(cuda=torch.cuda.is_available(), fused_adam=bool(dist_opt.HAVE_APEX_OR_TE))


class Condition(enum.Enum):
    """When a patch is needed."""

    NO_CUDA = "CUDA is not available"
    NO_FUSED_ADAM = "megatron uses torch.optim.Adam (no TE/apex fused Adam)"
    ALWAYS = "always"

    def holds(self, facts: Facts) -> bool:
        """True if the bug the patch fixes exists under ``facts``."""
        if self is Condition.NO_CUDA:
            return not facts.cuda
        if self is Condition.NO_FUSED_ADAM:
            return not facts.fused_adam
        return True


@dataclass(frozen=True)
class Patch:
    """One patch: ``name``, when it is needed, the upstream ``targets`` it replaces, the fix."""

    name: str
    condition: Condition
    targets: tuple[str, ...]
    apply: Callable[[], None]


def _torch_of(modules: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{m}:torch" for m in modules)


_DISTOPT = f"{optim.DISTOPT_MODULE}:DistributedOptimizer"

_PATCHES: tuple[Patch, ...] = (
    Patch("rng_tracker_on_cpu_generator", Condition.NO_CUDA,
          (f"{cuda.RNG_MODULE}:torch", f"{cuda.RNG_MODULE}:_get_cuda_rng_state",
           f"{cuda.RNG_MODULE}:_set_cuda_rng_state", f"logging:{cuda.RNG_MODULE}"), cuda.patch_rng_tracker),
    Patch("device_factories_model", Condition.NO_CUDA, _torch_of(cuda.DEVICE_MODULES), cuda.patch_device_factories),
    Patch("pipeline_schedules", Condition.NO_CUDA, _torch_of(cuda.PIPELINE_MODULES), cuda.patch_pipeline),
    Patch("ddp_and_optimizer_devices", Condition.NO_CUDA, _torch_of(cuda.DDP_OPTIM_MODULES),
          cuda.patch_ddp_and_optimizer),
    Patch("cuda_type_checks", Condition.NO_CUDA,
          ("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
           "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
           f"{_DISTOPT}._build_model_and_main_param_groups"), cuda.patch_type_checks),
    Patch("tied_embedding_tensor_cuda", Condition.NO_CUDA,
          ("megatron.core.models.common.language_module.language_module:"
           "LanguageModule.setup_embeddings_and_output_layer",), cuda.patch_tied_embedding_cuda),
    Patch("dist_checkpointing_devices", Condition.NO_CUDA, _torch_of(cuda.CKPT_MODULES), cuda.patch_dist_checkpointing),
    Patch("distopt_dp_zero_gather_cuda", Condition.NO_CUDA, (f"{_DISTOPT}.get_parameter_state_dp_zero",),
          cuda.patch_distopt_dp_zero_gather),
    Patch("moe_cuda_devices", Condition.NO_CUDA,
          _torch_of(cuda.MOE_MODULES) + (f"{cuda.MOE_MODULES[0]}:maybe_move_tensor_to_cpu",), cuda.patch_moe_devices),
    Patch("distopt_torch_adam_checkpoint", Condition.NO_FUSED_ADAM,
          (f"{_DISTOPT}.state_dict", f"{_DISTOPT}._set_main_param_and_optimizer_states", f"{_DISTOPT}.load_state_dict"),
          optim.patch_distopt_torch_adam),
    Patch("gpt_model_deprecation_logged_once", Condition.ALWAYS, (f"logging:{logs.GPT_MODEL_LOGGER}",),
          logs.log_gpt_deprecation_once),
)


def patch_registry() -> tuple[Patch, ...]:
    """Every patch, in application order."""
    return _PATCHES


def patches_for(facts: Facts) -> tuple[Patch, ...]:
    """The patches whose condition holds under ``facts``."""
    return tuple(p for p in _PATCHES if p.condition.holds(facts))


class _LayerState:
    """Process-wide (the patches are): whether :func:`install` ran, and what it applied."""

    installed = False
    applied: tuple[str, ...] = ()


def _apply() -> None:
    facts = detect_facts()
    applied = []
    for patch in patches_for(facts):
        patch.apply()
        applied.append(patch.name)
        _LayerState.applied = tuple(applied)
    logger.debug("camopd_megatron.compat: %s -> applied %s", facts, ", ".join(applied) or "nothing")


class _ApplyAfterExec(importlib.abc.Loader):
    """Runs ``megatron.core``'s own loader, then applies the layer."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of this wrapper
        self._loader.exec_module(module)
        _apply()


class _ApplyOnMegatronImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: finds ``megatron.core`` with the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Optional[Any] = None) -> Any:
        if fullname != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ApplyAfterExec(spec.loader)
        return spec


def install() -> None:
    """Apply every patch whose condition holds in this process (idempotent).

    Applied now when ``megatron.core`` is imported already, else right after its first import."""
    if _LayerState.installed:
        return
    _LayerState.installed = True
    prepare_megatron_import()
    if "megatron.core" in sys.modules:
        _apply()
    else:
        sys.meta_path.insert(0, _ApplyOnMegatronImport())


def applied_patches() -> tuple[str, ...]:
    """Names of the patches applied in this process (empty before :func:`install`, and until
    ``megatron.core`` is imported)."""
    return _LayerState.applied
