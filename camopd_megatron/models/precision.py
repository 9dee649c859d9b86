"""Dtype and FP8 settings for megatron-core's ``TransformerConfig`` (student and teachers).

:func:`precision_kwargs` turns the ``precision`` section (and ``model.transformer_impl``) into the
exact keyword arguments the student's ``TransformerConfig`` receives; the model builder
(:mod:`camopd_megatron.models.gpt`) spreads them into the config. It is pure: the caller passes
what it detected (device type, whether transformer-engine imports, the GPU's compute capability),
so every combination is testable on a CPU machine.

FP8 (transformer-engine only) is for the **student's GEMMs**. Teachers never run in FP8
(:func:`teacher_precision_kwargs`), and the vocab-parallel log-softmax statistics are computed
in FP32 whatever the parameter dtype (``camopd_megatron.ops.vocab_parallel``), so the gap
Δ = log π_T − log π_θ is not polluted by FP8 rounding of the logits.

Hardware floors (transformer-engine's own checks, ``transformer_engine.pytorch.quantization``):

=============  ==============================  ==================================
recipe         TE recipe class                 needs compute capability
=============  ==============================  ==================================
``delayed``    DelayedScaling                  ≥ 8.9 (Ada, Hopper, Blackwell)
``tensorwise`` Float8CurrentScaling            ≥ 8.9
``blockwise``  Float8BlockScaling              ≥ 9.0 (Hopper+, CUDA ≥ 12.9)
``mxfp8``      MXFP8BlockScaling               ≥ 10.0 (Blackwell)
=============  ==============================  ==================================
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from camopd_megatron.config.errors import ConfigError, problem

__all__ = [
    "FP8_RECIPES",
    "TE_INSTALL_HINT",
    "precision_kwargs",
    "teacher_precision_kwargs",
    "ddp_precision_kwargs",
    "resolve_dtype",
    "detect_device",
]

logger = logging.getLogger(__name__)

FP8_RECIPES: dict[str, tuple[int, int]] = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
}
"""Recipe name (megatron-core 0.19.2 ``Fp8Recipe``) → minimum CUDA compute capability."""

TE_INSTALL_HINT = (
    'install it with `pip install "transformer-engine[pytorch]"` (needs a CUDA build of torch) '
    "or run inside the project's container (see docs/container.md)"
)
"""How to get transformer-engine, quoted in every error that needs it."""

# Delayed scaling keeps an amax history per FP8 tensor and takes its max: transformer-engine's own
# DelayedScaling defaults (1024, "max") and the NeMo/Megatron-LM recipes. megatron-core's
# TransformerConfig defaults (1, "most_recent") track the last step only, which is noisier.
DELAYED_AMAX_HISTORY_LEN = 1024
DELAYED_AMAX_COMPUTE_ALGO = "max"
FP8_MARGIN = 0

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """``auto`` → bf16 on cuda, fp32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _dtype_flags(dtype: torch.dtype) -> dict[str, Any]:
    """megatron's ``params_dtype`` plus its ``bf16`` / ``fp16`` mixed-precision flags."""
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def fp8_problems(
    precision_cfg: Any,
    model_cfg: Any,
    *,
    device_type: str,
    te_available: bool,
    compute_capability: Optional[tuple[int, int]],
) -> list[str]:
    """Every reason the requested FP8 setting cannot run here (empty when it can or fp8 is off)."""
    fp8, recipe = precision_cfg.fp8, precision_cfg.fp8_recipe
    if fp8 is None:
        return []
    out: list[str] = []
    if fp8 not in ("e4m3", "hybrid"):
        out.append(problem("precision.fp8", fp8, "null, e4m3 or hybrid", "use hybrid (e4m3 forward, e5m2 gradients)"))
    if recipe not in FP8_RECIPES:
        out.append(problem(
            "precision.fp8_recipe", recipe, f"one of {', '.join(FP8_RECIPES)}", "use delayed (Ada/Hopper) or mxfp8 (Blackwell)",
        ))
    if device_type != "cuda":
        out.append(problem(
            "precision.fp8", fp8, f"fp8 only on CUDA GPUs (this run is on {device_type})",
            "set precision.fp8=null for CPU runs, or run on a GPU of compute capability >= 8.9",
        ))
    if not te_available:
        out.append(problem(
            "precision.fp8", fp8, "transformer-engine installed (FP8 runs through its kernels)",
            f"{TE_INSTALL_HINT}, or set precision.fp8=null",
        ))
    impl = getattr(model_cfg, "transformer_impl", "auto")
    if impl == "local":
        out.append(problem(
            "precision.fp8", fp8, "model.transformer_impl te or auto (the local layers have no FP8 path)",
            "set model.transformer_impl=te (or auto), or set precision.fp8=null",
        ))
    if device_type == "cuda" and compute_capability is not None and recipe in FP8_RECIPES:
        need = FP8_RECIPES[recipe]
        cc = tuple(compute_capability)
        if cc < (8, 9):
            out.append(problem(
                "precision.fp8", fp8, f"a GPU of compute capability >= 8.9 (Ada/Hopper/Blackwell); this GPU is {cc[0]}.{cc[1]}",
                "run on H100/H200/L40S/B200-class GPUs, or set precision.fp8=null (bf16)",
            ))
        elif cc < need:
            arch = "Blackwell" if need >= (10, 0) else "Hopper"
            out.append(problem(
                "precision.fp8_recipe", recipe,
                f"a GPU of compute capability >= {need[0]}.{need[1]} ({arch}) for {recipe}; this GPU is {cc[0]}.{cc[1]}",
                "use precision.fp8_recipe=delayed or tensorwise on this GPU",
            ))
        elif recipe == "mxfp8" and cc >= (12, 0):
            logger.warning("transformer-engine reports MXFP8 unsupported on compute capability %d.%d; expect an error", *cc)
    return out


def precision_kwargs(
    precision_cfg: Any,
    model_cfg: Any,
    *,
    device_type: str,
    te_available: bool,
    compute_capability: Optional[tuple[int, int]],
) -> dict[str, Any]:
    """The student's dtype / FP8 ``TransformerConfig`` keyword arguments (megatron-core 0.19.2 names).

    Args:
        precision_cfg: the ``precision`` section (``params_dtype``, ``fp8``, ``fp8_recipe``; an
            optional ``fp8_param`` is honoured when present).
        model_cfg: the ``model`` section (``transformer_impl`` is checked against FP8).
        device_type: ``"cuda"`` or ``"cpu"``.
        te_available: transformer-engine imports (``camopd_megatron.deps.te_available()``).
        compute_capability: the GPU's ``torch.cuda.get_device_capability()``; None = unknown (not checked).

    Returns ``params_dtype``, ``bf16``, ``fp16`` always; with FP8 also ``fp8`` (format),
    ``fp8_recipe``, ``fp8_param`` (keep GEMM weights in FP8 between steps: less memory, needs
    DDP's ``fp8_param_gather``, see :func:`ddp_precision_kwargs`), ``fp8_margin`` and, for the
    delayed recipe, ``fp8_amax_history_len`` / ``fp8_amax_compute_algo``.

    Raises ConfigError naming ``precision.fp8`` / ``precision.fp8_recipe`` with every reason the
    request cannot run (no transformer-engine, CPU, too old a GPU, local layers).
    """
    dtype = resolve_dtype(precision_cfg.params_dtype, device_type)
    kwargs = _dtype_flags(dtype)
    fp8 = precision_cfg.fp8
    if fp8 is None:
        if getattr(precision_cfg, "fp8_param", False):
            raise ConfigError([problem("precision.fp8_param", True, "precision.fp8 set", "set precision.fp8 or drop fp8_param")])
        return kwargs
    problems = fp8_problems(
        precision_cfg, model_cfg, device_type=device_type, te_available=te_available,
        compute_capability=compute_capability,
    )
    if problems:
        raise ConfigError(problems, source="precision settings vs. this machine")
    recipe = precision_cfg.fp8_recipe
    kwargs.update(fp8=fp8, fp8_recipe=recipe, fp8_param=bool(getattr(precision_cfg, "fp8_param", False)), fp8_margin=FP8_MARGIN)
    if recipe == "delayed":
        kwargs.update(fp8_amax_history_len=DELAYED_AMAX_HISTORY_LEN, fp8_amax_compute_algo=DELAYED_AMAX_COMPUTE_ALGO)
    logger.info("student precision: %s, fp8=%s recipe=%s fp8_param=%s", dtype, fp8, recipe, kwargs["fp8_param"])
    return kwargs


def teacher_precision_kwargs(teacher_cfg: Any, device_type: str) -> dict[str, Any]:
    """A teacher's dtype ``TransformerConfig`` kwargs: ``teacher.dtype`` (auto = bf16 on GPU, fp32 on CPU), never FP8.

    Teachers only score sampled tokens; FP8 rounding there would shift log π_T and with it every
    gap, so they run in bf16 (or what ``teachers[i].dtype`` says) regardless of the student's FP8.
    """
    kwargs = _dtype_flags(resolve_dtype(getattr(teacher_cfg, "dtype", "auto"), device_type))
    kwargs["fp8"] = None
    return kwargs


def ddp_precision_kwargs(precision_cfg: Any) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` kwargs that follow the precision settings.

    Gradients are reduced and accumulated in FP32 (``grad_reduce_in_fp32``) whatever the
    parameter dtype; with ``fp8_param`` the parameter all-gather runs in FP8 (``fp8_param_gather``).
    """
    fp8_param = bool(getattr(precision_cfg, "fp8_param", False)) and precision_cfg.fp8 is not None
    return {"grad_reduce_in_fp32": True, "fp8_param_gather": fp8_param}


def detect_device() -> tuple[str, Optional[tuple[int, int]]]:
    """``("cuda", capability of the current GPU)`` when CUDA is available, else ``("cpu", None)``."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return "cuda", (int(major), int(minor))
    return "cpu", None
