"""camopd_megatron: Counteraction-Aware Multi-Teacher On-Policy Distillation on megatron-core."""

from camopd_megatron.compat.imports import prepare_megatron_import

__version__ = "0.1.0"

# The one import-time step of the megatron compatibility layer: lets any module of the package
# import megatron.core without triton; the patches themselves wait for compat.install().
prepare_megatron_import()
