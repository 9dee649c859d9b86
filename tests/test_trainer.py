"""The CaMOPD trainer end to end on gloo: phases, checkpoints, exact resume, DP invariance, roles.

Teachers: the domain teacher is the student's own initialisation (random init with run.seed, as
docs/algorithm.md §1: the student starts from D); the general teacher is another model, written to a
checkpoint by the test so the general branch has real gaps.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from camopd_megatron.testing.multiproc import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
MODEL = {"init": "random", "checkpoint": None, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
         "vocab_size": 128, "seq_length": 96}


def tiny_cfg(out: str, general_ckpt: str, *, steps: int = 8, preset: str = "camopd", extra: dict | None = None):
    """The camopd preset on a tiny model; ``extra`` is a nested dict merged on top."""
    from camopd_megatron.config import load_config
    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge

    base = config_to_dict(load_config(str(REPO / "examples/configs" / f"{preset}.yaml")))
    over = {
        "run": {"steps": steps, "output_dir": out, "seed": 5, "log_level": "WARNING"},
        "model": MODEL,
        "teachers": [
            {"name": "general", "branches": ["general"], "checkpoint": general_ckpt},
            {"name": "domain", "init": "random", "branches": ["domain"]},
        ],
        "rollout": {"prompts_per_step": 8, "max_new_tokens": 8, "micro_batch_size": 8},
        "optim": {"lr": 3e-3, "micro_batch_size": 3},
        "data": {"max_prompt_tokens": 40},
        "checkpoint": {"save_interval": 4, "keep_last": 2},
        "logging": {"progress_bar": False},
        "eval": {"num_prompts": 4, "max_new_tokens": 6},
    }
    return config_from_dict(deep_merge(deep_merge(base, over), extra or {}))


def _write_general_teacher(rank: int, world_size: int, path: str, seed: int = 77) -> None:
    """A general teacher that differs from the student: the same architecture from another seed."""
    from camopd_megatron.checkpoint.dist import model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    cfg = ModelConfig(**MODEL)
    pgc = simple_pg_collection(1, 1, world_size)
    init_model_rng(seed, pgc)
    model = build_gpt_model(cfg, pgc)
    with torch.no_grad():  # sharpen it so its log-probs differ clearly from the student's
        model.output_layer.weight.mul_(8.0)
    save_checkpoint(path, model_sharded_state_dict(model, pgc), model_cfg=cfg)


@pytest.fixture(scope="module")
def general_ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("teacher") / "general")
    run_on_ranks(_write_general_teacher, 1, args=(path,), timeout_s=240)
    return path


def _digest(model) -> dict[str, float]:
    """A layout-free fingerprint of the (full, TP=1) parameters: norm and a fixed random projection."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    proj = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"param_norm": flat.norm().item(), "param_proj": (flat @ proj).item()}


def _train_worker(rank: int, world_size: int, cfgs: list) -> list:
    from camopd_megatron.trainer import train

    out = []
    for cfg in cfgs:
        res = train(cfg, eval_fn=lambda step, model, pgc: _digest(model))
        out.append({"role": res.role, "history": res.history, "ckpt": res.last_checkpoint})
    return out


def _run(world: int, cfgs: list) -> list:
    return run_on_ranks(_train_worker, world, args=(cfgs,), timeout_s=500, pg_timeout_s=120)


def _losses(history: list[dict], key: str = "train/loss") -> list[float]:
    return [h[key] for h in history if key in h]


@pytest.fixture(scope="module")
def single_runs(general_ckpt, tmp_path_factory):
    """World of 1: an uninterrupted 8-step run; a 4-step run then resumed to 8 (same output dir)."""
    d = tmp_path_factory.mktemp("runs")
    # the full run also probes the general/domain gradient conflict: probing must not perturb training
    full = tiny_cfg(str(d / "full"), general_ckpt, extra={"eval": {"interval": 1},
                                                          "logging": {"diagnostics_interval": 2, "diagnostics_prompts": 4}})
    first = tiny_cfg(str(d / "resumed"), general_ckpt, steps=4, extra={"eval": {"interval": 1}})
    second = tiny_cfg(str(d / "resumed"), general_ckpt, steps=8, extra={"eval": {"interval": 1}})
    (res,) = _run(1, [full, first, second])
    return d, res


def test_camopd_run_phases_checkpoints_and_tensorboard(single_runs):
    d, (full, _, _) = single_runs
    hist = [h for h in full["history"] if "phase" in h]
    assert [int(h["phase"]) for h in hist] == [0, 1, 2, 3, 0, 1, 2, 3]
    branches = ["general" if "gap/general/mean" in h else "domain" for h in hist]
    assert branches == ["general"] * 3 + ["domain"] + ["general"] * 3 + ["domain"]
    # the general teacher differs from the student: real gaps, selection keeps a strict subset
    assert all(abs(h["gap/general/mean"]) > 0.1 for h in hist if "gap/general/mean" in h)
    assert any(h["select/kept_fraction"] < 1.0 for h in hist if "gap/general/mean" in h)
    # the domain teacher IS the student's initialisation: near-zero gap on the first domain step
    assert abs(hist[3]["gap/domain/mean"]) < abs(hist[0]["gap/general/mean"])
    assert all(math.isfinite(h["train/loss"]) for h in hist)
    assert any(h["train/loss"] != 0.0 for h in hist)
    assert list((d / "full" / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (d / "full" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000004", "step_00000008"]
    assert (d / "full" / "config.yaml").is_file()
    # built-in eval: the teachers score the student's greedy answers on fixed prompts every step
    assert all(h["eval/general/gap"] != 0.0 and h["eval/domain/response_len"] > 0 for h in hist)
    probes = [h for h in hist if "diag/grad_cosine" in h]
    assert [int(h["step"]) for h in probes] == [1, 3, 5, 7]
    assert all(-1.0 <= h["diag/grad_cosine"] <= 1.0 and h["diag/grad_norm_general"] > 0 for h in probes)
    # training moved the parameters
    evals = [h for h in full["history"] if "eval/param_norm" in h]
    assert evals[0]["eval/param_proj"] != evals[-1]["eval/param_proj"]


def test_resume_reproduces_the_uninterrupted_run_exactly(single_runs):
    _, (full, first, second) = single_runs
    assert first["ckpt"].endswith("step_00000004")
    keys = ("train/loss", "select/kept_fraction", "grad_norm", "eval/param_proj", "rollout/response_len_mean")
    resumed = [h for h in second["history"] if "phase" in h]
    assert [int(h["step"]) for h in resumed] == [5, 6, 7, 8]
    for a, b in zip([h for h in full["history"] if "phase" in h][4:], resumed):
        for k in keys:
            assert a[k] == b[k], (k, a["step"], a[k], b[k])  # bitwise on CPU


def test_dp2_equals_dp1_on_the_same_global_batch(general_ckpt, tmp_path):
    """Same global batch, DP=2 vs DP=1: the same selected set and the same parameters after updates."""
    extra = {"eval": {"interval": 1}, "checkpoint": {"save_interval": 0}}
    dp1 = tiny_cfg(str(tmp_path / "dp1"), general_ckpt, steps=2, extra=extra)
    (r1,) = _run(1, [dp1])
    dp2 = tiny_cfg(str(tmp_path / "dp2"), general_ckpt, steps=2, extra=extra)
    r2 = _run(2, [dp2])
    h1 = [h for h in r1[0]["history"] if "phase" in h]
    h2 = [h for h in r2[0][0]["history"] if "phase" in h]
    for a, b in zip(h1, h2):
        assert a["select/kept"] == b["select/kept"]
        assert a["select/kept_fraction"] == b["select/kept_fraction"]
        # DP = 2 sums the gradient in another order; Adam's m / sqrt(v) turns that rounding into whole-lr steps
        # on elements whose gradient is near zero (measured 2.5e-5 on 12.7 after 2 steps on one CPU, 0 on another,
        # while one step moves param_proj by 0.43): a DP bug moves it by a step's size
        for k in ("eval/param_norm", "eval/param_proj"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a[k], b[k])
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5


def test_coherence_probe_sharded_equals_one_process(general_ckpt, tmp_path):
    """The gradient-coherence probe (4 per-sample gradients of the general step) and the branch-conflict
    probe at DP=2 (with and without the distributed optimizer) and at TP=2 give the one-process values: each g_i is the whole-model gradient of sample i alone, whichever
    rank holds the sample and however the parameters are split."""
    def cfg(name, parallel):
        return tiny_cfg(str(tmp_path / name), general_ckpt, steps=1, extra={
            "scheduler": {"pattern": ["general", "domain"]}, "parallel": parallel, "checkpoint": {"save_interval": 0},
            "logging": {"diagnostics_interval": 1, "coherence_samples": 4}})

    (one,) = _run(1, [cfg("one", {})])
    # the distributed optimizer reduce-scatters gradients: the probes must still read whole ones
    sharded = _run(2, [cfg("dp2", {}), cfg("tp2", {"tp": 2}), cfg("dp2_distopt", {"use_distributed_optimizer": True})])[0]
    ref = one[0]["history"][-1]
    keys = [f"diag/general/{k}" for k in ("coherence_all", "coherence_selected", "coherence_ratio", "coherence_gain",
                                          "coherence_selected_samples")]
    keys += ["diag/grad_cosine", "diag/grad_dot", "diag/grad_norm_general", "diag/grad_norm_domain"]
    assert 0.0 < ref[keys[0]] <= 1.0 and 0.0 < ref[keys[1]] <= 1.0 and 1 <= ref[keys[4]] <= 4
    assert ref[keys[2]] == pytest.approx(ref[keys[1]] / ref[keys[0]]) and ref[keys[3]] == pytest.approx(ref[keys[2]] - 1)
    for run in sharded:
        h = run["history"][-1]
        for k in keys:
            assert h[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), (k, h[k], ref[k])


def test_fused_recompute_equals_the_separate_recompute(general_ckpt, tmp_path):
    """vanilla_mopd's selection is gap-free, so Δ comes out of the training forward (no no-grad recompute
    forward). The same run with selection on at ρ = 1 (keeps all, r = 1: the same algorithm, but not
    gap-free) recomputes first: the same losses, gaps and parameters, over 3 micro-batches per step."""
    extra = {"eval": {"interval": 1}, "checkpoint": {"save_interval": 0}}
    fused = tiny_cfg(str(tmp_path / "fused"), general_ckpt, steps=3, preset="vanilla_mopd", extra=extra)
    separate = tiny_cfg(str(tmp_path / "separate"), general_ckpt, steps=3, preset="vanilla_mopd",
                        extra={**extra, "selection": {"enabled": True, "rho": {"general": 1.0, "domain": 1.0}}})
    (res,) = _run(1, [fused, separate])
    hf, hs = ([h for h in r["history"] if "phase" in h] for r in res)
    assert len(hf) == len(hs) == 3
    for a, b in zip(hf, hs):
        assert "time/recompute" not in a and "time/recompute" in b
        assert a["select/kept_fraction"] == b["select/kept_fraction"] == 1.0
        for k in ("train/loss", "gap/general/mean", "gap/domain/mean", "gap/general/std",
                  "eval/param_norm", "eval/param_proj", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a["step"], a[k], b[k])
    assert abs(hf[0]["gap/general/mean"]) > 1e-3  # the general teacher differs: real gaps were compared


def test_four_ranks_student_tp2_and_two_separate_teachers(general_ckpt, tmp_path):
    extra = {"parallel": {"tp": 2}, "teachers": [
        {"name": "general", "branches": ["general"], "checkpoint": general_ckpt, "placement": "separate"},
        {"name": "domain", "init": "random", "branches": ["domain"], "placement": "separate"},
    ], "eval": {"interval": 0}}
    cfg = tiny_cfg(str(tmp_path / "sep"), general_ckpt, steps=8, extra=extra)
    res = _run(4, [cfg])
    assert [r[0]["role"] for r in res] == ["student", "student", "general", "domain"]
    hist = [h for h in res[0][0]["history"] if "phase" in h]
    assert [int(h["phase"]) for h in hist] == [0, 1, 2, 3, 0, 1, 2, 3]
    def no_eval(h):  # the eval digest is of each rank's own TP shard
        return [{k: v for k, v in x.items() if not k.startswith(("eval/", "time/", "cpu_time/", "throughput/", "memory/"))} for x in h]

    assert no_eval(res[0][0]["history"]) == no_eval(res[1][0]["history"])
    assert any(h["gap/general/mean"] != 0.0 for h in hist if "gap/general/mean" in h)
    assert (tmp_path / "sep" / "checkpoints" / "step_00000008" / "camopd.json").is_file()
    assert list((tmp_path / "sep" / "tensorboard").glob("events.out.tfevents.*"))


def _write_nan_teacher(rank: int, world_size: int, path: str) -> None:
    from camopd_megatron.checkpoint.dist import model_sharded_state_dict, save_checkpoint
    from camopd_megatron.config import ModelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection

    cfg = ModelConfig(**MODEL)
    pgc = simple_pg_collection(1, 1, 1)
    init_model_rng(3, pgc)
    model = build_gpt_model(cfg, pgc)
    with torch.no_grad():
        model.output_layer.weight.fill_(float("nan"))
    save_checkpoint(path, model_sharded_state_dict(model, pgc), model_cfg=cfg)


def _train_expect_failure(rank: int, world_size: int, cfg, before: tuple = ()) -> dict:
    """Train the ``before`` configs (their histories), then ``cfg``, which must raise."""
    from camopd_megatron.trainer import train

    histories = [train(c).history for c in before]
    try:
        train(cfg)
    except (RuntimeError, ValueError) as e:
        return {"error": str(e), "histories": histories}
    return {"error": None, "histories": histories}


def test_nan_teacher_steps_are_skipped_then_the_run_aborts(tmp_path):
    nan_ckpt = str(tmp_path / "nan_teacher")
    run_on_ranks(_write_nan_teacher, 1, args=(nan_ckpt,), timeout_s=240)
    cfg = tiny_cfg(str(tmp_path / "run"), nan_ckpt, steps=4,
                   extra={"loss": {"max_bad_teacher_steps": 1}, "checkpoint": {"save_interval": 0}})
    (out,) = run_on_ranks(_train_expect_failure, 1, args=(cfg,), timeout_s=300)
    assert out["error"] and "loss.max_bad_teacher_steps=1" in out["error"], out
    assert "2 steps" in out["error"]
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # no update was ever taken


def _update_norms(rank: int, world_size: int, cfgs: list) -> list:
    """Per config: ‖θ_after − θ_before‖ of a one-step run (the eval hook sees the weights before and after)."""
    from camopd_megatron.trainer import train

    out = []
    for cfg in cfgs:
        seen: list[torch.Tensor] = []

        def delta(step, model, pgc):
            seen.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
            return {"update_norm": (seen[-1] - seen[0]).norm().item()}

        history = train(cfg, eval_fn=delta).history
        out.append({"update_norm": history[-1]["eval/update_norm"], "grad_clipped": history[-1]["grad_clipped"],
                    "grad_clip_rate": history[-1]["grad_clip_rate"], "lr_effective": history[-1]["lr_effective"],
                    "lr": history[-1]["lr"]})
    return out


def test_scale_mode_lr_survives_the_gradient_clip(general_ckpt, tmp_path):
    """From the same state, with the global-norm clip active, one general step with r_g = 2 moves the
    weights 2x as far as with r_g = 1 under scale_mode: lr, and about as far under scale_mode:
    advantage (the clip and Adam remove a uniform factor on the loss: docs/algorithm.md §5)."""
    def cfg(name, r_g, mode):
        return tiny_cfg(str(tmp_path / name), general_ckpt, steps=1, extra={
            "scheduler": {"pattern": ["general", "domain"]}, "loss": {"adv_scale": {"general": r_g, "domain": 1.0}},
            "selection": {"scale_mode": mode}, "optim": {"clip_grad": 1e-4}, "checkpoint": {"save_interval": 0}})

    (one, adv2, lr2), = run_on_ranks(_update_norms, 1, args=([cfg("one", 1.0, "advantage"), cfg("adv2", 2.0, "advantage"),
                                                              cfg("lr2", 2.0, "lr")],), timeout_s=500)
    assert one["grad_clipped"] == adv2["grad_clipped"] == lr2["grad_clipped"] == 1.0  # the clip is active
    assert lr2["grad_clip_rate"] == 1.0 and lr2["lr_effective"] == pytest.approx(2 * lr2["lr"])
    assert lr2["update_norm"] / one["update_norm"] == pytest.approx(2.0, rel=1e-3)
    assert adv2["update_norm"] / one["update_norm"] == pytest.approx(1.0, rel=1e-2)


def _train_history(rank: int, world_size: int, cfg) -> list:
    from camopd_megatron.trainer import train

    return train(cfg).history


def test_a_skipped_step_reissues_its_branch(tmp_path):
    """Pattern [domain, general] with a NaN domain teacher: every step is the skipped domain step
    again (the schedule does not move on to general after a skip, docs/algorithm.md §6)."""
    nan_ckpt = str(tmp_path / "nan_teacher")
    run_on_ranks(_write_nan_teacher, 1, args=(nan_ckpt,), timeout_s=240)
    cfg = tiny_cfg(str(tmp_path / "run"), "", steps=3, extra={
        "teachers": [{"name": "general", "init": "random", "branches": ["general"], "checkpoint": None},
                     {"name": "domain", "branches": ["domain"], "checkpoint": nan_ckpt}],
        "scheduler": {"pattern": ["domain", "general"]},
        "loss": {"max_bad_teacher_steps": 3}, "checkpoint": {"save_interval": 0}, "eval": {"interval": 0}})
    (history,) = run_on_ranks(_train_history, 1, args=(cfg,), timeout_s=300)
    assert len(history) == 3
    assert all(h.get("teacher_nonfinite_tokens", 0) > 0 for h in history), history
    assert not any("train/loss" in h for h in history)  # general never trained


def test_per_branch_moments_resume_through_the_trainer(general_ckpt, tmp_path):
    """optim.branch_state=per_branch through train(): the same losses as the shared state until the
    first domain update, other ones after it; a 5-step run resumed to 9 reproduces the uninterrupted
    run exactly (step 9 follows the resumed domain moments' update); resuming that checkpoint with the
    shared state is refused with the key to fix."""
    per_branch = {"optim": {"branch_state": "per_branch"}}
    shared = tiny_cfg(str(tmp_path / "shared"), general_ckpt, steps=5, extra={"checkpoint": {"save_interval": 0}})
    full = tiny_cfg(str(tmp_path / "full"), general_ckpt, steps=9,
                    extra={**per_branch, "checkpoint": {"save_interval": 0}})
    first = tiny_cfg(str(tmp_path / "resumed"), general_ckpt, steps=5, extra=per_branch)
    second = tiny_cfg(str(tmp_path / "resumed"), general_ckpt, steps=9, extra=per_branch)
    wrong = tiny_cfg(str(tmp_path / "resumed"), general_ckpt, steps=10)
    (out,) = run_on_ranks(_train_expect_failure, 1, args=(wrong, (shared, full, first, second)), timeout_s=500)
    shared_h, full_h, _, resumed_h = ([h for h in hist if "phase" in h] for hist in out["histories"])
    assert [h["train/loss"] for h in shared_h[:4]] == [h["train/loss"] for h in full_h[:4]]
    assert shared_h[4]["train/loss"] != full_h[4]["train/loss"]
    assert [int(h["step"]) for h in resumed_h] == [6, 7, 8, 9]
    for x, y in zip(full_h[5:], resumed_h):
        for k in ("train/loss", "grad_norm", "select/kept_fraction"):
            assert x[k] == y[k], (k, x["step"], x[k], y[k])
    assert "optim.branch_state" in out["error"] and "step_00000009" in out["error"], out["error"]


@pytest.mark.slow
def test_resume_with_the_distributed_optimizer_at_dp2(general_ckpt, tmp_path):
    """DP=2 with the distributed optimizer (state sharded over DP): resume is exact too."""
    extra = {"parallel": {"use_distributed_optimizer": True}, "checkpoint": {"save_interval": 2}}
    full = tiny_cfg(str(tmp_path / "full"), general_ckpt, steps=4, extra=extra)
    first = tiny_cfg(str(tmp_path / "resumed"), general_ckpt, steps=2, extra=extra)
    second = tiny_cfg(str(tmp_path / "resumed"), general_ckpt, steps=4, extra=extra)
    res = _run(2, [full, first, second])
    a = [h for h in res[0][0]["history"] if "phase" in h]
    b = [h for h in res[0][2]["history"] if "phase" in h]
    assert [int(h["step"]) for h in b] == [3, 4]
    for x, y in zip(a[2:], b):
        for k in ("train/loss", "grad_norm", "select/kept_fraction"):
            assert x[k] == y[k], (k, x["step"], x[k], y[k])


@pytest.mark.slow
def test_student_pipeline_parallel_matches_pp1(general_ckpt, tmp_path):
    """Student PP=2 (megatron's 1F1B schedule for recompute and training) reproduces PP=1, given the
    same starting weights (a checkpoint: stage-local init draws the RNG in another order)."""
    other = str(tmp_path / "other")
    run_on_ranks(_write_general_teacher, 1, args=(other, 31), timeout_s=240)
    extra = {"model": {"init": "checkpoint", "checkpoint": other}, "checkpoint": {"save_interval": 0},
             "teachers": [{"name": "general", "branches": ["general"], "checkpoint": general_ckpt},
                          {"name": "domain", "branches": ["domain"], "checkpoint": other}]}
    # camopd (recompute, then selection) and vanilla_mopd (Δ from the training forward, broadcast from the last stage)
    presets = ("camopd", "vanilla_mopd")
    (r1,) = _run(1, [tiny_cfg(str(tmp_path / f"pp1_{p}"), general_ckpt, steps=3, preset=p, extra=extra) for p in presets])
    r2 = _run(2, [tiny_cfg(str(tmp_path / f"pp2_{p}"), general_ckpt, steps=3, preset=p,
                           extra={**extra, "parallel": {"pp": 2}}) for p in presets])
    for run in range(len(presets)):
        h1 = [h for h in r1[run]["history"] if "phase" in h]
        for rank in range(2):
            h2 = [h for h in r2[rank][run]["history"] if "phase" in h]
            assert len(h2) == 3
            for a, b in zip(h1, h2):
                assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * max(1.0, abs(a["train/loss"])), (a["step"], a, b)
                assert a["select/kept"] == b["select/kept"]
                assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]
                gaps = [k for k in a if k.startswith("gap/") and k.endswith("/mean")]
                assert gaps and all(abs(a[k] - b[k]) <= 1e-5 for k in gaps), (presets[run], a["step"])
