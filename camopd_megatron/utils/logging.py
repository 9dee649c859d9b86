"""One rank-aware logger setup for the whole package.

Every rank logs WARNING and above; rank 0 (or the ranks named in ``verbose_ranks``) also logs INFO.
Records carry the global rank so interleaved multi-rank output stays readable.

Third-party warnings and log messages that we have checked and that need no action from the user
(:data:`QUIETED_WARNINGS`, :data:`QUIETED_LOGS`, each with the reason) are hidden unless the level
is DEBUG: without this they were two thirds of a 4-rank run's console, repeated on every rank.
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass

_FORMAT = "%(asctime)s [r%(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


_CHATTY_LIBRARIES = ("megatron", "absl")


@dataclass(frozen=True)
class Checked:
    """A third-party message we have checked: hidden below DEBUG."""

    source: str
    """The logger name (:data:`QUIETED_LOGS`) or the module issuing the warning (:data:`QUIETED_WARNINGS`)."""
    text: str
    """A regular expression matching the start of the message."""
    why: str
    """Why it needs no action from the user."""


QUIETED_WARNINGS: tuple[Checked, ...] = (
    Checked("megatron.core.tensor_parallel.layers",
            r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment "
            r"variable CUDA_DEVICE_MAX_CONNECTIONS",
            "a speed hint for CUDA, meaningless on CPU; examples/launch/ sets CUDA_DEVICE_MAX_CONNECTIONS=1"),
    Checked(r"torch\.distributed\.checkpoint\.",
            r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in "
            r"a single process",
            "megatron's dist_checkpointing calls torch's reader/writer with no_dist=True on purpose: it does the "
            "cross-rank coordination itself (strategies/torch.py)"),
    Checked(r"torch\.distributed\.checkpoint\.", r"The argument order of (load|save) has been changed",
            "megatron passes the reader/writer positionally; torch maps it to the keyword itself"),
    Checked(r"torch\.distributed\.", r"Please use DTensor instead and we are deprecating ShardedTensor",
            "megatron's dist_checkpointing format is built on ShardedTensor; nothing for the user to change"),
)
"""Python warnings we hide below DEBUG (matched on module and message)."""

QUIETED_LOGS: tuple[Checked, ...] = (
    Checked("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED",
            "megatron-core 0.19.2 has no HybridModel for these architectures yet; logged for every model built"),
    Checked("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated",
            "megatron's synchronous save runs through its deprecated async path (strategies/torch.py: save -> "
            "async_save(async_strategy='mcore')); we never save asynchronously"),
)
"""megatron log records we hide below DEBUG (matched on logger name and message)."""


class _DropChecked(logging.Filter):
    """Drops the records of one logger whose message matches a checked pattern, while ``active``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        import re

        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))
        self.active = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and self.pattern.match(record.getMessage()))


def quiet_checked_messages(quiet: bool) -> None:
    """Hide (``quiet``) or show the checked third-party messages (idempotent; process-wide)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for c in QUIETED_LOGS:
        by_logger[c.source] = by_logger.get(c.source, ()) + (c.text,)
    for name, patterns in by_logger.items():
        log = logging.getLogger(name)
        ours = [f for f in log.filters if isinstance(f, _DropChecked)]
        if not ours:
            ours = [_DropChecked(patterns)]
            log.addFilter(ours[0])
        ours[0].active = quiet
    # a later filter entry takes precedence (filterwarnings inserts at the front): "default" undoes "ignore"
    for c in QUIETED_WARNINGS:
        warnings.filterwarnings("ignore" if quiet else "default", message=c.text, module=c.source)


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
    quiet_chatty_libraries(level)
    quiet_checked_messages(numeric > logging.DEBUG)


def quiet_chatty_libraries(level: str) -> None:
    """megatron (and absl, under it) log every optimizer config and process group at INFO: keep those for
    DEBUG runs, WARNING and above otherwise."""
    numeric = logging.getLevelName(level.upper())
    debug = isinstance(numeric, int) and numeric <= logging.DEBUG
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
