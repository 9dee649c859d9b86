"""megatron-core DDP + optimizer for one role, with explicit process groups (no global state).

    ddp_chunks, optimizer, lr_scheduler = build_ddp_and_optimizer(
        model_chunks, cfg.optim, cfg.parallel, pg_collection, total_steps=cfg.run.steps)
    ...  # forward/backward (megatron schedule or own loop), then
    ok, grad_norm, num_zeros = optimizer_step(optimizer, lr_scheduler)
    zero_grad_buffers(ddp_chunks, optimizer)

Gradient normalisation (the important numerics contract):
    Our loss is already divided by the GLOBAL kept-token count (all DP ranks, all micro-batches),
    so every rank's gradient is a partial sum of the global mean. Data-parallel reduction must
    therefore be a plain SUM. megatron's DDP averages (pre-scales by 1/dp) unless the model config
    has ``calculate_per_token_loss=True``; we set it, keep ``average_in_collective=False`` (SUM
    collective), and install a ``finalize_model_grads_func`` that never divides by the token count
    (megatron would divide by the loss function's ``num_tokens`` otherwise). Consequence for a
    megatron pipeline schedule: the loss function must return the 3-tuple
    ``(loss, num_tokens, report)``; with ``calculate_per_token_loss=True`` the schedule then
    neither divides by ``num_tokens`` nor by the number of micro-batches.

Process groups: DDP and ``get_megatron_optimizer`` get the role's ``pg_collection`` (with the
dp/expt_dp/mp/tp_ep_pp/intra_dist_opt fields; ``simple_pg_collection`` sets them) and
``use_gloo_process_groups=False`` (megatron refuses gloo side groups with a collection).
``get_megatron_optimizer`` aligns parameter groups with ONE ``all_gather_object`` over the whole
WORLD (optimizer/__init__.py ``_get_param_groups``), which would hang when only one role builds an
optimizer; :func:`build_ddp_and_optimizer` redirects that gather to the role's own ranks
(:func:`camopd_megatron.compat.param_groups_aligned_over`).

Optimizer state checkpointing (its sharded state dict, the per-branch moments' keys, the layout that
reshards across EP) lives in :mod:`camopd_megatron.models.optimizer_state`.

Per-branch Adam moments (``optim.branch_state: per_branch``, :class:`BranchMoments`): one megatron
optimizer, whose inner optimizer's state object (param → exp_avg, exp_avg_sq, step) is swapped by
pointer before each step for the state of the step's branch. Parameters, fp32 main params, grads
and param groups stay shared; nothing is copied.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.process_groups_config import ProcessGroupCollection

from camopd_megatron.compat.optim import param_groups_aligned_over
from camopd_megatron.config.sections import OptimConfig, ParallelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LRScheduler",
    "FinalizeGradsSum",
    "build_ddp_and_optimizer",
    "optimizer_step",
    "use_fused_cpu_adam",
    "zero_grad_buffers",
    "whole_gradients",
    "BranchMoments",
    "DISTOPT_SHARDING_TYPE",
]

DISTOPT_SHARDING_TYPE = "fully_reshardable"
"""DistributedOptimizer checkpoint format: reshardable across TP/PP/DP (the default
``fully_sharded_model_space`` raises "flattened_range is not supported" in 0.19.2)."""

_SCHEDULES = ("constant", "cosine", "linear")


_MOE_TAG = "camopd_moe_state"
"""Attribute :func:`build_ddp_and_optimizer` sets on the optimizer: True for an MoE model's."""


class LRScheduler:
    """Learning rate per optimizer step: linear warmup, then constant / cosine / linear decay.

    Step ``k`` (0-based, the k-th optimizer update) uses
      * warmup (``k < warmup_steps``): ``lr * (k + 1) / warmup_steps`` (the first update is not
        wasted at lr 0, the last warmup update is at full lr);
      * then ``progress = (k - warmup) / (total_steps - warmup)`` in [0, 1) and
        constant: ``lr``; linear: ``min_lr + (lr - min_lr) * (1 - progress)``;
        cosine: ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``; past ``total_steps``: ``min_lr``.
    Each megatron param group carries ``max_lr``/``min_lr`` (decoupled LRs) and ``wd_mult`` (0 for
    biases and norms); the schedule is applied per group and the group's weight decay is set to
    ``weight_decay * wd_mult`` (megatron's own Adam is built with one weight decay for every group,
    it relies on the scheduler for the no-decay groups).
    """

    def __init__(self, optimizer: Any, optim_cfg: OptimConfig, total_steps: int) -> None:
        if optim_cfg.lr_schedule not in _SCHEDULES:
            raise ValueError(
                f"optim.lr_schedule={optim_cfg.lr_schedule!r} is not supported; use one of {', '.join(_SCHEDULES)}"
            )
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1 (set run.steps to a positive number)")
        if optim_cfg.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={optim_cfg.warmup_steps} must be >= 0")
        self.optimizer = optimizer
        self.lr = float(optim_cfg.lr)
        self.min_lr = float(optim_cfg.min_lr)
        self.style = optim_cfg.lr_schedule
        self.warmup_steps = int(optim_cfg.warmup_steps)
        self.total_steps = int(total_steps)
        self.weight_decay = float(optim_cfg.weight_decay)
        self.num_steps = 0
        self._apply()

    def lr_at(self, step: int, max_lr: Optional[float] = None, min_lr: Optional[float] = None) -> float:
        """The learning rate of the ``step``-th update (0-based) for a group with these bounds."""
        hi = self.lr if max_lr is None else float(max_lr)
        lo = self.min_lr if min_lr is None else float(min_lr)
        if step < self.warmup_steps:
            return hi * (step + 1) / self.warmup_steps
        if self.style == "constant":
            return hi
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / decay_steps
        if progress >= 1.0:
            return lo
        coeff = 1.0 - progress if self.style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return lo + (hi - lo) * coeff

    def get_lr(self) -> float:
        """The learning rate the next update uses (default group bounds)."""
        return self.lr_at(self.num_steps)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            lr = self.lr_at(self.num_steps, group.get("max_lr"), group.get("min_lr")) * group.get("lr_mult", 1.0)
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def step(self) -> None:
        """Advance by one completed update and set the next update's lr on every param group."""
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (plain Python values: store it as a common/non-sharded checkpoint item)."""
        return {
            "num_steps": self.num_steps, "lr": self.lr, "min_lr": self.min_lr, "style": self.style,
            "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the step count; the schedule shape comes from the current config (a changed
        schedule is logged, not an error, so a run can be extended or re-tuned on resume)."""
        current = {"lr": self.lr, "min_lr": self.min_lr, "style": self.style,
                   "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
        changed = {k: (state[k], v) for k, v in current.items() if k in state and state[k] != v}
        if changed:
            logger.warning("lr schedule differs from the checkpoint's (checkpoint, now): %s", changed)
        self.num_steps = int(state["num_steps"])
        self._apply()


class FinalizeGradsSum:
    """``config.finalize_model_grads_func`` for a role: megatron's ``finalize_model_grads`` on the
    role's groups (DP reduce / reduce-scatter, SP norm grads over TP, tied-embedding grads over the
    first+last pipeline stages), never dividing by the schedule's token count (our loss is already
    normalised by the global count; see the module docstring)."""

    def __init__(self, pg_collection: ProcessGroupCollection) -> None:
        self.pg_collection = pg_collection
        self.force_all_reduce = False
        """Set by :func:`whole_gradients`: all-reduce even under the distributed optimizer."""

    def __call__(
        self,
        model: list[torch.nn.Module],
        num_tokens: Optional[torch.Tensor] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        force_all_reduce: Optional[bool] = False,
    ) -> None:
        # num_tokens (and the schedule's pg_collection, which may be a global-state fallback) are
        # ignored on purpose: the role's own groups and a plain sum.
        finalize_model_grads(model, None, pg_collection=self.pg_collection,
                             force_all_reduce=bool(force_all_reduce or self.force_all_reduce))


@contextlib.contextmanager
def whole_gradients(ddp_chunks: Sequence[DistributedDataParallel]) -> Iterator[None]:
    """Backward passes inside leave every rank the whole DP-reduced gradient in ``main_grad``.

    The distributed optimizer reduce-scatters: after a backward, each DP rank's grad buffer holds only
    its own shard reduced, the rest is that rank's local part. Readers of whole gradients (the
    branch-conflict and coherence probes) need megatron's ``force_all_reduce`` instead, both in the
    overlapped bucket hooks (``DistributedDataParallel.force_all_reduce``) and in the final sync
    (:class:`FinalizeGradsSum`). Without the distributed optimizer this changes nothing.
    """
    finalize = ddp_chunks[0].config.finalize_model_grads_func if ddp_chunks else None
    if not isinstance(finalize, FinalizeGradsSum):
        raise ValueError("whole_gradients: the chunks were not built by build_ddp_and_optimizer "
                         "(config.finalize_model_grads_func is not FinalizeGradsSum)")
    # megatron logs one INFO line per bucket group and reduction when all-reduce is forced
    buffer_log = logging.getLogger("megatron.core.distributed.param_and_grad_buffer")
    level = buffer_log.level
    buffer_log.setLevel(max(level, logging.WARNING))
    finalize.force_all_reduce = True
    for chunk in ddp_chunks:
        chunk.force_all_reduce = True
    try:
        yield
    finally:
        finalize.force_all_reduce = False
        for chunk in ddp_chunks:
            chunk.force_all_reduce = False
        buffer_log.setLevel(level)


def _role_group(pg_collection: ProcessGroupCollection) -> Any:
    """All ranks of the role: ``intra_dist_opt`` (tp×cp×ep×pp×dp in ``simple_pg_collection``)."""
    group = getattr(pg_collection, "intra_dist_opt", None)
    if group is None:
        raise ValueError(
            "pg_collection.intra_dist_opt is None: it must be the group of all the role's ranks "
            "(build the collection with camopd_megatron.models.groups.simple_pg_collection)"
        )
    return group


def _check_collection(pg_collection: ProcessGroupCollection) -> None:
    """megatron reads these fields with ``vars()``: missing ones raise deep inside DDP/optimizer."""
    missing = [f for f in ("tp", "pp", "dp", "dp_cp", "expt_dp", "mp", "tp_ep_pp", "intra_dist_opt",
                           "embd", "pos_embd") if f not in vars(pg_collection)]
    if missing:
        raise ValueError(
            f"pg_collection lacks {missing}; megatron DDP/optimizer need them set (None where unused): "
            "build it with camopd_megatron.models.groups.simple_pg_collection"
        )


def _ddp_bucket_size(ddp_config: DistributedDataParallelConfig, pg_collection: ProcessGroupCollection,
                     first_chunk: bool) -> Optional[int]:
    """The bucket size megatron's DDP uses for a chunk (mirrors ``DistributedDataParallel.__init__``):
    one bucket per buffer (None) without ``overlap_grad_reduce``, on pipeline stages after the first
    and for chunks after the first; otherwise ``bucket_size`` or max(40M, 1M x DP)."""
    if not ddp_config.overlap_grad_reduce or not first_chunk or dist.get_rank(pg_collection.pp) > 0:
        return None
    return ddp_config.bucket_size or max(40_000_000, 1_000_000 * pg_collection.dp.size())


def _distopt_layout(chunk: torch.nn.Module, ddp_config: DistributedDataParallelConfig,
                    pg_collection: ProcessGroupCollection, first_chunk: bool) -> Any:
    """The DistributedOptimizer's buffer layout, precomputed as megatron asks callers to (DDP
    otherwise computes the same layout itself and warns), with the bucket size DDP will use
    (:func:`_ddp_bucket_size`). None without the distributed optimizer."""
    if not ddp_config.use_distributed_optimizer:
        return None
    params = [p for _, p in chunk.named_parameters() if p.requires_grad]  # DDP's order
    return DistributedOptimizer.compute_full_param_layout(
        params, _ddp_bucket_size(ddp_config, pg_collection, first_chunk), pg_collection.dp_cp.size(), ddp_config,
        expert_data_parallel_world_size=pg_collection.expt_dp.size(),
    )


def build_ddp_and_optimizer(
    model_chunks: Sequence[torch.nn.Module],
    optim_cfg: OptimConfig,
    parallel_cfg: ParallelConfig,
    pg_collection: ProcessGroupCollection,
    *,
    total_steps: int,
) -> tuple[list[DistributedDataParallel], MegatronOptimizer, LRScheduler]:
    """Wrap the role's model chunks in megatron DDP and build megatron's Adam(W) + the lr schedule.

    Collective over the ROLE's ranks (not the world). Mutates the chunks' shared TransformerConfig:
    ``calculate_per_token_loss=True`` (SUM over DP, see the module docstring),
    ``finalize_model_grads_func`` (:class:`FinalizeGradsSum`) and ``no_sync_func``.

    Args:
        model_chunks: the role's GPTModel chunk(s) (several only with virtual pipeline stages).
        optim_cfg: lr, min_lr, schedule, warmup, weight decay, Adam betas/eps, clip_grad (0 = off).
        parallel_cfg: ``use_distributed_optimizer`` (shard optimizer state over DP), ``overlap_grad_reduce``,
            ``overlap_param_gather`` (needs the distributed optimizer) and ``bucket_size``.
        pg_collection: the role's process groups (``simple_pg_collection``).
        total_steps: number of optimizer steps of the run (the decay horizon of the lr schedule).

    Returns:
        ``(ddp_chunks, optimizer, lr_scheduler)``; the lr of the first update is already set.
    """
    if not model_chunks:
        raise ValueError("build_ddp_and_optimizer: model_chunks is empty; pass the role's model chunk(s)")
    _check_collection(pg_collection)
    config = model_chunks[0].config
    # SUM over DP: DDP pre-scales by 1/dp unless calculate_per_token_loss (distributed_data_parallel.py
    # "Compute gradient scaling factors"); average_in_collective must stay False with it.
    config.calculate_per_token_loss = True
    if parallel_cfg.overlap_param_gather and not parallel_cfg.use_distributed_optimizer:
        raise ValueError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
                         "(only the distributed optimizer gathers parameters); enable it or turn the overlap off")
    # Overlap: megatron's DDP dispatches a bucket's async reduce(-scatter) from the backward hooks of the
    # last micro-batch once all its gradients are in (finish_grad_sync waits; the very first step reduces
    # at the end, it records which gradients a bucket gets); with overlap_param_gather the optimizer step
    # leaves the gathers to the forward pre-hooks (models.gpt.run_forward_pre_hooks for direct readers).
    # Non-interleaved schedules need no grad_sync_func/param_sync_func: the hooks do both.
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        average_in_collective=False,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        bucket_size=parallel_cfg.bucket_size,
    )
    ddp_chunks = [
        DistributedDataParallel(
            config,
            ddp_config,
            chunk,
            # megatron: bucketing only for the first chunk of an interleaved pipeline
            disable_bucketing=i > 0,
            pg_collection=pg_collection,
            full_param_layout=_distopt_layout(chunk, ddp_config, pg_collection, first_chunk=i == 0),
        )
        for i, chunk in enumerate(model_chunks)
    ]
    config.finalize_model_grads_func = FinalizeGradsSum(pg_collection)
    config.no_sync_func = (
        ddp_chunks[0].no_sync if len(ddp_chunks) == 1 else [c.no_sync for c in ddp_chunks]
    )
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        bf16=bool(getattr(config, "bf16", False)),
        fp16=bool(getattr(config, "fp16", False)),
        params_dtype=getattr(config, "params_dtype", torch.float32),
    )
    with param_groups_aligned_over(_role_group(pg_collection)):
        optimizer = get_megatron_optimizer(
            optimizer_config, ddp_chunks, use_gloo_process_groups=False, pg_collection=pg_collection
        )
    # megatron's sub-optimizers do not all keep their model chunks: record here whether the state is an MoE
    # model's (saved in the EP-independent layout, _ep_independent_common)
    setattr(optimizer, _MOE_TAG, bool(getattr(config, "num_moe_experts", None)))
    lr_scheduler = LRScheduler(optimizer, optim_cfg, total_steps)
    logger.debug(
        "built %s (distributed optimizer: %s) for %d chunk(s)",
        type(optimizer).__name__, parallel_cfg.use_distributed_optimizer, len(ddp_chunks),
    )
    return ddp_chunks, optimizer, lr_scheduler


def optimizer_step(optimizer: MegatronOptimizer, lr_scheduler: LRScheduler, *,
                   lr_scale: float = 1.0) -> tuple[bool, Optional[float], Optional[int]]:
    """One update after the gradients are finalised (``finalize_model_grads_func`` ran).

    ``lr_scale`` multiplies every parameter group's learning rate for this update only (r_b under
    ``selection.scale_mode: lr``); the schedule's own value is restored afterwards, so the
    schedule and the logged ``lr`` are unaffected. It acts after the gradient clip, which is why it
    survives it (a factor on the loss is divided out again by the clip and by Adam).

    Returns ``(ok, grad_norm, num_zeros)``: ``ok`` is False when the update was skipped (inf/NaN
    gradients under a loss scaler); the schedule advances only on a successful update. ``grad_norm``
    is the global pre-clip norm over the role (None when not computed), ``num_zeros`` the number of
    zero gradient entries (None unless ``log_num_zeros_in_grad``).
    """
    use_fused_cpu_adam(optimizer)
    groups = optimizer.param_groups if lr_scale != 1.0 else []
    saved = [g["lr"] for g in groups]
    for g in groups:  # megatron's scheduler may hold lr as a tensor: replace it, never scale it in place
        g["lr"] = g["lr"] * lr_scale
    try:
        ok, grad_norm, num_zeros = optimizer.step()
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr
    if ok:
        lr_scheduler.step()
    return bool(ok), (None if grad_norm is None else float(grad_norm)), num_zeros


def _torch_parts(optimizer: MegatronOptimizer) -> list[Any]:
    """megatron's parts that hold a torch optimizer (``.optimizer``): one per (dtype, expert) group, usually under
    a ChainedOptimizer; a stub (no params on this rank) has none."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if getattr(o, "optimizer", None) is not None]


def use_fused_cpu_adam(optimizer: MegatronOptimizer) -> None:
    """Run torch's fused Adam kernel for every torch-Adam part whose parameters are all CPU fp32 tensors.

    Without transformer-engine or apex megatron builds ``torch.optim.Adam(W)`` with the default
    implementation, which on CPU is the per-tensor loop: its ``exp_avg_sq.sqrt() / c`` allocates two fresh
    tensors of every parameter's size per update (0.54 s of a 0.74 s update at 80.7 M parameters,
    BENCHMARKS.md). The fused kernel does the same update in one in-place pass per tensor; only the
    rounding of the update differs. Set at every step, not only at build, because loading a checkpoint
    replaces the param groups (and their ``fused`` entry) with the saved ones; the per-param state
    (``exp_avg``, ``exp_avg_sq``, the fp32 ``step``) is the same in both implementations."""
    for part in _torch_parts(optimizer):
        if not isinstance(part.optimizer, torch.optim.Adam):  # AdamW included
            continue
        for group in part.optimizer.param_groups:
            if group.get("fused") or group.get("differentiable") or group.get("capturable"):
                continue
            if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in group["params"]):
                group["fused"], group["foreach"] = True, False


def zero_grad_buffers(ddp_chunks: Sequence[DistributedDataParallel], optimizer: MegatronOptimizer) -> None:
    """Zero the DDP contiguous grad buffers (``param.main_grad``) and the optimizer's main grads
    before the next step's backward (megatron accumulates into ``main_grad`` across micro-batches)."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


class BranchMoments:
    """Adam moments per schedule branch (``optim.branch_state: per_branch``) for ONE megatron optimizer.

    Each branch owns a complete inner-optimizer state (torch Adam: param → ``exp_avg``,
    ``exp_avg_sq`` and its own 0-d ``step``, so the bias correction counts that branch's updates
    only; a fused TE/apex Adam keeps ``step`` in the param groups, which are swapped along). Before
    a step, :meth:`use` puts the step's branch state in place by pointer: the inner optimizer's
    ``state`` object is exchanged (and the param groups' ``step`` entries, where present); the
    parameters, fp32 main params, gradients and param groups (lr, weight decay) stay shared, and no
    tensor is copied. With the distributed optimizer each branch's state holds this DP rank's
    shards, exactly like the shared state.

    Every branch's state is created up front, zeros with step 0, which is what torch Adam creates
    lazily on a parameter's first update; so a branch that has not stepped yet is saved and loaded
    like any other (one template for every checkpoint).
    """

    def __init__(self, optimizer: MegatronOptimizer, branches: Sequence[str]) -> None:
        if not branches or len(set(branches)) != len(branches):
            raise ValueError(f"BranchMoments: branches={list(branches)} must be a non-empty list of distinct names")
        self.branches = tuple(branches)
        self._parts = _torch_parts(optimizer)
        self.active = self.branches[0]
        self._parked: dict[str, list[tuple[Any, list[Any]]]] = {}
        for part in self._parts:  # the live state becomes the first branch's
            _init_adam_state(part)
        for branch in self.branches[1:]:
            self._parked[branch] = [self._fresh(part) for part in self._parts]

    @staticmethod
    def _fresh(part: Any) -> tuple[Any, list[Any]]:
        """A new zero state for ``part`` (built in place of the live one, which is put back)."""
        inner = part.optimizer
        live, live_steps = inner.state, _group_steps(inner)
        inner.state = defaultdict(dict)
        try:
            _set_group_steps(inner, [_NO_STEP] * len(inner.param_groups))
            _init_adam_state(part)
            return inner.state, _group_steps(inner)
        finally:
            inner.state = live
            _set_group_steps(inner, live_steps)

    def use(self, branch: Optional[str]) -> None:
        """Make ``branch``'s moments the ones the next ``optimizer.step()`` reads and updates."""
        if branch not in self.branches:
            raise ValueError(f"optim.branch_state=per_branch: a step of branch {branch!r} has no Adam moments "
                             f"(branches: {list(self.branches)}); per-branch moments need one branch per step")
        if branch == self.active:
            return
        parked = self._parked.pop(branch)
        out = []
        for part, (state, steps) in zip(self._parts, parked):
            inner = part.optimizer
            out.append((inner.state, _group_steps(inner)))
            inner.state = state
            _set_group_steps(inner, steps)
        self._parked[self.active] = out
        self.active = branch


_NO_STEP = object()
"""A param group without a ``step`` entry (a fused Adam that has not stepped yet)."""


def _group_steps(inner: Any) -> list[Any]:
    return [g.get("step", _NO_STEP) for g in inner.param_groups]


def _set_group_steps(inner: Any, steps: list[Any]) -> None:
    for group, step in zip(inner.param_groups, steps):
        if step is _NO_STEP:
            group.pop("step", None)
        else:
            group["step"] = step


def _init_adam_state(part: Any) -> None:
    """Zero moments (megatron's ``init_state_fn``) and, for torch Adam, the per-param 0-d ``step``
    that torch creates on a first update (float32, on the param's device when capturable/fused)."""
    inner = part.optimizer
    part.init_state_fn(inner, part.config)
    if not isinstance(inner, torch.optim.Adam):  # a fused Adam counts steps in its param groups
        return
    for group in inner.param_groups:
        fused = bool(group.get("fused"))
        dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
        device = None if group.get("capturable") or fused else torch.device("cpu")
        for p in group["params"]:
            state = inner.state[p]
            if "step" not in state:  # torch/optim/adam.py _init_group, "special device hosting for step"
                state["step"] = torch.zeros((), dtype=dtype, device=device or p.device)
