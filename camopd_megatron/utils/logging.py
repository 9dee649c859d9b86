"""One rank-aware logger setup for the whole package.

Every rank logs WARNING and above; rank 0 (or the ranks named in ``verbose_ranks``) also logs INFO.
Records carry the global rank so interleaved multi-rank output stays readable.
"""
from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [r%(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


_CHATTY_LIBRARIES = ("megatron", "absl")


def setup_logging(rank: int = 0, level: str = "INFO", verbose_ranks: tuple[int, ...] = (0,)) -> None:
    """Configure the ``camopd_megatron`` logger (idempotent: replaces our previous handler)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"run.log_level: unknown level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger("camopd_megatron")
    for h in list(root.handlers):
        if getattr(h, "_camopd", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._camopd = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(numeric if rank in verbose_ranks else max(numeric, logging.WARNING))
    root.propagate = False
    # megatron logs every optimizer config and process group at INFO: keep those for DEBUG runs
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)
