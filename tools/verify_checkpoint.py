#!/usr/bin/env python
"""Thin CLI: see camopd_megatron.checkpoint.verify (`--help` for the options)."""
import sys

from camopd_megatron.checkpoint.verify import main

if __name__ == "__main__":
    sys.exit(main())
