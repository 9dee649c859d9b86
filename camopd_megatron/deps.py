"""Optional heavy dependencies (transformer-engine, apex), detected in one place.

Detection uses ``importlib.util.find_spec`` only: nothing is imported here, so asking "is TE
installed?" has no side effects (importing TE without CUDA raises at import time). The choice of
layer implementation is a config value resolved once by :func:`resolve_transformer_impl`.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Literal

logger = logging.getLogger(__name__)

TE_INSTALL_HINT = (
    'pip install --no-build-isolation "transformer-engine[pytorch]" on a CUDA machine, '
    "or use the container built from the project's Dockerfile"
)


class MissingDependencyError(ImportError):
    """An optional dependency the config asks for is not installed (the message names the key and the install)."""


def te_available() -> bool:
    """True if transformer-engine's PyTorch bindings are installed (not imported)."""
    return importlib.util.find_spec("transformer_engine") is not None and (
        importlib.util.find_spec("transformer_engine.pytorch") is not None
    )


def apex_available() -> bool:
    """True if NVIDIA apex (with its normalisation kernels) is installed (not imported)."""
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.normalization") is not None


def resolve_transformer_impl(impl: str, *, key: str = "model.transformer_impl") -> Literal["local", "te"]:
    """Turn ``auto | local | te`` into the implementation to build.

    ``auto`` picks ``te`` when transformer-engine is installed and CUDA is available, else
    ``local``. ``te`` without transformer-engine raises ImportError naming ``key`` and the install.
    """
    import torch

    if impl not in ("auto", "local", "te"):
        raise ValueError(f"{key}={impl!r}: expected one of auto, local, te")
    if impl == "local":
        return "local"
    has_te = te_available()
    if impl == "te":
        if not has_te:
            raise MissingDependencyError(
                f"{key}=te but transformer-engine is not installed: {TE_INSTALL_HINT}; "
                f"or set {key}=local (or auto)"
            )
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"{key}=te needs a CUDA GPU (none is available); set {key}=local or auto")
        return "te"
    return "te" if has_te and torch.cuda.is_available() else "local"
