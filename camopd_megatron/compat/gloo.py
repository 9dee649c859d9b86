"""gloo limits megatron-core's MoE path runs into (any machine whose process group is gloo).

``tensor_parallel/mappings.py`` gathers and reduce-scatters *uneven* pieces along the first dimension
(``_gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` with split sizes, lines 147-154 and
187-197): the all-to-all token dispatcher does so across the expert-TP group, where every rank holds
a different number of routed tokens. NCCL takes a list of unequal tensors; gloo's ``allgather``
refuses it ("invalid tensor size") and has no list reduce-scatter. The wrappers below compute the same
result with equal-size collectives when the group is gloo: the gather pads every piece to the largest
and cuts the padding off; the reduce-scatter all-reduces the whole input and keeps this rank's piece
(the same sums). Other backends, and the even case, take the upstream function unchanged.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["MAPPINGS_MODULE", "patch_uneven_first_dim_collectives"]

MAPPINGS_MODULE = "megatron.core.tensor_parallel.mappings"


def _is_gloo(group: Any) -> bool:
    return group is not None and dist.get_backend(group) == "gloo"


def _gather_uneven(input_: torch.Tensor, group: Any, sizes: Sequence[int]) -> torch.Tensor:
    """All pieces of the group concatenated along dim 0 (piece r has ``sizes[r]`` rows)."""
    longest = max(sizes)
    padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def _reduce_scatter_uneven(input_: torch.Tensor, group: Any, sizes: Sequence[int]) -> torch.Tensor:
    """This rank's piece (``sizes[rank]`` rows) of the group-wide sum of ``input_``."""
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    lo = sum(sizes[: dist.get_rank(group)])
    return total[lo:lo + sizes[dist.get_rank(group)]].clone()


def patch_uneven_first_dim_collectives() -> None:
    """Wrap the two mappings helpers (module docstring); idempotent."""
    mappings = importlib.import_module(MAPPINGS_MODULE)
    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim
    if getattr(gather, "_camopd_gloo", False):
        return

    def _gather_along_first_dim(input_: torch.Tensor, group: Any, output_split_sizes: Optional[Sequence[int]] = None,
                                use_global_buffer: bool = False) -> torch.Tensor:
        if output_split_sizes is not None and group.size() > 1 and _is_gloo(group):
            return _gather_uneven(input_, group, [int(s) for s in output_split_sizes])
        return gather(input_, group, output_split_sizes=output_split_sizes, use_global_buffer=use_global_buffer)

    def _reduce_scatter_along_first_dim(input_: torch.Tensor, group: Any,
                                        input_split_sizes: Optional[Sequence[int]] = None,
                                        use_global_buffer: bool = False) -> torch.Tensor:
        if input_split_sizes is not None and group.size() > 1 and _is_gloo(group):
            return _reduce_scatter_uneven(input_, group, [int(s) for s in input_split_sizes])
        return scatter(input_, group, input_split_sizes=input_split_sizes, use_global_buffer=use_global_buffer)

    _gather_along_first_dim._camopd_gloo = True  # type: ignore[attr-defined]
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
