"""Teachers on their own rank groups (and colocated) and the log-prob scoring service (issue 4).

Three multi-rank launches (each groups many checks):

* 4 ranks: student TP=2 on 0-1, ``general`` TP=1 on 2 (checkpoint saved at TP=2), ``domain`` TP=1
  on 3 (saved at TP=1). Teacher log-probs equal a one-rank evaluation of the same checkpoint for
  variable-length padded batches, also at a softmax temperature T != 1 (``loss.teacher_temperature``,
  carried in the request header); one float per token travels back; colocated mode (student TP=2 ×
  DP=2) gives the same numbers, at T = 1 and at T; a wrong-vocabulary checkpoint is refused on every
  rank; abort reaches the teachers; a peer that does not answer gives an error naming role and rank.
* 6 ranks: student DP=2 (both replicas routed to one teacher replica, one of them sending B=0),
  ``general`` at TP=2, ``domain`` and ``extra`` time-sharing one PP=2 group; then colocated at
  TP=1 × PP=2 × DP=3 with offload on.
* 2 ranks: malformed requests written to the wire by hand (the client never sends them) are refused by
  the teacher host, each with an error naming the sender and what is wrong; it serves on afterwards.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from camopd_megatron.checkpoint.dist import CheckpointError
from camopd_megatron.config import ConfigError, config_from_dict
from camopd_megatron.teachers.protocol import Command
from camopd_megatron.testing.multiproc import run_on_ranks

MODEL = dict(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=128,
             vocab_size=100, vocab_pad_multiple=128, seq_length=32)
SEEDS = {"general": 11, "domain": 22, "extra": 33}
TOL = 1e-5
TEMP = 0.7
"""The tempered requests' temperature (its log-probs differ from T = 1 by far more than TOL)."""


def _cfg(teachers: list[dict[str, Any]], **parallel: Any) -> Any:
    return config_from_dict({"model": MODEL, "parallel": parallel, "teachers": teachers, "run": {"seed": 5}})


def _batch(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded batch: row i has a random length in [2, t]; the first token is a prompt (masked)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL["vocab_size"], (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g) if b else torch.zeros(0, dtype=torch.int64)
    pos = torch.arange(t).unsqueeze(0)
    mask = ((pos >= 1) & (pos < (lengths.unsqueeze(1) - 1))).float()  # targets t+1 inside the row
    tokens = torch.where(pos < lengths.unsqueeze(1), tokens, torch.zeros_like(tokens))  # pad id 0
    return tokens, mask


BATCHES = [(3, 10, 1), (2, 7, 2), (4, 16, 3)]


# ------------------------------------------------------------------------------------------------ helpers run on ranks
def _save_checkpoints(ckpts: dict[str, tuple[str, int, int]]) -> None:
    """Save one random model per name at (tp, pp); every rank of the world joins every save."""
    import torch.distributed as dist

    from camopd_megatron.checkpoint.dist import model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    world = dist.get_world_size()
    for name, (path, tp, pp) in ckpts.items():
        pgc = simple_pg_collection(tp, pp, world // (tp * pp))
        init_model_rng(SEEDS[name], pgc)
        model = build_gpt_model(ModelConfig(**MODEL), pgc)
        save_checkpoint(path, model_sharded_state_dict(model, pgc), model_cfg=ModelConfig(**MODEL))


def _reference(ckpts: dict[str, str], batches: list) -> dict[str, list]:
    """One-rank evaluation (TP=1, PP=1 on every rank separately) of each checkpoint: per batch, the
    log-probs at T = 1 and at T = TEMP (log_softmax(logits / TEMP) of the whole vocabulary, in torch)."""
    import torch.distributed as dist

    from camopd_megatron.checkpoint.dist import load_model
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.pipeline import model_forward

    cfg = ModelConfig(**MODEL)
    pgc = simple_pg_collection(1, 1, dist.get_world_size())
    out: dict[str, list] = {}
    for name, path in ckpts.items():
        init_model_rng(999, pgc)
        model = build_gpt_model(cfg, pgc)
        load_model(model, path, model_cfg=cfg, pg_collection=pgc)
        model.eval()
        res = []
        with torch.no_grad():
            for b, t, s in batches:
                tokens, mask = _batch(b, t, s)
                logits = model_forward(model, tokens)
                logp = next_token_logprobs(logits, tokens, None, vocab_size=cfg.vocab_size, mask_BT=mask)
                ls = torch.log_softmax(logits[..., : cfg.vocab_size].double() / TEMP, dim=-1)
                tempered = ls[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).float()
                tempered = torch.cat([tempered, tempered.new_zeros(tokens.shape[0], 1)], 1) * mask
                res.append((logp, tempered))
        out[name] = res
    return out


def _errors_on_every_rank(cfg_bad: Any, layout: Any, groups: Any) -> str:
    from camopd_megatron.teachers import build_teachers

    try:
        build_teachers(cfg_bad, layout, groups)
    except (CheckpointError, ConfigError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


# ------------------------------------------------------------------------------------------------ 4 ranks
def _four_rank_worker(rank: int, world: int, tmp: str) -> dict:
    import torch.distributed as dist

    from camopd_megatron.teachers import (
        StudentAborted,
        TeacherClient,
        TeacherServiceError,
        build_teachers,
    )
    from camopd_megatron.parallel import RoleLayout, build_process_groups

    paths = {"general": f"{tmp}/general", "domain": f"{tmp}/domain"}
    _save_checkpoints({"general": (paths["general"], 2, 1), "domain": (paths["domain"], 1, 1)})
    ref = _reference(paths, BATCHES)
    res: dict[str, Any] = {"rank": rank}
    res["temperature_effect"] = min((hot - cold).abs().max().item() for cold, hot in ref["domain"])

    teachers = [dict(name="general", branches=["general"], placement="separate", checkpoint=paths["general"]),
                dict(name="domain", branches=["domain"], placement="separate", checkpoint=paths["domain"])]
    cfg = _cfg(teachers, tp=2, timeout_s=60)
    layout = RoleLayout.from_config(cfg, world)
    groups = build_process_groups(layout, rank)

    # bad input: a teacher checkpoint with another vocabulary, refused on every rank before any collective
    bad = Path(tmp) / "vocab200"
    if rank == 0:
        bad.mkdir()
        manifest = json.loads((Path(paths["domain"]) / "camopd.json").read_text())
        from camopd_megatron.checkpoint.integrity import MANIFEST_SUM_KEY, manifest_digest

        for section in ("model", "model_config"):
            if isinstance(manifest.get(section), dict):
                manifest[section]["vocab_size"] = 200
        manifest[MANIFEST_SUM_KEY] = manifest_digest(manifest)  # a consistent manifest of another vocabulary
        (bad / "camopd.json").write_text(json.dumps(manifest))
    dist.barrier()
    cfg_bad = _cfg([teachers[0], {**teachers[1], "checkpoint": str(bad)}], tp=2)
    res["bad_vocab"] = _errors_on_every_rank(cfg_bad, layout, groups)

    client, host = build_teachers(cfg, layout, groups)
    if host is not None:
        stats = host.serve()
        res["served"] = (stats.requests, stats.bytes_sent, stats.tokens)
    else:
        try:
            diffs, tempered_diffs, zeros_ok, expected_bytes = [], [], True, 0
            for i, (b, t, s) in enumerate(BATCHES):
                tokens, mask = _batch(b, t, s)
                for branch in ("general", "domain"):
                    logp = client.score(branch, tokens, mask)
                    assert logp.dtype == torch.float32 and logp.shape == (b, t)
                    diffs.append((logp - ref[branch][i][0]).abs().max().item())
                    zeros_ok &= bool((logp[mask == 0] == 0).all())
                    expected_bytes += 4 * b * t
                hot = client.score("domain", tokens, mask, temperature=TEMP)  # the header carries T
                tempered_diffs.append((hot - ref["domain"][i][1]).abs().max().item())
                expected_bytes += 4 * b * t
            empty = client.score("general", torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, 5))
            stream_diffs, stream_errors = _streams(client, ref)
            expected_bytes += sum(4 * b * (t - 1) * 2 for b, t, _ in BATCHES) + 4 * 2 * (5 + 6)
            res.update(diffs=diffs, tempered_diffs=tempered_diffs, zeros_ok=zeros_ok, empty_shape=tuple(empty.shape),
                       expected_score_bytes=expected_bytes, stats=dict(client.stats), stream_diffs=stream_diffs,
                       stream_errors=stream_errors)
        finally:
            client.close()

    # the student at TP=1 × PP=2: its replica leader is the last stage (rank 1), which shares the answer
    cfg_pp = _cfg(teachers, tp=1, pp=2, timeout_s=60)
    layout_pp = RoleLayout.from_config(cfg_pp, world)
    groups_pp = build_process_groups(layout_pp, rank)
    client_pp, host_pp = build_teachers(cfg_pp, layout_pp, groups_pp)
    if host_pp is not None:
        host_pp.serve()
    else:
        tokens, mask = _batch(*BATCHES[0])
        res["student_pp2"] = [(client_pp.score(b, tokens, mask) - ref[b][0][0]).abs().max().item()
                              for b in ("general", "domain")]
        res["student_pp2_bytes"] = client_pp.stats["bytes_received"]
        client_pp.close()

    # abort: the student raises, teachers exit with its message
    if host is not None:
        try:
            host.serve()
            res["abort"] = "returned"
        except StudentAborted as e:
            res["abort"] = str(e)
    else:
        client2 = TeacherClient(cfg, layout, groups)
        tokens, mask = _batch(2, 6, 9)
        client2.score("domain", tokens, mask)
        client2.close(error=RuntimeError("boom in the student"))
    dist.barrier()

    # colocated: the same checkpoints on the student's ranks (TP=2 × DP=2 over all 4 ranks)
    co = [{**t, "placement": "colocated"} for t in teachers]
    cfg_co = _cfg(co, tp=2, timeout_s=60)
    layout_co = RoleLayout.from_config(cfg_co, world)
    groups_co = build_process_groups(layout_co, rank)
    rng_before = torch.get_rng_state()
    client_co, host_co = build_teachers(cfg_co, layout_co, groups_co)
    res["rng_kept"] = bool(torch.equal(rng_before, torch.get_rng_state()))  # the student's stream is untouched
    assert host_co is None
    i = groups_co.dp_rank  # each DP replica scores its own batch
    tokens, mask = _batch(*BATCHES[i])
    res["colocated"] = [(client_co.score(b, tokens, mask) - ref[b][i][0]).abs().max().item()
                        for b in ("general", "domain")]
    res["colocated_tempered"] = [(client_co.score(b, tokens, mask, temperature=TEMP) - ref[b][i][1]).abs().max().item()
                                 for b in ("general", "domain")]
    client_co.close()

    # a teacher that never answers: the student fails within parallel.timeout_s, naming role and rank
    if groups.is_student:
        client3 = TeacherClient(cfg, layout, groups, timeout_s=2.0)
        tokens, mask = _batch(2, 6, 9)
        try:
            client3.score("general", tokens, mask)
            res["timeout"] = "no error"
        except TeacherServiceError as e:
            res["timeout"] = str(e)
    return res


def _streams(client: Any, ref: dict[str, list]) -> tuple[list[float], list[str]]:
    """Every batch streamed to both teachers (protocol "Streams": both opened, then blocks of 3, 1, 0, 2, ...
    columns interleaved, the domain teacher at T = TEMP), against the one-rank reference; then misuse."""
    diffs: list[float] = []
    for i, (b, t, s) in enumerate(BATCHES):
        tokens, mask = _batch(b, t, s)
        streams = {"general": client.stream("general", b, t), "domain": client.stream("domain", b, t, temperature=TEMP)}
        start, sizes = 0, itertools.cycle([3, 1, 0, 2])
        while start < t - 1:
            n = min(next(sizes), t - 1 - start)
            for st in streams.values():
                st.extend(start, tokens[:, start:start + n + 1], mask[:, start:start + n], last=start + n == t - 1)
            start += n
        for name, st in streams.items():
            want = ref[name][i][0 if name == "general" else 1][:, : t - 1]
            diffs.append((st.result() - want).abs().max().item())
    errors = []
    st = client.stream("general", 2, 6)
    tokens, mask = _batch(2, 6, 9)
    for call in (lambda: st.extend(1, tokens[:, 1:3], mask[:, 1:2], last=False),  # not at column 0
                 lambda: st.extend(0, tokens[:, :6], mask[:, :6], last=False),  # past the capacity
                 st.result):  # still open
        try:
            call()
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    st.extend(0, tokens[:, :6], mask[:, :5], last=True)
    diffs.append((st.result() - ref_one(client, tokens, mask)[:, :5]).abs().max().item())
    return diffs, errors


def ref_one(client: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same rows scored whole (``score``): what a stream must give."""
    return client.score("general", tokens, mask)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("teachers4"))
    return run_on_ranks(_four_rank_worker, 4, args=(tmp,), timeout_s=300, pg_timeout_s=90)


def test_separate_teachers_match_single_process(four_ranks):
    for r in four_ranks[:2]:  # both student TP ranks get the result
        assert max(r["diffs"]) <= TOL, r["diffs"]
        assert r["zeros_ok"] and r["empty_shape"] == (0, 5)
        assert max(r["tempered_diffs"]) <= TOL, r["tempered_diffs"]
        # streamed block by block (each teacher extending its KV cache) = scored whole
        assert len(r["stream_diffs"]) == 2 * len(BATCHES) + 1 and max(r["stream_diffs"]) <= TOL, r["stream_diffs"]
        assert "continuing at column 0" in r["stream_errors"][0], r["stream_errors"]
        assert "below the capacity 6" in r["stream_errors"][1], r["stream_errors"]
        assert "still open" in r["stream_errors"][2], r["stream_errors"]
        # the tempered reference really differs from T = 1 (a teacher ignoring T would fail above)
        assert r["temperature_effect"] > 1e-2, r["temperature_effect"]
    # distinct teachers really differ (the routing is not trivially right)
    assert four_ranks[2]["served"][0] == {"general": 2 * len(BATCHES) + 3}  # + streams, + the misuse stream and its check
    assert four_ranks[3]["served"][0] == {"domain": 3 * len(BATCHES)}


def test_one_float_per_token_moves_back(four_ranks):
    leader, other = four_ranks[0], four_ranks[1]
    assert leader["stats"]["bytes_received"] == leader["expected_score_bytes"]
    # general: scored whole, then streamed (columns [0, t - 1)), then the misuse check's stream and score
    assert four_ranks[2]["served"][1] == sum(4 * b * (2 * t - 1) for b, t, _ in BATCHES) + 4 * 2 * (5 + 6)
    assert other["stats"]["bytes_received"] == 0  # only the replica leader talks to teachers


def test_colocated_equals_separate(four_ranks):
    for r in four_ranks:
        assert max(r["colocated"]) <= TOL, r["colocated"]
        assert max(r["colocated_tempered"]) <= TOL, r["colocated_tempered"]
        assert r["rng_kept"]


def test_student_pipeline_leader_is_last_stage(four_ranks):
    b, t, _ = BATCHES[0]
    for r in four_ranks[:2]:
        assert max(r["student_pp2"]) <= TOL, r["student_pp2"]
    assert four_ranks[1]["student_pp2_bytes"] == 2 * 4 * b * t and four_ranks[0]["student_pp2_bytes"] == 0


def test_wrong_vocab_refused_on_every_rank(four_ranks):
    for r in four_ranks:
        msg = r["bad_vocab"]
        assert msg.startswith("CheckpointError") and "teachers[1].checkpoint" in msg, msg
        assert "200" in msg and "model.vocab_size=100" in msg, msg


def test_abort_and_timeout_name_role_and_rank(four_ranks):
    for r in four_ranks[2:]:
        assert "boom in the student" in r["abort"] and "rank 0" in r["abort"], r["abort"]
    msg = four_ranks[0]["timeout"]
    assert "role 'general' rank 2" in msg and "parallel.timeout_s" in msg, msg
    assert "role 'student' rank 0" in four_ranks[1]["timeout"], four_ranks[1]["timeout"]


# ------------------------------------------------------------------------------------------------ 6 ranks
def _six_rank_worker(rank: int, world: int, tmp: str) -> dict:
    from camopd_megatron.teachers import build_teachers
    from camopd_megatron.parallel import RoleLayout, build_process_groups

    paths = {n: f"{tmp}/{n}" for n in SEEDS}
    _save_checkpoints({"general": (paths["general"], 1, 1), "domain": (paths["domain"], 2, 1),
                       "extra": (paths["extra"], 1, 2)})
    ref = _reference(paths, BATCHES)
    res: dict[str, Any] = {"rank": rank}
    teachers = [
        dict(name="general", branches=["general"], placement="separate", tp=2, checkpoint=paths["general"]),
        dict(name="domain", branches=["domain"], placement="separate", pp=2, group="pool", checkpoint=paths["domain"]),
        dict(name="extra", branches=["code"], placement="separate", pp=2, group="pool", checkpoint=paths["extra"]),
    ]
    cfg = _cfg(teachers, tp=1, timeout_s=60)
    layout = RoleLayout.from_config(cfg, world)
    groups = build_process_groups(layout, rank)
    client, host = build_teachers(cfg, layout, groups)
    if host is not None:
        res["served"] = host.serve().requests
    else:
        try:
            diffs = []
            for i, (b, t, s) in enumerate(BATCHES):
                # replica 1 scores a different batch, and nothing at all for the last one
                j = i if groups.dp_rank == 0 else (i + 1) % len(BATCHES)
                bj, tj, sj = BATCHES[j]
                if groups.dp_rank == 1 and i == len(BATCHES) - 1:
                    bj = 0
                tokens, mask = _batch(bj, tj, sj)
                for branch, name in (("general", "general"), ("domain", "domain"), ("code", "extra")):
                    logp = client.score(branch, tokens, mask)
                    assert logp.shape == (bj, tj)
                    if bj:
                        diffs.append((logp - ref[name][j][0]).abs().max().item())
                # the same rows streamed in blocks of 4 columns: these teachers (TP = 2, PP = 2) keep the
                # blocks and score each stream whole at its last one; both replicas take turns at the pool
                streams = [(name, client.stream(branch, bj, tj)) for branch, name in
                           (("general", "general"), ("domain", "domain"), ("code", "extra"))]
                for start in range(0, tj - 1, 4):
                    n = min(4, tj - 1 - start)
                    for _, st in streams:
                        st.extend(start, tokens[:, start:start + n + 1], mask[:, start:start + n],
                                  last=start + n == tj - 1)
                for name, st in streams:
                    logp = st.result()
                    assert logp.shape == (bj, tj - 1)
                    if bj:
                        diffs.append((logp - ref[name][j][0][:, : tj - 1]).abs().max().item())
            res["diffs"] = diffs
        finally:
            client.close()

    # colocated at TP=1 × PP=2 × DP=3 with offload: the last stage shares the result with stage 0
    co = [{**t, "placement": "colocated", "offload": True, "group": None, "tp": None, "pp": None} for t in teachers]
    cfg_co = _cfg(co, tp=1, pp=2, timeout_s=60)
    layout_co = RoleLayout.from_config(cfg_co, world)
    groups_co = build_process_groups(layout_co, rank)
    client_co, _ = build_teachers(cfg_co, layout_co, groups_co)
    i = groups_co.dp_rank
    tokens, mask = _batch(*BATCHES[i])
    res["colocated"] = [(client_co.score(b, tokens, mask) - ref[n][i][0]).abs().max().item()
                        for b, n in (("general", "general"), ("code", "extra"))]
    client_co.close()
    return res


@pytest.mark.slow
def test_tp2_and_pp2_teachers_and_shared_group(tmp_path):
    out = run_on_ranks(_six_rank_worker, 6, args=(str(tmp_path),), timeout_s=400, pg_timeout_s=120)
    for r in out[:2]:
        assert len(r["diffs"]) >= 2 * 3 * (len(BATCHES) - 1) and max(r["diffs"]) <= TOL, r["diffs"]
    # per batch and student replica: one score and one stream per teacher
    assert out[2]["served"] == out[3]["served"] == {"general": 4 * len(BATCHES)}
    assert out[4]["served"] == out[5]["served"] == {"domain": 4 * len(BATCHES), "extra": 4 * len(BATCHES)}
    for r in out:
        assert max(r["colocated"]) <= TOL, (r["rank"], r["colocated"])


# ------------------------------------------------------------------------------------------------ bad inputs (no ranks)
def _layout(cfg: Any, world: int = 4) -> Any:
    from camopd_megatron.parallel import RoleLayout

    return RoleLayout.from_config(cfg, world)


def test_bad_teacher_setups_name_the_key(tmp_path):
    from camopd_megatron.teachers import check_teachers

    from camopd_megatron.config import ModelConfig

    base = [dict(name="general", init="random", branches=["general"], placement="separate"),
            dict(name="domain", init="random", branches=["domain"], placement="separate")]
    cfg = _cfg(base, tp=2)
    layout = _layout(cfg)
    check_teachers(cfg, layout)  # fine as is

    # the config's own teacher rules: checked when it is validated, which planning the layout does
    cfg.teachers[1].branches = []
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.branches"):
        _layout(cfg)
    cfg.teachers[1].branches = ["domain", "general"]
    with pytest.raises(ConfigError, match="branch 'general' served by one teacher only"):
        _layout(cfg)
    cfg.teachers[1].branches = ["domain"]

    cfg.teachers[0].init, cfg.teachers[0].checkpoint = "checkpoint", str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"teachers\[0\]\.checkpoint.*does not exist"):
        check_teachers(cfg, layout)
    half = tmp_path / "half"
    half.mkdir()
    cfg.teachers[0].checkpoint = str(half)
    with pytest.raises(CheckpointError, match=r"teachers\[0\]\.checkpoint.*interrupted save"):
        check_teachers(cfg, layout)
    # a manifest that matches but torch_dist metadata that is garbage (or a pickle bomb)
    from camopd_megatron.checkpoint.dist import FORMAT_VERSION, MANIFEST, arch_dict

    (half / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "model": arch_dict(cfg.model)}))
    (half / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"teachers\[0\]\.checkpoint.*corrupt or unsafe"):
        check_teachers(cfg, layout)
    (half / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                             "model": {**arch_dict(cfg.model), "num_layers": 4}}))
    # an architecture field set in the config that the checkpoint contradicts: both values named
    cfg.teachers[0].model = ModelConfig(**{**MODEL, "init": "checkpoint", "checkpoint": str(half)})
    with pytest.raises(CheckpointError, match=r"teachers\[0\]\.model\.num_layers: got 2; expected the checkpoint's value 4"):
        check_teachers(cfg, layout)
    # the integrity check of a training resume (sizes, small files' checksums) runs before any model build
    from camopd_megatron.checkpoint.integrity import FILES_KEY, MANIFEST_SUM_KEY, manifest_digest, record_files

    (half / "ranks").mkdir()
    (half / "ranks" / "0.pt").write_bytes(b"rng state" * 10)
    (half / "__0_0.distcp").write_bytes(b"tensor bytes" * 10)
    manifest = {"format_version": FORMAT_VERSION, "model": arch_dict(cfg.model),
                FILES_KEY: record_files(half, ["ranks/0.pt", "__0_0.distcp"])}
    (half / MANIFEST).write_text(json.dumps({**manifest, MANIFEST_SUM_KEY: manifest_digest(manifest)}))
    (half / "ranks" / "0.pt").write_bytes(b"rng statE" * 10)  # same size, other content
    with pytest.raises(CheckpointError, match=r"teachers\[0\]\.checkpoint=.*half.*is damaged: ranks/0.pt does not "
                                              r"match its checksum"):
        check_teachers(cfg, layout)
    (half / "ranks" / "0.pt").write_bytes(b"rng state" * 10)
    (half / "__0_0.distcp").write_bytes(b"tensor")
    with pytest.raises(CheckpointError, match=r"is damaged: __0_0.distcp has 6 bytes, 120 were written"):
        check_teachers(cfg, layout)


def test_world_size_mismatch_and_client_input_errors():
    from camopd_megatron.teachers import check_batch
    from camopd_megatron.parallel import LayoutError

    base = [dict(name="general", init="random", branches=["general"], placement="separate"),
            dict(name="domain", init="random", branches=["domain"], placement="separate")]
    with pytest.raises(LayoutError, match="world size 5"):
        _layout(_cfg(base, tp=2, dp=1), world=5)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        check_batch(tokens.float(), torch.ones(2, 3), vocab_size=100, group=None, what="x")
    with pytest.raises(ValueError, match="shape"):
        check_batch(tokens, torch.ones(2, 4), vocab_size=100, group=None, what="x")
    with pytest.raises(ValueError, match=r"model.vocab_size=100"):
        check_batch(tokens + 100, torch.ones(2, 3), vocab_size=100, group=None, what="x")
    assert check_batch(tokens, torch.ones(2, 3), vocab_size=100, group=None, what="x") == (2, 3)


# ------------------------------------------------------------------------------------------------ 2 ranks
SCORE, OPEN, EXTEND = Command.SCORE, Command.OPEN, Command.EXTEND
BAD_REQUESTS = {  # what a student rank sends (headers only: the host refuses each before any payload)
    "unknown command": [(99, 0, 2, 3, 0, False)],
    "unknown teacher": [(SCORE, 1, 2, 3, 0, False)],  # teacher id 1 is the colocated one
    "block without a stream": [(EXTEND, 0, 2, 3, 0, False)],
    "opened twice": [(OPEN, 0, 2, 6, 0, False), (OPEN, 0, 2, 6, 0, False)],
    "no capacity": [(OPEN, 0, 2, 0, 0, False)],
    "block off its column": [(OPEN, 0, 2, 6, 0, False), (EXTEND, 0, 2, 2, 1, False)],
    "block of other rows": [(OPEN, 0, 2, 6, 0, False), (EXTEND, 0, 3, 2, 0, False)],
    "block past the capacity": [(OPEN, 0, 2, 6, 0, False), (EXTEND, 0, 2, 6, 0, False)],
}
"""Malformed requests as (command, teacher id, B, T, start, last): the client's checks never let them out, so
they are written to the wire by hand here."""


def _bad_request_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from camopd_megatron.parallel import RoleLayout, build_process_groups
    from camopd_megatron.teachers import TeacherServiceError, build_teachers
    from camopd_megatron.teachers.protocol import TAG_HEADER, header, p2p_send

    cfg = _cfg([dict(name="general", init="random", branches=["general"], placement="separate"),
                dict(name="domain", init="random", branches=["domain"], placement="colocated")], timeout_s=30)
    layout = RoleLayout.from_config(cfg, world)
    client, host = build_teachers(cfg, layout, build_process_groups(layout, rank))
    errors: dict[str, str] = {}
    for case, requests in BAD_REQUESTS.items():
        if host is not None:  # one serve per case: the host raises at the bad request
            try:
                host.serve()
                errors[case] = "served without an error"
            except TeacherServiceError as e:
                errors[case] = str(e)
        else:
            for cmd, tid, b, t, start, last in requests:
                p2p_send(header(cmd, tid, b, t, start=start, last=last), 1, tag=TAG_HEADER, timeout_s=30,
                         peer="teacher rank 1", what="a hand-made request")
        dist.barrier()
    if host is not None:  # still serving after them: a well-formed request is answered
        return {"errors": errors, "served": host.serve().requests}
    tokens, mask = _batch(2, 6, 9)
    logp = client.score("general", tokens, mask)
    client.close()
    return {"finite": bool(torch.isfinite(logp).all())}


def test_malformed_requests_are_refused_by_the_host_by_name():
    """The teacher host refuses a request it cannot serve with an error naming its role, rank, the sender and
    what is wrong, before reading any payload, and serves well-formed requests afterwards."""
    student, teacher = run_on_ranks(_bad_request_worker, 2, timeout_s=180, pg_timeout_s=60)
    errors = teacher["errors"]
    assert all(e.startswith("role 'general' rank 1: bad ") and "rank 0" in e for e in errors.values()), errors
    assert "unknown command 99 (this group hosts ids [0]" in errors["unknown command"], errors
    assert f"command {SCORE} for teacher id 1, which this group does not host" in errors["unknown teacher"], errors
    assert "a block for a stream that is not open" in errors["block without a stream"], errors
    assert "opened while its previous stream is still open" in errors["opened twice"], errors
    assert "a stream of 2 rows and capacity 0 (rows >= 0 and capacity >= 1)" in errors["no capacity"], errors
    assert "a block at column 1; the stream continues at column 0" in errors["block off its column"], errors
    assert "a block of 3 rows for a stream of 2" in errors["block of other rows"], errors
    assert "columns [0, 6) (tokens up to column 6) for a stream of capacity 6" in errors["block past the capacity"]
    assert teacher["served"] == {"general": 1} and student["finite"]
