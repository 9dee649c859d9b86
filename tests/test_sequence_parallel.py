"""Sequence parallelism (issue 21): TP = 2 with SP equals TP = 2 without, on gloo.

One 2-rank launch builds the same TP = 2 model (CPU init: the same weights) with and without
``sequence_parallel`` (local layer spec, q/k norms on) and compares, through megatron DDP and its
gradient finalisation (the training path): the loss and every parameter's gradient, the norm weights
included (under SP each rank normalises its own positions, so their gradients are all-reduced over TP
only because :class:`~camopd_megatron.models.gpt.LocalNorm` flags them), through the full logits and
through the output window (hidden states gathered over the sequence, fused output projection); a
sequence length that TP does not divide (padded); and the rollout's tokens and μ (decoding runs with SP
switched off, and the switch is restored for the training forward that follows).
"""
from __future__ import annotations

import torch

from camopd_megatron.testing.multiproc import run_on_ranks

CFG = dict(arch="qwen3", qk_layernorm=True, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
           ffn_hidden_size=128, vocab_size=100, vocab_pad_multiple=128, seq_length=64, init="random")
SEED = 2024
V = CFG["vocab_size"]
B, T = 3, 13  # T odd: TP = 2 does not divide it
PROMPTS = [[5, 17, 3], [8], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 42]]
NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight")


def _masked_loss(out, batch, pgc, weight):
    from camopd_megatron.models.logprobs import next_token_logprobs

    first = batch["output_window"][0] if "output_window" in batch else 0
    logp = next_token_logprobs(out, batch["tokens"], pgc.tp, vocab_size=V, mask_BT=batch["mask"],
                               first_position=first, output_weight=weight)
    loss = -logp.sum() / batch["mask"].sum()
    return loss, {"loss": loss.item(), "logp": logp.detach().clone(), "width": out.shape[1]}


def _sp_worker(rank: int, world_size: int) -> dict:
    from camopd_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from camopd_megatron.distill.rollout import SamplingParams, generate
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, output_weight
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer
    from camopd_megatron.models.pipeline import output_window, run_microbatches

    cfg = ModelConfig(**CFG)
    pgc = simple_pg_collection(2, 1, 1)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(B, T)
    for row, (lo, hi) in enumerate(((5, 12), (6, 10), (4, 11))):
        mask[row, lo:hi] = 1.0
    params = SamplingParams(temperature=1.0, max_new_tokens=6, eos_token_id=2)
    out: dict = {}
    for sp in (False, True):
        init_model_rng(SEED, pgc)
        model = build_gpt_model(cfg, pgc, sequence_parallel=sp)
        (ddp,), _, _ = build_ddp_and_optimizer([model], OptimConfig(), ParallelConfig(tp=2, sequence_parallel=sp), pgc,
                                               total_steps=1)
        res: dict = {"flags": {n: getattr(p, "sequence_parallel", None) for n, p in model.named_parameters()
                               if n.endswith(NORMS)}}
        batch = generate(ddp, pgc, PROMPTS, params, sample_ids=[0, 1, 2, 3], seed=SEED, step=1, vocab_size=V,
                         max_seq_len=20)
        res["rollout"] = (batch.tokens_BT, batch.rollout_logp_BT)
        res["sp_after_rollout"] = model.config.sequence_parallel
        for name, extra, weight in (("full", {}, None), ("window", {"output_window": output_window(mask)},
                                                         output_weight(model))):
            ddp.zero_grad_buffer()
            (o,) = run_microbatches(ddp, pgc, [{"tokens": tokens, "mask": mask, **extra}],
                                    lambda b, x, w=weight: _masked_loss(x, b, pgc, w), forward_only=False)
            grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
            res[name] = (o, grads)
        out[sp] = res
    return out


def test_sequence_parallel_equals_tp2_without():
    for o in run_on_ranks(_sp_worker, 2, timeout_s=400, pg_timeout_s=120):
        ref, sp = o[False], o[True]
        assert set(sp["flags"].values()) == {True} and set(ref["flags"].values()) == {False}
        assert len(sp["flags"]) == 2 * 2 + 1  # two norms per layer + the final norm
        assert sp["sp_after_rollout"] is True
        assert torch.equal(sp["rollout"][0], ref["rollout"][0])
        torch.testing.assert_close(sp["rollout"][1], ref["rollout"][1], rtol=0, atol=1e-5)
        assert ref["rollout"][0].shape[1] > max(map(len, PROMPTS))
        for name in ("full", "window"):
            (o_ref, g_ref), (o_sp, g_sp) = ref[name], sp[name]
            assert o_sp["width"] == o_ref["width"] == (T if name == "full" else 8)
            assert abs(o_sp["loss"] - o_ref["loss"]) <= 1e-5, (name, o_sp["loss"], o_ref["loss"])
            torch.testing.assert_close(o_sp["logp"], o_ref["logp"], rtol=0, atol=1e-5)
            assert g_sp.keys() == g_ref.keys()
            for n in g_ref:
                torch.testing.assert_close(g_sp[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=f"{n} ({name})")
            norm_grads = [g_ref[n] for n in g_ref if n.endswith(NORMS)]
            assert len(norm_grads) == 5 and all(g.abs().sum() > 0 for g in norm_grads)
