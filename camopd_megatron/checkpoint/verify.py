"""``camopd-verify-checkpoint`` (``tools/verify_checkpoint.py``): check a checkpoint completely.

    camopd-verify-checkpoint CKPT_DIR        one checkpoint (a step_<N> directory)
    camopd-verify-checkpoint CHECKPOINTS     a checkpoint.dir root: the one ``latest`` names
    camopd-verify-checkpoint CHECKPOINTS --all   every step_<N> checkpoint under the root

Checks the manifest (and its own checksum), the size and SHA-256 of every recorded file (the large
tensor shards included: a training resume checks only sizes and the small files' checksums) and the
DCP ``.metadata`` (allow-list unpickler). Exit status 0 when every checkpoint checked is intact,
1 otherwise; the report names each bad file and what is wrong with it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from camopd_megatron.checkpoint.dist import MANIFEST, CheckpointError, check_dcp_metadata, read_manifest
from camopd_megatron.checkpoint.integrity import FILES_KEY, check_files, list_files
from camopd_megatron.checkpoint.manager import CheckpointManager


def verify(path: Path) -> tuple[bool, list[str]]:
    """(intact, report lines) for one checkpoint directory."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return False, [f"DAMAGED {path}: {e}"]
    files = manifest.get(FILES_KEY)
    problems = [p.detail for p in check_files(path, manifest, full=True)]
    try:
        check_dcp_metadata(path)
    except CheckpointError as e:
        problems.append(str(e))
    head = f"{path} (step {manifest.get('step')}, saved {manifest.get('saved_at', '?')})"
    if problems:
        return False, [f"DAMAGED {head}:"] + [f"  - {p}" for p in problems]
    if files is None:
        return True, [f"OK {head}: manifest and .metadata readable; no file list to check (written before "
                      "checkpoints recorded sizes and checksums)"]
    extra = [f for f in list_files(path, exclude=(MANIFEST,)) if f not in files]
    lines = [f"OK {head}: {len(files)} files, {sum(r['size'] for r in files.values()) / 2**20:.1f} MiB, "
             "every size and SHA-256 matches the save"]
    lines += [f"  note: {f} was not part of the save (ignored by loads)" for f in extra]
    return True, lines


def _targets(path: Path, every: bool) -> list[Path]:
    if (path / MANIFEST).is_file() and not every:
        return [path]
    manager = CheckpointManager(path)
    found = [p for _, p in manager.candidates()]
    if every:
        return found or [path]
    name = manager.pointer()
    if name is not None:
        return [path / name]  # what `latest` names, even when it is damaged or gone: that is what a resume tries
    return found[:1] or [path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Verify; returns the exit status."""
    p = argparse.ArgumentParser(prog="camopd-verify-checkpoint",
                                description="Verify a camopd checkpoint completely: every file's size and SHA-256 "
                                            "(tensor shards included), the manifest and the DCP metadata.")
    p.add_argument("path", help="a checkpoint directory, or a checkpoint.dir root (then the one `latest` names)")
    p.add_argument("--all", action="store_true", help="with a root: verify every step_<N> checkpoint under it")
    args = p.parse_args(argv)
    ok = True
    for target in _targets(Path(args.path), args.all):
        good, lines = verify(target)
        ok &= good
        print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
