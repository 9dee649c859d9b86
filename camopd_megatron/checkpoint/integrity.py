"""Checkpoint integrity: the file list recorded at save, and the checks run before a load.

At save (:func:`camopd_megatron.checkpoint.dist.save_checkpoint`) every file of the checkpoint is
recorded in the manifest under ``files``: ``{relative path: {"size": bytes, "sha256": hex}}``. Each
rank hashes the files it wrote itself (``__<rank>_<i>.distcp``, ``ranks/<rank>.pt``; still in its
page cache, and all ranks hash in parallel), rank 0 hashes the rest; the manifest is written last and
carries a checksum of its own canonical JSON (``manifest_sha256``), so a manifest that was edited or
corrupted in place is detected too.

Checks (:func:`check_files`):

* quick (before every load, on every rank): every recorded file exists with its recorded size, and
  the small files (every file that is not a ``.distcp`` shard: ``.metadata``, ``ranks/*.pt``,
  megatron's ``metadata.json``) match their checksums. Cheap: ``stat`` calls plus a few MiB read.
* full (``tools/verify_checkpoint.py``): every checksum, the large shards included.

Checkpoints written before the file list existed (no ``files`` key) pass the file checks unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

FILES_KEY = "files"
MANIFEST_SUM_KEY = "manifest_sha256"
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_RANK_FILE = re.compile(r"^ranks/(\d+)\.pt$")


class Damage:
    """Why a checkpoint is damaged: a short slug for the moved-aside directory name, and a sentence."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def __repr__(self) -> str:
        return f"Damage({self.reason!r}, {self.detail!r})"


# ------------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, streamed (``sha256sum`` prints the same)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The SHA-256 of the manifest's canonical JSON, without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_small(rel: str) -> bool:
    """Files checksummed before every load: everything but the torch_dist tensor shards."""
    return not rel.endswith(".distcp")


def list_files(directory: str | os.PathLike, *, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under ``directory`` as a sorted '/'-separated relative path."""
    root = Path(directory)
    skip = set(exclude)
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def owner_rank(rel: str) -> int:
    """The global rank that wrote (and hashes, at save) a checkpoint file; rank 0 for shared files."""
    m = _SHARD.match(rel) or _RANK_FILE.match(rel)
    return int(m.group(1)) if m else 0


def record_files(directory: str | os.PathLike, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{rel: {"size", "sha256"}}`` for the given files of ``directory``."""
    root = Path(directory)
    return {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)} for rel in rels}


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def check_manifest_digest(manifest: dict[str, Any]) -> Optional[Damage]:
    """A manifest whose content no longer matches the checksum written with it."""
    saved = manifest.get(MANIFEST_SUM_KEY)
    if saved is not None and saved != manifest_digest(manifest):
        return Damage("checksum", "camopd.json does not match the checksum written with it (changed after the save)")
    return None


def check_files(
    directory: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    full: bool = False,
    hash_rank_files: Optional[Iterable[int]] = None,
) -> list[Damage]:
    """Compare the files of checkpoint ``directory`` with the list its manifest recorded.

    Every recorded file must exist with its recorded size. Checksums: ``full`` = every file;
    otherwise the small files (:func:`is_small`), of the ``ranks/<r>.pt`` files only those with
    ``r`` in ``hash_rank_files`` (None = all of them; each rank checks its own before a load).
    Returns every problem found (empty = intact).
    """
    files = manifest.get(FILES_KEY)
    if files is None:  # written before the file list existed
        return []
    root = Path(directory)
    wanted = None if hash_rank_files is None else set(hash_rank_files)
    problems: list[Damage] = []
    for rel, rec in sorted(files.items()):
        p = root / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(Damage("missing-file", f"{rel} is missing"))
            continue
        except OSError as e:
            problems.append(Damage("unreadable", f"{rel} cannot be read ({e})"))
            continue
        if size != rec["size"]:
            kind = "truncated" if size < rec["size"] else "size"
            problems.append(Damage(kind, f"{rel} has {size} bytes, {rec['size']} were written at save"))
            continue
        m = _RANK_FILE.match(rel)
        hash_it = full or (is_small(rel) and (m is None or wanted is None or int(m.group(1)) in wanted))
        if hash_it:
            try:
                digest = file_sha256(p)
            except OSError as e:
                problems.append(Damage("unreadable", f"{rel} cannot be read ({e})"))
                continue
            if digest != rec["sha256"]:
                problems.append(Damage("checksum", f"{rel} does not match its checksum from the save (same size, "
                                                   "different content)"))
    return problems


def summarize(problems: list[Damage], limit: int = 3) -> Damage:
    """One Damage for a list (the first problem's reason; up to ``limit`` details)."""
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return Damage(problems[0].reason, "; ".join(p.detail for p in problems[:limit]) + more)
