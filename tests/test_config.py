"""Typed config: strict loading, overrides, ``base:``, validation, all errors reported together."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Sequence

import pytest
import yaml

from camopd_megatron.config import (
    Config,
    ConfigError,
    ModelConfig,
    TeacherConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)


RANDOM = ["model.init=random", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.ffn_hidden_size=256", "model.vocab_size=128", "teachers[0].init=random", "teachers[1].init=random"]
"""Overrides that make the built-in defaults trainable: random weights chosen explicitly, a tiny student."""


def without_init(problems: list[str]) -> list[str]:
    """The problems other than "no checkpoint and no ``init: random``" (files that leave the models out)."""
    return [p for p in problems if "a converted checkpoint directory" not in p]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems_of(path: str | None = None, overrides: Sequence[str] = (), data: dict | None = None) -> list[str]:
    """The problems of a config that must fail to load."""
    with pytest.raises(ConfigError) as info:
        if data is not None:
            config_from_dict(data)
        else:
            load_config(path, [*RANDOM, *overrides] if path is None else overrides)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.problems and all(p in str(err) for p in err.problems)
    return err.problems


def only(problems: list[str], key: str) -> str:
    """The single problem line about ``key``."""
    hits = [p for p in problems if p.startswith(f"{key}:")]
    assert len(hits) == 1, (key, problems)
    return hits[0]


# ------------------------------------------------------------------ defaults and round trip
def test_defaults_load_and_validate():
    # random weights are a choice, never a default: each role without a checkpoint says how to get one
    problems = Config().validate()
    assert [p.split(":")[0] for p in problems] == ["model.checkpoint", "teachers[0].checkpoint", "teachers[1].checkpoint"]
    assert all("tools/convert_hf_to_megatron.py" in p and "init: random" in p for p in problems)
    cfg = load_config(None, RANDOM)
    assert cfg.validate() == []
    assert [t.name for t in cfg.teachers] == ["general", "domain"]
    assert cfg.scheduler.branches == ["general", "domain"]
    assert cfg.optim.lr == 2e-6 and cfg.selection.rho == {"general": 0.8, "domain": 0.8}
    assert cfg.model.padded_vocab_size == 128


def test_padded_vocab_size_rounds_up():
    assert ModelConfig(vocab_size=129, vocab_pad_multiple=128).padded_vocab_size == 256
    assert ModelConfig(vocab_size=1000, vocab_pad_multiple=64).padded_vocab_size == 1024
    assert ModelConfig(vocab_size=256, vocab_pad_multiple=128).padded_vocab_size == 256


FULL = """\
run: {seed: 7, steps: 12, output_dir: out/x, log_level: DEBUG}
model:
  arch: qwen3
  num_layers: 4
  hidden_size: 128
  num_attention_heads: 8
  num_query_groups: 2
  ffn_hidden_size: 384
  vocab_size: 300
  vocab_pad_multiple: 64
  seq_length: 512
  rotary_base: 1000000
  rope_scaling: {type: llama3, factor: 8.0}
  norm_epsilon: 1e-5
  add_qkv_bias: true
  qk_layernorm: true
  tie_embeddings: true
  init_method_std: 0.01
  transformer_impl: local
  checkpoint: ckpt/student
parallel: {tp: 2, pp: 2, dp: 1, sequence_parallel: true, use_distributed_optimizer: true, backend: gloo, timeout_s: 60}
teachers:
  - {name: gen, checkpoint: ckpt/g, branches: [general, code], placement: separate, tp: 2, pp: 1, dp: 1, group: pool, dtype: fp32}
  - {name: dom, init: random, branches: [domain], placement: separate, tp: 2, group: pool, offload: true}
data:
  branches:
    general: {paths: [g1.jsonl, g2.jsonl], weights: [1, 3]}
    code: {paths: [c.jsonl]}
    domain: {paths: [d.parquet]}
  max_prompt_tokens: 100
  shuffle: false
  heldout_fraction: 0.1
  tokenizer: tok/
  chat_template: chatml
  on_bad_line: skip
rollout: {prompts_per_step: 16, max_new_tokens: 32, temperature: 0.7, top_k: 5, top_p: 0.9, greedy: true,
          stop_token_ids: [2, 3], use_kv_cache: false, micro_batch_size: 4}
scheduler: {mode: mixed, mixed_shares: {general: 3, code: 1, domain: 1}}
selection:
  enabled: false
  rho: {general: 0.5, code: 1, domain: 0.7}
  score: {general: positive, code: abs, domain: abs}
  scale_only_selected: false
  student_logprobs: rollout
loss: {adv_scale: {general: 1, code: 1.5, domain: 3}, is_low: 0.2, is_high: 5, is_mode: clamp, adv_clip: 5, teacher_temperature: 0.7}
optim: {lr: 1e-5, min_lr: 1e-7, lr_schedule: cosine, warmup_steps: 3, weight_decay: 0.1, adam_beta1: 0.8,
        adam_beta2: 0.95, adam_eps: 1e-6, clip_grad: 0.5, micro_batch_size: 2}
precision: {params_dtype: bf16, fp8: hybrid, fp8_recipe: mxfp8}
checkpoint: {dir: ck, save_interval: 5, keep_last: 0, resume: must, load: ck/step_5}
eval: {interval: 10, num_prompts: 8, max_new_tokens: 16}
logging: {tensorboard: false, log_interval: 2, dir: tb, progress_bar: false, diagnostics_interval: 4}
"""


def test_full_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "full.yaml", FULL))
    # every section differs from its defaults, so a field silently dropped would show up below
    for f in dataclasses.fields(Config):
        assert getattr(cfg, f.name) != getattr(Config(), f.name), f.name
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # "1e-5" read as a float
    assert cfg.model.rotary_base == 1e6 and isinstance(cfg.model.rotary_base, float)  # int accepted for float
    assert cfg.data.branches["general"].weights == [1.0, 3.0]
    assert cfg.model.padded_vocab_size == 320
    out = tmp_path / "sub" / "dumped.yaml"
    dump_config(cfg, str(out))
    assert load_config(str(out)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["teachers"][1] == {
        "name": "dom", "init": "random", "checkpoint": None, "model": None, "branches": ["domain"], "placement": "separate", "tp": 2,
        "pp": None, "dp": None, "ep": None, "etp": None, "group": "pool", "dtype": "auto", "offload": True,
    }


# ------------------------------------------------------------------ strict loading
def test_unknown_key_did_you_mean(tmp_path):
    problems = problems_of(write(tmp_path, "c.yaml", """\
        optim: {lrr: 1e-5}
        lr: 3
        modle: {}
        rollout: {zzz_unrelated: 1}
    """))
    assert len(without_init(problems)) == 4
    assert "did you mean 'optim.lr'?" in only(problems, "optim.lrr")
    assert "did you mean 'optim.lr'?" in only(problems, "lr")  # the field exists in another section
    assert "did you mean 'model'?" in only(problems, "modle")
    line = only(problems, "rollout.zzz_unrelated")
    assert "did you mean" not in line and "temperature" in line  # lists the valid keys instead


def test_wrong_types(tmp_path):
    problems = problems_of(write(tmp_path, "c.yaml", """\
        model: {num_layers: 2.5, hidden_size: true, vocab_size: "128"}
        data: {shuffle: "true", branches: {general: {paths: g.jsonl}}}
        optim: {lr: false}
        scheduler: {pattern: general}
        teachers: [{name: 5, branches: [general]}, {name: d, branches: [domain]}]
    """))
    assert "expected an integer" in only(problems, "model.num_layers")
    assert "expected an integer" in only(problems, "model.hidden_size")
    assert "got '128'" in only(problems, "model.vocab_size")
    assert "expected true or false" in only(problems, "data.shuffle")
    assert "expected a list of a string" in only(problems, "data.branches.general.paths")
    assert "expected a number" in only(problems, "optim.lr")
    assert "got 'general'" in only(problems, "scheduler.pattern")
    assert "expected a string" in only(problems, "teachers[0].name")
    assert len(problems) == 8


def test_missing_required_field_teacher_without_name(tmp_path):
    problems = problems_of(write(tmp_path, "c.yaml", """\
        teachers:
          - {name: general, branches: [general]}
          - {branches: [domain], tp: 1}
    """))
    assert problems == [only(problems, "teachers[1].name")]
    assert "missing required field" in problems[0] and "add 'name: ...' to teachers[1]" in problems[0]
    with pytest.raises(TypeError):
        TeacherConfig()  # type: ignore[call-arg]  # name really has no default


def test_literal_error_lists_choices(tmp_path):
    problems = problems_of(write(tmp_path, "c.yaml", """\
        precision: {params_dtype: bf32, fp8: e5m2}
        selection: {score: {general: absolute, domain: positive}}
    """))
    line = only(problems, "precision.params_dtype")
    assert "'auto', 'fp32', 'bf16', 'fp16'" in line and "got 'bf32'" in line
    assert "'e4m3', 'hybrid'" in only(problems, "precision.fp8") and "null" in only(problems, "precision.fp8")
    assert "did you mean 'abs'?" in only(problems, "selection.score.general")
    assert len(problems) == 3


def test_many_errors_in_one_raise(tmp_path):
    """Type errors, unknown keys, section checks and override errors come out together."""
    path = write(tmp_path, "c.yaml", """\
        model: {arch: gpt, num_layers: 2}
        rollout: {top_p: 0, temperature: -1}
        loss: {is_low: 2.0, is_high: 1.0}
        optim: {beta1: 0.9}
        teachers: [{name: general, branches: [general], tp: x}, {name: domain, branches: [domain]}]
    """)
    problems = problems_of(path, ["run.steps=0", "nokey"])
    keys = ["model.arch", "rollout.top_p", "rollout.temperature", "loss.is_high", "optim.beta1", "teachers[0].tp", "run.steps"]
    for key in keys:
        only(problems, key)
    assert any(p.startswith("override 'nokey'") for p in problems)
    assert len(problems) == len(keys) + 1
    assert str(len(problems)) + " config problems in " in str(pytest.raises(ConfigError, load_config, path, ["run.steps=0", "nokey"]).value)


def test_type_error_does_not_hide_range_error_in_same_section():
    problems = problems_of(None, ["model.arch=gpt", "model.hidden_size=66", "model.num_layers=0.5"])
    assert "got 'gpt'" in only(problems, "model.arch")
    assert "a multiple of model.num_attention_heads=4" in only(problems, "model.hidden_size")
    assert "expected an integer" in only(problems, "model.num_layers")  # reported once, not again as a range error
    assert len(problems) == 3


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, "dup.yaml", "optim:\n  lr: 1.0e-5\n  lr: 2.0e-5\n")
    (line,) = problems_of(path)
    assert "duplicate key 'lr'" in line and "dup.yaml, line 3" in line


def test_bad_yaml_syntax_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "run:\n  seed: 1\n  steps: [1, 2\noptim: {lr: 1}\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}, line ") and "YAML syntax error" in line
    path2 = write(tmp_path, "broken2.yaml", "run:\n  seed: 1\n bad: 2\n")
    assert ", line 3, column 2" in problems_of(path2)[0]


def test_top_level_must_be_mapping_and_missing_file(tmp_path):
    assert "expected a mapping of sections" in problems_of(write(tmp_path, "l.yaml", "- 1\n- 2\n"))[0]
    assert "cannot read" in problems_of(str(tmp_path / "nope.yaml"))[0]
    assert load_config(write(tmp_path, "empty.yaml", ""), RANDOM) == load_config(None, RANDOM)


# ------------------------------------------------------------------ overrides
def test_overrides_scalars_lists_indices_bool_null():
    cfg = load_config(None, [
        *RANDOM,
        "optim.lr=1e-5",
        "scheduler.pattern=[general,domain]",
        "teachers.0.tp=2",
        "teachers[1].placement=separate",
        "teachers[1].tp=4",
        "logging.tensorboard=false",
        "model.num_query_groups=2",
        "model.num_query_groups=null",
        "checkpoint.load=ck/step_9",
        "run.output_dir=2024",  # a string field keeps the text even if YAML would read a number
        "selection.rho.general=0.5",
        "model.rope_scaling.factor=8.0",
        "data.branches.general.paths=[a.jsonl]",
        "data.branches.domain.paths=[b.jsonl]",
        "parallel.tp=2",
    ])
    assert cfg.optim.lr == 1e-5
    assert cfg.scheduler.pattern == ["general", "domain"]
    assert cfg.teachers[0].tp == 2 and cfg.teachers[0].name == "general"  # default list kept, element edited
    assert cfg.teachers[1].placement == "separate" and cfg.teachers[1].tp == 4
    assert cfg.logging.tensorboard is False
    assert cfg.model.num_query_groups is None
    assert cfg.checkpoint.load == "ck/step_9" and cfg.run.output_dir == "2024"
    assert cfg.selection.rho == {"general": 0.5, "domain": 0.8}
    assert cfg.model.rope_scaling == {"factor": 8.0}
    assert cfg.data.branches["general"].paths == ["a.jsonl"]


def test_overrides_apply_on_top_of_file(tmp_path):
    path = write(tmp_path, "c.yaml", "optim: {lr: 1e-4, warmup_steps: 3}\nteachers: [{name: a, branches: [general]}, {name: b, branches: [domain]}]\n")
    cfg = load_config(path, [*RANDOM, "optim.lr=3e-6", "teachers[1].name=bb"])
    assert cfg.optim.lr == 3e-6 and cfg.optim.warmup_steps == 3
    assert [t.name for t in cfg.teachers] == ["a", "bb"]


def test_override_errors():
    problems = problems_of(None, [
        "optim.lrr=1",
        "optim.lr",
        "teachers.5.tp=2",
        "teachers.name=x",
        "optim.lr.x=1",
        "run.seed=[1",
        "parallel.tp=two",
        "logging.tensorboard=maybe",
    ])
    assert "did you mean 'optim.lr'?" in only(problems, "optim.lrr") and "optim.lrr=1" in only(problems, "optim.lrr")
    assert any(p.startswith("override 'optim.lr': missing '='") for p in problems)
    assert "the list teachers has 2 elements" in only(problems, "teachers[5]")
    assert "teachers is a list" in only(problems, "teachers[name]")
    assert "not a mapping" in only(problems, "optim.lr")
    assert "not valid YAML" in only(problems, "run.seed")
    assert "got 'two'" in only(problems, "parallel.tp")  # type errors from overrides read like file errors
    assert "expected true or false" in only(problems, "logging.tensorboard")
    assert len(problems) == 8


# ------------------------------------------------------------------ base:
def test_base_include_deep_merges(tmp_path):
    write(tmp_path, "camopd.yaml", "optim: {lr: 1e-5, warmup_steps: 4}\nscheduler: {pattern: [general, domain, domain]}\nrun: {steps: 9}\n")
    (tmp_path / "exp").mkdir()
    path = write(tmp_path, "exp/child.yaml", "base: ../camopd.yaml\noptim: {lr: 2e-5}\nscheduler: {pattern: [domain, general]}\n")
    cfg = load_config(path, [*RANDOM, "run.seed=5"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.warmup_steps == 4  # mapping merged
    assert cfg.scheduler.pattern == ["domain", "general"]  # list replaced, not concatenated
    assert cfg.run.steps == 9 and cfg.run.seed == 5
    grandchild = write(tmp_path, "exp/gc.yaml", "base: child.yaml\nrun: {steps: 1}\n")
    assert load_config(grandchild, RANDOM).optim.lr == 2e-5 and load_config(grandchild, RANDOM).run.steps == 1


def test_base_cycle_and_missing_base(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\nrun: {seed: 1}\n")
    (line,) = problems_of(a)
    assert line.startswith("base: cycle") and "a.yaml -> " in line and "b.yaml -> " in line and line.count("a.yaml") == 2
    (line,) = problems_of(write(tmp_path, "self.yaml", "base: self.yaml\n"))
    assert "cycle" in line
    (line,) = problems_of(write(tmp_path, "m.yaml", "base: missing.yaml\n"))
    assert line.startswith("base (in ") and "missing.yaml" in line
    assert "expected a path" in problems_of(write(tmp_path, "n.yaml", "base: 3\n"))[0]


# ------------------------------------------------------------------ section and cross-section checks
def test_section_checks():
    problems = problems_of(None, [
        "model.num_query_groups=3", "model.hidden_size=66", "rollout.max_new_tokens=0", "rollout.top_k=-1",
        "selection.rho.general=1.5", "loss.adv_clip=0", "loss.teacher_temperature=-1", "scheduler.mixed_shares.domain=0",
        "data.branches.general.paths=[a]", "data.branches.general.weights=[1,2]", "data.heldout_fraction=1",
    ])
    for key in ["model.num_query_groups", "model.hidden_size", "rollout.max_new_tokens", "rollout.top_k",
                "selection.rho.general", "loss.adv_clip", "loss.teacher_temperature", "scheduler.mixed_shares.domain",
                "data.branches.general.weights", "data.heldout_fraction"]:
        assert "Fix:" in only(problems, key)
    # data.branches is non-empty and lacks 'domain' → also a cross-section error naming the fix
    assert "add data.branches.domain.paths" in only(problems, "scheduler.pattern")
    # mixed_shares set while the mode is alternating: a key with no effect is refused too
    assert "scheduler.mode=alternating ignores it" in only(problems, "scheduler.mixed_shares")
    assert len(problems) == 12


def test_a_key_the_mode_ignores_is_refused():
    """Set to a non-default value, the other scheduler mode's key would do nothing: refused, naming the mode."""
    line = only(problems_of(None, ["scheduler.mixed_shares={general: 3, domain: 1}"]), "scheduler.mixed_shares")
    assert "scheduler.mode=alternating ignores it" in line and "set scheduler.mode: mixed" in line
    line = only(problems_of(None, ["scheduler.mode=mixed", "scheduler.pattern=[general, domain]"]), "scheduler.pattern")
    assert "scheduler.mode=mixed ignores it" in line
    # at their defaults they are fine (every config carries both keys)
    assert load_config(None, [*RANDOM, "scheduler.mode=mixed"]).scheduler.pattern == Config().scheduler.pattern


def test_init_and_architecture_keys():
    """``init: random`` needs the sizes and refuses a checkpoint; a teacher's ``model`` section takes its init."""
    problems = problems_of(data={"model": {"init": "random"}, "teachers": [
        {"name": "general", "init": "random", "branches": ["general"], "checkpoint": "ckpt/g"},
        {"name": "domain", "init": "random", "branches": ["domain"], "model": {"num_layers": 4, "seq_length": 64}}]})
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        assert "init is random" in only(problems, f"model.{key}")
    assert "teachers[0].init is random" in only(problems, "teachers[0].checkpoint")
    assert "the student's model.seq_length=256" in only(problems, "teachers[1].model.seq_length")
    for key in ("hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        assert "init is random" in only(problems, f"teachers[1].model.{key}")
    assert len(problems) == 5 + 1 + 1 + 4
    # with a checkpoint, every architecture field may be left out (read from the checkpoint's manifest)
    cfg = config_from_dict({"model": {"checkpoint": "ckpt/d"}, "teachers": [
        {"name": "general", "branches": ["general"], "checkpoint": "ckpt/g"},
        {"name": "domain", "branches": ["domain"], "checkpoint": "ckpt/d", "model": {"num_layers": 4}}]})
    assert cfg.model.num_layers is None and cfg.teacher_model(1)[0].num_layers == 4
    assert cfg.teachers[1].model.checkpoint == "ckpt/d" and cfg.teachers[1].model.init == "checkpoint"


def test_branch_without_teacher_and_branch_maps():
    problems = problems_of(None, ["scheduler.pattern=[general, medical]"])
    assert "add 'medical' to one teacher's branches" in only(problems, "scheduler.pattern")
    for key in ("selection.rho", "selection.score", "loss.adv_scale"):
        assert f"add {key}.medical" in only(problems, key)
    assert len(problems) == 4
    problems = problems_of(None, ["loss.adv_scale.genral=1.0"])
    assert "did you mean 'general'?" in only(problems, "loss.adv_scale.genral")


def test_teacher_checks():
    problems = problems_of(None, ["teachers[1].name=general", "teachers[1].branches=[general, domain]"])
    assert "a unique name" in only(problems, "teachers[1].name")
    assert "served by one teacher only (teachers[0] serves it)" in only(problems, "teachers[1].branches")
    assert len(problems) == 2
    problems = problems_of(None, ["teachers[0].branches=[]", "teachers[1].branches=[general, domain]"])
    assert problems == [only(problems, "teachers[0].branches")] and "or remove the teacher" in problems[0]
    problems = problems_of(None, ["teachers[0].tp=2", "teachers[1].group=g"])
    assert "student's parallel.tp=1" in only(problems, "teachers[0].tp")
    assert "placement: separate" in only(problems, "teachers[1].group")
    problems = problems_of(None, [
        "teachers[0].placement=separate", "teachers[1].placement=separate",
        "teachers[0].group=pool", "teachers[1].group=pool", "teachers[1].tp=2",
    ])
    assert "the layout of group 'pool'" in only(problems, "teachers[1].tp")
    # a group named after a separate teacher joins that teacher's rank group: same layout
    problems = problems_of(None, [
        "teachers[0].placement=separate", "teachers[1].placement=separate", "teachers[1].group=general",
        "teachers[1].dp=2",
    ])
    assert "the layout of group 'general' (teachers[0].dp=1)" in only(problems, "teachers[1].dp")
    # ... but not the name of a teacher placed elsewhere
    problems = problems_of(None, ["teachers[1].placement=separate", "teachers[1].group=general"])
    assert "not the name of teachers[0] (placed on the student's ranks)" in only(problems, "teachers[1].group")
    # 'student' names the student's rank group
    problems = problems_of(None, ["teachers[0].name=student", "teachers[1].placement=separate", "teachers[1].group=student"])
    assert "rename the teacher" in only(problems, "teachers[0].name")
    assert "rename the group" in only(problems, "teachers[1].group")
    assert len(problems) == 2


def test_tp_must_divide_heads_groups_and_vocab():
    problems = problems_of(None, ["parallel.tp=8"])  # heads = 4
    assert "a divisor of model.num_attention_heads=4" in only(problems, "parallel.tp")
    problems = problems_of(None, ["model.num_query_groups=2", "parallel.tp=4"])
    assert "model.num_query_groups=2" in only(problems, "parallel.tp")
    problems = problems_of(None, ["model.vocab_pad_multiple=1", "model.vocab_size=130", "parallel.tp=4"])
    line = only(problems, "parallel.tp")
    assert "model.padded_vocab_size=130" in line and "multiple of 4" in line
    problems = problems_of(None, ["teachers[0].placement=separate", "teachers[0].tp=8", "parallel.pp=3"])
    assert "num_attention_heads=4" in only(problems, "teachers[0].tp")
    assert "model.num_layers=2" in only(problems, "parallel.pp")
    # one line per key, naming every size it does not divide (the SwiGLU width too)
    problems = problems_of(None, ["model.ffn_hidden_size=250", "model.num_query_groups=2", "parallel.tp=4"])
    line = only(problems, "parallel.tp")
    assert "model.num_query_groups=2, model.ffn_hidden_size=250" in line and "divides them" in line
    assert len(problems) == 1
    # a separate teacher at TP 4 (divides 4 heads and 128) is fine
    assert load_config(None, [*RANDOM, "teachers[0].placement=separate", "teachers[0].tp=4"]).teachers[0].tp == 4


def test_topk_kl_is_not_a_key():
    # the top-k reverse-KL variant is not offered (docs/algorithm.md §2): its old key is an unknown key
    assert "loss.topk_kl: unknown key" in only(problems_of(None, ["loss.topk_kl=0"]), "loss.topk_kl")
    assert load_config(None, RANDOM).loss.teacher_temperature is None


def test_coherence_samples_is_bounded():
    assert "at most 64" in only(problems_of(None, ["logging.coherence_samples=65"]), "logging.coherence_samples")
    assert load_config(None, [*RANDOM, "logging.coherence_samples=64"]).logging.coherence_samples == 64


def test_per_branch_moments_need_single_branch_steps():
    line = only(problems_of(None, ["optim.branch_state=per_branch", "scheduler.mode=mixed"]), "optim.branch_state")
    assert "scheduler.mode='mixed'" in line and "set optim.branch_state: shared, or scheduler.mode: alternating" in line
    assert "'shared'" in only(problems_of(None, ["optim.branch_state=per-branch"]), "optim.branch_state")
    assert load_config(None, [*RANDOM, "optim.branch_state=per_branch"]).optim.branch_state == "per_branch"
    assert Config().optim.branch_state == "shared"


def test_dict_api_rejects_like_yaml():
    problems = problems_of(data={"model": {"hidden_sise": 64}, "teachers": [{"name": "general"}]})
    assert "did you mean 'model.hidden_size'?" in only(problems, "model.hidden_sise")
    assert "teachers[0].branches" in " ".join(problems)
    assert "expected a mapping" in problems_of(data=[1])[0]  # type: ignore[arg-type]


def test_every_problem_names_a_key():
    """Every line starts with a dotted key (or the override / file it is about) followed by ':'."""
    problems = problems_of(None, ["model.arch=gpt", "parallel.tp=0", "rollout.top_p=2", "optim.min_lr=1", "eval.num_prompts=0"])
    for p in problems:
        head = p.split(":", 1)[0]
        assert head in {"model.arch", "parallel.tp", "rollout.top_p", "optim.min_lr", "eval.num_prompts"}, p
        assert "Fix:" in p
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(Config()))) == config_to_dict(Config())
