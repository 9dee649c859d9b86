"""Log-probs, entropy and top-k over vocab-sharded logits, without ever gathering the logits.

Each tensor-parallel rank holds ``logits_shard`` [..., V_local], the columns
``[vocab_start, vocab_start + V_local)`` of the padded vocabulary (``V_local * tp_size`` columns in
all; columns ``>= vocab_size``, the real vocabulary, are padding and are masked to -inf). With
x = logits / temperature:

    log p(y) = x[y] − logZ,    logZ = M + log S,   M = max_v x[v],   S = Σ_v exp(x[v] − M)

Forward, per token, takes three one-float reductions over the TP group, like megatron-core's
``vocab_parallel_cross_entropy`` (whose math split we copy), but in two collectives whatever the
chunking: (1) ROW MAX — each rank's local max m_r, all-reduce MAX → M; (2) Σexp and TARGET LOGIT —
each rank's local Σexp(x − m_r) rescaled by exp(m_r − M), and its masked target logit (0 where the
target lives on another rank), one all-reduce SUM of both. Entropy adds one float to (2):
H = log S − Σ_v exp(x − M)(x − M) / S.

Memory: tokens are processed in chunks of ``chunk_tokens``; only per-token statistics (logZ, H) are
kept for backward, which recomputes the softmax chunk by chunk. Peak extra memory is therefore one or
two fp32 [chunk, V_local] buffers, not [tokens, V_local]; the [tokens, V_local] gradient of the shard
itself is unavoidable. Statistics are fp32 whatever the input dtype. The input logits are never
modified (megatron's kernel subtracts the max in place; ours works on fp32 chunk copies).

Gradients, with p = softmax(x) and g the incoming gradient:
    d log p(y) / d logits = (onehot(y) − p) / T · g
    d H / d logits        = −p · (log p + H) / T · g

Shift: the kernels take ALIGNED logits and targets (``targets[t]`` is scored by ``logits[t]``). A
causal LM's logits at position t predict token t+1; :func:`shifted_sampled_token_logprobs` does that
shift on the (small) targets, never copying the logits.

``tp_group`` is a required argument; ``None`` explicitly means "not sharded" (one shard holding the
whole padded vocabulary, no communication) — it never falls back to a global group. All ranks of the
group must pass the same targets/mask. Invalid input raises ``ValueError`` on every rank: local
checks run first and one small all-reduce shares their outcome before any rank raises.

Shape legend: N = tokens (leading dims flattened), V = V_local (vocab columns of this shard),
K = target indices per token (1 for the sampled token, k for top-k), C = tokens in one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]

# Auto chunk: ~8 MiB of fp32 per [chunk, V_local] buffer. Small chunks stay in cache: at V=151,936 on
# one CPU thread a 16-token chunk was 2.5x faster than a 256-token one (and than the naive path).
DEFAULT_CHUNK_ELEMENTS = 2**21
DEFAULT_CHUNK_TOKENS = None  # None → max(1, DEFAULT_CHUNK_ELEMENTS // V_local)
IGNORE_INDEX = -100

# error codes shared over the group so every rank can name the argument another rank rejected
_ERROR_ARGS = ("", "logits_shard", "targets", "mask", "vocab_start", "vocab_size", "temperature",
               "chunk_tokens", "k", "tp_group")


# --------------------------------------------------------------------------- layout and validation
@dataclass(frozen=True)
class _Layout:
    """Validated shard layout of one call."""

    n_tokens: int
    v_local: int
    vocab_start: int
    pad_from: int  # first local column that is padding (== v_local when the shard has none)
    chunk: int  # tokens per chunk (resolved)
    tp_size: int
    lead_shape: tuple[int, ...]


def _group_size_rank(tp_group: ProcessGroup) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _local_errors(logits_shard, targets, mask, tp_group, vocab_start, vocab_size, temperature,
                  chunk_tokens, ignore_index, k_top, n_index) -> tuple[int, str]:
    """First local problem as (error code, message); (0, "") when the input is fine."""
    tp_size, tp_rank = _group_size_rank(tp_group)
    if not isinstance(logits_shard, torch.Tensor) or not logits_shard.is_floating_point() or logits_shard.dim() < 1:
        return 1, "logits_shard: expected a floating tensor [..., V_local] (fp32/bf16/fp16)"
    v_local = logits_shard.shape[-1]
    lead = tuple(logits_shard.shape[:-1])
    if v_local < 1:
        return 1, "logits_shard: the last dim (V_local) must be >= 1"
    if targets is not None:
        if targets.dtype not in (torch.int64, torch.int32):
            return 2, f"targets: expected an int64/int32 tensor of global vocab ids, got dtype {targets.dtype}"
        want = lead if n_index is None else lead + (n_index,)
        if tuple(targets.shape) != want:
            return 2, f"targets: shape {tuple(targets.shape)} must equal logits_shard's leading shape {want}"
        if targets.device != logits_shard.device:
            return 2, f"targets: device {targets.device} must equal logits_shard's device {logits_shard.device}"
    if mask is not None and tuple(mask.shape) != lead:
        return 3, f"mask: shape {tuple(mask.shape)} must equal logits_shard's leading shape {lead}"
    if not isinstance(vocab_size, int) or vocab_size < 1:
        return 5, f"vocab_size: got {vocab_size!r}, expected a positive int (the real, unpadded vocabulary)"
    if v_local * tp_size < vocab_size:
        return 5, (f"vocab_size: {vocab_size} exceeds the padded vocabulary V_local*tp_size = "
                   f"{v_local}*{tp_size} = {v_local * tp_size}; is tp_group the group the vocab is sharded over?")
    if vocab_start != tp_rank * v_local:
        return 4, (f"vocab_start: got {vocab_start}, expected tp_rank*V_local = {tp_rank}*{v_local} = "
                   f"{tp_rank * v_local} (tp_group rank {tp_rank} of {tp_size})")
    if not temperature > 0:
        return 6, f"temperature: got {temperature!r}, expected > 0"
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        return 7, f"chunk_tokens: got {chunk_tokens!r}, expected a positive int or None (auto)"
    if k_top is not None and not (isinstance(k_top, int) and 1 <= k_top <= vocab_size):
        return 8, f"k: got {k_top!r}, expected an int in [1, vocab_size={vocab_size}]"
    if targets is not None and targets.numel():
        live = targets != ignore_index
        if mask is not None:
            live = live & (mask.bool() if n_index is None else mask.bool().unsqueeze(-1))
        vals = targets[live]
        if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= vocab_size):
            return 2, (f"targets: ids must lie in [0, vocab_size={vocab_size}) (or equal ignore_index="
                       f"{ignore_index}); got min {int(vals.min())} max {int(vals.max())}")
    return 0, ""


def _validate(logits_shard, targets, mask, tp_group, *, vocab_start, vocab_size, temperature, chunk_tokens,
              ignore_index=IGNORE_INDEX, k_top=None, n_index=None) -> _Layout:
    """Local checks, then (TP > 1) one int64 all-reduce MAX so that every rank raises together."""
    code, msg = _local_errors(logits_shard, targets, mask, tp_group, vocab_start, vocab_size, temperature,
                              chunk_tokens, ignore_index, k_top, n_index)
    tp_size, _ = _group_size_rank(tp_group)
    if code == 0:
        v_local, n_tokens = logits_shard.shape[-1], logits_shard[..., 0].numel()
    else:
        v_local, n_tokens = 0, 0
    if tp_size > 1:
        info = torch.tensor([code, v_local, -v_local, n_tokens, -n_tokens, vocab_size if code == 0 else 0,
                             -(vocab_size if code == 0 else 0)], dtype=torch.int64)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=tp_group)
        if code:
            raise ValueError(msg)
        if info[0]:
            raise ValueError(f"{_ERROR_ARGS[int(info[0])]}: invalid on another rank of tp_group (see that rank's error)")
        if info[1] != -info[2]:
            raise ValueError(f"logits_shard: V_local differs across tp_group ranks (min {-int(info[2])}, max "
                             f"{int(info[1])}); expected equal shards of the padded vocabulary")
        if info[3] != -info[4]:
            raise ValueError(f"logits_shard: the token count differs across tp_group ranks (min {-int(info[4])}, "
                             f"max {int(info[3])}); expected the same tokens on every rank")
        if info[5] != -info[6]:
            raise ValueError(f"vocab_size: differs across tp_group ranks (min {-int(info[6])}, max {int(info[5])})")
    elif code:
        raise ValueError(msg)
    pad_from = min(max(vocab_size - vocab_start, 0), v_local)
    chunk = chunk_tokens if chunk_tokens is not None else max(1, DEFAULT_CHUNK_ELEMENTS // v_local)
    return _Layout(n_tokens=n_tokens, v_local=v_local, vocab_start=vocab_start, pad_from=pad_from, chunk=chunk,
                   tp_size=tp_size, lead_shape=tuple(logits_shard.shape[:-1]))


# --------------------------------------------------------------------------- the math, named steps
def _scaled_chunk(logits_CV: torch.Tensor, layout: _Layout, temperature: float) -> torch.Tensor:
    """fp32 COPY of a chunk, divided by the temperature, padding columns set to -inf."""
    x_CV = logits_CV.to(torch.float32, copy=True)
    if temperature != 1.0:
        x_CV.div_(temperature)
    if layout.pad_from < layout.v_local:
        x_CV[:, layout.pad_from:] = float("-inf")
    return x_CV


def _local_row_stats(logits_NV, layout, temperature, chunk, with_entropy):
    """Step 1 (local): per token, the shard's max m, Σexp(x − m) and Σexp(x − m)(x − m)."""
    n = layout.n_tokens
    m_N = torch.empty(n, dtype=torch.float32, device=logits_NV.device)
    s_N = torch.empty_like(m_N)
    t_N = torch.zeros_like(m_N) if with_entropy else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        x_CV = _scaled_chunk(logits_NV[c0:c1], layout, temperature)
        m_C = x_CV.amax(dim=-1)
        m_N[c0:c1] = m_C
        # a shard that is all padding has m = -inf: shift by 0 instead so exp() gives 0, not NaN
        x_CV.sub_(torch.where(torch.isinf(m_C), torch.zeros_like(m_C), m_C).unsqueeze(-1))
        if with_entropy:
            e_CV = torch.exp(x_CV)
            s_N[c0:c1] = e_CV.sum(dim=-1)
            if layout.pad_from < layout.v_local:
                x_CV[:, layout.pad_from:] = 0.0  # exp = 0 there; avoid 0 * -inf
            t_N[c0:c1] = torch.bmm(e_CV.unsqueeze(1), x_CV.unsqueeze(2)).view(-1)
            del e_CV
        else:
            s_N[c0:c1] = x_CV.exp_().sum(dim=-1)
        del x_CV
    return m_N, s_N, t_N


def _target_logits(logits_NV, tgt_local_NK, owned_NK, temperature):
    """The (scaled, fp32) logit of each target this shard owns; 0 where another rank owns it."""
    idx_NK = torch.where(owned_NK, tgt_local_NK, torch.zeros_like(tgt_local_NK))
    vals_NK = logits_NV.gather(1, idx_NK).to(torch.float32)
    if temperature != 1.0:
        vals_NK = vals_NK / temperature
    return torch.where(owned_NK, vals_NK, torch.zeros_like(vals_NK))


def _global_stats(logits_NV, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk, with_entropy):
    """Steps 1-3: logZ_N, the summed target logits x_NK, and (optionally) entropy H_N."""
    m_N, s_N, t_N = _local_row_stats(logits_NV, layout, temperature, chunk, with_entropy)
    tgt_NK = _target_logits(logits_NV, tgt_local_NK, owned_NK, temperature)
    return _reduce_stats(m_N, s_N, t_N, tgt_NK, layout, tp_group, with_entropy)


def _reduce_stats(m_N, s_N, t_N, tgt_NK, layout, tp_group, with_entropy):
    """Steps 2-3 from each rank's local (max m, Σexp(x − m), [Σexp·(x − m)], owned target logits)."""
    # step 2: ROW MAX over the group
    M_N = m_N.clone()
    if layout.tp_size > 1 and layout.n_tokens:
        dist.all_reduce(M_N, op=dist.ReduceOp.MAX, group=tp_group)
    # step 3: rescale the local sums to the global max, then one SUM of [Σexp, Σexp·(x−M), target logits]
    m_safe_N = torch.where(torch.isinf(m_N), M_N, m_N)
    scale_N = torch.where(torch.isinf(m_N), torch.zeros_like(m_N), torch.exp(m_safe_N - M_N))
    cols = [(s_N * scale_N).unsqueeze(-1)]
    if with_entropy:
        cols.append((scale_N * (t_N + (m_safe_N - M_N) * s_N)).unsqueeze(-1))
    cols.append(tgt_NK)
    buf_NJ = torch.cat(cols, dim=-1)
    if layout.tp_size > 1 and layout.n_tokens:
        dist.all_reduce(buf_NJ, op=dist.ReduceOp.SUM, group=tp_group)
    S_N = buf_NJ[:, 0]
    logZ_N = M_N + torch.log(S_N)
    entropy_N = torch.log(S_N) - buf_NJ[:, 1] / S_N if with_entropy else None
    return logZ_N, buf_NJ[:, (2 if with_entropy else 1):], entropy_N


def _shard_grad(logits_NV, layout, temperature, chunk, logZ_N, tgt_local_NK, owned_NK, g_logp_NK, g_ent_N,
                entropy_N) -> torch.Tensor:
    """Backward: recompute p chunk by chunk; write (onehot − p)·g/T and −p(log p + H)·g_H/T into one buffer."""
    grad_NV = torch.empty_like(logits_NV)
    n = layout.n_tokens
    g_sum_N = g_logp_NK.sum(dim=-1) if g_logp_NK is not None else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        x_CV = _scaled_chunk(logits_NV[c0:c1], layout, temperature)
        x_CV.sub_(logZ_N[c0:c1].unsqueeze(-1))  # log p
        if g_ent_N is not None:
            p_CV = torch.exp(x_CV)
            if layout.pad_from < layout.v_local:
                x_CV[:, layout.pad_from:] = 0.0  # p = 0 there; avoid 0 * -inf
            x_CV.add_(entropy_N[c0:c1].unsqueeze(-1)).mul_(p_CV).mul_(-g_ent_N[c0:c1].unsqueeze(-1))
            if g_sum_N is not None:
                x_CV.sub_(p_CV.mul_(g_sum_N[c0:c1].unsqueeze(-1)))
            del p_CV
        else:
            x_CV.exp_().mul_(-g_sum_N[c0:c1].unsqueeze(-1))
        if g_logp_NK is not None:
            idx_CK = torch.where(owned_NK[c0:c1], tgt_local_NK[c0:c1], torch.zeros_like(tgt_local_NK[c0:c1]))
            src_CK = torch.where(owned_NK[c0:c1], g_logp_NK[c0:c1], torch.zeros_like(g_logp_NK[c0:c1]))
            x_CV.scatter_add_(1, idx_CK, src_CK)
        if temperature != 1.0:
            x_CV.div_(temperature)
        grad_NV[c0:c1].copy_(x_CV)
        del x_CV
    return grad_NV


class _VocabParallelLogProb(torch.autograd.Function):
    """Autograd wrapper; saves only logZ_N and entropy_N (plus the input logits, held by the graph)."""

    @staticmethod
    def forward(ctx, logits_NV, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk, with_entropy):
        logZ_N, tgt_NK, entropy_N = _global_stats(logits_NV, tgt_local_NK, owned_NK, layout, tp_group,
                                                  temperature, chunk, with_entropy)
        logp_NK = torch.where(_live(tgt_local_NK), tgt_NK - logZ_N.unsqueeze(-1), torch.zeros_like(tgt_NK))
        ctx.save_for_backward(logits_NV, tgt_local_NK, owned_NK, logZ_N,
                              entropy_N if with_entropy else logZ_N.new_empty(0))
        ctx.layout, ctx.temperature, ctx.chunk, ctx.with_entropy = layout, temperature, chunk, with_entropy
        if with_entropy:
            return logp_NK, entropy_N
        dummy = logZ_N.new_zeros(0)
        ctx.mark_non_differentiable(dummy)
        return logp_NK, dummy

    @staticmethod
    def backward(ctx, g_logp_NK, g_ent_N):
        logits_NV, tgt_local_NK, owned_NK, logZ_N, entropy_N = ctx.saved_tensors
        live_NK = _live(tgt_local_NK)
        g_logp_NK = None if g_logp_NK is None or tgt_local_NK.shape[-1] == 0 else \
            torch.where(live_NK, g_logp_NK.float(), torch.zeros_like(g_logp_NK, dtype=torch.float32))
        g_ent_N = g_ent_N.float() if (ctx.with_entropy and g_ent_N is not None) else None
        if g_logp_NK is None and g_ent_N is None:
            return (None,) * 8
        grad_NV = _shard_grad(logits_NV, ctx.layout, ctx.temperature, ctx.chunk, logZ_N, tgt_local_NK, owned_NK,
                              g_logp_NK, g_ent_N, entropy_N if ctx.with_entropy else None)
        return grad_NV, None, None, None, None, None, None, None


_DEAD = torch.iinfo(torch.int64).min  # tgt_local marker of an ignored/masked target


def _live(tgt_local_NK: torch.Tensor) -> torch.Tensor:
    return tgt_local_NK != _DEAD


def _prepare_targets(targets, mask, layout, ignore_index, device):
    """Global ids → local column ids ([N, K], _DEAD where ignored) and the 'owned by this shard' mask."""
    n = layout.n_tokens
    if targets is None:
        tgt_NK = torch.empty(n, 0, dtype=torch.int64, device=device)
    else:
        tgt_NK = targets.reshape(n, -1).to(torch.int64)
    live_NK = tgt_NK != ignore_index
    if mask is not None:
        live_NK = live_NK & mask.reshape(n, 1).bool()
    local_NK = tgt_NK - layout.vocab_start
    owned_NK = live_NK & (local_NK >= 0) & (local_NK < layout.v_local)
    local_NK = torch.where(live_NK, local_NK, torch.full_like(local_NK, _DEAD))
    return local_NK, owned_NK


def _run(logits_shard, targets, mask, tp_group, *, vocab_start, vocab_size, chunk_tokens, temperature,
         ignore_index, with_entropy, n_index):
    layout = _validate(logits_shard, targets, mask, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                       temperature=temperature, chunk_tokens=chunk_tokens, ignore_index=ignore_index, n_index=n_index)
    logits_NV = logits_shard.reshape(layout.n_tokens, layout.v_local)  # a view when contiguous
    tgt_local_NK, owned_NK = _prepare_targets(targets, mask, layout, ignore_index, logits_shard.device)
    if torch.is_grad_enabled() and logits_shard.requires_grad:
        logp_NK, entropy_N = _VocabParallelLogProb.apply(logits_NV, tgt_local_NK, owned_NK, layout, tp_group,
                                                         float(temperature), layout.chunk, with_entropy)
    else:  # teacher / no-grad path: nothing is saved
        with torch.no_grad():
            logZ_N, tgt_NK, entropy_N = _global_stats(logits_NV.detach(), tgt_local_NK, owned_NK, layout, tp_group,
                                                      float(temperature), layout.chunk, with_entropy)
            logp_NK = torch.where(_live(tgt_local_NK), tgt_NK - logZ_N.unsqueeze(-1), torch.zeros_like(tgt_NK))
    if mask is not None and with_entropy:
        entropy_N = entropy_N * mask.reshape(-1).to(entropy_N.dtype)
    return logp_NK, (entropy_N.view(layout.lead_shape) if with_entropy else None), layout


# --------------------------------------------------------------------------- public API
def sampled_token_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) [...] (fp32) from vocab-sharded logits [..., V_local]; optionally also entropy [...].

    Args:
        logits_shard: this rank's columns of the padded vocabulary, any float dtype; ALIGNED with targets.
        targets: global vocab ids [...] (same on every rank); ``ignore_index`` entries score 0.
        tp_group: the group the vocabulary is sharded over (None: unsharded, no communication).
        vocab_start: this rank's first global column (= tp_rank * V_local).
        vocab_size: the real vocabulary; columns >= vocab_size are padding.
        chunk_tokens: tokens per chunk; bounds the extra memory to ~2 fp32 [chunk, V_local] buffers.
            None (default): ~DEFAULT_CHUNK_ELEMENTS per buffer, i.e. max(1, 2**21 // V_local) tokens.
        temperature: the softmax is taken over logits / temperature.
        mask: optional [...] bool/0-1 loss mask; masked tokens score 0 (and have zero gradient).
        return_entropy: also return the per-token entropy of the full distribution (0 where masked).

    Autograd flows when grad is enabled and ``logits_shard.requires_grad``; otherwise nothing is saved.
    """
    logp_NK, entropy, layout = _run(logits_shard, targets, mask, tp_group, vocab_start=vocab_start,
                                    vocab_size=vocab_size, chunk_tokens=chunk_tokens, temperature=temperature,
                                    ignore_index=ignore_index, with_entropy=return_entropy, n_index=None)
    logp = logp_NK.view(layout.lead_shape)
    return (logp, entropy) if return_entropy else logp


def shifted_sampled_token_logprobs(
    logits_shard: torch.Tensor,
    token_ids: torch.Tensor,
    tp_group: ProcessGroup,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Causal-LM convenience: logits [..., S, V_local] at position t score ``token_ids[..., t+1]``.

    Returns [..., S-1]: entry t is log p(token_ids[t+1] | token_ids[:t+1]). The shift is applied to the
    targets (the last position is ignored), so the logits are never sliced or copied.
    """
    if token_ids.dim() < 1 or token_ids.shape[-1] < 2:
        raise ValueError(f"token_ids: expected [..., S] with S >= 2, got shape {tuple(token_ids.shape)}")
    aligned = torch.full_like(token_ids, IGNORE_INDEX)
    aligned[..., :-1] = token_ids[..., 1:]
    logp = sampled_token_logprobs(logits_shard, aligned, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                                  chunk_tokens=chunk_tokens, temperature=temperature, ignore_index=IGNORE_INDEX)
    return logp[..., :-1]


def token_entropy(
    logits_shard: torch.Tensor,
    tp_group: ProcessGroup,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token entropy [...] (fp32, nats) of softmax(logits / temperature) over the real vocabulary."""
    _, entropy, _ = _run(logits_shard, None, mask, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                         chunk_tokens=chunk_tokens, temperature=temperature, ignore_index=IGNORE_INDEX,
                         with_entropy=True, n_index=0)
    return entropy


def logprobs_at_indices(
    logits_shard: torch.Tensor,
    indices: torch.Tensor,
    tp_group: ProcessGroup,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p at K given global vocab ids per token: indices [..., K] → [..., K] (fp32, autograd).

    For the top-k KL: score the student at the teacher's top-k ids. Masked tokens give 0.
    """
    if indices.dim() < 1:
        raise ValueError(f"indices: expected [..., K], got shape {tuple(indices.shape)}")
    logp_NK, _, layout = _run(logits_shard, indices, mask, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                              chunk_tokens=chunk_tokens, temperature=temperature, ignore_index=IGNORE_INDEX,
                              with_entropy=False, n_index=indices.shape[-1])
    return logp_NK.view(layout.lead_shape + (indices.shape[-1],))
