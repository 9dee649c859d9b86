"""Numerical kernels: vocab-parallel log-probs/top-k (pure torch.distributed), the fused output projection
and gap scores."""
from camopd_megatron.ops.fused_output import KeptSoftmaxBuffer, fused_output_logprobs
from camopd_megatron.ops.gaps import GAP_SCORE_KINDS, sample_gap_scores, token_gaps
from camopd_megatron.ops.topk import vocab_parallel_topk
from camopd_megatron.ops.vocab_parallel import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    sampled_token_logprobs,
)

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "GAP_SCORE_KINDS",
    "fused_output_logprobs",
    "KeptSoftmaxBuffer",
    "IGNORE_INDEX",
    "sample_gap_scores",
    "sampled_token_logprobs",
    "token_gaps",
    "vocab_parallel_topk",
]
