"""What a user sees on the console: input errors as one line per failing rank with the family's exit
status (torchrun's root cause is the student rank that failed), and no third-party warning noise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from camopd_megatron import cli

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "camopd_megatron.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def _tiny_checkpoints(rank: int, world_size: int, out: str) -> None:
    from camopd_megatron.demo.tiny_checkpoints import write_tiny_checkpoints

    write_tiny_checkpoints(out)


def test_missing_tokenizer_is_reported_by_every_rank_before_any_model(tmp_path):
    """Student on rank 0, two separate teachers on ranks 1 and 2; data.tokenizer names no file.

    The inputs are checked on every rank before any model is built (checkpoint/inputs.py), so every
    rank prints one ``camopd-train: rank r/3: ...`` headline with the ``data.tokenizer`` problem under
    it, no traceback, and exits with the config-error status; torchrun's root cause is one of them.
    """
    from camopd_megatron.testing.multiproc import run_on_ranks

    ckpt = tmp_path / "ckpt"
    run_on_ranks(_tiny_checkpoints, 1, args=(str(ckpt),), timeout_s=300)
    missing = tmp_path / "no_tokenizer.json"
    r = _torchrun(3, "--config", str(ROOT / "examples/configs/demo_cpu_4rank.yaml"), "parallel.tp=1",
                  f"model.checkpoint={ckpt / 'domain'}", f"teachers[0].checkpoint={ckpt / 'general'}",
                  f"teachers[1].checkpoint={ckpt / 'domain'}",
                  f"run.output_dir={tmp_path / 'run'}", f"data.tokenizer={missing}", "logging.progress_bar=false")
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    ours = [ln for ln in text.splitlines() if ln.startswith("camopd-train:")]
    failed = {int(m.group(1)) for ln in ours if (m := re.match(r"camopd-train: rank (\d)/3: ", ln))}
    assert failed == {0, 1, 2} and len(ours) == 3, text[-3000:]
    problems = [ln for ln in text.splitlines() if ln.strip().startswith("- data.tokenizer")]
    assert len(problems) == 3 and all(str(missing) in ln for ln in problems), text[-3000:]
    assert "StudentAborted" not in text, text[-3000:]
    assert not re.search(r"^\[rank\d\]: Traceback", text, re.M), text[-3000:]  # no worker traceback
    root = text[text.index("Root Cause"):]
    m = re.search(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", root)
    assert m and int(m.group(1)) in failed and int(m.group(2)) == cli.EXIT_CONFIG_ERROR, root


def test_input_error_families_have_their_exit_status(monkeypatch, capsys):
    """Each user-input family prints one line (kind + message, no traceback) and returns its status;
    a teacher rank stopped by its student returns 0 silently; anything else keeps its traceback."""
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.data import DataError
    from camopd_megatron.deps import MissingDependencyError
    from camopd_megatron.teachers import StudentAborted
    from tests.test_config import RANDOM  # a default config that validates: random weights chosen

    class FakeTrainer:
        error: BaseException

        def train(self, cfg):
            raise self.error

    fake = FakeTrainer()
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    cases = [
        (DataError("data.tokenizer: 'x' does not exist"), cli.EXIT_DATA_ERROR, "DataError: data.tokenizer"),
        (CheckpointError("model.checkpoint: 'c' has no camopd.json"), cli.EXIT_CHECKPOINT_ERROR, "CheckpointError: "),
        (MissingDependencyError("transformer-engine is not installed"), cli.EXIT_MISSING_TRAINER,
         "MissingDependencyError: "),
    ]
    for error, status, piece in cases:
        fake.error = error
        assert cli.main([*RANDOM, "run.steps=1"]) == status
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"camopd-train: rank 3/4: {piece}"), err
    fake.error = StudentAborted("role 'general' rank 3: the student aborted: DataError: ...")
    assert cli.main([*RANDOM, "run.steps=1"]) == 0
    assert capsys.readouterr().err == ""
    fake.error = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        cli.main([*RANDOM, "run.steps=1"])
    assert set(cli.EXIT_CODES) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_checked_third_party_messages_only_at_debug(level, tmp_path):
    """A model build, a checkpoint save and a load on one rank: at INFO none of the checked third-party
    messages is shown; at DEBUG each of them is (so every pattern still matches megatron/torch's text).
    megatron's "full scope is deprecated" is gone at the source (models/gpt.py sets cuda_graph_modules)."""
    from camopd_megatron.testing.multiproc import run_on_ranks
    from camopd_megatron.utils.logging import QUIETED_LOGS, QUIETED_WARNINGS
    from tests import console_workers

    seen = run_on_ranks(console_workers.third_party_messages, 1, args=(level, str(tmp_path / "ckpt")),
                        timeout_s=300)[0]
    checked = [(f"log {c.source}: ", c.text) for c in QUIETED_LOGS] + [("warning ", c.text) for c in QUIETED_WARNINGS]

    def shown(text: str) -> list[str]:
        return [m for m in seen if re.search(text, m, re.I)]

    assert not shown("full scope is deprecated"), seen
    if level == "INFO":
        assert not [m for _, text in checked for m in shown(text)], seen
    else:
        assert all(shown(text) for _, text in checked), (seen, checked)
