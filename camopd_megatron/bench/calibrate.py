"""Measure this machine's device profile for the dry-run's stage-time estimate (CPU).

    python -m camopd_megatron.bench.calibrate --threads 2 --out cpu_profile.json
    camopd-train --config X.yaml --dry-run --world-size 1 --device-profile cpu_profile.json

Two micro-benchmarks only, never a training stage (the stage timings are what the profile is
checked against, see BENCHMARKS.md):

* **matmul** — ``C = A @ B`` of square fp32 matrices (sizes ``--sizes``, default 1024 and 2048),
  2·n³ FLOPs each; ``peak_flops`` = the best median over the sizes;
* **memory read** — ``x.sum()`` over a ``--mib`` fp32 buffer (default 512 MiB, far above the
  caches), ``mem_bandwidth`` = bytes / the median time.

Median of ``--reps`` timed calls after one warm-up, ``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from camopd_megatron.bench import set_thread_env


def time_call(fn: Callable[[], Any], reps: int, pick: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds of one ``fn()``: ``pick`` (median; ``min`` for the least disturbed) of ``reps`` timed calls after
    one warm-up (page faults, thread pool)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return pick(times)


def matmul_rate(m: int, k: int, n: int, reps: int = 5, pick: Callable[[list[float]], float] = statistics.median) -> float:
    """fp32 FLOP/s of ``[m, k] @ [n, k]ᵀ`` (a Linear layer's product; 2·m·k·n FLOPs) at the threads set."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    out = torch.empty(m, n)
    return 2.0 * m * k * n / time_call(lambda: torch.mm(a, b.t(), out=out), reps, pick)


def measure(threads: int, sizes: tuple[int, ...] = (1024, 2048), mib: int = 512, reps: int = 5) -> dict[str, Any]:
    """The profile fields (``camopd_megatron.planner.DeviceProfile``) plus the raw measurements."""
    import torch

    torch.set_num_threads(threads)
    matmul = {n: matmul_rate(n, n, n, reps) for n in sizes}
    x = torch.ones(mib * 2**18)  # mib MiB of fp32
    bw = x.numel() * 4 / time_call(lambda: x.sum(), reps)
    del x
    peak = max(matmul.values())
    return {
        "name": f"cpu-{threads}t", "device_type": "cpu", "dtype": "fp32", "peak_flops": peak, "mem_bandwidth": bw,
        "source": (f"bench.calibrate: fp32 matmul n={'/'.join(map(str, sizes))} best "
                   f"{peak / 1e9:.1f} GFLOP/s, x.sum() over {mib} MiB {bw / 1e9:.2f} GB/s, {threads} threads"),
        "raw": {"matmul_flops": {str(k): v for k, v in matmul.items()}, "read_bytes_per_s": bw, "threads": threads},
    }


def profile_json(rec: dict[str, Any]) -> str:
    """The profile file's text (the DeviceProfile fields only)."""
    return json.dumps({k: v for k, v in rec.items() if k != "raw"}, indent=1)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="write the profile JSON here (for --device-profile); default: print it")
    a = p.parse_args(argv)
    rec = measure(a.threads, tuple(a.sizes), a.mib, a.reps)
    if a.out:
        Path(a.out).write_text(profile_json(rec) + "\n", encoding="utf-8")
    print(profile_json(rec) if not a.out else rec["source"], flush=True)
    return rec


if __name__ == "__main__":
    set_thread_env("2")
    main()
