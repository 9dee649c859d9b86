"""Our distributed checkpoint format: megatron-core ``dist_checkpointing`` (torch_dist) + a manifest.

A checkpoint directory holds

* the torch_dist shards of every sharded tensor (model, optionally optimizer) — loadable at any
  TP / PP, since megatron records each shard's global offsets;
* ``camopd.json`` — the manifest, written last: format version, the model architecture, the step,
  and any JSON-serialisable ``common`` state (scheduler, data position, ...). A directory without
  it is not a checkpoint (a save that died midway);
* ``ranks/<global rank>.pt`` — optional per-rank tensors (RNG states), loaded with
  ``torch.load(weights_only=True)``.

Integrity (checkpoint/integrity.py). The manifest lists every file with its size and SHA-256 and
carries a checksum of itself. Before any tensor is read, :func:`verify_checkpoint` checks every size
and the small files' checksums on every rank of the loading group, and the ranks agree on the verdict
(one collective), so a damaged checkpoint is refused before the expensive load and by all ranks at
once. ``tools/verify_checkpoint.py`` checks every checksum, the tensor shards included.

Atomicity. Everything is written into ``<name>.tmp`` next to the target; rank 0 writes the manifest,
fsyncs, and only then renames the directory to its final name (``os.replace`` is atomic on POSIX).
A crash at any point leaves either the old checkpoint or the new one, never a half-written one
under the final name; stale ``*.tmp`` directories are removed by the next save.

Collectives. ``dist_checkpointing.save`` has no process-group argument in 0.19.2: it coordinates
through global rank 0 with world-wide barriers. So **every rank of the world calls**
:func:`save_checkpoint`; ranks of roles with nothing to write (teachers) pass
``sharded_state_dict=None`` and join with an empty state. Loading is per role
(``process_group=`` the role's group), so teachers can load their own weights independently.

Untrusted input. torch's DCP ``.metadata`` file is a pickle; before megatron reads it, it is parsed
once by :func:`check_dcp_metadata` with an allow-list unpickler (torch.distributed.checkpoint
metadata classes and plain containers only), so a crafted checkpoint cannot execute code.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from camopd_megatron.checkpoint.hf_side import carry_hf_files
from camopd_megatron.checkpoint.integrity import (
    FILES_KEY, MANIFEST_SUM_KEY, check_files, check_manifest_digest, list_files, manifest_digest, owner_rank,
    record_files, summarize,
)
from camopd_megatron.config import ModelConfig
from camopd_megatron.config.moe import moe_arch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "camopd.json"
RANKS_DIR = "ranks"
ARCH_KEYS = (
    "arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "vocab_pad_multiple", "add_qkv_bias", "qk_layernorm", "tie_embeddings", "head_dim", "moe",
)
"""ModelConfig fields a checkpoint must agree on with the model that loads it."""


class CheckpointError(ValueError):
    """A missing, incomplete, corrupt or mismatching checkpoint (the message names path and fix).

    ``reason`` is a short slug of what is wrong ("truncated", "checksum", "missing-file", ...): it
    names the directory a damaged checkpoint is moved aside to; "invalid" for anything that is not
    damage (a mismatching architecture, a bad path).
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def _dcp_failure(e: BaseException) -> str:
    """torch's CheckpointException on one line (its ``str`` holds every rank's full traceback)."""
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    parts = []
    for r, pair in sorted(failures.items()):
        exc = pair[0] if isinstance(pair, tuple) else pair
        parts.append(f"rank {r}: {type(exc).__name__}: {exc}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------
def arch_dict(model_cfg: ModelConfig) -> dict[str, Any]:
    """The architecture fields recorded in (and checked against) a checkpoint."""
    d = asdict(model_cfg)
    return {k: d[k] for k in ARCH_KEYS}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` (CheckpointError if missing or unreadable)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a directory; check the path",
                              reason="missing")
    mf = p / MANIFEST
    if not mf.is_file():
        raise CheckpointError(
            f"{str(p)!r} is not a complete camopd checkpoint (no {MANIFEST}; an interrupted save or another format); "
            "point to a checkpoint directory written by camopd_megatron (or convert with tools/convert_hf_to_megatron.py)",
            reason="no-manifest",
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(mf)!r} is unreadable ({e}); the checkpoint is corrupt", reason="manifest") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(mf)!r}: format_version={manifest.get('format_version') if isinstance(manifest, dict) else None!r}, "
            f"this build reads {FORMAT_VERSION}", reason="manifest",
        )
    bad = check_manifest_digest(manifest)
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(p)!r}: {bad.detail}", reason=bad.reason)
    return manifest


def check_arch(manifest: dict[str, Any], model_cfg: ModelConfig, path: str, *, key: str = "model") -> None:
    """Refuse a checkpoint whose architecture differs from ``model_cfg`` (names every field)."""
    saved = manifest.get("model", {})
    want = arch_dict(model_cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {want[k]!r}" for k in ARCH_KEYS
             if (moe_arch(saved.get(k)) != moe_arch(want[k]) if k == "moe" else saved.get(k) != want[k])]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path!r} does not match {key}: " + "; ".join(diffs)
            + f". Fix {key}.* to match the checkpoint (or load the right checkpoint)"
        )


# ------------------------------------------------------------------------------------------------
# untrusted DCP metadata
# ------------------------------------------------------------------------------------------------
_SAFE_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "slice", "int", "float", "str", "bytes",
                            "bool", "complex", "bytearray", "range"})
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "collections",
                         "megatron.core.dist_checkpointing.")
_SAFE_TORCH = frozenset({("torch", "Size"), ("torch", "device"), ("torch._utils", "_rebuild_tensor_v2"),
                         ("torch.storage", "_load_from_bytes"), ("torch", "float32"), ("torch", "float16"),
                         ("torch", "bfloat16"), ("torch", "int64"), ("torch", "int32"), ("torch", "uint8"),
                         ("torch", "bool"), ("torch", "float64"), ("torch", "int8"), ("torch", "int16"),
                         ("torch", "dtype"), ("torch", "memory_format"), ("torch", "contiguous_format"),
                         ("torch", "strided"), ("torch", "layout"), ("torch.serialization", "_get_layout")})


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_TORCH:
            return super().find_class(module, name)
        if module.startswith(_SAFE_MODULE_PREFIXES):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # metadata dataclasses / enums only, never a function to call
                return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def check_dcp_metadata(path: str | os.PathLike) -> None:
    """Parse ``<path>/.metadata`` with an allow-list unpickler; CheckpointError if it is unsafe/corrupt."""
    meta = Path(path) / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"{str(path)!r} has no .metadata (torch_dist shards missing); the checkpoint is incomplete",
                              reason="missing-file")
    try:
        _AllowListUnpickler(io.BytesIO(meta.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure means we will not hand it to pickle.load
        raise CheckpointError(f"{str(meta)!r} is corrupt or unsafe ({e}); refusing to load it", reason="metadata") from e


# ------------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (atomic on POSIX), replacing an existing
    ``final`` by moving it aside first: at every instant one complete version exists under a name."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_manifest(directory: Path, model_cfg: ModelConfig, *, step: int, world_size: int,
                   common: Optional[dict[str, Any]] = None, files: Optional[dict[str, Any]] = None) -> None:
    """Write ``camopd.json`` into ``directory`` (atomically, fsynced): the last file of a checkpoint.

    ``model`` holds the fields checked on load (:data:`ARCH_KEYS`); ``model_config`` the whole
    architecture (RoPE, norms, ...) so a checkpoint can be exported without its original config;
    ``files`` every other file with size and checksum (None: recorded here, by this process).
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": arch_dict(model_cfg),
        "model_config": asdict(model_cfg),
        "step": int(step),
        "world_size": int(world_size),
        "common": common or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        FILES_KEY: files if files is not None else record_files(directory, list_files(directory, exclude=(MANIFEST,))),
    }
    manifest[MANIFEST_SUM_KEY] = manifest_digest(manifest)
    _write_json_atomic(directory / MANIFEST, manifest)
    _fsync_dir(directory)


def _broadcast_error(msg: Optional[str]) -> None:
    """Raise on every rank if rank 0 hit an error (keeps all ranks in step, no hang)."""
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])


def save_checkpoint(
    path: str | os.PathLike,
    sharded_state_dict: Optional[dict[str, Any]],
    *,
    model_cfg: ModelConfig,
    step: int = 0,
    common: Optional[dict[str, Any]] = None,
    rank_state: Optional[dict[str, torch.Tensor]] = None,
    overwrite: bool = False,
    hf_source: Optional[str | os.PathLike] = None,
) -> Path:
    """Write a checkpoint atomically. Collective over the WORLD: every rank calls it.

    Args:
        path: final checkpoint directory (must not exist unless ``overwrite``).
        sharded_state_dict: this rank's megatron sharded state dict (model, optionally optimizer);
            None on ranks with nothing to save (other roles).
        model_cfg: the architecture recorded in the manifest.
        step: training step recorded in the manifest.
        common: JSON-serialisable state shared by all ranks (rank 0's copy is written).
        rank_state: tensors private to this rank (e.g. RNG states), saved to ``ranks/<rank>.pt``.
        overwrite: replace an existing checkpoint at ``path``.
        hf_source: a checkpoint whose ``hf/`` side files (tokenizer, HF config) this one carries over
            (copied inside the atomic save, so they are in the file list and verified like the rest).
    Returns:
        The final path.
    """
    final = Path(path).absolute()
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    t0 = time.perf_counter()
    err = None
    if rank == 0:
        try:
            if final.exists() and not overwrite:
                raise CheckpointError(f"checkpoint {str(final)!r} already exists; pass overwrite=True or pick another path")
            if tmp.exists():
                shutil.rmtree(tmp)  # a previous save died midway
            tmp.mkdir(parents=True)
            json.dumps(common or {})  # fail early if not serialisable
        except (OSError, TypeError, CheckpointError) as e:
            err = f"cannot prepare checkpoint {str(final)!r}: {e}"
    _broadcast_error(err)
    try:
        dist_checkpointing.save(sharded_state_dict or {}, str(tmp))
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it; raised on every rank
        raise CheckpointError(f"saving checkpoint {str(final)!r} failed: {_dcp_failure(e)}", reason="save") from None
    if rank_state is not None:
        (tmp / RANKS_DIR).mkdir(exist_ok=True)
        with open(tmp / RANKS_DIR / f"{rank}.pt", "wb") as f:
            torch.save(rank_state, f)
            f.flush()
            os.fsync(f.fileno())
    if rank == 0:
        carry_hf_files(hf_source, tmp)
    dist.barrier()
    # the file list: every rank hashes what it wrote (in parallel, from its page cache), rank 0 the rest
    all_files = list_files(tmp, exclude=(MANIFEST,))
    mine = record_files(tmp, [f for f in all_files if owner_rank(f) == rank])
    gathered: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    err = None
    if rank == 0:
        try:
            files = {k: v for part in gathered for k, v in (part or {}).items()}
            files.update(record_files(tmp, [f for f in all_files if f not in files]))  # no rank claimed them
            write_manifest(tmp, model_cfg, step=step, world_size=dist.get_world_size(), common=common, files=files)
            swap_in_dir(tmp, final)
        except OSError as e:
            err = f"cannot finalise checkpoint {str(final)!r}: {e}"
    _broadcast_error(err)
    logger.info("saved checkpoint %s (step %d) in %.1fs", final, step, time.perf_counter() - t0)
    return final


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _agree(problem: Optional[tuple[str, str]], group: Any) -> Optional[tuple[str, str]]:
    """The first (lowest rank's) problem any rank of ``group`` found, on every rank of it."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return problem
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, problem, group=group)
    return next((p for p in everyone if p is not None), None)


def check_checkpoint(
    path: str | os.PathLike,
    *,
    rank_files: Optional[Iterable[int]] = None,
    full: bool = False,
) -> dict[str, Any]:
    """This process's part of :func:`verify_checkpoint`, no collective: the manifest (its own checksum),
    every recorded file's size, the small files' checksums (of ``ranks/<r>.pt`` those with ``r`` in
    ``rank_files``; None = all), the DCP ``.metadata``; ``full`` = every checksum. Returns the manifest,
    or raises CheckpointError naming the checkpoint and the damaged files."""
    manifest = read_manifest(path)
    found = check_files(path, manifest, full=full, hash_rank_files=rank_files)
    if found:
        d = summarize(found)
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {d.detail}", reason=d.reason)
    check_dcp_metadata(path)
    return manifest


def verify_checkpoint(
    path: str | os.PathLike,
    *,
    group: Any = None,
    rank: Optional[int] = None,
    full: bool = False,
) -> dict[str, Any]:
    """Check checkpoint ``path`` before loading it; returns the manifest, or raises CheckpointError.

    Collective over ``group`` (None = the world; no collective without torch.distributed): every rank
    reads the manifest (its own checksum), the DCP ``.metadata`` (allow-list unpickler), checks the
    size of every recorded file and the checksums of the small ones (of ``ranks/*.pt`` only its own,
    ``rank``; default its global rank), then the ranks agree: all raise the same error or none does.
    ``full`` also checksums the tensor shards (slow; tools/verify_checkpoint.py).
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    manifest: Optional[dict[str, Any]] = None
    problem: Optional[tuple[str, str]] = None
    try:
        manifest = check_checkpoint(path, rank_files=None if full else (rank,), full=full)
    except CheckpointError as e:
        problem = (e.reason, str(e))
    problem = _agree(problem, group)
    if problem is not None:
        raise CheckpointError(problem[1], reason=problem[0])
    assert manifest is not None
    return manifest


def load_sharded(
    path: str | os.PathLike,
    sharded_state_dict: dict[str, Any],
    *,
    process_group: Any = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load the tensors described by ``sharded_state_dict`` from checkpoint ``path``.

    Collective over ``process_group`` (the role's ranks; None = the world). Returns the loaded
    state dict (same structure, real tensors). ``verify=False`` skips :func:`verify_checkpoint`
    (for a caller that just ran it).
    """
    if verify:
        verify_checkpoint(path, group=process_group)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(path), process_group=process_group)
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it
        raise CheckpointError(f"failed to load checkpoint {str(path)!r}: {_dcp_failure(e)}; check it with "
                              "tools/verify_checkpoint.py", reason="load") from None
    except Exception as e:  # noqa: BLE001 - turn megatron's deep errors into one actionable message
        raise CheckpointError(f"failed to load checkpoint {str(path)!r}: {type(e).__name__}: {e}",
                              reason="load") from e


def model_sharded_state_dict(model: Any, pg_collection: Any) -> dict[str, Any]:
    """``model.sharded_state_dict`` with the role's data-parallel group (never megatron's global one)."""
    return model.sharded_state_dict(metadata={"dp_cp_group": pg_collection.dp_cp})


def load_model(
    model: Any,
    path: str | os.PathLike,
    *,
    model_cfg: ModelConfig,
    pg_collection: Any,
    key: str = "model.checkpoint",
) -> dict[str, Any]:
    """Load model weights from checkpoint ``path`` into ``model`` (any saved TP/PP → this layout).

    Collective over the role's ranks (``pg_collection.mp`` x DP: the role's whole rank set).
    Returns the manifest.
    """
    try:
        manifest = read_manifest(path)
        check_arch(manifest, model_cfg, str(path), key=key.rsplit(".", 1)[0])
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from e
    group = getattr(pg_collection, "intra_dist_opt", None)  # the role's full rank set
    sd = model_sharded_state_dict(model, pg_collection)
    loaded = load_sharded(path, sd, process_group=group)
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in sd if k not in loaded and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{key}: checkpoint {str(path)!r} lacks {missing[:5]}")
    return manifest


def load_rank_state(path: str | os.PathLike, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """This rank's private tensors from the checkpoint, or None if it saved none (CheckpointError if unreadable)."""
    f = Path(path) / RANKS_DIR / f"{rank}.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle error, ...: one message naming the file
        raise CheckpointError(f"checkpoint {str(path)!r}: {RANKS_DIR}/{rank}.pt is unreadable ({type(e).__name__}: "
                              f"{e}); check the checkpoint with tools/verify_checkpoint.py", reason="unreadable") from e
