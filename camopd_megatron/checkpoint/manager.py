"""Checkpoint directory management: ``step_<N>`` directories, a ``latest`` pointer, keep-last-N.

Layout under ``checkpoint.dir``::

    step_00000004/          a complete checkpoint (has camopd.json, see checkpoint/dist.py)
    step_00000008/
    step_00000012.tmp/      a save in progress (or one that died): never read, removed by the next save
    step_00000010.damaged-truncated/   a damaged checkpoint moved aside by a resume (never deleted)
    latest                  text file naming the newest complete checkpoint, replaced atomically

The pointer is a convenience: :meth:`CheckpointManager.latest` trusts it only if it names a complete
checkpoint and otherwise falls back to scanning, so a crash between "rename the directory" and
"update the pointer" loses nothing.

Saves are atomic, so a ``step_<N>`` directory (final name) without a manifest was damaged after the
save: :meth:`CheckpointManager.candidates` lists it, and resuming reports it instead of silently
taking the one before (and later overwriting it).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from camopd_megatron.checkpoint.dist import MANIFEST

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


class CheckpointManager:
    """Names, finds and prunes the checkpoints of one run (pure file-system logic, rank 0 writes)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 0) -> None:
        """``keep_last`` = 0 keeps every checkpoint."""
        if keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={keep_last}: expected 0 (keep all) or a positive count")
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        """The directory of the checkpoint taken after ``step`` optimizer steps."""
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def candidates(self) -> list[tuple[int, Path]]:
        """(step, path) of every ``step_<N>`` directory, manifest or not, newest first (what a resume tries)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def pointer(self) -> Optional[str]:
        """The name ``latest`` holds, or None without a pointer file."""
        pointer = self.root / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def move_aside(self, path: Path, reason: str) -> Path:
        """Rename damaged checkpoint ``path`` to ``<name>.damaged-<reason>`` (never over an existing one)."""
        slug = re.sub(r"[^a-z0-9-]+", "-", reason.lower()).strip("-") or "damaged"
        target = path.with_name(f"{path.name}.damaged-{slug}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged-{slug}.{n}")
        os.replace(path, target)
        return target

    def set_latest(self, path: Path) -> None:
        """Point ``latest`` at ``path`` (atomic replace). Rank 0 only."""
        tmp = self.root / (LATEST + ".tmp")
        tmp.write_text(path.name + "\n")
        os.replace(tmp, self.root / LATEST)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            cand = self.root / name
            if _STEP_DIR.match(name) and (cand / MANIFEST).is_file():
                newest = self.complete()
                if newest and newest[-1][1] == cand:
                    return cand
        done = self.complete()
        return done[-1][1] if done else None

    def mark_latest(self, path: Path) -> None:
        """Point ``latest`` at ``path`` (atomic replace) and prune old checkpoints. Rank 0 only."""
        self.set_latest(path)
        self.prune()

    def prune(self) -> None:
        """Delete all but the ``keep_last`` newest complete checkpoints, and stale ``*.tmp`` dirs."""
        for p in self.root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        if self.keep_last <= 0:
            return
        for _, p in self.complete()[: -self.keep_last]:
            logger.info("removing old checkpoint %s (checkpoint.keep_last=%d)", p, self.keep_last)
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run's ``checkpoints/`` root (no manifest; step_* directories or a ``latest``
    pointer) its latest complete checkpoint, said in the log."""
    path = Path(path)
    if (path / MANIFEST).is_file() or not path.is_dir():
        return path
    if not ((path / LATEST).is_file() or any(path.glob("step_*"))):
        return path  # not a checkpoints root: read_manifest names what is missing
    latest = CheckpointManager(path).latest()
    if latest is None:
        raise ValueError(f"{str(path)!r} is a checkpoints root without a complete checkpoint (no step_*/{MANIFEST}); "
                         "wait for a save to finish or pass one checkpoint directory")
    logger.info("%s is a checkpoints root: using its latest checkpoint %s", path, latest.name)
    return latest
