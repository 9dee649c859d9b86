"""The GPT builder across layouts (one 4-rank launch) and the distributed checkpoint format.

Acceptance of the foundation issue: CPU-initialised weights give the same loss at TP = 1, 2, 4
(≤ 1e-5) and the same gradients after gathering; a checkpoint saved at TP = 2 loads at TP = 1,
TP = 1 × PP = 2 and TP = 2 × PP = 2 (megatron's pipeline schedule) with the same loss.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from camopd_megatron.config import ConfigError, ModelConfig, load_config
from camopd_megatron.testing.multiproc import run_on_ranks

CFG = dict(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=128,
           vocab_size=100, vocab_pad_multiple=128, seq_length=32)
SEED = 1234
B, T = 3, 12


def _batch() -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(7))


def _loss(logits_BTV, tokens_BT, pgc, vocab_size):
    from camopd_megatron.models.logprobs import next_token_logprobs

    logp = next_token_logprobs(logits_BTV, tokens_BT, pgc.tp, vocab_size=vocab_size)
    return -logp[:, :-1].mean()


def _loss_and_value(logits_BTV, tokens_BT, pgc, vocab_size):
    loss = _loss(logits_BTV, tokens_BT, pgc, vocab_size)
    return loss, {"loss": loss.item()}


def _response_mask() -> torch.Tensor:
    """Scored output positions per row (ragged starts/ends): the window is columns [5, 11)."""
    mask = torch.zeros(B, T)
    for row, (lo, hi) in enumerate(((5, 11), (6, 10), (7, 11))):
        mask[row, lo:hi] = 1.0
    return mask


def _masked_loss(out_BWX, batch, pgc, vocab_size, weight=None):
    """Masked mean log-prob from full logits, or (``weight``) from the output window's hidden states."""
    from camopd_megatron.models.logprobs import next_token_logprobs

    first = batch["output_window"][0] if "output_window" in batch else 0
    logp = next_token_logprobs(out_BWX, batch["tokens"], pgc.tp, vocab_size=vocab_size, mask_BT=batch["mask"],
                               first_position=first, output_weight=weight)
    loss = -logp.sum() / batch["mask"].sum()
    return loss, {"loss": loss.item(), "logp": logp.detach().clone(), "width": out_BWX.shape[1],
                  "features": out_BWX.shape[2]}


def _window_vs_full(model, pgc, tokens, vocab_size) -> dict:
    """The same masked loss through full logits and through the output window (hidden states and the
    fused output projection): outputs and every local gradient of this rank."""
    from camopd_megatron.models.gpt import output_weight, stage_info
    from camopd_megatron.models.pipeline import output_window, run_microbatches

    mask = _response_mask()
    weight = output_weight(model) if stage_info(pgc).is_last else None
    res = {}
    for name, extra, w in (("full", {}, None), ("window", {"output_window": output_window(mask)}, weight)):
        model.zero_grad()
        outs = run_microbatches(model, pgc, [{"tokens": tokens, "mask": mask, **extra}],
                                lambda b, out, w=w: _masked_loss(out, b, pgc, vocab_size, w), forward_only=False)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res[name] = (outs, grads)
    return res


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _layouts_worker(rank: int, world_size: int, ckpt_dir: str) -> dict:
    import torch.distributed as dist

    from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.pipeline import run_microbatches

    cfg = ModelConfig(**CFG)
    tokens = _batch()
    out: dict = {"loss": {}, "grads": {}}
    models = {}
    for tp in (1, 2, 4):
        pgc = simple_pg_collection(tp, 1, world_size // tp)
        init_model_rng(SEED, pgc)
        model = build_gpt_model(cfg, pgc)
        loss = _loss(model(tokens, torch.arange(T).expand(B, T), None), tokens, pgc, cfg.vocab_size)
        loss.backward()
        out["loss"][tp] = loss.item()
        emb = model.embedding.word_embeddings.weight.grad
        proj = model.decoder.layers[0].self_attention.linear_proj.weight.grad
        out["grads"][tp] = {
            "embedding": _gather(emb, pgc.tp, 0)[: cfg.vocab_size],
            "linear_proj": _gather(proj, pgc.tp, 1),
            "final_norm": model.decoder.final_layernorm.weight.grad.clone(),
            "output": _gather(model.output_layer.weight.grad, pgc.tp, 0)[: cfg.vocab_size],
        }
        models[tp] = (model, pgc)

    # save at TP=2 (every rank of the world joins; DP replicas deduplicated through dp_cp_group)
    model2, pgc2 = models[2]
    save_checkpoint(ckpt_dir, model_sharded_state_dict(model2, pgc2), model_cfg=cfg, step=3, common={"note": "tp2"})
    out["tp2_loss_before"] = out["loss"][2]

    # load at TP=1 (from a different random init), TP=1xPP=2, TP=2xPP=2
    out["loaded"] = {}
    for tp, pp in ((1, 1), (1, 2), (2, 2)):
        pgc = simple_pg_collection(tp, pp, world_size // (tp * pp))
        init_model_rng(SEED + 99, pgc)
        model = build_gpt_model(cfg, pgc)
        load_model(model, ckpt_dir, model_cfg=cfg, pg_collection=pgc)
        vals = run_microbatches(
            model, pgc, [{"tokens": tokens}],
            lambda batch, logits, pgc=pgc: _loss_and_value(logits, batch["tokens"], pgc, cfg.vocab_size),
            forward_only=False,
        )
        gathered = [None] * world_size  # only last pipeline stages report a loss
        dist.all_gather_object(gathered, vals[0]["loss"] if vals else None)
        out["loaded"][(tp, pp)] = [v for v in gathered if v is not None]
        # with PP the backward reached the first stage's embedding (later stages have none)
        emb = getattr(model, "embedding", None)
        out.setdefault("emb_grad_nonzero", {})[(tp, pp)] = (
            emb is not None and bool(emb.word_embeddings.weight.grad.abs().sum() > 0)
        )
        out.setdefault("window", {})[(tp, pp)] = _window_vs_full(model, pgc, tokens, cfg.vocab_size)
    out["manifest"] = json.loads((Path(ckpt_dir) / "camopd.json").read_text())
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "step_3")
    return run_on_ranks(_layouts_worker, 4, args=(ckpt,), timeout_s=400, pg_timeout_s=120), ckpt


def test_same_loss_at_tp_1_2_4(layouts):
    out, _ = layouts
    for o in out:
        assert abs(o["loss"][1] - o["loss"][2]) <= 1e-5 and abs(o["loss"][1] - o["loss"][4]) <= 1e-5, o["loss"]
    # an untrained model over 100 real tokens sits near ln(100)
    assert abs(out[0]["loss"][1] - torch.log(torch.tensor(100.0)).item()) < 0.3


def test_same_gradients_across_tp(layouts):
    out, _ = layouts
    ref = out[0]["grads"][1]
    for tp in (2, 4):
        for name, g in out[0]["grads"][tp].items():
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=f"{name} at TP={tp}")
    assert ref["embedding"].abs().sum() > 0


def test_checkpoint_tp2_loads_at_other_layouts(layouts):
    out, ckpt = layouts
    before = out[0]["tp2_loss_before"]
    for layout, losses in out[0]["loaded"].items():
        assert losses, f"no last stage reported at {layout}"
        for v in losses:
            assert abs(v - before) <= 1e-5, (layout, v, before)
    # first stages (rank = pp + 2*dp at TP=1 x PP=2 x DP=2: ranks 0, 2) got gradients through the p2p
    assert [o["emb_grad_nonzero"][(1, 2)] for o in out] == [True, False, True, False]
    m = out[0]["manifest"]
    assert m["step"] == 3 and m["common"] == {"note": "tp2"} and m["model"]["vocab_size"] == 100
    assert not Path(ckpt + ".tmp").exists()


def test_output_window_matches_full_logits_values_and_gradients(layouts):
    """Hidden states of the scored positions only (``output_window``) through the fused output projection
    give the same log-probs and the same gradient on every parameter of every rank as the full logits,
    at TP = 1, TP = 1 x PP = 2 and TP = 2 x PP = 2."""
    from camopd_megatron.models.pipeline import output_window

    assert output_window(_response_mask()) == (5, 11)
    assert output_window(torch.zeros(2, 4)) == (0, 1)
    out, _ = layouts
    for o in out:
        for layout, res in o["window"].items():
            (full_outs, full_g), (win_outs, win_g) = res["full"], res["window"]
            assert len(full_outs) == len(win_outs)
            vocab_local = 128 // layout[0]
            for f, w in zip(full_outs, win_outs):  # last stages
                assert (f["width"], f["features"]) == (T, vocab_local), layout
                assert (w["width"], w["features"]) == (6, CFG["hidden_size"]), layout
                torch.testing.assert_close(w["logp"], f["logp"], rtol=0, atol=1e-5, msg=str(layout))
                assert (w["logp"] * (1 - _response_mask())).abs().sum() == 0
            assert full_g.keys() == win_g.keys() and full_g, layout
            for n in full_g:
                torch.testing.assert_close(win_g[n], full_g[n], rtol=1e-4, atol=1e-6, msg=f"{n} at {layout}")


def test_bad_model_configs_name_the_key():
    from camopd_megatron.deps import resolve_transformer_impl, te_available

    # a TP size that does not divide the padded vocabulary (102): refused by config validation
    with pytest.raises(ConfigError, match=r"parallel.tp: got 4; .*model.padded_vocab_size=102.*vocab_pad_multiple to a multiple of 12"):
        load_config(None, ["model.init=random", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                           "model.ffn_hidden_size=256", "model.vocab_size=100", "model.vocab_pad_multiple=6", "parallel.tp=4"])
    if not te_available():
        with pytest.raises(ImportError, match="model.transformer_impl"):
            resolve_transformer_impl("te")
        assert resolve_transformer_impl("auto") == "local"
    with pytest.raises(ValueError, match="model.transformer_impl"):
        resolve_transformer_impl("fast")


def test_checkpoint_errors(tmp_path):
    from camopd_megatron.checkpoint.dist import CheckpointError, check_arch, check_dcp_metadata, read_manifest

    with pytest.raises(CheckpointError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="interrupted save"):
        read_manifest(tmp_path / "half")
    with pytest.raises(CheckpointError, match="vocab_size: checkpoint 100 vs config 200"):
        check_arch({"model": {**{k: getattr(ModelConfig(**CFG), k) for k in ("arch",)}, **CFG}},
                   ModelConfig(**{**CFG, "vocab_size": 200}), "x")
    # a pickle that would run code is refused before anyone unpickles it
    evil = tmp_path / "evil"
    evil.mkdir()
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (evil / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="unsafe"):
        check_dcp_metadata(evil)


def test_make_microbatches_pads_to_one_shape():
    from camopd_megatron.models.pipeline import make_microbatches

    tokens = torch.arange(10).view(5, 2)
    mask = torch.tensor([[0, 1], [0, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.float32)
    mbs = make_microbatches({"tokens": tokens, "mask": mask}, 2)
    assert [m["n_real"] for m in mbs] == [2, 2, 1] and all(m["tokens"].shape == (2, 2) for m in mbs)
    assert mbs[2]["tokens"].tolist() == [[8, 9], [0, 0]]  # the last one padded with zero rows
    assert [m["output_window"] for m in mbs] == [(1, 2), (0, 2), (0, 1)]  # (0, 1): nothing scored
    (whole,) = make_microbatches({"tokens": tokens, "mask": mask}, None)  # None: every row at once
    assert whole["n_real"] == 5 and torch.equal(whole["tokens"], tokens) and whole["output_window"] == (0, 2)
    (empty,) = make_microbatches({"tokens": tokens[:0]}, 4)  # B = 0: one all-padding micro-batch
    assert empty["n_real"] == 0 and empty["tokens"].shape == (1, 2)


def _last_stage_worker(rank: int, world_size: int) -> dict:
    import time

    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.pipeline import CollectiveError, last_stage_to_all

    pgc = simple_pg_collection(1, 2, 1)
    out = {"shared": last_stage_to_all(torch.full((2, 3), float(rank)), pgc, timeout_s=60, what="x").tolist()}
    if rank == 0:  # the last stage never sends: the bounded wait ends with an error naming it
        t0 = time.monotonic()
        try:
            last_stage_to_all(torch.zeros(2), pgc, timeout_s=1.0, what="the step's gaps")
            out["error"] = "no error"
        except CollectiveError as e:
            out["error"] = str(e)
        out["waited_s"] = time.monotonic() - t0
    else:
        time.sleep(6.0)
    return out


def test_last_stage_to_all_is_a_bounded_broadcast():
    out = run_on_ranks(_last_stage_worker, 2, timeout_s=240)
    assert out[0]["shared"] == out[1]["shared"] == [[1.0] * 3] * 2
    msg = out[0]["error"]
    assert "the step's gaps" in msg and "global rank 1" in msg and "parallel.timeout_s" in msg, msg
    assert out[0]["waited_s"] < 6.0


def _main_grad_worker(rank: int, world_size: int) -> dict:
    """One training backward through megatron DDP (fused output projection, embedding lookup into main_grad)
    against plain autograd through the logits, untied and tied; and the embedding module's class."""
    from camopd_megatron.config.sections import OptimConfig, ParallelConfig
    from camopd_megatron.models.gpt import MainGradEmbedding, build_gpt_model, init_model_rng, output_weight
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer, zero_grad_buffers
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches

    pgc = simple_pg_collection(1, 1, 1)
    out = {}
    for tie in (False, True):
        cfg = ModelConfig(**{**CFG, "tie_embeddings": tie})
        init_model_rng(3, pgc)
        model = build_gpt_model(cfg, pgc)
        ref = build_gpt_model(cfg, pgc)
        ref.load_state_dict(model.state_dict())
        ddp, opt, _ = build_ddp_and_optimizer([model], OptimConfig(lr=1e-3), ParallelConfig(), pgc, total_steps=1)
        tokens = torch.cat([_batch(), _batch()[:, :4]], dim=1)  # repeated ids: rows added twice
        mask = torch.ones(tokens.shape)
        mask[:, :3] = 0
        weight = output_weight(model)

        def loss_fn(mb, hidden):
            logp = next_token_logprobs(hidden, mb["tokens"], None, vocab_size=cfg.vocab_size, mask_BT=mb["mask"],
                                       first_position=mb["output_window"][0], output_weight=weight)
            return -logp.sum(), {}

        for _ in range(2):  # the second step's buffers were zeroed (flag reset) like the first's
            zero_grad_buffers(ddp, opt)
            run_microbatches(ddp[0], pgc, make_microbatches({"tokens": tokens, "mask": mask}, 2), loss_fn,
                             forward_only=False)
        t = tokens.shape[1]
        logits = ref(tokens, torch.arange(t).unsqueeze(0).expand_as(tokens), None)[..., : cfg.vocab_size]
        logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        (-(logp * mask[:, :-1]).sum()).backward()  # the mask is aligned with the log-probs
        emb, ref_emb = model.embedding.word_embeddings, ref.embedding.word_embeddings
        out[tie] = {"cls": type(emb).__name__, "emb": (emb.weight.main_grad - ref_emb.weight.grad).abs().max().item(),
                    "scale": ref_emb.weight.grad.abs().max().item()}
        if not tie:
            out[tie]["out"] = (model.output_layer.weight.main_grad - ref.output_layer.weight.grad).abs().max().item()
    return out


def test_embedding_and_output_gradients_go_into_main_grad():
    """The embedding lookup and the fused output projection add their weight gradients into megatron's
    main_grad (no dense [V, H] gradient): equal to plain autograd through the logits, untied and tied."""
    (res,) = run_on_ranks(_main_grad_worker, 1, timeout_s=240)
    for tie, r in res.items():
        assert r["cls"] == "MainGradEmbedding", r
        assert r["emb"] <= 1e-5 * max(1.0, r["scale"]), (tie, r)
        assert r.get("out", 0.0) <= 1e-4, (tie, r)


def _sharded_embedding_worker(rank: int, world_size: int) -> dict:
    """MainGradEmbedding on a table sharded over TP = 2, all-reduced or (sequence parallel) reduce-scattered,
    with and without megatron DDP's main_grad, against the whole table's F.embedding in one process."""
    import torch.nn.functional as F

    from camopd_megatron.models.gpt import MainGradEmbedding, transformer_config_from
    from camopd_megatron.models.groups import simple_pg_collection

    pgc = simple_pg_collection(2, 1, 1)
    v, h = 128, 16
    g = torch.Generator().manual_seed(5)
    table = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (3, 8), generator=g)
    ids[0, :4] = ids[1, :4]  # repeated ids: their rows are added twice
    upstream = torch.randn(3, 8, h, generator=g)
    ref_table = table.clone().requires_grad_(True)
    ref_out = F.embedding(ids, ref_table)
    (ref_out * upstream).sum().backward()
    shard = slice(rank * v // 2, (rank + 1) * v // 2)
    config = transformer_config_from(ModelConfig(**CFG), tp=2, pp=1)
    res: dict = {}
    for sp in (False, True):
        for into_main in (False, True):
            emb = MainGradEmbedding(v, h, init_method=torch.nn.init.zeros_, reduce_scatter_embeddings=sp,
                                    config=config, tp_group=pgc.tp)
            with torch.no_grad():
                emb.weight.copy_(table[shard])
            if into_main:  # as megatron DDP sets it up
                emb.weight.main_grad = torch.zeros(v // 2, h)
                emb.weight.grad_added_to_main_grad = False
            out = emb(ids)
            want, up = ref_out.detach(), upstream
            if sp:  # [s, b, h] scattered along s over the 2 ranks
                want = want.transpose(0, 1)[rank * 4:(rank + 1) * 4]
                up = up.transpose(0, 1)[rank * 4:(rank + 1) * 4]
            (out * up).sum().backward()
            grad = emb.weight.main_grad if into_main else emb.weight.grad
            res[(sp, into_main)] = {"shape": tuple(out.shape), "out": (out - want).abs().max().item(),
                                    "grad": (grad - ref_table.grad[shard]).abs().max().item(),
                                    "flag": getattr(emb.weight, "grad_added_to_main_grad", None)}
    return res


def test_sharded_embedding_gradient_goes_into_main_grad_rows():
    """At TP = 2 the lookup adds each shard's rows into its main_grad (no dense [V / TP, H] gradient) and reduces
    over TP as megatron does (all-reduce; reduce-scatter along the sequence with sequence parallelism): output
    and weight gradient equal the whole table's in one process."""
    for r in run_on_ranks(_sharded_embedding_worker, 2, timeout_s=180):
        for (sp, into_main), c in r.items():
            assert c["shape"] == ((4, 3, 16) if sp else (3, 8, 16)), (sp, c)
            assert c["out"] <= 1e-6 and c["grad"] <= 1e-5, (sp, into_main, c)
            assert c["flag"] is (True if into_main else None), (sp, into_main, c)
