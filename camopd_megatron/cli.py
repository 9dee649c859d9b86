"""``camopd-train``: the thin command-line entry point.

::

    camopd-train --config X.yaml [key=value ...] [--dry-run --world-size N] [--log-level L]

* Config and layout errors print their message (every problem, one line each) and exit 2,
  without a traceback.
* ``--dry-run`` checks the config against the checkpoints' manifests, the tokenizer and the prompt
  files, validates the layout for ``--world-size`` ranks and prints the rank map and the
  per-rank memory estimate (:mod:`camopd_megatron.planner`), then exits 0. It needs no GPU and
  never starts torch.distributed, so a 64-node run can be planned from a laptop.
* Otherwise it calls ``camopd_megatron.trainer.train(cfg)`` (imported lazily) under torchrun and
  always tears the process groups down afterwards.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from camopd_megatron.config import Config, ConfigError, load_config
from camopd_megatron.deps import MissingDependencyError

__all__ = ["main", "build_parser", "EXIT_CONFIG_ERROR", "EXIT_MISSING_TRAINER"]

logger = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
"""Exit status for config / layout errors (argparse uses the same for bad command lines)."""
EXIT_MISSING_TRAINER = 3
"""Exit status when the trainer module is not installed."""

_TRAINER_MODULE = "camopd_megatron.trainer"


def build_parser() -> argparse.ArgumentParser:
    """The ``camopd-train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="camopd-train",
        description="Train a student with CaMOPD (counteraction-aware multi-teacher on-policy distillation) "
        "on megatron-core. Launch with torchrun (see examples/launch/).",
        epilog="examples:\n"
        "  camopd-train --config examples/configs/camopd.yaml run.steps=10\n"
        "  camopd-train --config big.yaml --dry-run --world-size 512",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", metavar="X.yaml", help="YAML config file (default: the built-in defaults)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied after the file, e.g. optim.lr=1e-5 teachers[0].tp=2",
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="validate the layout and print the rank map and per-rank memory estimate; no GPUs, no torch.distributed",
    )
    p.add_argument(
        "--world-size", type=int, metavar="N",
        help="ranks to plan for with --dry-run (default: $WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="device the --dry-run estimate assumes (auto dtypes: bf16 on cuda, fp32 on cpu); default cuda",
    )
    p.add_argument("--gpu-memory-gib", type=float, metavar="G", help="with --dry-run: warn when a rank needs more than this")
    p.add_argument(
        "--log-level", metavar="L", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level (overrides run.log_level)",
    )
    return p


def _setup_logging(level: str) -> None:
    from camopd_megatron.utils.logging import setup_logging

    setup_logging(rank=int(os.environ.get("RANK", "0")), level=level)


def _dry_run(cfg: Config, args: argparse.Namespace) -> int:
    from camopd_megatron.checkpoint.inputs import resolve_inputs
    from camopd_megatron.planner import plan

    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        print(f"camopd-train: --world-size {world}: expected a positive number of ranks", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    cfg = resolve_inputs(cfg)  # the checkpoints' manifests, the tokenizer, the prompt files; every role's architecture
    if cfg.precision.fp8 is not None:
        # what can be checked without the GPU: device, recipe, layer implementation (TE assumed installed)
        from camopd_megatron.models.precision import fp8_problems

        problems = fp8_problems(cfg.precision, cfg.model, device_type=args.device, te_available=True, compute_capability=None)
        if problems:
            raise ConfigError(problems, source="precision settings for the planned device")
    result = plan(cfg, world, device_type=args.device, gpu_memory_gib=args.gpu_memory_gib)
    print(result.render())
    return 0


def _train(cfg: Config) -> int:
    try:
        trainer = importlib.import_module(_TRAINER_MODULE)
    except ModuleNotFoundError as e:
        if e.name != _TRAINER_MODULE:
            raise
        print(
            f"camopd-train: the trainer ({_TRAINER_MODULE}) is not available in this installation; "
            "reinstall the package (pip install -e .) or use --dry-run to validate the config",
            file=sys.stderr,
        )
        return EXIT_MISSING_TRAINER
    try:
        trainer.train(cfg)
    finally:
        from camopd_megatron.distributed import destroy_distributed

        destroy_distributed()
    return 0


def _is_input_error(e: BaseException) -> bool:
    """Bad user input raised inside the run: checkpoint files, prompt data, tokenizers."""
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.data import DataError

    return isinstance(e, (CheckpointError, DataError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, load the config, then dry-run or train; returns the exit status (argparse exits itself on --help)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        _setup_logging(args.log_level or cfg.run.log_level)
        code = _dry_run(cfg, args) if args.dry_run else _train(cfg)
    except (ConfigError, FileNotFoundError, MissingDependencyError) as e:  # LayoutError is a ConfigError
        print(f"camopd-train: {e}", file=sys.stderr)
        code = EXIT_CONFIG_ERROR
    except ValueError as e:
        # user-facing input errors raised inside the run (checkpoint, data, tokenizer): the message names
        # the key/file and the fix; a traceback from deep inside the stack would only bury it
        if not _is_input_error(e):
            raise
        print(f"camopd-train: {type(e).__name__}: {e}", file=sys.stderr)
        code = EXIT_CONFIG_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
