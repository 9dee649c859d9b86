"""Checkpointing of a role's optimizer state (dist_checkpointing), for the optimizers of
:mod:`camopd_megatron.models.optimizer`.

    sharded = optimizer_sharded_state_dict(optimizer, model_sharded_sd, is_loading=False, pg_collection=pgc)
    ...  # dist_checkpointing.save / load, then
    load_optimizer_state(optimizer, loaded)

The DistributedOptimizer uses the ``fully_reshardable`` format; the torch-native-Adam fixes this relies on
live in :mod:`camopd_megatron.compat.optim`. Plain ("common") items become role-owned objects
(:func:`shard_common_state`: dist_checkpointing writes common items only from global rank 0, which a role
at rank_offset > 0 does not hold). Per-branch Adam moments (``optim.branch_state: per_branch``) are saved
under ``branch_moments.<branch>.`` keys, and the manifest records the layout (:func:`branch_state_record`).
An MoE model's optimizer state is saved in one layout at every expert-parallel size (megatron chains a
dense and an expert optimizer only at EP > 1), so it reshards across EP like the weights
(:func:`_ep_independent_common`).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection

from camopd_megatron.models.optimizer import _MOE_TAG, DISTOPT_SHARDING_TYPE, BranchMoments, _role_group

logger = logging.getLogger(__name__)

__all__ = [
    "MOMENTS_PREFIX",
    "optimizer_sharded_state_dict",
    "load_optimizer_state",
    "branch_state_record",
    "branch_state_mismatch",
    "shard_common_state",
]


MOMENTS_PREFIX = "branch_moments."
"""Checkpoint key prefix of a branch's optimizer state (``branch_moments.<branch>.``)."""


def branch_state_record(moments: Optional[BranchMoments]) -> dict[str, Any]:
    """What a checkpoint's manifest records about the optimizer state's layout."""
    if moments is None:
        return {"mode": "shared"}
    return {"mode": "per_branch", "branches": list(moments.branches)}


def branch_state_mismatch(saved: Optional[dict[str, Any]], moments: Optional[BranchMoments]) -> Optional[str]:
    """Why a checkpoint's optimizer state (``saved``: its :func:`branch_state_record`; None for a
    checkpoint from before the record = shared) cannot be loaded with ``moments``; None if it can."""
    saved = saved or {"mode": "shared"}
    now = branch_state_record(moments)
    if saved == now:
        return None
    return (f"its optimizer state is {saved} but the config asks for {now} (optim.branch_state and the "
            "scheduled branches); resume with the checkpoint's optim.branch_state and branches, or start a "
            "new run (checkpoint.resume: never)")


def optimizer_sharded_state_dict(
    optimizer: MegatronOptimizer,
    model_sharded_sd: dict,
    *,
    is_loading: bool,
    pg_collection: ProcessGroupCollection,
    moments: Optional[BranchMoments] = None,
) -> dict:
    """The optimizer's dist_checkpointing sharded state dict (to save, or as the load template).

    ``model_sharded_sd`` must be the sharded state dict of the SAME (DDP-wrapped) model chunks,
    built with ``metadata={"dp_cp_group": pg_collection.dp_cp}``: the optimizer state tensors reuse
    its keys, shapes and replica ids. After ``dist_checkpointing.load`` pass the loaded dict to
    :func:`load_optimizer_state`. Works for the plain and the distributed optimizer (format
    :data:`DISTOPT_SHARDING_TYPE`); the role's dp_cp group is passed explicitly so nothing falls
    back to megatron's global data-parallel group.

    With ``moments`` (per-branch Adam state): ``{branch: that branch's optimizer state dict}``, every
    key prefixed ``branch_moments.<branch>.``, each built exactly like the shared one (so each
    reshards like it). With the distributed optimizer every branch also carries the fp32 main params
    (megatron's format has them next to the moments): identical copies.
    """
    if moments is None:
        return _sharded_optimizer_state(optimizer, model_sharded_sd, is_loading, pg_collection, "optimizer.common")
    out: dict[str, Any] = {}
    was = moments.active
    try:
        for branch in moments.branches:
            moments.use(branch)
            prefix = f"{MOMENTS_PREFIX}{branch}."
            out[branch] = _sharded_optimizer_state(optimizer, model_sharded_sd, is_loading, pg_collection,
                                                   f"{prefix}common", key_prefix=prefix)
    finally:
        moments.use(was)
    return out


def load_optimizer_state(optimizer: MegatronOptimizer, loaded: dict, moments: Optional[BranchMoments] = None) -> None:
    """Load what ``dist_checkpointing.load`` returned for :func:`optimizer_sharded_state_dict`."""
    if moments is None:
        optimizer.load_state_dict(_resolve_repeats(loaded))
        return
    was = moments.active
    try:
        for branch in moments.branches:
            moments.use(branch)
            # replaces the live state object: use() parks the new one
            optimizer.load_state_dict(_resolve_repeats(loaded[branch]))
    finally:
        moments.use(was)


def _sharded_optimizer_state(optimizer: MegatronOptimizer, model_sharded_sd: dict, is_loading: bool,
                             pg_collection: ProcessGroupCollection, common_key: str, key_prefix: str = "") -> dict:
    metadata = {"distrib_optim_sharding_type": DISTOPT_SHARDING_TYPE, "dp_cp_group": pg_collection.dp_cp}
    moe = _has_experts(optimizer)
    if moe:  # no ``chained_<i>.`` prefix: the state tensors keep the model's (EP-independent) keys
        metadata["chained_optim_avoid_prefix"] = True
    sharded = optimizer.sharded_state_dict(model_sharded_sd, is_loading=is_loading, metadata=metadata)
    _always_common_step(sharded)
    if moe:
        _ep_independent_common(sharded, common_key, _role_group(pg_collection))
    if key_prefix:
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        add_prefix_for_sharding(sharded, key_prefix)
    return shard_common_state(sharded, key_prefix=common_key, group=_role_group(pg_collection))




def _has_experts(optimizer: MegatronOptimizer) -> bool:
    """Whether the optimizer's model chunks are MoE models (their optimizer state uses the EP-independent
    layout of :func:`_ep_independent_common`)."""
    return bool(getattr(optimizer, _MOE_TAG, False))


_LAYOUT_FIELDS = ("is_expert_parallel",)
"""Param-group fields that describe megatron's optimizer split, not the run: kept as built, never loaded."""


class _SameAs:
    """The loaded value of an optimizer state item that another item of the same checkpoint key holds
    (:func:`_ep_independent_common`): ``path`` from the root of the optimizer's state dict."""

    def __init__(self, path: tuple) -> None:
        self.path = path


def _resolve_repeats(loaded: Any) -> Any:
    """Replace every :class:`_SameAs` in ``loaded`` (what ``dist_checkpointing.load`` returned for one
    optimizer state dict) by the loaded value it names, in place; returns ``loaded``."""

    def at(path: tuple) -> Any:
        node = loaded
        for step in path:
            node = node[step]
        return node

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in list(items):
            if isinstance(v, _SameAs):
                node[k] = at(v.path)
            else:
                walk(v)

    walk(loaded)
    return loaded


def _same_value(a: Any, b: Any) -> bool:
    """Whether two optimizer state items (numbers, tensors, tuples of them) hold the same value."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def _ep_independent_common(sharded: Any, common_key: str, group: Any) -> None:
    """Give an MoE optimizer's plain (non-distributed) state the same checkpoint keys at every EP size.

    megatron-core 0.19.2 splits an MoE model's parameters into a dense and an expert-parallel optimizer
    (a ChainedOptimizer of two, state ``{0: dense, 1: expert}``) only at EP > 1: expert parameters are
    marked ``allreduce=False`` there; at EP = 1 they join the dense param groups of one optimizer. The
    state tensors already carry the model's keys (no ``chained_<i>.`` prefix, ``chained_optim_avoid_prefix``),
    which reshard across EP like the weights. The rest is made layout-free here, in place:

    * ``state.common_step`` (torch Adam's per-parameter step, one value per optimizer; the ChainedOptimizer
      synchronises it across its parts before saving) is one key, ``<common_key>.state.common_step``;
    * each param group's fields are keyed by the group's configuration (``wd_mult``, ``lr_mult``,
      ``is_decoupled_lr``), not by its position: at EP = 1 the experts' weights share the dense
      weights' group, at EP > 1 the expert optimizer has a group of the same configuration;
      ``is_expert_parallel`` (and ``params``) stay as built.

    A key met again on this rank (the expert part's step and its groups of a configuration the dense part
    also has: EP > 1 only) is the same state: it is not saved (a different value is logged) and, loading,
    takes the value the first item of its key loads (:class:`_SameAs`, resolved by
    :func:`load_optimizer_state`). So a save at any EP holds exactly the keys a load at any EP asks for.

    The distributed optimizer's parts (``{"optimizer": {"param_groups"}, "param_state", ...}``, its step
    in every param group) get the same param-group keys; its other plain items (the sharding type) one key
    each. Its ``fully_reshardable`` param state already carries the model's keys.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    chained = bool(sharded) and all(isinstance(k, int) for k in sharded)
    parts = [((i,), part) for i, part in sharded.items()] if chained else [((), sharded)]
    rank = dist.get_rank(group)
    first: dict[str, tuple[tuple, Any]] = {}  # key -> (path from the root, value) of its first item

    def owned(key: str, value: Any, path: tuple) -> Any:
        # the role's rank 0 writes each key, once: a repeat never becomes a second object of one key on one
        # rank (the loader refuses that)
        if key not in first:
            first[key] = (path, value)
            return ShardedObject(key, value, (1,), (0,), replica_id=(rank, 0))
        if not _same_value(first[key][1], value):
            logger.warning("optimizer state %s differs between the parts of the chained optimizer (%r, %r): the "
                           "checkpoint keeps the first", key, first[key][1], value)
        return LocalNonpersistentObject(_SameAs(first[key][0]))

    for root, part in parts:
        if "param_state" in part:  # distributed optimizer: {optimizer: {param_groups}, param_state, ...}
            groups, groups_path = part["optimizer"]["param_groups"], (*root, "optimizer", "param_groups")
            for field in [f for f in part if f not in ("optimizer", "param_state")]:  # sharding type, grad scaler
                part[field] = owned(f"{common_key}.{field}", part[field], (*root, field))
        else:  # plain optimizer: {state: {..., common_step}, param_groups}
            groups, groups_path = part["param_groups"], (*root, "param_groups")
            if "common_step" in part["state"]:
                part["state"]["common_step"] = owned(f"{common_key}.state.common_step", part["state"]["common_step"],
                                                     (*root, "state", "common_step"))
        for gi, g in enumerate(groups):
            sig = "wd{}_lr{}_{}".format(g.get("wd_mult", 1.0), g.get("lr_mult", 1.0),
                                        "decoupled" if g.get("is_decoupled_lr") else "shared")
            for field, value in list(g.items()):
                if field == "params":
                    continue
                if field in _LAYOUT_FIELDS:
                    g[field] = LocalNonpersistentObject(value)
                else:
                    g[field] = owned(f"{common_key}.param_groups.{sig}.{field}", value, (*groups_path, gi, field))


def _always_common_step(sharded: Any) -> None:
    """Non-distributed optimizer (FP32Optimizer format ``{"state", "param_groups"}``, possibly
    chained as ``{idx: ...}``): torch Adam's per-param ``step`` is saved as ``state.common_step``
    only when some param has a step, and a load template (built by ``init_state_fn``, which sets
    no step) never asks for it; before, megatron got it back from the rank-0 common state, which
    :func:`shard_common_state` replaces. Always include it (0 = no update yet) so the saved entry
    and the template's request match."""
    if isinstance(sharded, dict) and "state" in sharded and "param_groups" in sharded:
        if isinstance(sharded["state"], dict) and "common_step" not in sharded["state"]:
            sharded["state"]["common_step"] = torch.tensor(0.0)
    elif isinstance(sharded, dict) and sharded and all(isinstance(k, int) for k in sharded):
        for value in sharded.values():  # ChainedOptimizer with several optimizers
            _always_common_step(value)


def shard_common_state(tree: Any, *, key_prefix: str, group: Any) -> Any:
    """Turn the plain ("common") items of a sharded state dict into role-owned ShardedObjects.

    Why: ``dist_checkpointing.save`` writes common (non-sharded) items only from GLOBAL rank 0,
    and loads them from there. When the saving role does not contain rank 0 (a role at
    rank_offset > 0, other roles joining the save with ``{}``), megatron's optimizer param groups,
    ``step``, the distopt sharding type, an lr-schedule state... would be silently dropped. Each
    maximal subtree without sharded items becomes one ``ShardedObject`` (key
    ``<key_prefix>.<path>``) whose main replica is rank 0 of ``group`` (the role); after
    ``dist_checkpointing.load`` the loaded dict has the original structure and values.
    Sharded items (ShardedTensor/Object/Factory) and LocalNonpersistentObject stay as they are.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject

    replica = dist.get_rank(group)

    def has_sharded(node: Any) -> bool:
        if isinstance(node, (ShardedBase, LocalNonpersistentObject)):
            return True
        if isinstance(node, dict):
            return any(has_sharded(v) for v in node.values())
        if isinstance(node, (list, tuple)):
            return any(has_sharded(v) for v in node)
        return False

    def wrap(node: Any, path: str) -> Any:
        if not has_sharded(node):
            return ShardedObject(f"{key_prefix}.{path}" if path else key_prefix, node, (1,), (0,), replica_id=replica)
        if isinstance(node, dict):
            return {k: wrap(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(wrap(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node))
        return node

    return wrap(tree, "")
