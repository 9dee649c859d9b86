"""megatron-core models: process groups, the GPT builder, the pipeline runner, log-prob glue.

Submodules import megatron (after the CPU compat layer); import them explicitly
(``from camopd_megatron.models.gpt import build_gpt_model``) — this package file imports nothing.
"""
