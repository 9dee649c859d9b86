"""Prompt sources for the trainer: a per-branch stream over files, a synthetic source, and the factory.

Two ways to split data over data-parallel (DP) ranks:

- ``mode="global"`` (what the trainer uses): every rank draws the same global batch of ``n`` prompts
  per step per branch — the order depends on (seed, branch, epoch) only, never on the DP size — then
  takes its contiguous share with :func:`rank_slice`. Gap selection sees global positions (the batch
  order) and stable record ids (``Prompt.index``). Bad or too-long records are skipped identically on
  every rank, so the batches stay equal.
- ``mode="sharded"``: each rank reads only the epoch positions ``p`` with ``p % dp_size == dp_rank``
  (disjoint shares that together cover the epoch) and ``next_batch(n)`` returns ``n`` per rank.

Both keep their position in ``state_dict()`` (epoch, cursor, counters, and a fingerprint of the files
checked on load), so a resumed run draws exactly the prompts it would have drawn.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Optional, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np

from camopd_megatron.data.dataset import BranchDataset, Prompt, finish_ids, new_counts
from camopd_megatron.data.templates import DataError, PromptRecord, render
from camopd_megatron.data.tokenizers import Tokenizer

__all__ = ["PromptSource", "PromptStream", "SyntheticPromptSource", "rank_slice", "build_prompt_sources"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@runtime_checkable
class PromptSource(Protocol):
    """What the trainer draws prompts from (one source per branch)."""

    branch: str

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (the global batch in global mode, this rank's in sharded mode)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Position and counters, for exact resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters (loaded, bad_skipped, blank, dropped_too_long, truncated) for metrics."""
        ...


def rank_slice(batch: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """DP rank ``dp_rank``'s contiguous share of a global batch (``len(batch)`` must divide by ``dp_size``)."""
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"rank_slice: dp_rank={dp_rank}, dp_size={dp_size}; expected 0 <= dp_rank < dp_size")
    if len(batch) % dp_size:
        raise ValueError(f"rollout.prompts_per_step: a global batch of {len(batch)} prompts does not split over "
                         f"{dp_size} data-parallel ranks; use a multiple of {dp_size}")
    per = len(batch) // dp_size
    return list(batch[dp_rank * per:(dp_rank + 1) * per])


class PromptStream:
    """An endless, resumable stream of one branch's prompts (epoch after epoch)."""

    def __init__(self, dataset: BranchDataset, *, mode: str = "global", dp_rank: int = 0, dp_size: int = 1) -> None:
        if mode not in ("global", "sharded"):
            raise ValueError(f"PromptStream(mode={mode!r}): use 'global' or 'sharded'")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptStream: dp_rank={dp_rank}, dp_size={dp_size}; expected 0 <= dp_rank < dp_size")
        if mode == "sharded" and dataset.epoch_length < dp_size:
            raise ValueError(f"data.branches.{dataset.branch}: {dataset.epoch_length} prompts per epoch cannot be "
                             f"sharded over {dp_size} data-parallel ranks; add prompts or use the global mode")
        self.dataset, self.branch, self.mode = dataset, dataset.branch, mode
        self.dp_rank, self.dp_size = (dp_rank, dp_size) if mode == "sharded" else (0, 1)
        self.epoch, self.cursor = 0, self.dp_rank
        self.counts = new_counts()
        self._epoch_counts = new_counts()
        self._order: Optional[np.ndarray] = None

    def _current_order(self) -> np.ndarray:
        if self._order is None:
            self._order = self.dataset.epoch_order(self.epoch)
        return self._order

    def _end_epoch(self) -> None:
        logger.info("branch %s: epoch %d done: %s", self.branch, self.epoch, self._epoch_counts)
        if self._epoch_counts["loaded"] == 0:
            raise DataError(f"data.branches.{self.branch}: a whole epoch gave no usable prompt ({self._epoch_counts}); "
                            "fix the files, raise data.max_prompt_tokens or use data.too_long: truncate")
        self.epoch += 1
        self.cursor = self.dp_rank
        self._order = None
        self._epoch_counts = new_counts()

    def next_prompt(self) -> Prompt:
        """The next usable prompt of this stream (crossing epochs as needed)."""
        length = self.dataset.epoch_length
        while True:
            if self.cursor >= length:
                self._end_epoch()
                continue
            pos = self.cursor
            rid = int(self._current_order()[pos])
            self.cursor += self.dp_size
            before = dict(self._epoch_counts)
            prompt = self.dataset.load(rid, self._epoch_counts, position=self.epoch * length + pos)
            for key, value in self._epoch_counts.items():
                self.counts[key] += value - before[key]
            if prompt is not None:
                return prompt

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts: the global batch (global mode) or this rank's (sharded mode)."""
        if n < 0:
            raise ValueError(f"next_batch(n={n}): n must be >= 0")
        return [self.next_prompt() for _ in range(n)]

    def stats(self) -> dict[str, int]:
        """Counters since the start of the run (restored on resume)."""
        return dict(self.counts)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, cursor, counters and the dataset fingerprint."""
        return {"kind": "files", "mode": self.mode, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "epoch": self.epoch, "cursor": self.cursor, "counts": dict(self.counts),
                "epoch_counts": dict(self._epoch_counts), "fingerprint": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` stopped; a different file set, seed or layout is an error."""
        if state.get("kind") != "files":
            raise ValueError(f"data state of branch {self.branch!r}: saved from a {state.get('kind')!r} source, "
                             "but data.branches now names files; resume with the same data config")
        mine = self.dataset.fingerprint()
        if state["fingerprint"] != mine:
            diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
            raise ValueError(f"data state of branch {self.branch!r}: the checkpoint was written with different data "
                             f"({', '.join(diff)} changed); resume with the same data settings and files")
        layout = (state["mode"], state["dp_rank"], state["dp_size"])
        if layout != (self.mode, self.dp_rank, self.dp_size):
            raise ValueError(f"data state of branch {self.branch!r}: saved with mode/dp_rank/dp_size {layout}, now "
                             f"{(self.mode, self.dp_rank, self.dp_size)}; the global mode resumes at any DP size")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.counts, self._epoch_counts = dict(state["counts"]), dict(state["epoch_counts"])
        self._order = None


_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "mirror")


def synthetic_prompt_text(branch: str, index: int, seed: int) -> str:
    """A deterministic templated prompt (``domain``: a shift cipher; any other branch: small general tasks)."""
    rng = random.Random(f"{seed}:{branch}:{index}")
    if branch == "domain":
        word = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))
        return f"Encode with the shift-3 cipher: {word}"
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is {rng.randint(0, 999)} + {rng.randint(0, 999)}?"
    if kind == 1:
        return "Sort the numbers: " + " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(3, 6)))
    return "Repeat the words: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))


class SyntheticPromptSource:
    """Templated prompts encoded with the given (usually byte) tokenizer; used when ``data.branches`` is empty.

    Endless and stateless apart from a counter: prompt ``i`` depends only on (seed, branch, i), so the
    global batch is the same on every rank and resume is exact. ``Prompt.index == Prompt.position == i``.
    """

    def __init__(self, branch: str, tokenizer: Tokenizer, *, seed: int = 0, template: str = "plain",
                 max_prompt_tokens: int = 512, too_long: str = "truncate") -> None:
        self.branch, self.tokenizer, self.seed = branch, tokenizer, seed
        self.template, self.max_prompt_tokens, self.too_long = template, max_prompt_tokens, too_long
        self.position = 0
        self.counts = new_counts()
        render(PromptRecord("x", None, None), template)  # validates the template name

    def _make(self, i: int) -> Optional[Prompt]:
        text, special = render(PromptRecord(synthetic_prompt_text(self.branch, i, self.seed), None, None), self.template)
        raw = self.tokenizer.encode(text, add_special_tokens=special)
        ids = finish_ids(raw, self.max_prompt_tokens, self.too_long, self.tokenizer.bos_id)
        if ids is None:
            self.counts["dropped_too_long"] += 1
            return None
        self.counts["truncated"] += int(len(ids) < len(raw))
        self.counts["loaded"] += 1
        return Prompt(ids=ids, text=text, index=i, branch=self.branch, domain=self.branch, position=i)

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` synthetic prompts (the same on every rank)."""
        out: list[Prompt] = []
        misses = 0
        while len(out) < n:
            prompt = self._make(self.position)
            self.position += 1
            if prompt is None:
                misses += 1
                if misses > 1000:
                    raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens} drops every synthetic prompt; "
                                     "raise it or use data.too_long: truncate")
                continue
            out.append(prompt)
        return out

    def stats(self) -> dict[str, int]:
        """Counters since the start of the run."""
        return dict(self.counts)

    def state_dict(self) -> dict[str, Any]:
        """The counter (and the seed, checked on load)."""
        return {"kind": "synthetic", "branch": self.branch, "seed": self.seed, "position": self.position,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved counter."""
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed:
            raise ValueError(f"data state of branch {self.branch!r}: saved from {state.get('kind')!r} data with seed "
                             f"{state.get('seed')}, now synthetic with seed {self.seed}; resume with the same config")
        self.position, self.counts = int(state["position"]), dict(state["counts"])


def build_prompt_sources(data: Any, branches: Sequence[str], tokenizer: Tokenizer, seed: int, *,
                         mode: str = "global", dp_rank: int = 0, dp_size: int = 1) -> dict[str, PromptSource]:
    """One source per branch from a ``DataConfig`` (``cfg.data``): file streams, or synthetic when it lists none."""
    sources: dict[str, PromptSource] = {}
    for name in branches:
        if not data.branches:
            sources[name] = SyntheticPromptSource(name, tokenizer, seed=seed, template=data.chat_template,
                                                  max_prompt_tokens=data.max_prompt_tokens, too_long=data.too_long)
            continue
        if name not in data.branches:
            raise ValueError(f"data.branches: no entry for scheduled branch {name!r} (have {sorted(data.branches)}); "
                             f"add data.branches.{name}.paths")
        b = data.branches[name]
        dataset = BranchDataset(
            name, b.paths, tokenizer, weights=b.weights, template=data.chat_template,
            max_prompt_tokens=data.max_prompt_tokens, too_long=data.too_long, on_bad_line=data.on_bad_line,
            heldout_fraction=data.heldout_fraction, shuffle=data.shuffle, seed=seed,
        )
        sources[name] = PromptStream(dataset, mode=mode, dp_rank=dp_rank, dp_size=dp_size)
    return sources
