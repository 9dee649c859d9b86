"""Benchmark: tokens/s of KV-cached generation vs full recompute (``distill.rollout.generate``).

    python -m camopd_megatron.bench.rollout                       # 128 and 512 new tokens
    python -m camopd_megatron.bench.rollout --new-tokens 32       # quick smoke run
    python -m camopd_megatron.bench.rollout --pp 2                # a 2-stage pipeline (2 gloo ranks)

A small random-init GPT (fp32, local layer spec) on one rank (TP = PP = 1: the KV path is the lean
decoder) or, with ``--pp N``, on N gloo ranks as one pipeline (the KV path is megatron's inference
context per stage, hidden states passed stage to stage; the recompute path runs megatron's pipeline
schedule over the whole prefix every step). A batch of prompts of one length, T = 1 sampling with no
EOS (every response has exactly ``new_tokens`` tokens). For each response length both modes run in the
same process on the same weights, alternated (KV, recompute, ``--reps`` times) after a short warm-up
generation; the table reports the best time of each, response tokens/s, the KV/recompute ratio, and
checks that both modes produced the same tokens. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time


def _bench_worker(rank: int, world_size: int, args: dict) -> list[dict]:
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.distill.rollout import SamplingParams, generate
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    cfg = ModelConfig(init="random", num_layers=args["layers"], hidden_size=args["hidden"], num_attention_heads=args["heads"],
                      ffn_hidden_size=4 * args["hidden"], vocab_size=args["vocab"],
                      seq_length=args["prompt_len"] + max(args["new_tokens"]))
    pgc = simple_pg_collection(1, world_size, 1)
    init_model_rng(0, pgc)
    model = build_gpt_model(cfg, pgc)
    prompts = [[(7 * i + 3 * j) % cfg.vocab_size for j in range(args["prompt_len"])] for i in range(args["batch"])]
    kw = dict(sample_ids=list(range(args["batch"])), seed=0, step=0, vocab_size=cfg.vocab_size,
              max_seq_len=cfg.seq_length)
    generate(model, pgc, prompts, SamplingParams(max_new_tokens=8), **kw)  # warm-up
    rows = []
    for n_new in args["new_tokens"]:
        params = SamplingParams(temperature=1.0, max_new_tokens=n_new)
        res: dict = {}
        for _ in range(args["reps"]):
            for kv in (True, False):
                t0 = time.perf_counter()
                batch = generate(model, pgc, prompts, params, use_kv_cache=kv, **kw)
                dt = time.perf_counter() - t0
                if kv not in res or dt < res[kv][1]:
                    res[kv] = (batch.num_response_tokens, dt, batch.tokens_BT)
        (n_kv, t_kv, tok_kv), (n_rc, t_rc, tok_rc) = res[True], res[False]
        rows.append({"new_tokens": n_new, "kv_tok_s": n_kv / t_kv, "rc_tok_s": n_rc / t_rc, "kv_s": t_kv, "rc_s": t_rc,
                     "ratio": (n_kv / t_kv) / (n_rc / t_rc), "same_tokens": bool((tok_kv == tok_rc).all())})
    return rows


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and return (and print) the Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512], help="response lengths")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (one gloo rank each)")
    p.add_argument("--reps", type=int, default=1, help="alternated KV / recompute runs per length (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    a = p.parse_args(argv)
    if a.pp < 1 or a.layers % a.pp:
        p.error(f"--pp {a.pp}: must be >= 1 and divide --layers {a.layers}")
    from camopd_megatron.testing.multiproc import run_on_ranks

    args = vars(a)
    rows = run_on_ranks(_bench_worker, a.pp, args=(args,), timeout_s=3600, pg_timeout_s=600, threads=a.threads)[0]
    ranks = "1 rank" if a.pp == 1 else f"PP = {a.pp} ({a.pp} gloo ranks)"
    head = (f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, ffn {4 * a.hidden}, vocab {a.vocab}; "
            f"batch {a.batch} x prompt {a.prompt_len}; T=1 sampling; {ranks}, {a.threads} thread(s) each; "
            f"best of {a.reps}\n\n")
    lines = ["| new tokens | KV cache tok/s | recompute tok/s | KV / recompute | KV s | recompute s | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['new_tokens']} | {r['kv_tok_s']:.0f} | {r['rc_tok_s']:.0f} | {r['ratio']:.1f}x | "
                     f"{r['kv_s']:.2f} | {r['rc_s']:.2f} | {'yes' if r['same_tokens'] else 'no'} |")
    table = head + "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
