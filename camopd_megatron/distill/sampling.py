"""Token sampling over vocab-sharded logits: greedy, temperature, top-k, top-p, with counter-based noise.

Used by :mod:`camopd_megatron.distill.rollout`; importable without megatron.

Randomness. No stateful generator: every row (one sampled token) has a key, a hash of
``(seed, step, sample_id, response position)``, so a sample's tokens depend only on its own key, never
on the batch it shares, its row in it, the data-parallel layout or the number of micro-batches.

* Plain temperature sampling (no top-k/top-p, the on-policy default) is an inverse-CDF draw with ONE
  uniform per row, ``u`` = the key's 53 high bits: the token is the first global id v whose cumulative
  mass ``Σ_{w≤v} exp(logits[w]/T)`` exceeds ``u · Z``. Vocab-parallel without gathering logits: each
  rank reduces its shard to (max, Σ exp) per row, one all-gather of those pairs gives every rank the
  shard masses and Z, the rank whose cumulative range holds ``u · Z`` searches its own cumulative sum,
  and one all-gather of (id, logit/T) pairs shares the token and its logit, from which μ follows
  (:func:`sample_with_logprobs`; the same pass serves sampling and μ). Cost per row: one exp, one
  cumulative sum and one search over V (the Gumbel-max draw it replaced hashed and took two float64
  logs of every vocab entry: ~5x the time at 8 x 8192, BENCHMARKS.md).
* top-k / top-p use Gumbel-max over their candidates: ``argmax_c (logits[c] / T + g[c])`` with
  ``g = −log(−log u[c])`` and ``u[c]`` a hash of (row key, global vocab id c). top-k reuses
  :func:`camopd_megatron.ops.vocab_parallel_topk` (k·TP candidates gathered), top-p without top-k
  gathers the full row (the nucleus needs the sorted distribution); any rank computes the same noise
  for the same id, so no noise is communicated.

Hash: two rounds of Wellons' ``lowbias32`` integer hash over 32-bit words, computed in int32 with
wrapping products (the bits of unsigned 32-bit arithmetic, on CPU and GPU alike). The 32-bit output maps to ``u = (h + 0.5) / 2^32`` in float64 (never 0 or 1;
largest representable Gumbel ≈ 22.9, i.e. truncation probability ≈ 2^-33 per draw).

μ. The log-prob recorded for a sampled token is that of ``softmax(logits / T_μ)`` over the whole
(real) vocabulary, WITHOUT top-k/top-p truncation — the same quantity the trainer computes for π.
``T_μ`` is :attr:`SamplingParams.logprob_temperature`: the sampling temperature, or 1 for greedy
decoding and for ``temperature == 0``.

Shape legend: B rows (samples), V = V_local (this rank's vocab columns), C candidates per row.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from camopd_megatron.ops import sampled_token_logprobs, vocab_parallel_topk

__all__ = [
    "FINISH_REASONS",
    "SamplingParams",
    "row_keys",
    "uniform_noise",
    "gumbel_noise",
    "sample_tokens",
    "sample_with_logprobs",
    "token_logprobs",
]

FINISH_REASONS = ("eos", "stop", "length")
"""Why a response ended: the EOS token, another stop token, or max_new_tokens / the context limit."""

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn from the student.

    Attributes:
        temperature: softmax temperature, >= 0 (0 means greedy).
        top_k: keep the k most likely tokens before sampling; 0 = off.
        top_p: nucleus mass in (0, 1]; 1 = off. Applied after top-k (on the renormalised top-k set).
        greedy: take the arg-max token (ties → lower id); top-k/top-p are then irrelevant.
        max_new_tokens: response length limit (> 0).
        stop_token_ids: tokens that end a response besides EOS (the stop token is kept and scored).
        eos_token_id: the tokenizer's end-of-sequence id, or None.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    eos_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy); use e.g. 1.0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; use 1.0 for no nucleus truncation")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int > 0")
        bad = [t for t in self.stop_token_ids if t < 0]
        if bad:
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)!r} holds negative ids {bad}; remove them")
        if self.eos_token_id is not None and (not isinstance(self.eos_token_id, int) or self.eos_token_id < 0):
            raise ValueError(f"eos_token_id={self.eos_token_id!r} must be a non-negative int or None")

    @classmethod
    def from_config(cls, rollout_cfg: Any, eos_token_id: Optional[int]) -> "SamplingParams":
        """Build from a :class:`camopd_megatron.config.RolloutConfig` and the tokenizer's EOS id."""
        return cls(
            temperature=float(rollout_cfg.temperature),
            top_k=int(rollout_cfg.top_k),
            top_p=float(rollout_cfg.top_p),
            greedy=bool(rollout_cfg.greedy),
            max_new_tokens=int(rollout_cfg.max_new_tokens),
            stop_token_ids=tuple(rollout_cfg.stop_token_ids),
            eos_token_id=eos_token_id,
        )

    @property
    def is_greedy(self) -> bool:
        """Arg-max decoding (``greedy`` or ``temperature == 0``)."""
        return self.greedy or self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution μ is recorded under: T, or 1.0 when decoding greedily."""
        return 1.0 if self.is_greedy else float(self.temperature)

    @property
    def off_policy(self) -> bool:
        """True unless plain sampling at T = 1 (no top-k, no top-p, not greedy)."""
        return self.is_greedy or self.top_k > 0 or self.top_p < 1.0 or self.temperature != 1.0

    @property
    def stop_set(self) -> frozenset[int]:
        """EOS plus the stop tokens."""
        ids = set(self.stop_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)


# ------------------------------------------------------------------------------------------ noise
def row_keys(seed: int, step: int, sample_ids: Sequence[int], positions: Sequence[int], device: Any = None) -> torch.Tensor:
    """Two 32-bit key words per row from (seed, step, sample_id, response position): int64 [B, 2].

    BLAKE2b over the packed integers (any int64 values; a few µs per row, once per decode step).
    """
    words = []
    for sid, pos in zip(sample_ids, positions):
        digest = hashlib.blake2b(struct.pack("<qqqq", int(seed), int(step), int(sid), int(pos)), digest_size=8).digest()
        lo, hi = struct.unpack("<II", digest)
        words.append((lo, hi))
    return torch.tensor(words, dtype=torch.int64, device=device).view(-1, 2)


def row_uniforms(keys_B2: torch.Tensor) -> torch.Tensor:
    """One uniform per row in (0, 1), float64 [B]: the key's 53 high bits, ``(n + 0.5) / 2^53``."""
    hi_B, lo_B = keys_B2[:, 1] & _M32, keys_B2[:, 0] & _M32
    n_B = (hi_B << 21) | (lo_B >> 11)
    return (n_B.to(torch.float64) + 0.5) * (1.0 / 2**53)


def _s32(c: int) -> int:
    """A 32-bit word as the signed int32 with the same bits."""
    c &= _M32
    return c - (1 << 32) if c >= (1 << 31) else c


def _hash32(x_i32: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Wellons' lowbias32 on int32 bit patterns (a bijection on 32-bit words with strong avalanche).

    int32 products wrap modulo 2^32 (two's complement; what both the vectorised CPU kernels and CUDA
    do) — which is exactly the unsigned 32-bit product's bits. Right shifts of int32 are arithmetic,
    so each shift is masked to make it logical. 35x faster on CPU than emulating it in int64
    (no 64-bit vector multiply on AVX2); the test checks it against a pure-Python reference.

    ``inplace``: overwrite ``x_i32`` and reuse one scratch tensor (the decode loop calls this on
    [B, V] every step; it saves a fresh [B, V] temporary per op).
    """
    x = x_i32 if inplace else x_i32.clone()
    tmp = torch.empty_like(x)
    for shift, mask, mult in ((16, 0xFFFF, 0x7FEB352D), (15, 0x1FFFF, 0x846CA68B), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_(mask))
        if mult is not None:
            x.mul_(_s32(mult))
    return x


def uniform_noise(keys_B2: torch.Tensor, ids_BC: torch.Tensor) -> torch.Tensor:
    """u[b, c] in (0, 1), float64, a pure function of (keys[b], ids[b, c]) (global vocab ids < 2^31).

    h = lowbias32(lowbias32(id · φ ⊕ k1) ⊕ k2) with φ = 0x9E3779B9, and u = (h + 0.5) / 2^32.
    """
    keys_i32 = (keys_B2 & _M32).to(torch.int64)
    keys_i32 = torch.where(keys_i32 >= 2**31, keys_i32 - 2**32, keys_i32).to(torch.int32)
    k1_B1, k2_B1 = keys_i32[:, :1], keys_i32[:, 1:]
    # one fresh [B, C] int32 buffer, then everything in place (bit-identical to the op-by-op form)
    h_BC = torch.bitwise_xor(ids_BC.to(torch.int32) * _s32(_GOLDEN), k1_B1)
    h_BC = _hash32(h_BC, inplace=True)
    h_BC = _hash32(h_BC.bitwise_xor_(k2_B1), inplace=True)
    # h as unsigned via int64 & 2^32-1 (an exact float64 remainder is 3x slower on CPU, measured)
    return h_BC.to(torch.int64).bitwise_and_(_M32).to(torch.float64).add_(0.5).mul_(1.0 / 2**32)


def gumbel_noise(keys_B2: torch.Tensor, ids_BC: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise −log(−log u), float64, per (row key, global vocab id)."""
    return uniform_noise(keys_B2, ids_BC).log_().neg_().log_().neg_()


# -------------------------------------------------------------------------------------- sampling
def _tp_info(tp_group: Any) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _tp_argmax(val_B: torch.Tensor, id_B: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Global arg-max from each rank's (best value, its global id): max value, ties → lower id.

    One all-gather of B float64 pairs (ids < 2^53 are exact in float64).
    """
    tp_size, _ = _tp_info(tp_group)
    if tp_size == 1:
        return id_B
    pair_B2 = torch.stack([val_B.to(torch.float64), id_B.to(torch.float64)], dim=-1).contiguous()
    parts = [torch.empty_like(pair_B2) for _ in range(tp_size)]
    dist.all_gather(parts, pair_B2, group=tp_group)
    vals_BR = torch.stack([p[:, 0] for p in parts], dim=-1)
    ids_BR = torch.stack([p[:, 1] for p in parts], dim=-1)
    best_B1 = vals_BR.amax(dim=-1, keepdim=True)
    # among the ranks holding the max, the lowest global id wins (+inf elsewhere)
    ids_BR = torch.where(vals_BR == best_B1, ids_BR, torch.full_like(ids_BR, float("inf")))
    return ids_BR.amin(dim=-1).to(torch.int64)


def _local_argmax(scores_BV: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row max and its global id (torch.max returns the first, i.e. lowest, maximal column)."""
    val_B, col_B = scores_BV.max(dim=-1)
    return val_B, col_B + vocab_start


def _gather_full_rows(logits_BV: torch.Tensor, tp_group: Any) -> torch.Tensor:
    tp_size, _ = _tp_info(tp_group)
    if tp_size == 1:
        return logits_BV
    parts = [torch.empty_like(logits_BV) for _ in range(tp_size)]
    dist.all_gather(parts, logits_BV.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _candidates(logits_BV: torch.Tensor, params: SamplingParams, tp_group: Any, vocab_start: int,
                vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation candidates sorted by (−logit/T, id): top-k if set, else the whole real vocabulary."""
    temp = float(params.temperature)
    if params.top_k > 0:
        k = min(params.top_k, vocab_size)
        return vocab_parallel_topk(logits_BV, k, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
                                   temperature=temp)
    full_BV = _gather_full_rows(logits_BV, tp_group)[:, :vocab_size].to(torch.float32) / temp
    ids_BV = torch.arange(vocab_size, device=full_BV.device).expand_as(full_BV)
    # stable sort of an id-ordered row: ties stay in ascending-id order
    vals_BV, order_BV = full_BV.sort(dim=-1, descending=True, stable=True)
    return vals_BV, ids_BV.gather(-1, order_BV)


def _nucleus_mask(vals_BC: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the shortest sorted prefix whose probability mass reaches top_p (at least one token).

    A candidate is kept iff the mass strictly before it is < top_p (the Hugging Face rule).
    """
    probs_BC = torch.softmax(vals_BC.to(torch.float64), dim=-1)
    before_BC = probs_BC.cumsum(dim=-1) - probs_BC
    keep_BC = before_BC < top_p
    keep_BC[:, 0] = True
    return keep_BC


@torch.no_grad()
def sample_tokens(
    logits_BV: torch.Tensor,
    params: SamplingParams,
    keys_B2: Optional[torch.Tensor],
    tp_group: Any,
    *,
    vocab_size: int,
) -> torch.Tensor:
    """Next token per row from this rank's vocab shard of the logits; the same int64 [B] on every TP rank.

    Args:
        logits_BV: logits of the position being predicted, columns ``[tp_rank·V, (tp_rank+1)·V)``.
        params: the sampling settings.
        keys_B2: per-row noise keys from :func:`row_keys` (ignored when greedy).
        tp_group: the TP group the vocabulary is sharded over (None: unsharded).
        vocab_size: the real vocabulary; padded columns ``>= vocab_size`` are never chosen.
    """
    _, tp_rank = _tp_info(tp_group)
    v_local = logits_BV.shape[-1]
    vocab_start = tp_rank * v_local
    if params.is_greedy:
        scores_BV = logits_BV.to(torch.float64)
    elif params.top_k == 0 and params.top_p >= 1.0:
        return _inverse_cdf_sample(logits_BV, keys_B2, tp_group, vocab_size=vocab_size,
                                   temperature=float(params.temperature))[0]
    else:
        vals_BC, ids_BC = _candidates(logits_BV, params, tp_group, vocab_start, vocab_size)
        scores_BC = vals_BC.to(torch.float64) + gumbel_noise(keys_B2, ids_BC)
        if params.top_p < 1.0:
            scores_BC = scores_BC.masked_fill(~_nucleus_mask(vals_BC, params.top_p), float("-inf"))
        # candidates are identical on every rank: a plain local arg-max (no communication)
        best_BC = scores_BC == scores_BC.amax(dim=-1, keepdim=True)
        return torch.where(best_BC, ids_BC, torch.full_like(ids_BC, 2**62)).amin(dim=-1)
    pad_from = max(0, min(v_local, vocab_size - vocab_start))  # local columns >= vocab_size are padding
    if pad_from == 0:  # a shard of padding only: it never wins
        scores_BV = torch.full_like(scores_BV, float("-inf"))
    elif pad_from < v_local:
        scores_BV = scores_BV[:, :pad_from]  # a view: padded columns are simply not searched
    val_B, id_B = _local_argmax(scores_BV, vocab_start)
    return _tp_argmax(val_B, id_B, tp_group)


@torch.no_grad()
def _inverse_cdf_sample(logits_BV: torch.Tensor, keys_B2: torch.Tensor, tp_group: Any, *, vocab_size: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain temperature sampling by inverse CDF (module docstring): tokens int64 [B] and μ fp32 [B],
    identical on every TP rank. Two all-gathers of [B, 2] float64 per call when TP > 1, none otherwise."""
    tp_size, tp_rank = _tp_info(tp_group)
    v_local = logits_BV.shape[-1]
    vocab_start = tp_rank * v_local
    b = logits_BV.shape[0]
    real = max(0, min(v_local, vocab_size - vocab_start))  # local columns >= vocab_size are padding
    dev = logits_BV.device
    def scaled(x: torch.Tensor) -> torch.Tensor:  # logits / T in float64 (a fresh tensor)
        x = x.to(torch.float64, copy=True)
        return x.div_(float(temperature)) if temperature != 1.0 else x

    if real:  # one float64 buffer, turned in place into the cumulative masses (the picked logit is read again)
        cum_BV = scaled(logits_BV[:, :real])
        m_B = cum_BV.amax(dim=-1)
        cum_BV.sub_(m_B.unsqueeze(1)).exp_().cumsum_(dim=-1)
        mass_B = cum_BV[:, -1]
    if tp_size == 1:  # the whole row here: the same draw without the cross-rank bookkeeping
        target_B1 = (row_uniforms(keys_B2).to(dev) * mass_B).unsqueeze(1)
        col_B1 = torch.searchsorted(cum_BV, target_B1, right=True).clamp_(max=real - 1)
        mu_B = scaled(logits_BV.gather(1, col_B1)).squeeze(1) - m_B - mass_B.log()
        return col_B1.squeeze(1), mu_B.float()
    if not real:  # a shard of padding only: no mass
        m_B = torch.full((b,), float("-inf"), dtype=torch.float64, device=dev)
        cum_BV = torch.zeros(b, 0, dtype=torch.float64, device=dev)
        mass_B = torch.zeros(b, dtype=torch.float64, device=dev)
    # every rank's (max, mass): rank r holds mass exp(m_r − m) · mass_r of the row's total Z
    parts = [torch.empty(b, 2, dtype=torch.float64, device=dev) for _ in range(tp_size)]
    dist.all_gather(parts, torch.stack([m_B, mass_B], dim=-1), group=tp_group)
    m_RB, mass_RB = torch.stack([p[:, 0] for p in parts]), torch.stack([p[:, 1] for p in parts])
    gmax_B = m_RB.amax(dim=0)
    scale_RB = torch.where(mass_RB > 0, (m_RB - gmax_B).exp(), torch.zeros_like(mass_RB))
    shard_RB = scale_RB * mass_RB
    upto_RB = shard_RB.cumsum(dim=0)
    z_B = upto_RB[-1]
    target_B = row_uniforms(keys_B2).to(dev) * z_B
    # the owning rank: the first whose cumulative mass exceeds the target (the last non-empty one on round-off)
    nonempty_RB = shard_RB > 0
    last_B = (nonempty_RB * torch.arange(1, tp_size + 1, device=dev).unsqueeze(1)).amax(dim=0) - 1
    owner_B = torch.where(upto_RB > target_B, torch.arange(tp_size, device=dev).unsqueeze(1),
                          torch.full_like(upto_RB, tp_size, dtype=torch.int64)).amin(dim=0)
    owner_B = torch.minimum(owner_B, last_B)
    mine_B = owner_B == tp_rank
    if real:
        before_B = (upto_RB[tp_rank] - shard_RB[tp_rank])
        local_target_B = torch.where(mine_B, (target_B - before_B) / scale_RB[tp_rank].clamp_min(1e-300),
                                     torch.zeros_like(target_B))
        col_B = torch.searchsorted(cum_BV, local_target_B.unsqueeze(1), right=True).squeeze(1).clamp_(max=real - 1)
        pick_B = scaled(logits_BV.gather(1, col_B.unsqueeze(1))).squeeze(1)
    else:
        col_B = torch.zeros(b, dtype=torch.int64, device=dev)
        pick_B = torch.zeros(b, dtype=torch.float64, device=dev)
    id_B = torch.where(mine_B, col_B + vocab_start, torch.full_like(col_B, -1))
    pick_B = torch.where(mine_B, pick_B, torch.full_like(pick_B, float("-inf")))
    # exactly one rank owns each row: the max over ranks is the owner's (id, logit / T)
    parts = [torch.empty(b, 2, dtype=torch.float64, device=dev) for _ in range(tp_size)]
    dist.all_gather(parts, torch.stack([id_B.to(torch.float64), pick_B], dim=-1), group=tp_group)
    both_RB2 = torch.stack(parts)
    id_B = both_RB2[..., 0].amax(dim=0).to(torch.int64)
    pick_B = both_RB2[..., 1].amax(dim=0)
    mu_B = pick_B - gmax_B - z_B.log()
    return id_B, mu_B.float()


@torch.no_grad()
def sample_with_logprobs(logits_BV: torch.Tensor, params: SamplingParams, keys_B2: Optional[torch.Tensor],
                         tp_group: Any, *, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token per row and its μ (see :func:`token_logprobs`): int64 [B], fp32 [B], the same on
    every TP rank. Plain temperature sampling does both in one pass (inverse CDF); the other modes
    sample with :func:`sample_tokens` and score with :func:`token_logprobs`."""
    if not params.is_greedy and params.top_k == 0 and params.top_p >= 1.0:
        return _inverse_cdf_sample(logits_BV, keys_B2, tp_group, vocab_size=vocab_size,
                                   temperature=float(params.temperature))
    tok_B = sample_tokens(logits_BV, params, keys_B2, tp_group, vocab_size=vocab_size)
    return tok_B, token_logprobs(logits_BV, tok_B, tp_group, vocab_size=vocab_size,
                                 temperature=params.logprob_temperature)


@torch.no_grad()
def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, tp_group: Any, *, vocab_size: int,
                   temperature: float) -> torch.Tensor:
    """μ: log softmax(logits / temperature)[token] over the real vocabulary (no truncation), fp32 [B]."""
    _, tp_rank = _tp_info(tp_group)
    v_local = logits_BV.shape[-1]
    return sampled_token_logprobs(
        logits_BV.unsqueeze(1), tokens_B.unsqueeze(1), tp_group, vocab_start=tp_rank * v_local,
        vocab_size=vocab_size, temperature=temperature,
    ).squeeze(1)
