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
``moe/tokens_per_expert_max``, ``moe/tokens_per_expert_mean`` and ``moe/load_imbalance`` (max / mean),
and with routing replay ``moe/replay_mismatch``: the share of replayed (token, expert) choices the current
router would not make itself (how far training would route away from the rollout without replay).
Padding tokens (:class:`RouterFeed`) are not counted.

Per-micro-batch router inputs. :class:`RouterFeed` hands every MoE layer of a training forward two
things megatron's ``GPTModel.forward`` would take as arguments but cannot deliver with our explicit
groups: the **padding mask** (its first stage scatters it over the process-wide TP group under sequence
parallelism, and its later pipeline stages never scatter it), and, with ``model.moe.routing_replay``, the
**expert choices to replay**. A forward pre-hook on each MoE layer sets its ``padding_mask`` argument
(True = padding: the router leaves those tokens out of the aux and z-losses and of the expert-bias
counts; they are still dispatched, so real tokens' outputs do not change) and, for replay, the layer's
target top-k indices on megatron's own per-router ``RouterReplay``. Padding = every position whose output
no loss reads: after a sequence's last token, the last token itself (it predicts nothing), and every
position of a padding row or a lock-step dummy.

Recompute. With ``model.recompute: full`` megatron runs a layer's forward again in the backward, when the
schedule may already have started later micro-batches (1F1B). Each layer keeps the inputs it was given in
a queue: a forward outside the autograd engine takes the current micro-batch's and appends them, a
forward inside the backward (the recompute) takes the oldest, which is the same micro-batch because each
layer's backwards run in the order of its forwards. For replay that is megatron's own
``REPLAY_FORWARD`` / ``REPLAY_BACKWARD`` pair (``set_target_indices`` queues the indices, the backward
action pops them).

Routing replay. The rollout records each MoE layer's top-k expert indices for every fed position
(megatron's ``RECORD`` action, :meth:`RouterFeed.recording` / :meth:`RouterFeed.recorded`, stored in the
:class:`~camopd_megatron.distill.rollout.RolloutBatch` as ``routes_BTLK``: int16, [rows, positions,
this stage's MoE layers, top-k]); the update's forwards route every token to those experts and compute
the gate weights from the current router (megatron's ``REPLAY_FORWARD``: the router's scores gathered at
the replayed indices), so the rollout and the update use the same experts, and the router still trains.
Positions the rollout never fed (a sequence's last token) are padding and replay the first k experts.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["is_moe", "set_aux_loss_scale", "RoutingStats", "RouterFeed", "ROUTE_DTYPE"]

ROUTE_DTYPE = torch.int16
"""Storage of recorded expert indices (experts < 2^15); megatron gets int64."""


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


def _attached(cls: Any, model: torch.nn.Module) -> Any:
    """The ``cls`` object attached to ``model``'s GPTModel under ``cls._ATTR`` (built and attached on first use:
    its hooks go on once); None for a dense model."""
    from camopd_megatron.models.gpt import unwrap_model

    inner = unwrap_model(model)
    if not is_moe(inner.config):
        return None
    obj = getattr(inner, cls._ATTR, None)
    if obj is None:
        obj = cls(model)
        setattr(inner, cls._ATTR, obj)
    return obj


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
        # routing replay: (token, expert) assignments replayed, and those the router itself would not pick
        self.replayed = torch.zeros(2, dtype=torch.float64)
        self.routers = [m for m in inner.modules() if isinstance(m, TopKRouter)]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["RoutingStats"]:
        """The stats attached to ``model`` (attached now on first use); None for a dense model."""
        stats = _attached(cls, model)
        if stats is not None:
            stats._size_tracker()
        return stats

    def _size_tracker(self) -> None:
        """megatron's MoE metrics tracker is process-wide and sizes its per-layer tensor by the first model
        that records: make it hold this model's layers (another MoE model in the process may be shallower)."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        entry = get_moe_metrics_tracker().metrics.get("load_balancing_loss")
        if entry is not None and entry.values.numel() < self.num_layers:
            entry.values = torch.zeros(self.num_layers, dtype=entry.values.dtype, device=entry.values.device)

    def _hook(self, router: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not router.training or not torch.is_grad_enabled():
            return  # rollout / scoring forwards: not the update's routing
        routing_map = output[1].detach()  # [tokens, experts] bool: this rank's tokens (its SP shard)
        padding = inputs[1] if len(inputs) > 1 else None  # [s, b], True = padding (RouterFeed)
        if padding is not None:
            routing_map = routing_map & ~padding.reshape(-1, 1)
        layer = int(router.layer_number) - 1
        self.counts[layer] += routing_map.sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.calls[layer] += 1
        if _replaying(router):  # what the router would pick itself (its top-k logits: the score functions keep the order)
            with torch.no_grad():
                logits = router.gating(inputs[0]).reshape(-1, routing_map.shape[1])
                own = torch.zeros_like(routing_map).scatter_(1, logits.topk(router.topk, dim=1).indices, True)
            self.replayed += torch.tensor([float(routing_map.sum()), float((routing_map & ~own).sum())],
                                          dtype=torch.float64)

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
        flat = torch.cat([self.counts.flatten() * share, aux * share, self.calls * first, self.replayed * share])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        n = self.num_layers * self.num_experts
        counts = flat[:n].view(self.num_layers, self.num_experts)
        aux, calls = flat[n:n + self.num_layers], flat[n + self.num_layers:n + 2 * self.num_layers]
        replayed, changed = (float(v) for v in flat[n + 2 * self.num_layers:])
        self.counts.zero_()
        self.calls.zero_()
        self.replayed.zero_()
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
        if replayed > 0:  # the share of replayed expert choices the current router would not make
            out["moe/replay_mismatch"] = changed / replayed
        if self.config.moe_aux_loss_coeff and entry is not None:
            # the coefficient-free aux loss, mean over MoE layers, micro-batches and DP replicas
            out["moe/aux_loss"] = float(aux[used].sum() / calls[used].sum())
        return out


def _replaying(router: torch.nn.Module) -> bool:
    """The router routes by replayed indices (megatron's REPLAY_FORWARD / REPLAY_BACKWARD action)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    rr = getattr(router, "router_replay", None)
    return rr is not None and rr.router_replay_action in (RouterReplayAction.REPLAY_FORWARD,
                                                          RouterReplayAction.REPLAY_BACKWARD)


def _in_backward() -> bool:
    """Inside the autograd engine's backward (where megatron's activation recompute runs forwards again)."""
    return torch._C._current_graph_task_id() != -1


class RouterFeed:
    """The padding mask and the replayed expert choices of this rank's MoE layers (module docstring).

    ``RouterFeed.of(model)`` attaches once (a forward pre-hook on every MoE layer of this rank's model chunk)
    and returns the same object afterwards; None for a dense model. Training code brackets each schedule
    run with :meth:`new_run` and each micro-batch's forward with :meth:`micro_batch`; the rollout brackets
    its decode with :meth:`recording` and reads each forward's choices with :meth:`recorded`.
    """

    _ATTR = "_camopd_router_feed"

    def __init__(self, model: torch.nn.Module) -> None:
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer

        from camopd_megatron.models.gpt import unwrap_model

        inner = unwrap_model(model)
        self.config = inner.config
        self.topk = int(self.config.moe_router_topk)
        self.layers = [m for m in inner.modules() if isinstance(m, BaseMoELayer)]
        self.replay = bool(getattr(self.config, "moe_enable_routing_replay", False))
        # megatron's per-router RouterReplay of this chunk (never its process-wide list, which every MoE
        # model built in the process shares)
        self.replays = [layer.router.router_replay for layer in self.layers] if self.replay else []
        self._current: Optional[tuple[Optional[torch.Tensor], Optional[list[torch.Tensor]]]] = None
        self.is_recording = False
        self._queues: list[deque] = [deque() for _ in self.layers]
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["RouterFeed"]:
        """The feed attached to ``model`` (attached now on first use); None for a dense model."""
        return _attached(cls, model)

    @property
    def num_layers(self) -> int:
        """MoE layers on this rank (this pipeline stage's)."""
        return len(self.layers)

    # -- training forwards --------------------------------------------------------------------------
    def new_run(self) -> None:
        """Forget the previous schedule run's queued inputs (call before every run)."""
        for q in self._queues:
            q.clear()
        for rr in self.replays:
            rr.clear_indices()
            rr.clear_router_replay_action()

    def fill_routes(self, routes_BTLK: torch.Tensor, padding_BT: torch.Tensor) -> torch.Tensor:
        """The replay indices of a micro-batch ``[B, T, L, k]`` (int64): the recorded ones, and the first k
        experts at padding positions (which the rollout never fed: a sequence's last token, padding rows,
        lock-step dummies)."""
        b, t = padding_BT.shape
        first_k = torch.arange(self.topk, dtype=torch.int64, device=padding_BT.device)
        filler = first_k.expand(b, t, self.num_layers, self.topk)
        if tuple(routes_BTLK.shape) != (b, t, self.num_layers, self.topk):
            raise ValueError(f"routing replay: recorded routes have shape {tuple(routes_BTLK.shape)}, expected "
                             f"{(b, t, self.num_layers, self.topk)} (rows, positions, this stage's MoE layers, "
                             "top-k): the rollout ran a different model layout than the update")
        keep = ~padding_BT.bool()[:, :, None, None]
        return torch.where(keep, routes_BTLK.to(torch.int64), filler)

    @contextmanager
    def micro_batch(self, padding_BT: Optional[torch.Tensor], routes_BTLK: Optional[torch.Tensor]) -> Iterator[None]:
        """Inside the block, this rank's MoE layers get ``padding_BT`` (``[b, s]``: the rows and THIS rank's
        positions, i.e. its sequence-parallel shard, True = padding) and, with replay, the indices
        ``routes_BTLK`` (``[b, s, L, k]``, the same positions; from :meth:`fill_routes`). Without routes the
        layers route as megatron does (a teacher's scoring, a replica's empty placeholder)."""
        per_layer = None if routes_BTLK is None else [
            routes_BTLK[:, :, i, :].transpose(0, 1).reshape(-1, self.topk) for i in range(self.num_layers)]
        self._current = (padding_BT, per_layer)
        try:
            yield
        finally:
            self._current = None

    def _pre_hook(self, i: int):
        def hook(layer: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            from megatron.core.transformer.moe.router_replay import RouterReplayAction

            if _in_backward():  # activation recompute: this layer's oldest queued micro-batch
                if not self._queues[i]:
                    return None
                padding, per_layer = self._queues[i].popleft()
                action = RouterReplayAction.REPLAY_BACKWARD
            elif self._current is not None:
                padding, per_layer = self._current
                if layer.training:  # a training forward (under recompute it runs without grad): its backward
                    self._queues[i].append((padding, per_layer))  # may run it again
                action = RouterReplayAction.REPLAY_FORWARD
            else:  # a forward outside our schedule runs: routed as megatron does it (recorded while recording)
                if self.replays and not self.is_recording:
                    self.replays[i].clear_router_replay_action()  # never a stale replay target
                return None
            if per_layer is not None:
                rr = self.replays[i]
                if action is RouterReplayAction.REPLAY_FORWARD:
                    rr.set_target_indices(per_layer[i])  # also queued for REPLAY_BACKWARD
                rr.set_router_replay_action(action)
            elif self.replays:
                self.replays[i].clear_router_replay_action()  # nothing to replay: route, never a stale target
            if padding is not None:
                kwargs = dict(kwargs, padding_mask=padding)
            return args, kwargs

        return hook

    # -- rollout --------------------------------------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside the block this rank's routers record their top-k choices (replay on only; a no-op otherwise)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for rr in self.replays:
            rr.clear_indices()
            rr.set_router_replay_action(RouterReplayAction.RECORD)
        self.is_recording = bool(self.replays)
        try:
            yield
        finally:
            self.is_recording = False
            for rr in self.replays:
                rr.clear_indices()
                rr.clear_router_replay_action()

    def recorded(self, batch: int) -> torch.Tensor:
        """The choices of the last forward, ``[batch, n, L, k]`` (``ROUTE_DTYPE``) for its ``n`` fed positions
        (megatron records ``[n·batch, k]`` in its ``[s, b]`` token order)."""
        parts = []
        for rr in self.replays:
            idx = rr.get_recorded_indices()
            if idx is None:
                raise RuntimeError("routing replay: a router recorded nothing in the last forward")
            parts.append(idx.detach().reshape(-1, batch, self.topk).transpose(0, 1))
        return torch.stack(parts, dim=2).to(device="cpu", dtype=ROUTE_DTYPE)
