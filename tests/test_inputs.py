"""Inputs checked before the expensive part, and every role's architecture read from its own checkpoint.

One module fixture writes three converted-format checkpoints: the tiny ``general`` / ``domain`` pair
of ``python -m camopd_megatron.demo.tiny_checkpoints`` and a ``big`` teacher of another size (more
layers, wider). Then:

* a config with three input problems reports all three at once, before any model is built;
* ``--dry-run`` reads the manifests: an architecture field that disagrees names both values;
* a student and a teacher of different sizes train a step with the teacher separate and colocated;
* a colocated teacher whose own architecture the student's TP does not divide is refused.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from camopd_megatron.config import ConfigError, config_from_dict
from camopd_megatron.testing.multiproc import run_on_ranks

BIG = dict(arch="llama", num_layers=3, hidden_size=96, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192,
           vocab_size=128, vocab_pad_multiple=128)
"""A teacher larger than the tiny student (3 layers x 96 wide vs 2 x 64), same vocabulary."""
TINY_SIZES = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128)
"""Where the tiny checkpoints (``demo.tiny_checkpoints.TINY``) differ from :data:`BIG`."""


def _write_checkpoints(rank: int, world_size: int, root: str) -> None:
    from camopd_megatron.checkpoint.dist import model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.demo.teachers import build_demo_model
    from camopd_megatron.demo.tiny_checkpoints import write_tiny_checkpoints

    write_tiny_checkpoints(root)
    cfg = ModelConfig(init="random", transformer_impl="local", **BIG)
    model, pgc = build_demo_model(cfg, seed=9)
    save_checkpoint(f"{root}/big", model_sharded_state_dict(model, pgc), model_cfg=cfg)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    run_on_ranks(_write_checkpoints, 1, args=(str(root),), timeout_s=300)
    return {name: str(root / name) for name in ("general", "domain", "big")}


def _cfg(ckpts: dict[str, str], out: str, **extra):
    """The camopd preset on the tiny checkpoints: the student starts from ``domain``, no architecture in the YAML."""
    from camopd_megatron.config import load_config
    from camopd_megatron.config.api import config_to_dict
    from camopd_megatron.config.loader import deep_merge

    base = config_to_dict(load_config(str(Path(__file__).resolve().parents[1] / "examples/configs/camopd.yaml")))
    over = {
        "run": {"steps": 1, "output_dir": out, "seed": 3, "log_level": "WARNING"},
        "model": {"checkpoint": ckpts["domain"], "seq_length": 48},
        "teachers": [{"name": "general", "branches": ["general"], "checkpoint": ckpts["general"]},
                     {"name": "domain", "branches": ["domain"], "checkpoint": ckpts["domain"]}],
        "rollout": {"prompts_per_step": 4, "max_new_tokens": 4, "micro_batch_size": 4},
        "data": {"max_prompt_tokens": 40},
        "optim": {"micro_batch_size": 4},
        "checkpoint": {"save_interval": 0, "resume": "never"},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    return config_from_dict(deep_merge(deep_merge(base, over), extra))


# ------------------------------------------------------------------------------------------------ early input errors
def _train_expecting_input_error(rank: int, world_size: int, cfg) -> dict:
    """Train with every model builder replaced by one that records the call: the error must come first."""
    import camopd_megatron.teachers.host as host
    import camopd_megatron.trainer as trainer

    built = []

    def no_build(*args, **kwargs):
        built.append(True)
        raise AssertionError("a model was built before the inputs were checked")

    trainer.build_gpt_model = host.build_gpt_model = no_build
    try:
        trainer.train(cfg)
    except ConfigError as e:
        return {"problems": e.problems, "built": bool(built)}
    return {"problems": [], "built": bool(built)}


def test_three_input_problems_reported_together_before_any_model(ckpts, tmp_path):
    good = tmp_path / "domain.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    cfg = _cfg(ckpts, str(tmp_path / "run"),
               teachers=[{"name": "general", "branches": ["general"], "checkpoint": str(tmp_path / "no_general")},
                         {"name": "domain", "branches": ["domain"], "checkpoint": ckpts["domain"]}],
               data={"tokenizer": str(tmp_path / "no_tokenizer.json"),
                     "branches": {"general": {"paths": [str(tmp_path / "no_prompts.jsonl")]},
                                  "domain": {"paths": [str(good)]}}})
    (res,) = run_on_ranks(_train_expecting_input_error, 1, args=(cfg,), timeout_s=300)
    assert not res["built"]
    problems = res["problems"]
    assert len(problems) == 3, problems
    assert problems[0].startswith("teachers[0].checkpoint=") and "does not exist" in problems[0]
    assert problems[1].startswith("data.branches.general.paths[0]:") and "no_prompts" in problems[1]
    assert problems[2].startswith("data.tokenizer:") and "no_tokenizer" in problems[2]


def test_dry_run_reads_the_manifests(ckpts, tmp_path, capsys):
    from camopd_megatron import cli

    path = tmp_path / "run.yaml"
    path.write_text(f"""base: {Path(__file__).resolve().parents[1] / 'examples/configs/camopd.yaml'}
model: {{checkpoint: {ckpts['domain']}, num_layers: 3}}
teachers:
  - {{name: general, branches: [general], checkpoint: {ckpts['big']}, placement: separate}}
  - {{name: domain, branches: [domain], checkpoint: {ckpts['domain']}, model: {{vocab_size: 120}}}}
""")
    assert cli.main(["--config", str(path), "--dry-run", "--world-size", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model.num_layers: got 3; expected the checkpoint's value 2" in err, err
    assert "teachers[1].model.vocab_size: got 120; expected the checkpoint's value 128" in err, err
    assert "Traceback" not in err
    # as written (architectures left out) it plans: the separate teacher's weights are the big model's
    assert cli.main(["--config", str(path), "--dry-run", "--world-size", "2", "--device", "cpu",
                     "model.num_layers=null", "teachers[1].model=null"]) == 0
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.planner import count_params

    out = capsys.readouterr().out
    big, tiny = (count_params(ModelConfig(init="random", **arch)) for arch in (BIG, {**BIG, **TINY_SIZES}))
    assert big > 2 * tiny
    assert f"weights general      1.05  {big / 1e6:.3f}M params" in out, out  # the big model's, not the student's
    assert f"params              0.34  {tiny / 1e6:.3f}M params" in out, out


# ------------------------------------------------------------------------------------------------ roles of different sizes
def _train_worker(rank: int, world_size: int, cfgs: list) -> list:
    from camopd_megatron.trainer import train

    return [[h.get("train/loss") for h in train(cfg).history if "phase" in h] for cfg in cfgs]


def test_student_and_teacher_of_different_sizes_train(ckpts, tmp_path):
    """The general teacher (3 x 96) is larger than the student (2 x 64): separate on rank 1, then colocated."""
    big = {"name": "general", "branches": ["general"], "checkpoint": ckpts["big"]}
    dom = {"name": "domain", "branches": ["domain"], "checkpoint": ckpts["domain"]}
    sep = _cfg(ckpts, str(tmp_path / "sep"), teachers=[{**big, "placement": "separate"}, dom])
    co = _cfg(ckpts, str(tmp_path / "co"), teachers=[big, dom])
    res = run_on_ranks(_train_worker, 2, args=([sep, co],), timeout_s=600, pg_timeout_s=240)
    (sep_losses, co_losses) = res[0]
    for losses in (sep_losses, co_losses):
        assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] != 0.0, losses


def test_colocated_teacher_with_its_own_architecture_must_split_on_the_student_layout():
    cfg = {
        "model": {"init": "random", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                  "vocab_size": 128},
        "parallel": {"tp": 4},
        "teachers": [{"name": "general", "init": "random", "branches": ["general"],
                      "model": {"num_layers": 2, "hidden_size": 96, "num_attention_heads": 6, "ffn_hidden_size": 192,
                                "vocab_size": 128}},
                     {"name": "domain", "init": "random", "branches": ["domain"]}],
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(cfg)
    (line,) = err.value.problems
    assert line.startswith("parallel.tp: got 4; expected a divisor of teachers[0].model.num_attention_heads=6"), line
