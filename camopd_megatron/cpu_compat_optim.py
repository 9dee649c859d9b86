"""DistributedOptimizer + torch-native Adam checkpoint fixes (filled in below)."""
from __future__ import annotations


def apply() -> None:
    """Apply the DistributedOptimizer checkpoint fixes."""
