"""Config errors: one :class:`ConfigError` carrying every problem, and the one-line problem format."""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Iterable, Optional, Sequence

__all__ = ["ConfigError", "problem", "show", "closest", "report_user_error"]


class ConfigError(ValueError):
    """Every problem found in a config, reported together.

    ``problems`` holds one line per problem; each names the dotted key (``teachers[1].tp``), the bad
    value, what was expected and the fix.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        """One line per problem, in the order found."""
        self.source: str | None = source
        """The file (or ``<defaults>``) the config came from, when known."""
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"{n} config problem{'s' if n != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


def show(value: Any, limit: int = 80) -> str:
    """Short ``repr`` of a user value for an error message.

    Strings (paths, names) are shown whole up to ``3 * limit`` characters; a longer one keeps its
    start and its end, where a path's file name is, and drops the middle. Other values are cut
    at ``limit``.
    """
    text = repr(value)
    if isinstance(value, str):
        room = 3 * limit
        if len(text) <= room:
            return text
        head = room // 3
        return text[:head] + "..." + text[len(text) - (room - head - 3):]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problem(key: str, value: Any, expected: str, fix: str) -> str:
    """One problem line: ``key: got <value>; expected <expected>. Fix: <fix>``."""
    return f"{key}: got {show(value)}; expected {expected}. Fix: {fix}"


def closest(word: str, choices: Iterable[str]) -> Optional[str]:
    """The choice ``word`` was most likely meant to be (difflib, or a prefix match), or None."""
    options = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return close[0]
    prefixed = [c for c in options if c and (word.startswith(c) or c.startswith(word))] if word else []
    return prefixed[0] if len(prefixed) == 1 else None


def report_user_error(e: BaseException) -> None:
    """Print a user-input error as the CLI's one headline, ``camopd-train: [rank R/W: ]<message>``, on stderr
    (a ConfigError lists its own problems; other kinds are prefixed with their type), and mark it reported so
    that the CLI does not print it again: the trainer prints input problems before its ranks wait for each
    other, so that no rank exits (and has torchrun kill the rest) before every rank has printed its own."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {os.environ.get('RANK', '0')}/{world}: " if world > 1 else ""
    kind = "" if isinstance(e, ConfigError) else f"{type(e).__name__}: "
    text = f"camopd-train: {where}{kind}{e}\n"
    try:  # one write of the whole report: the ranks print at the same moment into one pipe
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests)
        fd = None
    sys.stderr.flush()
    if fd is None:
        sys.stderr.write(text)
    else:
        os.write(fd, text.encode())
    setattr(e, "reported", True)

