"""Activation recompute (``model.recompute``): the same loss and gradients as without, at TP = 2 and
PP = 2 (gloo, one 2-rank launch for both layouts), and the config rules of its keys.

The training path is used: megatron's schedule (1F1B at PP = 2, two micro-batches), the output window
and the fused output projection. Recompute re-runs the same kernels on the same inputs (and the same
RNG states: megatron's checkpoint restores them), so the results are compared bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from camopd_megatron.config import ConfigError, config_from_dict
from camopd_megatron.testing.multiproc import run_on_ranks

MODES = (
    ("none", {}),
    ("selective", {}),
    ("full", {"recompute_method": "uniform", "recompute_num_layers": 1}),
    ("full", {"recompute_method": "block", "recompute_num_layers": 1}),
)
SEQ, VOCAB = 16, 100


def _worker(rank: int, world_size: int) -> dict:
    from camopd_megatron.config.sections import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, output_weight, recompute_kwargs, stage_info
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    mask = torch.zeros(4, SEQ)
    for r in range(4):
        mask[r, 2 + r: SEQ - 1] = 1.0
    out: dict = {}
    for tp, pp in ((2, 1), (1, 2)):
        pgc = simple_pg_collection(tp, pp, world_size // (tp * pp))
        for mode, extra in MODES:
            cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                              vocab_size=VOCAB, seq_length=SEQ, recompute=mode, init="random", **extra)
            init_model_rng(99, pgc)
            model = build_gpt_model(cfg, pgc, config_extra=recompute_kwargs(cfg))
            model.train()
            weight = output_weight(model) if stage_info(pgc).is_last else None

            def loss_fn(mb, hidden, pgc=pgc, weight=weight):
                logp = next_token_logprobs(hidden, mb["tokens"], pgc.tp, vocab_size=VOCAB, mask_BT=mb["mask"],
                                           first_position=mb["output_window"][0], output_weight=weight)
                loss = -(logp * mb["mask"]).sum() / mask.sum()
                return loss, {"loss": loss.detach()}

            outs = run_microbatches(model, pgc, make_microbatches({"tokens": tokens, "mask": mask}, 2), loss_fn,
                                    forward_only=False)
            key = (tp, pp, mode, tuple(sorted(extra.items())))
            out[key] = {
                "loss": [o["loss"] for o in outs],
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "granularity": model.config.recompute_granularity,
                "n_params": sum(1 for _ in model.parameters()),
            }
    return out


def test_recompute_same_loss_and_grads_tp2_pp2():
    results = run_on_ranks(_worker, 2, timeout_s=600, pg_timeout_s=120)
    for res in results:
        for tp, pp in ((2, 1), (1, 2)):
            ref = res[(tp, pp, "none", ())]
            assert ref["granularity"] is None and len(ref["grads"]) == ref["n_params"]
            for mode, extra in MODES[1:]:
                got = res[(tp, pp, mode, tuple(sorted(extra.items())))]
                assert got["granularity"] == mode
                assert [float(x) for x in got["loss"]] == [float(x) for x in ref["loss"]], (tp, pp, mode, extra)
                assert got["grads"].keys() == ref["grads"].keys()
                for name, grad in ref["grads"].items():
                    assert torch.equal(got["grads"][name], grad), (tp, pp, mode, extra, name)
    # the last stage reported losses: PP = 2's last stage (rank 1) and both TP ranks
    assert results[1][(1, 2, "none", ())]["loss"] and results[0][(2, 1, "none", ())]["loss"]


def test_recompute_config_rules():
    cfg = _config({"model": {"num_layers": 4, "recompute": "full", "recompute_num_layers": 2},
                            "parallel": {"pp": 2}})
    assert cfg.model.recompute == "full"
    with pytest.raises(ConfigError, match=r"model.recompute_num_layers: got 3; expected 1 to 2 with model.recompute=full"):
        _config({"model": {"num_layers": 4, "recompute": "full", "recompute_num_layers": 3},
                          "parallel": {"pp": 2}})
    with pytest.raises(ConfigError, match="model.recompute"):
        _config({"model": {"recompute": "partial"}})
    with pytest.raises(ConfigError, match="model.recompute_method"):
        _config({"model": {"recompute": "full", "recompute_method": "every"}})
    # the layer count only matters for full recompute
    _config({"model": {"num_layers": 4, "recompute": "selective", "recompute_num_layers": 9}})


def _config(d: dict):
    """A config from ``d`` on top of a random-init tiny student and teachers (random weights chosen explicitly)."""
    from camopd_megatron.testing.configs import random_init

    return config_from_dict(random_init(d))
