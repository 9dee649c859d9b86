"""Sampled-token log-probs straight from hidden states and the vocab-sharded output weight.

    log p(y_n) = (x_n[y_n] − M_n) − log S_n,   x_n = (h_n W_rᵀ) / T over every rank r's vocab rows W_r

:func:`camopd_megatron.ops.sampled_token_logprobs` takes logits; this op takes what produces them,
the final hidden states ``h`` [..., H] (replicated over the TP group, as megatron's output layer
receives them) and this rank's output weight shard ``W`` [V_local, H], and never builds the
[tokens, V_local] logits: the output projection, the softmax statistics and, in backward, the logit
gradient run tile by tile. On a CPU the full logits were the step's largest memory traffic: at
h512 / vocab 32000 / 1024 scored tokens, their fp32 copy, transpose, zero-filled gradient and slice
copies were ~40 % of the training forward + backward (BENCHMARKS.md). The math and the collectives
are those of the logits kernel (two all-reduces in forward, whatever the chunking; the same
:class:`~camopd_megatron.ops.vocab_parallel.RowStats`, so the max is subtracted before log S is added
and large logits keep fp32 precision); backward adds the
all-reduce SUM of dL/dh over the TP group that megatron's column-parallel output layer does.

Gradients, with p = softmax(x) = E · c (E = exp(x − a shift per row), c = exp(shift − M) / S) and g the
incoming gradient per token:
    dL/dx = (onehot(y) − p) · g / T = E · a + onehot(y) · g / T,      a = −g · c / T   (one number per row)
    dL/dh = a ⊙ Σ_blocks E W + Σ_targets (g/T) W[y]      (all-reduce over TP)
    dL/dW = Eᵀ (a ⊙ h) + onehot(y)ᵀ ((g/T) h)
so backward runs the two products over each tile as it is, with no pass over it, and adds the one-hot terms
at the targets alone.

Tiles. The [N, V_local] logits are worked through in tiles of C rows x W vocab columns (a vocab block):
the product of one tile (h_C W_blockᵀ, 1/T inside it) writes ~2 MiB (``DEFAULT_TILE_ELEMENTS``), and the
softmax passes over it (subtract the shift, exp, sum; the first block also its max) run while it is still in
cache. A row's shift is its first block's max; a block whose logits rise more than ``SHIFT_HEADROOM`` above it
(its Σexp tells) is projected again and taken at its own max (rare: logits tens apart across the vocabulary;
backward then scales its tile once), so a row's tiles share one shift. Each block's Σexp is kept per row
([blocks, N], a few floats per row and block) and the blocks' log-masses are combined into the row's
(max, Σexp) once, so the rows' statistics never need a second pass over the logits. Each product is over a
whole block of the vocabulary, so the weight is still read once per chunk of rows.

Backward needs E again: it keeps the forward's tiles when they are small enough together
(``keep_softmax_bytes``, one fp32 [tokens, V_local] buffer at most, as megatron's cross-entropy keeps its
softmax; then all rows are one chunk and dL/dW is read and written once), and otherwise projects each tile
again (E = exp(x − M)), ``chunk_tokens`` rows at a time (``DEFAULT_CHUNK_ROWS``) into one reused tile buffer.
Without grad nothing is kept: one reused tile buffer whatever the vocabulary (at V = 151,936 the teacher stage
no longer page-faults in a fresh 311 MB logits buffer per call). dL/dh is summed over the blocks in fp32
whatever the weight's dtype. The products are the same whatever the path; only their blocking, hence the fp32
rounding of the sums, depends on it.

The weight is used directly, not through the output layer module, so the caller owns what that
module's forward would do first: with megatron's ``overlap_param_gather`` the weight's all-gather is
waited for in the output layer's forward pre-hook, which the output window of
:mod:`camopd_megatron.models.pipeline` runs in the layer's place before this op reads the weight; MuP
logit scaling is not applied (:func:`camopd_megatron.models.pipeline.model_forward` refuses it).

Under megatron's DDP the weight gradient is added straight into the parameter's fp32 ``main_grad``
buffer (megatron's gradient-accumulation-fusion contract: ``grad_added_to_main_grad`` is set and a dummy
gradient is returned, which the DDP hook skips).

Shape legend: N tokens (leading dims flattened), H hidden, V = V_local, C rows per chunk, W columns per
vocab block, J blocks, K = 1.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from camopd_megatron.ops.main_grad import accumulates_into_main_grad, added_to_main_grad
from camopd_megatron.ops.vocab_parallel import (
    EXP_MIN,
    IGNORE_INDEX,
    ProcessGroup,
    RowStats,
    _group_size_rank,
    _live,
    _prepare_targets,
    _validate,
    exp_minus_,
    reduce_stats,
    row_shift,
    spread_exceeds,
)

__all__ = ["DEFAULT_CHUNK_ROWS", "DEFAULT_KEEP_SOFTMAX_BYTES", "KeptSoftmaxBuffer", "fused_output_logprobs"]

DEFAULT_CHUNK_ROWS = 1024
"""Rows per chunk where the softmax is not kept (no grad, or over ``keep_softmax_bytes``): the weight is read
once per chunk of rows (and, with grad, dL/dW read and written once per chunk), so chunks are large; the
tiles inside a chunk keep the memory to one [rows, vocab block] buffer whatever the vocabulary."""
DEFAULT_KEEP_SOFTMAX_BYTES = 2**29
"""Keep the forward's exp(logits) for backward up to 512 MiB (one fp32 [tokens, V_local]); beyond that,
backward projects again. Keeping trades N·V·4 bytes for a whole projection, 2·N·V·H FLOPs: at h512 / V 32000
/ 1024 tokens (131 MB) it saved ~12 % of the training forward + backward on CPU; at the Qwen vocabulary
(V 151,936, 512 scored tokens, 311 MB) the projection it saves is 40 GFLOP, a quarter of the output layer's
training work (BENCHMARKS.md)."""
DEFAULT_TILE_ELEMENTS = 2**19
"""Elements of one tile, [rows, vocab block] (2 MiB of fp32, the size of a core's L2 here): the product writes
it and the softmax passes (max, subtract the shift, exp, sum) read it while it is still in cache (in backward,
without a kept softmax, the projection again, the shift and exp, right before the two products that read it).
Vocab blocks are at least
``_MIN_VOCAB_BLOCK`` columns wide, so that each product stays efficient."""
_MIN_VOCAB_BLOCK = 128


def _zero_tiny_(e: torch.Tensor) -> torch.Tensor:
    """On a CPU, a tile that backward's products read with its elements <= EXP_MIN (exp_minus_'s clamped ones,
    or ones a lowered tile's scaling made that small) set to 0: products over tiny numbers end in subnormal
    partial sums, ~2.5x slower than over zeros here (BENCHMARKS.md). Their probabilities are below
    8.8e-27 · c_N: nothing an fp32 gradient beside the row's others can hold."""
    if e.is_cpu:  # a margin for exp's rounding of exp(EXP_ARG_MIN), which need not be EXP_MIN to the last bit
        F.threshold_(e, EXP_MIN * (1.0 + 1e-6), 0.0)
    return e


def _exp_tile_(x_CW: torch.Tensor, shift_C: torch.Tensor, pad_from: int, clamp: bool, *, zero: bool,
               sum_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A tile in place to exp(x − shift) (:func:`exp_minus_`, ``clamp`` passed on), its row sums into ``sum_out``,
    then, with ``zero`` (a tile backward's products read) and ``clamp``, its clamped elements set to 0
    (:func:`_zero_tiny_`)."""
    exp_minus_(x_CW, shift_C, pad_from, clamp=clamp)
    if sum_out is not None:
        torch.sum(x_CW, dim=-1, out=sum_out)
    if zero and clamp:
        _zero_tiny_(x_CW)
    return x_CW


SHIFT_HEADROOM = 40.0
"""How far a block's logits may rise above its row's shift (the first block's max) before the block is taken
again at its own max: tiles hold exp(x − shift) <= exp(40) ~ 2e17, so their sums and the products over them
stay far inside fp32's range at any vocabulary, and a usual row has one shift for all its tiles. The forward
checks it on each block's Σexp, which bounds every element (``_MAX_BLOCK_SUM``)."""
_MAX_BLOCK_SUM = math.exp(SHIFT_HEADROOM)


def _vocab_block(v_local: int, rows: int, vocab_block: Optional[int]) -> int:
    if vocab_block is not None:
        return max(1, min(vocab_block, v_local))
    return max(1, min(v_local, max(_MIN_VOCAB_BLOCK, DEFAULT_TILE_ELEMENTS // max(rows, 1))))


def _project_(h_CH: torch.Tensor, weight_WH: torch.Tensor, out_CW: torch.Tensor, pad_from: int,
              temperature: float) -> torch.Tensor:
    """``out_CW`` ← fp32 scaled logits of the rows ``h_CH`` over one vocab block, columns from ``pad_from`` on
    (padding) at -inf."""
    if h_CH.dtype == torch.float32 and weight_WH.dtype == torch.float32:
        if temperature == 1.0:
            torch.mm(h_CH, weight_WH.t(), out=out_CW)
        else:  # 1/T inside the product: no pass over the tile (beta = 0: the buffer's old contents are ignored)
            out_CW.addmm_(h_CH, weight_WH.t(), beta=0.0, alpha=1.0 / temperature)
    else:
        out_CW.copy_(F.linear(h_CH, weight_WH))
        if temperature != 1.0:
            out_CW.div_(temperature)
    if pad_from < out_CW.shape[1]:
        out_CW[:, max(pad_from, 0):] = float("-inf")
    return out_CW


class KeptSoftmaxBuffer:
    """Memory for the kept softmax tiles, reused from one training forward to the next.

    A fresh [N, V_local] fp32 buffer is new memory every step: the kernel maps and zero-fills it page by page
    on first touch, which on this CPU cost 0.3-0.6 s of the Qwen-vocabulary train stage (311 MB) whenever it
    was not given huge pages (BENCHMARKS.md). The owner (the student's training state) holds one buffer of
    the largest size asked so far, so it stays allocated between steps (at most ``keep_softmax_bytes``). A
    forward whose tiles are still awaiting their backward holds it; a second forward meanwhile (more than one
    micro-batch in flight) gets a fresh buffer, never the held one. Released when the tiles are dropped."""

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None
        self._held = False

    def take(self, numel: int, device: torch.device) -> tuple[torch.Tensor, Optional[Callable[[], None]]]:
        """A flat fp32 buffer of ``numel`` and the call that gives it back (None for a fresh one)."""
        if self._held:
            return torch.empty(numel, dtype=torch.float32, device=device), None
        if self._buf is None or self._buf.numel() < numel or self._buf.device != device:
            self._buf = None  # the old one goes before the new one is allocated
            self._buf = torch.empty(numel, dtype=torch.float32, device=device)
        self._held = True
        return self._buf[:numel], self._give_back

    def _give_back(self) -> None:
        self._held = False


class _Tiles:
    """The tiles of the [N, V_local] logits: row chunks of ``rows`` x vocab blocks of ``vb`` columns. With
    ``keep`` (one chunk of all rows) each tile is a contiguous slab of one [N·V_local] buffer, block after
    block, which backward consumes; without, every tile is written into one reused [rows, vb] buffer."""

    def __init__(self, n: int, v: int, rows: int, vocab_block: Optional[int], keep: bool, device: torch.device,
                 kept_buffer: Optional[KeptSoftmaxBuffer] = None) -> None:
        self.n, self.v, self.keep = n, v, keep
        self.clamp = False
        """Whether the forward clamped exp's argument in some chunk (backward recomputes likewise)."""
        self.rows = max(n, 1) if keep else max(rows, 1)
        self.vb = vb = _vocab_block(v, min(self.rows, max(n, 1)), vocab_block)
        self.n_blocks = -(-v // vb) if v else 0
        if keep and kept_buffer is not None:
            self.buf, give_back = kept_buffer.take(n * v, device)
            if give_back is not None:
                weakref.finalize(self, give_back)
        else:
            size = n * v if keep else min(self.rows, n) * min(vb, v)
            self.buf = torch.empty(size, dtype=torch.float32, device=device)

    def chunks(self) -> range:
        return range(0, self.n, self.rows)

    def columns(self, j: int) -> tuple[int, int]:
        return j * self.vb, min(self.v, (j + 1) * self.vb)

    def tile(self, c0: int, j: int) -> torch.Tensor:
        c1, (v0, v1) = min(c0 + self.rows, self.n), self.columns(j)
        if self.keep:
            return self.buf[self.n * v0:self.n * v1].view(self.n, v1 - v0)
        return self.buf[: (c1 - c0) * (v1 - v0)].view(c1 - c0, v1 - v0)


class _ChunkTargets(NamedTuple):
    """The targets of one chunk's rows that this rank owns, sorted by vocab block: each one's flat index in its
    block's tile (row in the chunk x the block's width + column), its (row in the chunk, k), and how many fall in
    each block; the forward gathers each block's with one call while the tile still holds logits."""

    flat: torch.Tensor
    rows: torch.Tensor
    ks: torch.Tensor
    counts: list[int]


def _chunk_targets(tgt_local_NK: torch.Tensor, owned_NK: torch.Tensor, c0: int, c1: int,
                   tiles: _Tiles) -> _ChunkTargets:
    """:class:`_ChunkTargets` of rows [c0, c1)."""
    r, k = owned_NK[c0:c1].nonzero(as_tuple=True)
    col = tgt_local_NK[c0:c1][r, k]
    blk = torch.div(col, tiles.vb, rounding_mode="floor")
    order = torch.argsort(blk, stable=True)
    r, k, col, blk = r[order], k[order], col[order], blk[order]
    v0 = blk * tiles.vb
    width = (tiles.v - v0).clamp(max=tiles.vb)  # the last block may be narrower
    return _ChunkTargets(r * width + (col - v0), r, k, torch.bincount(blk, minlength=tiles.n_blocks).tolist())


def _forward_stats(hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group, temperature,
                   tiles: _Tiles) -> tuple[RowStats, torch.Tensor]:
    """The group's RowStats (max, log Σexp, target logits), tile by tile; returns them with the shift each
    block's tile was exponentiated at ([blocks, N]). With ``tiles.keep`` the tiles are left holding
    exp(x − that shift).

    A row's shift is its first block's max (0 for a shard of padding only), and the later blocks are
    exponentiated at it without a max of their own (a pass fewer over each tile). A block whose Σexp passes
    ``_MAX_BLOCK_SUM`` (its logits rose far above the first block's; also inf or NaN) is projected again and
    taken at its own max (rare: logits tens apart across the vocabulary), so no tile element exceeds
    exp(SHIFT_HEADROOM).

    The row's (max, Σexp) come from the blocks' log-masses, shift + log Σexp, in float64: M is their max,
    rounded to fp32 (at least the row's max logit and at most log W above it), and Σexp is taken against
    that rounded M, so log p = (x − M) − log S keeps fp32 precision (log S is within [0, log J]) whatever
    the logits' magnitude."""
    n = layout.n_tokens
    dev = hidden_NH.device
    shift_JN = torch.zeros((tiles.n_blocks, n), dtype=torch.float32, device=dev)
    s_JN = torch.zeros_like(shift_JN)
    tgt_NK = torch.zeros(tgt_local_NK.shape, dtype=torch.float32, device=dev)
    w_blocks = weight_VH.split(tiles.vb)
    for c0 in tiles.chunks():
        if not tiles.n_blocks:
            break
        c1 = min(c0 + tiles.rows, n)
        h_CH = hidden_NH[c0:c1]
        s_rows = s_JN[:, c0:c1].unbind(0)
        targets = _chunk_targets(tgt_local_NK, owned_NK, c0, c1, tiles)
        got = torch.empty(targets.flat.shape, dtype=torch.float32, device=dev)
        i = 0
        for j in range(tiles.n_blocks):
            v0 = j * tiles.vb
            pad_from = layout.pad_from - v0
            x_CW = _project_(h_CH, w_blocks[j], tiles.tile(c0, j), pad_from, temperature)
            if targets.counts[j]:  # this block's target logits, before exp overwrites them
                i1 = i + targets.counts[j]
                torch.index_select(x_CW.view(-1), 0, targets.flat[i:i1], out=got[i:i1])
                i = i1
            if j == 0:  # the first block sets the rows' shift, and its spread decides the clamp (exp_minus_)
                clamp = spread_exceeds(x_CW[:, :max(pad_from, 0)])
                tiles.clamp = tiles.clamp or clamp
                shift_C = row_shift(torch.amax(x_CW, dim=-1))
            _exp_tile_(x_CW, shift_C, pad_from, clamp, zero=tiles.keep, sum_out=s_rows[j])
        tgt_NK[c0 + targets.rows, targets.ks] = got
        shift_JN[:, c0:c1] = shift_C
        over_JC = ~(s_JN[:, c0:c1] <= _MAX_BLOCK_SUM)
        for j in over_JC.any(dim=1).nonzero().flatten().tolist():  # again, at the block's own max where it rose
            pad_from = layout.pad_from - j * tiles.vb
            x_CW = _project_(h_CH, w_blocks[j], tiles.tile(c0, j), pad_from, temperature)
            shift_JN[j, c0:c1] = torch.where(over_JC[j], torch.amax(x_CW, dim=-1), shift_C)
            _exp_tile_(x_CW, shift_JN[j, c0:c1], pad_from, clamp, zero=tiles.keep, sum_out=s_rows[j])
    # the blocks' log-masses into one (max, Σexp) per row; padding only (every Σexp 0): M = -inf, Σexp = 0
    if tiles.n_blocks:
        mass_JN = shift_JN.double() + s_JN.double().log()
        m_N = mass_JN.amax(dim=0).float()
        s_N = torch.where(s_JN > 0, (mass_JN - m_N.double()).exp(), 0.0).sum(dim=0).float()
    else:
        m_N, s_N = torch.full((n,), float("-inf"), device=dev), torch.zeros(n, device=dev)
    return reduce_stats(m_N, s_N, tgt_NK, layout, tp_group), shift_JN


class _FusedOutputLogProb(torch.autograd.Function):
    """Saves the hidden states, the weight (both held by the graph anyway), M_N and log S_N, the tiles' shifts,
    and with ``tiles.keep`` the forward's exp tiles (consumed by the one backward)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group, temperature, tiles):
        stats, shift_JN = _forward_stats(hidden_NH, weight_VH, tgt_local_NK, owned_NK, layout, tp_group,
                                         temperature, tiles)
        ctx.save_for_backward(hidden_NH, weight_VH, tgt_local_NK, owned_NK, stats.max_N, stats.log_sum_N, shift_JN)
        ctx.layout, ctx.tp_group, ctx.temperature, ctx.tiles = layout, tp_group, temperature, tiles
        return stats.logprobs(stats.target_NK, _live(tgt_local_NK))

    @staticmethod
    def backward(ctx, g_logp_NK):
        hidden_NH, weight_VH, tgt_local_NK, owned_NK, max_N, log_sum_N, shift_JN = ctx.saved_tensors
        tiles = ctx.tiles
        if tiles is None:
            raise RuntimeError("fused_output_logprobs: backward ran twice on a graph that kept its softmax tiles "
                               "(they are consumed in place); recompute the forward instead of retain_graph=True")
        if tiles.keep:
            ctx.tiles = None
        stats = RowStats(max_N, log_sum_N, None)
        layout, temperature, n = ctx.layout, ctx.temperature, ctx.layout.n_tokens
        g_NK = torch.where(_live(tgt_local_NK), g_logp_NK.float(), torch.zeros_like(g_logp_NK, dtype=torch.float32))
        # The tiles hold E = exp(x − shift) with one shift per row (kept: the row's highest, to which the rare
        # tiles taken at a lower one are brought; recomputed: M), so p = E · c_N and
        #   dL/dx = (onehot·g − p·Σg) / T = E · a_N + onehot · g / T,   a_N = −Σg · c_N / T:
        # dL/dh = a ⊙ (Σ_blocks E W) and dL/dW = Eᵀ (a ⊙ h) need no pass over the tiles, and the one-hot
        # terms are added at the targets alone.
        shift_N = shift_JN.amax(dim=0) if tiles.keep and tiles.n_blocks else max_N
        a_N = -g_NK.sum(dim=-1) * stats.probs_scale(shift_N) / temperature
        if layout.pad_from <= 0:  # a shard of padding only: its tiles are 0 (and its shift says nothing)
            a_N.zero_()
        lower = (shift_JN != shift_N).any(dim=1).tolist() if tiles.keep else []  # kept tiles to bring up
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp32 = weight_VH.dtype == torch.float32
        h_f_NH = hidden_NH if hidden_NH.dtype == torch.float32 else hidden_NH.float()
        # dL/dh accumulates over the vocab blocks in fp32 whatever the weight's dtype
        grad_h_NH = torch.zeros(hidden_NH.shape, dtype=torch.float32, device=hidden_NH.device) if need_h else None
        into_main = need_w and accumulates_into_main_grad(weight_VH)
        grad_w_VH = None
        if need_w:
            grad_w_VH = weight_VH.main_grad if into_main else torch.empty(
                weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
        for c0 in tiles.chunks():
            c1 = min(c0 + tiles.rows, n)
            ah_CH = a_N[c0:c1].unsqueeze(-1) * h_f_NH[c0:c1] if need_w else None
            for j in range(tiles.n_blocks):
                v0, v1 = tiles.columns(j)
                w_WH = weight_VH[v0:v1]
                if tiles.keep:
                    e_CW = tiles.tile(c0, j)
                    if lower[j]:  # taken at a lower shift than the row's highest: to exp(x − highest)
                        _zero_tiny_(e_CW.mul_(torch.exp(shift_JN[j] - shift_N).unsqueeze(-1)))
                else:
                    e_CW = _project_(hidden_NH[c0:c1], w_WH, tiles.tile(c0, j), layout.pad_from - v0, temperature)
                    _exp_tile_(e_CW, max_N[c0:c1], layout.pad_from - v0, tiles.clamp, zero=True)
                if need_h:
                    grad_h_NH[c0:c1].addmm_(e_CW, w_WH if fp32 else w_WH.float())
                if need_w:  # the first chunk writes, later ones add
                    if into_main or c0 > 0:
                        grad_w_VH[v0:v1].addmm_(e_CW.t(), ah_CH)
                    else:
                        torch.mm(e_CW.t(), ah_CH, out=grad_w_VH[v0:v1])
        del tiles
        r, k = owned_NK.nonzero(as_tuple=True)  # the one-hot terms, at this rank's targets
        col, gy = tgt_local_NK[r, k], (g_NK[r, k] / temperature).unsqueeze(-1)
        if need_h:
            grad_h_NH.mul_(a_N.unsqueeze(-1)).index_add_(0, r, gy * weight_VH[col].float())
            if layout.tp_size > 1:  # h was replicated over the group: its gradient sums the shards'
                dist.all_reduce(grad_h_NH, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_h_NH = grad_h_NH.to(hidden_NH.dtype)
        if need_w:
            if n == 0 and not into_main:  # no tokens
                grad_w_VH.zero_()
            grad_w_VH.index_add_(0, col, gy * h_f_NH[r])
        if into_main:  # megatron's gradient-accumulation-fusion contract: a dummy grad the DDP hook skips
            return grad_h_NH, added_to_main_grad(weight_VH), None, None, None, None, None, None
        if need_w and grad_w_VH.dtype != weight_VH.dtype:
            grad_w_VH = grad_w_VH.to(weight_VH.dtype)
        return grad_h_NH, grad_w_VH, None, None, None, None, None, None


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
    vocab_block: Optional[int] = None,
    kept_buffer: Optional[KeptSoftmaxBuffer] = None,
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
        chunk_tokens: tokens per chunk where the softmax is not kept (None: ``DEFAULT_CHUNK_ROWS``).
        keep_softmax_bytes: with grad, keep the forward's fp32 exp(logits) for backward when they take at
            most this many bytes (one [tokens, V_local] fp32 tensor; all tokens in one chunk) instead of
            projecting again; 0 always recomputes (the smallest memory).
        vocab_block: columns per tile (None: ~``DEFAULT_TILE_ELEMENTS`` per tile, at least 128 columns).
        kept_buffer: where a kept softmax goes (reused from call to call, :class:`KeptSoftmaxBuffer`);
            None: a fresh buffer.

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
    if vocab_block is not None and (not isinstance(vocab_block, int) or vocab_block < 1):
        raise ValueError(f"vocab_block: got {vocab_block!r}, expected a positive int or None (automatic)")
    n = layout.n_tokens
    hidden_NH = hidden.reshape(n, hidden.shape[-1])
    tgt_local_NK, owned_NK = _prepare_targets(targets, None, layout, ignore_index, hidden.device)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)
    keep = grad and n * v_local * 4 <= keep_softmax_bytes
    rows = chunk_tokens or DEFAULT_CHUNK_ROWS  # a kept softmax is one chunk of all rows
    tiles = _Tiles(n, v_local, rows, vocab_block, keep, hidden.device, kept_buffer)
    if grad:
        logp_NK = _FusedOutputLogProb.apply(hidden_NH, weight_shard, tgt_local_NK, owned_NK, layout, tp_group,
                                            float(temperature), tiles)
    else:  # no backward to feed: one reused tile buffer, nothing saved
        with torch.no_grad():
            stats, _ = _forward_stats(hidden_NH, weight_shard, tgt_local_NK, owned_NK, layout, tp_group,
                                         float(temperature), tiles)
            logp_NK = stats.logprobs(stats.target_NK, _live(tgt_local_NK))
    return logp_NK.view(lead)
