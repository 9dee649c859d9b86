"""Benchmarks runnable as ``python -m camopd_megatron.bench.<name>``."""
from __future__ import annotations

import os
import sys


def set_thread_env(default: str) -> None:
    """``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` from the command line's ``--threads`` (else ``default``), for a
    benchmark's ``__main__`` before torch is imported (the TRL peer does the same); values already set win."""
    threads = next((sys.argv[i + 1] for i, x in enumerate(sys.argv[:-1]) if x == "--threads"), default)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
