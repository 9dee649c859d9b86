"""Branch conflict and gradient coherence (docs/algorithm.md §8) on plain and TP/PP-sharded gradient sets."""
import math

import pytest
import torch
import torch.distributed as dist

from camopd_megatron.distill.diagnostics import (
    CoherenceAccumulator,
    branch_conflict,
    coherence_gain,
    grad_dots,
    grads_from_params,
    gradient_coherence,
)
from camopd_megatron.testing.multiproc import run_on_ranks


def gs(*pairs):
    return [(torch.tensor(v, dtype=torch.float32), s) for v, s in pairs]


def test_branch_conflict_hand_values():
    a = gs(([1.0, 2.0], False), ([[3.0]], True))
    b = gs(([0.0, 1.0], False), ([[-1.0]], True))
    c = branch_conflict(a, b, tp_group=None, pp_group=None)
    assert c.dot == pytest.approx(-1.0)
    assert c.norm_a == pytest.approx(math.sqrt(14)) and c.norm_b == pytest.approx(math.sqrt(2))
    assert c.cosine == pytest.approx(-1 / math.sqrt(28))
    assert c.metrics("conflict/g_vs_d")["conflict/g_vs_d/cosine"] == c.cosine
    zero = gs(([0.0, 0.0], False), ([[0.0]], True))
    assert branch_conflict(a, zero, tp_group=None, pp_group=None).cosine == 0.0
    with pytest.raises(ValueError, match="grads_b"):
        branch_conflict(a, gs(([1.0], False), ([[1.0]], True)), tp_group=None, pp_group=None)


def test_coherence_hand_values():
    e1, e2 = gs(([1.0, 0.0], False)), gs(([0.0, 1.0], False))
    neg = gs(([-1.0, 0.0], False))
    assert gradient_coherence([e1, e2], tp_group=None, pp_group=None) == pytest.approx(1 / math.sqrt(2))
    assert gradient_coherence([e1, e1, e1], tp_group=None, pp_group=None) == pytest.approx(1.0)
    assert gradient_coherence([e1, neg], tp_group=None, pp_group=None) == pytest.approx(0.0)
    # g = (3, 4) and (0, 1): ‖(3, 5)‖ / (5 + 1)
    acc = CoherenceAccumulator(tp_group=None, pp_group=None)
    assert acc.add(gs(([3.0, 4.0], False))) == pytest.approx(5.0)
    acc.add(e2)
    assert acc.count == 2 and acc.coherence() == pytest.approx(math.sqrt(34) / 6)
    assert coherence_gain(0.9, 0.6) == pytest.approx(0.5) and coherence_gain(0.5, 0.0) == 0.0
    with pytest.raises(ValueError, match="no gradients"):
        CoherenceAccumulator(tp_group=None, pp_group=None).coherence()


def test_grads_from_params():
    lin = torch.nn.Linear(2, 1)
    lin.weight.tensor_model_parallel = True
    lin(torch.ones(1, 2)).sum().backward()
    lin.bias.grad = None
    (w, ws), (b, bs) = grads_from_params(lin.parameters())
    assert ws and not bs and torch.equal(w, torch.ones(1, 2)) and torch.equal(b, torch.zeros(1))
    lin.weight.main_grad = torch.full((1, 2), 7.0)  # megatron's fp32 main grad wins over .grad
    assert grads_from_params(lin.parameters())[0][0].eq(7.0).all()


# --------------------------------------------------------------------------- 2 ranks
def full_sets(n, seed):
    """n per-sample full gradient sets: W [4, 6] (TP-sharded by columns), b [3] (replicated), v [5] (stage 1)."""
    g = torch.Generator().manual_seed(seed)
    return [dict(W=torch.randn(4, 6, generator=g), b=torch.randn(3, generator=g), v=torch.randn(5, generator=g))
            for _ in range(n)]


def as_tp(full, rank):
    """TP = 2: W split by columns, b replicated; v sharded by rows."""
    return [(full["W"][:, 3 * rank: 3 * rank + 3].contiguous(), True), (full["b"].clone(), False),
            (full["v"].chunk(2)[rank].contiguous() if rank == 0 else full["v"][3:].contiguous(), True)]


def as_unsharded(full):
    return [(full["W"], True), (full["b"], False), (full["v"], True)]


def as_pp(full, rank):
    """PP = 2: stage 0 holds W and b, stage 1 holds v (disjoint params)."""
    return [(full["W"], False), (full["b"], False)] if rank == 0 else [(full["v"], True)]


def _rank_fn(rank, world_size, sets):
    world = dist.group.WORLD
    out = {}
    tp = [as_tp(s, rank) for s in sets]
    c = branch_conflict(tp[0], tp[1], tp_group=world, pp_group=None)
    out["tp_conflict"] = (c.dot, c.cosine)
    out["tp_coh"] = gradient_coherence(tp, tp_group=world, pp_group=None)
    pp = [as_pp(s, rank) for s in sets]
    c = branch_conflict(pp[0], pp[1], tp_group=None, pp_group=world)
    out["pp_conflict"] = (c.dot, c.cosine)
    out["pp_coh"] = gradient_coherence(pp, tp_group=None, pp_group=world)
    # samples spread over 2 DP ranks (rank 0: sets 0, 1, 2; rank 1: set 3; replicated model)
    acc = CoherenceAccumulator(tp_group=None, pp_group=None)
    for s in (sets[:3] if rank == 0 else sets[3:]):
        acc.add(as_unsharded(s))
    out["dp_coh"] = acc.coherence(dp_group=world)
    # a DP rank without probe samples registers the layout only
    acc = CoherenceAccumulator(tp_group=None, pp_group=None)
    if rank == 0:
        for s in sets:
            acc.add(as_unsharded(s))
    else:
        acc.add_zero(as_unsharded(sets[0]))
    out["dp_coh_empty_rank"] = acc.coherence(dp_group=world)
    out["dots"] = grad_dots([(tp[0], tp[1]), (tp[2], tp[2])], tp_group=world, pp_group=None)
    return out


def test_sharded_equals_unsharded_reference():
    sets = full_sets(4, seed=3)
    ref = [as_unsharded(s) for s in sets]
    c = branch_conflict(ref[0], ref[1], tp_group=None, pp_group=None)
    coh = gradient_coherence(ref, tp_group=None, pp_group=None)
    flat = [torch.cat([t.reshape(-1) for t, _ in r]).double() for r in ref]
    assert c.dot == pytest.approx(float(flat[0] @ flat[1]), rel=1e-12)
    assert coh == pytest.approx(float(sum(flat).norm() / sum(f.norm() for f in flat)), rel=1e-12)
    per_rank = run_on_ranks(_rank_fn, 2, args=(sets,), timeout_s=120, pg_timeout_s=60)
    for out in per_rank:
        for key in ("tp_conflict", "pp_conflict"):
            assert out[key][0] == pytest.approx(c.dot, rel=1e-10), key
            assert out[key][1] == pytest.approx(c.cosine, rel=1e-10), key
        for key in ("tp_coh", "pp_coh", "dp_coh", "dp_coh_empty_rank"):
            assert out[key] == pytest.approx(coh, rel=1e-10), key
        assert out["dots"][0] == pytest.approx(c.dot, rel=1e-10)
        assert out["dots"][1] == pytest.approx(float(flat[2] @ flat[2]), rel=1e-10)
