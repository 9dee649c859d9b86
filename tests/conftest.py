"""Shared pytest setup."""
from __future__ import annotations

import pytest

from camopd_megatron import compat


@pytest.fixture(autouse=True, scope="session")
def megatron_compat_layer() -> None:
    """Launched ranks get the megatron compatibility layer from ``init_distributed``; tests that use
    megatron in the pytest process itself (no process group) install it here, as a program would."""
    compat.install()
