"""Numerical kernels: vocab-parallel log-probs/entropy/top-k (pure torch.distributed) and gap scores."""
from camopd_megatron.ops.fused_output import fused_output_logprobs
from camopd_megatron.ops.gaps import GAP_SCORE_KINDS, sample_gap_scores, token_gaps
from camopd_megatron.ops.topk import sort_by_value_then_index, vocab_parallel_topk
from camopd_megatron.ops.vocab_parallel import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    logprobs_at_indices,
    sampled_token_logprobs,
    shifted_sampled_token_logprobs,
    token_entropy,
)

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "GAP_SCORE_KINDS",
    "fused_output_logprobs",
    "IGNORE_INDEX",
    "logprobs_at_indices",
    "sample_gap_scores",
    "sampled_token_logprobs",
    "shifted_sampled_token_logprobs",
    "sort_by_value_then_index",
    "token_entropy",
    "token_gaps",
    "vocab_parallel_topk",
]
