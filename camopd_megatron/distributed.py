"""Process-group bootstrap: backend from the device, ranks from the torchrun environment.

The role layout (student / teacher rank ranges and their per-role megatron-core process groups)
lives in :mod:`camopd_megatron.parallel`; this module only brings up the world.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from camopd_megatron import compat

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """What this process knows about the world after :func:`init_distributed`."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def pick_backend(requested: str = "auto") -> str:
    """``auto`` → nccl when CUDA is available, gloo otherwise."""
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"distributed backend must be one of auto|gloo|nccl, got {requested!r}")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use backend 'gloo' (or 'auto') on CPU")
    return requested


def init_distributed(*, backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group from torchrun's environment variables.

    Works without torchrun too (a single process, world size 1, on a free local port).
    Idempotent: a second call returns the existing world. Installs the megatron compatibility
    layer (:func:`camopd_megatron.compat.install`) for this process.
    """
    backend = pick_backend(backend)
    compat.install()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR is not set; launch with torchrun"
                )
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank, world_size, local_rank, backend, device)


def destroy_distributed() -> None:
    """Tear down every process group; safe to call when none exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
