"""One branch's prompt set: its files, per-file weights, the held-out split, each epoch's order, and
loading one record as a tokenized :class:`Prompt`.

Record ids: the files of a branch are concatenated in ``paths`` order, so record ``id`` is row
``id - base[k]`` of file ``k`` (``Prompt.index``; stable across DP sizes and resumes).

Held-out split: a record is held out when ``splitmix64(row, crc32(file name)) / 2**64 <
heldout_fraction`` — deterministic, independent of seed, DP size and the order of ``paths``.

Epoch order (a pure function of ``(seed, branch, epoch)``): the training rows of file ``k`` contribute
``c_k`` records, ``c_k = n_k`` without weights, else the total training count split by weight
(largest remainder); a file is repeated (fresh permutation per pass) when ``c_k > n_k`` and subsampled
when ``c_k < n_k``. With ``data.shuffle`` the concatenation is permuted; without it files come in
order. Memory: int64 ids, 8 B per record of the epoch (plus the files' line index, 8 B per line).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from camopd_megatron.data.files import RecordFile, open_record_file
from camopd_megatron.data.templates import TEMPLATES, DataError, parse_record, render
from camopd_megatron.data.tokenizers import Tokenizer

__all__ = ["Prompt", "BranchDataset", "new_counts", "heldout_mask", "finish_ids"]

logger = logging.getLogger(__name__)

_LOG_FIRST_BAD = 5


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt."""

    ids: list[int]
    """Token ids after the chat template and the length filter."""
    text: str
    """The rendered (templated) text before tokenisation."""
    index: int
    """The record's id within its branch (files concatenated in ``paths`` order); stable across DP sizes."""
    branch: str
    """The branch it belongs to."""
    domain: Optional[str] = None
    """The record's optional ``domain`` label."""
    position: int = -1
    """Its position in the branch's global stream (sample counter over all epochs); -1 outside a stream."""


def new_counts() -> dict[str, int]:
    """Zeroed counters of what loading did (kept in stream state, logged per epoch)."""
    return {"loaded": 0, "bad_skipped": 0, "blank": 0, "dropped_too_long": 0, "truncated": 0}


def heldout_mask(n: int, salt: int, fraction: float) -> np.ndarray:
    """bool [n]: row ``r`` is held out iff ``splitmix64(r ^ salt << 32) / 2**64 < fraction``."""
    if fraction <= 0.0:
        return np.zeros(n, dtype=bool)
    z = np.arange(n, dtype=np.uint64) ^ np.uint64((salt & 0xFFFFFFFF) << 32)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def finish_ids(ids: list[int], limit: int, too_long: str, bos_id: Optional[int]) -> Optional[list[int]]:
    """Apply the length filter: None when dropped; truncated from the left keeping a leading BOS."""
    if len(ids) <= limit:
        return ids
    if too_long == "drop":
        return None
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return [ids[0], *ids[len(ids) - limit + 1:]]
    return ids[len(ids) - limit:]


def _split_by_weight(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return [int(c) for c in counts]


class BranchDataset:
    """The prompt files of one branch with the settings that turn a record into a :class:`Prompt`."""

    def __init__(
        self,
        branch: str,
        paths: Sequence[str],
        tokenizer: Tokenizer,
        *,
        weights: Optional[Sequence[float]] = None,
        template: str = "plain",
        max_prompt_tokens: int = 512,
        too_long: str = "truncate",
        on_bad_line: str = "error",
        heldout_fraction: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        key = f"data.branches.{branch}"
        if not paths:
            raise ValueError(f"{key}.paths: got []; expected at least one prompt file. Fix: list the branch's .jsonl/.parquet files")
        if weights is not None and (len(weights) != len(paths) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"{key}.weights: got {list(weights)}; expected one non-negative weight per path "
                             f"({len(paths)} paths) with a positive sum. Fix: correct or drop the weights")
        if template not in TEMPLATES:
            raise ValueError(f"data.chat_template: got {template!r}; expected one of {', '.join(TEMPLATES)}")
        if too_long not in ("truncate", "drop"):
            raise ValueError(f"data.too_long: got {too_long!r}; expected truncate or drop")
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"data.on_bad_line: got {on_bad_line!r}; expected error or skip")
        if max_prompt_tokens <= 0:
            raise ValueError(f"data.max_prompt_tokens: got {max_prompt_tokens}; expected a value > 0")
        self.branch = branch
        self.tokenizer = tokenizer
        self.template, self.max_prompt_tokens, self.too_long = template, max_prompt_tokens, too_long
        self.on_bad_line, self.heldout_fraction = on_bad_line, heldout_fraction
        self.shuffle, self.seed = shuffle, seed
        self.files: list[RecordFile] = [open_record_file(p) for p in paths]
        sizes = [len(f) for f in self.files]
        self.bases = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._salts = [zlib.crc32(str(p).replace("\\", "/").rsplit("/", 1)[-1].encode()) for p in paths]
        self._train_sizes = [int(n - heldout_mask(n, s, heldout_fraction).sum()) for n, s in zip(sizes, self._salts)]
        if sum(self._train_sizes) == 0:
            raise ValueError(f"data.heldout_fraction: {heldout_fraction} leaves branch {branch!r} without training "
                             "records; lower it or add prompts")
        self.weights = list(weights) if weights is not None else None
        if self.weights is not None:
            for k, (w, n) in enumerate(zip(self.weights, self._train_sizes)):
                if w > 0 and n == 0:
                    raise ValueError(f"{key}.weights[{k}]: weight {w} for {paths[k]}, which has no training records")
        total = sum(self._train_sizes)
        self._counts = self._train_sizes if self.weights is None else _split_by_weight(total, self.weights)
        self._bad_logged = 0
        logger.info("branch %s: %d records in %d file(s) (%d held out), %d per epoch", branch, int(self.bases[-1]),
                    len(self.files), int(self.bases[-1]) - total, self.epoch_length)

    @property
    def epoch_length(self) -> int:
        """Records per epoch (the training records, or the weighted total)."""
        return int(sum(self._counts))

    @property
    def num_records(self) -> int:
        """All record slots over the branch's files (training + held out, blank lines included)."""
        return int(self.bases[-1])

    def fingerprint(self) -> dict[str, object]:
        """What a saved stream position depends on (checked on resume)."""
        return {"branch": self.branch, "files": [f.path.replace("\\", "/").rsplit("/", 1)[-1] for f in self.files], "sizes": [len(f) for f in self.files],
                "weights": self.weights, "seed": self.seed, "shuffle": self.shuffle,
                "heldout_fraction": self.heldout_fraction}

    def _rows(self, k: int, heldout: bool) -> np.ndarray:
        """Training (or held-out) row numbers of file ``k``."""
        n = len(self.files[k])
        if self.heldout_fraction <= 0.0:
            return np.arange(n, dtype=np.int64) if not heldout else np.zeros(0, dtype=np.int64)
        mask = heldout_mask(n, self._salts[k], self.heldout_fraction)
        return np.flatnonzero(mask if heldout else ~mask).astype(np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [epoch_length]: record ids in epoch ``epoch``'s order (same on every rank)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(self.branch.encode()), epoch])
        parts = []
        for k, c in enumerate(self._counts):
            if c == 0:
                continue
            n = self._train_sizes[k]
            rows = self._rows(k, heldout=False) if self.heldout_fraction > 0.0 or not self.shuffle else None
            passes = []
            for _ in range(-(-c // n)):  # a file is repeated (fresh permutation each pass) when c > n
                if not self.shuffle:
                    passes.append(rows)
                elif rows is None:
                    passes.append(rng.permutation(n))  # no arange copy: 8 B per record
                else:
                    passes.append(rng.permutation(rows))
            picked = passes[0][:c] if len(passes) == 1 else np.concatenate(passes)[:c]
            picked += self.bases[k]
            parts.append(picked)
        order = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.shuffle and len(parts) > 1:
            rng.shuffle(order)  # in place
        return order

    def heldout_ids(self) -> np.ndarray:
        """int64: ids of the held-out records, in file order (for eval)."""
        parts = [self._rows(k, heldout=True) + self.bases[k] for k in range(len(self.files))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def load(self, record_id: int, counts: dict[str, int], position: int = -1) -> Optional[Prompt]:
        """Record ``record_id`` as a Prompt; None when it is blank, bad (``on_bad_line: skip``) or dropped."""
        k = int(np.searchsorted(self.bases, record_id, side="right")) - 1
        f, row = self.files[k], int(record_id - self.bases[k])
        try:
            obj = f.read(row)
            if obj is None:
                counts["blank"] += 1
                return None
            record = parse_record(obj, f.where(row))
        except DataError as exc:
            if self.on_bad_line == "error":
                raise DataError(f"{exc} (set data.on_bad_line: skip to skip such records, counted)") from exc
            counts["bad_skipped"] += 1
            if self._bad_logged < _LOG_FIRST_BAD:
                self._bad_logged += 1
                logger.warning("skipping bad record (data.on_bad_line=skip): %s", exc)
            return None
        text, special = render(record, self.template)
        raw = self.tokenizer.encode(text, add_special_tokens=special)
        ids = finish_ids(raw, self.max_prompt_tokens, self.too_long, self.tokenizer.bos_id)
        if ids is None:
            counts["dropped_too_long"] += 1
            return None
        if len(ids) < len(raw):
            counts["truncated"] += 1
        counts["loaded"] += 1
        return Prompt(ids=ids, text=text, index=int(record_id), branch=self.branch, domain=record.domain, position=position)

    def heldout_prompts(self, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Prompt]:
        """The held-out prompts (file order), this rank's strided share; skipped ones are logged at the end."""
        counts = new_counts()
        for j, rid in enumerate(self.heldout_ids()[dp_rank::dp_size]):
            prompt = self.load(int(rid), counts, position=j * dp_size + dp_rank)
            if prompt is not None:
                yield prompt
        logger.info("branch %s held-out set (rank %d/%d): %s", self.branch, dp_rank, dp_size, counts)
