#!/usr/bin/env python
"""Thin CLI: see camopd_megatron.checkpoint.hf_cli (`--help` for the options)."""
import sys

from camopd_megatron.checkpoint.hf_cli import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
