"""camopd-train: --help, --dry-run, config / layout errors (exit 2, no traceback), missing trainer."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from camopd_megatron import cli

CONFIG_8B = textwrap.dedent(
    """
    model: {init: random, num_layers: 32, hidden_size: 4096, num_attention_heads: 32, num_query_groups: 8,
            ffn_hidden_size: 14336, vocab_size: 128256, seq_length: 4096}
    parallel: {tp: 4, use_distributed_optimizer: true}
    teachers:
      - {name: general, init: random, branches: [general], placement: separate, tp: 2}
      - {name: domain, init: random, branches: [domain], placement: separate, tp: 2}
    data: {max_prompt_tokens: 1024}
    rollout: {max_new_tokens: 3072, micro_batch_size: 8}
    optim: {micro_batch_size: 1}
    """
)


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """cli.main configures the ``camopd_megatron`` logger; put it back for the other tests."""
    import logging

    log = logging.getLogger("camopd_megatron")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def config_8b(tmp_path):
    path = tmp_path / "8b.yaml"
    path.write_text(CONFIG_8B)
    return str(path)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("camopd-train", "--config", "--dry-run", "--world-size", "--log-level", "key=value"):
        assert flag in out


def test_dry_run_prints_plan(config_8b, capsys):
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "32", "optim.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    for piece in ("world 32 ranks, 3 role(s)", "student  ranks 0-27", "tp4×pp1×dp7", "ranks 28-29", "ranks 30-31",
                  "optimizer", "kv cache", "23.67"):
        assert piece in out, piece
    # overrides after the flags work too (intermixed), and change the plan
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "512", "parallel.sequence_parallel=true"]) == 0
    assert "tp4×pp1×dp127" in capsys.readouterr().out


def test_bad_key_exits_2_naming_it(config_8b, capsys):
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "32", "optim.lrr=1e-5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Traceback" not in err


def test_layout_error_exits_2(config_8b, capsys):
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "parallel.dp" in err and "world size 30" in err


def test_dry_run_checks_fp8_settings(config_8b, capsys):
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "32", "precision.fp8=hybrid",
                     "model.transformer_impl=local"]) == 2
    assert "model.transformer_impl" in capsys.readouterr().err
    assert cli.main(["--config", config_8b, "--dry-run", "--world-size", "32", "precision.fp8=hybrid"]) == 0
    assert "fp8 hybrid/delayed" in capsys.readouterr().out


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_missing_trainer_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_TRAINER_MODULE", "camopd_megatron._no_such_trainer")
    random = ["model.init=random", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.ffn_hidden_size=256", "model.vocab_size=128", "teachers[0].init=random", "teachers[1].init=random"]
    assert cli.main(random) == cli.EXIT_MISSING_TRAINER
    assert "camopd_megatron._no_such_trainer" in capsys.readouterr().err


def test_process_exit_code_without_traceback(config_8b):
    """The real entry point in a fresh interpreter: exit status 2 and a one-problem message."""
    r = subprocess.run(
        [sys.executable, "-m", "camopd_megatron.cli", "--config", config_8b, "--dry-run", "model.hidden_size=-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "model.hidden_size" in r.stderr and "Traceback" not in r.stderr
