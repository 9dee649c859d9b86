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
