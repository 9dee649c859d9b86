"""Random access to the records of one prompt file without loading it: JSONL by a byte-offset index,
Parquet by row groups.

JSONL: one pass over the file in 8 MiB blocks finds every newline (numpy) and keeps the start offset
of each line in an int64 array (8 B per line, plus one end offset); record ``i`` is then one
``os.pread`` of line ``i``. The file's bytes are never held (pread does not map the file, so the
page cache does not count in the process's RSS). Blank lines keep their slot (so record ``i`` is
line ``i + 1`` in error messages) and read as None.

Parquet: only the ``prompt``/``messages``/``domain`` columns are read. A file whose columns are small
(<= ``load_all_bytes`` uncompressed) is read once; a larger one keeps a small LRU of decoded row
groups, so a shuffled pass over a large multi-row-group file decodes a row group per record — prefer
JSONL (or small row groups) for very large shuffled prompt sets.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from camopd_megatron.data.templates import DataError

__all__ = ["RecordFile", "JsonlFile", "ParquetFile", "open_record_file"]

logger = logging.getLogger(__name__)

_BLOCK = 8 << 20
_COLUMNS = ("prompt", "messages", "domain")


class RecordFile(Protocol):
    """A file of prompt records with random access."""

    path: str

    def __len__(self) -> int:
        """Number of record slots (JSONL lines incl. blank ones, Parquet rows)."""
        ...

    def read(self, i: int) -> Optional[dict[str, Any]]:
        """Decoded record ``i`` (None for a blank line); raises DataError naming file and line."""
        ...

    def where(self, i: int) -> str:
        """``"path:line N"`` / ``"path:row N"`` for messages."""
        ...


class JsonlFile:
    """A JSONL file indexed by line start offsets (``offsets``: int64 [lines + 1])."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd: Optional[int] = None
        try:
            size = os.path.getsize(self.path)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open prompt file ({exc.strerror}); check data.branches.*.paths") from exc
        self.offsets = self._index(size)
        if len(self) == 0 or not self._has_content():
            raise DataError(f"{self.path}: empty prompt file (no records); remove it from data.branches.*.paths or fill it")

    def _index(self, size: int) -> np.ndarray:
        """Start offset of every line, then the file size: one sequential pass, numpy per block."""
        starts = [np.zeros(1, dtype=np.int64)]
        last = b"\n"
        with open(self.path, "rb") as f:
            pos = 0
            while True:
                block = f.read(_BLOCK)
                if not block:
                    break
                nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64)
                starts.append(nl + (pos + 1))
                pos += len(block)
                last = block[-1:]
        offsets = np.concatenate(starts)
        if size > 0 and last != b"\n":  # a last line without its newline still counts
            offsets = np.append(offsets, np.int64(size))
        return offsets

    def _has_content(self) -> bool:
        """False when every line is blank (reads lines until one holds data: the first, in practice)."""
        return any(self._line(i).strip() for i in range(len(self)))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _line(self, i: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return os.pread(self._fd, end - start, start)

    def where(self, i: int) -> str:
        """``path:line N`` (1-based)."""
        return f"{self.path}:line {i + 1}"

    def read(self, i: int) -> Optional[dict[str, Any]]:
        """The JSON object on line ``i + 1``; None for a blank line."""
        raw = self._line(i)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise DataError(f"{self.where(i)}: malformed JSON ({msg}): {raw[:60]!r}") from exc

    def close(self) -> None:
        """Close the read descriptor (reopened on the next read)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class ParquetFile:
    """A Parquet file read by row groups (only the prompt columns)."""

    def __init__(self, path: str | Path, load_all_bytes: int = 256 << 20, cache_row_groups: int = 4) -> None:
        import pyarrow.parquet as pq

        self.path = str(path)
        try:
            self._pf = pq.ParquetFile(self.path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot read Parquet ({exc}); check data.branches.*.paths") from exc
        names = self._pf.schema_arrow.names
        self._columns = [c for c in _COLUMNS if c in names]
        if "prompt" not in self._columns and "messages" not in self._columns:
            raise DataError(f"{self.path}: no 'prompt' or 'messages' column (columns: {names}); rename the prompt column")
        meta = self._pf.metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise DataError(f"{self.path}: empty prompt file (0 rows); remove it from data.branches.*.paths or fill it")
        wanted = {self._pf.schema_arrow.get_field_index(c) for c in self._columns}
        col_bytes = sum(
            meta.row_group(g).column(k).total_uncompressed_size
            for g in range(meta.num_row_groups) for k in range(meta.num_columns) if k in wanted
        )
        self._table = self._pf.read(columns=self._columns) if col_bytes <= load_all_bytes else None
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_size = cache_row_groups

    def __len__(self) -> int:
        return int(self._starts[-1])

    def where(self, i: int) -> str:
        """``path:row N`` (0-based row number)."""
        return f"{self.path}:row {i}"

    def _row_group(self, g: int) -> Any:
        table = self._cache.get(g)
        if table is None:
            table = self._pf.read_row_group(g, columns=self._columns)
            self._cache[g] = table
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return table

    def read(self, i: int) -> Optional[dict[str, Any]]:
        """Row ``i`` as a dict of the prompt columns (nulls dropped)."""
        if self._table is not None:
            table, r = self._table, i
        else:
            g = int(np.searchsorted(self._starts, i, side="right")) - 1
            table, r = self._row_group(g), i - int(self._starts[g])
        row = {c: table.column(c)[r].as_py() for c in self._columns}
        return {k: v for k, v in row.items() if v is not None}


def open_record_file(path: str | Path) -> RecordFile:
    """:class:`ParquetFile` for ``*.parquet`` / ``*.pq``, :class:`JsonlFile` otherwise (``.jsonl``, ``.json``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return ParquetFile(path)
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unknown prompt file type {suffix!r}; use .jsonl (one JSON object per line) or .parquet")
    return JsonlFile(path)
