"""megatron's gradient-accumulation-fusion contract, for ops that add a weight gradient straight into the
parameter's fp32 ``main_grad`` buffer (megatron DDP's contiguous gradient buffer) instead of returning it.

Such an op adds its dL/dW into ``main_grad``, sets ``grad_added_to_main_grad`` and returns a dummy gradient,
which megatron DDP's backward hook then skips (it adds ``param.grad`` into ``main_grad`` only while the flag
is unset, and ``zero_grad_buffer`` resets the flag). Used by the fused output projection and the embedding
lookup (:mod:`camopd_megatron.ops.fused_output`, :mod:`camopd_megatron.ops.embedding`).
"""
from __future__ import annotations

import torch

__all__ = ["accumulates_into_main_grad", "added_to_main_grad"]


def accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """True for a parameter of megatron's DDP (an fp32 ``main_grad`` buffer of its shape and the
    ``grad_added_to_main_grad`` flag) whose gradient may go straight into ``main_grad``."""
    main = getattr(weight, "main_grad", None)
    return (isinstance(main, torch.Tensor) and hasattr(weight, "grad_added_to_main_grad")
            and not getattr(weight, "zero_out_wgrad", False) and main.dtype == torch.float32
            and main.shape == weight.shape)


def added_to_main_grad(weight: torch.Tensor) -> torch.Tensor:
    """Mark ``weight``'s gradient as added into ``main_grad``; the dummy gradient to return for it (never read:
    allocated, not filled)."""
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)
