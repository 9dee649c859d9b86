"""Run a function on N gloo ranks from pytest (or a benchmark) and collect each rank's result.

    results = run_on_ranks(check_fn, world_size=4, args=(cfg,))

``check_fn(rank, world_size, *args)`` must be importable (a module-level function) because
ranks are started with the ``forkserver`` method. Each rank: env vars set, one torch thread,
:func:`camopd_megatron.distributed.init_distributed` with a short process-group timeout, the
function, then teardown in ``finally``. A rank that raises makes the whole call raise with that
rank's traceback; a rank that hangs is killed after ``timeout_s`` and the error names it.

Importing torch and megatron-core takes a process several seconds of CPU. The fork server imports
them once (:data:`PRELOAD`, the first call in a process starts it) and forks each rank from there,
so every later launch starts ranks with those modules loaded, in a fresh state: the server only
imports (no process group, no compatibility patch; one thread, so a fork inherits no thread pool).
Each launch still costs a process group and the function's own setup: put several checks into one
function. A forked rank's environment is the server's (the caller's when the first call started it)
plus what ``_worker`` sets; ``start="spawn"`` gives each rank a fresh interpreter that reads the
caller's environment now, for settings read at process start (glibc's ``MALLOC_*`` in the memory
benchmarks).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable, Sequence

from camopd_megatron.distributed import find_free_port

PRELOAD = ("camopd_megatron.testing.multiproc", "megatron.core", "camopd_megatron.trainer")
"""What the fork server imports before it forks ranks (``camopd_megatron`` first: importing it
prepares ``import megatron.core``); the trainer brings the rest of the package a check uses."""


def _worker(fn, rank, world_size, port, pg_timeout_s, threads, env, q, args, kwargs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
        **env,
    )
    import torch

    torch.set_num_threads(threads)
    from camopd_megatron.distributed import destroy_distributed, init_distributed

    try:
        init_distributed(backend="gloo", timeout_s=pg_timeout_s)
        result = fn(rank, world_size, *args, **kwargs)
        payload = ("ok", rank, pickle.dumps(result))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        payload = ("error", rank, traceback.format_exc())
    try:
        q.put(payload)
    finally:
        destroy_distributed()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout_s: float = 300.0,
    pg_timeout_s: float = 90.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
    start: str = "forkserver",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank.
    ``start``: ``"forkserver"`` (ranks forked with torch and megatron loaded) or ``"spawn"`` (fresh
    interpreters)."""
    if start not in ("forkserver", "spawn"):
        raise ValueError(f"run_on_ranks: start={start!r}; use 'forkserver' or 'spawn'")
    ctx = mp.get_context(start)
    if start == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts: once per process
    q = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, pg_timeout_s, threads, dict(env or {}), q, tuple(args), dict(kwargs or {})),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - results.keys() - errors.keys())
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s"
                    + (f"; rank errors: {errors}" if errors else "")
                )
            try:
                status, rank, data = q.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in results and r not in errors]
                if dead:
                    # give a dying rank's message a moment to arrive through the queue
                    time.sleep(0.5)
                    if q.empty():
                        raise RuntimeError(
                            f"rank(s) {dead} exited with code(s) "
                            f"{[procs[r].exitcode for r in dead]} without reporting"
                        ) from None
                continue
            if status == "ok":
                # a result may hold objects whose classes live in megatron: unpickling imports it,
                # which works here because importing camopd_megatron prepared that import
                results[rank] = pickle.loads(data)
            else:
                errors[rank] = data
                # other ranks may now hang in a collective; fail fast with the first traceback
                break
        if errors:
            first = min(errors)
            raise RuntimeError(f"rank {first} of {world_size} failed:\n{errors[first]}")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]

