"""Synthetic text tasks with graded checkers: the forgetting testbed of the CPU demo.

Every problem is a prompt string and an answer string over printable ASCII, so the char-level
:class:`~camopd_megatron.data.ByteTokenizer` (128 ids) encodes it one character per token. A
training / eval sequence is ``[BOS] prompt answer [EOS]``: the plain chat template prepends BOS to
a prompt (as the trainer's prompt pipeline does), and the model must end its answer with EOS so
greedy generation stops.

Tasks (``task:`` prefix, the input, then ``=`` for general prompts or ``#`` for domain prompts):

=========  ==========================  ================  =========
task       prompt                       answer            branch
=========  ==========================  ================  =========
``cpy``    ``c:kbdf=``                  ``kbdf``          general
``rev``    ``r:kbdf=``                  ``fdbk``          general
``srt``    ``s:kbdf=``                  ``bdfk``          general
``mcp``    ``c:kbdf#``                  ``kbdf!``         domain
``mrv``    ``r:kbdf#``                  ``fdbk!``         domain
``mst``    ``s:kbdf#``                  ``bdfk!``         domain
=========  ==========================  ================  =========

The domain is a *house style*: the same three jobs, asked with a ``#`` where a general prompt has
``=``, and signed off with a ``!`` before EOS. Specialising on it (stage 2) moves the end of
every answer, an output all general answers share, and the one-character cue is weak for a tiny
model, so the convention bleeds into general answers (the domain teacher signs part of its general
answers too). Recovering general skill then pushes the answer's end towards EOS and keeping the
domain pushes it back towards ``!``: the branches conflict through shared outputs (docs/algorithm.md §1).
Earlier testbeds are described in ``examples/demo/results/NOTES.md``.

Credit is graded (:func:`credit`): the fraction of answer positions the response gets exactly
right, over the longer of the two lengths, so an answer with a few letters out of place earns
partial credit instead of zero; :func:`check` is the exact match.

Distributions ("splits"). Each task has three disjoint pools of problems, decided by a hash of the
prompt (so membership is exact and the same on every machine):

* ``eval``: held out from everything; all scores in the report are measured here.
* ``train``: what the teachers are trained on (2..6 letters of a..z).
* ``proxy``: the student's general prompts in stage 3 come from a *narrower* generator than the
  general teacher's training data (3..4 letters of a..m), so they do not cover the training
  distribution (docs/algorithm.md §1: only proxy prompts are available); eval still covers the full
  ranges. Domain prompts in stage 3 come from the domain's own (train) pool.
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
    "credit",
    "NO_EOS",
    "split_of",
    "sample_problem",
    "sample_problems",
    "write_prompt_file",
    "branch_of",
]

GENERAL_TASKS: tuple[str, ...] = ("cpy", "rev", "srt")
"""The general teacher's skills (and the general proxy prompts' tasks)."""
DOMAIN_TASKS: tuple[str, ...] = ("mcp", "mrv", "mst")
"""The domain skill learnt in stage 2: the general jobs in the domain's house style (a closing ``!``)."""
ALL_TASKS: tuple[str, ...] = GENERAL_TASKS + DOMAIN_TASKS
SPLITS: tuple[str, ...] = ("train", "proxy", "eval")

_PREFIX = {"cpy": "c:", "rev": "r:", "srt": "s:", "mcp": "c:", "mrv": "r:", "mst": "s:"}
_CLOSE = {"general": "=", "domain": "#"}
"""The one character that tells a domain prompt from a general one."""
_EVAL_MOD = 8
"""A prompt is held out for eval when its hash is 0 mod this (about 1/8 of each pool)."""
MAX_ANSWER_CHARS = 7
"""No answer is longer than this (generation budget = this + EOS)."""
NO_EOS = "\x00<no-eos>"
"""What a response that never emitted EOS starts with (it earns no credit)."""


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
    if task in ("cpy", "mcp"):
        out = body
    elif task in ("rev", "mrv"):
        out = body[::-1]
    elif task in ("srt", "mst"):
        out = "".join(sorted(body))
    else:
        raise ValueError(f"task: unknown task {task!r}; use one of {', '.join(ALL_TASKS)}")
    return out + "!" if task in DOMAIN_TASKS else out


def _problem(task: str, body: str) -> Problem:
    return Problem(task, f"{_PREFIX[task]}{body}{_CLOSE[branch_of(task)]}", solve(task, body))


def _is_eval(prompt: str) -> bool:
    digest = hashlib.blake2b(prompt.encode("ascii"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % _EVAL_MOD == 0


def _letters(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _body(task: str, pool: str, rng: random.Random) -> str:
    """One input of ``task`` from the generator of ``pool`` (``full`` = train/eval, ``proxy``)."""
    branch = branch_of(task)  # ValueError for an unknown task
    if pool == "proxy" and branch == "general":
        return _letters(rng, string.ascii_lowercase[:13], 3, 4)  # proxy: 3..4 letters of a..m
    # teacher data, eval, and the domain branch's prompts (its own prompt set, docs/algorithm.md §1)
    return _letters(rng, string.ascii_lowercase, 2, 6)


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


def credit(problem: Problem, response: str) -> float:
    """Graded credit in [0, 1]: answer positions the response gets right, over the
    longer of the two lengths (so extra or missing characters cost too); 1.0 exactly when :func:`check`."""
    if response.startswith(NO_EOS):
        return 0.0
    ans = problem.answer
    right = sum(a == b for a, b in zip(ans, response))
    return right / max(len(ans), len(response), 1)


def write_prompt_file(path: str | Path, problems: Iterable[Problem]) -> Path:
    """Write the prompts as JSONL ``{"prompt": ..., "domain": task}`` (the trainer's prompt format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "domain": p.task}) + "\n")
    return path


def per_task_accuracy(problems: Sequence[Problem], responses: Sequence[str],
                      key: Callable[[Problem], str] = lambda p: p.task, *, graded: bool = True) -> dict[str, float]:
    """Mean :func:`credit` per task (``graded``; else the fraction of exact matches); ``key`` groups problems."""
    if len(problems) != len(responses):
        raise ValueError(f"responses: {len(responses)} for {len(problems)} problems; give one per problem")
    hits: dict[str, list[float]] = {}
    for p, r in zip(problems, responses):
        hits.setdefault(key(p), []).append(credit(p, r) if graded else float(check(p, r)))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
