"""Score a batch with a frozen forward: sampled-token log-probs ``[B, T]`` (the one place that does it).

    logp_BT = score_logprobs(model, pgc, tokens_BT, mask_BT, micro_batch=4, vocab_size=V)

Callers: the student's pre-update recompute and the built-in evaluation / conflict probe (the result
on every pipeline stage), a colocated teacher (every stage too), and a teacher host (the last stage
only: its output rank sends the log-probs to the student).

What a call does, on every rank of one model replica (its TP × PP ranks, each with the same batch):
the rows are split into equal-shape micro-batches (``models.pipeline.make_microbatches``, the last
padded with zero rows), each carrying the output window of its scored positions; megatron's
forward-only schedule runs them in eval mode under ``no_grad`` (the model's mode is restored after);
the last stage turns the window's final hidden states into log-probs with the fused vocab-parallel
output projection (``models.logprobs.next_token_logprobs``; no [B, T, V] logits), and with
``to_all_stages`` one bounded broadcast gives them to the earlier stages.

Alignment: ``out[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`` under softmax(logits / temperature);
0 where ``mask_BT`` is 0 and in the last column. fp32.

:class:`IncrementalScorer` gives the same log-probs for sequences that arrive block by block (a teacher
scoring a rollout while it is decoded): each block extends a KV cache (``models.lean_decode``), so a
block costs its own positions only. TP = PP = 1 dense models of the lean decoder's architecture.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from camopd_megatron.models import lean_decode
from camopd_megatron.models.gpt import output_weight, stage_info
from camopd_megatron.models.logprobs import next_token_logprobs
from camopd_megatron.models.pipeline import (
    group_max, last_stage_to_all, make_microbatches, run_microbatches, wire_device,
)

if TYPE_CHECKING:
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection


def score_logprobs(
    model: torch.nn.Module,
    pg_collection: "ProcessGroupCollection",
    tokens_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    micro_batch: Optional[int],
    vocab_size: int,
    temperature: float = 1.0,
    device: Optional[torch.device] = None,
    to_all_stages: bool = True,
    timeout_s: Optional[float] = None,
    lock_step: Optional["dist.ProcessGroup"] = None,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> Optional[torch.Tensor]:
    """Sampled-token log-probs fp32 ``[B, T]`` of a frozen forward (module docstring).

    Args:
        model: this rank's model chunk (a bare GPTModel).
        pg_collection: the process groups the model was built on.
        tokens_BT: int64 tokens, the same on every rank of the replica.
        mask_BT: scored positions, aligned with the outputs (float or uint8 0/1).
        micro_batch: rows per micro-batch (None: all rows at once).
        vocab_size: the real (unpadded) vocabulary.
        temperature: softmax temperature of the scored distribution.
        device: where the model runs (the micro-batches are moved there; default: left where they are).
        to_all_stages: True: the result on every pipeline stage, on ``tokens_BT``'s device. False: on
            the last stage only (on the wire device, ready to send), None on the other stages.
        timeout_s: bound on the last stage → other stages broadcast and the lock-step all-reduce (None:
            the group's own timeout).
        lock_step: the model's DP group when its replicas must run the same number of forwards (an
            expert-parallel MoE model, ``models.pipeline`` "Lock-step"): a replica with fewer rows, or
            none, runs dummy micro-batches. None: each replica runs its own.
        extra: more per-row tensors ``[B, ...]`` for the micro-batches (an MoE model's ``seq_lens`` and
            replayed ``routes``, ``models.pipeline`` "MoE router inputs").
    """
    b = tokens_BT.shape[0]
    is_last = stage_info(pg_collection).is_last
    empty = torch.zeros(tokens_BT.shape, dtype=torch.float32, device=tokens_BT.device)
    if lock_step is not None:  # does any replica of the group have rows? (the same answer on all)
        busy = group_max(int(b > 0), lock_step, timeout_s=timeout_s, what="scoring") > 0
    else:
        busy = b > 0  # every rank of the replica has the same B
    if not busy:  # nobody runs the schedule
        return empty if to_all_stages or is_last else None
    extra = dict(extra or {})
    if b == 0:  # a dummy-only replica: its placeholder needs one column to run
        tokens_BT, mask_BT = (torch.zeros((0, max(1, tokens_BT.shape[1])), dtype=x.dtype, device=x.device)
                              for x in (tokens_BT, mask_BT))
        extra = {k: v.new_zeros((0,) + ((tokens_BT.shape[1],) if v.dim() > 1 else ()) + tuple(v.shape[2:]))
                 for k, v in extra.items()}
    weight = output_weight(model) if is_last else None

    def loss_fn(mb: dict[str, Any], hidden_BWH: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logp_BT = next_token_logprobs(hidden_BWH, mb["tokens"], pg_collection.tp, vocab_size=vocab_size,
                                      temperature=temperature, mask_BT=mb["mask"],
                                      first_position=mb["output_window"][0], output_weight=weight)
        return logp_BT.new_zeros(()), {"logp": logp_BT[: mb["n_real"]]}

    batches = make_microbatches({"tokens": tokens_BT, "mask": mask_BT, **extra}, micro_batch, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = run_microbatches(model, pg_collection, batches, loss_fn, forward_only=True, lock_step=lock_step,
                                    timeout_s=timeout_s)
    finally:
        model.train(was_training)
    if b == 0:  # its dummies' outputs are empty
        return empty if to_all_stages or is_last else None
    wire = wire_device()
    if not to_all_stages:
        return torch.cat([o["logp"] for o in outs]).float().to(wire) if is_last else None
    logp_BT = (torch.cat([o["logp"] for o in outs]).float().to(wire) if is_last
               else torch.zeros(tokens_BT.shape, dtype=torch.float32, device=wire))
    logp_BT = last_stage_to_all(logp_BT, pg_collection, timeout_s=timeout_s, what="scored log-probs")
    return logp_BT.to(tokens_BT.device)


class IncrementalScorer:
    """Sampled-token log-probs of ``rows`` sequences fed block by block through a KV cache (module docstring).

        scorer = IncrementalScorer(model, rows=B, capacity=T, vocab_size=V)
        logp_Bn = scorer.extend(tokens_Bn1, mask_Bn)      # columns [end, end + n); then the next block

    Block k's ``tokens_Bn1`` holds positions end..end + n (the last one only as the target of column
    end + n − 1), ``mask_Bn`` the scored columns. The log-probs equal :func:`score_logprobs`'s over the
    whole sequence up to float rounding (another summation order: blocked attention over the cache, the
    lean decoder's ops instead of megatron's modules). Frozen model, no grad; its weights are read, never
    copied (:class:`~camopd_megatron.models.lean_decode.LeanDecoder`, unpacked: a block's products have
    B × n rows)."""

    def __init__(self, model: torch.nn.Module, *, rows: int, capacity: int, vocab_size: int,
                 temperature: float = 1.0) -> None:
        self.decoder = lean_decode.LeanDecoder(model, rows, capacity, lean_decode.WeightPacks(pack=False))
        self.weight = output_weight(model)
        self.vocab_size, self.temperature, self.capacity = vocab_size, temperature, capacity
        self.end = 0
        """Columns scored so far (the cache holds positions [0, end))."""

    @staticmethod
    def supported(model: torch.nn.Module, pg_collection: "ProcessGroupCollection") -> bool:
        return lean_decode.supported(model, pg_collection)

    @torch.no_grad()
    def extend(self, tokens_Bn1: torch.Tensor, mask_Bn: torch.Tensor) -> torch.Tensor:
        """fp32 [B, n] log-probs of columns [end, end + n) (0 where ``mask_Bn`` is 0), on the tokens' device."""
        n = mask_Bn.shape[1]
        if tokens_Bn1.shape != (mask_Bn.shape[0], n + 1) or self.end + n >= self.capacity + (n == 0):
            raise ValueError(f"IncrementalScorer.extend: tokens {tuple(tokens_Bn1.shape)} and mask "
                             f"{tuple(mask_Bn.shape)} do not form a block of columns [{self.end}, {self.end + n}) "
                             f"below the capacity {self.capacity}")
        device = self.weight.device
        out = torch.zeros(mask_Bn.shape, dtype=torch.float32, device=tokens_Bn1.device)
        if n == 0:
            return out
        tokens = tokens_Bn1.to(device)
        hidden_BnC = self.decoder.hidden(tokens[:, :n], self.end)  # every position feeds the cache
        self.end += n
        if bool(mask_Bn.any()):  # no output product for a block of prompt positions
            mask = torch.nn.functional.pad(mask_Bn.to(device), (0, 1))
            logp = next_token_logprobs(hidden_BnC, tokens, None, vocab_size=self.vocab_size,
                                       temperature=self.temperature, mask_BT=mask, output_weight=self.weight)
            out.copy_(logp[:, :n].float())
        return out
