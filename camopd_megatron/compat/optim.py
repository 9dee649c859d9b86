"""megatron-core 0.19.2 optimizer workarounds: torch-native Adam checkpointing, role-local param groups.

**DistributedOptimizer + torch-native Adam** (registry condition ``NO_FUSED_ADAM``). Without a fused
Adam (transformer-engine's, else apex's) ``megatron.core.optimizer.distrib_optimizer`` falls back to
``torch.optim.Adam(W)``, whose per-parameter state has a 0-d ``step`` tensor; a fused Adam keeps
``step`` in the param group instead. The 0.19.2 code paths for the torch-native case are broken in
four ways. These are upstream bugs of the torch-Adam path, not of the CPU: a GPU run without
TE/apex has them too, so they are keyed on megatron's Adam choice, not on CUDA.
:func:`patch_distopt_torch_adam` wraps the upstream methods, each wrapper as small as the problem:

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

(The one CUDA call of that checkpoint path, ``send_tensor.cuda()`` in the DP gather, is a no-CUDA
patch: :func:`camopd_megatron.compat.cuda.patch_distopt_dp_zero_gather`.)

**Param groups aligned within a role** (:func:`param_groups_aligned_over`, entered by
:func:`camopd_megatron.models.optimizer.build_ddp_and_optimizer` around ``get_megatron_optimizer``,
with CUDA or without): ``optimizer/__init__.py:363`` ``_get_param_groups`` aligns the param-group
keys of all ranks with a WORLD ``all_gather_object``. With one process-group collection per role
the other roles never join that gather (it hangs); alignment only has to hold inside the role (its
checkpoint), so the gather goes over the role's group.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["patch_distopt_torch_adam", "param_groups_aligned_over", "DISTOPT_MODULE", "OPTIMIZER_MODULE"]

DISTOPT_MODULE = "megatron.core.optimizer.distrib_optimizer"
OPTIMIZER_MODULE = "megatron.core.optimizer"


def _fix_state_dict_fresh(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Fix 1: a fresh torch-Adam optimizer has no per-param ``step``; report step 0."""

    @functools.wraps(orig)
    def state_dict(self: Any) -> dict:
        inner = self.optimizer
        if len(inner.state) > 0:
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

    return state_dict


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

    return _set_main_param_and_optimizer_states


def _fix_load_state_dict_shared_step(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Fix 3: one ``step`` tensor per param state after loading."""

    @functools.wraps(orig)
    def load_state_dict(self: Any, state_dict: dict) -> None:
        orig(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()

    return load_state_dict


def patch_distopt_torch_adam() -> None:
    """Wrap the DistributedOptimizer methods of fixes 1-4 (the wrapped originals stay reachable
    as ``__wrapped__``, which the tests call to show each upstream failure)."""
    cls = importlib.import_module(DISTOPT_MODULE).DistributedOptimizer
    cls.state_dict = _fix_state_dict_fresh(cls.state_dict)
    cls._set_main_param_and_optimizer_states = _fix_set_states(cls._set_main_param_and_optimizer_states)
    cls.load_state_dict = _fix_load_state_dict_shared_step(cls.load_state_dict)


class _RoleDistributed:
    """``torch.distributed`` as seen by ``megatron.core.optimizer`` while it builds param groups:
    group-less ``get_world_size`` / ``all_gather_object`` act on the role's group, not the world."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def get_world_size(self, group: Any = None) -> int:
        return dist.get_world_size(group if group is not None else self._group)

    def all_gather_object(self, object_list: list, obj: Any, group: Any = None) -> None:
        dist.all_gather_object(object_list, obj, group=group if group is not None else self._group)


class _RoleTorch:
    """Module-local ``torch`` for ``megatron.core.optimizer`` with :class:`_RoleDistributed`."""

    def __init__(self, real: Any, group: Any) -> None:
        self._real = real
        self.distributed = _RoleDistributed(group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def param_groups_aligned_over(group: Any) -> Iterator[None]:
    """While active, ``megatron.core.optimizer`` aligns param groups over ``group`` (the role's
    ranks) instead of the world. Swaps that module's global ``torch`` for the duration of the
    optimizer build (main thread only); restored on exit."""
    module = importlib.import_module(OPTIMIZER_MODULE)
    original = module.torch
    module.torch = _RoleTorch(original, group)
    try:
        yield
    finally:
        module.torch = original
