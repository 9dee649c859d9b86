"""The CaMOPD branch loss and the top-k reverse KL against hand-computed values (docs/algorithm.md §2-§3)."""
import math

import pytest
import torch

from camopd_megatron.distill.losses import (
    LossOptions,
    camopd_branch_loss,
    reduce_metric_sums,
    summarize_loss_metrics,
)

NAN, INF = float("nan"), float("inf")


def hand_case():
    """B=2, T=3; row 1 has 2 response tokens and a NaN/-inf padding position.

    row 0: Δ = [0.5, -0.5, 0], π/μ = [1, 3, 1], r = 2, log π = [-1, -2, -0.5]
    row 1: Δ = [0.5, 0.5, pad], π/μ = [0.25, 1.5, pad], r = 1, log π = [-1.5, -1, NaN]
    """
    student = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, NAN]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -2.5, -0.5], [-1.0, -0.5, NAN]])
    rollout = torch.tensor([[-1.0, -2.0 - math.log(3.0), -0.5], [-1.5 + math.log(4.0), -1.0 - math.log(1.5), -INF]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scale = torch.tensor([2.0, 1.0])
    return student, teacher, rollout, mask, scale


def run(options, n_global=2, **kw):
    student, teacher, rollout, mask, scale = hand_case()
    loss, metrics = camopd_branch_loss(student, teacher, rollout, mask, scale, num_samples_global=n_global,
                                       options=options, **kw)
    loss.backward()
    return loss, metrics, student.grad


def test_mask_mode_hand_values():
    # row 0: only t0 survives (t1 ratio 3 masked, t2 Δ=0): w·Â·logπ = 1·(2·0.5)·(−1) = −1, /L=3 → −1/3
    # row 1: t0 ratio 0.25 masked; t1: 1.5·0.5·(−1) = −0.75, /L=2 → −0.375
    # loss = −(−1/3 − 0.375)/2
    loss, m, grad = run(LossOptions())
    assert loss.item() == pytest.approx((1 / 3 + 0.375) / 2, rel=1e-6)
    # d loss / d logπ = −w·Â/(L·N)
    expected = torch.tensor([[-1.0 / 6, 0.0, 0.0], [0.0, -1.5 * 0.5 / 4, 0.0]])
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad).all()
    assert m["tokens"].item() == 5 and m["samples"].item() == 2
    assert m["is_clipped_tokens"].item() == 2 and m["is_low_tokens"].item() == 1 and m["is_high_tokens"].item() == 1
    assert m["loss_sum"].item() == pytest.approx(1 / 3 + 0.375, rel=1e-6)
    assert m["gap_sum"].item() == pytest.approx(1.0) and m["gap_sq_sum"].item() == pytest.approx(1.0)
    assert m["adv_sum"].item() == pytest.approx(2 * 0.5 - 2 * 0.5 + 0.5 + 0.5)
    assert m["is_weight_sum"].item() == pytest.approx(1 + 0 + 1 + 0 + 1.5, rel=1e-6)
    s = summarize_loss_metrics(reduce_metric_sums(m, None))
    assert s["loss"] == pytest.approx((1 / 3 + 0.375) / 2, rel=1e-6)
    assert s["is_clip_rate"] == pytest.approx(0.4) and s["gap_mean"] == pytest.approx(0.2)
    assert s["gap_std"] == pytest.approx(0.4)


def test_clamp_mode_hand_values():
    # row 0: t0 −1; t1 w=clamp(3)=2, Â=2·(−0.5)=−1, logπ=−2 → +4; (−1+4)/3 = 1
    # row 1: t0 w=clamp(0.25)=0.5, Â=0.5, logπ=−1.5 → −0.375; t1 −0.75; /2 → −0.5625
    loss, m, grad = run(LossOptions(is_mode="clamp"))
    assert loss.item() == pytest.approx(-(1.0 - 0.5625) / 2, rel=1e-6)
    expected = torch.tensor([[-1.0 / 6, 2.0 / 6, 0.0], [-0.5 * 0.5 / 4, -0.75 / 4, 0.0]])
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    assert m["is_clipped_tokens"].item() == 2


def test_adv_clip_scale_and_normaliser():
    # the clip bounds Δ before r_i scales it (Â = r·clip(Δ)): |Δ| = 0.5 < 0.6 is not clipped, even where
    # r = 2 makes r·Δ = 1.0 (clipping after r would halve the clip's reach for r_g = 2)
    loss, m, _ = run(LossOptions(adv_clip=0.6), n_global=4)
    assert loss.item() == pytest.approx((1 / 3 + 0.375) / 4, rel=1e-6) and m["adv_clipped_tokens"].item() == 0
    # clip 0.4: row 0 t0 Â = 2·0.4: −0.8/3; row 1 t1 1.5·0.4·(−1)/2 = −0.3; global N = 4 (other micro-batches)
    loss, m, _ = run(LossOptions(adv_clip=0.4), n_global=4)
    assert loss.item() == pytest.approx((0.8 / 3 + 0.3) / 4, rel=1e-6)
    assert m["adv_clipped_tokens"].item() == 4  # every |Δ| = 0.5 (the IS-masked ones too)
    assert m["adv_sum"].item() == pytest.approx(2 * 0.4 - 2 * 0.4 + 0.4 + 0.4)
    # a precomputed pre-update gap replaces teacher − student (here: twice the gap → twice the loss)
    student, teacher, rollout, mask, scale = hand_case()
    gap = 2 * (teacher - student.detach())
    loss2, _ = camopd_branch_loss(student, teacher, rollout, mask, scale, num_samples_global=2,
                                  options=LossOptions(), gap_BT=gap)
    assert loss2.item() == pytest.approx(2 * (1 / 3 + 0.375) / 2, rel=1e-6)


def reference_loss(student, teacher, rollout, mask, scale, n_global, lo=0.5, hi=2.0):
    """Plain Python loops over samples and tokens (the formula of docs/algorithm.md §2)."""
    total = 0.0
    sg = student.detach()  # Δ and π/μ are stop-gradient
    for i in range(student.shape[0]):
        toks = [t for t in range(student.shape[1]) if mask[i, t]]
        acc = 0.0
        for t in toks:
            ratio = math.exp(float(sg[i, t]) - float(rollout[i, t]))
            w = ratio if lo <= ratio <= hi else 0.0
            acc += w * float(scale[i]) * (float(teacher[i, t]) - float(sg[i, t])) * student[i, t]
        total = total + (acc / len(toks) if toks else 0.0)
    return -total / n_global


def random_batch(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(B, T, generator=g) * 3
    teacher = -torch.rand(B, T, generator=g) * 3
    rollout = student + (torch.rand(B, T, generator=g) - 0.5) * 2.0  # ratios in [e^-1, e^1]: some masked
    lengths = torch.tensor([5, 3, 0, 1, 4, 2])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    student = torch.where(mask, student, torch.full_like(student, NAN))
    rollout = torch.where(mask, rollout, torch.full_like(rollout, -INF))
    scale = torch.rand(B, generator=g) + 0.5
    return student, teacher, rollout, mask, scale


def test_matches_loop_reference_and_gradient():
    student, teacher, rollout, mask, scale = random_batch(0)
    x = student.clone().requires_grad_(True)
    loss, _ = camopd_branch_loss(x, teacher, rollout, mask, scale, num_samples_global=6, options=LossOptions())
    loss.backward()
    x_ref = student.clone().double().requires_grad_(True)
    ref = reference_loss(x_ref, teacher.double(), rollout.double(), mask, scale.double(), 6)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    grad_ref = torch.where(mask, x_ref.grad, torch.zeros_like(x_ref.grad)).float()  # the loop never touches padding
    torch.testing.assert_close(x.grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_micro_batch_and_dp_split_invariance():
    """Σ of the micro-batch / DP-rank gradients with the global normaliser == the full-batch gradient."""
    student, teacher, rollout, mask, scale = random_batch(1)
    full = student.clone().requires_grad_(True)
    loss_full, m_full = camopd_branch_loss(full, teacher, rollout, mask, scale, num_samples_global=6, options=LossOptions())
    loss_full.backward()
    # "rank 0" takes rows 0..2 in micro-batches [0:2], [2:3]; "rank 1" rows 3..5 as [3:6]
    grad = torch.zeros_like(student)
    loss_sum, sums = 0.0, []
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        part = student[lo:hi].clone().requires_grad_(True)
        loss, m = camopd_branch_loss(part, teacher[lo:hi], rollout[lo:hi], mask[lo:hi], scale[lo:hi],
                                     num_samples_global=6, options=LossOptions())
        loss.backward()
        grad[lo:hi] = part.grad
        loss_sum += loss.item()
        sums.append(m)
    torch.testing.assert_close(grad, full.grad, rtol=1e-6, atol=1e-8)
    assert loss_sum == pytest.approx(loss_full.item(), rel=1e-6)
    merged = {k: sum(float(m[k]) for m in sums) for k in m_full}
    for k, v in m_full.items():
        assert merged[k] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k


def test_padding_safety_and_bf16():
    student, teacher, rollout, mask, scale = random_batch(2)
    teacher = torch.where(mask, teacher, torch.full_like(teacher, INF))
    x = student.clone().to(torch.bfloat16).requires_grad_(True)
    loss, m = camopd_branch_loss(x, teacher, rollout, mask, scale, num_samples_global=6, options=LossOptions(is_mode="clamp"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all() and (x.grad[~mask] == 0).all()
    assert all(math.isfinite(float(v)) for v in m.values())
    # an all-padding row (row 2 has L = 0) contributes exactly nothing
    assert (x.grad[2] == 0).all()


def test_input_errors():
    student, teacher, rollout, mask, scale = hand_case()
    opts = LossOptions()
    with pytest.raises(ValueError, match="num_samples_global"):
        camopd_branch_loss(student, teacher, rollout, mask, scale, num_samples_global=1, options=opts)
    with pytest.raises(ValueError, match="adv_scale_B"):
        camopd_branch_loss(student, teacher, rollout, mask, scale[:1], num_samples_global=2, options=opts)
    with pytest.raises(ValueError, match="teacher_logp_BT"):
        camopd_branch_loss(student, teacher[:, :2], rollout, mask, scale, num_samples_global=2, options=opts)
    with pytest.raises(ValueError, match="loss.is_low/loss.is_high"):
        LossOptions(is_low=2.0, is_high=0.5)
    with pytest.raises(ValueError, match="loss.adv_clip"):
        LossOptions(adv_clip=0.0)
    with pytest.raises(ValueError, match="loss.is_mode"):
        LossOptions(is_mode="clip")
