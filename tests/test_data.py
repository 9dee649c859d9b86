"""Prompt data: templates, bad input, JSONL index, Parquet, streams (DP shards, global batches, resume,
weights, held-out split, length filter), the synthetic source and the config factory."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camopd_megatron.config import config_from_dict
from camopd_megatron.testing.configs import random_init
from camopd_megatron.data import (
    BranchDataset,
    ByteTokenizer,
    DataError,
    JsonlFile,
    ParquetFile,
    PromptStream,
    SyntheticPromptSource,
    build_prompt_sources,
    parse_record,
    rank_slice,
    render,
)

TOK = ByteTokenizer()


def write_jsonl(path: Path, records: list[Any], trailing_newline: bool = True) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    return str(path)


def prompts_file(tmp_path: Path, n: int, name: str = "p.jsonl", start: int = 0) -> str:
    return write_jsonl(tmp_path / name, [{"prompt": f"prompt number {i}", "domain": "d"} for i in range(start, start + n)])


def dataset(paths: list[str], **kw: Any) -> BranchDataset:
    kw.setdefault("seed", 7)
    return BranchDataset("general", paths, TOK, **kw)


# ---------------------------------------------------------------------------------------------- templates
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]


def test_templates_render_exactly() -> None:
    rec = parse_record({"messages": MSGS}, "f:line 1")
    assert render(rec, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi there <|im_end|>\n<|im_start|>assistant\n", False)
    assert render(rec, "llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n", False)
    assert render(rec, "plain") == ("System: Be brief.\nUser:  Hi there \nAssistant:", True)
    plain = parse_record({"prompt": "2+2?"}, "f:line 1")
    assert render(plain, "plain") == ("2+2?", True)
    assert render(plain, "chatml")[0] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="data.chat_template: got 'alpaca'"):
        render(plain, "alpaca")


@pytest.mark.parametrize("obj, match", [
    ({"messages": [{"role": "tool", "content": "x"}]}, r"f\.jsonl:line 3: messages\[0\] has unknown role 'tool'"),
    ({"text": "x"}, r"f\.jsonl:line 3: missing 'prompt' .* keys present: \['text'\]"),
    ({"prompt": ""}, "non-empty string"),
    ({"prompt": "a", "messages": MSGS}, "both 'prompt' and 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be"),
    ({"prompt": "a", "domain": 3}, "'domain' must be a string"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_and_line(obj: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_record(obj, "f.jsonl:line 3")


# ---------------------------------------------------------------------------------------------- files
def test_jsonl_index_edges(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}, "", {"prompt": "é✓"}], trailing_newline=False)
    f = JsonlFile(p)
    assert len(f) == 3 and f.offsets.dtype == np.int64 and f.offsets[-1] == Path(p).stat().st_size
    assert f.read(0) == {"prompt": "a"} and f.read(1) is None and f.read(2) == {"prompt": "é✓"}
    assert len(JsonlFile(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a"}]))) == 1
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: empty prompt file"):
            JsonlFile(tmp_path / name)
    with pytest.raises(DataError, match="cannot open prompt file"):
        JsonlFile(tmp_path / "missing.jsonl")


def test_bad_lines_error_or_skip_with_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recs: list[Any] = [{"prompt": f"p{i}"} for i in range(6)]
    recs[2] = '{"prompt": "unterminated'
    recs[4] = {"messages": [{"role": "robot", "content": "x"}]}
    p = write_jsonl(tmp_path / "bad.jsonl", recs)
    stream = PromptStream(dataset([p], shuffle=False))
    stream.next_batch(2)
    with pytest.raises(DataError, match=r"bad\.jsonl:line 3: malformed JSON .*on_bad_line: skip"):
        stream.next_batch(1)
    stream = PromptStream(dataset([p], shuffle=False, on_bad_line="skip"))
    with caplog.at_level(logging.INFO, logger="camopd_megatron"):
        got = stream.next_batch(8)
    assert [x.index for x in got] == [0, 1, 3, 5, 0, 1, 3, 5]
    assert stream.stats()["bad_skipped"] == 4 and stream.stats()["loaded"] == 8
    assert "line 5: messages[0] has unknown role 'robot'" in caplog.text
    assert "epoch 0 done" in caplog.text and "'bad_skipped': 2" in caplog.text
    allbad = write_jsonl(tmp_path / "allbad.jsonl", ["{", "["])
    with pytest.raises(DataError, match="a whole epoch gave no usable prompt"):
        PromptStream(dataset([allbad], on_bad_line="skip")).next_batch(1)


def test_parquet_prompts_and_messages(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 50
    table = pa.table({
        "prompt": [f"question {i}" if i % 5 else None for i in range(n)],
        "messages": [None if i % 5 else [{"role": "user", "content": f"chat {i}"}] for i in range(n)],
        "domain": ["med"] * n,
    })
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=8)
    got = PromptStream(dataset([str(path)], shuffle=False)).next_batch(n)
    assert [g.index for g in got] == list(range(n))
    assert got[3].text == "question 3" and got[5].text == "User: chat 5\nAssistant:" and got[7].domain == "med"
    assert TOK.decode(got[3].ids) == "question 3"
    # a large file is read by row groups (LRU of 2): same rows in any order
    small, large = ParquetFile(path), ParquetFile(path, load_all_bytes=0, cache_row_groups=2)
    assert small._table is not None and large._table is None
    rows = np.random.default_rng(0).permutation(n).tolist()
    assert [large.read(i) for i in rows] == [small.read(i) for i in rows]
    assert len(large._cache) == 2 and large.where(9) == f"{path}:row 9"
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="no 'prompt' or 'messages' column"):
        dataset([str(tmp_path / "nocol.parquet")])
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet: empty prompt file"):
        dataset([str(tmp_path / "empty.parquet")])


# ---------------------------------------------------------------------------------------------- streams
def test_sharded_dp2_disjoint_and_cover_the_epoch(tmp_path: Path) -> None:
    p = prompts_file(tmp_path, 101)
    ds = dataset([p])
    shards = [PromptStream(ds, mode="sharded", dp_rank=r, dp_size=2) for r in range(2)]
    got = [[x.index for x in s.next_batch(n)] for s, n in zip(shards, (51, 50))]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == list(range(101))
    assert got[0] != sorted(got[0])  # shuffled
    # the union of the shards is the global order, interleaved
    order = ds.epoch_order(0).tolist()
    assert got[0] == order[0::2] and got[1] == order[1::2]
    # next epoch: a new permutation, again covered
    nxt = [[x.index for x in s.next_batch(50)] for s in shards]
    assert sorted(nxt[0] + nxt[1] + [int(ds.epoch_order(1)[100])]) == list(range(101))
    assert ds.epoch_order(1).tolist() != order


def test_global_batches_same_on_every_rank_and_independent_of_dp(tmp_path: Path) -> None:
    p = prompts_file(tmp_path, 40)
    per_rank = [[x.index for x in PromptStream(dataset([p]), mode="global").next_batch(12)] for _ in range(3)]
    assert per_rank[0] == per_rank[1] == per_rank[2]
    batch = list(range(12))
    assert [rank_slice(batch, r, 4) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert sum((rank_slice(batch, r, 2) for r in range(2)), []) == batch
    with pytest.raises(ValueError, match="rollout.prompts_per_step: a global batch of 12 .* 5 data-parallel"):
        rank_slice(batch, 0, 5)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        rank_slice(batch, 2, 2)


@pytest.mark.parametrize("mode", ["global", "sharded"])
def test_resume_continues_exactly(tmp_path: Path, mode: str) -> None:
    paths = [prompts_file(tmp_path, 23, "a.jsonl"), prompts_file(tmp_path, 9, "b.jsonl", start=100)]
    kw = dict(weights=[1.0, 2.0], heldout_fraction=0.1, on_bad_line="skip")
    ref = PromptStream(dataset(paths, **kw), mode=mode, dp_rank=1 if mode == "sharded" else 0, dp_size=2)
    full = [(x.index, x.position, x.ids) for x in ref.next_batch(70)]  # crosses epochs
    a = PromptStream(dataset(paths, **kw), mode=mode, dp_rank=1 if mode == "sharded" else 0, dp_size=2)
    first = [(x.index, x.position, x.ids) for x in a.next_batch(37)]
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    b = PromptStream(dataset(paths, **kw), mode=mode, dp_rank=1 if mode == "sharded" else 0, dp_size=2)
    b.load_state_dict(state)
    rest = [(x.index, x.position, x.ids) for x in b.next_batch(33)]
    assert first + rest == full
    assert b.stats() == ref.stats()
    other = PromptStream(dataset(paths, **{**kw, "seed": 8}), mode=mode, dp_rank=1 if mode == "sharded" else 0, dp_size=2)
    with pytest.raises(ValueError, match="seed changed"):
        other.load_state_dict(state)


def test_weights_heldout_and_no_shuffle(tmp_path: Path) -> None:
    a, b = prompts_file(tmp_path, 30, "a.jsonl"), prompts_file(tmp_path, 10, "b.jsonl")
    ds = dataset([a, b], weights=[1.0, 3.0])
    order = ds.epoch_order(0)
    assert len(order) == 40 and (order >= 30).sum() == 30  # b upsampled to 30 (3 passes), a subsampled to 10
    assert np.bincount(order[order >= 30] - 30, minlength=10).tolist() == [3] * 10
    assert len(set(order[order < 30].tolist())) == 10
    assert ds.epoch_order(0).tolist() == order.tolist()  # deterministic
    plain = dataset([a, b], shuffle=False)
    assert plain.epoch_order(0).tolist() == list(range(40)) == plain.epoch_order(1).tolist()
    big = prompts_file(tmp_path, 2000, "big.jsonl")
    h = dataset([big], heldout_fraction=0.2)
    held = set(h.heldout_ids().tolist())
    assert 300 < len(held) < 500 and h.epoch_length == 2000 - len(held)
    assert not held & set(h.epoch_order(0).tolist())
    assert held == set(dataset([big], heldout_fraction=0.2, seed=99).heldout_ids().tolist())  # seed-independent
    ev = [list(h.heldout_prompts(dp_rank=r, dp_size=2)) for r in range(2)]
    assert sorted(x.index for x in ev[0] + ev[1]) == sorted(held)
    with pytest.raises(ValueError, match=r"data.branches.general.weights: got \[1.0\]"):
        dataset([a, b], weights=[1.0])


def test_length_filter_truncate_or_drop(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "x" * n} for n in (5, 20, 8, 30)])
    trunc = PromptStream(dataset([p], shuffle=False, max_prompt_tokens=10))
    got = trunc.next_batch(4)
    assert [len(g.ids) for g in got] == [6, 10, 9, 10]
    assert got[1].ids[0] == TOK.BOS and got[1].ids[1:] == [ord("x")] * 9  # left-truncated, BOS kept
    assert trunc.stats()["truncated"] == 2
    drop = PromptStream(dataset([p], shuffle=False, max_prompt_tokens=10, too_long="drop"))
    assert [g.index for g in drop.next_batch(4)] == [0, 2, 0, 2]
    assert drop.stats()["dropped_too_long"] == 3  # records 1, 3, then 1 again (3 of epoch 1 not read yet)


def test_synthetic_source_and_factory(tmp_path: Path) -> None:
    cfg = config_from_dict(random_init({}))
    srcs = build_prompt_sources(cfg.data, ["general", "domain"], TOK, seed=3)
    assert all(isinstance(s, SyntheticPromptSource) for s in srcs.values())
    g = srcs["general"].next_batch(6)
    assert [x.index for x in g] == list(range(6)) and all(TOK.decode(x.ids[1:]) == x.text for x in g)
    assert srcs["domain"].next_batch(1)[0].text.startswith("Encode with the shift-3 cipher")
    again = build_prompt_sources(cfg.data, ["general"], TOK, seed=3)["general"]
    again.load_state_dict(srcs["general"].state_dict())
    fresh = build_prompt_sources(cfg.data, ["general"], TOK, seed=3)["general"]
    assert [x.text for x in again.next_batch(3)] == [x.text for x in fresh.next_batch(9)][6:]
    p = prompts_file(tmp_path, 10)
    cfg = config_from_dict(random_init({"data": {"branches": {"general": {"paths": [p]}, "domain": {"paths": [p]}},
                                     "too_long": "drop", "chat_template": "chatml"}}))
    srcs = build_prompt_sources(cfg.data, ["general", "domain"], TOK, seed=3)
    first = srcs["general"].next_batch(1)[0]
    assert first.text.startswith("<|im_start|>user\nprompt number") and first.ids[0] == ord("<")
    with pytest.raises(ValueError, match="no entry for scheduled branch 'other'"):
        build_prompt_sources(cfg.data, ["other"], TOK, seed=3)
    with pytest.raises(ValueError, match="saved from a 'synthetic' source"):
        srcs["general"].load_state_dict(again.state_dict())
