"""Mixture-of-experts training numerics and metrics around megatron-core's MoE layer.

Aux-loss scale. megatron's router adds its load-balancing (and z-) loss to the gradient through
``MoEAuxLossAutoScaler``: the loss is not part of the returned loss, its backward injects
``d aux / d θ`` multiplied by one process-wide scale that the pipeline schedule sets after every
micro-batch's forward (``schedules.forward_step_calc_loss``). With our loss contract
(``calculate_per_token_loss=True``, gradients SUMMED over DP, ``models.optimizer``) the schedule's
default scale is 1 per micro-batch, so the aux gradient would grow with the number of micro-batches and
the DP size. :func:`set_aux_loss_scale` sets ``config.moe_grad_scale_func`` (the schedule's own hook)
to ``1 / (micro-batches x DP)`` (times the mixed-precision loss scale when there is one): the aux term
is the mean over every micro-batch of every DP replica of each micro-batch's aux loss, independent of
how the global batch is split. It is never added to our loss as well (the router attaches it; the
CaMOPD loss does not see it). The router fixes at construction whether it uses megatron's per-token
aux path (``config.calculate_per_token_loss`` then, False for every model we build: the optimizer sets
it afterwards), so the scale above is the one that applies.

Metrics. :class:`RoutingStats` counts the tokens routed to each expert in training forwards (a forward
hook on every router) and reads the aux loss megatron records in its MoE metrics tracker;
:meth:`RoutingStats.metrics` reduces both over the role and returns ``moe/aux_loss``,
``moe/tokens_per_expert_max``, ``moe/tokens_per_expert_mean`` and ``moe/load_imbalance`` (max / mean).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["is_moe", "set_aux_loss_scale", "RoutingStats"]


def is_moe(config: Any) -> bool:
    """The megatron ``TransformerConfig`` has MoE layers."""
    return getattr(config, "num_moe_experts", None) is not None


def set_aux_loss_scale(config: Any, num_microbatches: int, pg_collection: Any) -> None:
    """Scale the router's aux-loss gradient by ``1 / (num_microbatches x DP)`` for the next schedule run
    (module docstring). A no-op for dense models. ``pg_collection`` None: ``num_microbatches`` is already
    the count over every DP replica (``models.pipeline.run_microbatches`` passes the real micro-batches'
    count over the DP group, lock-step dummies excluded, so unequal counts per replica are exact too)."""
    if not is_moe(config):
        return
    group = getattr(pg_collection, "dp_cp", None)
    dp = 1 if group is None else dist.get_world_size(group)
    factor = 1.0 / (max(num_microbatches, 1) * dp)
    grad_scale = getattr(config, "grad_scale_func", None)

    def moe_grad_scale() -> torch.Tensor:
        base = grad_scale(torch.ones(1)) if grad_scale is not None else torch.ones(1)
        return base * factor

    config.moe_grad_scale_func = moe_grad_scale


class RoutingStats:
    """Tokens per expert and aux loss of one model's training forwards (see the module docstring).

    ``RoutingStats.of(model)`` attaches once (forward hooks on the routers of this rank's layers) and
    returns the same object afterwards; :meth:`metrics` is collective over ``group`` and starts a new
    count.
    """

    _ATTR = "_camopd_routing_stats"

    def __init__(self, model: torch.nn.Module) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        from camopd_megatron.models.gpt import unwrap_model

        inner = unwrap_model(model)
        self.config = inner.config
        self.num_layers = int(self.config.num_layers)
        self.num_experts = int(self.config.num_moe_experts)
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64)
        self.routers = [m for m in inner.modules() if isinstance(m, TopKRouter)]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["RoutingStats"]:
        """The stats attached to ``model`` (attached now on first use); None for a dense model."""
        from camopd_megatron.models.gpt import unwrap_model

        inner = unwrap_model(model)
        if not is_moe(inner.config):
            return None
        stats = getattr(inner, cls._ATTR, None)
        if stats is None:
            stats = cls(model)
            setattr(inner, cls._ATTR, stats)
        stats._size_tracker()
        return stats

    def _size_tracker(self) -> None:
        """megatron's MoE metrics tracker is process-wide and sizes its per-layer tensor by the first model
        that records: make it hold this model's layers (another MoE model in the process may be shallower)."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        entry = get_moe_metrics_tracker().metrics.get("load_balancing_loss")
        if entry is not None and entry.values.numel() < self.num_layers:
            entry.values = torch.zeros(self.num_layers, dtype=entry.values.dtype, device=entry.values.device)

    def _hook(self, router: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if not router.training or not torch.is_grad_enabled():
            return  # rollout / scoring forwards: not the update's routing
        routing_map = output[1]  # [tokens, experts] bool: this rank's tokens (its SP shard)
        layer = int(router.layer_number) - 1
        self.counts[layer] += routing_map.detach().sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.calls[layer] += 1

    def metrics(self, group: Optional[dist.ProcessGroup], tp_group: Optional[dist.ProcessGroup]) -> dict[str, float]:
        """Role-wide MoE metrics since the last call (SUM all-reduce over ``group``, the role's ranks).

        Each TP rank routes its own sequence shard under SP (counts and aux-loss parts add up over TP,
        as megatron's tracker reduces them); without SP every TP rank routes every token, so TP ranks
        other than 0 contribute nothing. Micro-batches are counted on TP rank 0."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        tracker = get_moe_metrics_tracker()
        entry = tracker.metrics.get("load_balancing_loss")
        aux = torch.zeros(self.num_layers, dtype=torch.float64)
        if entry is not None:
            aux += entry.values.detach().to(device="cpu", dtype=torch.float64)[: self.num_layers]
        tracker.clear()
        tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        share = 1.0 if (self.config.sequence_parallel or tp_rank == 0) else 0.0
        first = 1.0 if tp_rank == 0 else 0.0
        flat = torch.cat([self.counts.flatten() * share, aux * share, self.calls * first])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        n = self.num_layers * self.num_experts
        counts = flat[:n].view(self.num_layers, self.num_experts)
        aux, calls = flat[n:n + self.num_layers], flat[n + self.num_layers:]
        self.counts.zero_()
        self.calls.zero_()
        used = calls > 0  # the MoE layers (dense layers have no router)
        if not bool(used.any()):
            return {}
        per_layer = counts[used]
        mean = per_layer.mean(dim=1).clamp(min=1e-12)
        out = {
            "moe/tokens_per_expert_max": float(per_layer.max()),
            "moe/tokens_per_expert_mean": float(per_layer.mean()),
            "moe/load_imbalance": float((per_layer.max(dim=1).values / mean).max()),
        }
        if self.config.moe_aux_loss_coeff and entry is not None:
            # the coefficient-free aux loss, mean over MoE layers, micro-batches and DP replicas
            out["moe/aux_loss"] = float(aux[used].sum() / calls[used].sum())
        return out
