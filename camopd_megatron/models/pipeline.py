"""Run forward (and backward) over micro-batches with megatron's schedules and explicit groups.

One entry point, :func:`run_microbatches`, serves PP = 1 and PP > 1 alike: it picks megatron's
schedule for the role's pipeline size (``get_forward_backward_func(pp_size=...)``), hands it the
role's ``pg_collection`` and a ``P2PCommunicator`` on the role's PP group (both are needed with
explicit groups; either alone raises), and calls ``loss_fn(batch, logits_BTV)`` on the last stage.

Loss scaling. megatron divides each micro-batch's loss by the number of micro-batches (legacy two-
value loss functions). Our losses already carry their global normaliser (CAMOPD.md §4: the mean over
the kept set across DP ranks and micro-batches), so the returned loss is multiplied back by the
micro-batch count: the gradient is exactly that of ``Σ_mb loss_fn(mb)``.

Shapes. Every micro-batch in one call has the same ``[B, T]`` (pad the batch first): the pipeline's
receive buffers are allocated from ``(T, B, hidden)``. Legend: B batch, T tokens, W window, V vocab shard.

Output window. A micro-batch may carry ``"output_window": (lo, hi)`` (see :func:`output_window`):
the last stage then returns the final hidden states of positions ``[lo, hi)``, ``[B, hi - lo, H]``,
instead of logits (megatron's ``output_processor`` hook), and ``loss_fn`` turns them into log-probs
with ``next_token_logprobs(..., output_weight=output_weight(model), first_position=lo)``: the fused
output projection of :mod:`camopd_megatron.ops.fused_output`, which never builds the [B, T, V] logits.
Scoring a response needs neither the prompt positions' logits nor the full logits tensor, and on a
CPU the output layer and its logits were the largest cost of a small-hidden, large-vocab model
(BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from camopd_megatron.models.gpt import stage_info, unwrap_model

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


def _window_hidden(lo: int, hi: int) -> Callable[..., torch.Tensor]:
    """megatron ``output_processor``: the final hidden states of positions ``[lo, hi)``, ``[B, W, H]``."""

    def window(*, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return hidden_states[lo:hi].transpose(0, 1)

    return window


def model_forward(model: Any, tokens_BT: torch.Tensor, position_ids_BT: Optional[torch.Tensor] = None,
                  window: Optional[tuple[int, int]] = None, **kwargs: Any) -> torch.Tensor:
    """One forward of a (possibly wrapped) GPTModel with the causal mask: logits ``[B, T, V/TP]`` on the
    last stage (with ``window=(lo, hi)``: final hidden states ``[B, hi - lo, H]``), hidden states on the
    others."""
    if position_ids_BT is None:
        position_ids_BT = torch.arange(tokens_BT.shape[1], device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)
    if window is not None:
        lo, hi = window
        if not 0 <= lo < hi <= tokens_BT.shape[1]:
            raise ValueError(f"window={window!r}: expected 0 <= lo < hi <= {tokens_BT.shape[1]} (the sequence length)")
        config = unwrap_model(model).config
        if getattr(config, "sequence_parallel", False) or getattr(config, "use_mup", False):
            raise ValueError("output window: the fused output projection supports neither sequence_parallel nor MuP "
                             "logit scaling; set parallel.sequence_parallel=false")
        kwargs["output_processor"] = _window_hidden(lo, hi)
    return model(tokens_BT, position_ids_BT, None, **kwargs)


def run_microbatches(
    model: Any,
    pg_collection: Any,
    batches: Sequence[dict[str, Any]],
    loss_fn: LossFn,
    *,
    forward_only: bool,
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

    Returns:
        The ``outputs`` dicts of ``loss_fn`` in micro-batch order on the last stage; [] elsewhere.
    """
    if not batches:
        return []
    shape = tuple(batches[0]["tokens"].shape)
    for i, b in enumerate(batches):
        if tuple(b["tokens"].shape) != shape:
            raise ValueError(f"batches[{i}]['tokens'] has shape {tuple(b['tokens'].shape)}, expected {shape}: pad micro-batches to one shape")
    stage = stage_info(pg_collection)
    config = unwrap_model(model).config
    n = len(batches)

    def forward_step(data_iterator: Any, chunk: Any) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        output = model_forward(chunk, batch["tokens"], batch.get("position_ids"), window=batch.get("output_window"))

        def loss_func(logits_BTV: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            loss, outputs = loss_fn(batch, logits_BTV)
            return loss * n, outputs  # megatron divides by the micro-batch count

        return output, loss_func

    fb = get_forward_backward_func(pp_size=stage.pp_size, vp_size=None)
    kwargs: dict[str, Any] = dict(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=n,
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
        pg_collection=pg_collection,
    )
    if stage.pp_size > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pg_collection.pp, config=config)
    outputs = fb(**kwargs)
    return list(outputs) if stage.is_last else []
