"""Tokenizers: sentencepiece and tokenizer.json round trips (trained here, no network), byte tokenizer,
special tokens, load_tokenizer dispatch and the vocabulary check."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from camopd_megatron.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    load_tokenizer,
)

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "tiger", "lemon", "piano", "what", "is",
         "the", "sum", "of", "sort", "numbers", "please", "answer", "patient", "reports", "pain", "in", "knee"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` generated lines of words, digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        parts.insert(rng.randrange(len(parts)), str(rng.randint(0, 9999)))
        lines.append(" ".join(parts) + rng.choice(["?", ".", "!", ""]))
    return lines


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    text = d / "corpus.txt"
    text.write_text("\n".join(corpus(400)) + "\n")
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(d / "tok"), vocab_size=200, model_type="bpe",
        character_coverage=1.0, normalization_rule_name="identity", pad_id=3, bos_id=1, eos_id=2, unk_id=0,
        num_threads=1, minloglevel=2,
    )
    return d / "tok.model"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(400), trainer=trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    return d


def test_sentencepiece_round_trip(spm_model: Path) -> None:
    tok = load_tokenizer(spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (200, 1, 2, 3)
    lines = corpus(300, seed=1)
    for line in lines:
        ids = tok.encode(line)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == line
    assert tok.encode(lines[0], add_special_tokens=True) == [1, *tok.encode(lines[0])]
    # compression: a trained model, not one piece per character
    assert sum(len(tok.encode(s)) for s in lines) < 0.6 * sum(len(s) for s in lines)
    # a directory with tokenizer.model is found too
    (spm_model.parent / "tokenizer.model").write_bytes(spm_model.read_bytes())
    assert isinstance(load_tokenizer(spm_model.parent), SentencePieceTokenizer)


def test_hf_tokenizer_json_round_trip_and_specials(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)  # the directory: tokenizer.json wins
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 300
    assert tok.bos_id is None  # tokenizer_config.json says null
    assert tok.eos_id == 2 and tok.pad_id == 0  # {"content": ...} and plain-string forms
    lines = corpus(300, seed=2) + ["héllo wörld ✓ — unicode", "  leading and trailing  ", "tabs\tand\nnewlines"]
    for line in lines:
        ids = tok.encode(line)
        assert tok.decode(ids) == line
    assert tok.encode_batch(lines[:5]) == [tok.encode(s) for s in lines[:5]]
    # special tokens written in the text are single tokens, as in transformers
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"


def test_hf_fallback_specials_without_config(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id is None and tok.eos_id == 2 and tok.pad_id is None  # <|im_end|> found by name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(DataError, match="eos_token '<nope>' is not in"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_byte_tokenizer_modes() -> None:
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 128
    for line in corpus(50) + ["<|im_start|>system\nYou are {x}.\t~"]:
        assert tok.decode(tok.encode(line)) == line
        assert max(tok.encode(line)) < 128
    assert tok.encode("a", add_special_tokens=True) == [1, 97]
    assert tok.decode(tok.encode("é")) == "\ufffd"  # non-ASCII is unk in the 128-id mode
    assert tok.encode("a\x01é") == [97, 3, 3] and tok.encode("a\x01") == [97, 3]  # slow and fast paths agree
    full = ByteTokenizer(260)
    text = "héllo ✓ 😀"
    assert full.decode(full.encode(text)) == text and max(full.encode(text)) < 260
    with pytest.raises(DataError, match="vocab_size=200"):
        ByteTokenizer(200)


def test_check_vocab_names_sizes_and_file(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    check_vocab(tok, 300, hf_dir)
    with pytest.raises(DataError) as info:
        check_vocab(tok, 256, hf_dir / "tokenizer.json")
    msg = str(info.value)
    assert "300" in msg and "256" in msg and "tokenizer.json" in msg and "model.vocab_size" in msg
    check_vocab(load_tokenizer(None), 128)
    with pytest.raises(DataError, match="<byte> has 128 tokens but model.vocab_size is 100"):
        check_vocab(load_tokenizer(None), 100)


def test_load_tokenizer_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match="neither a tokenizer.json nor a sentencepiece"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="cannot load sentencepiece model"):
        load_tokenizer(tmp_path / "broken.model")
