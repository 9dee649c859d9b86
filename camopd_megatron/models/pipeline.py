"""Run forward (and backward) over micro-batches with megatron's schedules and explicit groups.

One entry point, :func:`run_microbatches`, serves PP = 1 and PP > 1 alike: it picks megatron's
schedule for the role's pipeline size (``get_forward_backward_func(pp_size=...)``), hands it the
role's ``pg_collection`` and a ``P2PCommunicator`` on the role's PP group (both are needed with
explicit groups; either alone raises), and calls ``loss_fn(batch, logits_BTV)`` on the last stage.

Loss scaling. megatron divides each micro-batch's loss by the number of micro-batches (legacy two-
value loss functions). Our losses already carry their global normaliser (docs/algorithm.md: the mean
over the kept set across DP ranks and micro-batches), so the returned loss is multiplied back by the
micro-batch count: the gradient is exactly that of ``Σ_mb loss_fn(mb)``. An MoE model's router aux
loss is megatron's own (never part of ``loss_fn``); its gradient is scaled to the mean over the
micro-batches of every DP replica (:func:`camopd_megatron.models.moe.set_aux_loss_scale` with their
count over the DP group; lock-step dummies are not counted and add no aux loss).

Shapes. Every micro-batch in one call has the same ``[B, T]`` (:func:`make_microbatches` pads the
last one): the pipeline's receive buffers are allocated from ``(T, B, hidden)``. Legend: B batch,
T tokens, W window, V vocab shard.

Output window. A micro-batch may carry ``"output_window": (lo, hi)`` (see :func:`output_window`):
the last stage then returns the final hidden states of positions ``[lo, hi)``, ``[B, hi - lo, H]``,
instead of logits (megatron's ``output_processor`` hook), and ``loss_fn`` turns them into log-probs
with ``next_token_logprobs(..., output_weight=output_weight(model), first_position=lo)``: the fused
output projection of :mod:`camopd_megatron.ops.fused_output`, which never builds the [B, T, V] logits.
Scoring a response needs neither the prompt positions' logits nor the full logits tensor, and on a
CPU the output layer and its logits were the largest cost of a small-hidden, large-vocab model
(BENCHMARKS.md).

Sequence parallelism. With ``sequence_parallel`` the embedding splits the sequence over the TP group:
:func:`model_forward` right-pads T to a multiple of TP (:func:`sequence_length`) and cuts the logits
back to T, the schedule's p2p buffers get the padded length, and the output window all-gathers the
final hidden states along the sequence before slicing (see :func:`_window_hidden`).

Lock-step (roles with expert parallelism). An expert-parallel (EP) group spans data-parallel
replicas: every MoE layer's token dispatcher exchanges tokens with an all-to-all over it, in the
forward and again in the backward, so every rank of the group must run the SAME NUMBER of passes,
while the replicas of a dense role may differ (a different number of kept samples, hence of
micro-batches, per replica). Callers pass ``lock_step``: the role's data-parallel group, or None
(off). The count is agreed with one small all-reduce (MAX, :func:`group_max`) and a replica with
fewer micro-batches runs **dummies** (:func:`pad_microbatches`): all-padding micro-batches,
``n_real == 0``, of the same shape. A dummy contributes nothing: the loss function gives it a zero
loss (``0 · Σ outputs``: every parameter still gets its exactly-zero gradient, as megatron DDP
expects), and the MoE router's auxiliary load-balancing and z-losses are off while it runs
(:func:`moe_aux_losses_off`: megatron adds them in the backward through its own autoscaler,
independent of our loss). Without token dropping (``capacity_factor`` unset) a token's expert output
does not depend on the other tokens of the all-to-all, so the real rows' results are those of the
run without lock-step. Which roles need it: ``config.moe.lock_step_needed``. The whole DP group is a
superset of the replicas any EP group spans whatever the expert-TP size, and every TP/PP rank of a
replica agrees on the same maximum with its own DP group; a synchronous step waits for its slowest
replica anyway. The alltoall dispatcher needs only equal counts; the allgather dispatcher would also
need equal token counts per forward.

MoE router inputs. A micro-batch may carry ``"seq_lens"`` ``[B]`` (each row's prompt + response length) and,
with routing replay, ``"routes"`` ``[B, T, L, k]`` (the rollout's expert choices); every MoE layer of the
forward then gets its padding mask and replay indices for this rank's positions
(:class:`camopd_megatron.models.moe.RouterFeed`, :func:`router_inputs`).

Last stage → other stages. Only the last stage holds a pipeline's result (log-probs, sampled tokens);
:func:`last_stage_to_all` copies it to the earlier stages of the same TP rank with one bounded
broadcast (:func:`group_broadcast`): a stage that died or hung surfaces as a :class:`CollectiveError`
naming the peer instead of an unbounded wait.
"""
from __future__ import annotations

import datetime
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from camopd_megatron.models.gpt import run_forward_pre_hooks, stage_info, unwrap_model
from camopd_megatron.models.moe import RouterFeed, is_moe, set_aux_loss_scale

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

LossFn = Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(batch, logits_BTV) -> (scalar loss, outputs)`` (hidden states ``[B, W, H]`` instead of logits
when the batch carries an ``output_window``); outputs are collected per micro-batch."""


def output_window(mask_BT: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the output positions some row scores (``mask_BT`` aligned with the outputs, as
    ``next_token_logprobs`` takes it). An all-zero mask gives ``(0, 1)``: one column keeps the output
    weight in the graph, so every rank still produces its (zero) gradient."""
    cols = mask_BT.detach().ne(0).any(dim=0).nonzero().flatten()
    if cols.numel() == 0:
        return 0, 1
    return int(cols[0]), int(cols[-1]) + 1


def sequence_length(config: Any, t: int) -> int:
    """The length a ``t``-token sequence runs at: with sequence parallelism the embedding splits the
    sequence over the TP group, so it is right-padded to a multiple of TP (causal attention: the pad
    positions come after every real one and change none of them); ``t`` otherwise."""
    if not getattr(config, "sequence_parallel", False):
        return t
    tp = config.tensor_model_parallel_size
    return -(-t // tp) * tp


def padding_positions(batch: dict[str, Any], t: int) -> torch.Tensor:
    """``[B, t]`` bool, True where no loss reads the position's output: at or after each row's last token
    (``seq_lens``), and every position of a row past ``n_real`` (padding rows, lock-step dummies). Without
    ``seq_lens`` only the rows past ``n_real``."""
    b = batch["tokens"].shape[0]
    pos_T = torch.arange(t, device=batch["tokens"].device)
    if "seq_lens" in batch:
        padding_BT = pos_T.unsqueeze(0) >= (batch["seq_lens"].to(pos_T.device).unsqueeze(1) - 1)
    else:
        padding_BT = torch.zeros((b, t), dtype=torch.bool, device=pos_T.device)
    padding_BT[int(batch.get("n_real", b)):] = True
    return padding_BT


def router_inputs(feed: RouterFeed, config: Any, batch: dict[str, Any],
                  tp_group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """This rank's MoE padding mask ``[B, s]`` and (routing replay, a batch with ``routes``) indices ``[B, s, L, k]`` of ``batch``: the
    sequence run at :func:`sequence_length` (the pad positions are padding), cut to this TP rank's shard under
    sequence parallelism (the tokens its MoE layers route)."""
    t = batch["tokens"].shape[1]
    t_run = sequence_length(config, t)
    padding_BT = F.pad(padding_positions(batch, t), (0, t_run - t), value=True)
    routes = None
    recorded = batch.get("routes")
    if feed.replay and recorded is not None:
        if recorded.shape[1] != t_run:
            recorded = F.pad(recorded, (0, 0, 0, 0, 0, t_run - recorded.shape[1]))
        routes = feed.fill_routes(recorded, padding_BT)
    if getattr(config, "sequence_parallel", False) and tp_group is not None and dist.get_world_size(tp_group) > 1:
        shard = t_run // dist.get_world_size(tp_group)
        lo = dist.get_rank(tp_group) * shard
        padding_BT = padding_BT[:, lo:lo + shard]
        routes = None if routes is None else routes[:, lo:lo + shard]
    return padding_BT.contiguous(), routes


def _window_hidden(lo: int, hi: int, sp_group: Optional[dist.ProcessGroup]) -> Callable[..., torch.Tensor]:
    """megatron ``output_processor``: the final hidden states of positions ``[lo, hi)``, ``[B, W, H]``.

    With sequence parallelism (``sp_group``, the TP group) the final norm's output is this rank's
    ``[T / TP, B, H]`` slice of the sequence: it is all-gathered first, as megatron's column-parallel
    output layer gathers its input. Backward keeps only this rank's slice of the gradient
    (``tensor_parallel_output_grad=False``) instead of a reduce-scatter: the fused output projection
    already all-reduces dL/dh over the TP group, so every rank holds the whole sum.

    It replaces the output layer's forward, so it runs that layer's forward pre-hooks: with
    ``parallel.overlap_param_gather`` megatron DDP waits there for the output weight's all-gather,
    which the fused output projection then reads directly (``models.gpt.run_forward_pre_hooks``)."""

    def window(*, hidden_states: torch.Tensor, output_layer: Optional[torch.nn.Module] = None, **_: Any) -> torch.Tensor:
        if output_layer is not None:
            run_forward_pre_hooks(output_layer)
        if sp_group is not None:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=sp_group)
        return hidden_states[lo:hi].transpose(0, 1)

    return window


def model_forward(model: torch.nn.Module, tokens_BT: torch.Tensor, position_ids_BT: Optional[torch.Tensor] = None,
                  window: Optional[tuple[int, int]] = None, **kwargs: Any) -> torch.Tensor:
    """One forward of a (possibly wrapped) GPTModel with the causal mask: logits ``[B, T, V/TP]`` on the
    last stage (with ``window=(lo, hi)``: final hidden states ``[B, hi - lo, H]``), hidden states on the
    others (``[T', B, H]``, T' = :func:`sequence_length` / TP with sequence parallelism)."""
    inner = unwrap_model(model)
    config = inner.config
    t = tokens_BT.shape[1]
    if position_ids_BT is None:
        position_ids_BT = torch.arange(t, device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)
    t_run = sequence_length(config, t)
    if t_run != t:  # sequence parallelism: right-pad to a multiple of TP (sliced off the logits below)
        tokens_BT = F.pad(tokens_BT, (0, t_run - t))
        position_ids_BT = torch.cat([position_ids_BT, position_ids_BT[:, -1:] + torch.arange(
            1, t_run - t + 1, device=tokens_BT.device)], dim=1)
    if window is not None:
        lo, hi = window
        if not 0 <= lo < hi <= t:
            raise ValueError(f"window={window!r}: expected 0 <= lo < hi <= {t} (the sequence length)")
        if getattr(config, "use_mup", False):
            raise ValueError("output window: the fused output projection does not apply MuP logit scaling; "
                             "drop use_mup from the model config")
        sp_group = inner.pg_collection.tp if config.sequence_parallel else None
        kwargs["output_processor"] = _window_hidden(lo, hi, sp_group)
    out = model(tokens_BT, position_ids_BT, None, **kwargs)
    if t_run != t and window is None and getattr(inner, "post_process", True):
        out = out[:, :t]
    return out


def run_microbatches(
    model: torch.nn.Module,
    pg_collection: "ProcessGroupCollection",
    batches: Sequence[dict[str, Any]],
    loss_fn: LossFn,
    *,
    forward_only: bool,
    lock_step: Optional[dist.ProcessGroup] = None,
    timeout_s: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Forward (+ backward unless ``forward_only``) of every micro-batch through the role's pipeline.

    Args:
        model: this rank's model chunk (GPTModel or megatron-DDP-wrapped).
        pg_collection: the role's process groups.
        batches: micro-batches, each a dict with ``tokens`` ``[B, T]`` int64, optionally
            ``output_window`` (module docstring), and whatever ``loss_fn`` needs; the same list on
            every stage of the pipeline.
        loss_fn: called on the last stage per micro-batch.
        forward_only: no backward (scoring, evaluation).
        lock_step: the role's DP group when its forward counts must agree (module docstring): the
            list is padded with dummy micro-batches (``n_real == 0``, which ``loss_fn`` must answer
            with a zero loss) to the group's longest; None: as given.
        timeout_s: bound on the lock-step all-reduce (None: the process group's own timeout).

    Returns:
        The ``outputs`` dicts of ``loss_fn`` in micro-batch order on the last stage (dummies included);
        [] elsewhere.
    """
    if lock_step is not None:
        batches = pad_microbatches(batches, group_max(len(batches), lock_step, timeout_s=timeout_s,
                                                      what="micro-batch count"))
    if not batches:
        return []
    shape = tuple(batches[0]["tokens"].shape)
    for i, b in enumerate(batches):
        if tuple(b["tokens"].shape) != shape:
            raise ValueError(f"batches[{i}]['tokens'] has shape {tuple(b['tokens'].shape)}, expected {shape}: pad micro-batches to one shape")
    stage = stage_info(pg_collection)
    config = unwrap_model(model).config
    n = len(batches)
    feed = RouterFeed.of(model)  # an MoE model: padding mask and replayed routes per micro-batch
    if feed is not None and feed.is_recording:
        feed = None  # a rollout forward (routing replay records): routed as megatron does
    if feed is not None:
        feed.new_run()

    def forward_step(data_iterator: Iterator[dict[str, Any]], chunk: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        routing = (feed.micro_batch(*router_inputs(feed, config, batch, getattr(pg_collection, "tp", None)))
                   if feed is not None else nullcontext())
        with moe_aux_losses_off(chunk, enabled=is_dummy(batch)), routing:  # a dummy adds no router loss either
            output = model_forward(chunk, batch["tokens"], batch.get("position_ids"),
                                   window=batch.get("output_window"))

        def loss_func(logits_BTV: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            loss, outputs = loss_fn(batch, logits_BTV)
            return loss * n, outputs  # megatron divides by the micro-batch count

        return output, loss_func

    if not forward_only and is_moe(config):
        # the aux-loss gradient is the mean over the step's REAL micro-batches of every DP replica: their
        # count over the DP group (dummies add no aux loss), so it is the same with and without lock-step
        # and whatever the replicas' counts (one small all-reduce)
        real = group_sum(sum(not is_dummy(b) for b in batches), getattr(pg_collection, "dp_cp", None),
                         timeout_s=timeout_s, what="micro-batches with rows")
        set_aux_loss_scale(config, real, None)
    fb = get_forward_backward_func(pp_size=stage.pp_size, vp_size=None)
    kwargs: dict[str, Any] = dict(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=n,
        seq_length=sequence_length(config, shape[1]),  # the p2p buffers' length (padded under SP)
        micro_batch_size=shape[0],
        forward_only=forward_only,
        pg_collection=pg_collection,
    )
    if stage.pp_size > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pg_collection.pp, config=config)
    outputs = fb(**kwargs)
    return list(outputs) if stage.is_last else []


# ------------------------------------------------------------------------------------------------
# equal-shape micro-batches
# ------------------------------------------------------------------------------------------------
def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    pad = torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)


def make_microbatches(tensors: dict[str, torch.Tensor], micro_batch_size: Optional[int],
                      device: Optional[torch.device] = None) -> list[dict[str, Any]]:
    """Split [B, ...] tensors into equal-shape micro-batches (the pipeline needs one shape).

    ``micro_batch_size`` None puts every row in one micro-batch. The last micro-batch is padded
    with zero rows; ``n_real`` says how many rows count. B = 0 gives one all-padding micro-batch so
    this rank still joins the schedule's collectives. With a ``mask`` (aligned with the outputs),
    each micro-batch gets the ``output_window`` of its scored positions (module docstring).
    ``device``: where the micro-batches go (default: where the tensors are).
    """
    b = next(iter(tensors.values())).shape[0]
    mbs = max(1, min(micro_batch_size or b, b)) if b else 1
    out = []
    for lo in range(0, max(b, 1), mbs):
        mb: dict[str, Any] = {k: _pad_rows(v[lo:lo + mbs], mbs) for k, v in tensors.items()}
        if device is not None:
            mb = {k: v.to(device) for k, v in mb.items()}
        mb["n_real"] = max(0, min(mbs, b - lo))
        if "mask" in mb:
            mb["output_window"] = output_window(mb["mask"])
        out.append(mb)
    return out


# ------------------------------------------------------------------------------------------------
# lock-step dummies (module docstring)
# ------------------------------------------------------------------------------------------------
def is_dummy(batch: dict[str, Any]) -> bool:
    """A micro-batch without a real row (``n_real == 0``): a lock-step dummy, or the placeholder of an
    empty batch (:func:`make_microbatches`)."""
    return int(batch.get("n_real", 1)) == 0


def pad_microbatches(batches: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``batches`` followed by dummy micro-batches up to ``count``: the first one's shape (the pipeline
    needs one shape) filled with zeros, ``n_real = 0``, a one-column output window."""
    out = list(batches)
    if len(out) >= count:
        return out
    if not out:
        raise ValueError("pad_microbatches: no micro-batch to take the dummy's shape from; pass the "
                         "placeholder make_microbatches gives for an empty batch")
    dummy = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in out[0].items()}
    dummy["n_real"] = 0
    if "output_window" in dummy:
        dummy["output_window"] = (0, 1)
    out.extend(dict(dummy) for _ in range(count - len(out)))
    return out


@contextmanager
def moe_aux_losses_off(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block the MoE routers of ``model`` add no auxiliary load-balancing loss and no
    z-loss: megatron's router reads ``moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` from the model's
    config at forward time (restored after). A no-op for a dense model or when not ``enabled``."""
    config = unwrap_model(model).config
    if not enabled or getattr(config, "num_moe_experts", None) is None:
        yield
        return
    saved = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
    try:
        config.moe_aux_loss_coeff = [0.0] * len(saved[0]) if isinstance(saved[0], list) else 0.0
        config.moe_z_loss_coeff = None
        yield
    finally:
        config.moe_aux_loss_coeff, config.moe_z_loss_coeff = saved


def group_max(value: int, group: Optional[dist.ProcessGroup], *, timeout_s: Optional[float], what: str) -> int:
    """The maximum of ``value`` over ``group``: one bounded int64 all-reduce (``value`` itself without a
    group). A replica that never joins surfaces as a :class:`CollectiveError` after ``timeout_s``."""
    return _group_int(value, group, dist.ReduceOp.MAX, timeout_s, what)


def group_sum(value: int, group: Optional[dist.ProcessGroup], *, timeout_s: Optional[float], what: str) -> int:
    """The sum of ``value`` over ``group`` (as :func:`group_max`)."""
    return _group_int(value, group, dist.ReduceOp.SUM, timeout_s, what)


def _group_int(value: int, group: Optional[dist.ProcessGroup], op: Any, timeout_s: Optional[float], what: str) -> int:
    if group is None or dist.get_world_size(group) == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=wire_device())
    wait_bounded(dist.all_reduce(t, op=op, group=group, async_op=True), timeout_s, f"lock-step {what}",
                 "the other data-parallel replicas of the role",
                 hint="a replica died, hung, or ran a different number of passes")
    return int(t.item())


# ------------------------------------------------------------------------------------------------
# bounded collectives: last stage -> other stages
# ------------------------------------------------------------------------------------------------
class CollectiveError(RuntimeError):
    """A bounded collective or point-to-point wait failed: timeout or a dead peer (names the peer)."""


def compute_device() -> torch.device:
    """Where models run: the current GPU when CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def wire_device() -> torch.device:
    """Device of the tensors that travel: the current GPU under NCCL, the CPU under gloo (even on a GPU host)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return compute_device()
    return torch.device("cpu")


def wait_bounded(work: dist.Work, timeout_s: Optional[float], what: str, peer: str, *,
                 error: type[Exception] = CollectiveError, hint: str = "it died or hung") -> None:
    """Wait for an async ``work`` at most ``timeout_s`` seconds (None: the process group's own timeout,
    ``parallel.timeout_s``); a timeout or a dead peer (gloo's "connection closed") raises ``error``
    naming ``peer``."""
    try:
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError for timeouts and dead peers alike
        bound = "the process group's timeout" if timeout_s is None else f"at most {timeout_s:g}s"
        raise error(f"{what} with {peer} failed after {bound} (parallel.timeout_s): {e}. "
                    f"Check that rank's log: {hint}") from e


def group_broadcast(t: torch.Tensor, src: int, group: Optional[dist.ProcessGroup], *, timeout_s: Optional[float],
                    peer: str, what: str, error: type[Exception] = CollectiveError,
                    hint: str = "it died or hung") -> torch.Tensor:
    """Bounded in-place ``broadcast`` of ``t`` from global rank ``src`` inside ``group`` (no-op for 1 rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    wait_bounded(dist.broadcast(t, src=src, group=group, async_op=True), timeout_s, what, peer, error=error, hint=hint)
    return t


def _stage_peer(pg_collection: "ProcessGroupCollection", step: int) -> tuple[int, str]:
    stage = stage_info(pg_collection)
    rank = dist.get_global_rank(pg_collection.pp, stage.pp_rank + step)
    return rank, f"pipeline stage {stage.pp_rank + step} (global rank {rank})"


def send_to_next_stage(t: torch.Tensor, pg_collection: "ProcessGroupCollection", *, timeout_s: Optional[float],
                       what: str) -> None:
    """Bounded send of ``t`` to the next pipeline stage (same TP rank); the receiver knows the shape and dtype.
    For hand-written stage-to-stage exchanges outside megatron's schedules (rollout's KV-cached decode)."""
    dst, peer = _stage_peer(pg_collection, +1)
    wait_bounded(dist.isend(t.contiguous(), dst=dst, group=pg_collection.pp), timeout_s, f"{what} (send)", peer)


def recv_from_previous_stage(t: torch.Tensor, pg_collection: "ProcessGroupCollection", *, timeout_s: Optional[float],
                             what: str) -> torch.Tensor:
    """Bounded receive into ``t`` from the previous pipeline stage (same TP rank); returns ``t``."""
    src, peer = _stage_peer(pg_collection, -1)
    wait_bounded(dist.irecv(t, src=src, group=pg_collection.pp), timeout_s, f"{what} (receive)", peer)
    return t


def last_stage_to_all(t: torch.Tensor, pg_collection: "ProcessGroupCollection", *, timeout_s: Optional[float],
                      what: str) -> torch.Tensor:
    """The last pipeline stage's ``t`` on every stage of this pipeline (same TP rank), in place.

    Every stage passes a tensor of the same shape and dtype (the earlier stages a buffer to fill).
    One bounded broadcast over ``pg_collection.pp``; a no-op without pipeline parallelism.
    """
    stage = stage_info(pg_collection)
    if stage.pp_size == 1:
        return t
    src = dist.get_global_rank(pg_collection.pp, stage.pp_size - 1)
    return group_broadcast(t.contiguous(), src, pg_collection.pp, timeout_s=timeout_s, what=what,
                           peer=f"the last pipeline stage (global rank {src})")
