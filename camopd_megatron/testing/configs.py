"""Config dicts for tests: the tiny random-init model and teachers that ``init: random`` makes explicit."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from camopd_megatron.config.loader import deep_merge

__all__ = ["TINY_MODEL", "TINY_MOE", "RANDOM_TEACHERS", "random_init"]

TINY_MODEL: dict[str, Any] = {"init": "random", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                              "ffn_hidden_size": 256, "vocab_size": 128}
"""A tiny student from random weights (the sizes the config defaulted to before ``init`` existed)."""

TINY_MOE: dict[str, Any] = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 32}
"""``model.moe`` of a tiny mixture-of-experts student: 4 experts, top-2, every layer sparse."""

RANDOM_TEACHERS: list[dict[str, Any]] = [
    {"name": "general", "init": "random", "branches": ["general"]},
    {"name": "domain", "init": "random", "branches": ["domain"]},
]
"""The default teacher pair from random weights (the student's architecture and initialisation)."""


def random_init(d: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``d`` on top of a random-init tiny student and teacher pair (``d["teachers"]`` replaces the pair)."""
    base = {"model": copy.deepcopy(TINY_MODEL), "teachers": copy.deepcopy(RANDOM_TEACHERS)}
    return deep_merge(base, d or {})
