"""Benchmark: activation memory of one training forward + backward with ``model.recompute``
none / selective / full, measured, with the dry-run planner's figure beside it.

    python -m camopd_megatron.bench.recompute                 # sequence 2048
    python -m camopd_megatron.bench.recompute --seq 512       # quick smoke run

One rank (gloo world of 1), a narrow random-init GPT (fp32, local layer spec) so the activations, not
the weights, are what moves: the training path of the trainer (megatron's schedule, the output window,
the fused output projection), one micro-batch of ``--batch`` rows scored over the whole sequence.
Each mode builds the same weights, runs one warm-up step, then one measured step:

* **peak**: the process's peak resident memory during the measured forward + backward minus the
  resident memory just before it (Linux ``VmHWM`` after resetting it: ``bench.memory``): what the
  step really needed on top of the model, activations and their temporaries included;
* **saved**: the bytes autograd kept for backward (``torch.autograd.graph.saved_tensors_hooks``,
  each storage once, parameters excluded) by the end of the decoder forward: the stored activations;
* **planner**: ``planner.activation_bytes`` for the same shape (Korthikanti et al. 2022: 16-bit GPT
  constants with dropout masks, scaled to fp32; the local layers keep the attention scores).

Prints a Markdown table; the full/none ratio of the measured peak is the acceptance number.
"""
from __future__ import annotations

import argparse
import gc
import os

MODES = ("none", "selective", "full")


def _bench_worker(rank: int, world_size: int, args: dict) -> list[dict]:
    import torch

    from camopd_megatron.bench.memory import reset_peak, status_kib
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, output_weight, recompute_kwargs
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches
    from camopd_megatron.planner import activation_bytes

    seq, batch = args["seq"], args["batch"]
    pgc = simple_pg_collection(1, 1, 1)
    tokens = torch.randint(0, args["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq)
    mask[:, -1] = 0.0  # the last position has no next token
    rows = []
    for mode in MODES:
        cfg = ModelConfig(num_layers=args["layers"], hidden_size=args["hidden"], num_attention_heads=args["heads"],
                          ffn_hidden_size=4 * args["hidden"], vocab_size=args["vocab"], seq_length=seq,
                          recompute=mode, recompute_num_layers=1)
        init_model_rng(0, pgc)
        model = build_gpt_model(cfg, pgc, config_extra=recompute_kwargs(cfg)).train()
        weight = output_weight(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        def loss_fn(mb, hidden):
            logp = next_token_logprobs(hidden, mb["tokens"], pgc.tp, vocab_size=cfg.vocab_size, mask_BT=mb["mask"],
                                       first_position=mb["output_window"][0], output_weight=weight)
            loss = -(logp * mb["mask"]).sum() / mask.sum()
            saved["after_forward"] = sum(v for k, v in saved.items() if k != "after_forward")
            return loss, {"loss": loss.detach()}

        def step() -> tuple[float, float]:
            model.zero_grad(set_to_none=False)
            gc.collect()
            before = status_kib("VmRSS")
            reset_peak()
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = run_microbatches(model, pgc, make_microbatches({"tokens": tokens, "mask": mask}, batch), loss_fn,
                                       forward_only=False)
            peak = (status_kib("VmHWM") - before) * 1024.0
            return peak, float(out[0]["loss"])

        step()  # warm-up: first-call allocations (grads, caches)
        peak, loss = step()
        plan = activation_bytes(cfg, s=seq, b=batch, tp=1, pp=1, act_bytes=4, sequence_parallel=False,
                                recompute=mode, flash_attention=False, method="uniform", num_layers=1)
        rows.append({"mode": mode, "peak": peak, "saved": float(saved.get("after_forward", 0)), "planner": plan,
                     "loss": loss})
        del model, weight
    return rows


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and return (and print) the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=2048, help="tokens per row")
    p.add_argument("--batch", type=int, default=1, help="rows of the micro-batch")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the rank")
    a = p.parse_args(argv)
    from camopd_megatron.testing.multiproc import run_on_ranks

    # glibc: a fixed mmap threshold (setting it turns the dynamic one off), so every tensor of 128 KiB or
    # more is its own mapping, returned on free: the resident peak then follows the live tensors instead
    # of heap space freed by the warm-up and reused (the rank process reads this at start-up)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    rows = run_on_ranks(_bench_worker, 1, args=(vars(a),), timeout_s=3600, threads=a.threads, start="spawn")[0]
    mib = float(2**20)
    none = {k: rows[0][k] for k in ("peak", "saved", "planner")}
    head = (f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, ffn {4 * a.hidden}, vocab {a.vocab}, fp32, "
            f"local layer spec; micro-batch {a.batch} x {a.seq} tokens; full = uniform, 1 layer; 1 rank\n\n")
    lines = ["| model.recompute | peak MiB | / none | saved for backward MiB | / none | planner MiB | / none | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak'] / mib:.1f} | {r['peak'] / none['peak']:.2f} | "
                     f"{r['saved'] / mib:.1f} | {r['saved'] / none['saved']:.2f} | {r['planner'] / mib:.1f} | "
                     f"{r['planner'] / none['planner']:.2f} | {r['loss']:.6f} |")
    table = head + "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
