"""The CPU demo: task generators/checkers, stage-1 learning, and an end-to-end smoke of the pipeline."""
from __future__ import annotations

import json
import random

import pytest

from camopd_megatron.demo.tasks import (
    ALL_TASKS, DOMAIN_TASKS, GENERAL_TASKS, MAX_ANSWER_CHARS, NO_EOS, Problem, branch_of, check, credit,
    per_task_accuracy, sample_problem, sample_problems, solve, split_of, write_prompt_file,
)


def test_solvers_are_exact() -> None:
    assert solve("cpy", "kbdf") == "kbdf"
    assert solve("rev", "kbdf") == "fdbk"
    assert solve("srt", "kbdf") == "bdfk"
    assert (solve("mcp", "kbdf"), solve("mrv", "kbdf"), solve("mst", "kbdf")) == ("kbdf!", "fdbk!", "bdfk!")
    with pytest.raises(ValueError, match="task"):
        solve("mul", "1")
    assert all(branch_of(t) == "domain" for t in DOMAIN_TASKS) and all(branch_of(t) == "general" for t in GENERAL_TASKS)


def test_graded_credit() -> None:
    p = Problem("cpy", "c:kbdf=", "kbdf")
    assert credit(p, "kbdf") == 1.0 and check(p, "kbdf")
    assert credit(p, "kdbf") == 0.5 and not check(p, "kdbf")  # two letters out of place: half credit
    assert credit(p, "kbd") == 0.75 and credit(p, "kbdfx") == 0.8 and credit(p, "") == 0.0
    assert credit(p, NO_EOS + "kbdf") == 0.0  # an answer that never ended earns nothing


def test_generated_problems_check_and_fit_the_model() -> None:
    for split in ("train", "proxy", "eval"):
        for p in sample_problems(ALL_TASKS, split, 200, seed=1):
            body = p.prompt.split(":", 1)[1][:-1]
            assert p.answer == solve(p.task, body)
            assert check(p, p.answer) and not check(p, p.answer + "x") and not check(p, p.answer[:-1])
            assert credit(p, p.answer) == 1.0 and 0.0 < credit(p, p.answer[:-1]) < 1.0
            assert p.prompt.endswith("#" if branch_of(p.task) == "domain" else "=")
            assert len(p.answer) <= MAX_ANSWER_CHARS and p.prompt.isascii()
            assert (split_of(p.prompt) == "eval") == (split == "eval")


def test_proxy_prompts_do_not_cover_the_general_training_distribution() -> None:
    proxy = sample_problems(GENERAL_TASKS, "proxy", 600, seed=2)
    train = sample_problems(GENERAL_TASKS, "train", 600, seed=2)
    body = lambda p: p.prompt.split(":", 1)[1][:-1]  # noqa: E731
    assert all(3 <= len(body(p)) <= 4 for p in proxy)
    assert all(set(body(p)) <= set("abcdefghijklm") for p in proxy)
    assert any(len(body(p)) in (2, 5, 6) for p in train)
    assert any(set(body(p)) & set("nopqrstuvwxyz") for p in train)
    # deterministic, and eval prompts never leak into the other pools
    assert sample_problems(ALL_TASKS, "eval", 50, seed=3) == sample_problems(ALL_TASKS, "eval", 50, seed=3)
    rng = random.Random(0)
    assert split_of(sample_problem("mcp", "eval", rng).prompt) == "eval"


def test_accuracy_and_prompt_file(tmp_path) -> None:
    probs = [Problem("rev", "r:ab=", "ba"), Problem("rev", "r:abcd=", "dcba"), Problem("mcp", "c:ab#", "ab!")]
    assert per_task_accuracy(probs, ["ba", "dcab", "ab!"], graded=False) == {"mcp": 1.0, "rev": 0.5}
    assert per_task_accuracy(probs, ["ba", "dcab", "ab!"]) == {"mcp": 1.0, "rev": 0.75}
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


def test_study_statistics_and_probe_gate() -> None:
    from camopd_megatron.demo.study import final_eval, format_probe, mean_ci95

    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.303 * 1.0 / 3 ** 0.5) < 1e-9
    assert mean_ci95([0.5]) == (0.5, 0.0)
    history = [{"step": 0.0, "eval/acc/general": 0.1}, {"step": 1.0, "train/loss": 1.0},
               {"step": 2.0, "eval/acc/general": 0.5}, {"step": 4.0, "eval/acc/general": 0.7}]
    assert final_eval(history) == {"acc/general": 0.7}
    assert abs(final_eval(history, 2)["acc/general"] - 0.6) < 1e-12
    probe = {"settings": {"prompts": 256, "samples": 4, "interval": 10, "steps": 60, "seeds": [0]}, "lr": 1e-4,
             "n": 6, "mean": -0.2, "ci95": [-0.3, -0.1]}
    assert format_probe(probe).startswith("ok")
    assert format_probe({**probe, "ci95": [-0.3, 0.02]}).startswith("FAIL")
    assert format_probe({**probe, "mean": -0.05, "ci95": [-0.08, -0.02]}).startswith("FAIL")
