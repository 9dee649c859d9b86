"""HF <-> megatron conversion, verified against ``transformers`` itself (issue 7).

Tiny random-init models per architecture (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 100 —
not a multiple of 128, so padding is exercised), built from transformers' config classes:
HF -> ours -> megatron logits equal transformers' at TP = 1 and 2 (one 2-rank launch for all
architectures), 16 greedy tokens equal ``generate``; ours -> HF (also from a checkpoint re-saved at
TP = 2) loads in transformers with bit-equal tensors and the same key set; both config dialects;
tied and untied embeddings; bad inputs leave nothing behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from camopd_megatron.checkpoint.hf import model_config_from_hf  # noqa: E402
from camopd_megatron.checkpoint.hf_io import HFWeights, convert_hf_to_megatron, read_hf_config  # noqa: E402
from camopd_megatron.testing.multiproc import run_on_ranks  # noqa: E402
from tests.hf_conversion_workers import (  # noqa: E402
    NEW, T, export_worker, hf_tensors, parity_worker, save_tiny_tokenizer, tokens as _tokens,
)

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=100, max_position_embeddings=16384)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
CASES = {
    # name: (config class, extra kwargs, config dialect, save kwargs)
    "llama31": ("LlamaConfig", dict(tie_word_embeddings=False), "4.x", {}),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=True, sliding_window=None), "5.x", {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False), "5.x", dict(max_shard_size="40KB")),
    # head_dim 32 != hidden/heads = 16, as in real Qwen3 models (megatron kv_channels)
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32), "5.x", {}),
}
def _to_4x_dialect(path: Path) -> None:
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    path.write_text(json.dumps(cfg, indent=2))


def _build_hf(name: str, root: Path) -> dict:
    cls, extra, dialect, save_kw = CASES[name]
    kw = dict(SHAPE, **extra)
    if name == "llama31":
        kw["rope_parameters"] = dict(LLAMA31_ROPE, rope_theta=500000.0)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw)).eval()
    with torch.no_grad():  # norms are ones and biases zeros at init: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = root / name
    model.save_pretrained(d, **save_kw)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "note": name}))
    if dialect == "4.x":
        _to_4x_dialect(d / "config.json")
    tokens = _tokens()
    with torch.no_grad():
        logits = model(tokens).logits.float()
        model.generation_config.eos_token_id = None
        gen = model.generate(tokens[:1], max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, T:]
    return dict(hf=str(d), logits=logits, gen=gen, ckpt=str(root / f"{name}_ours"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    out = {name: _build_hf(name, root) for name in CASES}
    for name, m in out.items():
        convert_hf_to_megatron(m["hf"], m["ckpt"], tp=2, progress=False)
    return out


# ------------------------------------------------------------------------------------------------
# forward / generate parity (one 2-rank launch for every architecture)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(models, tmp_path_factory) -> tuple[dict, str]:
    resave = str(tmp_path_factory.mktemp("resave") / "qwen2_tp2")
    cases = {n: {k: m[k] for k in ("hf", "ckpt", "logits")} for n, m in models.items()}
    res = run_on_ranks(parity_worker, 2, args=(cases, resave), timeout_s=300, pg_timeout_s=120)
    assert res[0] == res[1]
    return res[0], resave


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_at_tp1_and_tp2(parity, name):
    out, _ = parity
    for tp in (1, 2):
        assert out[(name, tp)] <= 1e-4, (name, tp, out[(name, tp)])


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_tokens_match_generate(parity, models, name):
    out, _ = parity
    assert out[(name, "gen")] == models[name]["gen"].tolist()


# ------------------------------------------------------------------------------------------------
# ours -> HF
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(models, parity, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    jobs = [(m["ckpt"], str(root / name), {"max_shard_bytes": 30_000 if name == "qwen2" else 2**30})
            for name, m in models.items()]
    jobs.append((parity[1], str(root / "qwen2_from_tp2"), {"hf_config_from": models["qwen2"]["hf"]}))
    run_on_ranks(export_worker, 1, args=(jobs,), timeout_s=300)
    return {Path(dst).name: dst for _, dst, _ in jobs}


@pytest.mark.parametrize("name", [*CASES, "qwen2_from_tp2"])
def test_export_is_bit_equal_and_loads_in_transformers(models, exported, name):
    src = models[name.removesuffix("_from_tp2")]["hf"]
    out = exported[name]
    a, b = hf_tensors(src), hf_tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if name == "qwen2":
        index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(a)
    assert (Path(out) / "generation_config.json").is_file()
    assert json.loads((Path(out) / "tokenizer_config.json").read_text())["note"] == name.removesuffix("_from_tp2")


def test_exported_config_keeps_rope_dialect(models, exported):
    old = json.loads((Path(exported["llama31"]) / "config.json").read_text())
    assert old["rope_theta"] == 500000.0 and old["rope_scaling"] == LLAMA31_ROPE and "rope_parameters" not in old
    new = json.loads((Path(exported["mistral"]) / "config.json").read_text())
    assert new["rope_parameters"]["rope_theta"] == 10000.0 and new["tie_word_embeddings"] is True
    cfg = transformers.AutoConfig.from_pretrained(exported["llama31"])
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0


# ------------------------------------------------------------------------------------------------
# config translation and bad input (in-process, no distributed world)
# ------------------------------------------------------------------------------------------------
def test_both_dialects_give_the_same_model_config(models):
    new = read_hf_config(models["mistral"]["hf"])
    old = dict(new)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    a, b = model_config_from_hf(new), model_config_from_hf(old)
    assert a == b and a.tie_embeddings and a.arch == "mistral"
    llama = model_config_from_hf(read_hf_config(models["llama31"]["hf"]))
    assert llama.rotary_base == 500000.0 and llama.rope_scaling["factor"] == 8.0
    q2, q3 = (model_config_from_hf(read_hf_config(models[n]["hf"])) for n in ("qwen2", "qwen3"))
    assert q2.add_qkv_bias and not q2.qk_layernorm and q3.qk_layernorm and not q3.add_qkv_bias
    assert q2.padded_vocab_size == 128 and q2.vocab_size == 100


def test_pytorch_bin_weights(models, tmp_path):
    src = Path(models["llama31"]["hf"])
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    torch.save(hf_tensors(str(src)), d / "pytorch_model.bin")
    w = HFWeights(d)
    assert not w.safetensors and "lm_head.weight" in w.names()
    convert_hf_to_megatron(d, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "camopd.json").is_file()


def _copy_model(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_bad_inputs(models, tmp_path):
    out = tmp_path / "out"
    # unsupported architecture: named, with the supported list
    d = _copy_model(models["llama31"]["hf"], tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        convert_hf_to_megatron(d, out, progress=False)
    # missing shard
    d = _copy_model(models["qwen2"]["hf"], tmp_path / "q2")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing"):
        convert_hf_to_megatron(d, out, progress=False)
    # TP / PP that do not divide the model
    with pytest.raises(ValueError, match=r"--tp: got 4; expected a divisor of model.num_query_groups=2"):
        convert_hf_to_megatron(models["qwen3"]["hf"], out, tp=4, progress=False)
    with pytest.raises(ValueError, match=r"--pp: got 3; expected a divisor of model.num_layers=2"):
        convert_hf_to_megatron(models["qwen3"]["hf"], out, pp=3, progress=False)
    with pytest.raises(ValueError, match="--dtype='int8'"):
        convert_hf_to_megatron(models["qwen3"]["hf"], out, dtype="int8", progress=False)
    _assert_nothing_left(out)
    # mixed dtypes: refused unless --dtype; then everything is converted
    d = _copy_model(models["mistral"]["hf"], tmp_path / "mixed")
    t = load_file(str(d / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.bfloat16)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="dtype mismatch.*--dtype"):
        convert_hf_to_megatron(d, out, progress=False)
    _assert_nothing_left(out)
    convert_hf_to_megatron(d, out, dtype="bfloat16", progress=False)
    assert json.loads((out / "camopd.json").read_text())["common"]["dtype"] == "torch.bfloat16"
    # an existing output is refused (and kept) unless overwrite
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        convert_hf_to_megatron(models["mistral"]["hf"], out, progress=False)
    assert (out / "camopd.json").is_file()
    # a missing tensor is named
    t.pop("model.norm.weight")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks.*model.norm.weight"):
        convert_hf_to_megatron(d, tmp_path / "out2", progress=False)
    _assert_nothing_left(tmp_path / "out2")


def test_failure_while_writing_leaves_nothing(models, tmp_path, monkeypatch):
    from camopd_megatron.checkpoint import hf_io

    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return hf_io.__dict__["_orig_to_mcore"](*args, **kwargs)

    monkeypatch.setitem(hf_io.__dict__, "_orig_to_mcore", hf_io.to_mcore)
    monkeypatch.setattr(hf_io, "to_mcore", boom)
    with pytest.raises(Exception, match="disk on fire"):
        convert_hf_to_megatron(models["qwen3"]["hf"], tmp_path / "out", progress=False)
    assert len(calls) == 5
    _assert_nothing_left(tmp_path / "out")


def test_cli_refuses_existing_output(models, tmp_path):
    (tmp_path / "exists").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), models["qwen3"]["hf"],
                        str(tmp_path / "exists"), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# a complete export: tokenizer, generation_config eos/pad, a run's checkpoints root, rope scaling
# ------------------------------------------------------------------------------------------------
def test_export_of_a_run_has_tokenizer_eos_and_pad(tmp_path):
    """A training checkpoint carries the tokenizer of the model its run started from (``carry_hf_files``,
    what the trainer's save calls); the export of the run's checkpoints root takes ``latest`` and loads in
    AutoTokenizer, and ``generate`` stops at the tokenizer's eos and pads with its pad."""
    import shutil

    from camopd_megatron.checkpoint.hf_io import convert_megatron_to_hf
    from camopd_megatron.checkpoint.hf_side import carry_hf_files
    from camopd_megatron.checkpoint.manager import CheckpointManager

    torch.manual_seed(5)
    cfg = transformers.Qwen2Config(**dict(SHAPE, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None))
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # every logit 0: greedy decoding picks id 0, the tokenizer's eos
        model.lm_head.weight.zero_()
    model.save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf", SHAPE["vocab_size"])
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "ours", progress=False)
    assert (tmp_path / "ours" / "hf" / "tokenizer.json").is_file()

    runs = CheckpointManager(tmp_path / "checkpoints")
    for step in (1, 3):  # a training checkpoint: the model state without hf/, which the save carries over
        shutil.copytree(tmp_path / "ours", runs.path_for(step), ignore=shutil.ignore_patterns("hf"))
        assert "tokenizer.json" in carry_hf_files(tmp_path / "ours", runs.path_for(step))
        runs.mark_latest(runs.path_for(step))
    (runs.path_for(1) / "hf" / "tokenizer.json").unlink()  # an older checkpoint: must not be the one exported
    assert carry_hf_files(None, runs.path_for(3)) == [] and carry_hf_files(tmp_path / "hf", tmp_path / "x") == []

    out = convert_megatron_to_hf(tmp_path / "checkpoints", tmp_path / "export", progress=False)
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == 0 and gen_cfg["pad_token_id"] == 1
    tok, source = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, tmp_path / "hf"))
    assert tok.get_vocab() == source.get_vocab() and len(tok) >= SHAPE["vocab_size"]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok.padding_side = "left"
    batch = tok(["hi there", "hey"], return_tensors="pt", padding=True)
    assert tok.decode(batch["input_ids"][0]) == "hi there"
    assert batch["input_ids"][1, 0] == 1  # padded with <pad>
    with torch.no_grad():
        new = exported.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert new.tolist() == [[0], [0]]  # stopped at eos after one token, not at max_new_tokens

    # a root without a complete checkpoint says so
    (tmp_path / "empty" / "step_00000002.tmp").mkdir(parents=True)
    (tmp_path / "empty" / "latest").write_text("step_00000002\n")
    with pytest.raises(ValueError, match="checkpoints root without a complete checkpoint"):
        convert_megatron_to_hf(tmp_path / "empty", tmp_path / "export2", progress=False)


def test_generation_config_falls_back_to_config_and_eos():
    from camopd_megatron.checkpoint.hf_side import generation_config

    assert generation_config(None, {"eos_token_id": [7, 8], "bos_token_id": 3}) == {
        "_from_model_config": True, "bos_token_id": 3, "eos_token_id": [7, 8], "pad_token_id": 7}
    assert generation_config(None, None) == {"_from_model_config": True}


def test_llama3_rope_scaling_megatron_cannot_build_is_refused_at_conversion(models, tmp_path):
    """megatron-core's GPTModel hard-codes low/high_freq_factor and original_max_position_embeddings of the
    llama3 scaling (only ``factor`` is a parameter): other values are refused by the converter, naming them."""
    d = _copy_model(models["llama31"]["hf"], tmp_path / "llama_rope")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], low_freq_factor=2.0, original_max_position_embeddings=4096)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"low_freq_factor=2\.0, original_max_position_embeddings=4096 is not "
                                         r"supported.*high_freq_factor=4"):
        convert_hf_to_megatron(d, tmp_path / "out", progress=False)
    _assert_nothing_left(tmp_path / "out")
    # factor alone may differ (Llama 3.2 uses 32)
    cfg["rope_scaling"] = dict(LLAMA31_ROPE, factor=32.0)
    assert model_config_from_hf(cfg).rope_scaling["factor"] == 32.0
