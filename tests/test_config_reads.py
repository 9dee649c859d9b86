"""A config key that is set but has no effect is a bug: record which keys a short run of every preset
(and of the CPU demo's stage-3 config) reads, and require every key to be read or listed below with why.

The recorder patches ``__getattribute__`` of every config section class for the run and records the
reads made by run-time code (validation, dumping and ``dataclasses`` helpers copying a section are
not an effect). Keys are named by section and field (``model.num_layers``,
``teachers[].init``, ``data.branches.*.paths``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from camopd_megatron.testing.multiproc import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("camopd", "vanilla_mopd", "no_selection", "no_selection_no_scaling", "no_decoupling")

CONDITIONAL = {
    "eval.num_prompts": "eval.interval > 0 with teacher_scored (the demo evaluates with its own hook)",
    "eval.max_new_tokens": "eval.interval > 0",
    "eval.teacher_scored": "eval.interval > 0",
    "logging.diagnostics_prompts": "logging.diagnostics_interval > 0",
    "precision.fp8_recipe": "precision.fp8 set (GPU with Transformer Engine)",
    "teachers[].tp": "placement: separate (a colocated teacher has the student's layout; validation refuses another)",
    "teachers[].pp": "placement: separate (as teachers[].tp)",
    "teachers[].dp": "placement: separate (as teachers[].tp)",
    "teachers[].ep": "placement: separate (as teachers[].tp)",
    "teachers[].etp": "placement: separate (as teachers[].tp)",
    "teachers[].group": "placement: separate (validation refuses a group on a colocated teacher)",
    "data.branches.*.paths": "prompt files (data.branches empty = synthetic prompts; the demo run reads them)",
    "data.branches.*.weights": "prompt files, as data.branches.*.paths",
    "data.heldout_fraction": "prompt files, as data.branches.*.paths",
    "data.on_bad_line": "prompt files, as data.branches.*.paths",
    "data.shuffle": "prompt files, as data.branches.*.paths",
    "loss.max_bad_teacher_steps": "a teacher returns non-finite log-probs (tests/test_trainer.py, the NaN teacher)",
    "logging.coherence_samples": "logging.diagnostics_interval > 0 (tests/test_trainer.py, the coherence probe)",
    "model.recompute_method": "model.recompute: full (tests/test_recompute.py)",
    "model.recompute_num_layers": "model.recompute: full (tests/test_recompute.py)",
}
"""Keys read only under a setting these short CPU runs do not use, with that setting. (A key read in
every run is not listed: the test refuses a stale entry. A key that one mode reads but another ignores,
like ``scheduler.mixed_shares`` in alternating mode, is refused by config validation when set to a
non-default value: ``tests/test_config.py::test_a_key_the_mode_ignores_is_refused``.)"""


def _section_classes():
    from camopd_megatron.config import sections
    from camopd_megatron.config.root import Config

    names = {"RunConfig": "run", "ModelConfig": "model", "ParallelConfig": "parallel", "TeacherConfig": "teachers[]",
             "BranchDataConfig": "data.branches.*", "DataConfig": "data", "RolloutConfig": "rollout",
             "SchedulerConfig": "scheduler", "SelectionConfig": "selection", "LossConfig": "loss",
             "OptimConfig": "optim", "PrecisionConfig": "precision", "CheckpointConfig": "checkpoint",
             "EvalConfig": "eval", "LoggingConfig": "logging"}
    classes = {getattr(sections, n): key for n, key in names.items()}
    classes[Config] = ""
    return classes


def all_keys() -> set[str]:
    """Every leaf key of the config tree, named as the recorder names them."""
    out = set()
    for cls, key in _section_classes().items():
        if key:
            out |= {f"{key}.{f.name}" for f in dataclasses.fields(cls)}
    return out


def _record_worker(rank: int, world_size: int, cfgs: list) -> list:
    import sys

    import camopd_megatron.config as config_pkg
    from camopd_megatron.trainer import train

    config_dir = str(Path(config_pkg.__file__).parent)
    not_an_effect = {"validate", "to_plain", "config_to_dict", "dump_config"}  # checking or copying a config

    def counts(frame) -> bool:
        """A read counts when the first frame outside the config package is run-time code (not
        dataclasses / copy), and no config frame on the way is validation or dumping (properties and
        helpers of the config, like ``padded_vocab_size``, read on behalf of their caller)."""
        while frame is not None and frame.f_code.co_filename.startswith(config_dir):
            if frame.f_code.co_name in not_an_effect:
                return False
            frame = frame.f_back
        return frame is not None and not frame.f_code.co_filename.endswith((dataclasses.__file__, "copy.py"))
    runs = []
    for cfg in cfgs:
        reads: set[str] = set()
        saved = {}
        for cls, key in _section_classes().items():
            fields = {f.name for f in dataclasses.fields(cls)}
            prefix = key + "." if key else ""

            def getattribute(self, name, _fields=fields, _prefix=prefix, _orig=object.__getattribute__):
                if name in _fields and _prefix + name not in reads and counts(sys._getframe(1)):
                    reads.add(_prefix + name)
                return _orig(self, name)

            saved[cls] = cls.__dict__.get("__getattribute__")
            cls.__getattribute__ = getattribute
        try:
            train(cfg)
        finally:
            for cls, orig in saved.items():
                if orig is None:
                    del cls.__getattribute__
                else:
                    cls.__getattribute__ = orig
        runs.append(sorted(reads))
    return runs


def _tiny(ckpts: dict[str, str], out: Path, preset: str):
    from camopd_megatron.config import config_from_dict, load_config
    from camopd_megatron.config.api import config_to_dict
    from camopd_megatron.config.loader import deep_merge

    base = config_to_dict(load_config(str(REPO / "examples/configs" / f"{preset}.yaml")))
    over = {"run": {"steps": 1, "output_dir": str(out), "log_level": "WARNING"},
            "model": {"checkpoint": ckpts["domain"], "seq_length": 24},
            "teachers": [{"name": "general", "branches": ["general"], "checkpoint": ckpts["general"]},
                         {"name": "domain", "branches": ["domain"], "checkpoint": ckpts["domain"]}],
            "rollout": {"prompts_per_step": 4, "max_new_tokens": 2, "micro_batch_size": 4},
            "data": {"max_prompt_tokens": 20}, "optim": {"micro_batch_size": 4},
            "checkpoint": {"save_interval": 0, "resume": "never"}, "logging": {"progress_bar": False}}
    return config_from_dict(deep_merge(base, over))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    from tests.test_inputs import _write_checkpoints

    root = tmp_path_factory.mktemp("ckpt")
    run_on_ranks(_write_checkpoints, 1, args=(str(root),), timeout_s=300)
    return {name: str(root / name) for name in ("general", "domain")}


def test_every_key_is_read_or_excused(ckpts, tmp_path):
    from camopd_megatron.demo.study import StudySettings, stage3_config
    from camopd_megatron.demo.teachers import TeacherArtifacts

    cfgs = [_tiny(ckpts, tmp_path / p, p) for p in PRESETS]
    art = TeacherArtifacts(general_ckpt=ckpts["general"], domain_ckpt=ckpts["domain"], metrics={},
                           model={"seq_length": 24, "transformer_impl": "local"})
    demo = stage3_config("camopd", 0, art, StudySettings(steps=1, eval_interval=1, overrides={
        "rollout": {"prompts_per_step": 4, "micro_batch_size": 4}, "optim": {"micro_batch_size": 4}}),
        tmp_path / "demo", {b: str(_prompts(tmp_path, b)) for b in ("general", "domain")})
    names = [*PRESETS, "demo"]
    (runs,) = run_on_ranks(_record_worker, 1, args=([*cfgs, demo],), timeout_s=900)
    excused = set(CONDITIONAL)
    assert excused <= all_keys(), excused - all_keys()
    unread = {name: sorted(all_keys() - set(reads) - excused) for name, reads in zip(names, runs)}
    assert not any(unread.values()), "\n".join(f"{name}: {keys}" for name, keys in unread.items())
    # every excuse is needed by some run (a stale entry would hide a key that later loses its effect)
    stale = [k for k in sorted(excused) if all(k in r for r in runs)]
    assert not stale, "excused but read in every run: " + ", ".join(stale)


def _prompts(tmp_path: Path, branch: str) -> Path:
    p = tmp_path / f"{branch}.jsonl"
    p.write_text("".join(f'{{"prompt": "{branch} {i}"}}\n' for i in range(8)))
    return p
