"""megatron DDP + optimizer on per-role process groups (gloo): layouts, DP sum, resume, lr schedule."""
from __future__ import annotations

import math

import pytest
import torch

from camopd_megatron.config.sections import OptimConfig
from camopd_megatron.testing.multiproc import run_on_ranks
from tests import optim_workers as W

STEPS = 5
REF = (1, 1, False, 0)


def _assert_same_curve(curves: dict, ref_key: tuple, tol: float = 1e-5) -> None:
    (ref_losses, ref_norms), _ = curves[ref_key]
    assert ref_losses[-1] != ref_losses[0]  # it trains
    for key, ((losses, norms), _) in curves.items():
        assert len(losses) == len(ref_losses), key
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= tol, (key, losses, ref_losses)
        # pre-clip grad norms: Adam is scale-invariant, the norm is not (catches a 1/dp average);
        # TP changes the summation order, so 1e-4 relative (a 1/dp bug is a factor of 2)
        for a, b in zip(norms, ref_norms):
            assert abs(a - b) <= 1e-4 * abs(b), (key, norms, ref_norms)


def test_loss_curves_tp_dp_distopt_two_ranks():
    """(TP1,DP1), (TP2,DP1), (TP1,DP2) distopt off/on: same 5-step loss curve and grad norms."""
    layouts = [REF, (2, 1, False, 0), (1, 2, False, 0), (1, 2, True, 0)]
    curves = run_on_ranks(W.layouts_loss_curves, 2, args=(layouts, STEPS), timeout_s=240, pg_timeout_s=60)[0]
    assert set(curves) == set(layouts)
    _assert_same_curve(curves, REF)
    assert curves[(1, 2, True, 0)][1] == ["DistributedOptimizer"]
    assert curves[(1, 2, False, 0)][1] == ["FP32Optimizer"]


def test_loss_curves_four_ranks_and_offset_role():
    """TP2×DP2 distopt on 4 ranks, and a TP1×DP2 distopt role on ranks 2-3 while ranks 0-1 only
    wait in a world barrier (no world-wide collective inside DDP / optimizer / schedule)."""
    layouts = [REF, (2, 2, True, 0), (1, 2, True, 2)]
    results = run_on_ranks(W.layouts_loss_curves, 4, args=(layouts, STEPS), timeout_s=300, pg_timeout_s=45)
    curves = {}
    for r in results:
        curves.update(r)
    assert set(curves) == set(layouts)
    _assert_same_curve(curves, REF)
    assert set(results[0]) == {REF, (2, 2, True, 0)}
    assert set(results[2]) == {(2, 2, True, 0), (1, 2, True, 2)}


def _ckpt_dir(tmp_path) -> str:
    path = tmp_path / "ckpt"
    path.mkdir()
    return str(path)


def _assert_resume(res: dict, steps: int = 3) -> None:
    full_losses, full_norms = res["full"]
    first_losses, _ = res["first"]
    resumed_losses, resumed_norms = res["resumed"]
    assert first_losses == full_losses[:steps]
    # exact continuation: same float32 math after the load
    assert resumed_losses == pytest.approx(full_losses[steps:], abs=1e-6, rel=0)
    assert resumed_norms == pytest.approx(full_norms[steps:], abs=1e-6, rel=1e-6)


def test_resume_plain_optimizer(tmp_path):
    """model + optimizer + schedule saved with dist_checkpointing, fresh build (other seed), load,
    continue == uninterrupted (TP2 role, plain optimizer)."""
    res = run_on_ranks(W.resume_matches, 2, args=(2, 1, False, 0, _ckpt_dir(tmp_path)),
                       timeout_s=240, pg_timeout_s=60)
    assert res[0]["opt"] == "ChainedOptimizer"
    _assert_resume(res[0])
    assert res[1] == res[0]


def test_resume_distributed_optimizer_offset_role(tmp_path):
    """Same with the distributed optimizer (fully_reshardable) for a TP1×DP2 role on ranks 2-3 of a
    4-rank world; ranks 0-1 join dist_checkpointing.save with an empty state dict."""
    res = run_on_ranks(W.resume_matches, 4, args=(1, 2, True, 2, _ckpt_dir(tmp_path)),
                       timeout_s=300, pg_timeout_s=60)
    assert res[0] is None and res[1] is None
    _assert_resume(res[2])
    assert res[3] == res[2]


@pytest.mark.slow
def test_resume_distributed_optimizer_tp2_dp2(tmp_path):
    """Distributed optimizer resume at TP2×DP2 on 4 ranks."""
    res = run_on_ranks(W.resume_matches, 4, args=(2, 2, True, 0, _ckpt_dir(tmp_path)),
                       timeout_s=300, pg_timeout_s=60)
    _assert_resume(res[0])


# ------------------------------------------------------------------------------------------------
# per-branch Adam moments (optim.branch_state: per_branch)
# ------------------------------------------------------------------------------------------------
def _hand_adamw_updates(trace: dict, per_branch: bool, *, beta1: float = 0.9, beta2: float = 0.999,
                        eps: float = 1e-8, clip: float = 1.0) -> list[dict]:
    """AdamW written out (float64) over the recorded gradients: global-norm clip, then per tensor
    p ← p(1 − lr·wd) − lr·m̂/(√v̂ + ε) with m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t); moments and t per
    branch of G,G,G,D (``per_branch``) or one set for all steps. Each step starts from the recorded
    parameters. Returns every step's expected update (after − before) per tensor."""
    lr = trace["lr"]
    moments: dict[str, dict] = {}
    updates = []
    for step, snap in enumerate(trace["steps"]):
        state = moments.setdefault(W.PATTERN[step % len(W.PATTERN)] if per_branch else "shared",
                                   {"t": 0, "m": {}, "v": {}})
        grads = {n: g.double() for n, (_, g) in snap.items()}
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        coeff = min(1.0, clip / (norm + 1e-6))
        state["t"] += 1
        t = state["t"]
        step_updates = {}
        for n, (p, _) in snap.items():
            g = grads[n] * coeff
            m = state["m"][n] = beta1 * state["m"].get(n, torch.zeros_like(g)) + (1 - beta1) * g
            v = state["v"][n] = beta2 * state["v"].get(n, torch.zeros_like(g)) + (1 - beta2) * g * g
            p = p.double()
            m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
            new = p * (1 - lr * trace["weight_decay"][n]) - lr * m_hat / (v_hat.sqrt() + eps)
            step_updates[n] = new - p
        updates.append(step_updates)
    return updates


def _worst_update_error(trace: dict, expected: list[dict], step: int) -> float:
    """max over tensors of ‖ours − expected‖ / ‖expected‖ for one step's update."""
    last = step + 1 == len(trace["steps"])
    after = {n: (p, None) for n, p in trace["last"].items()} if last else trace["steps"][step + 1]
    worst = 0.0
    for n, (before, _) in trace["steps"][step].items():
        ours = after[n][0].double() - before.double()
        worst = max(worst, float((ours - expected[step][n]).norm() / expected[step][n].norm()))
    return worst


def test_per_branch_moments_match_a_hand_written_adamw_in_every_layout():
    """optim.branch_state=per_branch, G,G,G,D,G: every update equals AdamW by hand with one set of
    moments (and step count) per branch; the first domain step is the update of a fresh Adam, far
    from the shared state's. TP2, DP2 plain and DP2 distributed optimizer give the TP1×DP1 curve;
    the first three (general) steps equal the shared state's, the step after the domain update not."""
    layouts = [(1, 1, False), (2, 1, False), (1, 2, False), (1, 2, True)]
    steps = 5
    res = run_on_ranks(W.branch_moments_curves, 2, args=(layouts, steps), timeout_s=300, pg_timeout_s=60)[0]
    ref = (1, 1, False)
    _assert_same_curve({k: (res[k], None) for k in layouts}, ref)
    trace = res["trace"]
    per_branch, shared = _hand_adamw_updates(trace, True), _hand_adamw_updates(trace, False)
    for step in range(steps):
        assert _worst_update_error(trace, per_branch, step) <= 1e-5, step
    # the shared state's AdamW fits the general steps before the first domain step only
    assert _worst_update_error(trace, shared, 2) <= 1e-5
    assert _worst_update_error(trace, shared, 3) > 0.1
    assert res["shared"][0][:4] == res[ref][0][:4]
    assert abs(res["shared"][0][4] - res[ref][0][4]) > 1e-6


def test_per_branch_moments_resume_exact_and_at_another_dp(tmp_path):
    """Per-branch moments saved after G,G,G,D and resumed for G,G,G,D,G (the last loss shows the
    resumed domain moments at work): exact at the same layout (TP2 plain optimizer; DP2 distributed
    optimizer), and with the distributed optimizer saved at DP2 and resumed at DP1 (resharded) the
    same continued curve up to the DP summation order."""
    scenarios = [("tp2_plain", (2, 1, False), [(2, 1, False)]),
                 ("dp2_distopt", (1, 2, True), [(1, 2, True), (1, 1, True)])]
    res = run_on_ranks(W.branch_moments_resume, 2, args=(scenarios, _ckpt_dir(tmp_path)),
                       timeout_s=400, pg_timeout_s=60)[0]
    for name, save_layout, load_layouts in scenarios:
        (full_losses, full_norms), (first_losses, _) = res[name]["full"], res[name]["first"]
        assert first_losses == full_losses[:4]
        assert full_losses[-1] != full_losses[4]  # it trains on
        for layout in load_layouts:
            losses, norms = res[name][layout]
            if layout == save_layout:
                assert (losses, norms) == (full_losses[4:], full_norms[4:]), (name, layout)
            else:  # another DP: the DP sum is taken in another order
                assert losses == pytest.approx(full_losses[4:], abs=1e-5, rel=0), (name, layout)
                assert norms == pytest.approx(full_norms[4:], rel=1e-4), (name, layout)


def test_branch_state_record_and_mismatch():
    """A checkpoint resumes only with the optimizer-state layout it was saved with."""
    from camopd_megatron.models.optimizer_state import branch_state_mismatch, branch_state_record

    class _Moments:
        branches = ("general", "domain")

    per_branch = branch_state_record(_Moments())  # type: ignore[arg-type]
    assert branch_state_record(None) == {"mode": "shared"}
    assert branch_state_mismatch(None, None) is None  # a checkpoint from before the record: shared
    assert branch_state_mismatch(per_branch, _Moments()) is None  # type: ignore[arg-type]
    for saved, now in ((per_branch, None), (None, _Moments()), ({**per_branch, "branches": ["general"]}, _Moments())):
        msg = branch_state_mismatch(saved, now)  # type: ignore[arg-type]
        assert msg and "optim.branch_state" in msg and "checkpoint.resume" in msg


# ------------------------------------------------------------------------------------------------
# lr schedule and argument checks (no process groups)
# ------------------------------------------------------------------------------------------------
def _sched(**kw):
    from camopd_megatron.models.optimizer import LRScheduler

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "wd_mult": 1.0},
                             {"params": params[1:], "wd_mult": 0.0, "max_lr": 0.5, "min_lr": 0.05}])
    cfg = OptimConfig(**{"lr": 1.0, "min_lr": 0.1, "weight_decay": 0.1, **kw})
    return LRScheduler(opt, cfg, total_steps=10), opt


def test_lr_schedule_shapes():
    s, opt = _sched(lr_schedule="cosine", warmup_steps=2)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # warmup, no lr-0 step
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    # per-group bounds and weight decay multipliers
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    assert opt.param_groups[1]["weight_decay"] == 0.0

    lin, opt = _sched(lr_schedule="linear")
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    for _ in range(5):
        lin.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.9 * 0.5)

    const, opt = _sched(lr_schedule="constant", warmup_steps=4)
    for _ in range(7):
        const.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_lr_schedule_state_roundtrip():
    a, _ = _sched(lr_schedule="cosine", warmup_steps=1)
    for _ in range(4):
        a.step()
    b, opt_b = _sched(lr_schedule="cosine", warmup_steps=1)
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 4 and opt_b.param_groups[0]["lr"] == pytest.approx(a.get_lr())


def test_lr_schedule_bad_values():
    with pytest.raises(ValueError, match="lr_schedule"):
        _sched(lr_schedule="wsd")
    from camopd_megatron.models.optimizer import LRScheduler

    with pytest.raises(ValueError, match="total_steps"):
        LRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), OptimConfig(), total_steps=0)


def test_build_rejects_incomplete_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from camopd_megatron.config.sections import ParallelConfig
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer

    with pytest.raises(ValueError, match="simple_pg_collection"):
        build_ddp_and_optimizer([torch.nn.Linear(2, 2)], OptimConfig(), ParallelConfig(), ProcessGroupCollection(),
                                total_steps=1)
    with pytest.raises(ValueError, match="model_chunks"):
        build_ddp_and_optimizer([], OptimConfig(), ParallelConfig(), ProcessGroupCollection(), total_steps=1)


def test_cpu_adam_steps_fused_also_after_a_state_load():
    """megatron's torch Adam (no TE/apex) runs torch's fused CPU kernel: the same update as the per-tensor
    loop within fp32 rounding, and again fused after load_state_dict replaced the param groups."""
    from types import SimpleNamespace

    from camopd_megatron.models.optimizer import use_fused_cpu_adam

    g = torch.Generator().manual_seed(0)
    init = torch.randn(1000, generator=g)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    fused, loop = (torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1) for p in params)
    holder = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=fused), SimpleNamespace(optimizer=None)])
    for _ in range(3):
        grad = torch.randn(1000, generator=g)
        for p in params:
            p.grad = grad.clone()
        use_fused_cpu_adam(holder)
        fused.step()
        loop.step()
    assert fused.param_groups[0]["fused"] is True and not loop.param_groups[0]["fused"]
    torch.testing.assert_close(params[0].detach(), params[1].detach(), atol=1e-6, rtol=1e-6)
    fused.load_state_dict(loop.state_dict())  # a resume: the saved groups say fused=None
    assert not fused.param_groups[0]["fused"]
    use_fused_cpu_adam(holder)
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["foreach"] is False
