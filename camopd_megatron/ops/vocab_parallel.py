"""Log-probs and top-k over vocab-sharded logits, without ever gathering the logits.

Each tensor-parallel rank holds ``logits_shard`` [..., V_local], the columns
``[vocab_start, vocab_start + V_local)`` of the padded vocabulary (``V_local * tp_size`` columns in
all; columns ``>= vocab_size``, the real vocabulary, are padding and are masked to -inf). With
x = logits / temperature:

    log p(y) = (x[y] − M) − log S,   M = max_v x[v],   S = Σ_v exp(x[v] − M)

Forward, per token, takes the one-float reductions of megatron-core's ``vocab_parallel_cross_entropy``
(whose math split we copy), in two collectives whatever the chunking: (1) ROW MAX — each rank's local
max m_r, all-reduce MAX → M; (2) Σexp and TARGET LOGIT — each rank's local Σexp(x − m_r) rescaled by
exp(m_r − M), and its masked target logit (0 where the target lives on another rank), one all-reduce
SUM of both.

Precision: the max is subtracted BEFORE log S is added, never ``x[y] − (M + log S)``: with |M| ~ 1e4
an fp32 ``logZ = M + log S`` is rounded to ~1e-3 (its ulp), which would land in every log-prob and, in
backward, in every probability p = exp(x − logZ). ``x[y] − M`` is exact or nearly (two close fp32
numbers), so the error stays that of log S. :class:`RowStats` carries (M, log S) for that reason, and
every consumer (this kernel, the fused output projection, top-k log-probs, sampling's μ) goes through
:meth:`RowStats.logprobs` / :meth:`RowStats.probs_scale`. (With a temperature, x = logits / T is itself
rounded to fp32 first, as in megatron: at |logits| ~ 1e4 that costs ~1e-3 whatever the statistics do.)

Memory: tokens are processed in chunks of ``chunk_tokens``; only per-token statistics (M, log S) are
kept for backward, which recomputes the softmax chunk by chunk. Peak extra memory is therefore one
fp32 [chunk, V_local] buffer, not [tokens, V_local]; the [tokens, V_local] gradient of the shard itself
is unavoidable. Statistics are fp32 whatever the input dtype. The input logits are never modified
(megatron's kernel subtracts the max in place; ours works on fp32 chunk copies).

Gradient, with p = softmax(x) and g the incoming gradient:
    d log p(y) / d logits = (onehot(y) − p) / T · g

The kernels take ALIGNED logits and targets (``targets[t]`` is scored by ``logits[t]``); a causal
LM's shift is the caller's (it shifts the small targets, never the logits).

``tp_group`` is a required argument; ``None`` explicitly means "not sharded" (one shard holding the
whole padded vocabulary, no communication) — it never falls back to a global group. All ranks of the
group must pass the same targets/mask. Invalid input raises ``ValueError`` on every rank: local
checks run first and one small all-reduce shares their outcome before any rank raises.

Shape legend: N = tokens (leading dims flattened), V = V_local (vocab columns of this shard),
K = target indices per token (1: the sampled token), C = tokens in one chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

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
                  chunk_tokens, ignore_index, k_top) -> tuple[int, str]:
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
        if tuple(targets.shape) != lead:
            return 2, f"targets: shape {tuple(targets.shape)} must equal logits_shard's leading shape {lead}"
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
            live = live & mask.bool()
        vals = targets[live]
        if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= vocab_size):
            return 2, (f"targets: ids must lie in [0, vocab_size={vocab_size}) (or equal ignore_index="
                       f"{ignore_index}); got min {int(vals.min())} max {int(vals.max())}")
    return 0, ""


def _validate(logits_shard, targets, mask, tp_group, *, vocab_start, vocab_size, temperature, chunk_tokens,
              ignore_index=IGNORE_INDEX, k_top=None) -> _Layout:
    """Local checks, then (TP > 1) one int64 all-reduce MAX so that every rank raises together."""
    code, msg = _local_errors(logits_shard, targets, mask, tp_group, vocab_start, vocab_size, temperature,
                              chunk_tokens, ignore_index, k_top)
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


EXP_ARG_MIN = -60.0
"""On a CPU, :func:`exp_minus_` clamps exp's argument here. exp(−60) ≈ 8.8e-27 (:data:`EXP_MIN`): below it, an
element is invisible in fp32 beside its row's max (exp(0) = 1), and what stays above keeps a CPU off exp's slow
path (results below 1.2e-38) and products over the tiles off subnormal partial sums (a product with a number
above ~1e-12 stays a normal number)."""
EXP_MIN = math.exp(EXP_ARG_MIN)


def exp_minus_(x_CV: torch.Tensor, shift_C: torch.Tensor, pad_from: int, *, clamp: bool = True) -> torch.Tensor:
    """In place x ← exp(x − shift) per row (``shift_C`` [C]); the columns from ``pad_from`` on (padding,
    -inf) exactly 0. Returns ``x_CV``.

    On a CPU, with ``clamp``, the argument is first clamped at :data:`EXP_ARG_MIN` (a caller that knows the
    arguments stay far above it saves the pass: :func:`spread_exceeds`). torch's CPU exp takes a slow path for
    every element whose result underflows (or is -inf): 10-90 ns an element against ~0.6 here, so a tile
    where a trained model's logits lie 90-300 below the row's max took 40-150x longer to exponentiate. Unclamped
    it would also write subnormal numbers (results below 1.18e-38), and a CPU's matmul over subnormal
    operands runs in microcode: the fused output layer's backward over such tiles ran 4.7x (logit std 16) to
    28x (std 26) slower (BENCHMARKS.md; the op also sets the clamped elements to 0, as products with numbers
    this small still end in subnormals). A clamped element holds 8.8e-27 instead of something between 0 and that:
    nothing fp32 can tell apart beside the row's others (the row's max is at least exp(0) = 1, or the
    group's Σ carries it). A GPU's exp has no such path: nothing changes there."""
    x_CV.sub_(shift_C.unsqueeze(-1))
    if x_CV.device.type != "cpu" or not clamp:
        return x_CV.exp_()
    x_CV.clamp_min_(EXP_ARG_MIN).exp_()
    if pad_from < x_CV.shape[-1]:
        x_CV[:, max(pad_from, 0):] = 0.0
    return x_CV


SAFE_SPREAD = 20.0
"""How far below their row's max a sample of logits may reach for :func:`spread_exceeds` to skip the clamp
(40 above :data:`EXP_ARG_MIN`: room for the rest of the row to reach lower)."""


def spread_exceeds(x_CV: torch.Tensor, limit: float = SAFE_SPREAD) -> bool:
    """Whether any row of ``x_CV`` (finite logits, a sample of the row) spans more than ``limit``; True off a
    CPU (no clamp to save there, and no host sync). A performance guess, never a correctness one: exp is
    exact either way, the clamp only keeps a CPU off its slow paths."""
    if x_CV.device.type != "cpu" or not x_CV.numel():
        return True
    return bool((torch.amax(x_CV, dim=-1) - torch.amin(x_CV, dim=-1) > limit).any())


def row_shift(m_C: torch.Tensor) -> torch.Tensor:
    """The shift a row's exp(x − shift) is taken at, from its max ``m_C``: m, except 0 for a row that is all
    -inf (a shard of padding only), so that exp() gives 0 there, not NaN."""
    return torch.where(torch.isinf(m_C), torch.zeros_like(m_C), m_C)


def exp_shifted_(x_CV: torch.Tensor, *, pad_from: Optional[int] = None, clamp: bool = True,
                 max_out: Optional[torch.Tensor] = None, sum_out: Optional[torch.Tensor] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place x ← exp(x − shift) per row (:func:`exp_minus_`, ``clamp`` passed on; columns from ``pad_from``
    on are padding, at -inf; None: none); returns (local max m_C, shift_C, Σexp(x − shift)_C).

    shift = :func:`row_shift` (m). ``max_out`` / ``sum_out``: [C] tensors that m_C / the sum are written into.
    The local half of :func:`reduce_stats`'s statistics, for this kernel."""
    m_C = torch.amax(x_CV, dim=-1, out=max_out)
    shift_C = row_shift(m_C)
    pad = x_CV.shape[-1] if pad_from is None else pad_from
    s_C = torch.sum(exp_minus_(x_CV, shift_C, pad, clamp=clamp), dim=-1, out=sum_out)
    return m_C, shift_C, s_C


class RowStats(NamedTuple):
    """Per-token softmax statistics over the whole (group's) vocabulary, fp32 [N]: the row max M (from the
    fused output projection, a bound at most log(vocab block width) above it, which keeps the precision) and
    log S = log Σ exp(x − M), kept apart (module docstring, "Precision"); ``target_NK`` is the sum over
    the group of each rank's owned target logits (so each target's x, or 0 where ignored)."""

    max_N: torch.Tensor
    log_sum_N: torch.Tensor
    target_NK: Optional[torch.Tensor]  # None in backward, which needs only the normaliser

    def logprobs(self, values_NK: torch.Tensor, live_NK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log softmax at ``values_NK`` (scaled logits): (x − M) − log S; 0 where not ``live_NK``."""
        logp_NK = (values_NK - self.max_N.unsqueeze(-1)) - self.log_sum_N.unsqueeze(-1)
        return logp_NK if live_NK is None else torch.where(live_NK, logp_NK, torch.zeros_like(logp_NK))

    def probs_scale(self, shift_N: torch.Tensor) -> torch.Tensor:
        """c_N with p = exp(x − shift_N) · c_N, i.e. exp((shift − M) − log S), without rounding M + log S."""
        return ((shift_N - self.max_N) - self.log_sum_N).exp()


def reduce_stats(m_N, s_N, tgt_NK, layout, tp_group) -> RowStats:
    """From each rank's local (max m, Σexp(x − m), owned target logits [N, K]) to the group's RowStats."""
    # (1) ROW MAX over the group
    M_N = m_N.clone()
    if layout.tp_size > 1 and layout.n_tokens:
        dist.all_reduce(M_N, op=dist.ReduceOp.MAX, group=tp_group)
    # (2) rescale the local sums to the global max, then one SUM of [Σexp, target logits]
    scale_N = torch.where(torch.isinf(m_N), torch.zeros_like(m_N), torch.exp(m_N - M_N))
    buf_NJ = torch.cat([(s_N * scale_N).unsqueeze(-1), tgt_NK], dim=-1)
    if layout.tp_size > 1 and layout.n_tokens:
        dist.all_reduce(buf_NJ, op=dist.ReduceOp.SUM, group=tp_group)
    return RowStats(M_N, torch.log(buf_NJ[:, 0]), buf_NJ[:, 1:])


def _target_logits(logits_NV, tgt_local_NK, owned_NK, temperature):
    """The (scaled, fp32) logit of each target this shard owns; 0 where another rank owns it."""
    idx_NK = torch.where(owned_NK, tgt_local_NK, torch.zeros_like(tgt_local_NK))
    vals_NK = logits_NV.gather(1, idx_NK).to(torch.float32)
    if temperature != 1.0:
        vals_NK = vals_NK / temperature
    return torch.where(owned_NK, vals_NK, torch.zeros_like(vals_NK))


def _global_stats(logits_NV, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk) -> RowStats:
    """Local max and Σexp chunk by chunk, the owned target logits, then :func:`reduce_stats`."""
    n = layout.n_tokens
    m_N = torch.empty(n, dtype=torch.float32, device=logits_NV.device)
    s_N = torch.empty_like(m_N)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        exp_shifted_(_scaled_chunk(logits_NV[c0:c1], layout, temperature), pad_from=layout.pad_from,
                     max_out=m_N[c0:c1], sum_out=s_N[c0:c1])
    tgt_NK = _target_logits(logits_NV, tgt_local_NK, owned_NK, temperature)
    return reduce_stats(m_N, s_N, tgt_NK, layout, tp_group)


def _shard_grad(logits_NV, layout, temperature, chunk, stats: RowStats, tgt_local_NK, owned_NK,
                g_logp_NK) -> torch.Tensor:
    """Backward: recompute p = exp(x − M) / S chunk by chunk; write (onehot − p)·g/T into one buffer."""
    grad_NV = torch.empty_like(logits_NV)
    n = layout.n_tokens
    max_N = stats.max_N
    neg_g_over_s_N = -g_logp_NK.sum(dim=-1) * stats.probs_scale(max_N)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        x_CV = _scaled_chunk(logits_NV[c0:c1], layout, temperature)
        exp_minus_(x_CV, max_N[c0:c1], layout.pad_from).mul_(neg_g_over_s_N[c0:c1].unsqueeze(-1))  # −p · g
        idx_CK = torch.where(owned_NK[c0:c1], tgt_local_NK[c0:c1], torch.zeros_like(tgt_local_NK[c0:c1]))
        src_CK = torch.where(owned_NK[c0:c1], g_logp_NK[c0:c1], torch.zeros_like(g_logp_NK[c0:c1]))
        x_CV.scatter_add_(1, idx_CK, src_CK)  # + onehot · g
        if temperature != 1.0:
            x_CV.div_(temperature)
        grad_NV[c0:c1].copy_(x_CV)
        del x_CV
    return grad_NV


class _VocabParallelLogProb(torch.autograd.Function):
    """Autograd wrapper; saves only M_N and log S_N (plus the input logits, held by the graph)."""

    @staticmethod
    def forward(ctx, logits_NV, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk):
        stats = _global_stats(logits_NV, tgt_local_NK, owned_NK, layout, tp_group, temperature, chunk)
        ctx.save_for_backward(logits_NV, tgt_local_NK, owned_NK, stats.max_N, stats.log_sum_N)
        ctx.layout, ctx.temperature, ctx.chunk = layout, temperature, chunk
        return stats.logprobs(stats.target_NK, _live(tgt_local_NK))

    @staticmethod
    def backward(ctx, g_logp_NK):
        logits_NV, tgt_local_NK, owned_NK, max_N, log_sum_N = ctx.saved_tensors
        if tgt_local_NK.shape[-1] == 0:
            return (None,) * 7
        g_logp_NK = torch.where(_live(tgt_local_NK), g_logp_NK.float(),
                                torch.zeros_like(g_logp_NK, dtype=torch.float32))
        grad_NV = _shard_grad(logits_NV, ctx.layout, ctx.temperature, ctx.chunk, RowStats(max_N, log_sum_N, None),
                              tgt_local_NK, owned_NK, g_logp_NK)
        return grad_NV, None, None, None, None, None, None


_DEAD = torch.iinfo(torch.int64).min  # tgt_local marker of an ignored/masked target


def _live(tgt_local_NK: torch.Tensor) -> torch.Tensor:
    return tgt_local_NK != _DEAD


def _prepare_targets(targets, mask, layout, ignore_index, device):
    """Global ids → local column ids ([N, K], _DEAD where ignored) and the 'owned by this shard' mask."""
    n = layout.n_tokens
    tgt_NK = targets.reshape(n, -1).to(torch.int64)
    live_NK = tgt_NK != ignore_index
    if mask is not None:
        live_NK = live_NK & mask.reshape(n, 1).bool()
    local_NK = tgt_NK - layout.vocab_start
    owned_NK = live_NK & (local_NK >= 0) & (local_NK < layout.v_local)
    local_NK = torch.where(live_NK, local_NK, torch.full_like(local_NK, _DEAD))
    return local_NK, owned_NK


def _run(logits_shard, targets, mask, tp_group, *, vocab_start, vocab_size, chunk_tokens, temperature,
         ignore_index):
    layout = _validate(logits_shard, targets, mask, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                       temperature=temperature, chunk_tokens=chunk_tokens, ignore_index=ignore_index)
    logits_NV = logits_shard.reshape(layout.n_tokens, layout.v_local)  # a view when contiguous
    tgt_local_NK, owned_NK = _prepare_targets(targets, mask, layout, ignore_index, logits_shard.device)
    if torch.is_grad_enabled() and logits_shard.requires_grad:
        logp_NK = _VocabParallelLogProb.apply(logits_NV, tgt_local_NK, owned_NK, layout, tp_group,
                                              float(temperature), layout.chunk)
    else:  # teacher / no-grad path: nothing is saved
        with torch.no_grad():
            stats = _global_stats(logits_NV.detach(), tgt_local_NK, owned_NK, layout, tp_group, float(temperature),
                                  layout.chunk)
            logp_NK = stats.logprobs(stats.target_NK, _live(tgt_local_NK))
    return logp_NK, layout


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
) -> torch.Tensor:
    """log p(targets) [...] (fp32) from vocab-sharded logits [..., V_local].

    Args:
        logits_shard: this rank's columns of the padded vocabulary, any float dtype; ALIGNED with targets.
        targets: global vocab ids [...] (same on every rank); ``ignore_index`` entries score 0.
        tp_group: the group the vocabulary is sharded over (None: unsharded, no communication).
        vocab_start: this rank's first global column (= tp_rank * V_local).
        vocab_size: the real vocabulary; columns >= vocab_size are padding.
        chunk_tokens: tokens per chunk; bounds the extra memory to ~1 fp32 [chunk, V_local] buffer.
            None (default): ~DEFAULT_CHUNK_ELEMENTS per buffer, i.e. max(1, 2**21 // V_local) tokens.
        temperature: the softmax is taken over logits / temperature.
        mask: optional [...] bool/0-1 loss mask; masked tokens score 0 (and have zero gradient).

    Autograd flows when grad is enabled and ``logits_shard.requires_grad``; otherwise nothing is saved.
    """
    logp_NK, layout = _run(logits_shard, targets, mask, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                           chunk_tokens=chunk_tokens, temperature=temperature, ignore_index=ignore_index)
    return logp_NK.view(layout.lead_shape)
