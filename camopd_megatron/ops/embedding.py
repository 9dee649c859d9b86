"""Embedding lookup whose weight gradient goes into the touched rows of megatron's ``main_grad`` only.

``F.embedding``'s backward builds a dense [V, H] gradient (zero-filled, then the looked-up rows added) and
megatron DDP's hook adds all of it into ``main_grad``: two passes over the whole table per micro-batch for a
gradient with at most B·T non-zero rows. At the Qwen vocabulary (V = 151,936, H = 256) that was ~40 ms of a
~1.2 s train stage on CPU, per micro-batch (BENCHMARKS.md); with the table sharded over TP, the same for each
rank's [V / TP, H] shard. This lookup adds the B·T rows into ``main_grad`` (``index_add_``, fp32) and follows
megatron's gradient-accumulation-fusion contract (:mod:`camopd_megatron.ops.main_grad`); without a
``main_grad`` (no DDP) it returns the dense gradient as ``F.embedding`` does. Forward is ``F.embedding``
itself. The sums are the same; only the order in which repeated ids are added differs.

With ``vocab_start`` (a vocab-sharded table whose rows are ids [vocab_start, vocab_start + rows)), the other
ids' output rows are 0 and get no gradient, as in megatron's ``VocabParallelEmbedding`` before its TP reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from camopd_megatron.ops.main_grad import accumulates_into_main_grad, added_to_main_grad

__all__ = ["embedding_lookup"]


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, owned):
        ctx.save_for_backward(ids, weight, owned)
        out = F.embedding(ids, weight)
        if owned is not None:
            out.masked_fill_(~owned.unsqueeze(-1), 0.0)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, weight, owned = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        idx, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if owned is not None:  # only the rows this shard holds
            keep = owned.reshape(-1)
            idx, rows = idx[keep], rows[keep]
        if accumulates_into_main_grad(weight):
            weight.main_grad.index_add_(0, idx, rows.to(weight.main_grad.dtype))
            return None, added_to_main_grad(weight), None
        return None, torch.zeros_like(weight).index_add_(0, idx, rows.to(weight.dtype)), None


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor, vocab_start: Optional[int] = None) -> torch.Tensor:
    """``F.embedding(ids, weight)`` whose weight gradient, under megatron DDP, is added into the looked-up rows
    of ``weight.main_grad``. ``vocab_start``: ``weight`` is the shard of global ids [vocab_start, vocab_start +
    weight.shape[0]); an id outside it gives a zero row and no gradient (None: the whole table)."""
    if vocab_start is None:
        return _Lookup.apply(ids, weight, None)
    local = ids - vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    return _Lookup.apply(torch.where(owned, local, torch.zeros_like(local)), weight, owned)
