"""Prompt data and tokenizers.

- :mod:`~camopd_megatron.data.tokenizers`: sentencepiece / ``tokenizer.json`` / synthetic byte tokenizers,
  :func:`load_tokenizer`, :func:`check_vocab`, :func:`model_tokenizer` (both at once);
- :mod:`~camopd_megatron.data.templates`: record validation and the plain / chatml / llama3 templates;
- :mod:`~camopd_megatron.data.files`: streaming random access to JSONL (line-offset index) and Parquet;
- :mod:`~camopd_megatron.data.dataset`: one branch's files, weights, held-out split, epoch order;
- :mod:`~camopd_megatron.data.stream`: :class:`PromptSource` for the trainer (global or sharded),
  :func:`rank_slice`, the synthetic source and :func:`build_prompt_sources`.

Typical use in the trainer::

    tok = load_tokenizer(cfg.data.tokenizer); check_vocab(tok, cfg.model.vocab_size, cfg.data.tokenizer)
    sources = build_prompt_sources(cfg.data, cfg.scheduler.branches, tok, cfg.run.seed)
    batch = sources[branch].next_batch(cfg.rollout.prompts_per_step)   # same on every rank
    mine = rank_slice(batch, dp_rank, dp_size)
"""
from camopd_megatron.data.dataset import BranchDataset, Prompt
from camopd_megatron.data.files import JsonlFile, ParquetFile, open_record_file
from camopd_megatron.data.stream import (
    PromptSource,
    PromptStream,
    SyntheticPromptSource,
    build_prompt_sources,
    rank_slice,
)
from camopd_megatron.data.templates import TEMPLATES, DataError, PromptRecord, parse_record, render
from camopd_megatron.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    model_tokenizer,
)

__all__ = [
    "BranchDataset",
    "Prompt",
    "JsonlFile",
    "ParquetFile",
    "open_record_file",
    "PromptSource",
    "PromptStream",
    "SyntheticPromptSource",
    "build_prompt_sources",
    "rank_slice",
    "TEMPLATES",
    "DataError",
    "PromptRecord",
    "parse_record",
    "render",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab",
    "load_tokenizer",
    "model_tokenizer",
]
