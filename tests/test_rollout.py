"""On-policy rollout (issue 5): KV cache vs recompute, TP/PP parity, μ, sampling distribution, seeding.

One 2-rank gloo launch (module fixture) runs every model check: a TP=1 replica per rank, a TP=2
replica over both ranks (CPU init gives the same weights at any TP), and a PP=2 replica loaded from a
checkpoint of the TP=1 model (decoding with a KV cache per stage and by full recompute). The sampler itself is also tested in-process on synthetic logits.
"""
from __future__ import annotations

import math

import pytest
import torch

from camopd_megatron.config import RolloutConfig
from camopd_megatron.distill.rollout import RolloutBatch, SamplingParams, generate
from camopd_megatron.distill.sampling import (
    gumbel_noise, row_keys, row_uniforms, sample_tokens, sample_with_logprobs, token_logprobs,
)
from camopd_megatron.testing.multiproc import run_on_ranks

CFG = dict(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
           vocab_size=100, vocab_pad_multiple=128, seq_length=64)
SEED = 4321
V = CFG["vocab_size"]
MAX_SEQ = 20
# different prompt lengths in one batch (1..9 tokens)
PROMPTS = [[5, 17, 3], [8], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 42], [7, 11, 13, 17, 19], [99, 0, 98, 1]]
SIDS = [10, 11, 12, 13, 14, 15]
N_CHI = 4000  # draws of the first response token for the distribution tests
CHI_PROMPT = [3, 1, 4, 1, 5]
N_KERNEL = 3000  # rows of the sharded-sampler check


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of counts vs probabilities, bins with expectation < 5 merged; (stat, dof, p)."""
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5
    obs_b = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp_b = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_b > 0
    stat = (((obs_b - exp_b) ** 2)[keep] / exp_b[keep]).sum().item()
    dof = int(keep.sum().item()) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)).item()
    return stat, dof, p


def _train_logp(model, pgc, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """next_token_logprobs of a TRAINING-mode forward on the returned tokens (last stage; None elsewhere)."""
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.pipeline import run_microbatches

    model.train()
    out = run_microbatches(
        model, pgc, [{"tokens": batch.tokens_BT}],
        lambda b, logits: (logits.new_zeros(()), {"logp": next_token_logprobs(
            logits, b["tokens"], pgc.tp, vocab_size=V, temperature=temperature).detach()}),
        forward_only=True,
    )
    return out[0]["logp"] if out else None


def _mu_err(model, pgc, batch: RolloutBatch, temperature: float) -> float | None:
    ref = _train_logp(model, pgc, batch, temperature)
    if ref is None:
        return None
    return ((ref - batch.rollout_logp_BT) * batch.loss_mask_BT).abs().max().item()


def _first_token_probs(model, pgc, prompt: list[int], temperature: float) -> torch.Tensor:
    """softmax(logits / T) of the token after ``prompt`` over the real vocab (gathered over TP)."""
    import torch.distributed as dist

    model.eval()
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(prompt)).unsqueeze(0), None)[0, -1]
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(pgc.tp))]
    dist.all_gather(parts, logits, group=pgc.tp)
    return torch.softmax(torch.cat(parts)[:V].double() / temperature, dim=-1)


def _summary(batch: RolloutBatch) -> dict:
    return {"tokens": batch.tokens_BT.tolist(), "reasons": list(batch.finish_reasons),
            "resp": {sid: batch.response_ids(i) for i, sid in enumerate(batch.sample_ids)},
            "logp": batch.rollout_logp_BT.clone(), "mask": batch.loss_mask_BT.clone()}


class _DecodeLog:
    """Collects rollout's end-of-call debug line ("kv=..., N forwards") while active: which path ran."""

    def __init__(self) -> None:
        import logging

        self.lines: list[str] = []
        self.logger = logging.getLogger("camopd_megatron.distill.rollout")
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())

    def __enter__(self) -> "_DecodeLog":
        import logging

        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


class _Listener:
    """Records what a DecodeListener is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin(self, rows, capacity):
        self.events.append(("begin", list(rows), capacity))

    def block(self, start, tokens, mask, *, last):
        self.events.append(("block", start, tokens.clone(), mask.clone(), last))


def _listened(model, pgc, params, kw) -> dict:
    """Decode with a listener (micro-batches of 4, blocks of 2 columns): the batch must equal the one decoded
    without it, and the blocks of each micro-batch must tile its columns with the batch's tokens and loss mask."""
    plain = generate(model, pgc, PROMPTS, params, micro_batch_size=4, **kw)
    listener = _Listener()
    batch = generate(model, pgc, PROMPTS, params, micro_batch_size=4, listener=listener, block_positions=2, **kw)
    same = torch.equal(batch.tokens_BT, plain.tokens_BT) and torch.equal(batch.rollout_logp_BT, plain.rollout_logp_BT)
    ok, blocks, rows = True, 0, []
    for event in listener.events:
        if event[0] == "begin":
            rows, col, ended = event[1], 0, False
            continue
        _, start, tokens, mask, last = event
        n = mask.shape[1]
        ok &= start == col and not ended and tokens.shape == (len(rows), n + 1)
        want_tokens = torch.zeros(len(rows), n + 1, dtype=torch.int64)
        width = max(0, min(batch.tokens_BT.shape[1] - start, n + 1))
        want_tokens[:, :width] = batch.tokens_BT[rows, start:start + width]
        ok &= torch.equal(tokens, want_tokens) and torch.equal(mask, batch.loss_mask_BT[rows, start:start + n])
        col, ended, blocks = start + n, last, blocks + 1
        if last:  # the micro-batch's columns end at its longest row's last token
            lengths = batch.prompt_lens_B[rows] + batch.response_lens_B[rows]
            ok &= col == int(lengths.max()) - 1
    begins = [e for e in listener.events if e[0] == "begin"]
    return {"same": same, "ok": bool(ok), "blocks": blocks, "micro_batches": len(begins),
            "rows": sorted(r for e in begins for r in e[1])}


def _rollout_worker(rank: int, world_size: int, ckpt_dir: str) -> dict:
    from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    cfg = ModelConfig(**CFG)
    greedy = SamplingParams(greedy=True, max_new_tokens=12, eos_token_id=2, stop_token_ids=(7,))
    t1 = SamplingParams(temperature=1.0, max_new_tokens=12, eos_token_id=2, stop_token_ids=(7,))
    trunc = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=10, eos_token_id=2)
    nucleus = SamplingParams(temperature=1.3, top_p=0.8, max_new_tokens=6)
    kw = dict(sample_ids=SIDS, seed=SEED, step=3, vocab_size=V, max_seq_len=MAX_SEQ)
    out: dict = {}

    # ---------------- TP = 1 (one replica per rank) ----------------
    pgc1 = simple_pg_collection(1, 1, world_size)
    init_model_rng(SEED, pgc1)
    m1 = build_gpt_model(cfg, pgc1)
    m1.train()
    ref = {}
    for name, params in (("greedy", greedy), ("t1", t1), ("trunc", trunc), ("nucleus", nucleus)):
        kv = generate(m1, pgc1, PROMPTS, params, use_kv_cache=True, **kw)
        rc = generate(m1, pgc1, PROMPTS, params, use_kv_cache=False, micro_batch_size=4, **kw)
        ref[name] = kv
        out[f"tp1_{name}_kv"], out[f"tp1_{name}_rc"] = _summary(kv), _summary(rc)
        out[f"tp1_{name}_mu_err"] = (_mu_err(m1, pgc1, kv, params.logprob_temperature),
                                     _mu_err(m1, pgc1, rc, params.logprob_temperature))
        out[f"tp1_{name}_off_policy"] = kv.off_policy
    out["mode_restored"] = m1.training
    m1.eval()
    generate(m1, pgc1, PROMPTS[:1], greedy, **{**kw, "sample_ids": SIDS[:1]})
    out["mode_restored_eval"] = not m1.training
    # same sample_id -> same sample, whatever the batch composition, order and micro-batch size
    sub = [4, 0, 2]
    part = generate(m1, pgc1, [PROMPTS[i] for i in sub], t1, micro_batch_size=1,
                    **{**kw, "sample_ids": [SIDS[i] for i in sub]})
    out["subset_t1"] = _summary(part)
    other_step = generate(m1, pgc1, PROMPTS, t1, **{**kw, "step": 4})
    out["other_step_t1"] = _summary(other_step)
    # a listener told about each micro-batch while it decodes (the teachers' stream): blocks of 2 columns
    out["listener"] = _listened(m1, pgc1, t1, kw)

    # ---------------- TP = 2 (both ranks) ----------------
    pgc2 = simple_pg_collection(2, 1, 1)
    init_model_rng(SEED, pgc2)
    m2 = build_gpt_model(cfg, pgc2)
    for name, params in (("greedy", greedy), ("t1", t1), ("trunc", trunc), ("nucleus", nucleus)):
        b = generate(m2, pgc2, PROMPTS, params, **kw)
        out[f"tp2_{name}"] = _summary(b)
        out[f"tp2_{name}_mu_err"] = _mu_err(m2, pgc2, b, params.logprob_temperature)
    rc2 = generate(m2, pgc2, PROMPTS, greedy, use_kv_cache=False, **kw)
    out["tp2_greedy_rc"] = _summary(rc2)

    # ---------------- PP = 2 through a checkpoint of the TP = 1 model ----------------
    save_checkpoint(ckpt_dir, model_sharded_state_dict(m1, pgc1), model_cfg=cfg, step=0)
    pgcp = simple_pg_collection(1, 2, 1)
    init_model_rng(SEED + 77, pgcp)
    mp = build_gpt_model(cfg, pgcp)
    load_model(mp, ckpt_dir, model_cfg=cfg, pg_collection=pgcp)
    paths = _DecodeLog()
    for name, params in (("greedy", greedy), ("t1", t1)):
        with paths:  # KV cache per stage (the default)
            b = generate(mp, pgcp, PROMPTS, params, micro_batch_size=4, **kw)
        out[f"pp2_{name}"] = _summary(b)
        out[f"pp2_{name}_mu_err"] = _mu_err(mp, pgcp, b, params.logprob_temperature)
        with paths:
            out[f"pp2_{name}_rc"] = _summary(generate(mp, pgcp, PROMPTS, params, micro_batch_size=4,
                                                      use_kv_cache=False, **kw))
    out["pp2_paths"] = paths.lines
    out["pp2_listener"] = _listened(mp, pgcp, t1, kw)

    # ---------------- distribution of the first sampled token (TP = 2, vocab-parallel Gumbel) ----------------
    # sharpen the tiny model (scale the output layer) so the test has power against a wrong distribution
    with torch.no_grad():
        m2.output_layer.weight.mul_(25.0)
    ids = list(range(N_CHI))
    chi = {}
    for name, params in (("t1", SamplingParams(temperature=1.0, max_new_tokens=1)),
                         ("t07_k8_p09", SamplingParams(temperature=0.7, top_k=8, top_p=0.9, max_new_tokens=1)),
                         ("p08", SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=1))):
        b = generate(m2, pgc2, [CHI_PROMPT] * N_CHI, params, sample_ids=ids, seed=SEED, step=0, vocab_size=V,
                     max_seq_len=MAX_SEQ)
        first = b.tokens_BT[:, len(CHI_PROMPT)]
        chi[name] = torch.bincount(first, minlength=V)[:V]
    chi["probs_t1"] = _first_token_probs(m2, pgc2, CHI_PROMPT, 1.0)
    chi["probs_t07"] = _first_token_probs(m2, pgc2, CHI_PROMPT, 0.7)
    chi["probs_t08"] = _first_token_probs(m2, pgc2, CHI_PROMPT, 0.8)  # a wrong reference, for power
    out["chi"] = chi

    # ---------------- the inverse-CDF kernel on synthetic vocab-sharded logits (TP = 2) ----------------
    # V_pad 128 -> 64 columns per rank; vocab 40 leaves rank 1 a shard of padding only
    gen = torch.Generator().manual_seed(11)
    kern = {}
    for vocab, temp in ((100, 1.0), (100, 0.7), (40, 1.0)):
        full = torch.randn(N_KERNEL, 128, generator=gen) * 3
        full[:, vocab:] = 1e4  # padded columns must never be drawn, nor count in μ
        keys = row_keys(5, 1, range(N_KERNEL), [0] * N_KERNEL)
        params = SamplingParams(temperature=temp)
        tok, mu = sample_with_logprobs(full[:, rank * 64:(rank + 1) * 64], params, keys, pgc2.tp, vocab_size=vocab)
        ref_tok, ref_mu = sample_with_logprobs(full, params, keys, None, vocab_size=vocab)
        kern[(vocab, temp)] = {"tok": tok, "mu": mu, "ref_tok": ref_tok, "ref_mu": ref_mu,
                               "exact_mu": torch.log_softmax(full[:, :vocab].double() / temp, -1).gather(
                                   1, ref_tok.unsqueeze(1)).squeeze(1)}
    out["kernel"] = kern
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("rollout_ckpt") / "tp1")
    return run_on_ranks(_rollout_worker, 2, args=(ckpt,), timeout_s=300, pg_timeout_s=120)


def test_kv_cache_equals_full_recompute(ranks):
    for o in ranks:
        for name in ("greedy", "t1", "trunc", "nucleus"):
            kv, rc = o[f"tp1_{name}_kv"], o[f"tp1_{name}_rc"]
            assert kv["tokens"] == rc["tokens"], name
            assert kv["reasons"] == rc["reasons"], name
        # a real test: responses differ between settings and reach every kind of stop
        assert o["tp1_greedy_kv"]["tokens"] != o["tp1_t1_kv"]["tokens"]
    reasons = {r for o in ranks for n in ("greedy", "t1", "trunc") for r in o[f"tp1_{n}_kv"]["reasons"]}
    assert "length" in reasons and reasons & {"eos", "stop"}, reasons


def test_listener_gets_each_micro_batch_in_blocks_while_it_decodes(ranks):
    for o in ranks:
        for key in ("listener", "pp2_listener"):  # the lean decoder (TP = 1) and the per-stage KV path (PP = 2)
            r = o[key]
            assert r["same"] and r["ok"], (key, r)
            assert r["micro_batches"] == 2 and r["rows"] == list(range(len(PROMPTS))), (key, r)
            assert r["blocks"] > 4, (key, r)  # blocks sent while decoding, not only at the end


def test_response_layout_and_limits(ranks):
    o = ranks[0]
    s = o["tp1_t1_kv"]
    for i, (p, sid) in enumerate(zip(PROMPTS, SIDS)):
        resp = s["resp"][sid]
        row = s["tokens"][i]
        assert row[: len(p)] == p and row[len(p): len(p) + len(resp)] == resp
        assert all(t == 0 for t in row[len(p) + len(resp):])
        assert 1 <= len(resp) <= 12 and len(p) + len(resp) <= MAX_SEQ
        reason = s["reasons"][i]
        if reason == "eos":
            assert resp[-1] == 2 and 2 not in resp[:-1] and 7 not in resp
        elif reason == "stop":
            assert resp[-1] == 7 and 7 not in resp[:-1] and 2 not in resp
        else:
            assert len(resp) == 12 or len(p) + len(resp) == MAX_SEQ
            assert 2 not in resp and 7 not in resp
        mask = s["mask"][i]
        assert mask.sum().item() == len(resp) and mask[len(p) - 1: len(p) - 1 + len(resp)].all()
        assert (s["logp"][i][mask == 0] == 0).all() and (s["logp"][i][mask == 1] < 0).all()
    # the 9-token prompt hits the context limit (9 + 12 > 20)
    assert len(s["resp"][12]) == MAX_SEQ - 9 or s["reasons"][2] != "length"
    assert len(s["tokens"][0]) == max(len(p) + len(s["resp"][sid]) for p, sid in zip(PROMPTS, SIDS))
    assert o["mode_restored"] and o["mode_restored_eval"]
    assert o["tp1_greedy_off_policy"] and not o["tp1_t1_off_policy"] and o["tp1_trunc_off_policy"]


def test_mu_matches_training_forward(ranks):
    for o in ranks:
        for name in ("greedy", "t1", "trunc", "nucleus"):
            kv_err, rc_err = o[f"tp1_{name}_mu_err"]
            assert kv_err <= 1e-4 and rc_err <= 1e-4, (name, kv_err, rc_err)
            assert o[f"tp2_{name}_mu_err"] <= 1e-4, name
    errs = [o[f"pp2_{n}_mu_err"] for o in ranks for n in ("greedy", "t1") if o[f"pp2_{n}_mu_err"] is not None]
    assert errs and max(errs) <= 1e-4


def test_tp2_and_pp2_equal_tp1(ranks):
    ref = ranks[0]
    for o in ranks:
        for name in ("greedy", "t1", "trunc", "nucleus"):
            assert o[f"tp2_{name}"]["tokens"] == ref[f"tp1_{name}_kv"]["tokens"], name
            torch.testing.assert_close(o[f"tp2_{name}"]["logp"], ref[f"tp1_{name}_kv"]["logp"], atol=1e-5, rtol=0)
        assert o["tp2_greedy_rc"]["tokens"] == ref["tp1_greedy_kv"]["tokens"]
        for name in ("greedy", "t1"):
            for path in ("", "_rc"):  # PP = 2 with the per-stage KV cache and by full recompute
                assert o[f"pp2_{name}{path}"]["tokens"] == ref[f"tp1_{name}_kv"]["tokens"], name + path
                assert o[f"pp2_{name}{path}"]["reasons"] == ref[f"tp1_{name}_kv"]["reasons"]
                # every stage of the replica returns the same batch, μ included
                torch.testing.assert_close(o[f"pp2_{name}{path}"]["logp"], ref[f"tp1_{name}_kv"]["logp"], atol=1e-5,
                                           rtol=0)
        # which path each PP = 2 call took (rollout's summary line): cached, then recompute, per setting
        assert [("kv=True" in line, "kv=False" in line) for line in o["pp2_paths"]] == [(True, False), (False, True)] * 2


def test_samples_depend_only_on_seed_step_and_sample_id(ranks):
    o = ranks[0]
    full, part = o["tp1_t1_kv"]["resp"], o["subset_t1"]["resp"]
    for sid, resp in part.items():
        assert resp == full[sid], sid
    assert o["other_step_t1"]["resp"] != full  # the step changes the stream
    assert ranks[1]["tp1_t1_kv"]["resp"] == full  # another DP replica, same samples


def test_sampling_matches_model_distribution(ranks):
    chi = ranks[0]["chi"]
    assert all(torch.equal(chi[k], ranks[1]["chi"][k]) for k in chi)
    p1 = chi["probs_t1"]
    assert p1.max() > 0.1  # a peaked distribution, so a wrong sampler shows
    stat, dof, p = _chi_square_p(chi["t1"], p1)
    assert p > 1e-3, (stat, dof, p)
    # the same test rejects a wrong reference distribution: it can fail
    _, _, p_wrong = _chi_square_p(chi["t1"], chi["probs_t08"])
    assert p_wrong < 1e-6, p_wrong
    # top-k 8 then top-p 0.9 at T = 0.7: support and renormalised probabilities
    q = chi["probs_t07"]
    top = q.argsort(descending=True, stable=True)[:8]
    qk = torch.zeros_like(q)
    qk[top] = q[top] / q[top].sum()
    keep = torch.zeros(V, dtype=torch.bool)
    before = 0.0
    for i in top.tolist():
        if before < 0.9:
            keep[i] = True
        before += qk[i].item()
    qt = torch.where(keep, qk, torch.zeros_like(qk))
    qt = qt / qt.sum()
    counts = chi["t07_k8_p09"]
    assert counts[~keep].sum() == 0
    stat, dof, p = _chi_square_p(counts, qt)
    assert p > 1e-3, (stat, dof, p)
    # top-p 0.8 alone (the full-row gather path)
    order = p1.argsort(descending=True, stable=True)
    cum_before = torch.cumsum(p1[order], 0) - p1[order]
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[cum_before < 0.8]] = True
    counts = chi["p08"]
    assert counts[~keep].sum() == 0
    stat, dof, p = _chi_square_p(counts, torch.where(keep, p1, torch.zeros_like(p1)) / p1[keep].sum())
    assert p > 1e-3, (stat, dof, p)


def test_sharded_inverse_cdf_equals_single_process(ranks):
    """Vocab-parallel draws (TP = 2, one shard all padding for vocab 40) = the unsharded draw with the
    same keys: same tokens, same μ, μ = the exact log-softmax, and padding never drawn."""
    for o in ranks:
        for (vocab, temp), k in o["kernel"].items():
            assert torch.equal(k["tok"], k["ref_tok"]), (vocab, temp)
            assert k["tok"].max() < vocab
            torch.testing.assert_close(k["mu"], k["ref_mu"], atol=1e-6, rtol=0)
            torch.testing.assert_close(k["ref_mu"].double(), k["exact_mu"], atol=1e-5, rtol=0)
            assert len(set(k["tok"].tolist())) > 10  # really random, not a constant


# ------------------------------------------------------------------------- in-process checks
def test_inverse_cdf_sampler_on_synthetic_logits():
    gen = torch.Generator().manual_seed(3)
    logits_V = torch.randn(50, generator=gen) * 2
    n = 8000
    keys = row_keys(9, 2, range(n), [1] * n)
    for temp in (0.7, 1.6):
        toks, mu = sample_with_logprobs(logits_V.expand(n, -1), SamplingParams(temperature=temp), keys, None,
                                        vocab_size=50)
        probs = torch.softmax(logits_V.double() / temp, -1)
        stat, dof, p = _chi_square_p(torch.bincount(toks, minlength=50), probs)
        assert p > 1e-3, (temp, stat, dof, p)
        torch.testing.assert_close(mu.double(), probs.log()[toks], atol=1e-5, rtol=0)
    # a wrong temperature is rejected by the same test: it has power
    _, _, p_wrong = _chi_square_p(torch.bincount(toks, minlength=50), torch.softmax(logits_V.double() / 1.2, -1))
    assert p_wrong < 1e-6
    u = row_uniforms(row_keys(1, 1, range(20000), [0] * 20000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_plain_sampler_padding_keys_and_greedy():
    gen = torch.Generator().manual_seed(0)
    logits_V = torch.randn(50, generator=gen) * 2
    logits_V = torch.cat([logits_V, torch.full((14,), 100.0)])  # padding columns with huge logits
    n = 8000
    keys = row_keys(1, 2, range(n), [0] * n)
    toks = sample_tokens(logits_V.expand(n, -1), SamplingParams(), keys, None, vocab_size=50)
    assert toks.max() < 50  # padded columns are never sampled
    stat, dof, p = _chi_square_p(torch.bincount(toks, minlength=50), torch.softmax(logits_V[:50].double(), -1))
    assert p > 1e-3, (stat, dof, p)
    # deterministic, and keyed: same keys → same tokens, other step → different tokens
    assert torch.equal(toks, sample_tokens(logits_V.expand(n, -1), SamplingParams(), keys, None, vocab_size=50))
    other = sample_tokens(logits_V.expand(n, -1), SamplingParams(), row_keys(1, 3, range(n), [0] * n), None, vocab_size=50)
    assert (other != toks).float().mean() > 0.3
    # greedy: ties go to the lower id, padding excluded
    tie = torch.tensor([[0.0, 3.0, 1.0, 3.0, 9.0]])
    assert sample_tokens(tie, SamplingParams(greedy=True), None, None, vocab_size=4).tolist() == [1]
    # μ is the untruncated temperature-scaled log-prob
    mu = token_logprobs(tie, torch.tensor([2]), None, vocab_size=4, temperature=0.5)
    assert math.isclose(mu.item(), torch.log_softmax(tie[0, :4] / 0.5, -1)[2].item(), abs_tol=1e-6)


def _lowbias32_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_int32_hash_matches_unsigned_reference():
    from camopd_megatron.distill.sampling import _hash32, _s32, uniform_noise

    words = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    # a short tensor (scalar tail of the kernels) and a long one (vectorised body)
    for reps in (1, 999):
        x = torch.tensor([_s32(w) for w in words] * reps, dtype=torch.int32)
        got = (_hash32(x).to(torch.int64) & 0xFFFFFFFF).tolist()
        assert got == [_lowbias32_ref(w) for w in words] * reps
    keys = row_keys(3, 1, [5], [2])
    k1, k2 = keys[0].tolist()
    for vid in (0, 17, 151935):
        h = _lowbias32_ref(_lowbias32_ref(((vid * 0x9E3779B9) & 0xFFFFFFFF) ^ k1) ^ k2)
        assert uniform_noise(keys, torch.tensor([[vid]])).item() == (h + 0.5) / 2**32


def test_noise_is_uniform_and_independent_of_the_shard():
    keys = row_keys(7, 0, [0, 1], [5, 5])
    ids = torch.arange(100000).expand(2, -1)
    g = gumbel_noise(keys, ids)
    # the same global ids give the same noise when asked for by a "shard"
    assert torch.equal(gumbel_noise(keys, ids[:, 60000:]), g[:, 60000:])
    assert not torch.equal(g[0], g[1])
    u = torch.exp(-torch.exp(-g))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert 0 < u.min() and u.max() < 1


def test_sampling_params_validation_and_config():
    for kwargs, arg in ((dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                        (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
                        (dict(stop_token_ids=(3, -2)), "stop_token_ids")):
        with pytest.raises(ValueError, match=arg):
            SamplingParams(**kwargs)
    cfg = RolloutConfig(max_new_tokens=33, temperature=0.8, top_k=5, top_p=0.95, stop_token_ids=[4, 9])
    p = SamplingParams.from_config(cfg, eos_token_id=2)
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens, p.stop_token_ids, p.eos_token_id) == (0.8, 5, 0.95, 33, (4, 9), 2)
    assert p.off_policy and p.stop_set == {2, 4, 9}
    assert not SamplingParams.from_config(RolloutConfig(), eos_token_id=None).off_policy
    g = SamplingParams(temperature=0.0)
    assert g.is_greedy and g.logprob_temperature == 1.0 and SamplingParams(temperature=0.5).logprob_temperature == 0.5


@pytest.mark.parametrize("prompts,kwargs,arg", [
    ([], {}, "prompts"),
    ([[1, 2], []], {}, r"prompts\[1\] is empty"),
    ([[1] * 20], {}, r"prompts\[0\].*longer than the context"),
    ([[1, 200]], {}, r"prompts\[0\].*outside"),
    ([[1, 2]], {"sample_ids": [1, 2]}, "sample_ids"),
    ([[1, 2]], {"max_seq_len": 1}, "max_seq_len"),
    ([[1, 2]], {"micro_batch_size": 0}, "micro_batch_size"),
])
def test_bad_requests_name_the_argument(prompts, kwargs, arg):
    kw = dict(sample_ids=list(range(len(prompts))), seed=0, step=0, vocab_size=100, max_seq_len=20)
    kw.update(kwargs)
    # validation runs before the model is touched
    with pytest.raises(ValueError, match=arg):
        generate(None, None, prompts, SamplingParams(), **kw)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(None, None, [[1]], SamplingParams(eos_token_id=100), sample_ids=[0], seed=0, step=0, vocab_size=100,
                 max_seq_len=20)


def test_rollout_batch_select_split():
    tokens = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10], [11, 12, 0, 0, 0, 0]])
    plen, rlen = torch.tensor([2, 3, 1]), torch.tensor([2, 3, 1])
    mask = torch.zeros(3, 6)
    mask[0, 1:3] = 1
    mask[1, 2:5] = 1
    mask[2, 0:1] = 1
    logp = -mask * 0.5
    b = RolloutBatch(tokens, plen, rlen, mask, logp, ["eos", "length", "stop"], [7, 8, 9], False)
    assert len(b) == 3 and b.num_tokens == 12 and b.num_response_tokens == 6
    assert b.response_ids(1) == [8, 9, 10] and b.prompt_ids(0) == [1, 2]
    s = b.select([2, 0])
    assert s.tokens_BT.shape == (2, 4) and s.sample_ids == [9, 7] and s.finish_reasons == ["stop", "eos"]
    assert s.response_ids(1) == [3, 4] and s.loss_mask_BT[1].tolist() == [0, 1, 1, 0]
    parts = b.split(2)
    assert [len(p) for p in parts] == [2, 1] and parts[1].tokens_BT.shape == (1, 2)
    assert b.to("cpu").tokens_BT.device.type == "cpu"
    with pytest.raises(ValueError, match="micro_batch_size"):
        b.split(0)
    with pytest.raises(ValueError, match="indices"):
        b.select([3])


def _tp2_pp2_worker(rank: int, world_size: int, ckpt_dir: str) -> dict:
    from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.pipeline import run_microbatches

    cfg = ModelConfig(**CFG)
    kw = dict(sample_ids=SIDS, seed=SEED, step=3, vocab_size=V, max_seq_len=MAX_SEQ)
    greedy = SamplingParams(greedy=True, max_new_tokens=8, eos_token_id=2)
    t1 = SamplingParams(max_new_tokens=8, eos_token_id=2)
    pgc1 = simple_pg_collection(1, 1, world_size)
    init_model_rng(SEED, pgc1)
    m1 = build_gpt_model(cfg, pgc1)
    out = {"ref": {n: _summary(generate(m1, pgc1, PROMPTS, p, **kw)) for n, p in (("greedy", greedy), ("t1", t1))}}
    save_checkpoint(ckpt_dir, model_sharded_state_dict(m1, pgc1), model_cfg=cfg, step=0)
    pgc = simple_pg_collection(2, 2, world_size // 4)
    init_model_rng(SEED + 1, pgc)
    m = build_gpt_model(cfg, pgc)
    load_model(m, ckpt_dir, model_cfg=cfg, pg_collection=pgc)
    out["tp2pp2"] = {n: _summary(generate(m, pgc, PROMPTS, p, micro_batch_size=3, **kw))
                     for n, p in (("greedy", greedy), ("t1", t1))}
    # the same layout with sequence parallelism: rollout, and a training forward + backward of a sequence
    # TP does not divide (padded; the p2p buffers are [T_pad / TP, B, H])
    init_model_rng(SEED + 2, pgc)
    ms = build_gpt_model(cfg, pgc, sequence_parallel=True)
    load_model(ms, ckpt_dir, model_cfg=cfg, pg_collection=pgc)
    out["tp2pp2_sp"] = {n: _summary(generate(ms, pgc, PROMPTS, p, micro_batch_size=3, **kw))
                        for n, p in (("greedy", greedy), ("t1", t1))}
    out["train"] = {}
    tokens = torch.tensor([p + [3] * (13 - len(p)) for p in PROMPTS[:3]])
    for name, model in (("plain", m), ("sp", ms)):
        model.zero_grad()
        outs = run_microbatches(model, pgc, [{"tokens": tokens}], lambda b, logits: (lambda logp: (
            -logp.sum(), {"logp": logp.detach()}))(next_token_logprobs(logits, b["tokens"], pgc.tp, vocab_size=V)),
            forward_only=False)
        out["train"][name] = (outs[0]["logp"] if outs else None,
                              {n: p.grad.clone() for n, p in model.named_parameters() if "layernorm" not in n})
    return out


@pytest.mark.slow
def test_tp2_pp2_equals_tp1(tmp_path):
    res = run_on_ranks(_tp2_pp2_worker, 4, args=(str(tmp_path / "ck"),), timeout_s=400, pg_timeout_s=150)
    ref = res[0]["ref"]
    for o in res:
        for name in ("greedy", "t1"):
            for layout in ("tp2pp2", "tp2pp2_sp"):
                assert o[layout][name]["tokens"] == ref[name]["tokens"], (layout, name)
                torch.testing.assert_close(o[layout][name]["logp"], ref[name]["logp"], atol=1e-5, rtol=0)
        (logp, grads), (logp_sp, grads_sp) = o["train"]["plain"], o["train"]["sp"]
        if logp is not None:  # last stage
            assert logp.shape == (3, 13)
            torch.testing.assert_close(logp_sp, logp, atol=1e-5, rtol=0)
        assert grads.keys() == grads_sp.keys() and grads
        for n in grads:  # the norms' SP partial sums are completed by DDP (tests/test_sequence_parallel.py)
            torch.testing.assert_close(grads_sp[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
