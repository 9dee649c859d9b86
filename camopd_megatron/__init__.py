"""camopd_megatron: Counteraction-Aware Multi-Teacher On-Policy Distillation on megatron-core."""

__version__ = "0.1.0"
