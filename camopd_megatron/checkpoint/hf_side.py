"""The Hugging Face side files our checkpoints carry: config.json, generation_config.json, tokenizer and
chat template of the model they came from.

COPIES under ``hf/`` (never a path, which would break on another machine): the import writes them
(:mod:`.hf_io`), every training checkpoint carries them over from the checkpoint its run started from
(:func:`carry_hf_files`, called inside `checkpoint.dist.save_checkpoint` so they are listed and verified), and the export writes them back with
:func:`generation_config`. Pure file handling: no transformers, no megatron.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

__all__ = ["TOKENIZER_FILES", "HF_SIDE_FILES", "HF_SUBDIR", "TOKENIZER_MODELS", "copy_side_files", "carry_hf_files",
           "tokenizer_special_ids", "generation_config"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""Copied unchanged in both directions when present."""
HF_SIDE_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
"""Everything our checkpoints carry of the HF model they came from."""
HF_SUBDIR = "hf"
"""Inside our checkpoint: the imported config.json, generation_config.json and tokenizer files."""
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""At least one of these makes a loadable tokenizer (tokenizer_config.json alone gives transformers an
empty one)."""


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that exist in ``src`` into ``dst`` (created); returns the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)
            copied.append(n)
    return copied


def carry_hf_files(src_ckpt: Optional[str | os.PathLike], dst_ckpt: str | os.PathLike) -> list[str]:
    """Copy the ``hf/`` side files of checkpoint ``src_ckpt`` (the one a run started from) into checkpoint
    ``dst_ckpt`` (one it saved); returns the names copied (none when ``src_ckpt`` is None or has none)."""
    if src_ckpt is None or not (Path(src_ckpt) / HF_SUBDIR).is_dir():
        return []
    return copy_side_files(Path(src_ckpt) / HF_SUBDIR, Path(dst_ckpt) / HF_SUBDIR, HF_SIDE_FILES)


def tokenizer_special_ids(side: Path) -> dict[str, int]:
    """bos/eos/pad token ids (``*_token_id`` keys) named by the tokenizer files in ``side``, read from
    the JSON files directly (no transformers needed): the token strings of tokenizer_config.json /
    special_tokens_map.json, looked up in the added tokens and the tokenizer.json vocabulary."""
    def load(name: str) -> dict[str, Any]:
        try:
            data = json.loads((side / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    tok_cfg, special_map, tok_json = load("tokenizer_config.json"), load("special_tokens_map.json"), load("tokenizer.json")
    ids: dict[str, int] = {}
    vocab = tok_json.get("model", {}).get("vocab") if isinstance(tok_json.get("model"), dict) else None
    if isinstance(vocab, dict):
        ids.update({k: int(v) for k, v in vocab.items() if isinstance(v, int)})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids.update({e[0]: i for i, e in enumerate(vocab) if isinstance(e, list) and e})
    ids.update({t["content"]: int(t["id"]) for t in tok_json.get("added_tokens", []) if "content" in t and "id" in t})
    ids.update({t["content"]: int(i) for i, t in (tok_cfg.get("added_tokens_decoder") or {}).items()
                if isinstance(t, dict) and "content" in t})
    out = {}
    for role in ("bos", "eos", "pad"):
        tok = tok_cfg.get(f"{role}_token") or special_map.get(f"{role}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tok in ids:
            out[f"{role}_token_id"] = ids[tok]
    return out


def generation_config(side: Optional[Path], base: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The exported generation_config.json: the original's, with bos/eos/pad filled in where unset (from
    the tokenizer, then config.json), pad falling back to (the first) eos."""
    gen: dict[str, Any] = {"_from_model_config": True}
    if side is not None and (side / "generation_config.json").is_file():
        gen = json.loads((side / "generation_config.json").read_text())
    sources = [tokenizer_special_ids(side) if side is not None else {}, base or {}]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None:
            gen[key] = next((src[key] for src in sources if src.get(key) is not None), None)
    eos = gen.get("eos_token_id")
    if gen.get("pad_token_id") is None and eos is not None:
        gen["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {k: v for k, v in gen.items() if v is not None}
