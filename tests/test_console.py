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
def test_missing_tokenizer_is_one_line_and_the_student_is_the_root_cause(tmp_path):
    """Student on rank 0, two separate teachers on ranks 1 and 2; data.tokenizer names no file.

    The student prints one ``camopd-train: rank 0/3: DataError: data.tokenizer ...`` line and exits
    with EXIT_DATA_ERROR; the teachers stop on the student's abort without a traceback and exit 0, so
    torchrun's root cause is the student's rank with status 5.
    """
    missing = tmp_path / "no_tokenizer.json"
    r = _torchrun(3, "--config", str(ROOT / "examples/configs/demo_cpu_4rank.yaml"), "parallel.tp=1",
                  f"run.output_dir={tmp_path / 'run'}", f"data.tokenizer={missing}", "logging.progress_bar=false")
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    ours = [ln for ln in text.splitlines() if ln.startswith("camopd-train:")]
    # one line per rank that hit the error (here the student; early checks on every rank would add the others)
    failed = {int(m.group(1)) for ln in ours if (m := re.match(r"camopd-train: rank (\d)/3: DataError: data\.tokenizer:", ln))}
    assert len(failed) == len(ours) and 0 in failed and all(str(missing) in ln for ln in ours), text[-3000:]
    assert "StudentAborted" not in text, text[-3000:]
    assert not re.search(r"^\[rank\d\]: Traceback", text, re.M), text[-3000:]  # no worker traceback
    root = text[text.index("Root Cause"):]
    m = re.search(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", root)
    assert m and int(m.group(1)) in failed and int(m.group(2)) == cli.EXIT_DATA_ERROR, root
    # a teacher that did not hit the error itself exits 0 on the student's abort: it is not listed as a
    # failure, or only as stopped by torchrun (SIGTERM) after the student's failure
    failures = text[text.index("Failures:"):text.index("Root Cause")] if "Failures:" in text else ""
    for rank in {1, 2} - failed:
        m = re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\n\s*exitcode\s*: (-?\d+)", failures)
        assert m is None or int(m.group(1)) == -15, failures


def test_input_error_families_have_their_exit_status(monkeypatch, capsys):
    """Each user-input family prints one line (kind + message, no traceback) and returns its status;
    a teacher rank stopped by its student returns 0 silently; anything else keeps its traceback."""
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.data import DataError
    from camopd_megatron.deps import MissingDependencyError
    from camopd_megatron.teachers import StudentAborted

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
        assert cli.main(["run.steps=1"]) == status
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"camopd-train: rank 3/4: {piece}"), err
    fake.error = StudentAborted("role 'general' rank 3: the student aborted: DataError: ...")
    assert cli.main(["run.steps=1"]) == 0
    assert capsys.readouterr().err == ""
    fake.error = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["run.steps=1"])
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
