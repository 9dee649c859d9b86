"""Damaged checkpoints at DP = 2 with both teachers on their own ranks (a world of 4, one launch).

The launch trains 3 steps saving after each, then damages copies of the checkpoints and resumes:

* fallback: step 3 lost its camopd.json, step 2 has a truncated ``__0_0.distcp`` -> one WARNING
  each, both moved aside (``.damaged-<reason>``), the run resumes from step 1 and reproduces steps
  2-3 of the uninterrupted run exactly;
* all damaged (the students' checkpoint selection): a same-size corruption of ``ranks/1.pt`` (only rank 1 checks it: the ranks must agree), a missing
  shard file, a same-size corruption of ``.metadata`` -> the run stops naming each, nothing moved;
* an explicit ``checkpoint.load`` whose manifest was changed in place (same size), through
  ``camopd-train``'s entry point: one ``camopd-train: CheckpointError: ...`` line on each student
  rank (exit 2: the input check before any model build finds it), every rank (teachers too) says so the same way, no traceback, nothing moved. Both student
  replicas abort the teachers: each teacher takes both aborts before it exits, so neither student
  rank warns that its abort did not arrive.

Then ``tools/verify_checkpoint.py`` (in-process) on the results. ~40 s.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from camopd_megatron import cli
from camopd_megatron.testing.multiproc import run_on_ranks
from tests.test_trainer import _write_general_teacher, tiny_cfg

def _separate(general: str) -> dict:
    return {"teachers": [{"name": "general", "branches": ["general"], "placement": "separate", "checkpoint": general},
                         {"name": "domain", "init": "random", "branches": ["domain"], "placement": "separate"}],
            "checkpoint": {"save_interval": 1, "keep_last": 0}, "eval": {"interval": 0}}
DAMAGE = {
    "fallback": [("step_00000003/camopd.json", "delete"), ("step_00000002/__0_0.distcp", "truncate")],
    "all_damaged": [("step_00000003/ranks/1.pt", "flip"), ("step_00000002/__0_0.distcp", "delete"),
                    ("step_00000001/.metadata", "flip")],
    "explicit": [("step_00000003/camopd.json", "edit")],
}


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "flip":  # same size, one byte changed
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "edit":  # a plausible hand edit of the same size
        text = path.read_text()
        assert '"step": 3' in text
        path.write_text(text.replace('"step": 3', '"step": 4'))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("camopd_megatron.checkpoint"):
            self.lines.append(record.getMessage())


def _worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    from camopd_megatron import cli
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.checkpoint.manager import CheckpointManager
    from camopd_megatron.checkpoint.resume import select_checkpoint
    from camopd_megatron.config import dump_config
    from camopd_megatron.trainer import train

    root_p = Path(root)
    records = _Records()
    logging.getLogger("camopd_megatron").addHandler(records)
    out: dict = {}

    def steps(res) -> list:
        return [(int(h["step"]), h["train/loss"], h["grad_norm"]) for h in res.history if "phase" in h]

    general = str(root_p / "general")
    _write_general_teacher(rank, world_size, general)  # a teacher unlike the student: real losses
    sep = _separate(general)
    base = train(tiny_cfg(str(root_p / "base"), general, steps=3, extra=sep))
    out["base"] = steps(base)
    if rank == 0:
        for name, damages in DAMAGE.items():
            shutil.copytree(root_p / "base" / "checkpoints", root_p / name / "checkpoints")
            for rel, how in damages:
                _damage(root_p / name / "checkpoints" / rel, how)
    dist.barrier()
    res = train(tiny_cfg(str(root_p / "fallback"), general, steps=3, extra=sep))
    out["fallback"] = {"steps": steps(res), "warnings": list(records.lines)}
    # every checkpoint damaged: the students' selection (called directly: a student error aborts the teachers,
    # which cannot be reused afterwards when two student replicas abort them; the explicit case below does that)
    records.lines.clear()
    students = dist.new_group([0, 1])
    if rank < 2:
        try:
            select_checkpoint(CheckpointManager(root_p / "all_damaged" / "checkpoints"), load=None, resume="auto",
                              group=students, is_writer=rank == 0)
            out["all_damaged"] = {"error": None}
        except CheckpointError as e:
            out["all_damaged"] = {"error": f"{type(e).__name__}: {e}"}
        out["all_damaged"]["warnings"] = list(records.lines)
    # the real entry point last: it tears the world down afterwards
    cfg = tiny_cfg(str(root_p / "explicit"), general, steps=3, extra={
        **sep, "checkpoint": {**sep["checkpoint"],
                                   "load": str(root_p / "explicit" / "checkpoints" / "step_00000003")}})
    yaml = root_p / f"explicit_{rank}.yaml"
    dump_config(cfg, str(yaml))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["--config", str(yaml), "--log-level", "ERROR"])
    out["explicit"] = {"code": code, "stderr": err.getvalue()}
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    return root, run_on_ranks(_worker, 4, args=(str(root),), timeout_s=500, pg_timeout_s=120)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_damaged_newest_checkpoints_are_moved_aside_and_the_run_falls_back(damaged):
    root, res = damaged
    s0, s1 = res[0]["fallback"], res[1]["fallback"]
    assert "error" not in s0, s0
    # resumed from step 1: steps 2 and 3 again, exactly as in the uninterrupted run (on both student ranks)
    assert s0["steps"] == s1["steps"] == res[0]["base"][1:]
    assert all(loss != 0.0 for _, loss, _ in s0["steps"])
    assert len(s0["warnings"]) == 2 and s1["warnings"] == []  # rank 0 reports, once per skipped checkpoint
    w3, w2 = s0["warnings"]
    assert "step_00000003 is damaged" in w3 and "no camopd.json" in w3 and "step_00000003.damaged-no-manifest" in w3
    assert "step_00000002 is damaged" in w2 and "__0_0.distcp has" in w2 and "step_00000002.damaged-truncated" in w2
    ckpts = root / "fallback" / "checkpoints"
    assert _listing(ckpts) == ["latest", "step_00000001", "step_00000002", "step_00000002.damaged-truncated",
                               "step_00000003", "step_00000003.damaged-no-manifest"]
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    # the damaged ones are kept as they were
    assert not (ckpts / "step_00000003.damaged-no-manifest" / "camopd.json").exists()
    assert (ckpts / "step_00000003.damaged-no-manifest" / "__0_0.distcp").is_file()


def test_every_checkpoint_damaged_stops_the_run_naming_each(damaged):
    root, res = damaged
    for rank in (0, 1):  # the ranks agree, though only rank 1 checks ranks/1.pt
        err = res[rank]["all_damaged"].get("error", "")
        assert err.startswith("CheckpointError: every checkpoint in"), err
        assert "instead of starting from scratch" in err and "checkpoint.resume=never" in err
        assert "step_00000003" in err and "ranks/1.pt does not match its checksum" in err
        assert "__0_0.distcp is missing" in err
        assert ".metadata does not match its checksum" in err
    assert res[0]["all_damaged"]["warnings"] == []
    assert _listing(root / "all_damaged" / "checkpoints") == ["latest", "step_00000001", "step_00000002",
                                                              "step_00000003"]  # nothing moved


def test_explicit_damaged_load_stops_with_one_line(damaged):
    root, res = damaged
    for rank in (0, 1):
        r = res[rank]["explicit"]
        # caught by the input check before any model is built (checkpoint/inputs.py): one headline, one problem
        assert r["code"] == cli.EXIT_CONFIG_ERROR, r
        lines = r["stderr"].strip().splitlines()
        assert len(lines) == 2 and "Traceback" not in r["stderr"], r["stderr"]
        assert re.match(r"camopd-train: (rank \d+/\d+: )?1 config problem in the run's inputs", lines[0]), lines[0]
        line = lines[1]
        assert "checkpoint.load=" in line and "step_00000003" in line and "camopd.json does not match the checksum" in line
        assert "tools/verify_checkpoint.py" in line
    for rank in (2, 3):
        r = res[rank]["explicit"]
        # the input check runs on every rank, teachers included: each reports it the same way
        assert r["code"] == cli.EXIT_CONFIG_ERROR and "Traceback" not in r["stderr"], r
        assert "checkpoint.load=" in r["stderr"] and "step_00000003" in r["stderr"], r
    assert _listing(root / "explicit" / "checkpoints") == ["latest", "step_00000001", "step_00000002",
                                                           "step_00000003"]


def test_verify_tool(damaged, capsys):
    from camopd_megatron.checkpoint.verify import main

    root, _ = damaged
    assert main([str(root / "fallback" / "checkpoints")]) == 0  # a root: the one `latest` names
    out = capsys.readouterr().out
    assert "OK " in out and "step_00000003 (step 3" in out and "every size and SHA-256 matches" in out
    assert main([str(root / "fallback" / "checkpoints"), "--all"]) == 0  # the moved-aside ones are not step_<N>
    # a same-size change in a large shard: only the full check (every checksum) sees it
    shard = root / "base" / "checkpoints" / "step_00000001" / "__0_0.distcp"
    _damage(shard, "flip")
    assert main([str(shard.parent)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "__0_0.distcp does not match its checksum" in out
    assert main([str(root / "all_damaged" / "checkpoints"), "--all"]) == 1
    out = capsys.readouterr().out
    assert out.count("DAMAGED") == 3 and "ranks/1.pt does not match" in out and "__0_0.distcp is missing" in out
    assert main([str(root / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_selection_in_one_process(damaged, tmp_path):
    """No torch.distributed: a second damaged copy of one step is kept next to the first; a `latest` whose
    checkpoints are all gone stops the run instead of starting from scratch."""
    from camopd_megatron.checkpoint.dist import CheckpointError
    from camopd_megatron.checkpoint.manager import CheckpointManager
    from camopd_megatron.checkpoint.resume import select_checkpoint

    root, _ = damaged
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("latest", "step_00000002", "step_00000003"):
        src = root / "base" / "checkpoints" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ckpts / name)
    manager = CheckpointManager(ckpts)
    for _ in range(2):
        shutil.rmtree(ckpts / "step_00000003", ignore_errors=True)
        shutil.copytree(root / "base" / "checkpoints" / "step_00000003", ckpts / "step_00000003")
        _damage(ckpts / "step_00000003" / "ranks" / "0.pt", "flip")
        path, manifest = select_checkpoint(manager, load=None, resume="auto")
        assert path == ckpts / "step_00000002" and manifest["step"] == 2
    assert _listing(ckpts) == ["latest", "step_00000002", "step_00000003.damaged-checksum",
                               "step_00000003.damaged-checksum.2"]
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    shutil.rmtree(ckpts / "step_00000002")
    with pytest.raises(CheckpointError, match="names 'step_00000002', but no step_<N> checkpoint is left"):
        select_checkpoint(manager, load=None, resume="auto")
    assert select_checkpoint(manager, load=None, resume="never") == (None, None)
