"""Global top-k over vocab-sharded logits (the rollout's top-k sampling, ``rollout.top_k``).

Local top-k per shard (chunked over tokens) → all-gather of k·TP (value, global index) candidates →
global top-k. Ties are broken towards the LOWER global vocab index everywhere: the result equals
the first k entries of the full row sorted by (−value, index), which is what a stable descending
sort of the gathered logits gives. ``torch.topk`` alone does not guarantee which of several equal
values it keeps at the k-th boundary (bf16 logits tie often), so each shard repairs rows whose k-th
value is tied: it keeps every value above the k-th and the lowest-indexed ones equal to it.

No gradient flows through the selection.

Shape legend: N = tokens (leading dims flattened), V = V_local, C = tokens of one chunk,
k = requested top-k, L = min(k, V_local) local candidates, P = tp_size · L gathered candidates.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from camopd_megatron.ops.vocab_parallel import (
    DEFAULT_CHUNK_TOKENS,
    ProcessGroup,
    _global_stats,
    _scaled_chunk,
    _validate,
)


def _local_topk(x_CV: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n_keep`` of each row with boundary ties resolved to the lowest column index (unordered)."""
    vals_CL, idx_CL = x_CV.topk(n_keep, dim=-1, sorted=False)
    tau_C1 = vals_CL.amin(dim=-1, keepdim=True)
    n_at_least_C = (x_CV >= tau_C1).sum(dim=-1)
    tied_R = torch.nonzero(n_at_least_C > n_keep).view(-1)
    if tied_R.numel():
        x_RV, tau_R1 = x_CV[tied_R], tau_C1[tied_R]
        above_RV = x_RV > tau_R1
        equal_RV = x_RV == tau_R1
        need_R1 = n_keep - above_RV.sum(dim=-1, keepdim=True)
        keep_RV = above_RV | (equal_RV & (equal_RV.cumsum(dim=-1) <= need_R1))
        cols_RL = torch.nonzero(keep_RV)[:, 1].view(-1, n_keep)  # row-major: ascending columns per row
        idx_CL[tied_R] = cols_RL
        vals_CL[tied_R] = x_RV.gather(1, cols_RL)
    return vals_CL, idx_CL


def sort_by_value_then_index(values_NP: torch.Tensor, indices_NP: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First k of each row ordered by (−value, index): descending values, ties → lower index first."""
    order_NP = indices_NP.argsort(dim=-1)
    by_index_vals = values_NP.gather(-1, order_NP)
    by_index_ids = indices_NP.gather(-1, order_NP)
    # a stable descending sort keeps the ascending-index order among equal values
    vals_sorted, pos = by_index_vals.sort(dim=-1, descending=True, stable=True)
    return vals_sorted[..., :k], by_index_ids.gather(-1, pos[..., :k])


@torch.no_grad()
def vocab_parallel_topk(
    logits_shard: torch.Tensor,
    k: int,
    tp_group: ProcessGroup,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    return_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of softmax(logits / temperature) over the real vocabulary; same result on every rank.

    Returns:
        values [..., k] fp32 — logits / temperature, or log-probs when ``return_logprobs`` — in
        descending order, ties ordered by ascending id; ids [..., k] int64 global vocab ids.
    """
    layout = _validate(logits_shard, None, None, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                       temperature=temperature, chunk_tokens=chunk_tokens, k_top=k)
    n, v_local = layout.n_tokens, layout.v_local
    logits_NV = logits_shard.detach().reshape(n, v_local)
    n_keep = min(k, v_local)
    vals_NL = torch.empty(n, n_keep, dtype=torch.float32, device=logits_NV.device)
    ids_NL = torch.empty(n, n_keep, dtype=torch.int64, device=logits_NV.device)
    for c0 in range(0, n, layout.chunk):
        c1 = min(c0 + layout.chunk, n)
        x_CV = _scaled_chunk(logits_NV[c0:c1], layout, temperature)
        vals_NL[c0:c1], idx_CL = _local_topk(x_CV, n_keep)
        ids_NL[c0:c1] = idx_CL + vocab_start
        del x_CV
    if layout.tp_size > 1 and n:
        vals_parts = [torch.empty_like(vals_NL) for _ in range(layout.tp_size)]
        ids_parts = [torch.empty_like(ids_NL) for _ in range(layout.tp_size)]
        dist.all_gather(vals_parts, vals_NL, group=tp_group)
        dist.all_gather(ids_parts, ids_NL, group=tp_group)
        vals_NP, ids_NP = torch.cat(vals_parts, dim=-1), torch.cat(ids_parts, dim=-1)
    else:
        vals_NP, ids_NP = vals_NL, ids_NL
    top_vals_Nk, top_ids_Nk = sort_by_value_then_index(vals_NP, ids_NP, k)
    if return_logprobs:
        no_targets = torch.empty(n, 0, dtype=torch.int64, device=logits_NV.device)
        stats = _global_stats(logits_NV, no_targets, no_targets.bool(), layout, tp_group, float(temperature),
                              layout.chunk)
        top_vals_Nk = stats.logprobs(top_vals_Nk)
    shape = layout.lead_shape + (k,)
    return top_vals_Nk.reshape(shape), top_ids_Nk.reshape(shape)


__all__ = ["vocab_parallel_topk", "sort_by_value_then_index"]
