"""SIGKILL during a checkpoint save: the previous checkpoint stays intact and resume works.

Runs the real entry point (``python -m torch.distributed.run ... camopd_megatron.cli``), kills the
whole process group while the step-4 save is in flight (its ``step_00000004.tmp`` directory exists
and has no manifest), then resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from camopd_megatron.checkpoint.manager import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "run.seed=5", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.ffn_hidden_size=128", "model.seq_length=96", "rollout.prompts_per_step=4", "rollout.max_new_tokens=6",
    "data.max_prompt_tokens=40", "optim.lr=1e-3", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
    "logging.progress_bar=false",
]


def _launch(out: Path, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "camopd_megatron.cli", "--config", str(REPO / "examples/configs/camopd.yaml"),
           f"run.output_dir={out}", f"run.steps={steps}", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal torchrun and every descendant (its workers may sit in their own process groups)."""
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout}s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    _wait(_launch(out, steps=2), 300)  # a complete step-2 checkpoint
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000002" / "camopd.json").is_file()

    proc = _launch(out, steps=60)  # resumes at 2 and saves every 2 steps
    caught = None
    for step in range(4, 61, 2):  # freeze the job the moment a save directory appears; kill it mid-save
        tmp = ckpts / f"step_{step:08d}.tmp"
        deadline = time.time() + 300
        while not tmp.exists() and not (ckpts / f"step_{step:08d}").exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, f"the step-{step} save never started"
            time.sleep(0.005)
        _signal_tree(proc, signal.SIGSTOP)
        time.sleep(0.3)  # signal delivery is asynchronous: look only once the job is really frozen
        if tmp.exists() and not (ckpts / f"step_{step:08d}").exists():
            caught = step
            break
        _signal_tree(proc, signal.SIGCONT)  # that save had already finished: try the next one
    _signal_tree(proc, signal.SIGKILL)
    proc.communicate()
    assert caught is not None, "never caught a save in flight"
    previous = ckpts / f"step_{caught - 2:08d}"
    tmp = ckpts / f"step_{caught:08d}.tmp"
    assert tmp.exists() and not (tmp / "camopd.json").exists()

    manager = CheckpointManager(ckpts)
    assert manager.latest() == previous
    manifest = json.loads((previous / "camopd.json").read_text())
    assert manifest["step"] == caught - 2

    log = _wait(_launch(out, steps=caught), 300)  # resume from the previous one; the half-written save is ignored
    assert manager.latest() == ckpts / f"step_{caught:08d}"
    assert not tmp.exists()
    assert "resumed from" in log and previous.name in log
