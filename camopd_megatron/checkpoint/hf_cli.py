"""Command lines of the HF <-> megatron converters (``tools/convert_*.py`` and the console scripts).

    camopd-convert-hf-to-megatron HF_DIR OUT [--tp N --pp M --ep E] [--dtype bfloat16] [--overwrite]
    camopd-convert-megatron-to-hf CKPT OUT [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

Errors in the input (unsupported architecture, missing shards, bad layout, existing OUT, ...) are
printed as one line and exit with status 2; nothing is left behind under OUT.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from camopd_megatron.utils.logging import setup_logging

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB`` / ``500MiB`` / ``1000000`` -> bytes (ValueError naming --max-shard-size)."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"--max-shard-size={text!r}: use a size like 5GB, 500MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def _run(fn, args: argparse.Namespace) -> int:
    setup_logging(0, "WARNING" if args.quiet else "INFO")
    try:
        out = fn(args)
    except ValueError as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def hf_to_megatron_main(argv: Optional[Sequence[str]] = None) -> int:
    """``convert_hf_to_megatron.py``: a HF model directory -> our distributed checkpoint."""
    p = argparse.ArgumentParser(description="Convert a Hugging Face Llama/Mistral/Qwen2/Qwen3 model, or a Qwen3-MoE/"
                                            "Qwen2-MoE/Mixtral mixture of experts, into a camopd distributed "
                                            "checkpoint (loadable at any TP/PP/EP).")
    p.add_argument("hf_dir", help="HF model directory (config.json + *.safetensors or pytorch_model*.bin)")
    p.add_argument("out", help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="TP size you will train at (validated only; the output is layout-free)")
    p.add_argument("--pp", type=int, default=1, help="PP size you will train at (validated only)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of an MoE model (validated only)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (validated only; default: --tp)")
    p.add_argument("--dtype", default="auto", help="auto (keep) | float32 | bfloat16 | float16")
    p.add_argument("--vocab-pad-multiple", type=int, default=128, help="pad the vocabulary to a multiple of this (= model.vocab_pad_multiple)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    args = p.parse_args(argv)

    def go(a: argparse.Namespace) -> str:
        from camopd_megatron.checkpoint.hf_io import convert_hf_to_megatron

        return str(convert_hf_to_megatron(a.hf_dir, a.out, tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, dtype=a.dtype,
                                          vocab_pad_multiple=a.vocab_pad_multiple, overwrite=a.overwrite,
                                          progress=not a.quiet))

    return _run(go, args)


def megatron_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    """``convert_megatron_to_hf.py``: our checkpoint (any saved layout) -> a HF model directory."""
    p = argparse.ArgumentParser(description="Export a camopd distributed checkpoint as a Hugging Face model "
                                            "(sharded safetensors + index, config.json, generation_config.json, tokenizer).")
    p.add_argument("ckpt", help="our checkpoint directory, or a run's checkpoints/ root (exports its latest)")
    p.add_argument("out", help="HF model directory to create")
    p.add_argument("--dtype", default="auto", help="auto (as stored) | float32 | bfloat16 | float16")
    p.add_argument("--max-shard-size", default="2GiB", help="size of one safetensors file (e.g. 5GB, 500MiB)")
    p.add_argument("--hf-config", default=None, help="HF model dir to take config.json/tokenizer from "
                                                     "(default: the files saved in the checkpoint at import)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    args = p.parse_args(argv)

    def go(a: argparse.Namespace) -> str:
        from camopd_megatron.checkpoint.hf_io import convert_megatron_to_hf

        return str(convert_megatron_to_hf(a.ckpt, a.out, dtype=a.dtype, max_shard_bytes=parse_size(a.max_shard_size),
                                          hf_config_from=a.hf_config, overwrite=a.overwrite, progress=not a.quiet))

    return _run(go, args)
