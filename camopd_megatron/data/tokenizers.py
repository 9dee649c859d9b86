"""Tokenizers behind one small protocol: sentencepiece, Hugging Face ``tokenizer.json``, synthetic bytes.

Every tokenizer offers ``encode(text, add_special_tokens=False) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id`` / ``eos_id`` / ``pad_id`` (``None`` when the tokenizer has none) and
``name`` (the file it came from, or ``<byte>``).

``add_special_tokens`` follows ``transformers``: for a plain prompt it is True (sentencepiece and the
byte tokenizer prepend BOS; a ``tokenizer.json`` runs its own post-processor, e.g. Llama adds
``<|begin_of_text|>``, Qwen adds nothing); a chat-templated prompt already spells its special tokens
in the text and is encoded with it False. Special tokens written in the text (``<|im_start|>``) are
parsed as such by a ``tokenizer.json`` that declares them (its added tokens), as in ``transformers``.

:func:`load_tokenizer` picks the kind from the path; :func:`check_vocab` compares with the model.
No network access anywhere.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from camopd_megatron.data.templates import DataError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "check_vocab",
    "model_tokenizer",
]

logger = logging.getLogger(__name__)

_ASCII_TABLE = bytes([3, 3, 3, 3, *range(4, 256)])
"""Byte translation for the ASCII fast path of :class:`ByteTokenizer` (code points 0..3 are unk)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, rollout and eval need from a tokenizer."""

    name: str
    """Where the tokenizer came from (a file path, or ``<byte>``)."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including added/special tokens); ids are in ``[0, vocab_size)``."""
        ...

    @property
    def bos_id(self) -> Optional[int]:
        """Beginning-of-sequence id, or None."""
        ...

    @property
    def eos_id(self) -> Optional[int]:
        """End-of-sequence id (ends a response), or None."""
        ...

    @property
    def pad_id(self) -> Optional[int]:
        """Padding id, or None."""
        ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept as text)."""
        ...


class ByteTokenizer:
    """The synthetic tokenizer used when ``data.tokenizer`` is None (tests, the CPU demo).

    ids 0/1/2/3 are pad/bos/eos/unk. With ``vocab_size=128`` (the default model's vocabulary) it is
    character-level over ASCII: a character with code point 4..127 is its own id, anything else
    becomes unk (decoded as U+FFFD), so ASCII text round-trips exactly. With ``vocab_size >= 260`` it
    is byte-level over UTF-8 (byte b -> id b + 4) and every text round-trips exactly.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    _SPECIALS = 4

    def __init__(self, vocab_size: int = 128) -> None:
        if vocab_size != 128 and vocab_size < 256 + self._SPECIALS:
            raise DataError(
                f"ByteTokenizer(vocab_size={vocab_size}): use 128 (ASCII characters) or >= {256 + self._SPECIALS} "
                "(UTF-8 bytes); fix model.vocab_size or give data.tokenizer"
            )
        self._vocab_size = vocab_size
        self._bytes = vocab_size >= 256 + self._SPECIALS
        self.name = "<byte>"

    @property
    def vocab_size(self) -> int:
        """128 (ASCII mode) or the requested size (byte mode; ids above 259 are never produced)."""
        return self._vocab_size

    @property
    def bos_id(self) -> Optional[int]:
        """1."""
        return self.BOS

    @property
    def eos_id(self) -> Optional[int]:
        """2."""
        return self.EOS

    @property
    def pad_id(self) -> Optional[int]:
        """0."""
        return self.PAD

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Character (ASCII mode) or UTF-8 byte (byte mode) ids; BOS first when ``add_special_tokens``."""
        if self._bytes:
            ids = (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + self._SPECIALS).tolist()
        elif text.isascii():  # fast path: code points 0..3 -> unk through a byte table
            ids = list(text.encode("ascii").translate(_ASCII_TABLE))
        else:
            ids = [o if self._SPECIALS <= o < 128 else self.UNK for o in map(ord, text)]
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode`; pad/bos/eos decode to nothing, unk to U+FFFD."""
        if self._bytes:
            data = bytes(i - self._SPECIALS for i in ids if self._SPECIALS <= i < 256 + self._SPECIALS)
            return data.decode("utf-8", errors="replace")
        return "".join(chr(i) if self._SPECIALS <= i < 128 else ("\ufffd" if i == self.UNK else "") for i in ids)


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file (Llama-2 / Mistral / Gemma style)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm  # optional at import time of this module

        self.name = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"data.tokenizer: cannot load sentencepiece model {path!r}: {exc}; "
                             "give a valid .model file") from exc

    @staticmethod
    def _opt(i: int) -> Optional[int]:
        return i if i >= 0 else None

    @property
    def vocab_size(self) -> int:
        """The model's piece count."""
        return int(self._sp.GetPieceSize())

    @property
    def bos_id(self) -> Optional[int]:
        """The model's BOS id (None when trained with ``bos_id=-1``)."""
        return self._opt(self._sp.bos_id())

    @property
    def eos_id(self) -> Optional[int]:
        """The model's EOS id, or None."""
        return self._opt(self._sp.eos_id())

    @property
    def pad_id(self) -> Optional[int]:
        """The model's pad id, or None."""
        return self._opt(self._sp.pad_id())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Piece ids; BOS first when ``add_special_tokens`` and the model has one (as LlamaTokenizer)."""
        ids = list(self._sp.EncodeAsIds(text))
        if add_special_tokens and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return str(self._sp.DecodeIds(list(map(int, ids))))


def _special_from_config(value: Any) -> Optional[str]:
    """A special token in tokenizer_config.json: a string, or ``{"content": ...}`` (AddedToken)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library; no ``transformers``, no network).

    BOS/EOS/pad come from ``tokenizer_config.json`` beside the file when present (``bos_token``,
    ``eos_token``, ``pad_token``), else from common names among the added tokens.
    """

    _FALLBACK = {
        "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
        "eos": ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"),
        "pad": ("<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    }

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTok

        self.name = str(path)
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise DataError(f"data.tokenizer: cannot load tokenizer.json {path!r}: {exc}; "
                             "give a valid Hugging Face tokenizer.json") from exc
        self._ids: dict[str, Optional[int]] = {}
        config = Path(path).parent / "tokenizer_config.json"
        declared: dict[str, Optional[str]] = {}
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{config}: line {exc.lineno}: malformed JSON ({exc.msg}); fix or remove the file") from exc
            for kind in ("bos", "eos", "pad"):
                if f"{kind}_token" in data:
                    declared[kind] = _special_from_config(data[f"{kind}_token"])
        for kind in ("bos", "eos", "pad"):
            if kind in declared:
                token = declared[kind]
                tid = self._tok.token_to_id(token) if token is not None else None
                if token is not None and tid is None:
                    raise DataError(f"{config}: {kind}_token {token!r} is not in {path}; fix tokenizer_config.json")
                self._ids[kind] = tid
            else:
                self._ids[kind] = next(
                    (t for t in (self._tok.token_to_id(s) for s in self._FALLBACK[kind]) if t is not None), None
                )

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> Optional[int]:
        """BOS id, or None."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> Optional[int]:
        """EOS id, or None."""
        return self._ids["eos"]

    @property
    def pad_id(self) -> Optional[int]:
        """Pad id, or None."""
        return self._ids["pad"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; ``add_special_tokens`` runs the file's post-processor (e.g. Llama's BOS)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` of many texts at once (the Rust side parallelises)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens kept."""
        return str(self._tok.decode(list(map(int, ids)), skip_special_tokens=False))


def load_tokenizer(path: Optional[str | Path], byte_vocab_size: int = 128) -> Tokenizer:
    """The tokenizer at ``path`` (the value of ``data.tokenizer``).

    - None: :class:`ByteTokenizer` (``byte_vocab_size``: 128 ASCII characters, or >= 260 for UTF-8 bytes);
    - a ``*.json`` file, or a directory with ``tokenizer.json``: :class:`HFTokenizer`;
    - a ``*.model`` file, or a directory with ``tokenizer.model``: :class:`SentencePieceTokenizer`.
    """
    if path is None:
        return ByteTokenizer(byte_vocab_size)
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "tokenizer.model").is_file():
            p = p / "tokenizer.model"
        else:
            raise DataError(f"data.tokenizer: directory {str(path)!r} has neither tokenizer.json nor tokenizer.model; "
                             "point data.tokenizer at the tokenizer file or the model's HF directory")
    if not p.is_file():
        raise DataError(f"data.tokenizer: {str(path)!r} does not exist; give a tokenizer.json, a sentencepiece "
                         ".model file, a directory holding one, or null for the synthetic byte tokenizer")
    if p.suffix == ".json":
        tok: Tokenizer = HFTokenizer(p)
    elif p.suffix == ".model":
        tok = SentencePieceTokenizer(p)
    else:
        raise DataError(f"data.tokenizer: {str(path)!r} is neither a tokenizer.json nor a sentencepiece .model file; "
                         "give one of those (or a directory holding one)")
    logger.info("tokenizer %s: vocab %d, bos %s, eos %s, pad %s", tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, path: Optional[str | Path] = None) -> None:
    """Raise DataError when the tokenizer has more ids than the model's (unpadded) vocabulary."""
    if tokenizer.vocab_size > model_vocab_size:
        where = str(path) if path is not None else tokenizer.name
        raise DataError(
            f"data.tokenizer: {where} has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size} or use the model's own tokenizer"
        )


def model_tokenizer(path: Optional[str | Path], model_vocab_size: int) -> Tokenizer:
    """The run's tokenizer (``data.tokenizer``) checked against the model's vocabulary.

    Without ``data.tokenizer`` the built-in byte tokenizer: ASCII characters, or UTF-8 bytes when the
    vocabulary has room (>= 260 ids). Raises ValueError naming ``data.tokenizer`` (see :func:`load_tokenizer`,
    :func:`check_vocab`).
    """
    tokenizer = load_tokenizer(path, byte_vocab_size=model_vocab_size if model_vocab_size >= 260 else 128)
    check_vocab(tokenizer, model_vocab_size, path)
    return tokenizer
