"""Vocab-parallel log-prob / top-k kernels vs single-process torch references.

Single process (tp_group=None): values and gradients vs a float64 torch.log_softmax / F.cross_entropy,
fp32 and bf16, chunk sizes, masks, ignore_index, temperature, padding, large logits (|x| ~ 1e4, where an
fp32 logZ = M + log S would be rounded). Multi-rank (one TP=2 and one TP=4 launch): every case sharded
over the vocab, values and shard gradients vs the same reference (and vs our TP=1 result), padding that
is not divisible by TP, whole shards of padding, tokens=1, tokens not divisible by the chunk, top-k with
heavy ties, large logits, bad input raising on every rank, and (TP=2) megatron-core's own
vocab_parallel_cross_entropy.

Shape legend: B, T = leading dims, N = B*T tokens, V = real vocab, P = padded vocab.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from camopd_megatron.ops import (
    IGNORE_INDEX,
    sampled_token_logprobs,
    vocab_parallel_topk,
)
from camopd_megatron.testing.multiproc import run_on_ranks


# --------------------------------------------------------------------------- cases and reference
def make_case(seed: int, lead: tuple[int, ...], V: int, P: int, dtype: torch.dtype, *, temperature: float = 1.0,
              chunk: int = 7, k_top: int = 5, ties: bool = False, masked: bool = True,
              offset: float = 0.0) -> dict:
    """``offset`` shifts every real logit (large offsets test precision: the logits' fp32 ulp at 1e4 is ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: many exact ties, also at the top-k boundary
        logits = torch.randint(-2, 3, lead + (P,), generator=g).to(dtype)
    else:
        logits = (torch.randn(lead + (P,), generator=g) * 4 + offset).to(dtype)
    logits[..., V:] = 60.0 + offset  # padding junk larger than any real logit: must be masked out
    targets = torch.randint(0, V, lead, generator=g)
    mask = torch.rand(lead, generator=g) > 0.2 if masked else None
    if masked and targets.numel() > 1:
        targets.view(-1)[1] = IGNORE_INDEX
    return dict(logits=logits, targets=targets, mask=mask, V=V, P=P, T=temperature, chunk=chunk, k_top=k_top,
                w_logp=torch.randn(lead, generator=g))


def reference(case: dict) -> dict:
    """Plain torch on the full (unpadded) logits in float64; values returned as fp32, the gradient in the
    logits' dtype, top-k from the fp32 scaled logits (our kernels' own scaling, compared exactly)."""
    V, T = case["V"], case["T"]
    full = case["logits"].detach().clone().requires_grad_()
    ls = torch.log_softmax(full[..., :V].double() / T, dim=-1)
    live = case["targets"] != IGNORE_INDEX
    if case["mask"] is not None:
        live = live & case["mask"]
    logp = torch.where(live, ls.gather(-1, case["targets"].clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    loss = (logp * case["w_logp"]).sum()
    loss.backward()
    x = case["logits"][..., :V].float() / T
    sorted_vals, sorted_ids = x.sort(dim=-1, descending=True, stable=True)
    return dict(logp=logp.detach().float(), grad=full.grad,
                top_vals=sorted_vals[..., :case["k_top"]], top_ids=sorted_ids[..., :case["k_top"]])


def run_ours(case: dict, group, rank: int, tp: int) -> dict:
    """Our kernels on this rank's shard; returns values, this shard's gradient, top-k."""
    Vl = case["P"] // tp
    kw = dict(vocab_start=rank * Vl, vocab_size=case["V"], chunk_tokens=case["chunk"], temperature=case["T"])
    shard = case["logits"][..., rank * Vl:(rank + 1) * Vl].clone().requires_grad_()
    before = shard.detach().clone()
    logp = sampled_token_logprobs(shard, case["targets"], group, mask=case["mask"], **kw)
    loss = (logp * case["w_logp"]).sum()
    loss.backward()
    top_vals, top_ids = vocab_parallel_topk(shard, case["k_top"], group, **kw)
    with torch.no_grad():  # teacher path: same values, no graph
        logp_ng = sampled_token_logprobs(shard, case["targets"], group, mask=case["mask"], **kw)
    return dict(logp=logp.detach(), grad=shard.grad, top_vals=top_vals,
                top_ids=top_ids, logp_nograd=logp_ng, nograd_has_graph=logp_ng.grad_fn is not None,
                unmodified=torch.equal(before, shard.detach()))


def check(ours: dict, ref: dict, dtype: torch.dtype, *, grad_full: torch.Tensor | None = None) -> None:
    """Values to fp32 accuracy; gradients to the input dtype's rounding."""
    torch.testing.assert_close(ours["logp"], ref["logp"], rtol=1e-5, atol=2e-5, msg="logp")
    grad = ours["grad"] if grad_full is None else grad_full
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref["grad"], rtol=1e-4, atol=1e-5)
    else:
        # both sides are fp32 gradients rounded to the input dtype: allow a couple of ulps
        scale = ref["grad"].float().abs().max().item()
        torch.testing.assert_close(grad.float(), ref["grad"].float(), rtol=1e-2, atol=4e-3 * scale)
    assert torch.equal(ours["top_ids"], ref["top_ids"])
    assert torch.equal(ours["top_vals"], ref["top_vals"])


SINGLE_CASES = [
    dict(seed=0, lead=(3, 11), V=50, P=64, dtype=torch.float32, chunk=7),
    dict(seed=1, lead=(3, 11), V=50, P=64, dtype=torch.bfloat16, chunk=4),
    dict(seed=2, lead=(37,), V=64, P=64, dtype=torch.float32, chunk=1000, temperature=0.7, masked=False),
    dict(seed=3, lead=(2, 9), V=61, P=64, dtype=torch.bfloat16, chunk=1, temperature=1.3),
    dict(seed=4, lead=(1,), V=30, P=32, dtype=torch.float32, chunk=5, k_top=30),
    dict(seed=5, lead=(4, 8), V=40, P=48, dtype=torch.bfloat16, chunk=6, ties=True, k_top=9),
    dict(seed=6, lead=(17,), V=100, P=128, dtype=torch.float16, chunk=5),
    dict(seed=7, lead=(3, 5), V=50, P=64, dtype=torch.float32, chunk=4, offset=1e4),  # large logits
    dict(seed=8, lead=(11,), V=64, P=64, dtype=torch.float32, chunk=3, offset=-3e4),
]


@pytest.mark.parametrize("spec", SINGLE_CASES, ids=lambda s: f"seed{s['seed']}")
def test_single_process_matches_torch(spec):
    spec = dict(spec)
    case = make_case(spec.pop("seed"), spec.pop("lead"), spec.pop("V"), spec.pop("P"), spec.pop("dtype"), **spec)
    ours = run_ours(case, None, 0, 1)
    check(ours, reference(case), case["logits"].dtype)
    assert ours["unmodified"], "input logits were modified in place"
    assert torch.equal(ours["logp_nograd"], ours["logp"]) and not ours["nograd_has_graph"]
    assert not ours["grad"][..., case["V"]:].any()  # padding columns get no gradient


def test_matches_cross_entropy_and_chunking_is_invisible():
    case = make_case(10, (29,), 77, 80, torch.float32, masked=False)
    x = case["logits"][..., :77]
    ce = F.cross_entropy(x, case["targets"], reduction="none")
    results = [sampled_token_logprobs(case["logits"], case["targets"], None, vocab_start=0, vocab_size=77,
                                      chunk_tokens=c) for c in (1, 3, 29, 64, None)]
    torch.testing.assert_close(results[0], -ce, rtol=1e-6, atol=1e-6)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-6)


def test_large_logits_keep_fp32_precision():
    """The max is subtracted before log S is added: at |x| ~ 1e4 an fp32 logZ = M + log S is off by its ulp
    (~1e-3; this example gave -0.693359375), in the values and in backward's probabilities alike."""
    logits = torch.tensor([[1e4, 1e4, -1e4, 0.]], requires_grad=True)
    logp = sampled_token_logprobs(logits, torch.tensor([0]), None, vocab_start=0, vocab_size=4)
    assert abs(logp.item() - (-0.6931471805599453)) < 1e-6
    logp.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.5, -0.5, 0., 0.]]), rtol=0, atol=1e-6)
    with torch.no_grad():
        top, _ = vocab_parallel_topk(logits, 2, None, vocab_start=0, vocab_size=4, return_logprobs=True)
    torch.testing.assert_close(top, torch.full((1, 2), -0.6931471805599453), rtol=0, atol=1e-6)


def test_exp_stays_in_normal_numbers_on_cpu():
    """exp(x − shift) on a CPU: below EXP_MIN (the argument below EXP_ARG_MIN) it is EXP_MIN, never a subnormal
    number (slow CPU products) nor the output of torch's slow path for underflow; padding columns (-inf) are
    exactly 0; everything else is torch's own exp(x − shift), bitwise."""
    from camopd_megatron.ops.vocab_parallel import EXP_ARG_MIN, EXP_MIN, exp_minus_, exp_shifted_

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * 80  # spread far past fp32's exp range
    x[:, 33:] = float("-inf")  # padding
    shift = x[:, :33].amax(dim=-1)
    want = torch.exp(x - shift.unsqueeze(-1))
    out = exp_minus_(x.clone(), shift, 33)
    low = (x - shift.unsqueeze(-1)) < EXP_ARG_MIN
    low[:, 33:] = False
    assert (want[low] < torch.finfo(torch.float32).tiny).any()  # the case is real: exp alone underflows
    assert torch.equal(out[~low], want[~low])  # padding: exp(-inf) = 0 there too
    assert (out[low] == torch.exp(torch.tensor(EXP_ARG_MIN))).all() and abs(out[low][0].item() / EXP_MIN - 1) < 1e-6
    assert not ((out > 0) & (out < torch.finfo(torch.float32).tiny)).any()
    # the row statistics: the sum over the same values, the max of the real columns; a row of padding only
    m, sh, s = exp_shifted_(x.clone(), pad_from=33)
    torch.testing.assert_close(s, out.sum(dim=-1), rtol=0, atol=0)
    assert torch.equal(m, shift) and torch.equal(sh, shift)
    m, sh, s = exp_shifted_(torch.full((2, 5), float("-inf")), pad_from=0)
    assert torch.isinf(m).all() and (sh == 0).all() and (s == 0).all()


def test_logits_spread_past_the_exp_range():
    """Logits ~ N(0, 60²): most of a row lies more than 87 below its max, where exp underflows in fp32. Values
    and gradients still match float64 torch, padding columns get none."""
    case = make_case(11, (5, 7), 50, 64, torch.float32, chunk=4)
    case["logits"] = case["logits"] * 15  # std 60; the padding junk (60) becomes 900, above every real logit
    ours = run_ours(case, None, 0, 1)
    check(ours, reference(case), torch.float32)
    assert not ours["grad"][..., case["V"]:].any()


def _bad_calls(group, rank: int, tp: int) -> dict:
    """name → error message of each bad call (None when nothing was raised)."""
    P, V = 64, 60
    Vl = P // tp
    shard = torch.randn(5, Vl)
    tg = torch.randint(0, V, (5,))
    ok = dict(vocab_start=rank * Vl, vocab_size=V)
    calls = {
        "targets_range": lambda: sampled_token_logprobs(shard, tg.clone().fill_(V), group, **ok),
        "targets_dtype": lambda: sampled_token_logprobs(shard, tg.float(), group, **ok),
        "targets_shape": lambda: sampled_token_logprobs(shard, tg[:4], group, **ok),
        "mask_shape": lambda: sampled_token_logprobs(shard, tg, group, mask=torch.ones(4, dtype=torch.bool), **ok),
        "logits_dtype": lambda: sampled_token_logprobs(shard.long(), tg, group, **ok),
        "vocab_start": lambda: sampled_token_logprobs(shard, tg, group, vocab_start=rank * Vl + 1, vocab_size=V),
        "vocab_size": lambda: sampled_token_logprobs(shard, tg, group, vocab_start=rank * Vl, vocab_size=P + 1),
        "temperature": lambda: sampled_token_logprobs(shard, tg, group, temperature=0.0, **ok),
        "chunk_tokens": lambda: sampled_token_logprobs(shard, tg, group, chunk_tokens=0, **ok),
        "k": lambda: vocab_parallel_topk(shard, V + 1, group, **ok),
    }
    if tp > 1:  # problems only one rank has, or that need cross-rank information
        calls["one_rank_targets"] = lambda: sampled_token_logprobs(
            shard, tg if rank == 0 else tg.clone().fill_(-5), group, **ok)
        calls["token_count"] = lambda: sampled_token_logprobs(shard[: 5 - rank], tg[: 5 - rank], group, **ok)
        calls["group_too_small"] = lambda: sampled_token_logprobs(  # shards cut for 2*tp ranks
            shard[:, : Vl // 2], tg, group, vocab_start=rank * (Vl // 2), vocab_size=V)
    out = {}
    for name, fn in calls.items():
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    # the group is still healthy after all those errors
    out["healthy"] = sampled_token_logprobs(shard, tg, group, **ok).shape == (5,)
    return out


EXPECTED_ARG = {"targets_range": "targets", "targets_dtype": "targets", "targets_shape": "targets",
                "mask_shape": "mask", "logits_dtype": "logits_shard", "vocab_start": "vocab_start",
                "vocab_size": "vocab_size", "temperature": "temperature", "chunk_tokens": "chunk_tokens", "k": "k",
                "one_rank_targets": "targets", "token_count": "logits_shard", "group_too_small": "vocab_size"}


def check_bad_calls(per_rank: list[dict]) -> None:
    for out in per_rank:
        assert out.pop("healthy")
        for name, msg in out.items():
            assert msg is not None, f"{name}: no ValueError"
            assert msg.startswith(EXPECTED_ARG[name]), f"{name}: {msg}"


def test_bad_input_single_process():
    check_bad_calls([_bad_calls(None, 0, 1)])
    with pytest.raises(ValueError, match="targets: ids must lie in"):
        sampled_token_logprobs(torch.randn(3, 8), torch.tensor([0, 9, 1]), None, vocab_start=0, vocab_size=8)


# --------------------------------------------------------------------------- multi-rank
TP_CASES = [
    dict(seed=20, lead=(3, 10), V=61, P=64, dtype=torch.float32, chunk=7),  # padding on the last rank(s)
    dict(seed=21, lead=(1,), V=64, P=64, dtype=torch.bfloat16, chunk=4, k_top=20),  # tokens=1, k > V_local at TP=4
    dict(seed=22, lead=(2, 13), V=45, P=48, dtype=torch.bfloat16, chunk=5, temperature=0.8),
    dict(seed=23, lead=(19,), V=9, P=16, dtype=torch.float32, chunk=4, k_top=6),  # whole shards of padding
    dict(seed=24, lead=(4, 6), V=40, P=48, dtype=torch.bfloat16, chunk=5, ties=True, k_top=7),
    dict(seed=25, lead=(3, 7), V=61, P=64, dtype=torch.float32, chunk=4, offset=1e4),  # large logits
]


def build_cases() -> list[dict]:
    out = []
    for spec in TP_CASES:
        spec = dict(spec)
        out.append(make_case(spec.pop("seed"), spec.pop("lead"), spec.pop("V"), spec.pop("P"), spec.pop("dtype"),
                             **spec))
    return out


def _megatron_check(rank: int, tp: int) -> dict:
    """megatron-core's vocab_parallel_cross_entropy on the same shards (no padding, no temperature)."""
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    case = make_case(30, (5, 3), 64, 64, torch.float32, masked=False)  # megatron wants [S, B, V_local]
    Vl = 64 // tp
    shard = case["logits"][..., rank * Vl:(rank + 1) * Vl]
    theirs_in = shard.clone().requires_grad_()
    theirs = vocab_parallel_cross_entropy(theirs_in.clone(), case["targets"], tp_group=dist.group.WORLD)
    theirs.sum().backward()
    ours_in = shard.clone().requires_grad_()
    ours = -sampled_token_logprobs(ours_in, case["targets"], dist.group.WORLD, vocab_start=rank * Vl, vocab_size=64)
    ours.sum().backward()
    return dict(loss=(ours.detach(), theirs.detach()), grad=(ours_in.grad, theirs_in.grad))


def _tp_rank_fn(rank: int, world_size: int, cases: list[dict], with_megatron: bool) -> dict:
    group = dist.group.WORLD
    results = [run_ours(c, group, rank, world_size) for c in cases]
    return dict(cases=results, bad=_bad_calls(group, rank, world_size),
                megatron=_megatron_check(rank, world_size) if with_megatron else None)


def _check_tp(per_rank: list[dict], cases: list[dict]) -> None:
    tp = len(per_rank)
    for i, case in enumerate(cases):
        ref = reference(case)
        single = run_ours(case, None, 0, 1)
        grad_full = torch.cat([r["cases"][i]["grad"] for r in per_rank], dim=-1)
        for r in per_rank:
            ours = r["cases"][i]
            assert ours["unmodified"] and not ours["nograd_has_graph"]
            check(ours, ref, case["logits"].dtype, grad_full=grad_full)
            for key in ("logp", "top_vals"):  # TP=1 (our kernel) agrees to rounding
                torch.testing.assert_close(ours[key], single[key], rtol=1e-6, atol=1e-6)
            assert torch.equal(ours["top_ids"], single["top_ids"]), f"case {i} tp={tp}"
        tol = dict(rtol=1e-5, atol=1e-6) if case["logits"].dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
        torch.testing.assert_close(grad_full.float(), single["grad"].float(), **tol)
    check_bad_calls([r["bad"] for r in per_rank])


@pytest.fixture(scope="module")
def tp2_results():
    cases = build_cases()
    return cases, run_on_ranks(_tp_rank_fn, 2, args=(cases, True), timeout_s=240, pg_timeout_s=60)


def test_tp2_matches_reference(tp2_results):
    cases, per_rank = tp2_results
    _check_tp(per_rank, cases)


def test_tp2_matches_megatron_cross_entropy(tp2_results):
    _, per_rank = tp2_results
    grads_ours = torch.cat([r["megatron"]["grad"][0] for r in per_rank], dim=-1)
    grads_theirs = torch.cat([r["megatron"]["grad"][1] for r in per_rank], dim=-1)
    for r in per_rank:
        ours, theirs = r["megatron"]["loss"]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_ours, grads_theirs, rtol=1e-5, atol=1e-6)


def test_tp4_matches_reference():
    cases = build_cases()
    per_rank = run_on_ranks(_tp_rank_fn, 4, args=(cases, False), timeout_s=300, pg_timeout_s=60)
    _check_tp(per_rank, cases)


def test_benchmark_smoke():
    """The benchmark script runs end to end (tiny vocab, one process set) and prints both methods."""
    from camopd_megatron.bench.vocab_parallel import main

    table = main(["--quick", "--tp", "2", "--tokens", "40", "--vocab-size", "1000"])
    rows = [line for line in table.splitlines() if line.startswith("| 2 | 40 |")]
    assert len(rows) == 2 and all(len(r.split("|")) == 11 for r in rows)
