"""MoE student rollout at TP = 2 with sequence parallelism and EP = 4 (expert TP 1), on 4 gloo ranks (DP = 2).

Each EP group holds both TP ranks of both DP replicas, so the rollout runs in lock-step
(``models.pipeline``, "Lock-step"); the replicas get unequal prompts (one micro-batch vs two, different
response lengths). Decoding switches SP off for every module, the MoE layers included
(``models.gpt.sequence_parallel_off``): each TP rank then routes the whole, replicated token set and
gets its own copies' expert outputs back. The μ it records must equal the log-probs of megatron's own
forward with SP on (the training layout) for the same tokens, KV cache or not; the tokens must not
depend on the micro-batch split (replica 0 decoding them in one micro-batch, replica 1 idle).

The student has routing replay on: the rollout records each token's experts (KV cache and full recompute
alike), they are the experts the training layout's forward picks for the same tokens, and after the
router is perturbed a forward given the record still routes every token to them.
"""
from __future__ import annotations

import torch

from camopd_megatron.testing.multiproc import run_on_ranks

V, SEQ = 96, 24
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=V, seq_length=SEQ,
             init="random")
MOE = dict(num_experts=4, router_topk=2, ffn_hidden_size=48, shared_expert_ffn_hidden_size=32, shared_expert_gate=True,
           layer_pattern=[0, 1], routing_replay=True)


def _prompts(dp_rank: int) -> list[list[int]]:
    lengths = (20, 5, 9) if dp_rank == 0 else (15,)
    return [[(5 * i + j) % V + 1 for j in range(n)] for i, n in enumerate(lengths)]


def _worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from camopd_megatron.config import ModelConfig
    from camopd_megatron.config.moe import MoEConfig
    from camopd_megatron.distill.rollout import SamplingParams, generate
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.scoring import score_logprobs

    cfg = ModelConfig(**MODEL, moe=MoEConfig(**MOE))
    pgc = simple_pg_collection(2, 1, 2, ep=4, etp=1)
    assert dist.get_world_size(pgc.ep) == 4 and dist.get_world_size(pgc.expt_tp) == 1
    dp = dist.get_rank(pgc.dp)
    init_model_rng(7, pgc)
    model = build_gpt_model(cfg, pgc, sequence_parallel=True)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    prompts = _prompts(dp)
    ids = [10 * dp + i for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=10)
    out: dict = {}
    for kv in (True, False):
        calls[0] = 0
        batch = generate(model, pgc, prompts, params, sample_ids=ids, seed=1, step=0, vocab_size=V, max_seq_len=SEQ,
                         micro_batch_size=2, use_kv_cache=kv, timeout_s=60.0, lock_step=pgc.dp)
        out[f"forwards_kv{kv}"] = calls[0]
        out[f"tokens_kv{kv}"], out[f"mu_kv{kv}"] = batch.tokens_BT, batch.rollout_logp_BT
        out[f"routes_kv{kv}"] = batch.routes_BTLK
    out["sp_after"] = model.config.sequence_parallel
    # the training layout's forward (SP on) scores the decoded tokens: μ must match
    out["logp"] = score_logprobs(model, pgc, out["tokens_kvTrue"], batch.loss_mask_BT, micro_batch=2, vocab_size=V,
                                 lock_step=pgc.dp, timeout_s=60.0)
    out["mask"] = batch.loss_mask_BT
    out["lens"] = batch.response_lens_B.tolist()
    out["seq_lens"] = (batch.prompt_lens_B + batch.response_lens_B).tolist()
    out["natural"] = routed_experts(model, pgc, lambda: score_logprobs(
        model, pgc, batch.tokens_BT, batch.loss_mask_BT, micro_batch=2, vocab_size=V, lock_step=pgc.dp, timeout_s=60.0), min(2, len(prompts)))
    with torch.no_grad():  # another router: left alone it routes other experts, given the record the same ones
        router = model.decoder.layers[1].mlp.router
        router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(3)))
    extra = {"seq_lens": batch.prompt_lens_B + batch.response_lens_B, "routes": batch.routes_BTLK}
    out["perturbed"] = routed_experts(model, pgc, lambda: score_logprobs(
        model, pgc, batch.tokens_BT, batch.loss_mask_BT, micro_batch=2, vocab_size=V, lock_step=pgc.dp, timeout_s=60.0), min(2, len(prompts)))
    out["replayed"] = routed_experts(model, pgc, lambda: score_logprobs(
        model, pgc, batch.tokens_BT, batch.loss_mask_BT, micro_batch=2, vocab_size=V, lock_step=pgc.dp, timeout_s=60.0,
        extra=extra), min(2, len(prompts)))
    # replica 0's prompts alone (replica 1 idle, all dummies): the same tokens
    alone = generate(model, pgc, prompts if dp == 0 else [], params, sample_ids=ids if dp == 0 else [], seed=1,
                     step=0, vocab_size=V, max_seq_len=SEQ, micro_batch_size=3, timeout_s=60.0, lock_step=pgc.dp)
    out["alone"] = alone.tokens_BT
    return out


def routed_experts(model, pgc, forward, rows: int) -> torch.Tensor:
    """The experts the MoE layer's router picks for this rank's tokens in ``forward()`` (micro-batches of ``rows``
    rows, SP on: this TP rank's sequence shard), as [rows, positions, experts] bool; other positions False."""
    import torch.distributed as dist

    maps = []
    hook = model.decoder.layers[1].mlp.router.register_forward_hook(lambda m, i, o: maps.append(o[1].detach().clone()))
    try:
        forward()
    finally:
        hook.remove()
    tp, tp_rank = dist.get_world_size(pgc.tp), dist.get_rank(pgc.tp)
    per_mb = []
    for m in maps:  # [s_local * rows, E] in megatron's [s, b] order
        s_local = m.shape[0] // rows
        full = torch.zeros(rows, s_local * tp, m.shape[1], dtype=torch.bool)
        full[:, tp_rank * s_local:(tp_rank + 1) * s_local] = m.view(s_local, rows, -1).transpose(0, 1)
        per_mb.append(full)
    return torch.cat(per_mb)


def _one_hot(routes_BTk: torch.Tensor, experts: int) -> torch.Tensor:
    out = torch.zeros(routes_BTk.shape[:2] + (experts,), dtype=torch.bool)
    return out.scatter_(2, routes_BTk.long(), True)


def test_moe_tp2_ep4_sp_rollout_in_lock_step():
    ranks = run_on_ranks(_worker, 4, timeout_s=900, pg_timeout_s=90)
    for kv in (True, False):  # every rank ran the same number of forwards
        assert len({r[f"forwards_kv{kv}"] for r in ranks}) == 1, [r[f"forwards_kv{kv}"] for r in ranks]
    assert ranks[0]["lens"] != ranks[2]["lens"]
    for r in ranks:
        assert r["sp_after"] is True
        assert torch.equal(r["tokens_kvTrue"], r["tokens_kvFalse"])
        torch.testing.assert_close(r["mu_kvTrue"], r["mu_kvFalse"], rtol=0, atol=1e-5)
        m = r["mask"].bool()
        torch.testing.assert_close(r["logp"][m], r["mu_kvTrue"][m], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["alone"], ranks[0]["tokens_kvTrue"])
    # routing replay: the record (KV cache = full recompute) is what the training layout routes; with another
    # router the replayed forward still routes every trained position there (padding: a row's last token on)
    for r in ranks:
        rec = r["routes_kvTrue"]
        assert rec.shape[2:] == (1, MOE["router_topk"]) and torch.equal(rec, r["routes_kvFalse"])
        trained = torch.zeros(rec.shape[:2], dtype=torch.bool)
        for i, n in enumerate(r["seq_lens"]):
            trained[i, : n - 1] = True
        natural, replayed, perturbed = (r[k][: rec.shape[0], : rec.shape[1]] for k in ("natural", "replayed", "perturbed"))
        mine = natural.any(-1) & trained  # this TP rank's positions
        assert int(mine.sum()) > 10
        recorded = _one_hot(rec[:, :, 0], MOE["num_experts"])
        assert torch.equal(natural[mine], recorded[mine])
        assert torch.equal(replayed[mine], recorded[mine])
        assert not torch.equal(perturbed[mine], recorded[mine])
    assert torch.equal(ranks[1]["tokens_kvTrue"], ranks[0]["tokens_kvTrue"])  # the TP pair agrees
