"""Benchmarks runnable as ``python -m camopd_megatron.bench.<name>``."""
