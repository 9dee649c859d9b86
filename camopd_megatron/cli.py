"""``camopd-train``: the thin command-line entry point.

::

    camopd-train --config X.yaml [key=value ...] [--dry-run --world-size N] [--log-level L]

* Errors in what the user gave (config, checkpoints, data, tokenizer, installation) print one
  ``camopd-train: <Kind>: message`` line per failing rank, without a traceback, and exit with the
  status of their family (:data:`EXIT_CODES`); any other exception is a bug and keeps its traceback
  (status 1). Under torchrun the failing rank's status is what torchrun reports as the root cause.
* A teacher rank whose student stopped (:class:`~camopd_megatron.teachers.StudentAborted`) exits 0
  quietly: the failure is the student rank's, and only that rank reports it.
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
from camopd_megatron.config.errors import report_user_error
from camopd_megatron.deps import MissingDependencyError

__all__ = [
    "main", "build_parser", "EXIT_CODES", "EXIT_CONFIG_ERROR", "EXIT_MISSING_TRAINER", "EXIT_CHECKPOINT_ERROR",
    "EXIT_DATA_ERROR",
]

logger = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
"""Config / layout errors and a missing config file (argparse uses the same for bad command lines)."""
EXIT_MISSING_TRAINER = 3
"""The installation lacks a part: the trainer module, or an optional dependency the config asks for."""
EXIT_CHECKPOINT_ERROR = 4
"""A checkpoint is missing, incomplete or does not fit the config (:class:`CheckpointError`)."""
EXIT_DATA_ERROR = 5
"""Prompt files or the tokenizer are missing or malformed (:class:`DataError`)."""
EXIT_CODES = {
    0: "success (also a teacher rank that stopped because its student did; the student rank reports why)",
    1: "an unexpected error (a bug): the traceback is printed",
    EXIT_CONFIG_ERROR: "config or layout error, or a bad command line",
    EXIT_MISSING_TRAINER: "missing part of the installation (trainer module, optional dependency)",
    EXIT_CHECKPOINT_ERROR: "checkpoint error",
    EXIT_DATA_ERROR: "prompt data or tokenizer error",
}
"""Every exit status of ``camopd-train`` (docs/workflow.md lists them too)."""

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
        "--device", choices=("cuda", "cpu"), default=None,
        help="device the --dry-run estimate assumes (auto dtypes: bf16 on cuda, fp32 on cpu); "
        "default: the --device-profile's, else cuda",
    )
    p.add_argument(
        "--device-profile", metavar="NAME|JSON",
        help="with --dry-run: estimate each stage's time and suggest teacher rank counts for this device: "
        "h100, h200, a100, b200 (data-sheet peaks) or a JSON from python -m camopd_megatron.bench.calibrate",
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
    from camopd_megatron.planner import load_profile, plan

    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        print(f"camopd-train: --world-size {world}: expected a positive number of ranks", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        profile = load_profile(args.device_profile) if args.device_profile else None
    except ValueError as e:
        print(f"camopd-train: --device-profile: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    device = args.device or (profile.device_type if profile is not None else "cuda")
    if profile is not None and device != profile.device_type:
        print(f"camopd-train: --device {device} with --device-profile {args.device_profile} (a {profile.device_type} "
              f"profile): drop --device or pass a {device} profile", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    cfg = resolve_inputs(cfg)  # the checkpoints' manifests, the tokenizer, the prompt files; every role's architecture
    if cfg.precision.fp8 is not None:
        # what can be checked without the GPU: device, recipe, layer implementation (TE assumed installed)
        from camopd_megatron.models.precision import fp8_problems

        problems = fp8_problems(cfg.precision, cfg.model, device_type=device, te_available=True, compute_capability=None)
        if problems:
            raise ConfigError(problems, source="precision settings for the planned device")
    result = plan(cfg, world, device_type=device, gpu_memory_gib=args.gpu_memory_gib, profile=profile)
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


def _user_error_status(e: Exception) -> Optional[int]:
    """The exit status of a user-input error family, or None for anything else (a bug)."""
    if isinstance(e, (ConfigError, FileNotFoundError)):  # LayoutError is a ConfigError
        return EXIT_CONFIG_ERROR
    if isinstance(e, MissingDependencyError):
        return EXIT_MISSING_TRAINER
    if not isinstance(e, ValueError):
        return None
    # raised inside the run; their modules are loaded by then (importing them here costs nothing)
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.data import DataError

    if isinstance(e, CheckpointError):
        return EXIT_CHECKPOINT_ERROR
    if isinstance(e, DataError):
        return EXIT_DATA_ERROR
    return None


def _student_aborted(e: Exception) -> bool:
    """A teacher rank stopped because its student raised (the student rank reports the error)."""
    if "camopd_megatron.teachers" not in sys.modules:  # no teacher ever ran in this process
        return False
    from camopd_megatron.teachers import StudentAborted

    return isinstance(e, StudentAborted)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, load the config, then dry-run or train; returns the exit status (argparse exits itself on --help)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.log_level:  # the trainer sets up logging again from the config: it must see the flag
            cfg.run.log_level = args.log_level
        _setup_logging(cfg.run.log_level)
        return _dry_run(cfg, args) if args.dry_run else _train(cfg)
    except Exception as e:
        if _student_aborted(e):
            # exit 0 so that torchrun's "root cause" is the student rank that failed, not this one
            logger.info("%s", e)
            return 0
        code = _user_error_status(e)
        if code is None:
            raise
        # the message names the key/file and the fix; a traceback from deep inside the stack would bury it
        if not getattr(e, "reported", False):  # the trainer prints input problems before the ranks agree
            report_user_error(e)
        return code


if __name__ == "__main__":
    sys.exit(main())
