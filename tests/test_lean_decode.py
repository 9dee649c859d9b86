"""The lean TP=1 decoder gives megatron's tokens and μ (it reads the same weights), on packed weights
(MKL's or oneDNN's) as on the plain ones; a teacher scoring through it block by block
(``models.scoring.IncrementalScorer``) gives the log-probs of one forward over the whole sequences."""
from __future__ import annotations

import pytest
import torch

from camopd_megatron.testing.multiproc import run_on_ranks

VARIANTS = [
    dict(num_query_groups=2, add_qkv_bias=True),                                  # qwen2: GQA + QKV bias
    dict(num_query_groups=2, qk_layernorm=True, head_dim=32, rotary_base=1e6),    # qwen3: q/k norm, head_dim
    dict(tie_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0}),  # tied, llama3 RoPE
]


def _compare(rank: int, world_size: int) -> list[dict]:
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models import lean_decode
    from camopd_megatron.distill.rollout import SamplingParams, generate
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    pgc = simple_pg_collection(1, 1, 1)
    out = []
    for kw in VARIANTS:
        cfg = ModelConfig(**{**dict(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                    vocab_size=120, seq_length=96), **kw})
        init_model_rng(3, pgc)
        model = build_gpt_model(cfg, pgc).eval()
        with torch.no_grad():  # a peaked distribution so sampling is not just noise
            model.embedding.word_embeddings.weight.mul_(4)
        prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
        params = SamplingParams(temperature=1.0, max_new_tokens=24)
        runs = {}
        for lean in (True, False):
            supported = lean_decode.supported
            lean_decode.supported = supported if lean else (lambda *a: False)
            try:
                runs[lean] = generate(model, pgc, prompts, params, sample_ids=[0, 1, 2], seed=1, step=0,
                                      vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_length)
            finally:
                lean_decode.supported = supported
        packed = _packed_vs_plain(model, lean_decode)
        out.append({**packed, "supported": lean_decode.supported(model, pgc),
                    "incremental_diff": _incremental_vs_whole(model, pgc, cfg.vocab_size),
                    "same_tokens": torch.equal(runs[True].tokens_BT, runs[False].tokens_BT),
                    "mu_diff": (runs[True].rollout_logp_BT - runs[False].rollout_logp_BT).abs().max().item()})
    return out


def _packed_vs_plain(model, lean_decode) -> dict:
    """The decoder on each library's packed weights (those this torch has) against the same decoder on the
    plain ones (prefill, then decode steps), and the packs shared by two micro-batches of one rollout."""
    plain = lean_decode.WeightPacks(pack=False)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = {"packed_diff": 0.0, "packed_used": {}, "packs_shared": {}}
    for library in [lib for lib in ("mkl", "onednn") if lean_decode._packer_available(lib)]:
        packs = lean_decode.WeightPacks(library=library)
        dec = {name: lean_decode.LeanDecoder(model, 2, 16, p) for name, p in (("packed", packs), ("plain", plain))}
        for start, n in ((0, 3), (3, 1), (4, 1)):
            feed = tokens[:, :n] if start == 0 else tokens[:, start - 3:start - 2]
            a, b = (dec[k].logits(feed, start) for k in ("packed", "plain"))
            out["packed_diff"] = max(out["packed_diff"], (a - b).abs().max().item())
        again = lean_decode.LeanDecoder(model, 2, 16, packs)  # the next micro-batch of the same size
        out["packed_used"][library] = dec["packed"].out.packed is not None and dec["packed"].out.library == library
        out["packs_shared"][library] = again.out.packed is dec["packed"].out.packed
    return out


def _incremental_vs_whole(model, pgc, vocab_size: int) -> float:
    """A teacher's stream: sequences scored block by block through the KV cache (blocks of 3, 1, 6, 0 and 9
    columns, the first two with nothing to score) against one forward of the whole sequences."""
    from camopd_megatron.models.scoring import IncrementalScorer, score_logprobs

    tokens = torch.randint(0, vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 20)
    mask[0, 4:19], mask[1, 7:12], mask[2, 5:19] = 1, 1, 1
    diff = 0.0
    for temperature in (1.0, 0.7):
        whole = score_logprobs(model, pgc, tokens, mask, micro_batch=None, vocab_size=vocab_size,
                               temperature=temperature)
        scorer = IncrementalScorer(model, rows=3, capacity=20, vocab_size=vocab_size, temperature=temperature)
        parts, start = [], 0
        for n in (3, 1, 6, 0, 9):
            parts.append(scorer.extend(tokens[:, start:start + n + 1], mask[:, start:start + n]))
            start += n
        diff = max(diff, (torch.cat(parts, dim=1) - whole[:, :19]).abs().max().item())
        assert bool((torch.cat(parts, dim=1)[mask[:, :19] == 0] == 0).all())
    return diff


def test_lean_decoder_matches_megatron_inference():
    (res,) = run_on_ranks(_compare, 1, timeout_s=240)
    for kw, r in zip(VARIANTS, res):
        assert r["supported"], kw
        assert r["same_tokens"], (kw, r)
        assert r["mu_diff"] <= 1e-5, (kw, r)
        assert r["packed_diff"] <= 1e-5, (kw, r)
        assert r["incremental_diff"] <= 1e-5, (kw, r)  # a teacher's stream scores as one whole forward
        if torch.backends.mkl.is_available():  # x86 torch builds: the decode steps run on packed weights
            assert "mkl" in r["packed_used"] and all(r["packed_used"].values()), (kw, r)
            assert all(r["packs_shared"].values()), (kw, r)


def test_the_decode_weights_are_packed_by_a_fixed_rule_of_the_cpu_vendor(monkeypatch, tmp_path):
    """MKL packs on Intel CPUs and wherever the vendor is unknown, oneDNN on AMD CPUs (MKL's non-Intel
    paths); never a timing, so every run on one machine rounds the same way. An unknown library is an error."""
    from camopd_megatron.models import lean_decode

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n", encoding="utf-8")
    assert lean_decode._cpu_vendor(str(info)) == "AuthenticAMD"
    assert lean_decode._cpu_vendor(str(tmp_path / "absent")) == ""
    has = {lib: lean_decode._packer_available(lib) for lib in ("mkl", "onednn")}
    for vendor, want in (("GenuineIntel", ["mkl"]), ("", ["mkl"]), ("AuthenticAMD", ["onednn", "mkl"])):
        monkeypatch.setattr(lean_decode, "_cpu_vendor", lambda v=vendor: v)
        expected = next((lib for lib in want if has[lib]), None)
        assert lean_decode.default_packer() == expected, vendor
        assert lean_decode.WeightPacks().library == expected, vendor
    for pack in (True, False):
        with pytest.raises(ValueError, match=r"'openblas': expected one of \['mkl', 'onednn'\]"):
            lean_decode.WeightPacks(pack=pack, library="openblas")
