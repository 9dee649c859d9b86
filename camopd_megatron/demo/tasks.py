"""Synthetic text tasks with exact checkers: the forgetting testbed of the CPU demo.

Every problem is a prompt string and an answer string over printable ASCII, so the char-level
:class:`~camopd_megatron.data.ByteTokenizer` (128 ids) encodes it one character per token. A
training / eval sequence is ``[BOS] prompt answer [EOS]``: the plain chat template prepends BOS to
a prompt (as the trainer's prompt pipeline does), and the model must end its answer with EOS so
greedy generation stops.

Tasks (``task:`` prefix, then the input, then ``=``):

=========  ==========================  ================  =========
task       prompt                       answer            branch
=========  ==========================  ================  =========
``cpy``    ``c:kbdf=``                  ``kbdf``          general
``rev``    ``r:kbdf=``                  ``fdbk``          general
``srt``    ``s:3912=``                  ``1239``          general
``mrk``    ``m:kbdf=``                  ``kbdf!``         domain
=========  ==========================  ================  =========

``mrk`` ("marked copy") is the "domain skill" learnt in stage 2: a general task (copy) with a
different output convention (a trailing ``!``). It shares the general tasks' letters, lengths and
copy circuit, so specialising on it interferes with them (the model starts marking or garbling its
copies and reversals) without wiping them out, and recovering general skill pulls against the
domain convention: genuine branch conflict, partial forgetting (docs/algorithm.md §1). An earlier version
used a Caesar cipher, a brand-new 26-entry mapping: by the time stage 2 had learnt it, the general
skill was gone entirely (0.2%), which is not the paper's regime.

Distributions ("splits"). Each task has three disjoint pools of problems, decided by a hash of the
prompt (so membership is exact and the same on every machine):

* ``eval``: held out from everything; all accuracies in the report are measured here.
* ``train``: what the teachers are trained on (full operand ranges / lengths / letters).
* ``proxy``: the student's general/domain prompts in stage 3. For the general tasks they come from
  a *narrower* generator than the general teacher's training data (shorter strings, fewer
  letters / digits), so they do not cover the training distribution (docs/algorithm.md §1: only proxy
  prompts are available); eval still covers the full ranges.

Checkers are exact: :func:`check` compares the decoded response (up to EOS) with the answer.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "GENERAL_TASKS",
    "DOMAIN_TASKS",
    "ALL_TASKS",
    "SPLITS",
    "Problem",
    "solve",
    "check",
    "split_of",
    "sample_problem",
    "sample_problems",
    "write_prompt_file",
    "branch_of",
]

GENERAL_TASKS: tuple[str, ...] = ("cpy", "rev", "srt")
"""The general teacher's skills (and the general proxy prompts' tasks)."""
DOMAIN_TASKS: tuple[str, ...] = ("mrk",)
"""The domain skill learnt in stage 2."""
ALL_TASKS: tuple[str, ...] = GENERAL_TASKS + DOMAIN_TASKS
SPLITS: tuple[str, ...] = ("train", "proxy", "eval")

_PREFIX = {"cpy": "c:", "rev": "r:", "srt": "s:", "mrk": "m:"}
_EVAL_MOD = 8
"""A prompt is held out for eval when its hash is 0 mod this (about 1/8 of each pool)."""
MAX_ANSWER_CHARS = 7
"""No answer is longer than this (generation budget = this + EOS)."""


@dataclass(frozen=True)
class Problem:
    """One problem: prompt text, exact answer text and its task name."""

    task: str
    prompt: str
    answer: str


def branch_of(task: str) -> str:
    """``general`` or ``domain``."""
    if task in GENERAL_TASKS:
        return "general"
    if task in DOMAIN_TASKS:
        return "domain"
    raise ValueError(f"task: unknown task {task!r}; use one of {', '.join(ALL_TASKS)}")


def solve(task: str, body: str) -> str:
    """The exact answer of ``task`` on input ``body`` (the text between the prefix and ``=``)."""
    if task == "cpy":
        return body
    if task == "rev":
        return body[::-1]
    if task == "srt":
        return "".join(sorted(body))
    if task == "mrk":
        return body + "!"
    raise ValueError(f"task: unknown task {task!r}; use one of {', '.join(ALL_TASKS)}")


def _problem(task: str, body: str) -> Problem:
    return Problem(task, f"{_PREFIX[task]}{body}=", solve(task, body))


def _is_eval(prompt: str) -> bool:
    digest = hashlib.blake2b(prompt.encode("ascii"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % _EVAL_MOD == 0


def _letters(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _body(task: str, pool: str, rng: random.Random) -> str:
    """One input of ``task`` from the generator of ``pool`` (``full`` = train/eval, ``proxy``)."""
    proxy = pool == "proxy"
    if task in ("cpy", "rev"):
        # teacher: 2..6 letters of a..z; proxy: 3..4 letters of a..m
        return _letters(rng, string.ascii_lowercase[:13] if proxy else string.ascii_lowercase, 3 if proxy else 2, 4 if proxy else 6)
    if task == "srt":
        # teacher: 2..6 digits; proxy: 3..4 digits of 0..5
        return _letters(rng, "012345" if proxy else string.digits, 3 if proxy else 2, 4 if proxy else 6)
    if task == "mrk":
        # the domain branch has in-distribution prompts (the domain prompt set of docs/algorithm.md §1)
        return _letters(rng, string.ascii_lowercase, 2, 6)
    raise ValueError(f"task: unknown task {task!r}; use one of {', '.join(ALL_TASKS)}")


def split_of(prompt: str) -> str:
    """``eval`` if the prompt is held out, else ``train`` (proxy prompts are train-side too)."""
    return "eval" if _is_eval(prompt) else "train"


def sample_problem(task: str, split: str, rng: random.Random) -> Problem:
    """One problem of ``task`` from ``split`` (rejection-sampled against the eval hash)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; use one of {', '.join(SPLITS)}")
    pool = "proxy" if split == "proxy" else "full"
    want_eval = split == "eval"
    for _ in range(10_000):
        p = _problem(task, _body(task, pool, rng))
        if _is_eval(p.prompt) == want_eval:
            return p
    raise RuntimeError(f"could not draw a {split} problem of {task!r}")  # pragma: no cover


def sample_problems(tasks: Sequence[str], split: str, n: int, seed: int, *, unique: bool = False) -> list[Problem]:
    """``n`` problems cycling over ``tasks`` (deterministic in ``seed``); ``unique`` drops repeats."""
    if n < 0:
        raise ValueError(f"n: got {n}; use n >= 0")
    if not tasks:
        raise ValueError("tasks: empty; give at least one task name")
    rng = random.Random(f"{seed}:{split}:{','.join(tasks)}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        p = sample_problem(task, split, rng)
        attempts += 1
        if unique and p.prompt in seen and attempts < 50 * n:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def check(problem: Problem, response: str) -> bool:
    """Exact match of the response (text before EOS, already decoded) with the answer."""
    return response == problem.answer


def write_prompt_file(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write the prompts as JSONL ``{"prompt": ..., "domain": task}`` (the trainer's prompt format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "domain": p.task}) + "\n")
    return path


def per_task_accuracy(problems: Sequence[Problem], responses: Sequence[str],
                      key: Callable[[Problem], str] = lambda p: p.task) -> dict[str, float]:
    """Fraction of exact matches per task (``key`` groups problems)."""
    if len(problems) != len(responses):
        raise ValueError(f"responses: {len(responses)} for {len(problems)} problems; give one per problem")
    hits: dict[str, list[int]] = {}
    for p, r in zip(problems, responses):
        hits.setdefault(key(p), []).append(int(check(p, r)))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
