"""The user's whole path: two Hugging Face models (general parent G, domain child D) → our format →
CaMOPD training (student from D, teachers G and D) → the student exported back to Hugging Face and
loaded by ``transformers``, whose logits must match our trained student's; the export of the run's
checkpoints root (its latest checkpoint) carries the domain model's tokenizer, and ``generate`` runs with
its eos/pad."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from camopd_megatron.checkpoint.hf_io import convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from camopd_megatron.testing.multiproc import run_on_ranks  # noqa: E402
from tests.hf_conversion_workers import TINY_QWEN2 as SHAPE, save_tiny_qwen2  # noqa: E402


def _train_and_score(rank: int, world_size: int, cfg, tokens: torch.Tensor) -> dict:
    """Train, then our student's logits on ``tokens`` from the final checkpoint (TP=1, one rank)."""
    from camopd_megatron.checkpoint.dist import load_model
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.pipeline import model_forward
    from camopd_megatron.trainer import train

    res = train(cfg)
    pgc = simple_pg_collection(1, 1, 1)
    init_model_rng(0, pgc)
    model = build_gpt_model(cfg.model.__class__(**{**cfg.model.__dict__, "checkpoint": None}), pgc).eval()
    load_model(model, res.last_checkpoint, model_cfg=cfg.model, pg_collection=pgc)
    with torch.no_grad():
        logits = model_forward(model, tokens)[..., : cfg.model.vocab_size]
    return {"ckpt": res.last_checkpoint, "logits": logits, "loss": [h.get("train/loss") for h in res.history]}


@pytest.mark.slow
def test_hf_to_camopd_to_hf(tmp_path):
    from camopd_megatron.config import load_config
    from camopd_megatron.checkpoint.dist import read_manifest

    for name, seed in (("general", 1), ("domain", 2)):
        save_tiny_qwen2(tmp_path / f"hf_{name}", seed)  # with its tokenizer
        convert_hf_to_megatron(tmp_path / f"hf_{name}", tmp_path / f"ours_{name}", progress=False)
    model_cfg = read_manifest(tmp_path / "ours_domain")["model_config"]
    repo = Path(__file__).resolve().parents[1]
    overrides = [
        f"run.output_dir={tmp_path / 'run'}", "run.steps=2", "run.log_level=WARNING",
        f"model.checkpoint={tmp_path / 'ours_domain'}",
        f"teachers[0].checkpoint={tmp_path / 'ours_general'}", f"teachers[1].checkpoint={tmp_path / 'ours_domain'}",
        "rollout.prompts_per_step=4", "rollout.max_new_tokens=6", "data.max_prompt_tokens=24",
        "optim.lr=1e-3", "checkpoint.save_interval=0", "logging.progress_bar=false",
    ] + [f"model.{k}={json.dumps(v)}" for k, v in model_cfg.items() if k not in ("checkpoint",)]
    cfg = load_config(str(repo / "examples/configs/camopd.yaml"), overrides)
    assert cfg.model.arch == "qwen2" and cfg.model.add_qkv_bias
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    (out,) = run_on_ranks(_train_and_score, 1, args=(cfg, tokens), timeout_s=400)
    assert any(loss not in (None, 0.0) for loss in out["loss"])

    # the run's checkpoints root: its latest checkpoint, the one training ended with
    assert Path(out["ckpt"]).parent == tmp_path / "run" / "checkpoints"
    convert_megatron_to_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf_student", progress=False)
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_student").eval()
    with torch.no_grad():
        theirs = student(tokens).logits.float()
    assert (theirs - out["logits"]).abs().max().item() <= 1e-4
    # training changed the weights: the exported student is not the domain model it started from
    domain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_domain").eval()
    with torch.no_grad():
        assert (domain(tokens).logits.float() - theirs).abs().max().item() > 1e-4
    # the training checkpoint carried the domain model's tokenizer: the export loads and generates with it
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_student")
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_domain").get_vocab()
    assert (student.generation_config.eos_token_id, student.generation_config.pad_token_id) == (0, 1)
    batch = tok(["hi there", "hey"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        new = student.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row in new.tolist():  # each row ends at its first eos (then pads) or runs to max_new_tokens
        assert 0 not in row or all(t == 1 for t in row[row.index(0) + 1:]), row
