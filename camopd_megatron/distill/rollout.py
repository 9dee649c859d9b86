"""On-policy rollout: batched generation from the megatron student, with μ for every sampled token.

    batch = generate(model, pgc, prompts, SamplingParams.from_config(cfg.rollout, tok.eos_id),
                     sample_ids=ids, seed=cfg.seed, step=step, vocab_size=V, max_seq_len=S)

Collective over ONE student data-parallel replica: every TP and PP rank of the replica calls
:func:`generate` with the same prompts and gets the same :class:`RolloutBatch` back (CPU tensors).

Layout of a decode (one micro-batch). Sequences are kept RIGHT-aligned at their natural positions,
exactly the layout of the training forward: position t of every row is decoded in the same step.
The batch is prefilled with its shortest prompt length L0; from then on one position per step is fed
for every row, and a row whose prompt is longer than t gets its prompt token at t instead of a
sample ("forced" prompt tokens, as in Meta's reference Llama generator). No attention mask and no
position shift are needed, and μ is computed at exactly the positions the trainer scores. Prompts
are sorted by length before they are split into micro-batches (which keeps forced steps few) and
the results are put back in the caller's order. A finished row keeps being fed pad 0 until the
whole micro-batch is done (static batching); its outputs are discarded.

Two forward paths, same sampling code (:mod:`camopd_megatron.distill.sampling`):
* KV cache (``use_kv_cache``): megatron's ``StaticInferenceContext``. Prefill
  ``model(tokens[:, :L0], inference_context=ctx)``, then per step ``ctx.sequence_len_offset = t``,
  ``ctx.enable_decode_mode()``, ``model(tokens[:, t:t+1], inference_context=ctx)`` (keys carry RoPE
  at their absolute position; the decode query attends to the whole cache, no mask: everything
  cached lies at or before t). Only the last position's logits are materialised. At TP = PP = 1 the
  lean decoder of :mod:`camopd_megatron.models.lean_decode` runs the same weights instead.
  With PP > 1 every stage keeps its own context (the KV cache of its own layers) and the fed
  positions travel stage by stage: the first stage embeds the tokens, each stage runs its layers on
  the hidden states ``[n, B, H]`` received from the previous one (``set_input_tensor``) and sends its
  output to the next (bounded point-to-point, ``models.pipeline.send_to_next_stage``); one position
  per step after the prefill. The last stage samples (collectively over its TP group) and broadcasts
  the new tokens and μ over ``pg_collection.pp`` (``last_stage_to_all``) so every stage extends the
  same sequences. O(T) per response, like PP = 1.
* Full recompute (``use_kv_cache=False``): each step runs the whole prefix ``tokens[:, :t]`` through
  the model and reads the logits at t − 1; with PP > 1 through megatron's pipeline schedule
  (``models.pipeline.run_microbatches(forward_only=True)``), tokens and μ broadcast as above. Cost
  O(T^2) per response: the reference the cached paths are tested against.

Sequence parallelism. A model built with ``sequence_parallel`` decodes with it switched off
(``models.gpt.sequence_parallel_off``, what megatron-core 0.19.2's own static-batching generation
does): one decode position cannot be split over the TP group. The weights are the same, so the
tokens and μ equal those of the model without SP; the activations are replicated over TP while
decoding. MoE layers included (megatron's own generation means to keep SP in them, but its
``exclude_modules=[BaseMoELayer]`` compares modules with the class and excludes nothing; keeping SP in
the MoE layer alone would not work either: its shared expert would reduce-scatter over the sequence
while the routed experts return the whole of it). With SP off every TP rank routes the whole,
replicated token set; the dispatcher treats the TP copies as distinct tokens (the all-to-all over the
EP group, the all-gather and reduce-scatter over expert TP) and each rank gets its own copies' outputs
back: exact, at TP-fold redundant expert work while decoding (``tests/test_moe_rollout.py``: μ equals
the SP-on forward's log-probs at TP = 2, EP = 4).

Lock-step (``lock_step``: the student's DP group, for an expert-parallel MoE student; see
``models.pipeline``, "Lock-step"). Every MoE layer's all-to-all spans DP replicas, so every replica
runs the same number of forwards: the replicas agree on the number of micro-batches (a replica with
fewer, or with no prompts, decodes dummy ones), and after each decode step one small all-reduce tells
whether any replica of the group still decodes; a replica whose rows are all done meanwhile runs a
one-token forward outside its KV cache (``_dummy_forward``) per step. Real rows never see a dummy
(no token dropping), so the tokens and μ are those decoded without lock-step. Under lock-step the
megatron path decodes (the lean decoder runs dense models only).

Routing replay (an MoE student with ``model.moe.routing_replay``): every forward records each MoE layer's
top-k expert choices and the decode keeps those of the positions it fed (prefill: all, then one per step;
with full recompute the newest one), as ``RolloutBatch.routes_BTLK``; the update replays them
(``models.moe.RouterFeed``). Lock-step dummy forwards are not kept.

Sampling and randomness: see :mod:`~camopd_megatron.distill.sampling` (inverse-CDF draws, Gumbel-max
for top-k/top-p, keyed on (seed, step, sample_id, response position): samples do not depend on the DP
layout, batch composition, order or micro-batch size; greedy ties → lower token id).

Stops, per sample: the EOS or a stop token (kept in the response and scored), ``max_new_tokens``, or
the context limit ``prompt + response <= max_seq_len`` (finish reason 'eos', 'stop', 'length').

Legend: B samples, T positions, V = this rank's vocab shard.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from camopd_megatron.distill.sampling import FINISH_REASONS, SamplingParams, row_keys, sample_with_logprobs
from camopd_megatron.models import lean_decode
from camopd_megatron.models.gpt import sequence_parallel_off, stage_info, unwrap_model
from camopd_megatron.models.moe import ROUTE_DTYPE, RouterFeed
from camopd_megatron.models.pipeline import (
    group_max, last_stage_to_all, model_forward, recv_from_previous_stage, run_microbatches, send_to_next_stage,
    wire_device,
)

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)

__all__ = ["FINISH_REASONS", "DecodeListener", "RolloutBatch", "SamplingParams", "generate", "validate_request"]

PAD_ID = 0
"""Token id written after a sequence's end (masked out everywhere)."""


# ------------------------------------------------------------------------------------ the batch
@dataclass
class RolloutBatch:
    """Prompts + sampled responses, aligned with ``models.logprobs.next_token_logprobs``.

    Attributes:
        tokens_BT: int64 prompt + response, right-padded with 0 to T = max(prompt + response length).
        prompt_lens_B, response_lens_B: int64 lengths.
        loss_mask_BT: float32; 1 at t iff ``tokens[b, t+1]`` is a response token of sample b.
        rollout_logp_BT: float32 μ in the same alignment: log p(tokens[b, t+1]) under
            softmax(logits / T_μ) without top-k/top-p truncation (0 where the mask is 0); T_μ is
            :attr:`SamplingParams.logprob_temperature` (T, or 1 when greedy).
        finish_reasons: 'eos' | 'stop' | 'length' per sample.
        sample_ids: the global sample index of each row.
        off_policy: generated with top-k / top-p / greedy / T != 1.
        routes_BTLK: with MoE routing replay (``model.moe.routing_replay``), the expert choices of every fed
            position, int16 ``[B, T, L, k]`` over THIS rank's MoE layers (its pipeline stage's, so it differs
            between stages; ``models.moe.RouterFeed``); positions never fed (a sequence's last token, padding)
            hold arbitrary values. None otherwise.
    """

    tokens_BT: torch.Tensor
    prompt_lens_B: torch.Tensor
    response_lens_B: torch.Tensor
    loss_mask_BT: torch.Tensor
    rollout_logp_BT: torch.Tensor
    finish_reasons: list[str]
    sample_ids: list[int]
    off_policy: bool
    routes_BTLK: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.tokens_BT.shape[0])

    @classmethod
    def empty(cls) -> "RolloutBatch":
        """A batch with no rows (a DP replica that drew no prompts still joins every collective)."""
        z_i, z_f = torch.zeros((0, 1), dtype=torch.int64), torch.zeros((0, 1), dtype=torch.float32)
        none = torch.zeros(0, dtype=torch.int64)
        return cls(tokens_BT=z_i, prompt_lens_B=none, response_lens_B=none.clone(), loss_mask_BT=z_f,
                   rollout_logp_BT=z_f.clone(), finish_reasons=[], sample_ids=[], off_policy=False)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens: Σ prompt + response lengths."""
        return int((self.prompt_lens_B + self.response_lens_B).sum())

    @property
    def num_response_tokens(self) -> int:
        """Σ response lengths (= the loss-mask sum)."""
        return int(self.response_lens_B.sum())

    def prompt_ids(self, b: int) -> list[int]:
        """Sample b's prompt tokens."""
        return self.tokens_BT[b, : int(self.prompt_lens_B[b])].tolist()

    def response_ids(self, b: int) -> list[int]:
        """Sample b's response tokens (a final EOS/stop token included)."""
        p, r = int(self.prompt_lens_B[b]), int(self.response_lens_B[b])
        return self.tokens_BT[b, p : p + r].tolist()

    def to(self, device: Union[str, torch.device]) -> "RolloutBatch":
        """A copy with every tensor on ``device``."""
        return replace(
            self, tokens_BT=self.tokens_BT.to(device), prompt_lens_B=self.prompt_lens_B.to(device),
            response_lens_B=self.response_lens_B.to(device), loss_mask_BT=self.loss_mask_BT.to(device),
            rollout_logp_BT=self.rollout_logp_BT.to(device),
            routes_BTLK=None if self.routes_BTLK is None else self.routes_BTLK.to(device),
        )

    def select(self, indices: Sequence[int]) -> "RolloutBatch":
        """The sub-batch of ``indices`` (in that order), T trimmed to its longest sequence."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("RolloutBatch.select: indices is empty; select at least one sample")
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"RolloutBatch.select: indices {bad} are outside [0, {len(self)})")
        sel = torch.tensor(idx, dtype=torch.long, device=self.tokens_BT.device)
        total_B = self.prompt_lens_B[sel] + self.response_lens_B[sel]
        t = int(total_B.max())
        return RolloutBatch(
            tokens_BT=self.tokens_BT[sel, :t].clone(), prompt_lens_B=self.prompt_lens_B[sel].clone(),
            response_lens_B=self.response_lens_B[sel].clone(), loss_mask_BT=self.loss_mask_BT[sel, :t].clone(),
            rollout_logp_BT=self.rollout_logp_BT[sel, :t].clone(),
            finish_reasons=[self.finish_reasons[i] for i in idx], sample_ids=[self.sample_ids[i] for i in idx],
            off_policy=self.off_policy,
            routes_BTLK=None if self.routes_BTLK is None else self.routes_BTLK[sel.to(self.routes_BTLK.device), :t].clone(),
        )

    def split(self, micro_batch_size: int) -> list["RolloutBatch"]:
        """Consecutive sub-batches of at most ``micro_batch_size`` samples (each trimmed)."""
        if not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
            raise ValueError(f"RolloutBatch.split: micro_batch_size={micro_batch_size!r} must be an int > 0")
        n = len(self)
        return [self.select(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]


# ---------------------------------------------------------------------------------- validation
def validate_request(prompts: Sequence[Sequence[int]], params: SamplingParams, *, sample_ids: Sequence[int],
                     vocab_size: int, max_seq_len: int, micro_batch_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the bad argument (run by :func:`generate` before any compute)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params: expected a SamplingParams, got {type(params).__name__}")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive int (the tokenizer's vocabulary)")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be an int >= 2 (the context: prompt + response)")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size <= 0):
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive int or None (all at once)")
    if len(prompts) == 0:
        raise ValueError("prompts: got no prompts; pass at least one token-id list")
    if len(sample_ids) != len(prompts):
        raise ValueError(f"sample_ids: got {len(sample_ids)} ids for {len(prompts)} prompts; pass one global sample id per prompt")
    for name, tok in [("eos_token_id", params.eos_token_id)] + [("stop_token_ids", t) for t in params.stop_token_ids]:
        if tok is not None and tok >= vocab_size:
            raise ValueError(f"params.{name}: token {tok} is outside the vocabulary [0, {vocab_size}); fix the tokenizer ids")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) >= max_seq_len:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens, longer than the context allows (max_seq_len={max_seq_len} must "
                f"leave room for at least one response token); truncate the prompt or filter it out"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompts[{i}] holds token ids outside [0, vocab_size={vocab_size}) (min {lo}, max {hi})")


# ----------------------------------------------------------------------------------- generation
def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class _Decode:
    """State of one micro-batch decode, identical on every rank of the replica."""

    buf_BT: torch.Tensor  # tokens at their positions (device)
    prompt_lens_B: torch.Tensor  # CPU int64
    limit_B: torch.Tensor  # CPU int64: min(prompt + max_new_tokens, max_seq_len)
    mu_BT: torch.Tensor  # CPU fp32: μ of the token AT position t
    resp_B: torch.Tensor  # CPU int64 response lengths so far
    done_B: torch.Tensor  # CPU bool
    reasons: list[str]
    routes_BTLK: Optional[torch.Tensor] = None  # CPU: routing replay's record (models.moe.RouterFeed)


class _Generator:
    """One replica's decode loop over micro-batches (holds the call's arguments, no global state)."""

    def __init__(self, model: torch.nn.Module, pgc: "ProcessGroupCollection", params: SamplingParams, *, seed: int,
                 step: int, vocab_size: int, max_seq_len: int, use_kv_cache: bool, timeout_s: Optional[float],
                 lock_step: Optional[dist.ProcessGroup] = None) -> None:
        self.model, self.pgc, self.params = model, pgc, params
        self.timeout_s = timeout_s
        self.seed, self.step, self.vocab_size, self.max_seq_len = seed, step, vocab_size, max_seq_len
        self.stage = stage_info(pgc)
        self.tp_group = getattr(pgc, "tp", None)
        self.kv = use_kv_cache
        self.lock_step = lock_step
        # TP = PP = 1: our lean decoder on the model's own weights (models/lean_decode.py), ~2x faster on CPU.
        # Under lock-step (an expert-parallel MoE model, which it does not run) megatron's path decodes.
        self.lean = self.kv and lock_step is None and lean_decode.supported(model, pgc)
        self.packs = lean_decode.WeightPacks() if self.lean else None  # packed once, for every micro-batch
        self.device = _model_device(model)
        config = unwrap_model(model).config
        self.hidden_size, self.wire_dtype = config.hidden_size, config.pipeline_dtype or config.params_dtype
        self.stop_ids = torch.tensor(sorted(params.stop_set), dtype=torch.int64)
        self.forward_calls = 0
        self.sample_ids_mb: list[int] = []
        # MoE routing replay: record each fed position's expert choices on this stage (RouterFeed)
        feed = RouterFeed.of(model)
        self.feed = feed if feed is not None and feed.replay else None

    # -- forwards: logits [B, V] of the last fed position, on the last stage (None elsewhere) --
    def _full_logits(self, tokens_BT: torch.Tensor) -> Optional[torch.Tensor]:
        self.forward_calls += 1
        if self.stage.pp_size == 1:
            return model_forward(self.model, tokens_BT)[:, -1]
        out = run_microbatches(
            self.model, self.pgc, [{"tokens": tokens_BT}],
            lambda batch, logits_BTV: (logits_BTV.new_zeros(()), {"logits_BV": logits_BTV[:, -1].detach().clone()}),
            forward_only=True,
        )
        return out[0]["logits_BV"] if self.stage.is_last else None

    def _record(self, st: _Decode, fed_start: int, lo: int, hi: int) -> None:
        """Routing replay: keep positions ``[lo, hi)`` of the last forward, which fed ``[fed_start, ...)``."""
        if self.feed is None or not self.feed.num_layers:  # replay off, or no MoE layer on this stage
            return
        rec = self.feed.recorded(st.buf_BT.shape[0])
        st.routes_BTLK[:, lo:hi] = rec[:, lo - fed_start:hi - fed_start]

    def _kv_logits(self, ctx: Union[StaticInferenceContext, lean_decode.LeanDecoder], tokens_BT: torch.Tensor,
                   start: int) -> torch.Tensor:
        """Feed positions [start, start + n) through the cache; logits of the last one."""
        self.forward_calls += 1
        if self.lean:
            return ctx.logits(tokens_BT, start)
        n = tokens_BT.shape[1]
        ctx.sequence_len_offset = start
        if start > 0:
            ctx.enable_decode_mode()
        pos_BT = torch.arange(start, start + n, device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)
        if self.stage.pp_size > 1:
            return self._stage_forward(ctx, tokens_BT, pos_BT)
        # materialize_only_last_token_logits: [B, 1, V]
        return self.model(tokens_BT, pos_BT, None, inference_context=ctx)[:, -1]

    def _stage_forward(self, ctx: StaticInferenceContext, tokens_BT: torch.Tensor,
                       pos_BT: torch.Tensor) -> Optional[torch.Tensor]:
        """PP > 1: the fed positions through this stage's layers and its own KV cache. The hidden states
        ``[n, B, H]`` come from the previous stage and go to the next; the last stage returns the logits."""
        n, b = tokens_BT.shape[1], tokens_BT.shape[0]
        if not self.stage.is_first:
            h_nBH = torch.empty((n, b, self.hidden_size), dtype=self.wire_dtype, device=wire_device())
            recv_from_previous_stage(h_nBH, self.pgc, timeout_s=self.timeout_s, what="decode hidden states")
            unwrap_model(self.model).set_input_tensor(h_nBH.to(self.device))
        out = self.model(tokens_BT, pos_BT, None, inference_context=ctx)
        if not self.stage.is_last:  # the decoder's output [n, B, H]
            send_to_next_stage(out.to(wire_device(), self.wire_dtype), self.pgc, timeout_s=self.timeout_s,
                               what="decode hidden states")
            return None
        return out[:, -1]

    # -- lock-step (module docstring): every replica of the group runs the same number of forwards --
    def _still_decoding(self, done: bool) -> bool:
        """Whether to run another decode step: this micro-batch's rows are not all done, or (lock-step)
        some replica of the group still decodes. One small all-reduce per step under lock-step."""
        if self.lock_step is None:
            return not done
        return group_max(int(not done), self.lock_step, timeout_s=self.timeout_s, what="decode step") > 0

    def _dummy_forward(self) -> None:
        """A forward of one pad token outside any KV cache (through every pipeline stage): this replica's
        share of a decode step another replica of the lock-step group still needs. Its logits are unused."""
        self._full_logits(torch.zeros((1, 1), dtype=torch.int64, device=self.device))

    def run_dummy(self) -> None:
        """A micro-batch this replica does not have (lock-step): the prefill's forward, then one per
        decode step until every replica of the group is done."""
        self._dummy_forward()
        while self._still_decoding(True):
            self._dummy_forward()

    # -- one decoding step: position t gets a forced prompt token or a sample --
    def _advance(self, st: _Decode, logits_BV: Optional[torch.Tensor], t: int) -> None:
        params = self.params
        fresh_B = (st.prompt_lens_B <= t) & ~st.done_B  # rows that sample position t
        every = bool(fresh_B.all())  # the common case: no forced prompt token, no finished row
        rows = torch.arange(fresh_B.numel()) if every else torch.nonzero(fresh_B).view(-1)
        n = rows.numel()
        tok_R = torch.zeros(n, dtype=torch.int64)
        mu_R = torch.zeros(n, dtype=torch.float32)
        if n and logits_BV is not None:
            lg_RV = logits_BV if every else logits_BV.index_select(0, rows.to(logits_BV.device))
            sids = self.sample_ids_mb if every else [self.sample_ids_mb[r] for r in rows.tolist()]
            positions = (t - st.prompt_lens_B[rows]).tolist()  # response position of the new token
            keys_R2 = None if params.is_greedy else row_keys(self.seed, self.step, sids, positions, device=lg_RV.device)
            tok_dev, mu_dev = sample_with_logprobs(lg_RV, params, keys_R2, self.tp_group, vocab_size=self.vocab_size)
            tok_R, mu_R = tok_dev.cpu(), mu_dev.float().cpu()
        if n and self.stage.pp_size > 1:
            # the last stage sampled; every stage of the replica extends the same sequences. One broadcast
            # per step: token ids (< 2^53) and fp32 μ are both exact in float64
            both_2R = last_stage_to_all(torch.stack([tok_R.double(), mu_R.double()]), self.pgc,
                                        timeout_s=self.timeout_s, what="sampled tokens and their μ")
            tok_R, mu_R = both_2R[0].long(), both_2R[1].float()
        if n:
            st.buf_BT[rows.to(st.buf_BT.device), t] = tok_R.to(st.buf_BT.device)
            st.mu_BT[rows, t] = mu_R
            st.resp_B[rows] += 1
            stop_R = torch.isin(tok_R, self.stop_ids) if self.stop_ids.numel() else torch.zeros(n, dtype=torch.bool)
            hit_limit_R = (t + 1) >= st.limit_B[rows]
            ended_R = stop_R | hit_limit_R
            for i in ended_R.nonzero().flatten().tolist():  # rows that finish at this position
                r = int(rows[i])
                if stop_R[i]:
                    st.reasons[r] = "eos" if int(tok_R[i]) == params.eos_token_id else "stop"
                else:
                    st.reasons[r] = "length"
                st.done_B[r] = True

    def run(self, prompts: Sequence[Sequence[int]], sample_ids: Sequence[int], *, rows: Sequence[int] = (),
            listener: Optional["DecodeListener"] = None, block_positions: int = 0) -> list["_Row"]:
        """Decode one micro-batch; per sample (response ids, μ per response token, finish reason, recorded
        routes or None). ``listener`` (with the micro-batch's ``rows``): see :func:`generate`."""
        b = len(prompts)
        self.sample_ids_mb = list(sample_ids)
        plen_B = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        limit_B = torch.clamp(plen_B + self.params.max_new_tokens, max=self.max_seq_len)
        t_max = int(limit_B.max())
        buf_BT = torch.full((b, t_max), PAD_ID, dtype=torch.int64)
        for i, p in enumerate(prompts):
            buf_BT[i, : len(p)] = torch.tensor(list(p), dtype=torch.int64)
        st = _Decode(buf_BT.to(self.device), plen_B, limit_B, torch.zeros(b, t_max), torch.zeros(b, dtype=torch.int64),
                     torch.zeros(b, dtype=torch.bool), [""] * b)
        if self.feed is not None:
            st.routes_BTLK = torch.zeros((b, t_max, self.feed.num_layers, self.feed.topk), dtype=ROUTE_DTYPE)
        t = int(plen_B.min())  # prefill [0, t), then produce position t
        if self.lean:
            ctx = lean_decode.LeanDecoder(self.model, b, t_max, self.packs)
        else:
            ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=t_max) if self.kv else None
        if listener is not None:
            listener.begin(list(rows), t_max)
        sent = 0  # columns [0, sent) were handed to the listener
        logits_BV = self._kv_logits(ctx, st.buf_BT[:, :t], 0) if self.kv else self._full_logits(st.buf_BT[:, :t])
        self._record(st, 0, 0, t)
        done = False
        while True:
            if not done:
                self._advance(st, logits_BV, t)
                t += 1
                done = bool(st.done_B.all())
                # tokens [0, t) are known: columns [0, t - 1) can be scored (column j scores token j + 1)
                if listener is not None and block_positions and not done and t - 1 - sent >= block_positions:
                    listener.block(sent, *_block(st, sent, t - 1), last=False)
                    sent = t - 1
            if not self._still_decoding(done):
                break
            if done:  # lock-step: finished here, another replica still decodes
                self._dummy_forward()
            elif self.kv:
                logits_BV = self._kv_logits(ctx, st.buf_BT[:, t - 1 : t], t - 1)
                self._record(st, t - 1, t - 1, t)
            else:
                logits_BV = self._full_logits(st.buf_BT[:, :t])
                self._record(st, 0, t - 1, t)  # the earlier positions were recorded when they were new
        if listener is not None:  # the rest: columns [sent, t - 1), t - 1 being the longest row's last token
            listener.block(sent, *_block(st, sent, t - 1), last=True)
        out = []
        buf = st.buf_BT.cpu()
        for i in range(b):
            p, r = int(plen_B[i]), int(st.resp_B[i])
            routes = None if st.routes_BTLK is None else st.routes_BTLK[i, : p + r]
            out.append((buf[i, p : p + r].tolist(), st.mu_BT[i, p : p + r].tolist(), st.reasons[i], routes))
        return out


def _block(st: _Decode, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns [start, end) of a decode for a :class:`DecodeListener`: the tokens at positions
    [start, end] (int64 [B, n + 1], CPU) and the loss mask of the columns (float32 [B, n]: column j scores
    token j + 1, a response token of row b iff prompt_b <= j + 1 < prompt_b + response_b so far; every
    token up to ``end`` is decoded, so the mask equals the finished batch's ``loss_mask_BT`` there)."""
    tokens = st.buf_BT[:, start:end + 1].cpu()
    nxt = torch.arange(start + 1, end + 1, dtype=torch.int64)[None, :]
    p = st.prompt_lens_B[:, None]
    mask = ((nxt >= p) & (nxt < p + st.resp_B[:, None])).float()
    return tokens, mask


class DecodeListener(Protocol):
    """Told about each micro-batch while it is decoded (:func:`generate`'s ``listener``); the same calls
    on every rank of the replica."""

    def begin(self, rows: list[int], capacity: int) -> None:
        """A micro-batch of ``rows`` (indices into the prompts) starts; its positions lie in [0, capacity)."""
        ...

    def block(self, start: int, tokens_Bn: torch.Tensor, mask_Bn: torch.Tensor, *, last: bool) -> None:
        """Columns [start, start + n) are decoded: ``tokens_Bn`` int64 [B, n + 1] holds positions
        start..start + n (pad 0 after a row's end), ``mask_Bn`` float32 [B, n] the loss mask of those
        columns (``RolloutBatch.loss_mask_BT``'s alignment). Consecutive blocks tile the columns from 0;
        ``last``: the micro-batch is done (its columns end at its longest row's last token)."""
        ...


_Row = tuple[list[int], list[float], str, Optional[torch.Tensor]]
"""One decoded row: response ids, μ per response token, finish reason, routing replay's record ([P + R, L, k])."""


def _assemble(prompts: Sequence[Sequence[int]], results: list[_Row],
              sample_ids: Sequence[int], off_policy: bool) -> RolloutBatch:
    b = len(prompts)
    plen_B = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    rlen_B = torch.tensor([len(r[0]) for r in results], dtype=torch.int64)
    t = int((plen_B + rlen_B).max())
    tokens_BT = torch.full((b, t), PAD_ID, dtype=torch.int64)
    mask_BT = torch.zeros(b, t, dtype=torch.float32)
    logp_BT = torch.zeros(b, t, dtype=torch.float32)
    first = results[0][3] if results else None  # every row has routes, or none has
    routes_BTLK = None if first is None else torch.zeros((b, t) + tuple(first.shape[1:]), dtype=first.dtype)
    for i, (p, (resp, mu, _, routes)) in enumerate(zip(prompts, results)):
        if routes_BTLK is not None:
            routes_BTLK[i, : routes.shape[0]] = routes
        n_p, n_r = len(p), len(resp)
        tokens_BT[i, :n_p] = torch.tensor(list(p), dtype=torch.int64)
        if n_r:
            tokens_BT[i, n_p : n_p + n_r] = torch.tensor(resp, dtype=torch.int64)
            # next-token alignment: column t scores token t+1
            mask_BT[i, n_p - 1 : n_p + n_r - 1] = 1.0
            logp_BT[i, n_p - 1 : n_p + n_r - 1] = torch.tensor(mu, dtype=torch.float32)
    return RolloutBatch(tokens_BT, plen_B, rlen_B, mask_BT, logp_BT, [r[2] for r in results],
                        [int(s) for s in sample_ids], off_policy, routes_BTLK)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    pg_collection: "ProcessGroupCollection",
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    sample_ids: list[int],
    seed: int,
    step: int,
    vocab_size: int,
    max_seq_len: int,
    use_kv_cache: bool = True,
    micro_batch_size: int | None = None,
    timeout_s: Optional[float] = None,
    lock_step: Optional[dist.ProcessGroup] = None,
    listener: Optional[DecodeListener] = None,
    block_positions: int = 0,
) -> RolloutBatch:
    """Sample one response per prompt from the student; collective over one DP replica.

    Args:
        model: this rank's model chunk (GPTModel, possibly DDP-wrapped). Put in eval mode for the
            call; its previous mode is restored.
        pg_collection: the student's process groups (TP/PP of this replica).
        prompts: token ids per prompt (the same list on every rank of the replica).
        params: sampling settings.
        sample_ids: global sample index per prompt: with ``seed`` and ``step`` it keys the noise.
        seed, step: the run's seed and the optimizer step.
        vocab_size: the real vocabulary (padded columns are never sampled).
        max_seq_len: the context: prompt + response <= max_seq_len.
        use_kv_cache: KV-cached decoding (any TP / PP); False recomputes the prefix at every step.
        micro_batch_size: prompts decoded together (None: all at once).
        timeout_s: bound on each wait between pipeline stages with PP > 1: the last stage → other stages
            broadcasts and the KV path's stage-to-stage hidden states, and on the lock-step all-reduces
            (None: the process group's own timeout).
        lock_step: the student's DP group when its replicas must run the same number of forwards (an
            expert-parallel MoE student; module docstring): collective over that group, every replica
            calls, one with no prompts too (it gets an empty batch). None: this replica alone.
        listener: told on every rank of the replica about each micro-batch while it is decoded
            (:class:`DecodeListener`: ``begin`` with its rows, then its columns in blocks of
            ``block_positions`` as soon as they are decoded, the rest with ``last``; 0: one block when the
            micro-batch is done). The step streams them to the teachers (``rollout.overlap_teachers``).
            What is decoded does not change. Lock-step dummy micro-batches are not reported.
        block_positions: columns per :meth:`DecodeListener.block` (0: the whole micro-batch at its end).
    Returns:
        The same :class:`RolloutBatch` (CPU tensors) on every rank of the replica, in prompt order.
    """
    if not isinstance(block_positions, int) or block_positions < 0:
        raise ValueError(f"block_positions={block_positions!r} must be an int >= 0 (0: each micro-batch whole)")
    if lock_step is not None and not prompts:
        validate_request([[0]], params, sample_ids=[0], vocab_size=vocab_size, max_seq_len=max_seq_len,
                         micro_batch_size=micro_batch_size)
    else:
        validate_request(prompts, params, sample_ids=sample_ids, vocab_size=vocab_size, max_seq_len=max_seq_len,
                         micro_batch_size=micro_batch_size)
    inner = unwrap_model(model)
    padded = getattr(inner, "vocab_size", None)
    if padded is not None and vocab_size > padded:
        raise ValueError(f"vocab_size={vocab_size} exceeds the model's output vocabulary ({padded} padded columns); "
                         "pass the tokenizer's vocabulary size")
    gen = _Generator(model, pg_collection, params, seed=seed, step=step, vocab_size=vocab_size,
                     max_seq_len=max_seq_len, use_kv_cache=use_kv_cache, timeout_s=timeout_s, lock_step=lock_step)
    n = len(prompts)
    mbs = micro_batch_size or max(n, 1)
    n_mb = -(-n // mbs)
    # lock-step: as many micro-batches as the group's longest list (the extra ones are dummies)
    n_runs = group_max(n_mb, lock_step, timeout_s=timeout_s, what="rollout micro-batch count") if lock_step else n_mb
    order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths decode together
    results: list[Optional[_Row]] = [None] * n
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        recording = gen.feed.recording() if gen.feed is not None else nullcontext()
        with sequence_parallel_off(model), recording:  # module docstring: decoding without sequence parallelism
            for k in range(n_runs):
                if k >= n_mb:
                    gen.run_dummy()
                    continue
                idx = order[k * mbs : (k + 1) * mbs]
                chunk = gen.run([prompts[i] for i in idx], [sample_ids[i] for i in idx], rows=idx, listener=listener,
                                block_positions=block_positions)
                for i, res in zip(idx, chunk):
                    results[i] = res
    finally:
        model.train(was_training)
    if not n:
        return RolloutBatch.empty()
    batch = _assemble(prompts, [r for r in results if r is not None], sample_ids, params.off_policy)
    dt = time.perf_counter() - t0
    logger.debug("generate: %d samples, %d response tokens in %.2fs (%.0f tok/s, kv=%s, %d forwards)", n,
                 batch.num_response_tokens, dt, batch.num_response_tokens / max(dt, 1e-9), gen.kv, gen.forward_calls)
    return batch
