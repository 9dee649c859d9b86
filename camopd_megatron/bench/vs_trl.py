"""Ours vs TRL's on-policy ``DistillationTrainer``, back to back and alternating, ratio per setting.

    python -m camopd_megatron.bench.vs_trl                                  # small + large
    python -m camopd_megatron.bench.vs_trl --sizes qwen small large         # + the Qwen vocabulary (151,936)
    python -m camopd_megatron.bench.vs_trl --sizes small --reps 3 --steps-small 10 --peer-dir PEER --trl-python PY

The peer is a checkout of the TRL baseline (``run_peer.py`` and its README) outside this repository:
``--peer-dir`` (default ``../shared/peers/trl`` next to the repository root), run with the python of
the venv its README sets up (``--trl-python``, default ``<peer-dir>/.venv-trl/bin/python``).

For each size and repetition it runs, as fresh processes and one at a time (the 2 cores are
shared), ``<peer-dir>/run_peer.py --arch llama --threads 2`` (the peer, Llama-style so
both sides have no QKV bias) then ``python -m camopd_megatron.bench.step --json`` (ours, single
teacher, one process), alternating the order every repetition so a drift in machine load hits both
sides alike. ``--camopd`` adds our two-teacher ``camopd`` preset as an extra (unpaired) row.
Ratios are medians over the repetitions of the paired per-repetition ratio of end-to-end train
tokens/s (higher is better for us) and of peak RSS (ours / TRL, lower is better for us). Our rows also
give the steady stage medians and the train stage's FLOP floor at the matmul rate measured in the same
process (``bench.step``'s ``floor``). Both sides run with the same thread and allocator environment.
``--jsonl`` appends every raw record to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
"""The repository root (this file is ``camopd_megatron/bench/vs_trl.py``)."""
DEFAULT_PEER_DIR = REPO.parent / "shared" / "peers" / "trl"
"""Where the peer checkout lives by default: ``../shared/peers/trl`` relative to the repository root."""
PEER_ARGS = {
    "small": [],
    "large": ["--hidden", "512", "--layers", "8", "--heads", "8", "--kv-heads", "4", "--vocab", "32000",
              "--max-new-tokens", "128"],
    "qwen": ["--vocab", "151936"],
}
"""run_peer.py arguments of each size (its README's LARGE; ``qwen`` is small's model with the Qwen-family
vocabulary); our sizes are ``bench.step.SIZES``."""


def _env(threads: int) -> dict[str, str]:
    # the same torch settings on both sides: threads, and huge pages behind torch's large CPU allocations
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "THP_MEM_ALLOC_ENABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in the output:\n{stdout[-2000:]}")


def run_peer(trl_python: str, peer_dir: Path, size: str, steps: int, threads: int, output_dir: str) -> dict[str, Any]:
    """One TRL run (a fresh process) of ``peer_dir/run_peer.py`` writing to ``output_dir``; its JSON record."""
    cmd = [trl_python, str(peer_dir / "run_peer.py"), "--trainer", "distill", "--arch", "llama", "--threads",
           str(threads), "--steps", str(steps), "--output-dir", output_dir, *PEER_ARGS[size]]
    out = subprocess.run(cmd, env=_env(threads), check=True, capture_output=True, text=True)
    return _last_json(out.stdout)


def run_ours(size: str, steps: int, threads: int, teachers: int = 1, student_logprobs: str = "recompute") -> dict[str, Any]:
    """One run of :mod:`camopd_megatron.bench.step` (a fresh process); its JSON record."""
    cmd = [sys.executable, "-m", "camopd_megatron.bench.step", "--json", "--size", size, "--steps", str(steps),
           "--threads", str(threads), "--teachers", str(teachers), "--student-logprobs", student_logprobs]
    out = subprocess.run(cmd, env=_env(threads), check=True, capture_output=True, text=True,
                         cwd=str(REPO))
    return _last_json(out.stdout)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _stages(recs: list[dict[str, Any]]) -> str:
    """Our steady stage medians and the train stage's FLOP floor (``bench.step``'s ``floor``); blank for the peer."""
    if not recs or "stages_s" not in recs[0]:
        return ""
    st = {k: _med([r["stages_s"].get(k, 0.0) for r in recs]) for k in ("rollout", "teacher", "train", "optimizer")}
    floors = [r["floor"] for r in recs if r.get("floor")]
    fl = (f" [{_med([f['train_floor_s'] for f in floors]):.3f}, {_med([f['train_over_floor'] for f in floors]):.2f}x]"
          if floors else "")
    return f"{st['rollout']:.3f} / {st['teacher']:.3f} / {st['train']:.3f}{fl} / {st['optimizer']:.3f}"


def compare(sizes: list[str], reps: int, steps: dict[str, int], threads: int, trl_python: str, peer_dir: Path,
            camopd: bool = False, jsonl: Optional[str] = None, student_logprobs: str = "recompute") -> str:
    """Run the matrix and return the Markdown table (the peer writes into a scratch directory)."""
    with tempfile.TemporaryDirectory(prefix="trl_peer_out_") as peer_out:
        return _compare(sizes, reps, steps, threads, trl_python, peer_dir, peer_out, camopd, jsonl, student_logprobs)


def _compare(sizes: list[str], reps: int, steps: dict[str, int], threads: int, trl_python: str, peer_dir: Path,
             peer_out: str, camopd: bool, jsonl: Optional[str], student_logprobs: str) -> str:
    rows = []
    for size in sizes:
        ours_r, peer_r, extra_r = [], [], []
        for rep in range(reps):
            order = ("peer", "ours") if rep % 2 == 0 else ("ours", "peer")
            for who in order:
                rec = run_peer(trl_python, peer_dir, size, steps[size], threads, peer_out) if who == "peer" else \
                    run_ours(size, steps[size], threads, student_logprobs=student_logprobs)
                (peer_r if who == "peer" else ours_r).append(rec)
                print(f"[{size} rep {rep}] {who}: train tok/s {rec['train_tokens_per_s']} "
                      f"s/step {rec['step_s_steady_mean']} RSS {rec['peak_rss_mb']} MB {_stages([rec])}", file=sys.stderr,
                      flush=True)
            if camopd:
                extra_r.append(run_ours(size, steps[size], threads, teachers=2, student_logprobs=student_logprobs))
        if jsonl:
            with open(jsonl, "a", encoding="utf-8") as f:
                for tag, recs in (("trl", peer_r), ("ours", ours_r), ("ours_camopd", extra_r)):
                    for r in recs:
                        f.write(json.dumps({"tag": tag, "size": size, **r}) + "\n")
        ratio = [o["train_tokens_per_s"] / p["train_tokens_per_s"] for o, p in zip(ours_r, peer_r)]
        rss = [o["peak_rss_mb"] / p["peak_rss_mb"] for o, p in zip(ours_r, peer_r)]
        for name, recs, r_tok, r_rss in (("TRL DistillationTrainer", peer_r, None, None),
                                         (f"ours, 1 teacher ({student_logprobs})", ours_r, ratio, rss),
                                         (f"ours, camopd 2 teachers ({student_logprobs})", extra_r, None, None)):
            if not recs:
                continue
            rows.append(
                f"| {size} | {name} | {steps[size]} x {len(recs)} | "
                f"{_med([r['step_s_steady_mean'] for r in recs]):.3f} | "
                f"{_med([r['gen_tokens_per_s'] for r in recs]):.0f} | "
                f"{_med([r['train_tokens_per_s'] for r in recs]):.0f} | "
                f"{_med([r['peak_rss_mb'] for r in recs]):.0f} | "
                + (f"{_med(r_tok):.2f}x [{min(r_tok):.2f}-{max(r_tok):.2f}] | {_med(r_rss):.2f} |" if r_tok else "| |")
                + f" {_stages(recs)} |")
    head = ("| size | trainer | steps x reps | s/step (steady) | gen tok/s | train tok/s (e2e) | peak RSS MB "
            "| train tok/s ours/TRL | RSS ours/TRL | stages s: rollout / teacher / train [FLOP floor, x floor] / optimizer |"
            "\n|---|---|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    print(table, flush=True)
    return table


def main(argv: Optional[list[str]] = None) -> str:
    """CLI (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER_DIR,
                   help="the TRL peer checkout holding run_peer.py (default: ../shared/peers/trl next to the repository)")
    p.add_argument("--trl-python", default=None,
                   help="python of the peer's venv (default: <peer-dir>/.venv-trl/bin/python, where its README puts it)")
    p.add_argument("--sizes", nargs="+", choices=sorted(PEER_ARGS), default=["small", "large"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps-small", type=int, default=10)
    p.add_argument("--steps-large", type=int, default=5)
    p.add_argument("--steps-qwen", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--camopd", action="store_true", help="also run our two-teacher camopd preset")
    p.add_argument("--student-logprobs", choices=("recompute", "rollout"), default="recompute",
                   help="our selection.student_logprobs (the presets use recompute)")
    p.add_argument("--jsonl", default=None, help="append raw records here")
    a = p.parse_args(argv)
    peer_dir = a.peer_dir.resolve()
    if not (peer_dir / "run_peer.py").is_file():
        raise ValueError(f"--peer-dir={str(a.peer_dir)!r}: no run_peer.py there; point --peer-dir at the TRL peer checkout")
    trl_python = a.trl_python or str(peer_dir / ".venv-trl" / "bin" / "python")
    if not Path(trl_python).is_file():
        raise ValueError(f"--trl-python={trl_python!r} does not exist; create the peer venv as the README in "
                         f"{peer_dir} says, or pass --trl-python")
    return compare(a.sizes, a.reps, {"small": a.steps_small, "large": a.steps_large, "qwen": a.steps_qwen}, a.threads, trl_python, peer_dir,
                   camopd=a.camopd, jsonl=a.jsonl, student_logprobs=a.student_logprobs)


if __name__ == "__main__":
    main()
