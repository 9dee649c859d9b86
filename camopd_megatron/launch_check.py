"""A launch smoke test: bring up the world, all-reduce once, print this rank's place, exit 0.

Run it through any launch script by setting the entry module::

    CAMOPD_ENTRY=camopd_megatron.launch_check NPROC_PER_NODE=4 \\
        examples/launch/single_node.sh examples/configs/demo_cpu_4rank.yaml

It accepts the same ``--config X.yaml [key=value ...]`` as ``camopd-train``; with a config it also
plans the role layout for the launched world size and prints this rank's role, so a bad layout
fails here (exit 2) rather than after the models are built. Output, one line per rank::

    launch_check rank 3/8 local_rank 3 host node7 backend nccl allreduce 36 ok role student tp 1/2 pp 0/1 dp 1/2
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Optional, Sequence

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="camopd-launch-check", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", help="optional config: plan its role layout for this world size")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"), help="process-group backend")
    p.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout in seconds")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Init the default group from torchrun's environment, all-reduce (rank + 1), check the sum, report."""
    args = _parse(argv)
    from camopd_megatron.config import Config, ConfigError, load_config
    from camopd_megatron.parallel import RoleLayout

    cfg: Optional[Config] = None
    if args.config is not None or args.overrides:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"launch_check: {e}", file=sys.stderr)
            return 2

    import torch
    import torch.distributed as dist

    from camopd_megatron.distributed import destroy_distributed, init_distributed

    backend = args.backend if args.backend != "auto" or cfg is None else cfg.parallel.backend
    env = init_distributed(backend=backend, timeout_s=args.timeout_s)
    try:
        value = torch.tensor([float(env.rank + 1)], device=env.device)
        dist.all_reduce(value)
        expected = env.world_size * (env.world_size + 1) / 2
        ok = abs(float(value.item()) - expected) < 0.5
        where = ""
        if cfg is not None:
            try:
                layout = RoleLayout.from_config(cfg, env.world_size)
            except ConfigError as e:
                print(f"launch_check: rank {env.rank}: {e}", file=sys.stderr)
                return 2
            role = layout.role_of(env.rank)
            c = role.coords(env.rank)
            where = f" role {role.name} tp {c.tp}/{role.tp} pp {c.pp}/{role.pp} dp {c.dp}/{role.dp}"
        print(
            f"launch_check rank {env.rank}/{env.world_size} local_rank {env.local_rank} host {socket.gethostname()} "
            f"backend {env.backend} allreduce {value.item():g} {'ok' if ok else f'MISMATCH (expected {expected:g})'}{where}",
            flush=True,
        )
        dist.barrier()
        return 0 if ok else 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
