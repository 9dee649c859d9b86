"""Teachers overlapped with the rollout (``rollout.overlap_teachers``): the same step, pipelined.

One launch of 3 gloo ranks trains 2 steps (5 prompts, rollout micro-batches of 2) with the overlap on
and off, in three layouts:

* ``sep1``: the camopd preset (one branch per step, ρ-selection, the recompute before the gather),
  student DP = 1 on rank 0, the ``general`` and ``domain`` teachers separate on ranks 1, 2 (3 micro-batches
  streamed in blocks of 4 positions; ``general`` extends its KV cache per block, ``domain`` is made to
  keep its blocks and score each micro-batch whole, the path of a teacher the cache cannot serve);
* ``sep2``: the vanilla_mopd preset (both branches in every micro-batch, gap-free: the replies are
  gathered inside the training forward), student DP = 2 on ranks 0-1 (3 + 2 prompts: 2 micro-batches
  and 1, the second replica pads with an empty one), both teachers time-sharing rank 2, which serves the
  two replicas in turns, one micro-batch's streams each (blocks of 3 positions: the two teachers' blocks
  interleave, the cached one answering at once, the other at its last block);
* ``colo``: both teachers colocated, student DP = 3, the overlap on (nothing to overlap: it must
  simply work).

Overlapped == not overlapped: the same tokens and kept sample ids; teacher log-probs and gap/loss metrics
within 1e-5 (float rounding: the cached teacher's blocked forward sums in another order than megatron's
whole one; measured ~1e-6), final parameters within 1e-4 and 99.9 % of them within 1e-6 (Adam's normalised
step amplifies rounding where a gradient is near zero; lr 3e-3). The overlapped path really ran: the
teacher answered blocks of a micro-batch before the student had decoded its last one. Last, a student
that fails with streams open: the teachers get its abort (with its message) within seconds instead of
timing out.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from camopd_megatron.testing.multiproc import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
MODEL = {"init": "random", "checkpoint": None, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
         "vocab_size": 128, "seq_length": 64}
TEACHER_MODELS = {"general": {**MODEL, "ffn_hidden_size": 96}, "domain": {**MODEL, "num_layers": 1}}
"""Random-init teachers of other architectures than the student: real gaps from the first step."""
LAYOUTS = ("sep1", "sep2", "colo")
BLOCK = {"sep1": 4, "sep2": 3, "colo": 4}
STRETCH = {"on": False}
TOL = 1e-5


def _cfg(out: str, layout: str, overlap: bool):
    from camopd_megatron.config import load_config
    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge

    placement = "colocated" if layout == "colo" else "separate"
    teachers = [{"name": n, "init": "random", "model": m, "branches": [n], "placement": placement,
                 **({"group": "pair"} if layout == "sep2" else {})} for n, m in TEACHER_MODELS.items()]
    preset = "vanilla_mopd" if layout == "sep2" else "camopd"
    base = config_to_dict(load_config(str(REPO / f"examples/configs/{preset}.yaml")))
    over = {
        "run": {"steps": 2, "output_dir": out, "seed": 5, "log_level": "WARNING"},
        "model": MODEL, "teachers": teachers, "parallel": {"timeout_s": 60},
        **({"scheduler": {"pattern": ["general", "domain"]}} if preset == "camopd" else {}),
        "rollout": {"prompts_per_step": 5, "max_new_tokens": 6, "micro_batch_size": 2, "overlap_teachers": overlap,
                    "teacher_block_positions": BLOCK[layout]},
        "optim": {"lr": 3e-3, "micro_batch_size": 2},
        "data": {"max_prompt_tokens": 24},
        "logging": {"progress_bar": False},
    }
    return config_from_dict(deep_merge(base, over))


def _instrument(log: list) -> None:
    """Record each block the student sends (called through) and each block a teacher answers, with the
    time; make the ``domain`` teacher keep its blocks and score each micro-batch whole."""
    from camopd_megatron.teachers.client import PendingScore
    from camopd_megatron.teachers.host import TeacherHost, TeacherModel

    def extend(self, start, tokens, mask, _orig=PendingScore.extend, **k):
        if k["last"] and STRETCH["on"]:  # as if the micro-batch's last positions took a while to decode
            time.sleep(0.2)
        log.append(("block", int(k["last"]), mask.shape[1] * mask.shape[0], time.time()))
        _orig(self, start, tokens, mask, **k)

    def answer(self, *a, _orig=TeacherHost._reply, **k):
        _orig(self, *a, **k)
        log.append(("answered", 0, 0, time.time()))

    def init(self, *a, _orig=TeacherModel.__init__, **k):
        _orig(self, *a, **k)
        self.incremental = self.incremental and self.name != "domain"

    PendingScore.extend, TeacherHost._reply, TeacherModel.__init__ = extend, answer, init


def _worker(rank: int, world: int, tmp: str) -> dict:
    from camopd_megatron.distill.step import StreamedScoring
    from camopd_megatron.teachers import StudentAborted
    from camopd_megatron.trainer import train

    log: list = []
    _instrument(log)
    out: dict = {"rank": rank}
    for layout in LAYOUTS:
        for overlap in ((True, False) if layout != "colo" else (True,)):
            records, final = [], {}

            def on_step(o, records=records):
                r = o.record
                records.append({"ids": r.sample_ids, "tokens": r.batch.tokens_BT.clone(),
                                "teacher": r.teacher_logp_BT.clone(), "keep": r.selection.keep_B.clone()})

            def eval_fn(step, model, pgc, final=final):
                final["params"] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
                return {}

            log.clear()
            STRETCH["on"] = layout == "sep1"
            res = train(_cfg(f"{tmp}/{layout}_{overlap}", layout, overlap), eval_fn=eval_fn, on_step=on_step)
            out[(layout, overlap)] = {"role": res.role, "history": res.history, "records": records,
                                      "params": final.get("params"), "log": list(log)}

    # a student failing with streams open: after the second block of step 1's first micro-batch
    real_block, blocks = StreamedScoring.block, []

    def failing(self, *a, **k):
        real_block(self, *a, **k)
        blocks.append(1)
        if len(blocks) == 2:
            raise RuntimeError("injected student failure after a block")

    StreamedScoring.block = failing
    t0 = time.time()
    try:
        train(_cfg(f"{tmp}/abort", "sep1", True))
        out["abort"] = "no error"
    except StudentAborted as e:
        out["abort"] = f"StudentAborted: {e}"
    except RuntimeError as e:
        out["abort"] = f"RuntimeError: {e}"
    out["abort_s"] = time.time() - t0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("teacher_overlap"))
    return run_on_ranks(_worker, 3, args=(tmp,), timeout_s=400, pg_timeout_s=90)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a.double() - b.double()).abs() <= TOL * (1 + b.double().abs())).all())


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "cpu_time/", "throughput/", "memory/"))} for h in history]


@pytest.mark.parametrize("layout", ("sep1", "sep2"))
def test_overlapped_step_equals_the_plain_step(runs, layout):
    students = [r for r in runs if r[(layout, True)]["role"] == "student"]
    assert len(students) == {"sep1": 1, "sep2": 2}[layout]
    for r in students:
        on, off = r[(layout, True)], r[(layout, False)]
        assert len(on["records"]) == len(off["records"]) == 2
        for a, b in zip(on["records"], off["records"]):
            assert a["ids"] == b["ids"]
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["keep"], b["keep"])
            assert _close(a["teacher"], b["teacher"])
        for a, b in zip(_metrics(on["history"]), _metrics(off["history"])):
            assert a.keys() == b.keys()
            for k in a:
                assert abs(a[k] - b[k]) <= TOL * (1 + abs(b[k])), (layout, k, a[k], b[k])
        # Adam's normalised step turns the teacher's ~1e-6 rounding into up to ~1 % of an lr-sized step
        # where a gradient is near zero: a few weights move by ~1e-5 (lr 3e-3)
        diff = (on["params"] - off["params"]).abs()
        assert float(diff.max()) <= 1e-4 and float((diff <= 1e-6).float().mean()) >= 0.999, float(diff.max())
    gaps = [h["gap/general/mean"] for h in students[0][(layout, True)]["history"] if "gap/general/mean" in h]
    assert gaps and abs(gaps[0]) > 1e-3  # the teachers differ from the student: real gaps were compared


def test_colocated_teachers_with_the_overlap_on(runs):
    """Nothing to overlap: the step scores after the rollout, as with the overlap off."""
    for r in runs:
        run = r[("colo", True)]
        assert run["role"] == "student" and len(run["records"]) == 2
        assert not [e for e in run["log"] if e[0] == "block"]
        assert all(torch.isfinite(x["teacher"]).all() for x in run["records"])
        assert abs(run["history"][1]["gap/general/mean"]) > 1e-3
    assert torch.equal(runs[0][("colo", True)]["params"], runs[2][("colo", True)]["params"])


def test_blocks_were_scored_while_the_rollout_went_on(runs):
    student = runs[0]
    blocks = [e for e in student[("sep1", True)]["log"] if e[0] == "block"]
    lasts = [i for i, e in enumerate(blocks) if e[1]]
    assert len(lasts) == 2 * 3  # 2 steps x 3 micro-batches, one branch per step
    assert len(blocks) > len(lasts)  # blocks of 4 positions were sent before each micro-batch ended
    # step 1 (general, rank 1, extending its KV cache): blocks of the first micro-batch answered before the
    # student sent that micro-batch's last block, and every block answered
    first_last_t = blocks[lasts[0]][3]
    answered = [t for e, _, _, t in runs[1][("sep1", True)]["log"] if e == "answered"]
    assert answered and answered[0] < first_last_t, (answered, blocks)
    step1 = blocks[: lasts[2] + 1]
    assert len(answered) == len([e for e in step1 if e[2]])
    # step 2 (domain, rank 2, scoring each micro-batch whole): every block answered, none before its
    # micro-batch's last block was sent
    step2 = blocks[lasts[2] + 1:]
    answered = [t for e, _, _, t in runs[2][("sep1", True)]["log"] if e == "answered"]
    assert len(answered) == len([e for e in step2 if e[2]])
    assert answered[0] > step2[lasts[3] - lasts[2] - 1][3]
    # the plain step scores with score(), nothing streamed
    assert not [e for e in student[("sep1", False)]["log"] if e[0] == "block"]
    # DP = 2, both replicas on one teacher replica: each streams 2 micro-batches per step (one padded) x 2 branches
    for r in runs[:2]:
        assert len([e for e in r[("sep2", True)]["log"] if e[0] == "block" and e[1]]) == 2 * 2 * 2


def test_a_student_failure_with_streams_open_reaches_the_teachers(runs):
    assert runs[0]["abort"].startswith("RuntimeError: injected student failure"), runs[0]["abort"]
    for r in runs[1:]:
        assert r["abort"].startswith("StudentAborted") and "injected student failure" in r["abort"], r["abort"]
        assert r["abort_s"] < 45  # not the 60 s timeout
