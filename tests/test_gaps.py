"""Gap helpers and the per-sample scores of docs/algorithm.md §4 vs a plain Python loop."""
import pytest
import torch

from camopd_megatron.ops.gaps import sample_gap_scores, token_gaps


def _loop_scores(gap_BT, mask_BT, kind):
    out = []
    for g_row, m_row in zip(gap_BT.tolist(), mask_BT.tolist()):
        vals = [(abs(g) if kind == "abs" else max(g, 0.0)) for g, m in zip(g_row, m_row) if m]
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["abs", "positive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_match_loop(kind, dtype):
    g = torch.Generator().manual_seed(0)
    gap = (torch.randn(6, 9, generator=g) * 2).to(dtype)
    lengths = torch.tensor([9, 0, 1, 4, 7, 3])
    mask = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)  # the first L_i tokens of row i
    gap[1] = float("nan")  # an empty response with garbage gaps still scores 0
    gap[3, 5:] = float("inf")  # padding positions never leak into the score
    scores = sample_gap_scores(gap, mask, kind)
    assert scores.dtype == torch.float32 and scores[1] == 0
    torch.testing.assert_close(scores, _loop_scores(gap.float(), mask, kind), rtol=1e-6, atol=1e-6)
    # a float 0/1 mask gives the same result
    torch.testing.assert_close(sample_gap_scores(gap, mask.float(), kind), scores)


def test_positive_ignores_negative_gaps_and_abs_does_not():
    gap = torch.tensor([[-1.0, 3.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert sample_gap_scores(gap, mask, "positive").item() == pytest.approx(1.0)
    assert sample_gap_scores(gap, mask, "abs").item() == pytest.approx(2.0)


def test_token_gaps_detach_student():
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([-0.5, -3.0])
    gap = token_gaps(teacher, student)
    assert not gap.requires_grad
    torch.testing.assert_close(gap, torch.tensor([0.5, -1.0]))


def test_masked_token_gaps_are_zero_off_the_response():
    teacher = torch.tensor([[-0.5, float("nan"), -1.0]])
    student = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    gap = token_gaps(teacher, student, mask)
    assert not gap.requires_grad and gap.dtype == torch.float32
    assert gap.tolist() == [[0.5, 0.0, 0.0]]
    torch.testing.assert_close(token_gaps(teacher, student, mask.bool()), gap)


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        sample_gap_scores(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="mask_BT"):
        sample_gap_scores(torch.zeros(2, 3), torch.ones(2, 4), "abs")
    with pytest.raises(ValueError, match="gap_BT"):
        sample_gap_scores(torch.zeros(6), torch.ones(6), "abs")
    with pytest.raises(ValueError, match="student_logp_BT"):
        token_gaps(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask_BT"):
        token_gaps(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2))
