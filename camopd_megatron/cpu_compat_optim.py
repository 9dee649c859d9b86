"""DistributedOptimizer checkpointing with torch-native Adam (megatron-core 0.19.2).

Without TE/apex (always on CPU) ``megatron.core.optimizer.distrib_optimizer`` falls back to
``torch.optim.Adam(W)``, whose per-parameter state has a 0-d ``step`` tensor; TE/apex FusedAdam
keeps ``step`` in the param group instead. The 0.19.2 code paths for the torch-native case are
broken in four ways (MCORE_CPU_NOTES.md §G, upstream bugs, not CPU-specific), and the gather used by
the ``fully_reshardable`` format has one CUDA call. :func:`apply` wraps the upstream methods, each
wrapper as small as the problem:

1. ``state_dict()`` asserts ONE common per-param ``step`` over ``optimizer.state``; on a fresh
   optimizer (exactly the state in which ``sharded_state_dict(is_loading=True)`` builds the load
   template) the set is empty -> AssertionError. Fix: a fresh optimizer reports step 0.
2. ``_set_main_param_and_optimizer_states`` copies every tensor of the param's optimizer state,
   including ``step``, from the loaded tensors, which never carry ``step`` (it is restored from the
   param groups) -> KeyError 'step'. Fix: the loaded dict gets a non-tensor ``step`` placeholder,
   which upstream already skips.
3. ``load_state_dict()`` gives every param state the SAME ``step`` tensor; torch Adam increments
   ``step`` in place once per param, so after a resume the shared counter advances N times per
   update (wrong bias correction; resumed losses drift). Fix: give each param its own copy.
4. ``dp_reshardable``: the load copies into fp32 main-param shards (views of a leaf that requires
   grad in some layouts) outside ``no_grad`` ("a view of a leaf Variable ... in-place"), and the
   per-bucket padding entries are built for every tensor state including the 0-d ``step``. Fix:
   run ``_set_main_param_and_optimizer_states`` under ``torch.no_grad()``; the 0-d ``step`` is
   handled by 2 (placeholder) and left out of the copied tensors.
5. (CPU) ``get_parameter_state_dp_zero`` (used by ``fully_reshardable``) moves the gather buffers
   with ``send_tensor.cuda()``: run it with ``Tensor.cuda`` as the identity.

Applied by :mod:`camopd_megatron.cpu_compat` (patch ``distopt_torch_adam_checkpoint``), which only
patches without CUDA; on a GPU machine without TE/apex the same upstream bugs remain (known gap).
Idempotent.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

_DISTOPT_MODULE = "megatron.core.optimizer.distrib_optimizer"
_MARK = "_camopd_distopt_fix"


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _MARK, True)
    return fn


def _is_patched(fn: Any) -> bool:
    return bool(getattr(fn, _MARK, False))


def _fix_state_dict_fresh(orig: Callable[..., Any], uses_torch_adam: Callable[[], bool]) -> Callable[..., Any]:
    """Fix 1: a fresh torch-Adam optimizer has no per-param ``step``; report step 0."""

    @functools.wraps(orig)
    def state_dict(self: Any) -> dict:
        inner = self.optimizer
        if not uses_torch_adam() or len(inner.state) > 0:
            return orig(self)
        real_state_dict = inner.state_dict

        def with_step_zero() -> dict:
            sd = real_state_dict()
            sd["state"] = {0: {"step": torch.tensor(0.0)}}  # read only for its 'step'
            return sd

        inner.state_dict = with_step_zero  # instance attribute shadows the method for this call
        try:
            return orig(self)
        finally:
            del inner.state_dict

    return _mark(state_dict)


def _fix_set_states(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Fixes 2 and 4: ``step`` placeholder (upstream skips non-tensors) and ``no_grad`` copies."""

    @functools.wraps(orig)
    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: dict) -> None:
        tensors = dict(tensors)
        step = tensors.get("step")
        if not isinstance(step, torch.Tensor) or step.dim() == 0:
            # the loaded 'step' is either absent or the 0-d local counter (dp_reshardable keeps it
            # as a LocalNonpersistentObject); the real value comes from the param groups (fix 3)
            tensors["step"] = None
        with torch.no_grad():
            orig(self, model_param, tensors)

    return _mark(_set_main_param_and_optimizer_states)


def _fix_load_state_dict_shared_step(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Fix 3: one ``step`` tensor per param state after loading."""

    @functools.wraps(orig)
    def load_state_dict(self: Any, state_dict: dict) -> None:
        orig(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()

    return _mark(load_state_dict)


def _fix_dp_zero_cuda(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Fix 5 (CPU): ``send_tensor.cuda()`` in the DP gather runs as the identity."""
    from camopd_megatron.cpu_compat import _with_cuda_like_tensors

    return _mark(_with_cuda_like_tensors(orig))


def apply() -> None:
    """Apply the DistributedOptimizer checkpoint fixes (idempotent)."""
    dist_opt = importlib.import_module(_DISTOPT_MODULE)
    cls = dist_opt.DistributedOptimizer

    def uses_torch_adam() -> bool:
        # read at call time: the module decides at import whether TE/apex Adam exists
        return not dist_opt.HAVE_APEX_OR_TE

    if not _is_patched(cls.state_dict):
        cls.state_dict = _fix_state_dict_fresh(cls.state_dict, uses_torch_adam)
    if not _is_patched(cls._set_main_param_and_optimizer_states):
        cls._set_main_param_and_optimizer_states = _fix_set_states(cls._set_main_param_and_optimizer_states)
    if not _is_patched(cls.load_state_dict):
        cls.load_state_dict = _fix_load_state_dict_shared_step(cls.load_state_dict)
    if not _is_patched(cls.get_parameter_state_dp_zero):
        cls.get_parameter_state_dp_zero = _fix_dp_zero_cuda(cls.get_parameter_state_dp_zero)
    logger.debug("cpu_compat_optim: DistributedOptimizer checkpoint fixes applied")
