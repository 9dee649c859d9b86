"""Which checkpoint a run resumes from, and what happens when it is damaged.

Policy (``checkpoint.resume`` / ``checkpoint.load``):

* ``checkpoint.load=PATH`` (an explicit request): PATH must be intact, else the run stops with one
  line naming it, what is wrong and what to do. Nothing is moved or rewritten.
* resuming from the newest checkpoint of ``checkpoint.dir`` (``auto`` / ``must``): the ``step_<N>``
  directories are tried newest first. A damaged one is skipped with one WARNING naming it and why,
  moved aside to ``step_<N>.damaged-<reason>`` (never deleted, never overwritten) and ``latest`` is
  pointed at the checkpoint used. When checkpoints exist but every one is damaged the run stops
  (nothing is moved): it never silently starts from scratch over them.

Every check runs on every rank of the loading group before any tensor is read and the ranks agree
(:func:`camopd_megatron.checkpoint.dist.verify_checkpoint`), so all ranks take the same decision.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from camopd_megatron.checkpoint.dist import CheckpointError, verify_checkpoint
from camopd_megatron.checkpoint.manager import CheckpointManager

logger = logging.getLogger(__name__)

VERIFY_HINT = "python tools/verify_checkpoint.py"


def select_checkpoint(
    manager: CheckpointManager,
    *,
    load: Optional[str],
    resume: str,
    group: Any = None,
    is_writer: bool = True,
) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """``(path, manifest)`` of the checkpoint to resume from, or ``(None, None)`` to start fresh.

    Collective over ``group`` (the student's ranks) when torch.distributed is up. ``is_writer``:
    the one rank that renames damaged checkpoints and rewrites ``latest`` (global rank 0).
    """
    if resume == "never" and not load:
        return None, None
    if load:
        try:
            return Path(load), verify_checkpoint(load, group=group)
        except CheckpointError as e:
            raise CheckpointError(
                f"checkpoint.load={load!r} cannot be used: {e}. Point checkpoint.load at an intact checkpoint "
                f"(check one with {VERIFY_HINT} PATH), or unset it to resume from the newest intact checkpoint "
                f"in checkpoint.dir", reason=e.reason) from None
    skipped: list[tuple[Path, CheckpointError]] = []
    chosen: Optional[tuple[Path, dict[str, Any]]] = None
    for _, path in manager.candidates():
        try:
            chosen = (path, verify_checkpoint(path, group=group))
            break
        except CheckpointError as e:
            if e.reason == "invalid":  # not damage (e.g. another format version): never moved aside
                raise
            skipped.append((path, e))
    pointer = manager.pointer()
    if chosen is None:
        if skipped:
            listing = "; ".join(f"{p.name}: {e}" for p, e in skipped)
            raise CheckpointError(
                f"every checkpoint in {str(manager.root)!r} is damaged, so the run stops instead of starting from "
                f"scratch over them ({listing}). Repair or move them away ({VERIFY_HINT} names the bad files), "
                "or set checkpoint.resume=never to start from scratch", reason="all-damaged")
        if pointer:
            raise CheckpointError(
                f"{str(manager.root / 'latest')!r} names {pointer!r}, but no step_<N> checkpoint is left in "
                f"{str(manager.root)!r} (deleted?), so the run stops instead of starting from scratch. Restore the "
                "checkpoint, or remove the `latest` file (or set checkpoint.resume=never) to start from scratch",
                reason="missing")
        if resume == "must":
            raise CheckpointError(f"checkpoint.resume=must but no checkpoint in {str(manager.root)!r}; "
                                  "set checkpoint.load or checkpoint.resume=auto")
        return None, None
    path, manifest = chosen
    if is_writer:
        for bad, e in skipped:
            moved = manager.move_aside(bad, e.reason)
            logger.warning("checkpoint %s is damaged, resuming from %s instead (the damaged one is kept as %s): %s",
                           bad.name, path.name, moved.name, e)
        if not skipped and pointer and pointer != path.name and not (manager.root / pointer).exists():
            # `latest` names a checkpoint that is gone (deleted by hand): say so, do not guess silently
            logger.warning("checkpoint.dir %r: latest names %r, which does not exist; resuming from %s",
                           str(manager.root), pointer, path.name)
        if skipped or pointer != path.name:
            manager.set_latest(path)
    if dist.is_initialized():  # the others read the directory only after the renames
        dist.barrier(group=group)
    return path, manifest
