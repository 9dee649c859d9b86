"""Shared pytest setup."""
from __future__ import annotations

import pytest

from camopd_megatron import compat


def pytest_sessionstart(session: pytest.Session) -> None:
    """Launched ranks get the megatron compatibility layer from ``init_distributed``; tests that use
    megatron in the pytest process itself (no process group) get it here, as a program would.
    Also re-runs the import preparation: pytest drops the warning filters set while it loads
    this file (``import camopd_megatron``), and megatron's import warnings are expected."""
    compat.prepare_megatron_import()
    compat.install()
