"""Embedding lookup whose weight gradient goes into the touched rows of megatron's ``main_grad`` only.

``F.embedding``'s backward builds a dense [V, H] gradient (zero-filled, then the looked-up rows added) and
megatron DDP's hook adds all of it into ``main_grad``: two passes over the whole table per micro-batch for a
gradient with at most B·T non-zero rows. At the Qwen vocabulary (V = 151,936, H = 256) that was ~40 ms of a
~1.2 s train stage on CPU, per micro-batch (BENCHMARKS.md). This lookup adds the B·T rows into ``main_grad``
(``index_add_``, fp32) and follows megatron's gradient-accumulation-fusion contract
(:mod:`camopd_megatron.ops.main_grad`); without a ``main_grad`` (no DDP) it returns the dense gradient as
``F.embedding`` does. Forward is ``F.embedding`` itself. The sums are the same; only the order in which
repeated ids are added differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from camopd_megatron.ops.main_grad import accumulates_into_main_grad, added_to_main_grad

__all__ = ["embedding_lookup"]


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        idx, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if accumulates_into_main_grad(weight):
            weight.main_grad.index_add_(0, idx, rows.to(weight.main_grad.dtype))
            return None, added_to_main_grad(weight)
        return None, torch.zeros_like(weight).index_add_(0, idx, rows.to(weight.dtype))


def embedding_lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` whose weight gradient, under megatron DDP, is added into the looked-up rows
    of ``weight.main_grad``."""
    return _Lookup.apply(ids, weight)
