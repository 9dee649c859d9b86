"""Benchmark: vocab-parallel sampled-token log-probs (ours) vs the naive gather-the-logits path.

    python -m camopd_megatron.bench.vocab_parallel            # V=151,936, tokens 512/2048/4096, TP 1/2
    python -m camopd_megatron.bench.vocab_parallel --quick    # tiny smoke run (small V, one process per TP)

naive: all-gather the bf16 shards into full logits, fp32 ``log_softmax``, gather the target (its
backward slices this rank's columns out of the full gradient). ours:
:func:`camopd_megatron.ops.sampled_token_logprobs`. "fwd" runs under no_grad (the teacher side),
"fwd+bwd" backpropagates ``logp.sum()`` into the bf16 shard (the student side).

Each (method, mode, tokens, TP) runs in a fresh set of processes (gloo, one thread per rank).
Extra memory per rank = VmHWM during the first full-size call − VmRSS just before it (inputs built,
VmHWM reset through /proc/self/clear_refs), minus, for fwd+bwd, the [tokens, V/TP] bf16 gradient of
the shard, which both methods must produce. glibc is told to mmap every block >= 64 KiB so freed
memory goes back to the OS and cannot hide a peak. Time = median of ``--repeats`` calls after that
(max over ranks). Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import logging

import torch.distributed as dist

from camopd_megatron.bench.memory import reset_peak, status_kib
from camopd_megatron.ops import sampled_token_logprobs
from camopd_megatron.ops.vocab_parallel import DEFAULT_CHUNK_ELEMENTS
from camopd_megatron.testing.multiproc import run_on_ranks

PAD_MULTIPLE = 128
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration."""

    method: str  # "ours" | "naive"
    mode: str  # "fwd" | "fwd+bwd"
    tokens: int
    tp: int
    vocab_size: int
    chunk_tokens: int | None  # None: the kernel's automatic chunk
    repeats: int


class _GatherVocab(torch.autograd.Function):
    """Naive path: all-gather the vocab shards; backward keeps this rank's columns of the full gradient."""

    @staticmethod
    def forward(ctx, shard_NV, group):
        parts = [torch.empty_like(shard_NV) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard_NV.contiguous(), group=group)
        ctx.rank, ctx.v_local = dist.get_rank(group), shard_NV.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad_NP):
        return grad_NP[:, ctx.rank * ctx.v_local:(ctx.rank + 1) * ctx.v_local].contiguous(), None


def naive_logprobs(shard_NV: torch.Tensor, targets_N: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """Reference path: full logits on every rank, fp32 log_softmax, gather the target."""
    full_NP = _GatherVocab.apply(shard_NV, group) if dist.get_world_size(group) > 1 else shard_NV
    logp_NV = torch.log_softmax(full_NP[:, :vocab_size].float(), dim=-1)
    return logp_NV.gather(1, targets_N.unsqueeze(1)).squeeze(1)


def _call(cfg: BenchConfig, shard_NV, targets_N, group, vocab_start: int) -> None:
    def fwd():
        if cfg.method == "ours":
            return sampled_token_logprobs(shard_NV, targets_N, group, vocab_start=vocab_start,
                                          vocab_size=cfg.vocab_size, chunk_tokens=cfg.chunk_tokens)
        return naive_logprobs(shard_NV, targets_N, group, cfg.vocab_size)

    if cfg.mode == "fwd":
        with torch.no_grad():
            fwd()
    else:
        fwd().sum().backward()


def _bench_rank(rank: int, world_size: int, cfgs: list[BenchConfig]) -> list[dict]:
    group = dist.group.WORLD
    out = []
    for cfg in cfgs:
        padded = -(-cfg.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
        v_local = padded // world_size
        g = torch.Generator().manual_seed(1234 + rank)
        targets_N = torch.randint(0, cfg.vocab_size, (cfg.tokens,), generator=torch.Generator().manual_seed(7))
        shard_NV = torch.randn(cfg.tokens, v_local, generator=g, dtype=torch.bfloat16).mul_(3.0)
        shard_NV.requires_grad_(cfg.mode == "fwd+bwd")
        tiny = shard_NV.detach()[:2].clone().requires_grad_(cfg.mode == "fwd+bwd")
        _call(cfg, tiny, targets_N[:2], group, rank * v_local)  # lazy initialisation off the books
        gc.collect()
        dist.barrier(group=group)
        base_kib = status_kib("VmRSS")
        reset_peak()
        _call(cfg, shard_NV, targets_N, group, rank * v_local)
        peak_kib = status_kib("VmHWM")
        grad_bytes = shard_NV.numel() * shard_NV.element_size() if cfg.mode == "fwd+bwd" else 0
        extra_mib = (peak_kib * 1024 - base_kib * 1024 - grad_bytes) / 2**20
        times = []
        for _ in range(cfg.repeats):
            shard_NV.grad = None
            gc.collect()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            _call(cfg, shard_NV, targets_N, group, rank * v_local)
            times.append(time.perf_counter() - t0)
        shard_NV.grad = None
        out.append(dict(extra_mib=extra_mib, time_s=statistics.median(times)))
    return out


def estimated_peak_bytes(cfg: BenchConfig) -> int:
    """Generous upper bound on the memory of all ranks of one configuration (inputs included)."""
    padded = -(-cfg.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
    per_rank = cfg.tokens * (padded // cfg.tp) * 4  # bf16 shard + its gradient
    if cfg.method == "naive":
        per_rank += cfg.tokens * padded * ((4 if cfg.tp > 1 else 0) + (8 if cfg.mode == "fwd" else 16))
    else:
        per_rank += 4 * DEFAULT_CHUNK_ELEMENTS * 4
    return per_rank * cfg.tp


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def measure(cfgs: list[BenchConfig], fresh: bool, max_mem_frac: float = 0.7) -> list[dict]:
    """Run configurations (one process set each when ``fresh``) and reduce over ranks (max).

    A configuration whose estimated peak exceeds ``max_mem_frac`` of MemAvailable (a shared machine)
    is not run; its row carries ``skipped`` instead of figures.
    """
    # glibc reads these at process start: spawn children inherit them from os.environ
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    groups = [[c] for c in cfgs] if fresh else [[c for c in cfgs if c.tp == tp] for tp in sorted({c.tp for c in cfgs})]
    rows = []
    for group_cfgs in groups:
        need = sum(estimated_peak_bytes(c) for c in group_cfgs) if not fresh else estimated_peak_bytes(group_cfgs[0])
        if need > max_mem_frac * _available_bytes():
            rows.extend(dict(asdict(c), skipped=f"needs ~{need / 2**30:.1f} GiB") for c in group_cfgs)
            logger.warning("skipping %s: estimated %.1f GiB > %.0f%% of MemAvailable", group_cfgs, need / 2**30,
                           100 * max_mem_frac)
            continue
        per_rank = run_on_ranks(_bench_rank, group_cfgs[0].tp, args=(group_cfgs,), timeout_s=1800, pg_timeout_s=600,
                                start="spawn")
        for i, cfg in enumerate(group_cfgs):
            rows.append(dict(asdict(cfg), extra_mib=max(r[i]["extra_mib"] for r in per_rank),
                             time_s=max(r[i]["time_s"] for r in per_rank)))
    return rows


def _fig(row: dict, key: str, scale: float) -> str:
    return f"skipped ({row['skipped']})" if "skipped" in row else f"{row[key] * scale:.0f}"


def _ratio(ours: dict, naive: dict, key: str) -> str:
    if "skipped" in ours or "skipped" in naive:
        return "-"
    return f"{ours[key] / max(naive[key], 1e-9):.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (TP, tokens, mode), naive vs ours."""
    key = lambda r: (r["tp"], r["tokens"], r["mode"])  # noqa: E731
    by = {(key(r), r["method"]): r for r in rows}
    lines = ["| TP | tokens | mode | naive ms | ours ms | time ours/naive | naive extra MiB/rank | "
             "ours extra MiB/rank | mem ours/naive |", "|---|---|---|---|---|---|---|---|---|"]
    for k in sorted({key(r) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "fwd")):
        n = by.get((k, "naive"), {"skipped": "not run"})
        o = by.get((k, "ours"), {"skipped": "not run"})
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {_fig(n, 'time_s', 1e3)} | {_fig(o, 'time_s', 1e3)} | "
                     f"{_ratio(o, n, 'time_s')} | {_fig(n, 'extra_mib', 1)} | {_fig(o, 'extra_mib', 1)} | "
                     f"{_ratio(o, n, 'extra_mib')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Parse, measure, print the table; returns it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run: V=4096, tokens 64/96, one process per TP")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["naive", "ours"], choices=["naive", "ours"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--max-mem-frac", type=float, default=0.7,
                   help="skip a configuration whose estimated peak exceeds this fraction of MemAvailable")
    a = p.parse_args(argv)
    from camopd_megatron.ops.vocab_parallel import DEFAULT_CHUNK_TOKENS

    vocab = a.vocab_size or (4096 if a.quick else 151_936)
    tokens = a.tokens or ([64, 96] if a.quick else [512, 2048, 4096])
    chunk = a.chunk_tokens or (16 if a.quick else DEFAULT_CHUNK_TOKENS)
    chunk_desc = chunk if chunk is not None else "auto (max(1, 2**21 // V_local))"
    repeats = a.repeats or (1 if a.quick else 3)
    for name, values in (("--tp", a.tp), ("--tokens", tokens)):
        if any(v < 1 for v in values):
            raise ValueError(f"{name}: got {values}, expected positive ints")
    cfgs = [BenchConfig(m, mode, t, tp, vocab, chunk, repeats)
            for tp in a.tp for t in tokens for mode in a.modes for m in a.methods]
    table = format_table(measure(cfgs, fresh=not a.quick, max_mem_frac=a.max_mem_frac))
    print(f"V={vocab} bf16 logits, chunk_tokens={chunk_desc}, median of {repeats}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, 1 thread/rank")
    print(table)
    return table


if __name__ == "__main__":
    main()
