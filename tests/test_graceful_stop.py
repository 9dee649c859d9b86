"""A real SIGTERM / SIGUSR1 to a torchrun run with separate teachers: every rank agrees to stop after
the current step, the student saves it, every rank says so, and the resumed run matches an
uninterrupted one.

``examples/launch/single_node.sh`` with 4 processes: the student at DP = 2 on ranks 0-1 (two replicas
send each teacher the end of every step), the general and the domain teacher on ranks 2 and 3. Five
launches of 20 steps in all: the uninterrupted run, then one chain in one output directory:

1. SIGTERM to the torchrun agent (it forwards the signal to its workers),
2. resumed; SIGUSR1 to the domain teacher's process only (no student rank sees a signal),
3. resumed; SIGUSR1 to the agent (forwarded because the script passes ``--signals-to-handle``),
4. resumed to the end.

Each stopped run saved the step it stopped after and the next one resumed there; the chain's per-step
losses and its final model and optimizer state equal the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A signal is sent once a run has logged its first step. Steps take ~0.04 s here, so the run may finish one or two
# more before the signal reaches every worker (CI saw 2): 20 steps leave each of the three stops ample room
# before the end, where a run ends normally and says no "stopping after".
STEPS = 20
OVERRIDES = [
    "parallel.tp=1", "rollout.prompts_per_step=4", "rollout.max_new_tokens=6", "data.max_prompt_tokens=40",
    "eval.interval=0", "checkpoint.save_interval=0", "checkpoint.keep_last=0", "logging.progress_bar=false",
    "logging.log_interval=1", f"run.steps={STEPS}",
]
TEACHERS = {2: "general", 3: "domain"}


class _Run:
    """One ``single_node.sh`` launch whose output is read as it comes."""

    def __init__(self, out: Path, ckpt: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
        env.update(NPROC_PER_NODE="4", TORCHRUN=f"{sys.executable} -m torch.distributed.run", OMP_NUM_THREADS="1",
                   SHUTDOWN_TIMEOUT_S="300")
        cmd = [str(ROOT / "examples/launch/single_node.sh"), str(ROOT / "examples/configs/demo_cpu_4rank.yaml"),
               f"run.output_dir={out}", *OVERRIDES]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,  # the script execs torchrun: this pid is the agent
                                     cwd=ckpt.parent)  # the config names ckpt/domain and ckpt/general
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not re.search(pattern, self.text, re.M):
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise AssertionError(f"never saw {pattern!r}:\n{self.text[-4000:]}")
            time.sleep(0.05)

    def worker_pid(self, rank: int) -> int:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "camopd_megatron.cli" in " ".join(p.cmdline()):
                    return p.pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no worker process of rank {rank}:\n{self.text[-3000:]}")

    def finish(self, timeout: float = 400) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not finish in {timeout}s:\n{self.text[-4000:]}")
        self._reader.join(10)
        return self.text

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _stopped(text: str, reason: str, start: int) -> int:
    """The step every rank says it stopped after (they agree), checked against each rank's line."""
    student = {int(r): int(s) for r, s in re.findall(
        rf"\[r(\d)\] WARNING \S+: rank \1: stopping after step (\d+) of {STEPS} \({reason}\); saved \S+step_0*\2,", text)}
    teacher = {int(r): int(s) for r, s in re.findall(
        rf"\[r(\d)\] WARNING \S+: role '?\w+'? rank \1: stopping after step (\d+) \({reason}\); the student saved", text)}
    assert sorted(student) == [0, 1] and sorted(teacher) == [2, 3], text[-4000:]
    (step,) = set(student.values()) | set(teacher.values())
    assert start < step < STEPS, (start, step)
    return step


def _losses(tb: Path) -> dict[int, tuple[float, float]]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out: dict[int, dict[str, float]] = {}
    for f in sorted(tb.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag in ("train/loss", "grad_norm"):
                    out.setdefault(event.step, {})[v.tag] = v.simple_value
    return {s: (d["train/loss"], d["grad_norm"]) for s, d in sorted(out.items())}


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model and optimizer), read whole in this process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt))
    md = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
          if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        load(sd, storage_reader=reader, no_dist=True)
    return sd


def _tiny_checkpoints(rank: int, world_size: int, out: str) -> None:
    from camopd_megatron.demo.tiny_checkpoints import write_tiny_checkpoints

    write_tiny_checkpoints(out)


@pytest.mark.slow
def test_signals_stop_every_rank_after_the_step_and_the_resume_matches(tmp_path):
    from camopd_megatron.testing.multiproc import run_on_ranks

    ckpt = tmp_path / "ckpt"  # the documented first command (python -m camopd_megatron.demo.tiny_checkpoints ckpt)
    run_on_ranks(_tiny_checkpoints, 1, args=(str(ckpt),), timeout_s=300)
    base = tmp_path / "base"
    _Run(base, ckpt).finish()
    assert (base / "checkpoints" / f"step_{STEPS:08d}" / "camopd.json").is_file()

    out = tmp_path / "chain"
    ckpts = out / "checkpoints"
    start = 0
    for how, reason in (("agent", "SIGTERM"), ("teacher", "SIGUSR1"), ("agent", "SIGUSR1")):
        run = _Run(out, ckpt)
        run.wait_for(rf"\[r0\] INFO \S+: step {start + 1} \[")  # mid-run, the step-end agreement still to come
        if how == "agent":
            run.proc.send_signal(getattr(signal, reason))
        else:
            os.kill(run.worker_pid(3), getattr(signal, reason))
        text = run.finish()
        # no worker raised; the agent itself re-raises the signal it forwarded (torchrun's SignalException)
        tracebacks = text.count("Traceback (most recent call last)")
        assert tracebacks == 0 or (how == "agent" and tracebacks == 1 and "SignalException" in text), text[-4000:]
        if start:
            assert f"resumed from {ckpts / f'step_{start:08d}'} (step {start})" in text, text[-4000:]
        step = _stopped(text, reason, start)
        assert (ckpts / "latest").read_text().strip() == f"step_{step:08d}"
        assert (ckpts / f"step_{step:08d}" / "camopd.json").is_file()
        if how == "teacher":  # the agent saw nothing: every worker returned normally
            assert run.proc.returncode == 0, text[-4000:]
        start = step
    text = _Run(out, ckpt).finish()
    assert f"resumed from {ckpts / f'step_{start:08d}'} (step {start})" in text, text[-4000:]

    assert _losses(out / "tensorboard") == _losses(base / "tensorboard")
    assert sorted(_losses(base / "tensorboard")) == list(range(1, STEPS + 1))
    a, b = (_tensors(d / "checkpoints" / f"step_{STEPS:08d}") for d in (out, base))
    assert sorted(a) == sorted(b) and len(a) > 10, sorted(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
