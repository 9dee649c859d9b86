"""Streaming Hugging Face <-> megatron checkpoint conversion (the I/O half of :mod:`.hf`).

HF -> ours (:func:`convert_hf_to_megatron`). The output is our distributed checkpoint
(:mod:`.dist`: torch_dist shards + ``camopd.json``), layout-free, so one conversion serves every
TP/PP. No megatron model is built: the torch DCP save is driven by a planner whose write items carry
exactly the keys, global shapes and chunk offsets that ``GPTModel.sharded_state_dict()`` produces at
TP = PP = EP = 1 (one chunk per layer — and per expert — of each ``decoder.layers.*`` key, plus the
per-layer ``_extra_state`` objects and megatron's ``common_state``), and whose ``resolve_data`` reads and
reshapes the HF tensors of one item only when the writer asks for it. The writer keeps a file's tensors
until the file is written, so each file holds one tensor, or one layer's experts of one weight: peak
memory is about one (fused) tensor plus its HF sources, or one layer's experts of one weight (the size
of transformers' own fused expert tensor). A checkpoint whose experts transformers 5.x saved fused
is read expert by expert from the fused tensors.

ours -> HF (:func:`convert_megatron_to_hf`). Reads one layer at a time (a torch DCP read of that
region of each stacked tensor: any saved TP/PP/EP layout, no process group needed) and appends the HF
tensors (experts in the published per-expert layout) to the current output shard,
which is written as soon as it is complete: peak ≈ one output shard + one layer.

Both directions write into ``<OUT>.tmp`` and rename at the end; a failure removes the tmp directory,
an existing OUT is refused unless ``overwrite``.

Side files (:mod:`.hf_side`). Copies of the original ``config.json``, ``generation_config.json``,
tokenizer and chat-template files travel inside our checkpoint under ``hf/``: the import writes them,
training checkpoints carry them over, and the export writes them back, with ``generation_config.json``'s
bos/eos/pad ids filled in from the tokenizer (then ``config.json``) where the original leaves them unset,
pad falling back to eos, so ``generate`` stops and pads as the source model did. The export of a run's
``checkpoints/`` root is that of its ``latest`` checkpoint.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Iterator, Optional

import torch

from camopd_megatron.checkpoint.hf import (
    IGNORED_HF_SUFFIXES, FusedSource, TensorRule, active_rules, check_layout, extra_state_objects,
    fused_expert_sources, hf_config_from_model, hf_names, hf_shapes, iter_tensors, mcore_shape, model_config_from_hf,
    placement, rule_applies, to_hf, to_mcore,
)
from camopd_megatron.checkpoint.hf_moe import moe_structure
from camopd_megatron.checkpoint.hf_side import (
    HF_SIDE_FILES, HF_SUBDIR, TOKENIZER_FILES, TOKENIZER_MODELS, copy_side_files, generation_config,
)
from camopd_megatron.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["HFWeights", "read_hf_config", "parse_dtype", "convert_hf_to_megatron", "convert_megatron_to_hf"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def parse_dtype(name: Optional[str], *, key: str = "--dtype") -> Optional[torch.dtype]:
    """``auto``/None -> None (keep the source dtype), else the torch dtype (ValueError naming ``key``)."""
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r} is not a dtype we convert to; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a HF model directory (ValueError if missing/unreadable)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(model_dir)!r} has no config.json; point to a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return cfg


# ------------------------------------------------------------------------------------------------
# HF weights (safetensors, sharded or not; pytorch_model*.bin)
# ------------------------------------------------------------------------------------------------
class HFWeights:
    """Lazy access to the tensors of a HF model directory, one tensor at a time.

    ``*.safetensors`` are read tensor by tensor; ``pytorch_model*.bin`` are opened with
    ``torch.load(weights_only=True, mmap=True)`` (only the current file is kept open).
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.dir = Path(model_dir)
        self.files: dict[str, Path] = {}
        """tensor name -> file"""
        self._open: dict[Path, Any] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.dir / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError(f"{str(index)!r} has no weight_map; the index is corrupt")
                missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
                if missing:
                    raise ValueError(f"{str(index)!r} lists shard(s) that are missing: {missing}; download them again")
                self.files = {k: self.dir / f for k, f in weight_map.items()}
                break
            if (self.dir / single).is_file():
                self.files = {k: self.dir / single for k in self._names_in(self.dir / single)}
                break
        else:
            raise ValueError(
                f"{str(self.dir)!r} holds no weights (looked for model.safetensors[.index.json] and "
                "pytorch_model.bin[.index.json])"
            )
        self.safetensors = next(iter(self.files.values())).suffix == ".safetensors"
        self.aliases: dict[str, FusedSource] = {}
        """published name -> where it lies in a fused tensor (:meth:`read_fused`)"""

    def read_fused(self, aliases: dict[str, FusedSource]) -> None:
        """Serve the published per-expert names ``aliases`` maps from the fused tensors it names
        (:func:`.hf.fused_expert_sources`); :meth:`names` then lists those instead of the fused ones."""
        self.aliases = dict(aliases)

    def _names_in(self, path: Path) -> list[str]:
        return list(self._handle(path).keys())

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open.clear()  # one .bin at a time
                self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[path]

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint (fused tensors read as published ones: their published names)."""
        return (set(self.files) - {src for src, _, _ in self.aliases.values()}) | set(self.aliases)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) without reading the data (safetensors) / from the mmap (bin)."""
        if name in self.aliases:
            src, expert, rows = self.aliases[name]
            shape, dt = self.meta(src)
            if expert is not None:
                shape = shape[1:]
            if rows is not None:
                shape = (rows[1] - rows[0], *shape[1:])
            return shape, dt
        h = self._handle(self.files[name])
        if self.safetensors:
            sl = h.get_slice(name)
            dt = sl.get_dtype()
            if dt not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dt} is not a floating dtype we convert")
            return tuple(sl.get_shape()), _ST_DTYPES[dt]
        t = h[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a fresh CPU copy).

        safetensors files are opened per tensor: a long-lived handle keeps the mmap'd pages it
        touched resident, which would add up to the whole checkpoint over a conversion. A published expert
        name served from a fused tensor reads only that expert's rows.
        """
        if name in self.aliases:
            src, expert, rows = self.aliases[name]
            if expert is None:
                return self.get(src)
            lo, hi = rows if rows is not None else (0, None)
            if self.safetensors:
                from safetensors import safe_open

                with safe_open(str(self.files[src]), framework="pt") as f:
                    part = f.get_slice(src)[expert: expert + 1]
                return part[0, lo:hi].contiguous()
            return self._handle(self.files[src])[src][expert, lo:hi].clone()
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(str(self.files[name]), framework="pt") as f:
                return f.get_tensor(name)
        return self._handle(self.files[name])[name].clone()

    def close(self) -> None:
        """Drop open handles."""
        self._open.clear()


def _check_hf_tensors(weights: HFWeights, cfg: ModelConfig, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Key set, shapes and dtypes of the HF checkpoint against ``cfg``; returns the source dtype."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule, layer, expert in iter_tensors(cfg):
        expected.update(zip(hf_names(rule, layer, expert), hf_shapes(rule, cfg)))
    have = weights.names()
    missing = sorted(set(expected) - have)
    if missing:
        raise ValueError(f"the HF checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:4]}")
    extra = sorted(n for n in have - set(expected) if not n.endswith(IGNORED_HF_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        if not torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")):
            raise ValueError("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                             "model.embed_tokens.weight; fix tie_word_embeddings in config.json")
        extra.remove("lm_head.weight")
    if extra:
        raise ValueError(f"the HF checkpoint has {len(extra)} tensor(s) this architecture does not use, e.g. "
                         f"{extra[:4]}; is config.json the right one for these weights?")
    dtypes: dict[torch.dtype, str] = {}
    for name, shape in expected.items():
        got, dt = weights.meta(name)
        if got != shape:
            raise ValueError(f"{name}: shape {list(got)} does not match config.json (expected {list(shape)})")
        dtypes.setdefault(dt, name)
    if len(dtypes) > 1 and dtype is None:
        raise ValueError(
            "dtype mismatch in the HF checkpoint: " + ", ".join(f"{n} is {str(d).removeprefix('torch.')}" for d, n in dtypes.items())
            + "; pass --dtype to convert everything to one dtype"
        )
    return dtype or next(iter(dtypes))


# ------------------------------------------------------------------------------------------------
# atomic output
# ------------------------------------------------------------------------------------------------
@contextmanager
def _staging_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield ``<final>.tmp``; on success swap it in (replacing ``final`` if ``overwrite``), on failure delete it."""
    if final.exists() and not overwrite:
        raise ValueError(f"output {str(final)!r} already exists; pass --overwrite to replace it or pick another path")
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        from camopd_megatron.checkpoint.dist import swap_in_dir

        swap_in_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# HF -> ours
# ------------------------------------------------------------------------------------------------
def _lazy_planner(items: list[Any], resolvers: dict[tuple[str, tuple[int, ...]], Callable[[], Any]]) -> Any:
    """A DCP save planner over precomputed write items whose data is produced on demand."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class _LazySavePlanner(DefaultSavePlanner):
        def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
            self.state_dict, self.is_coordinator = {}, is_coordinator

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: Any) -> Any:
            offset = tuple(write_item.index.offset) if write_item.index.offset is not None else ()
            return resolvers[(write_item.index.fqn, offset)]()

    return _LazySavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _pickled(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _write_dcp(out: Path, weights: HFWeights, cfg: ModelConfig, dtype: torch.dtype, progress: bool) -> int:
    """Write the torch_dist shards of the converted model into ``out``; returns the tensor-item count."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
    from tqdm import tqdm

    items: list[Any] = []
    resolvers: dict[tuple[str, tuple[int, ...]], Callable[[], Any]] = {}
    files: dict[tuple[str, tuple[int, ...]], tuple[str, Optional[int]]] = {}
    """item -> the file it goes to: one per (key, layer), so a file holds one tensor, or one layer's experts of one
    weight (the writer keeps a file's tensors until the file is written)"""
    bar = tqdm(total=0, desc="HF -> megatron", unit="tensor", disable=not progress)

    def tensor_item(rule: TensorRule, layer: Optional[int], expert: Optional[int]) -> None:
        at = placement(rule, cfg, layer, expert)
        items.append(WriteItem(
            index=MetadataIndex(at.key, torch.Size(at.offsets)), type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(at.offsets), torch.Size(at.sizes)),
                                        properties=TensorProperties(dtype=dtype), size=torch.Size(at.global_shape)),
        ))

        def resolve() -> torch.Tensor:
            t = to_mcore(rule, [weights.get(n).to(dtype) for n in hf_names(rule, layer, expert)], cfg).contiguous()
            bar.update(1)
            return t.reshape(at.sizes)

        resolvers[(at.key, at.offsets)] = resolve
        files[(at.key, at.offsets)] = (at.key, layer)

    for rule, layer, expert in iter_tensors(cfg):
        tensor_item(rule, layer, expert)
    n_tensors = len(items)
    bar.total = n_tensors
    # megatron's ShardedObjects: per-layer linear extra states (None on the local spec) and the common state
    objects = {fqn: [None] for i in range(cfg.num_layers) for fqn in extra_state_objects(cfg, i)}
    objects["common_state/shard_0_1"] = [{}]
    for fqn, value in objects.items():
        items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
        resolvers[(fqn, ())] = lambda value=value: _pickled(value)
        files[(fqn, ())] = (fqn.split("/shard_")[0], None)
    class _Writer(FileSystemWriter):
        def storage_meta(self) -> None:  # a Path in .metadata would fail dist.check_dcp_metadata's allow-list
            return None

        def write_data(self, plan: SavePlan, planner: Any) -> Any:
            """One file per group of :data:`files` (torch's own choice is one per item or one per rank)."""
            groups: dict[tuple[str, Optional[int]], list[Any]] = {}
            for item in plan.items:
                offsets = tuple(item.index.offset) if item.index.offset is not None else ()
                groups.setdefault(files[(item.index.fqn, offsets)], []).append(item)
            queue: Queue = Queue()
            for k, group in enumerate(groups.values()):
                name = f"{plan.storage_data.prefix}{k}.distcp"
                queue.put((self.fs.concat_path(self.path, name), name, group))
            return self._write_data(planner, queue)

    # the writer resolves a file's tensors one by one but holds them until the file is written
    writer = _Writer(str(out), single_file_per_rank=False, sync_files=True, thread_count=1)
    try:
        dcp_save({}, storage_writer=writer, planner=_lazy_planner(items, resolvers), no_dist=True)
    except CheckpointException as e:  # re-raise what went wrong (DCP wraps it as (exception, stack) per rank)
        failure = next(iter(e.failures.values()), None)
        if isinstance(failure, tuple) and failure and isinstance(failure[0], Exception):
            raise failure[0] from e
        raise
    finally:
        bar.close()
    (out / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return n_tensors


def _write_manifest(out: Path, cfg: ModelConfig, common: dict[str, Any]) -> None:
    """``camopd.json`` exactly as :func:`.dist.save_checkpoint` writes it (one-process world, step 0)."""
    from camopd_megatron.checkpoint import dist as ckpt

    (out / ckpt.RANKS_DIR).mkdir(exist_ok=True)
    ckpt.write_manifest(out, cfg, step=0, world_size=1, common=common)


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    dtype: Optional[str] = None,
    vocab_pad_multiple: int = 128,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a HF model directory into our distributed checkpoint at ``out_dir`` (layout-free).

    Args:
        hf_dir: directory with config.json and the weights.
        out_dir: the checkpoint directory to create.
        tp / pp: only validated (heads, kv heads, FFN, padded vocab / layers divisible).
        ep / etp: only validated (an MoE model's experts / expert FFN divisible; etp None = tp).
        dtype: ``auto``/None keeps the source dtype, else ``float32|bfloat16|float16``.
        vocab_pad_multiple: padded vocabulary multiple (must equal ``model.vocab_pad_multiple`` in training).
        overwrite: replace an existing ``out_dir``.
        progress: show a tqdm progress bar.
    Returns:
        The final path.
    """
    t0 = time.perf_counter()
    src, final = Path(hf_dir), Path(out_dir).absolute()
    hf_cfg = read_hf_config(src)
    cfg = model_config_from_hf(hf_cfg, vocab_pad_multiple=vocab_pad_multiple)
    check_layout(cfg, tp, pp, ep, etp)
    target = parse_dtype(dtype)
    weights = HFWeights(src)
    try:
        weights.read_fused(fused_expert_sources(cfg, weights.names()))
        out_dtype = _check_hf_tensors(weights, cfg, target)
        with _staging_dir(final, overwrite) as tmp:
            n = _write_dcp(tmp, weights, cfg, out_dtype, progress)
            side = copy_side_files(src, tmp / HF_SUBDIR, HF_SIDE_FILES)
            common = {"model_config": asdict(cfg), "hf_source": str(src.absolute()), "dtype": str(out_dtype),
                      "hf_files": side}
            _write_manifest(tmp, cfg, common)
    finally:
        weights.close()
    logger.info("converted %s -> %s (%s, %d tensors, %s) in %.1fs", src, final, cfg.arch, n,
                str(out_dtype).removeprefix("torch."), time.perf_counter() - t0)
    return final


# ------------------------------------------------------------------------------------------------
# ours -> HF
# ------------------------------------------------------------------------------------------------
def _export_config(ckpt: Path, manifest: dict[str, Any], hf_config_from: Optional[Path]) -> tuple[ModelConfig, Optional[dict], Path | None]:
    """The model config, the HF base config.json (if any) and the directory holding side files."""
    side = ckpt / HF_SUBDIR if (ckpt / HF_SUBDIR / "config.json").is_file() else None
    if hf_config_from is not None:
        side = Path(hf_config_from)
    saved = manifest.get("model", {})
    if side is not None:
        base = read_hf_config(side)
        cfg = model_config_from_hf(base, vocab_pad_multiple=int(saved.get("vocab_pad_multiple", 128)))
    elif isinstance(manifest.get("model_config"), dict):  # every checkpoint written by save_checkpoint
        base, cfg = None, ModelConfig(**manifest["model_config"])
    elif isinstance(manifest.get("common", {}).get("model_config"), dict):
        base, cfg = None, ModelConfig(**manifest["common"]["model_config"])
    else:
        raise ValueError(
            f"{str(ckpt)!r} records only the model shape, not its RoPE/norm settings (no {HF_SUBDIR}/config.json); "
            "pass --hf-config DIR (the HF model it was converted from) to supply config.json and the tokenizer"
        )
    from camopd_megatron.checkpoint.dist import ARCH_KEYS, arch_dict

    want = arch_dict(cfg)
    # a run may train with other MoE settings (dispatcher, loss coefficients) than config.json implies
    saved = dict(saved, moe=moe_structure(saved.get("moe")))
    want["moe"] = moe_structure(want["moe"])
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config.json {want[k]!r}" for k in ARCH_KEYS if saved.get(k) != want[k]]
    if diffs:
        raise ValueError(f"the HF config does not match checkpoint {str(ckpt)!r}: " + "; ".join(diffs)
                         + ". Pass --hf-config pointing to the model this checkpoint came from")
    return cfg, base, side


def _plan_shards(entries: list[tuple[str, int]], max_bytes: int) -> tuple[dict[str, str], list[list[str]]]:
    """Greedy split of (name, nbytes) in order into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    return {name: files[k] for k, names in enumerate(shards) for name in names}, shards


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Optional[str] = None,
    max_shard_bytes: int = 2 * 1024**3,
    hf_config_from: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export our checkpoint (any saved TP/PP) as a HF model directory (sharded safetensors + index).

    Args:
        ckpt_dir: our checkpoint directory, or a run's ``checkpoints/`` root (its latest checkpoint).
        out_dir: the HF directory to create.
        dtype: ``auto``/None keeps the stored dtype, else ``float32|bfloat16|float16``.
        max_shard_bytes: target size of one safetensors file.
        hf_config_from: HF model directory to take config.json / generation_config.json / tokenizer
            files from (default: the ones saved inside the checkpoint at import).
        overwrite: replace an existing ``out_dir``.
        progress: show a tqdm progress bar.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from camopd_megatron.checkpoint.dist import check_dcp_metadata, read_manifest
    from camopd_megatron.checkpoint.manager import resolve_checkpoint_dir

    if max_shard_bytes <= 0:
        raise ValueError(f"--max-shard-size={max_shard_bytes}: must be positive")
    t0 = time.perf_counter()
    ckpt, final = resolve_checkpoint_dir(Path(ckpt_dir).absolute()), Path(out_dir).absolute()
    manifest = read_manifest(ckpt)
    check_dcp_metadata(ckpt)
    cfg, base, side = _export_config(ckpt, manifest, Path(hf_config_from) if hf_config_from else None)
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    rules = active_rules(cfg)
    keys = {placement(r, cfg, i, None).key: r for r in rules
            for i in (range(cfg.num_layers) if r.per_layer else [None]) if rule_applies(r, cfg, i)}
    absent = [k for k in keys if k not in stored]
    if absent:
        raise ValueError(f"checkpoint {str(ckpt)!r} lacks {absent[:4]}; it is not a complete model checkpoint")
    target = parse_dtype(dtype)
    out_dtype = target or stored[next(iter(keys))].properties.dtype
    groups: list[tuple[Optional[int], list[TensorRule]]] = [(None, [r for r in rules if not r.per_layer and r.reshape == "vocab" and "embedding" in r.mcore])]
    groups += [(i, [r for r in rules if r.per_layer and rule_applies(r, cfg, i)]) for i in range(cfg.num_layers)]
    groups.append((None, [r for r in rules if not r.per_layer and "embedding" not in r.mcore]))
    entries = []
    for rule, layer, expert in iter_tensors(cfg):
        for name, shape in zip(hf_names(rule, layer, expert), hf_shapes(rule, cfg)):
            entries.append((name, int(torch.Size(shape).numel()) * out_dtype.itemsize))
    weight_map, shards = _plan_shards(entries, max_shard_bytes)
    with _staging_dir(final, overwrite) as tmp:
        buffer: dict[str, torch.Tensor] = {}
        shard_idx = 0
        for layer, grp in tqdm(groups, desc="megatron -> HF", unit="layer", disable=not progress):
            for rule, tensor in _load_group(ckpt, grp, layer, cfg, stored).items():
                for expert, one in (enumerate(tensor) if rule.per_expert else [(None, tensor)]):
                    for name, t in zip(hf_names(rule, layer, expert), to_hf(rule, one, cfg)):
                        buffer[name] = t.to(out_dtype)
            while shard_idx < len(shards) and all(n in buffer for n in shards[shard_idx]):
                names = shards[shard_idx]
                save_file({n: buffer.pop(n) for n in names}, str(tmp / weight_map[names[0]]), metadata={"format": "pt"})
                shard_idx += 1
        assert not buffer and shard_idx == len(shards), "every planned shard is written"
        if len(shards) > 1:
            total = sum(b for _, b in entries)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, base=base, dtype=out_dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(side, base), indent=2))
        copied = copy_side_files(side, tmp, TOKENIZER_FILES) if side is not None else []
        if not any(n in copied for n in TOKENIZER_MODELS):
            logger.warning("%s carries no tokenizer (no %s under %s/): the export has none, and transformers' "
                           "AutoTokenizer would not load it; pass --hf-config DIR (the HF model it came from) to add "
                           "one", ckpt, "/".join(TOKENIZER_MODELS), HF_SUBDIR)
    logger.info("exported %s -> %s (%d shard(s), %s) in %.1fs", ckpt, final, len(shards),
                str(out_dtype).removeprefix("torch."), time.perf_counter() - t0)
    return final


def _load_group(ckpt: Path, rules: list[TensorRule], layer: Optional[int], cfg: ModelConfig,
                stored: dict[str, Any]) -> dict[TensorRule, torch.Tensor]:
    """Read one layer's (or the embedding's / the head's) megatron tensors from the torch_dist shards.

    A torch DCP read of exactly that region: only the stored chunks overlapping it are read, whatever
    TP/PP the checkpoint was saved at. (megatron's own loader cannot read a part of a tensor in a
    one-process world: it insists every layer fragment be local.)
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    dest: dict[str, torch.Tensor] = {}
    items = []
    for rule in rules:
        at = placement(rule, cfg, layer)
        md = stored[at.key]
        if tuple(md.size) != at.global_shape:
            raise ValueError(f"{at.key}: stored shape {list(md.size)} does not match the model ({list(at.global_shape)})")
        dest[at.key] = torch.empty(at.sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(at.offsets), sizes=torch.Size(at.sizes))
        items += create_read_items_for_chunk_list(at.key, md, [chunk])

    # A class made inside a function sits in a reference cycle (freed only by the cyclic GC), so the
    # destination tensors hang off the instance, never off a closure: they are freed with the layer.
    class _RegionLoadPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
            self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(self.items)

        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            t = self.dest[read_item.dest_index.fqn]
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                t = t.narrow(dim, o, n)
            return t

        def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
            pass  # resolve_tensor handed out a view of the destination: already in place

    planner = _RegionLoadPlanner()
    planner.items, planner.dest = items, dest
    dcp_load({}, storage_reader=FileSystemReader(str(ckpt)), planner=planner, no_dist=True)
    # without the stacked layer axis: [...], or the layer's experts [E, ...]
    return {rule: dest[placement(rule, cfg, layer).key].reshape(
        ((cfg.moe.num_experts,) if rule.per_expert else ()) + mcore_shape(rule, cfg)) for rule in rules}
