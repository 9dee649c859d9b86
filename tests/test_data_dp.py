"""The trainer's use of prompt sources on 2 real gloo ranks: same global batch everywhere, each rank's
contiguous slice, slices disjoint and together the global batch; sharded mode covers the epoch."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from camopd_megatron.config import config_from_dict
from camopd_megatron.testing.configs import random_init
from camopd_megatron.data import ByteTokenizer, build_prompt_sources, rank_slice
from camopd_megatron.testing.multiproc import run_on_ranks


def _draw(rank: int, world_size: int, path: str) -> dict:
    cfg = config_from_dict(random_init({"data": {"branches": {"general": {"paths": [path]}, "domain": {"paths": [path]}},
                                     "heldout_fraction": 0.1}}))
    tok = ByteTokenizer()
    glob = build_prompt_sources(cfg.data, ["general"], tok, seed=5)["general"]
    batches = [glob.next_batch(8) for _ in range(3)]
    mine = [[p.index for p in rank_slice(b, rank, world_size)] for b in batches]
    every = [None] * world_size
    dist.all_gather_object(every, {"global": [[p.index for p in b] for b in batches], "mine": mine})
    shard = build_prompt_sources(cfg.data, ["general"], tok, seed=5, mode="sharded",
                                 dp_rank=rank, dp_size=world_size)["general"]
    n = shard.dataset.epoch_length  # type: ignore[attr-defined]
    own = [p.index for p in shard.next_batch((n - rank + world_size - 1) // world_size)]
    shards = [None] * world_size
    dist.all_gather_object(shards, own)
    return {"every": every, "shards": shards, "epoch": n, "heldout": shard.dataset.heldout_ids().tolist()}  # type: ignore[attr-defined]


def test_two_ranks_global_batch_and_shards(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(45)))
    r0, r1 = run_on_ranks(_draw, 2, args=(str(path),))
    every = r0["every"]
    assert every == r1["every"] and every[0]["global"] == every[1]["global"]  # same global batches on both ranks
    for step, batch in enumerate(every[0]["global"]):
        assert every[0]["mine"][step] + every[1]["mine"][step] == batch
    a, b = r0["shards"]
    assert not set(a) & set(b) and len(a) + len(b) == r0["epoch"]
    assert sorted(a + b + r0["heldout"]) == list(range(45))
