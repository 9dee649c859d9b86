"""Benchmark: scoring the response tokens from the final hidden states, three ways (TP = 1, fp32).

    python -m camopd_megatron.bench.output_layer                # the TRL-peer sizes, 2 threads
    python -m camopd_megatron.bench.output_layer --sizes qwen --threads 1   # the Qwen vocabulary
    python -m camopd_megatron.bench.output_layer --quick        # a tiny smoke run

For B rows of T positions whose last W outputs are scored (the response), from hidden states
``[T, B, H]`` (megatron's layout) and an output weight ``[V, H]``:

* ``full``: what the step did before: the output layer over all T positions, the ``[B, T, V]`` logits
  (megatron's ``transpose(0, 1).contiguous()``), then :func:`camopd_megatron.ops.sampled_token_logprobs`
  on the masked targets;
* ``window``: the output layer over the W scored positions only, then the same logits kernel;
* ``fused``: :func:`camopd_megatron.ops.fused_output_logprobs` on the W positions' hidden states (no
  logits tensor; what the step does now, with the student's reused kept-softmax buffer).

``floor``: the output products alone (one in ``fwd``, three in ``fwd+bwd``: 2·B·W·V·H FLOPs each) at this
machine's fp32 rate on the forward product ``[B·W, H] x [H, V]`` into reused memory, the best of 3 calls
measured right after the size's runs; ``fused / floor`` is what the fused op spends beyond its products.

``fwd`` runs under no_grad (teacher scoring); ``fwd+bwd`` backpropagates a weighted sum of the log-probs
into the hidden states and the weight (student training). Time = median of ``--repeats`` calls after one
warm-up; extra memory = VmHWM during the warm-up call − VmRSS before it (inputs and weight built; VmHWM
reset through /proc/self/clear_refs). One process, ``--threads`` torch threads. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from camopd_megatron.bench.memory import reset_peak, status_kib
from camopd_megatron.bench.step import matmul_flops_per_s
from camopd_megatron.ops import IGNORE_INDEX, fused_output_logprobs, sampled_token_logprobs
from camopd_megatron.ops.fused_output import KeptSoftmaxBuffer

SIZES = {  # the TRL peer's settings (camopd_megatron.bench.step.SIZES): batch 8, 32-token prompts
    "small": dict(b=8, t=96, w=64, h=256, v=8192),
    "large": dict(b=8, t=160, w=128, h=512, v=32000),
    "qwen": dict(b=8, t=96, w=64, h=256, v=151936),  # the Qwen vocabulary (bench.step's qwen size)
}
QUICK = {"tiny": dict(b=2, t=12, w=8, h=16, v=64)}
METHODS = ("full", "window", "fused")


def _scored(d: dict) -> tuple[int, int]:
    """Outputs ``[lo, hi)`` score the response: output t predicts token t + 1, the last W tokens."""
    return d["t"] - d["w"] - 1, d["t"] - 1


def _inputs(d: dict, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden_TBH = torch.randn(d["t"], d["b"], d["h"], generator=g).requires_grad_(grad)
    weight_VH = (torch.randn(d["v"], d["h"], generator=g) * d["h"] ** -0.5).requires_grad_(grad)
    targets_BT = torch.full((d["b"], d["t"]), IGNORE_INDEX, dtype=torch.int64)
    lo, hi = _scored(d)
    targets_BT[:, lo:hi] = torch.randint(0, d["v"], (d["b"], d["w"]), generator=g)
    upstream_BT = torch.randn(d["b"], d["t"], generator=g)
    return hidden_TBH, weight_VH, targets_BT, upstream_BT


def _method(name: str, d: dict) -> Callable[..., torch.Tensor]:
    lo, hi = _scored(d)
    kept = KeptSoftmaxBuffer()

    def full(h_TBH, w_VH, tgt_BT):
        logits_BTV = F.linear(h_TBH, w_VH).transpose(0, 1).contiguous()
        return sampled_token_logprobs(logits_BTV, tgt_BT, None, vocab_start=0, vocab_size=d["v"])

    def window(h_TBH, w_VH, tgt_BT):
        logits_BWV = F.linear(h_TBH[lo:hi], w_VH).transpose(0, 1).contiguous()
        return sampled_token_logprobs(logits_BWV, tgt_BT[:, lo:hi], None, vocab_start=0, vocab_size=d["v"])

    def fused(h_TBH, w_VH, tgt_BT):
        return fused_output_logprobs(h_TBH[lo:hi].transpose(0, 1), w_VH, tgt_BT[:, lo:hi], None, vocab_size=d["v"],
                                     kept_buffer=kept)

    return {"full": full, "window": window, "fused": fused}[name]


def measure(size: str, d: dict, method: str, mode: str, repeats: int) -> dict:
    grad = mode == "fwd+bwd"
    h, w, tgt, up = _inputs(d, grad)
    fn = _method(method, d)
    lo, hi = _scored(d)

    def call() -> torch.Tensor:
        h.grad = w.grad = None
        if not grad:
            with torch.no_grad():
                return fn(h, w, tgt)
        logp = fn(h, w, tgt)
        (logp * (up if logp.shape[1] == d["t"] else up[:, lo:hi])).sum().backward()
        return logp.detach()

    gc.collect()
    base = status_kib("VmRSS")
    reset_peak()
    out = call()
    extra_mib = (status_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    logp_w = out if out.shape[1] == d["w"] else out[:, lo:hi]
    return {"size": size, "method": method, "mode": mode, "ms": statistics.median(times) * 1e3,
            "extra_mib": extra_mib, "logp_sum": float(logp_w.double().sum())}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES, reverse=True))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = QUICK if a.quick else {s: SIZES[s] for s in a.sizes}
    rows = []
    for size, d in sizes.items():
        runs = []
        for mode in ("fwd", "fwd+bwd"):
            res = {m: measure(size, d, m, mode, 1 if a.quick else a.repeats) for m in METHODS}
            sums = [r["logp_sum"] for r in res.values()]
            if max(sums) - min(sums) > 1e-3 * max(1.0, abs(sums[0])):
                raise RuntimeError(f"{size} {mode}: the three paths disagree (sums of log-probs {sums})")
            runs.append((mode, res))
        (rate,) = matmul_flops_per_s(d["b"] * d["w"], d["h"], d["v"])
        for mode, res in runs:  # the output products alone at that rate: 1 forward, 3 with backward
            floor_ms = (3 if mode == "fwd+bwd" else 1) * 2.0 * d["b"] * d["w"] * d["v"] * d["h"] / rate * 1e3
            rows.append((size, d, mode, res, floor_ms))
    lines = ["| size | B x T (scored W) | H | V | mode | full ms | window ms | fused ms | fused / full | floor ms | "
             "fused / floor | full extra MiB | window extra MiB | fused extra MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, d, mode, r, floor_ms in rows:
        lines.append(f"| {size} | {d['b']} x {d['t']} ({d['w']}) | {d['h']} | {d['v']} | {mode} | "
                     f"{r['full']['ms']:.1f} | {r['window']['ms']:.1f} | {r['fused']['ms']:.1f} | "
                     f"{r['fused']['ms'] / r['full']['ms']:.2f} | "
                     f"{floor_ms:.1f} | {r['fused']['ms'] / floor_ms:.2f} | "
                     f"{r['full']['extra_mib']:.0f} | {r['window']['extra_mib']:.0f} | {r['fused']['extra_mib']:.0f} |")
    table = f"one process, {a.threads} thread(s), fp32, median of {a.repeats} calls\n\n" + "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
