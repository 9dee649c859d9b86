#!/usr/bin/env python
"""Thin CLI: see camopd_megatron.checkpoint.hf_cli (`--help` for the options)."""
import sys

from camopd_megatron.checkpoint.hf_cli import hf_to_megatron_main

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
