"""SIGKILL during a checkpoint save: the previous checkpoint stays intact and resume works; SIGUSR1 and
run.exit_duration_min stop after the step with a save.

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
OVERRIDES = [  # random weights chosen explicitly (the preset names converted checkpoints)
    "model.init=random", "model.checkpoint=null", "model.vocab_size=128", "teachers[0].init=random",
    "teachers[0].checkpoint=null", "teachers[1].init=random", "teachers[1].checkpoint=null",
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


def _stop_worker(rank: int, world_size: int, root: str) -> dict:
    import signal as sig

    from camopd_megatron.trainer import train
    from tests.test_trainer import _write_general_teacher, tiny_cfg

    general = f"{root}/general"
    _write_general_teacher(rank, world_size, general)
    extra = {"eval": {"interval": 1, "teacher_scored": False}, "checkpoint": {"save_interval": 0}}

    def signal_at_2(step, model, pgc):
        if step == 2:
            os.kill(os.getpid(), sig.SIGUSR1)  # as torchrun forwards it: arrives in the middle of the loop
        return {}

    out = {}
    for name, steps, fn, more in (("signal", 4, signal_at_2, {}), ("resumed", 4, None, {}),
                                  ("time", 4, None, {"run": {"exit_duration_min": 1e-9}})):
        cfg = tiny_cfg(f"{root}/{'time' if name == 'time' else 'run'}", general, steps=steps, extra={**extra, **more})
        res = train(cfg, eval_fn=fn)
        out[name] = {"stopped": res.stopped, "done": res.steps_done, "ckpt": res.last_checkpoint,
                     "steps": [int(h["step"]) for h in res.history if "phase" in h]}
    return out


def test_signal_and_time_limit_stop_after_the_step_with_a_save(tmp_path):
    """SIGUSR1 mid-run: the step finishes, a checkpoint is saved, the run returns; the next run resumes
    there. run.exit_duration_min stops the same way."""
    from camopd_megatron.testing.multiproc import run_on_ranks

    (out,) = run_on_ranks(_stop_worker, 1, args=(str(tmp_path),), timeout_s=300)
    assert out["signal"] == {"stopped": "SIGUSR1", "done": 2, "ckpt": str(tmp_path / "run/checkpoints/step_00000002"),
                             "steps": [1, 2]}
    assert out["resumed"]["stopped"] is None and out["resumed"]["steps"] == [3, 4]
    assert out["time"]["stopped"] == "run.exit_duration_min" and out["time"]["steps"] == [1]
    assert out["time"]["ckpt"].endswith("step_00000001")
