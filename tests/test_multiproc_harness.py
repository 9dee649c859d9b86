"""The multi-rank harness itself: results by rank, errors with tracebacks, hangs time out."""
import pytest
import torch
import torch.distributed as dist

from camopd_megatron.testing.multiproc import run_on_ranks


def _allreduce(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item(), "backend": dist.get_backend()}


def _fails_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def _hangs(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        import time

        time.sleep(60)


def test_results_by_rank():
    out = run_on_ranks(_allreduce, 2, args=(10,))
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["sum"] == 21.0 and o["backend"] == "gloo" for o in out)


def test_error_carries_traceback():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_on_ranks(_fails_on_rank1, 2, timeout_s=60, pg_timeout_s=10)


def test_hang_times_out():
    with pytest.raises((TimeoutError, RuntimeError)):
        run_on_ranks(_hangs, 2, timeout_s=15, pg_timeout_s=5)


def _origin(rank, world_size):
    import os

    import psutil

    parent = psutil.Process(os.getppid())
    return {"ppid": parent.pid, "parent": " ".join(parent.cmdline()), "parent_threads": parent.num_threads(),
            "mark": os.environ.get("CAMOPD_HARNESS_MARK"), "threads": torch.get_num_threads()}


def test_ranks_fork_from_a_preloaded_server_or_spawn_fresh(monkeypatch):
    """By default ranks are forked by the fork server, which imported PRELOAD (torch and megatron-core)
    before any rank; ``start="spawn"`` starts fresh interpreters that read the caller's environment now."""
    import os

    from camopd_megatron.testing.multiproc import PRELOAD

    forked = run_on_ranks(_origin, 2, threads=1)
    assert forked[0]["ppid"] == forked[1]["ppid"] != os.getpid()
    assert "multiprocessing.forkserver" in forked[0]["parent"] and all(m in forked[0]["parent"] for m in PRELOAD)
    assert all(r["threads"] == 1 for r in forked) and forked[0]["parent_threads"] == 1
    again = run_on_ranks(_origin, 1)
    assert again[0]["ppid"] == forked[0]["ppid"]  # one server per process

    monkeypatch.setenv("CAMOPD_HARNESS_MARK", "now")
    spawned = run_on_ranks(_origin, 2, start="spawn")
    assert all(r["ppid"] == os.getpid() and r["mark"] == "now" for r in spawned)
    with pytest.raises(ValueError, match="start='fork'"):
        run_on_ranks(_origin, 1, start="fork")
