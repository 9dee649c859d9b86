"""HF <-> megatron conversion of the mixture-of-experts architectures, verified against ``transformers``.

Tiny random-init Qwen3-MoE (a dense layer through ``mlp_only_layers``, ``norm_topk_prob: true``), Qwen2-MoE
(gated shared expert, ``norm_topk_prob: false``) and Mixtral: 2 layers, 4 experts (top 2), hidden 32,
vocab 100. HF -> ours -> megatron logits equal transformers' within 1e-4 at TP = 1, TP = 2 (SP), EP = 2,
TP = 2 x EP = 2 and PP = 2 (one 2-rank launch); ours -> HF is bit-equal in the published per-expert
layout and loads in transformers, also from a checkpoint re-saved at EP = 2; a checkpoint in transformers
5.x's fused expert layout converts to the same checkpoint; the config fields round-trip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from camopd_megatron.checkpoint.hf import hf_config_from_model, model_config_from_hf  # noqa: E402
from camopd_megatron.checkpoint.hf_io import convert_hf_to_megatron, read_hf_config  # noqa: E402
from camopd_megatron.testing.multiproc import run_on_ranks  # noqa: E402
from tests.hf_conversion_workers import MOE_LAYOUTS, export_worker, hf_tensors, moe_parity_worker, tokens  # noqa: E402

SHAPE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             vocab_size=100, max_position_embeddings=256, num_experts_per_tok=2, tie_word_embeddings=False)
CASES = {
    # name: (config class, extra kwargs)
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True,
                                         mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                         norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
}


def _build_hf(name: str, root: Path) -> dict:
    cls, extra = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**SHAPE, **extra)).eval()
    with torch.no_grad():  # norms are ones and biases zeros at init: perturb everything; routers widely
        for pname, p in model.named_parameters():  # (no near-ties between experts)
            p.add_(torch.randn_like(p) * (0.5 if pname.endswith("mlp.gate.weight") else 0.05))
    d = root / name
    model.save_pretrained(d)  # the published per-expert layout
    fused = root / f"{name}_fused"  # transformers 5.x's in-memory layout: experts fused per layer
    fused.mkdir()
    (fused / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    with torch.no_grad():
        logits = model(tokens()).logits.float()
    return dict(hf=str(d), fused=str(fused), logits=logits, ckpt=str(root / f"{name}_ours"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_moe")
    out = {name: _build_hf(name, root) for name in CASES}
    for m in out.values():
        convert_hf_to_megatron(m["hf"], m["ckpt"], tp=2, progress=False)
    return out


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_moe_config_from_hf(models):
    q3, q2, mx = (model_config_from_hf(read_hf_config(models[n]["hf"])) for n in CASES)
    assert (q3.arch, q3.qk_layernorm, q3.ffn_hidden_size) == ("qwen3", True, 48)
    assert (q3.moe.num_experts, q3.moe.router_topk, q3.moe.ffn_hidden_size) == (4, 2, 16)
    assert q3.moe.layer_pattern == [1, 0] and q3.moe.router_pre_softmax is False
    assert q3.moe.shared_expert_ffn_hidden_size is None and q3.moe.aux_loss_coeff == 0.001
    assert q2.arch == "qwen2" and q2.add_qkv_bias and q2.moe.layer_pattern is None
    assert (q2.moe.shared_expert_ffn_hidden_size, q2.moe.shared_expert_gate, q2.moe.router_pre_softmax) == (24, True, True)
    assert mx.arch == "mistral" and (mx.moe.num_experts, mx.moe.ffn_hidden_size, mx.moe.router_pre_softmax) == (4, 48, False)
    # decoder_sparse_step: every second layer is sparse; the published spelling of the expert count
    cfg = dict(read_hf_config(models["qwen3_moe"]["hf"]), num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[],
               num_experts=4, router_aux_loss_coef=0.01)
    cfg.pop("num_local_experts", None)
    four = model_config_from_hf(cfg)
    assert four.moe.layer_pattern == [0, 1, 0, 1] and four.moe.aux_loss_coeff == 0.01
    # the manifest records the MoE section with the other architecture fields
    manifest = json.loads((Path(models["qwen2_moe"]["ckpt"]) / "camopd.json").read_text())
    assert manifest["model"]["moe"]["shared_expert_gate"] is True
    assert manifest["common"]["model_config"]["moe"]["num_experts"] == 4


@pytest.mark.parametrize("name", list(CASES))
def test_generated_config_round_trips_through_transformers(models, tmp_path, name):
    """Without the imported config.json (a random-init MoE model) the export writes one transformers builds
    the same architecture from."""
    cfg = model_config_from_hf(read_hf_config(models[name]["hf"]))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf_cfg).__name__ == CASES[name][0]
    assert model_config_from_hf(hf_cfg.to_dict() | {"architectures": hf_cfg.architectures}) == cfg


def test_unexportable_moe_is_refused(models):
    from dataclasses import replace

    cfg = model_config_from_hf(read_hf_config(models["mixtral"]["hf"]))
    bad = replace(cfg, moe=replace(cfg.moe, shared_expert_ffn_hidden_size=8))
    with pytest.raises(ValueError, match=r"MixtralForCausalLM, which cannot hold a shared expert"):
        hf_config_from_model(bad)


# ------------------------------------------------------------------------------------------------
# forward parity at every layout (one 2-rank launch)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(models, tmp_path_factory) -> tuple[dict, dict]:
    resave = {"qwen2_moe": str(tmp_path_factory.mktemp("resave") / "qwen2_moe_ep2")}
    cases = {n: {k: m[k] for k in ("hf", "ckpt", "logits")} for n, m in models.items()}
    res = run_on_ranks(moe_parity_worker, 2, args=(cases, resave), timeout_s=600, pg_timeout_s=120)
    assert res[0] == res[1]
    return res[0], resave


@pytest.mark.parametrize("name", list(CASES))
def test_moe_logits_match_transformers_at_every_layout(parity, name):
    out, _ = parity
    for tp, pp, ep, _etp in MOE_LAYOUTS:
        if pp == 1:
            assert out[(name, tp, pp, ep, "logits")] <= 1e-4, (name, tp, pp, ep, out[(name, tp, pp, ep, "logits")])
        assert out[(name, tp, pp, ep, "logp")] <= 1e-4, (name, tp, pp, ep, out[(name, tp, pp, ep, "logp")])


# ------------------------------------------------------------------------------------------------
# ours -> HF, and the fused layout
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(models, parity, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export_moe")
    jobs = [(m["ckpt"], str(root / name), {}) for name, m in models.items()]
    jobs.append((parity[1]["qwen2_moe"], str(root / "qwen2_moe_from_ep2"), {"hf_config_from": models["qwen2_moe"]["hf"]}))
    fused = {}
    for name, m in models.items():  # the fused layout: converted, then exported again
        fused[name] = root / f"{name}_fused_ours"
        convert_hf_to_megatron(m["fused"], fused[name], progress=False)
        jobs.append((str(fused[name]), str(root / f"{name}_from_fused"), {}))
    export_worker(0, 1, jobs)  # in process: the export needs no process group
    return {Path(dst).name: dst for _, dst, _ in jobs}


@pytest.mark.parametrize("name", [*CASES, "qwen2_moe_from_ep2", "qwen3_moe_from_fused", "qwen2_moe_from_fused",
                                  "mixtral_from_fused"])
def test_moe_export_is_bit_equal_and_loads_in_transformers(models, exported, name):
    src = models[name.split("_from_")[0]]["hf"]
    a, b = hf_tensors(src), hf_tensors(exported[name])
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model, info = transformers.AutoModelForCausalLM.from_pretrained(exported[name], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert read_hf_config(exported[name]) == read_hf_config(src)


def test_fused_layout_is_what_transformers_holds(models):
    names = set(hf_tensors(models["mixtral"]["fused"]))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    published = set(hf_tensors(models["mixtral"]["hf"]))
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in published


def test_expert_layout_is_checked_and_training_settings_do_not_block_export(models, tmp_path):
    """--ep is validated like --tp; a run that trained with other MoE settings (dispatcher, aux loss, replay)
    exports against the imported config.json, a different expert structure does not."""
    from camopd_megatron.checkpoint.hf_io import _export_config

    with pytest.raises(ValueError, match=r"--ep: got 3; expected a divisor of model.moe.num_experts=4"):
        convert_hf_to_megatron(models["mixtral"]["hf"], tmp_path / "out", ep=3, progress=False)
    assert not (tmp_path / "out").exists()
    ckpt = Path(models["qwen2_moe"]["ckpt"])
    manifest = json.loads((ckpt / "camopd.json").read_text())
    trained = dict(manifest["model"]["moe"], token_dispatcher="allgather", aux_loss_coeff=0.0, routing_replay=True)
    cfg, base, _ = _export_config(ckpt, dict(manifest, model=dict(manifest["model"], moe=trained)), None)
    assert cfg.moe.num_experts == 4 and base["architectures"] == ["Qwen2MoeForCausalLM"]
    other = dict(manifest, model=dict(manifest["model"], moe=dict(trained, num_experts=8)))
    with pytest.raises(ValueError, match=r"moe: checkpoint .*'num_experts': 8"):
        _export_config(ckpt, other, None)
