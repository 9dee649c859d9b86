"""Mixture-of-experts students and teachers: the ``model.moe`` / ``parallel.ep`` config rules, the
manifest's ``moe`` field, and a tiny MoE student built and trained one step on one rank."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from camopd_megatron.config import ConfigError, ModelConfig, config_from_dict
from camopd_megatron.config.moe import MoEConfig
from camopd_megatron.testing.configs import TINY_MOE, random_init
from camopd_megatron.testing.multiproc import run_on_ranks


def _problems(d: dict) -> list[str]:
    try:
        return config_from_dict(random_init(d)).validate()
    except ConfigError as e:
        return e.problems


def _moe(**kw) -> dict:
    return {"model": {"moe": {**TINY_MOE, **kw}}}


def test_moe_config_loads_and_validates():
    cfg = config_from_dict(random_init({**_moe(layer_pattern=[0, 1]), "parallel": {"ep": 2, "dp": 2}}))
    assert cfg.model.moe == MoEConfig(**TINY_MOE, layer_pattern=[0, 1])
    assert cfg.parallel.ep == 2 and cfg.parallel.etp is None
    assert cfg.validate() == []


@pytest.mark.parametrize("d, key, words", [
    (_moe(router_topk=5), "model.moe.router_topk", "at most model.moe.num_experts=4"),
    (_moe(layer_pattern=[1, 1, 0]), "model.moe.layer_pattern", "2 entries"),
    (_moe(layer_pattern=[0, 2]), "model.moe.layer_pattern", "one 0 (dense) or 1 (MoE)"),
    (_moe(shared_expert_gate=True), "model.moe.shared_expert_gate", "shared_expert_ffn_hidden_size"),
    (_moe(aux_loss_coeff=-1.0), "model.moe.aux_loss_coeff", ">= 0"),
    ({**_moe(), "teachers": [
        {"name": "general", "init": "random", "branches": ["general"],
         "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                   "moe": {**TINY_MOE, "routing_replay": True}}},
        {"name": "domain", "init": "random", "branches": ["domain"]}]},
     "teachers[0].model.moe.routing_replay", "a teacher never trains"),
    ({**_moe(), "parallel": {"ep": 3, "dp": 3}}, "parallel.ep", "a divisor of model.moe.num_experts=4"),
    ({**_moe(), "parallel": {"ep": 4, "dp": 2}}, "parallel.ep", "must divide parallel.dp=2"),
    ({**_moe(), "parallel": {"tp": 2, "ep": 2, "dp": 2, "sequence_parallel": False}}, "parallel.sequence_parallel",
     "only under sequence parallelism"),
    ({**_moe(), "parallel": {"tp": 2, "etp": 1, "ep": 1, "sequence_parallel": True}}, "parallel.ep",
     "a multiple of parallel.tp / parallel.etp = 2"),
    ({**_moe(), "parallel": {"tp": 2, "etp": 4, "sequence_parallel": True}}, "parallel.etp", "a divisor of parallel.tp=2"),
    ({**_moe(ffn_hidden_size=30), "parallel": {"tp": 4, "sequence_parallel": True}}, "parallel.etp",
     "a divisor of model.moe.ffn_hidden_size=30"),
    ({**_moe(token_dispatcher="allgather"), "parallel": {"ep": 2, "dp": 2}}, "model.moe.token_dispatcher",
     "span data-parallel replicas"),
    ({"parallel": {"ep": 2}}, "parallel.ep", "model.moe is not set"),
    ({"teachers": [{"name": "general", "init": "random", "branches": ["general"], "placement": "separate", "ep": 2},
                   {"name": "domain", "init": "random", "branches": ["domain"]}]},
     "teachers[0].ep", "model.moe is not set"),
    ({**_moe(), "teachers": [{"name": "general", "init": "random", "branches": ["general"], "placement": "separate",
                              "ep": 2}, {"name": "domain", "init": "random", "branches": ["domain"]}]},
     "teachers[0].ep", "must divide teachers[0].dp=1"),
    ({**_moe(), "parallel": {"ep": 2, "dp": 2}, "teachers": [
        {"name": "general", "init": "random", "branches": ["general"], "ep": 1},
        {"name": "domain", "init": "random", "branches": ["domain"]}]}, "teachers[0].ep", "the student's parallel.ep=2"),
])
def test_moe_config_problems_name_the_key_and_fix(d, key, words):
    problems = _problems(d)
    hits = [p for p in problems if p.startswith(f"{key}:")]
    assert hits and any(words in p for p in hits), problems
    assert all("Fix:" in p for p in hits)


def test_moe_layout_with_derived_dp():
    from camopd_megatron.parallel import LayoutError, RoleLayout

    cfg = config_from_dict(random_init({**_moe(), "parallel": {"ep": 2}}))
    assert RoleLayout.from_config(cfg, 4).student.ep == 2
    with pytest.raises(LayoutError, match=r"parallel.ep.*parallel.dp \(derived from the world size\)=3"):
        RoleLayout.from_config(cfg, 3)


def test_moe_is_read_from_the_checkpoint_and_must_agree():
    saved = asdict(ModelConfig(init="random", num_layers=2, hidden_size=64, num_attention_heads=4,
                               ffn_hidden_size=128, vocab_size=100, moe=MoEConfig(**TINY_MOE)))
    mine = ModelConfig(init="checkpoint", checkpoint="ckpt")
    resolved, problems = mine.from_saved(saved, key="model", path="ckpt")
    assert problems == [] and resolved.moe == MoEConfig(**TINY_MOE)
    # a manifest's model_config round-trips (ModelConfig(**dict), as the exporter reads it)
    assert ModelConfig(**saved).moe == MoEConfig(**TINY_MOE)
    other = ModelConfig(init="checkpoint", checkpoint="ckpt", moe=MoEConfig(**{**TINY_MOE, "router_topk": 1}))
    _, problems = other.from_saved(saved, key="model", path="ckpt")
    assert len(problems) == 1 and problems[0].startswith("model.moe:") and "ckpt" in problems[0]
    dense = dict(saved, moe=None)
    _, problems = other.from_saved(dense, key="teachers[0].model", path="ckpt")
    assert problems and "a dense model" in problems[0] and problems[0].startswith("teachers[0].model.moe:")
    # how the run trains the experts is its own choice: other coefficients / dispatcher are kept, not refused
    run = MoEConfig(**{**TINY_MOE, "aux_loss_coeff": 0.02, "z_loss_coeff": 0.001, "token_dispatcher": "allgather",
                       "capacity_factor": 1.5})
    resolved, problems = ModelConfig(init="checkpoint", checkpoint="ckpt", moe=run).from_saved(saved, key="model", path="ckpt")
    assert problems == [] and resolved.moe == run
    from camopd_megatron.checkpoint.dist import CheckpointError, check_arch

    check_arch({"model": saved}, resolved, "ckpt")  # the load-time check agrees
    with pytest.raises(CheckpointError, match="moe"):
        check_arch({"model": saved}, other, "ckpt")


def _build_and_step(rank: int, world_size: int) -> dict:
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    cfg = ModelConfig(init="random", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=100, seq_length=16, moe=MoEConfig(**TINY_MOE, layer_pattern=[0, 1]))
    pgc = simple_pg_collection(1, 1, 1)
    init_model_rng(3, pgc)
    model = build_gpt_model(cfg, pgc)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(tokens, torch.arange(12).expand(2, 12), None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1, :100].reshape(-1, 100), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "mlp1": type(model.decoder.layers[1].mlp).__name__,
            "experts": type(model.decoder.layers[1].mlp.experts).__name__}


def test_tiny_moe_student_forward_backward_one_rank():
    (out,) = run_on_ranks(_build_and_step, 1, timeout_s=240)
    assert out["mlp1"] == "MoELayer" and out["experts"] == "SequentialMLP"
    names = set(out["grads"])
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names  # the dense layer of layer_pattern [0, 1]
    assert {"decoder.layers.1.mlp.router.weight", *(f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc{k}.weight"
                                                    for j in range(4) for k in (1, 2))} <= names
    assert 3.0 < out["loss"] < 6.0
    assert out["grads"]["decoder.layers.1.mlp.router.weight"] > 0
    assert sum(out["grads"][f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"] > 0 for j in range(4)) >= 2


# ------------------------------------------------------------------ distributed (gloo)
@pytest.fixture(scope="module")
def equivalence() -> dict:
    from tests import moe_workers

    return run_on_ranks(moe_workers.parallel_equivalence, 4, timeout_s=900, pg_timeout_s=300)[0]


@pytest.mark.parametrize("layout", ["ep2", "tp2_ep2_sp", "pp2_ep2"])
def test_expert_parallel_layouts_match_the_reference(equivalence, layout):
    r = equivalence[layout]
    ref_loss, loss = r["loss"]
    assert loss == pytest.approx(ref_loss, rel=1e-5), r
    assert r["missing"] == [] and r["compared"] > 10
    assert r["grad_max_diff"] <= 1e-5 * max(r["grad_scale"], 1.0), r
    assert r["router_grad"] > 0


def test_routing_replay_survives_recompute_and_replaces_the_routers_choice(equivalence):
    # full recompute replays each micro-batch's own choices in the backward (1F1B, two micro-batches per replica)
    r = equivalence["replay_recompute"]
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6), r
    assert r["missing"] == [] and r["grad_max_diff"] <= 1e-6 * max(r["grad_scale"], 1.0), r
    assert r["router_grad"] > 0  # the gate weights still come from the router: it trains
    # the replayed experts are not the ones the router picks: routing by itself gives other gradients
    routed = equivalence["replay_vs_routed"]
    assert routed["loss"][1] != routed["loss"][0] and routed["grad_max_diff"] > 1e-3 * routed["grad_scale"], routed
    # PP = 2: each stage records its own MoE layer's choices in a lock-step KV-cached rollout, and they are the
    # experts a forward of the decoded tokens routes to
    for r in equivalence["pp_record"]:
        assert r["shape"][2:] == (1, 2) and r["positions"] > 10 and r["equal"], r
    # logged: random choices of 2 of 4 experts share one expert with the router's on average
    assert 0.3 < equivalence["replay_metrics"]["moe/replay_mismatch"] < 0.7, equivalence["replay_metrics"]


def test_aux_loss_gradient_is_independent_of_micro_batches_and_dp():
    from tests import moe_workers

    out = run_on_ranks(moe_workers.aux_loss_scale, 2, timeout_s=300)[0]
    ref = out["dp1_mb1"]
    assert ref and all(float(v.abs().sum()) > 0 for v in ref.values())
    for case in ("dp1_mb2", "dp2_mb1", "dp2_mb2"):
        assert out[case].keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(out[case][k], ref[k], rtol=1e-5, atol=1e-9, msg=f"{case} {k}")
    assert all(float(v.abs().sum()) == 0.0 for v in out["coeff0"].values())
    for k in ref:  # added once: (main + aux) - main is the aux gradient alone
        torch.testing.assert_close(out["main_aux"][k] - out["main"][k], out["dp2_mb1"][k], rtol=1e-4, atol=1e-7)
    # logged: the same micro-batch twice on each of 2 replicas has the statistics of one micro-batch, doubled counts
    one, four = out["metrics_dp1_mb1"], out["metrics_dp2_mb2"]
    assert one["moe/aux_loss"] > 0 and four["moe/aux_loss"] == pytest.approx(one["moe/aux_loss"], rel=1e-6)
    assert one["moe/tokens_per_expert_mean"] == pytest.approx(2 * 12 * 2 / 4)  # rows x seq x top-2 / 4 experts
    assert four["moe/tokens_per_expert_mean"] == pytest.approx(4 * one["moe/tokens_per_expert_mean"])
    # padding (a row's last token, all-padding rows) is left out of the aux loss: the same gradient as the
    # rows cut before it, another one when the padding is not marked
    by_lens, rows, unmasked = out["pad_by_lens"], out["pad_rows"], out["pad_unmasked"]
    for k in by_lens:
        torch.testing.assert_close(rows[k], by_lens[k], rtol=1e-5, atol=1e-9, msg=k)
    assert max(float((unmasked[k] - by_lens[k]).abs().max()) for k in by_lens) > 1e-6
    assert four["moe/load_imbalance"] == pytest.approx(one["moe/load_imbalance"]) and one["moe/load_imbalance"] >= 1.0
    assert one["moe/tokens_per_expert_max"] >= one["moe/tokens_per_expert_mean"]


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> tuple[list[dict], str]:
    from tests import moe_workers

    root = tmp_path_factory.mktemp("reshard")
    return run_on_ranks(moe_workers.reshard_ep, 4, args=(str(root),), timeout_s=900, pg_timeout_s=300), str(root)


@pytest.mark.parametrize("optimizer", ["plain", "distopt"])
@pytest.mark.parametrize("case, experts", [  # expert weights (fc1, fc2) on each rank, saved / loaded layout:
    ("ep2_to_ep1", (8, 16)),  # 2 MoE layers x 4 experts, half of them at EP = 2
    ("ep1_to_ep2", (16, 8)),
    ("pp2_ep2_to_pp1_ep1", (4, 16)),  # layers [dense, MoE | MoE, dense]: one MoE layer per stage
])
def test_checkpoint_reshards_across_ep_and_pp(resharded, case, experts, optimizer):
    out, root = resharded
    for rank, results in enumerate(out):
        r = results[f"{case}/{optimizer}"]
        # the weights, the Adam step (and, plain optimizer, exp_avg / exp_avg_sq of every parameter by
        # global name) and the first update after the resume in the other layout equal the saved run's
        assert r["diffs"]["params"] == 0.0, r
        assert r["diffs"]["next_step"] < 1e-6, r
        assert r["steps"] == [1.0], r
        assert r["local_experts"] == experts, (rank, r)
        if optimizer == "plain":
            assert r["diffs"]["adam"] == 0.0, r
            assert r["saved_moments"] == 3 * r["n_params"]  # exp_avg, exp_avg_sq, step of each parameter
    manifest = json.loads((Path(root) / f"{case}_{optimizer}" / "camopd.json").read_text())
    pattern = [0, 1, 1, 0] if case.startswith("pp") else None
    assert manifest["model"]["moe"] == asdict(MoEConfig(**TINY_MOE, layer_pattern=pattern))
