"""Peak memory of the HF <-> megatron converters on a ~1 GB random model (BENCHMARKS.md).

    python -m camopd_megatron.bench.convert_memory [--layers 8 --hidden 2048 ...] [--workdir DIR]

Writes a random-init Llama-style model as sharded bf16 safetensors into a temporary directory
(streamed, one layer at a time), then measures each direction in a fresh process: extra memory =
VmHWM during the conversion − VmRSS just before it (VmHWM reset through /proc/self/clear_refs;
glibc told to mmap every block ≥ 64 KiB so freed memory cannot hide a peak). Compared with
(largest layer + one output shard). Everything is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from camopd_megatron.bench.memory import reset_peak, status_kib

MiB = 2**20


def write_random_model(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                       shard_bytes: int) -> dict[str, Any]:
    """A random bf16 LlamaForCausalLM checkpoint (sharded safetensors + index); returns size facts."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    d = hidden // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
               vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (heads * d, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * d, hidden), p + "self_attn.v_proj.weight": (kv_heads * d, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * d), p + "post_attention_layernorm.weight": (hidden,),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    sizes = [sum(2 * torch.Size(s).numel() for s in grp.values()) for grp in groups]
    weight_map, buf, n, total = {}, {}, 0, 0
    for grp in groups:
        for name, shape in grp.items():
            buf[name] = rnd(*shape)
            total += buf[name].nbytes
            if sum(t.nbytes for t in buf.values()) >= shard_bytes:
                n += 1
                save_file(buf, str(out / f"shard-{n}.safetensors"), metadata={"format": "pt"})
                weight_map.update({k: f"shard-{n}.safetensors" for k in buf})
                buf = {}
    if buf:
        n += 1
        save_file(buf, str(out / f"shard-{n}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"shard-{n}.safetensors" for k in buf})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"total_bytes": total, "largest_layer_bytes": max(sizes), "largest_decoder_layer_bytes": max(sizes[1:-1]),
            "input_shards": n}


def _measure(direction: str, src: str, dst: str, shard_bytes: int) -> dict[str, Any]:
    """Run in a fresh process: one conversion, its peak memory above the pre-call RSS."""
    import torch  # noqa: F401 - imports are part of the baseline, not of the conversion
    import torch.distributed.checkpoint  # noqa: F401
    import tqdm  # noqa: F401
    from safetensors.torch import save_file  # noqa: F401

    from camopd_megatron.checkpoint import dist as _dist  # noqa: F401
    from camopd_megatron.checkpoint.hf_io import convert_hf_to_megatron, convert_megatron_to_hf

    before = status_kib("VmRSS") * 1024
    reset_peak()
    t0 = time.perf_counter()
    if direction == "import":
        convert_hf_to_megatron(src, dst, progress=False)
    else:
        convert_megatron_to_hf(src, dst, max_shard_bytes=shard_bytes, progress=False)
    return {"direction": direction, "seconds": round(time.perf_counter() - t0, 2),
            "baseline_rss_mib": round(before / MiB, 1), "extra_peak_mib": round((status_kib("VmHWM") * 1024 - before) / MiB, 1)}


def _run_child(direction: str, src: Path, dst: Path, shard_bytes: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "camopd_megatron.bench.convert_memory", "--measure", direction, "--src", str(src),
           "--dst", str(dst), "--out-shard-mib", str(shard_bytes // MiB)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise RuntimeError(f"{direction} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: generate the model, measure both directions, print a JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--in-shard-mib", type=int, default=200, help="shard size of the generated HF input")
    p.add_argument("--out-shard-mib", type=int, default=256, help="max shard size of the exported HF output")
    p.add_argument("--workdir", default=None, help="where to write (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--measure", choices=["import", "export"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps(_measure(a.measure, a.src, a.dst, a.out_shard_mib * MiB)))
        return 0
    work = Path(a.workdir or tempfile.mkdtemp(prefix="camopd_convert_mem_"))
    try:
        facts = write_random_model(work / "hf", layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                                   ffn=a.ffn, vocab=a.vocab, shard_bytes=a.in_shard_mib * MiB)
        shard = a.out_shard_mib * MiB
        rows = [_run_child("import", work / "hf", work / "ours", shard),
                _run_child("export", work / "ours", work / "hf_out", shard)]
        bound = (facts["largest_layer_bytes"] + shard) / MiB
        for r in rows:
            r["bound_mib"] = round(bound, 1)
            r["ratio_to_bound"] = round(r["extra_peak_mib"] / bound, 3)
        print(json.dumps({"model": {k: (round(v / MiB, 1) if k.endswith("bytes") else v) for k, v in facts.items()},
                          "out_shard_mib": a.out_shard_mib, "results": rows}, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
