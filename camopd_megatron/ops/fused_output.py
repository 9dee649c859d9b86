"""Sampled-token log-probs straight from hidden states and the vocab-sharded output weight.

    log p(y_n) = (x_n[y_n] − M_n) − log S_n,   x_n = (h_n W_rᵀ) / T over every rank r's vocab rows W_r

:func:`camopd_megatron.ops.sampled_token_logprobs` takes logits; this op takes what produces them,
the final hidden states ``h`` [..., H] (replicated over the TP group, as megatron's output layer
receives them) and this rank's output weight shard ``W`` [V_local, H], and never builds the
[tokens, V_local] logits: the output projection, the softmax statistics and, in backward, the logit
gradient run chunk by chunk. On a CPU the full logits were the step's largest memory traffic: at
h512 / vocab 32000 / 1024 scored tokens, their fp32 copy, transpose, zero-filled gradient and slice
copies were ~40 % of the training forward + backward (BENCHMARKS.md). The math and the collectives
are those of the logits kernel (two all-reduces in forward, whatever the chunking; the same
:class:`~camopd_megatron.ops.vocab_parallel.RowStats`, so the max is subtracted before log S is added
and large logits keep fp32 precision); backward adds the
all-reduce SUM of dL/dh over the TP group that megatron's column-parallel output layer does.

Gradients, with p = softmax(x) and g the incoming gradient per token:
    G = (onehot(y) − p) · g / T            [C, V_local], one chunk (or all rows) at a time
    dL/dh = Σ_r G_r W_r    (all-reduce over TP),    dL/dW_r = Gᵀ h

Backward needs p again: it keeps the forward's exp(x − shift) when it is small enough
(``keep_softmax_bytes``, one fp32 [tokens, V_local] tensor at most, as megatron's cross-entropy keeps its
softmax), and otherwise projects each chunk again.

Chunks. Kept: the forward projects all rows in one product into one [N, V_local] buffer, and backward
turns that buffer into dL/dx in place and runs each of its two products once over all rows (dL/dW is
read and written once, not once per chunk; the weight is streamed once per product). Not kept:
``chunk_tokens`` rows per product, into one buffer reused chunk after chunk (a fresh allocation of that
size is page-faulted in every time); the default keeps it near ``DEFAULT_FUSED_CHUNK_ELEMENTS`` (32 MiB),
larger than the logits kernel's default on purpose: every chunk adds into the whole [V_local, H] weight
gradient, so fewer chunks move less memory. Without grad, rows whose logits fit ``keep_softmax_bytes``
take one product. Either way the elementwise softmax passes (max, exp, sum; in backward the scale and the
one-hot) run ``DEFAULT_BLOCK_ELEMENTS`` (~4 MiB) at a time, so that the passes over a block stay in cache.
The products are the same; only their blocking, hence the fp32 rounding of the sums, depends on the path.

The weight is used directly, not through the output layer module, so the caller owns what that
module's forward would do first: with megatron's ``overlap_param_gather`` the weight's all-gather is
waited for in the output layer's forward pre-hook, which the output window of
:mod:`camopd_megatron.models.pipeline` runs in the layer's place before this op reads the weight; MuP
logit scaling is not applied (:func:`camopd_megatron.models.pipeline.model_forward` refuses it).

Under megatron's DDP the weight gradient is added straight into the parameter's fp32 ``main_grad``
buffer (megatron's gradient-accumulation-fusion contract: ``grad_added_to_main_grad`` is set and a dummy
gradient is returned, which the DDP hook skips).

Shape legend: N tokens (leading dims flattened), H hidden, V = V_local, C tokens per chunk, K = 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from camopd_megatron.ops.vocab_parallel import (
    IGNORE_INDEX,
    ProcessGroup,
    RowStats,
    _group_size_rank,
    _live,
    _prepare_targets,
    _validate,
    exp_shifted_,
    reduce_stats,
)

__all__ = ["DEFAULT_FUSED_CHUNK_ELEMENTS", "DEFAULT_KEEP_SOFTMAX_BYTES", "fused_output_logprobs"]

DEFAULT_FUSED_CHUNK_ELEMENTS = 2**23
DEFAULT_KEEP_SOFTMAX_BYTES = 2**29
"""Keep the forward's exp(logits) for backward up to 512 MiB (one fp32 [tokens, V_local]); beyond that,
backward projects again. Keeping trades N·V·4 bytes for a whole projection, 2·N·V·H FLOPs: at h512 / V 32000
/ 1024 tokens (131 MB) it saved ~12 % of the training forward + backward on CPU; at the Qwen vocabulary
(V 151,936, 512 scored tokens, 311 MB) the projection it saves is 40 GFLOP, a quarter of the output layer's
training work (BENCHMARKS.md)."""
DEFAULT_BLOCK_ELEMENTS = 2**20
"""Rows per pass of the elementwise softmax work (max, exp, sum; in backward the scale and the one-hot),
~4 MiB of fp32: the passes over one block run in the last-level cache instead of streaming a whole
[chunk, V_local] buffer from memory once per pass."""


def _project_(h_CH: torch.Tensor, weight_VH: torch.Tensor, out_CV: torch.Tensor, layout,
              temperature: float) -> torch.Tensor:
    """``out_CV`` ← fp32 scaled logits of the rows ``h_CH``, padding columns at -inf. The buffer is reused
    chunk after chunk: a fresh [chunk, V_local] allocation is mapped and page-faulted in every time, at a
    fraction of the memory bandwidth."""
    if h_CH.dtype == torch.float32 and weight_VH.dtype == torch.float32:
        torch.mm(h_CH, weight_VH.t(), out=out_CV)
    else:
        out_CV.copy_(F.linear(h_CH, weight_VH))
    if temperature != 1.0:
        out_CV.div_(temperature)
    if layout.pad_from < layout.v_local:
        out_CV[:, layout.pad_from:] = float("-inf")
    return out_CV


def _forward_stats(hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk, block,
                   keep: bool = False) -> tuple[RowStats, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The group's RowStats (max, log Σexp, target logits). Projects ``chunk`` rows at a time into one
    reused buffer; with ``keep``, all rows in one product into one [N, V_local] buffer that is returned
    holding exp(x − shift_N), with shift_N (backward then needs no second projection). The softmax passes
    run ``block`` rows at a time."""
    n, v = layout.n_tokens, weight_VH.shape[0]
    dev = hidden_NH.device
    m_N = torch.empty(n, dtype=torch.float32, device=dev)
    s_N = torch.empty_like(m_N)
    tgt_NK = torch.zeros(tgt_local_NK.shape, dtype=torch.float32, device=dev)
    shift_N = torch.empty_like(m_N) if keep else None
    rows = n if keep else min(chunk, n)
    buf = torch.empty(rows, v, dtype=torch.float32, device=dev)
    for c0 in range(0, n, max(rows, 1)):
        c1 = min(c0 + rows, n)
        x_CV = _project_(hidden_NH[c0:c1], weight_VH, buf[: c1 - c0], layout, temperature)
        for b0 in range(c0, c1, block):
            b1 = min(b0 + block, c1)
            x_BV = x_CV[b0 - c0:b1 - c0]
            owned_BK, tgt_BK = owned_NK[b0:b1], tgt_local_NK[b0:b1]
            idx_BK = torch.where(owned_BK, tgt_BK, torch.zeros_like(tgt_BK))
            tgt_NK[b0:b1] = torch.where(owned_BK, x_BV.gather(1, idx_BK), torch.zeros_like(idx_BK, dtype=torch.float32))
            m_N[b0:b1], shift_B, s_N[b0:b1] = exp_shifted_(x_BV)  # x_BV now holds exp(x − shift)
            if keep:
                shift_N[b0:b1] = shift_B
    return reduce_stats(m_N, s_N, tgt_NK, layout, tp_group), shift_N, (buf if keep else None)


def _grad_logits_(p_BV: torch.Tensor, neg_g_scale_B: torch.Tensor, idx_BK: torch.Tensor, src_BK: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """In place exp(x − shift) → dL/dx = (onehot(y) − p) · g / T for one block of rows."""
    p_BV.mul_(neg_g_scale_B.unsqueeze(-1))  # −p · g
    p_BV.scatter_add_(1, idx_BK, src_BK)  # + onehot · g
    if temperature != 1.0:
        p_BV.div_(temperature)
    return p_BV


def _accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """True for a parameter of megatron's DDP (an fp32 ``main_grad`` buffer and the
    ``grad_added_to_main_grad`` flag): backward then adds dL/dW into ``main_grad`` in place, as megatron's
    linear layers do with gradient-accumulation fusion, instead of allocating a [V, H] gradient that the
    DDP hook adds in a second pass."""
    main = getattr(weight, "main_grad", None)
    return (isinstance(main, torch.Tensor) and hasattr(weight, "grad_added_to_main_grad")
            and not getattr(weight, "zero_out_wgrad", False) and main.dtype == torch.float32
            and main.shape == weight.shape)


class _FusedOutputLogProb(torch.autograd.Function):
    """Saves the hidden states, the weight (both held by the graph anyway), M_N and log S_N, and with ``keep`` the
    forward's [N, V_local] exp buffer (consumed in place by the one backward)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk, block, keep):
        stats, shift_N, kept = _forward_stats(hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group,
                                              temperature, chunk, block, keep)
        ctx.save_for_backward(hidden_NH, weight_VH, tgt_local_NK, owned_NK, stats.max_N, stats.log_sum_N,
                              shift_N if keep else stats.max_N.new_empty(0))
        ctx.layout, ctx.tp_group, ctx.temperature, ctx.chunk, ctx.block = layout, tp_group, temperature, chunk, block
        ctx.keep, ctx.kept = keep, kept
        return stats.logprobs(stats.target_NK, _live(tgt_local_NK))

    @staticmethod
    def backward(ctx, g_logp_NK):
        hidden_NH, weight_VH, tgt_local_NK, owned_NK, max_N, log_sum_N, shift_N = ctx.saved_tensors
        stats = RowStats(max_N, log_sum_N, None)
        if ctx.keep and ctx.kept is None:
            raise RuntimeError("fused_output_logprobs: backward ran twice on a graph that kept its softmax chunks "
                               "(they are consumed in place); recompute the forward instead of retain_graph=True")
        kept, ctx.kept = ctx.kept, None
        layout, temperature, chunk, block = ctx.layout, ctx.temperature, ctx.chunk, ctx.block
        g_NK = torch.where(_live(tgt_local_NK), g_logp_NK.float(), torch.zeros_like(g_logp_NK, dtype=torch.float32))
        # p = exp(x − shift) · probs_scale(shift): with the forward's kept buffer shift is the local max,
        # when projecting again it is M itself (probs_scale = 1 / S)
        neg_g_N = -g_NK.sum(dim=-1)
        neg_g_scale_N = neg_g_N * stats.probs_scale(shift_N if ctx.keep else max_N)
        idx_NK = torch.where(owned_NK, tgt_local_NK, torch.zeros_like(tgt_local_NK))
        src_NK = torch.where(owned_NK, g_NK, torch.zeros_like(g_NK))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h_NH = torch.empty_like(hidden_NH) if need_h else None
        into_main = need_w and _accumulates_into_main_grad(weight_VH)
        grad_w_VH = weight_VH.main_grad if into_main else None  # else allocated by the first chunk's product
        n = layout.n_tokens
        # with the kept buffer: the logit gradient of all rows in place, then each product once over all N
        # rows (fp32; other dtypes cast ``chunk`` rows at a time); one pass over dL/dW instead of one per chunk
        rows = (n if weight_VH.dtype == torch.float32 else chunk) if ctx.keep else min(chunk, n)
        buf = None if ctx.keep else torch.empty(rows, weight_VH.shape[0], dtype=torch.float32, device=hidden_NH.device)
        for c0 in range(0, n, max(rows, 1)):
            c1 = min(c0 + rows, n)
            h_CH = hidden_NH[c0:c1]
            if ctx.keep:  # the forward's exp(x − shift) rows
                x_CV = kept[c0:c1]
            else:
                x_CV = _project_(h_CH, weight_VH, buf[: c1 - c0], layout, temperature)
            for b0 in range(c0, c1, block):
                b1 = min(b0 + block, c1)
                x_BV = x_CV[b0 - c0:b1 - c0]
                if not ctx.keep:
                    x_BV.sub_(max_N[b0:b1].unsqueeze(-1)).exp_()
                _grad_logits_(x_BV, neg_g_scale_N[b0:b1], idx_NK[b0:b1], src_NK[b0:b1], temperature)
            if need_h:
                torch.mm(x_CV.to(weight_VH.dtype), weight_VH, out=grad_h_NH[c0:c1])
            if need_w:  # from the fp32 logit gradient (no round trip through a bf16 weight's dtype)
                g_t, h_f = x_CV.t(), h_CH.float()
                grad_w_VH = torch.mm(g_t, h_f) if grad_w_VH is None else grad_w_VH.addmm_(g_t, h_f)
            del x_CV
        del kept, buf
        if need_h and layout.tp_size > 1:  # h was replicated over the group: its gradient sums the shards'
            dist.all_reduce(grad_h_NH, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        if into_main:  # megatron's gradient-accumulation-fusion contract: a dummy grad the DDP hook skips
            weight_VH.grad_added_to_main_grad = True
            return grad_h_NH, torch.empty_like(weight_VH), None, None, None, None, None, None, None, None
        if need_w and grad_w_VH is None:  # no tokens
            grad_w_VH = torch.zeros_like(weight_VH)
        if need_w and grad_w_VH.dtype != weight_VH.dtype:
            grad_w_VH = grad_w_VH.to(weight_VH.dtype)
        return grad_h_NH, grad_w_VH, None, None, None, None, None, None, None, None


def fused_output_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    keep_softmax_bytes: int = DEFAULT_KEEP_SOFTMAX_BYTES,
) -> torch.Tensor:
    """log p(targets) fp32 [...] from hidden states [..., H] and this rank's output weight rows.

    Args:
        hidden: final (normalised) hidden states, the same on every rank of ``tp_group``.
        weight_shard: this rank's rows ``[tp_rank·V_local, (tp_rank+1)·V_local)`` of the padded output
            weight, [V_local, H]; rows ``>= vocab_size`` are padding and never count.
        targets: global vocab ids [...] aligned with ``hidden`` (``ignore_index``: score 0, no grad).
        tp_group: the group the vocabulary is sharded over (None: unsharded, no communication).
        vocab_size: the real vocabulary.
        temperature: the softmax is over logits / temperature.
        chunk_tokens: tokens per chunk (None: ~DEFAULT_FUSED_CHUNK_ELEMENTS fp32 per chunk buffer).
        keep_softmax_bytes: with grad, keep the forward's fp32 exp(logits) for backward when they take at
            most this many bytes (one [tokens, V_local] fp32 tensor) instead of projecting again; 0 always
            recomputes (the smallest memory). Without grad and with the automatic chunk, rows whose logits
            fit this budget are projected in one product.

    Differentiable w.r.t. ``hidden`` and ``weight_shard`` when grad is enabled.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError("hidden: expected a floating tensor [..., H]")
    if not isinstance(weight_shard, torch.Tensor) or weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        got = tuple(weight_shard.shape) if isinstance(weight_shard, torch.Tensor) else type(weight_shard).__name__
        raise ValueError(f"weight_shard: expected [V_local, H={hidden.shape[-1]}] (the output layer's rows on this "
                         f"rank), got {got}")
    lead = tuple(hidden.shape[:-1])
    v_local = weight_shard.shape[0]
    _, tp_rank = _group_size_rank(tp_group)
    # the logits kernel's checks (shapes, ids, vocab, cross-rank agreement) on a zero-stride stand-in
    # with the logits' shape: no memory is allocated for it
    stand_in = hidden.new_zeros(()).expand(*lead, v_local)
    layout = _validate(stand_in, targets, None, tp_group, vocab_start=tp_rank * v_local, vocab_size=vocab_size,
                       temperature=temperature, chunk_tokens=chunk_tokens, ignore_index=ignore_index)
    chunk = chunk_tokens if chunk_tokens is not None else max(1, DEFAULT_FUSED_CHUNK_ELEMENTS // v_local)
    block = min(chunk, max(1, DEFAULT_BLOCK_ELEMENTS // v_local))
    hidden_NH = hidden.reshape(layout.n_tokens, hidden.shape[-1])
    tgt_local_NK, owned_NK = _prepare_targets(targets, None, layout, ignore_index, hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad):
        keep = layout.n_tokens * v_local * 4 <= keep_softmax_bytes
        logp_NK = _FusedOutputLogProb.apply(hidden_NH, weight_shard, tgt_local_NK, owned_NK, layout, tp_group,
                                            float(temperature), chunk, block, keep)
    else:
        # no backward to feed: with the automatic chunk, all rows in one product when their logits fit the
        # same budget (the weight is streamed once instead of once per chunk), else chunk by chunk
        if chunk_tokens is None and layout.n_tokens * v_local * 4 <= keep_softmax_bytes:
            chunk = max(1, layout.n_tokens)
        with torch.no_grad():
            stats, _, _ = _forward_stats(hidden_NH, weight_shard, tgt_local_NK, owned_NK, layout, tp_group,
                                         float(temperature), chunk, block)
            logp_NK = stats.logprobs(stats.target_NK, _live(tgt_local_NK))
    return logp_NK.view(lead)
