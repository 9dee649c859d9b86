"""Measure this machine's device profile for the dry-run's stage-time estimate (CPU).

    python -m camopd_megatron.bench.calibrate --threads 2 --out cpu_profile.json
    python -m camopd_megatron.bench.calibrate --threads 2 --config run.yaml --out cpu_profile.json  # at its shapes
    camopd-train --config X.yaml --dry-run --world-size 1 --device-profile cpu_profile.json

Micro-benchmarks only, never a training stage (the stage timings are what the profile is checked
against, see BENCHMARKS.md):

* **matmul** — ``C = A @ B`` of square fp32 matrices (sizes ``--sizes``, default 1024 and 2048),
  2·n³ FLOPs each; ``peak_flops`` = the best median over the sizes;
* **matmul table** — the same product ``[m, k] @ [k, n]`` over a grid of shapes, every combination
  of ``--grid-m``, ``--grid-k`` and ``--grid-n`` (default :data:`DEFAULT_GRID`: token counts of a
  micro-batch, inner and output widths of a layer up to an output layer's vocabulary), or, with
  ``--config``, of the shapes of that run's student and teacher forwards (``planner.counts.forward_matmuls``
  at its micro-batch: QKV, attention, projection, MLP, output layer; the model's dimensions must be
  in the config); stored as ``matmul_rates``, where the planner interpolates each product's rate. A
  table costing more than ``--max-gflop`` (default 2000) GFLOP per repetition is refused: a large
  model's shapes take hours on a CPU, and the planner takes a shape beyond the grid at its edge;
* **elementwise** — single-pass ops a layer's non-matmul work is made of (add, multiply, silu, exp,
  row max, row sum) over an fp32 ``[n / 1024, 1024]`` activation (``--elementwise-numel``, default
  2^20 elements, 4 MiB); ``elementwise_rate`` = element operations (one per element of an op's
  operand, as ``planner.counts.forward_elementwise`` counts them) / the summed median times;
* **memory read** — ``x.sum()`` over a ``--mib`` fp32 buffer (default 512 MiB, far above the
  caches), ``mem_bandwidth`` = bytes / the median time.

Median of ``--reps`` timed calls after one warm-up, ``torch.set_num_threads(--threads)``. About
30 s at the defaults on one core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from camopd_megatron.bench import set_thread_env


def time_calls(fn: Callable[[], Any], reps: int,
               clocks: Sequence[Callable[[], float]] = (time.perf_counter,)) -> list[list[float]]:
    """Seconds of ``reps`` timed ``fn()`` calls after one warm-up (page faults, thread pool), on each of
    ``clocks`` (``time.perf_counter``: wall; ``time.thread_time``: this thread's CPU time), the same calls."""
    fn()
    times: list[list[float]] = [[] for _ in clocks]
    for _ in range(reps):
        t0 = [c() for c in clocks]
        fn()
        for ts, c, t in zip(times, clocks, t0):
            ts.append(c() - t)
    return times


def time_call(fn: Callable[[], Any], reps: int, pick: Callable[[list[float]], float] = statistics.median) -> float:
    """Wall seconds of one ``fn()``: ``pick`` (median; ``min`` for the least disturbed) of :func:`time_calls`."""
    return pick(time_calls(fn, reps)[0])


def matmul_rates(m: int, k: int, n: int, reps: int = 5, pick: Callable[[list[float]], float] = statistics.median,
                 clocks: Sequence[Callable[[], float]] = (time.perf_counter,)) -> list[float]:
    """fp32 FLOP/s of ``[m, k] @ [n, k]ᵀ`` (a Linear layer's product; 2·m·k·n FLOPs) at the threads set, on
    each of ``clocks`` (the same calls)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    out = torch.empty(m, n)
    return [2.0 * m * k * n / pick(ts) for ts in time_calls(lambda: torch.mm(a, b.t(), out=out), reps, clocks)]


def matmul_rate(m: int, k: int, n: int, reps: int = 5, pick: Callable[[list[float]], float] = statistics.median) -> float:
    """:func:`matmul_rates` on the wall clock."""
    return matmul_rates(m, k, n, reps, pick)[0]


DEFAULT_GRID: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = (
    (512, 2048), (256, 1024, 4096), (256, 1024, 4096, 16384))
"""The default ``(m, k, n)`` axes of the matmul table: rows of a micro-batch, a layer's inner widths,
its output widths up to a vocabulary (larger ones take the largest's rate)."""


def config_grid(cfg: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The ``(m, k, n)`` axes of a run config's forward products (``camopd_megatron.config.Config``):
    the student's and every teacher's training / scoring forward at ``optim.micro_batch_size`` sequences
    of ``data.max_prompt_tokens + rollout.max_new_tokens`` tokens (capped at the model's
    ``seq_length``), the output layer at the response positions."""
    from camopd_megatron.planner.counts import forward_matmuls

    models = [("model", cfg.model)] + [(f"teachers[{i}].model", cfg.teacher_model(i)[0]) for i in range(len(cfg.teachers))]
    for key, model in models:
        unset = [f for f in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size")
                 if getattr(model, f) is None]
        if unset:
            raise ValueError(f"{key}: {', '.join(unset)} not set in the config (read from the checkpoint at run time); "
                             "set them, or calibrate on a grid instead (--grid-m / --grid-k / --grid-n)")
    new = cfg.rollout.max_new_tokens
    axes: tuple[set[int], set[int], set[int]] = (set(), set(), set())
    for _, model in models:
        seq = min(model.seq_length, cfg.data.max_prompt_tokens + new)
        for prod in forward_matmuls(model, seq, min(new, seq)):
            for axis, x in zip(axes, prod.shape(1, cfg.optim.micro_batch_size)):
                axis.add(max(1, round(x)))
    return tuple(tuple(sorted(a)) for a in axes)  # type: ignore[return-value]


def elementwise_rate(numel: int = 2**20, reps: int = 5) -> float:
    """Element operations per second of single-pass fp32 ops (add, multiply, silu, exp, row max, row sum)
    over a ``[numel / 1024, 1024]`` tensor, one element operation per element of the operand (as
    ``planner.counts.forward_elementwise`` counts them), at the threads set."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(max(1, numel // 1024), 1024, generator=gen), torch.randn(max(1, numel // 1024), 1024, generator=gen)
    ops = [lambda: x + y, lambda: x * y, lambda: torch.nn.functional.silu(x), lambda: torch.exp(x),
           lambda: x.amax(-1), lambda: x.sum(-1)]
    return len(ops) * x.numel() / sum(time_call(op, reps) for op in ops)


def measure(threads: int, sizes: tuple[int, ...] = (1024, 2048), mib: int = 512, reps: int = 5,
            grid: Optional[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = DEFAULT_GRID,
            elementwise_numel: Optional[int] = 2**20) -> dict[str, Any]:
    """The profile fields (``camopd_megatron.planner.DeviceProfile``) plus the raw measurements; ``grid``
    None: no matmul table, ``elementwise_numel`` None: no elementwise rate (the estimate at ``peak_flops``)."""
    import torch

    torch.set_num_threads(threads)
    matmul = {n: matmul_rate(n, n, n, reps) for n in sizes}
    table = [{"m": m, "k": k, "n": n, "flops": matmul_rate(m, k, n, reps)}
             for m in grid[0] for k in grid[1] for n in grid[2]] if grid else None
    ew = elementwise_rate(elementwise_numel, reps) if elementwise_numel else None
    x = torch.ones(mib * 2**18)  # mib MiB of fp32
    bw = x.numel() * 4 / time_call(lambda: x.sum(), reps)
    del x
    peak = max(matmul.values())
    source = (f"bench.calibrate: fp32 matmul n={'/'.join(map(str, sizes))} best {peak / 1e9:.1f} GFLOP/s, "
              f"x.sum() over {mib} MiB {bw / 1e9:.2f} GB/s")
    if table:
        rates = [r["flops"] for r in table]
        source += (f", a table of {len(table)} matmul shapes (m {'/'.join(map(str, grid[0]))}, k "
                   f"{'/'.join(map(str, grid[1]))}, n {'/'.join(map(str, grid[2]))}) {min(rates) / 1e9:.1f}-"
                   f"{max(rates) / 1e9:.1f} GFLOP/s")
    if ew:
        source += f", elementwise {ew / 1e9:.2f} G element-ops/s over {elementwise_numel} elements"
    rec: dict[str, Any] = {
        "name": f"cpu-{threads}t", "device_type": "cpu", "dtype": "fp32", "peak_flops": peak, "mem_bandwidth": bw,
        "source": source + f", {threads} threads",
        "raw": {"matmul_flops": {str(k): v for k, v in matmul.items()}, "read_bytes_per_s": bw, "threads": threads},
    }
    if table:
        rec["matmul_rates"] = table
    if ew:
        rec["elementwise_rate"] = ew
    return rec


def profile_json(rec: dict[str, Any]) -> str:
    """The profile file's text (the DeviceProfile fields only)."""
    return json.dumps({k: v for k, v in rec.items() if k != "raw"}, indent=1)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--config", help="a run config (YAML): the matmul table at its forwards' shapes instead of the grid")
    p.add_argument("--grid-m", type=int, nargs="+", default=list(DEFAULT_GRID[0]), help="the table's row counts")
    p.add_argument("--grid-k", type=int, nargs="+", default=list(DEFAULT_GRID[1]), help="the table's inner widths")
    p.add_argument("--grid-n", type=int, nargs="+", default=list(DEFAULT_GRID[2]), help="the table's output widths")
    p.add_argument("--no-table", action="store_true", help="no matmul table (every product at peak_flops)")
    p.add_argument("--max-gflop", type=float, default=2000.0,
                   help="refuse a table costing more than this many GFLOP per repetition (a large model's shapes)")
    p.add_argument("--elementwise-numel", type=int, default=2**20,
                   help="elements of the elementwise benchmark's tensor (0: no elementwise_rate)")
    p.add_argument("--out", help="write the profile JSON here (for --device-profile); default: print it")
    a = p.parse_args(argv)
    if a.config:
        from camopd_megatron.config import load_config

        try:
            grid = config_grid(load_config(a.config))
        except ValueError as e:
            p.error(f"--config {a.config}: {e}")
    else:
        grid = (tuple(a.grid_m), tuple(a.grid_k), tuple(a.grid_n))
    cost = 2.0 * sum(grid[0]) * sum(grid[1]) * sum(grid[2]) / 1e9
    if not a.no_table and cost > a.max_gflop:
        p.error(f"the matmul table over m {grid[0]}, k {grid[1]}, n {grid[2]} is {cost:.0f} GFLOP per repetition, "
                f"over --max-gflop {a.max_gflop:g}: pass smaller --grid-m / --grid-k / --grid-n (the planner takes a "
                "larger shape at the grid's edge rate) or raise --max-gflop")
    rec = measure(a.threads, tuple(a.sizes), a.mib, a.reps, None if a.no_table else grid, a.elementwise_numel or None)
    if a.out:
        Path(a.out).write_text(profile_json(rec) + "\n", encoding="utf-8")
    print(profile_json(rec) if not a.out else rec["source"], flush=True)
    return rec


if __name__ == "__main__":
    set_thread_env("2")
    main()
