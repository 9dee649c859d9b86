"""Benchmark: stream a large JSONL prompt file through the loader with flat memory.

    python -m camopd_megatron.bench.data_stream                 # ~1 GiB file in /tmp, deleted after
    python -m camopd_megatron.bench.data_stream --gib 0.05      # quick smoke run

Writes a JSONL file of ``prompt`` / ``messages`` records (~1 KiB each, mixed), then in this process:
builds the branch's line index (one pass), and streams ``--records`` prompts through
:class:`~camopd_megatron.data.PromptStream` (global mode, shuffled, chatml template, byte tokenizer,
length filter) in batches of 256. Reports the peak RSS over the baseline taken just before the index
is built (VmHWM reset through /proc/self/clear_refs; Linux only), next to the file size and the
index's own size (8 B per line), and the records/s of the streaming phase.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from camopd_megatron.bench.memory import reset_peak, status_kib
from camopd_megatron.data import BranchDataset, ByteTokenizer, PromptStream

_WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "tiger", "lemon", "piano", "patient",
          "reports", "pain", "what", "is", "the", "answer", "explain", "why", "sort", "numbers", "and")


def write_file(path: str, target_bytes: int, seed: int = 0) -> int:
    """Write ~``target_bytes`` of JSONL prompts; returns the number of lines."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 300))) for _ in range(512)]
    lines, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            chunk = []
            for _ in range(4096):
                text = pool[rng.randrange(len(pool))]
                if lines % 3 == 0:
                    rec = {"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": text}], "domain": "bench"}
                else:
                    rec = {"prompt": text}
                chunk.append(json.dumps(rec))
                lines += 1
            data = "\n".join(chunk) + "\n"
            f.write(data)
            written += len(data)
    return lines


def run(gib: float, records: int, max_prompt_tokens: int, keep: bool) -> dict[str, float]:
    """Write, index and stream; returns the measured numbers."""
    fd, path = tempfile.mkstemp(prefix="camopd_bench_", suffix=".jsonl", dir="/tmp")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        lines = write_file(path, int(gib * 2**30))
        size = os.path.getsize(path)
        write_s = time.perf_counter() - t0
        base_kib = status_kib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        ds = BranchDataset("general", [path], ByteTokenizer(), template="chatml", max_prompt_tokens=max_prompt_tokens,
                           too_long="truncate", shuffle=True, seed=0)
        index_s = time.perf_counter() - t0
        stream = PromptStream(ds, mode="global")
        n = min(records, lines) if records > 0 else lines
        t0 = time.perf_counter()
        done, tokens = 0, 0
        while done < n:
            batch = stream.next_batch(min(256, n - done))
            done += len(batch)
            tokens += sum(len(p.ids) for p in batch)
        stream_s = time.perf_counter() - t0
        peak_kib = status_kib("VmHWM")
        index_bytes = sum(f.offsets.nbytes for f in ds.files)  # type: ignore[attr-defined]
        return {
            "file_gib": size / 2**30, "lines": lines, "write_s": write_s, "index_s": index_s,
            "index_mib": index_bytes / 2**20, "order_mib": 8 * ds.epoch_length / 2**20,
            "records": done, "tokens": tokens, "stream_s": stream_s, "records_per_s": done / stream_s,
            "extra_peak_mib": (peak_kib - base_kib) / 1024, "base_rss_mib": base_kib / 1024,
            "stats": stream.stats(),  # type: ignore[dict-item]
        }
    finally:
        if not keep:
            os.unlink(path)


def main() -> None:
    """CLI: print one result table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="file size to generate (GiB)")
    ap.add_argument("--records", type=int, default=300_000, help="prompts to stream (0 = the whole epoch)")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    args = ap.parse_args()
    r = run(args.gib, args.records, args.max_prompt_tokens, args.keep)
    print(f"file: {r['file_gib']:.2f} GiB, {r['lines']:,} lines (written in {r['write_s']:.0f} s)")
    print(f"index: {r['index_s']:.1f} s, {r['index_mib']:.1f} MiB (8 B/line); epoch order {r['order_mib']:.1f} MiB (8 B/record)")
    print(f"streamed {r['records']:,} prompts ({r['tokens']:,} tokens) in {r['stream_s']:.1f} s: "
          f"{r['records_per_s']:,.0f} records/s; counts {r['stats']}")
    print(f"peak RSS over baseline: {r['extra_peak_mib']:.1f} MiB (baseline {r['base_rss_mib']:.0f} MiB) "
          f"= {r['extra_peak_mib'] / (r['file_gib'] * 1024) * 100:.2f} % of the file")


if __name__ == "__main__":
    main()
