"""Rank function for tests/test_console.py: the third-party messages a one-rank world shows at a
log level, on the real upstream paths (a GPT model built, a checkpoint saved and loaded)."""
from __future__ import annotations

import logging
import warnings
from typing import Any

from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
from camopd_megatron.models.groups import simple_pg_collection
from camopd_megatron.utils.logging import setup_logging
from tests import optim_workers as W

CUDA_HINT = ("When using async grad allreduce it is recommended to set the environment variable "
             "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
"""megatron's text (tensor_parallel/layers.py); it needs TP > 1 with gradients, so it is raised here as
megatron raises it (same module) instead of training a TP=2 model."""


def third_party_messages(rank: int, world_size: int, level: str, ckpt_dir: str) -> list[str]:
    """Every warning shown and every megatron log record emitted, after ``setup_logging(level)``."""
    setup_logging(rank, level)
    seen: list[str] = []

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        seen.append(f"warning {category.__name__}: {message}")

    handler = logging.Handler()
    handler.emit = lambda record: seen.append(f"log {record.name}: {record.getMessage()}")  # type: ignore[method-assign]
    logging.getLogger("megatron").addHandler(handler)
    warnings.showwarning = show
    pgc = simple_pg_collection(1, 1, 1)
    model = W.build_model(pgc)
    cfg = W.tiny_model_cfg(False)
    save_checkpoint(ckpt_dir, model_sharded_state_dict(model, pgc), model_cfg=cfg)
    load_model(W.build_model(pgc, seed=7), ckpt_dir, model_cfg=cfg, pg_collection=pgc)
    warnings.warn_explicit(CUDA_HINT, UserWarning, "layers.py", 856, module="megatron.core.tensor_parallel.layers")
    return seen
