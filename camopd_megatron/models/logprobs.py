"""Per-token log-probs of a sequence from this rank's vocab shard of the model's logits.

Glue between megatron's output (``[B, T, V_pad / TP]`` logits, vocab-parallel) and the
vocab-parallel kernels of :mod:`camopd_megatron.ops`: the shard's first column is
``tp_rank * V_local`` and padded columns ``>= model.vocab_size`` are masked by the kernel.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from camopd_megatron.ops import KeptSoftmaxBuffer, fused_output_logprobs, sampled_token_logprobs


def vocab_start(logits_BTV: torch.Tensor, tp_group: Any) -> int:
    """First global vocab column of this rank's shard."""
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    return tp_rank * logits_BTV.shape[-1]


def next_token_logprobs(
    logits_BTV: torch.Tensor,
    tokens_BT: torch.Tensor,
    tp_group: Any,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    mask_BT: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    first_position: int = 0,
    output_weight: Optional[torch.Tensor] = None,
    kept_buffer: Optional[KeptSoftmaxBuffer] = None,
) -> torch.Tensor:
    """``out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`` for t < T-1; column T-1 is 0.

    Args:
        logits_BTV: the last stage's logits (this rank's vocab shard), ``[B, W, V]`` for positions
            ``first_position .. first_position + W - 1`` (W = T by default) — or, with
            ``output_weight``, the final hidden states ``[B, W, H]`` of an ``output_window``.
            Positions outside the window score 0.
        tokens_BT: the input tokens.
        tp_group: the role's TP group (None = unsharded).
        vocab_size: the real (unpadded) vocabulary.
        temperature: softmax over logits / temperature (the rollout's π and μ use the same T).
        mask_BT: optional mask over *target* positions (aligned with the output): 0 → score 0, no grad.
        first_position: the position of the logits' first column.
        output_weight: this rank's output weight rows ``[V / TP, H]`` (``models.gpt.output_weight``):
            the input is hidden states and the projection is fused into the log-prob
            (:func:`camopd_megatron.ops.fused_output_logprobs`; no logits tensor is built).
        kept_buffer: with ``output_weight`` and grad, the memory its kept softmax reuses from call to call.
    Returns:
        fp32 ``[B, T]`` (differentiable w.r.t. the logits when they require grad).
    """
    targets_BT = torch.full_like(tokens_BT, -100)
    targets_BT[:, :-1] = tokens_BT[:, 1:]
    if mask_BT is not None:
        targets_BT = torch.where(mask_BT.bool(), targets_BT, torch.full_like(targets_BT, -100))
    t, w = tokens_BT.shape[1], logits_BTV.shape[1]
    if first_position < 0 or first_position + w > t:
        raise ValueError(f"logits cover positions [{first_position}, {first_position + w}), outside the "
                         f"{t} tokens; pass the micro-batch's output_window[0] as first_position")
    targets_BW = targets_BT[:, first_position:first_position + w]
    if output_weight is not None:
        logp_BW = fused_output_logprobs(logits_BTV, output_weight, targets_BW, tp_group, vocab_size=vocab_size,
                                        temperature=temperature, chunk_tokens=chunk_tokens, kept_buffer=kept_buffer)
    else:
        logp_BW = sampled_token_logprobs(
            logits_BTV, targets_BW, tp_group, vocab_start=vocab_start(logits_BTV, tp_group), vocab_size=vocab_size,
            chunk_tokens=chunk_tokens, temperature=temperature,
        )
    if w == t:
        return logp_BW
    return torch.nn.functional.pad(logp_BW, (first_position, t - first_position - w))
