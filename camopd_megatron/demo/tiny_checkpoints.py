"""Tiny converted-format checkpoints for trying the trainer on a CPU: a general and a domain model.

::

    python -m camopd_megatron.demo.tiny_checkpoints ckpt        # ckpt/general, ckpt/domain
    camopd-train --config examples/configs/camopd.yaml run.steps=4

Each is a random model of :data:`TINY` (2 layers, width 64, the 128-id byte vocabulary of the
synthetic prompts) from its own seed, in the format ``tools/convert_hf_to_megatron.py`` writes. As in
the paper the student starts from the domain model (``model.checkpoint: ckpt/domain``), so general
steps have a non-zero loss from the first step. Real runs convert real models instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from camopd_megatron.checkpoint.dist import model_sharded_state_dict, save_checkpoint
from camopd_megatron.config import ModelConfig
from camopd_megatron.demo.teachers import build_demo_model

__all__ = ["TINY", "ROLES", "write_tiny_checkpoints", "main"]

TINY = dict(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=128, vocab_pad_multiple=128)
"""The tiny architecture (what ``examples/configs/demo_cpu_4rank.yaml``'s layout divides)."""

ROLES = {"general": 2, "domain": 3}
"""Checkpoint name → its random seed."""


def write_tiny_checkpoints(out: str | Path, *, logit_scale: float = 4.0) -> dict[str, str]:
    """Write ``out/<role>`` for every role of :data:`ROLES`; returns role → path.

    The output layers are scaled by ``logit_scale`` so the distributions are peaked (clear gaps).
    """
    cfg = ModelConfig(init="random", seq_length=256, transformer_impl="local", **TINY)
    paths = {}
    for role, seed in ROLES.items():
        model, pgc = build_demo_model(cfg, seed)
        with torch.no_grad():
            model.output_layer.weight.mul_(logit_scale)
        path = Path(out) / role
        save_checkpoint(path, model_sharded_state_dict(model, pgc), model_cfg=cfg, overwrite=True)
        paths[role] = str(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m camopd_megatron.demo.tiny_checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="ckpt", help="directory for general/ and domain/ (default ckpt)")
    args = p.parse_args(argv)
    for role, path in write_tiny_checkpoints(args.out).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
