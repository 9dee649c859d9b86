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

Logits window. A micro-batch may carry ``"logits_window": (lo, hi)`` (see :func:`logits_window`): the
last stage then projects only the hidden states of positions ``[lo, hi)`` through the output layer
(megatron's ``output_processor`` hook), and ``loss_fn`` gets logits ``[B, hi - lo, V]`` whose first
column is position ``lo``. Scoring a response never needs the prompt positions' logits, and the
output layer is the largest matmul of a small-hidden, large-vocab model (BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from camopd_megatron.cpu_compat import ensure_cpu_compat
from camopd_megatron.models.gpt import stage_info, unwrap_model

ensure_cpu_compat()

from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator  # noqa: E402

LossFn = Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(batch, logits_BTV) -> (scalar loss, outputs)``; outputs are collected per micro-batch."""


def logits_window(mask_BT: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the output positions some row scores (``mask_BT`` aligned with the outputs, as
    ``next_token_logprobs`` takes it). An all-zero mask gives ``(0, 1)``: one column keeps the output
    layer in the graph, so every rank still produces its (zero) gradient."""
    cols = mask_BT.detach().ne(0).any(dim=0).nonzero().flatten()
    if cols.numel() == 0:
        return 0, 1
    return int(cols[0]), int(cols[-1]) + 1


def _window_output(lo: int, hi: int) -> Callable[..., torch.Tensor]:
    """megatron ``output_processor``: the output layer on hidden states ``[lo, hi)`` only."""

    def project(*, hidden_states: torch.Tensor, output_layer: Any, output_weight: Any, scale_logits: Callable,
                runtime_gather_output: Optional[bool] = None, **_: Any) -> torch.Tensor:
        logits_WBV, _ = output_layer(hidden_states[lo:hi], weight=output_weight,
                                     runtime_gather_output=runtime_gather_output)
        return scale_logits(logits_WBV).transpose(0, 1).contiguous()

    return project


def model_forward(model: Any, tokens_BT: torch.Tensor, position_ids_BT: Optional[torch.Tensor] = None,
                  window: Optional[tuple[int, int]] = None, **kwargs: Any) -> torch.Tensor:
    """One forward of a (possibly wrapped) GPTModel with the causal mask: logits ``[B, T, V/TP]``
    (``[B, hi - lo, V/TP]`` with ``window=(lo, hi)``) on the last stage, hidden states on the others."""
    if position_ids_BT is None:
        position_ids_BT = torch.arange(tokens_BT.shape[1], device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)
    if window is not None:
        lo, hi = window
        if not 0 <= lo < hi <= tokens_BT.shape[1]:
            raise ValueError(f"window={window!r}: expected 0 <= lo < hi <= {tokens_BT.shape[1]} (the sequence length)")
        if getattr(unwrap_model(model).config, "sequence_parallel", False):
            raise ValueError("window: the output layer sees sequence-parallel shards; use window=None with "
                             "parallel.sequence_parallel=true")
        kwargs["output_processor"] = _window_output(lo, hi)
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
            ``logits_window`` (module docstring), and whatever ``loss_fn`` needs; the same list on
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
        output = model_forward(chunk, batch["tokens"], batch.get("position_ids"), window=batch.get("logits_window"))

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
