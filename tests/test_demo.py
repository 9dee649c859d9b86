"""The CPU demo: task generators/checkers, stage-1 learning, and an end-to-end smoke of the pipeline."""
from __future__ import annotations

import json
import random

import pytest

from camopd_megatron.demo.tasks import (
    ALL_TASKS, GENERAL_TASKS, MAX_ANSWER_CHARS, Problem, branch_of, check, per_task_accuracy,
    sample_problem, sample_problems, solve, split_of, write_prompt_file,
)


def test_solvers_are_exact() -> None:
    assert solve("cpy", "kbdf") == "kbdf"
    assert solve("rev", "kbdf") == "fdbk"
    assert solve("srt", "3912") == "1239"
    assert solve("mrk", "xyzab") == "xyzab!"
    with pytest.raises(ValueError, match="task"):
        solve("mul", "1")
    assert branch_of("mrk") == "domain" and all(branch_of(t) == "general" for t in GENERAL_TASKS)


def test_generated_problems_check_and_fit_the_model() -> None:
    for split in ("train", "proxy", "eval"):
        for p in sample_problems(ALL_TASKS, split, 200, seed=1):
            body = p.prompt.split(":", 1)[1][:-1]
            assert p.answer == solve(p.task, body)
            assert check(p, p.answer) and not check(p, p.answer + "x") and not check(p, p.answer[:-1])
            assert len(p.answer) <= MAX_ANSWER_CHARS and p.prompt.isascii()
            assert (split_of(p.prompt) == "eval") == (split == "eval")


def test_proxy_prompts_do_not_cover_the_general_training_distribution() -> None:
    proxy = sample_problems(GENERAL_TASKS, "proxy", 600, seed=2)
    train = sample_problems(GENERAL_TASKS, "train", 600, seed=2)
    body = lambda p: p.prompt.split(":", 1)[1][:-1]  # noqa: E731
    assert all(3 <= len(body(p)) <= 4 for p in proxy)
    assert all(set(body(p)) <= set("abcdefghijklm012345") for p in proxy)
    assert any(len(body(p)) in (2, 5, 6) for p in train)
    assert any(set(body(p)) & set("nopqrstuvwxyz6789") for p in train)
    # deterministic, and eval prompts never leak into the other pools
    assert sample_problems(ALL_TASKS, "eval", 50, seed=3) == sample_problems(ALL_TASKS, "eval", 50, seed=3)
    rng = random.Random(0)
    assert split_of(sample_problem("mrk", "eval", rng).prompt) == "eval"


def test_accuracy_and_prompt_file(tmp_path) -> None:
    probs = [Problem("rev", "r:ab=", "ba"), Problem("rev", "r:abc=", "cba"), Problem("mrk", "m:a=", "a!")]
    assert per_task_accuracy(probs, ["ba", "abc", "a!"]) == {"mrk": 1.0, "rev": 0.5}
    path = write_prompt_file(tmp_path / "p.jsonl", probs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"prompt": "r:ab=", "domain": "rev"}
    with pytest.raises(ValueError, match="responses"):
        per_task_accuracy(probs, ["x"])


def test_stage1_micro_budget_loss_goes_down() -> None:
    from camopd_megatron.demo.evaluate import greedy_generate
    from camopd_megatron.demo.teachers import StageSettings, build_demo_model, demo_model_config, sft_train
    from camopd_megatron.data import ByteTokenizer

    model, _ = build_demo_model(demo_model_config(StageSettings()), seed=0)
    losses = sft_train(model, GENERAL_TASKS, steps=40, lr=3e-3, batch_size=32, seed=0, warmup=5)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    out = greedy_generate(model, ["r:abc=", "s:321="], ByteTokenizer(128))
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys) -> None:
    """The make-demo pipeline on a micro budget: stages 1-2 (then the cache), stage 3 via train(), report."""
    from camopd_megatron.demo.__main__ import main

    args = ["--general-steps", "20", "--domain-steps", "5", "--steps", "4", "--eval-interval", "2",
            "--eval-per-task", "4", "--methods", "camopd", "vanilla_mopd", "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| camopd | 1 |" in printed and "| vanilla_mopd | 1 |" in printed and "general teacher" in printed
    out = tmp_path / "out"
    assert (out / "table.md").is_file() and (out / "accuracy.png").stat().st_size > 0
    assert (out / "diagnostics.png").stat().st_size > 0
    study = json.loads((out / "histories.json").read_text())
    hist = study["histories"]["camopd"][0]
    assert [e["step"] for e in hist if "eval/acc/general" in e] == [0.0, 2.0, 4.0]
    assert any("diag/grad_cosine" in e for e in hist)
    assert any("select/general/kept_fraction" in e for e in hist)
    # a rerun reuses the cached teachers (the cache holds exactly one settings hash)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert main(args[:-2] + ["--out-dir", str(tmp_path / "out2"), "--teachers-only"]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1
