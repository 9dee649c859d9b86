"""The fused output-projection log-prob (hidden states × vocab-sharded weight, no logits tensor).

Reference: torch's own ``log_softmax(h Wᵀ / T)`` over the real vocabulary with autograd. Checked in one
process (fp32 and bf16, row chunks and vocab blocks, temperature, ignored targets, padding rows, large logits) and on 4 gloo
ranks as TP = 2 (two groups) and TP = 4 (the last shard all padding): values, dL/dh (all-reduced over the
group) and each rank's dL/dW rows, against a float64 reference.

Shape legend: N tokens, H hidden, V real vocab, P padded vocab.
"""
from __future__ import annotations

import pytest
import torch

from camopd_megatron.ops import IGNORE_INDEX, fused_output_logprobs
from camopd_megatron.testing.multiproc import run_on_ranks

H = 16


def make_case(seed: int, n: int, V: int, P: int, *, temperature: float = 1.0, offset: float = 0.0) -> dict:
    """``offset`` != 0: every real logit is ``offset`` + a small part, all exact in fp32 (dyadic hidden and
    weight entries, h[:, 0] = 1 and W[:V, 0] = offset), so the fp32 logits equal the float64 reference's
    and any error left is the kernel's (at offset 1e4 an fp32 logZ = M + log S is off by ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(P, H, generator=g) * 0.7
    if offset:
        hidden = torch.randint(-8, 9, (n, H), generator=g) / 8.0
        weight = torch.randint(-6, 7, (P, H), generator=g) / 8.0
        hidden[:, 0] = 1.0
        weight[:V, 0] = offset
    weight[V:] = 5.0 + abs(offset)  # padding rows: huge logits that must never count
    targets = torch.randint(0, V, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    upstream = torch.randn(n, generator=g)
    return {"hidden": hidden, "weight": weight, "targets": targets, "upstream": upstream, "V": V, "P": P,
            "temperature": temperature, "offset": offset}


def reference(case: dict) -> dict:
    h = case["hidden"].double().requires_grad_(True)
    w = case["weight"].double().requires_grad_(True)
    logits = (h @ w.t())[:, : case["V"]] / case["temperature"]
    live = case["targets"] != IGNORE_INDEX
    idx = torch.where(live, case["targets"], torch.zeros_like(case["targets"]))
    logp = torch.where(live, torch.log_softmax(logits, -1).gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros(()))
    (logp * case["upstream"].double()).sum().backward()
    return {"logp": logp.detach(), "dh": h.grad, "dw": w.grad}


def run_fused(case: dict, group, rank: int, tp: int, *, dtype=torch.float32, chunk=None, keep: int = 2**28,
              vb=None) -> dict:
    rows = case["P"] // tp
    h = case["hidden"].to(dtype).clone().requires_grad_(True)
    w = case["weight"][rank * rows:(rank + 1) * rows].to(dtype).clone().requires_grad_(True)
    logp = fused_output_logprobs(h, w, case["targets"], group, vocab_size=case["V"],
                                 temperature=case["temperature"], chunk_tokens=chunk, keep_softmax_bytes=keep,
                                 vocab_block=vb)
    (logp * case["upstream"]).sum().backward()
    with torch.no_grad():  # the no-grad path (teachers) gives the same values
        nograd = fused_output_logprobs(h, w, case["targets"], group, vocab_size=case["V"],
                                       temperature=case["temperature"], chunk_tokens=chunk, vocab_block=vb)
    return {"logp": logp.detach(), "nograd": nograd, "dh": h.grad, "dw": w.grad, "rows": (rank * rows, (rank + 1) * rows)}


def check(ours: dict, ref: dict, *, tol: float, offset: float = 0.0) -> None:
    torch.testing.assert_close(ours["logp"].double(), ref["logp"], atol=tol, rtol=tol)
    torch.testing.assert_close(ours["nograd"].double(), ref["logp"], atol=tol, rtol=tol)
    # dL/dh = Σ_v G[v] W[v]: the rows of G sum to ~0, so W's column of ``offset`` leaves fp32 round-off of
    # ~1e-7·|offset| (an fp32 logZ left ~1e-4·g·|offset| there: the probabilities did not sum to 1)
    torch.testing.assert_close(ours["dh"].double(), ref["dh"], atol=tol + 1e-6 * abs(offset), rtol=tol)
    lo, hi = ours["rows"]
    torch.testing.assert_close(ours["dw"].double(), ref["dw"][lo:hi], atol=tol, rtol=tol)


@pytest.mark.parametrize("keep", [0, 2**28], ids=["recompute", "keep_softmax"])
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_logits_keep_fp32_precision(offset, keep):
    case = make_case(6, 19, V=50, P=64, offset=offset)
    check(run_fused(case, None, 0, 1, chunk=5, keep=keep, vb=6), reference(case), tol=1e-5, offset=offset)


@pytest.mark.parametrize("keep", [0, 2**28], ids=["recompute", "keep_softmax"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
@pytest.mark.parametrize("vb", [None, 7, 16], ids=["one_block", "vb7", "vb16"])  # 64 = 4 x 16; 7: a ragged last
def test_single_process_matches_torch(temperature, chunk, keep, vb):
    case = make_case(3, 23, V=50, P=64, temperature=temperature)
    ref = reference(case)
    check(run_fused(case, None, 0, 1, chunk=chunk, keep=keep, vb=vb), ref, tol=1e-5)
    assert ref["dw"][50:].abs().sum() == 0  # padding rows get no gradient
    assert (ref["logp"][::5] == 0).all()


@pytest.mark.parametrize("keep", [0, 2**28], ids=["recompute", "keep_softmax"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_rows_whose_logits_rise_block_by_block(keep, temperature):
    """Vocab blocks whose logits sit hundreds above the first block's (more than SHIFT_HEADROOM) take their own
    shifts mid-row, and backward brings the tiles taken at a lower shift to the row's highest; a block after
    the rise falls back. Dyadic entries keep the fp32 logits exact (up to ~1500), as in make_case."""
    case = make_case(8, 13, V=50, P=64, temperature=temperature)
    g = torch.Generator().manual_seed(9)
    case["hidden"] = torch.randint(-8, 9, (13, H), generator=g) / 8.0
    mult = torch.tensor([1.0, 8.0, 32.0, 2.0, 128.0, 64.0, 1.0, 1.0]).repeat_interleave(8)  # per block of 8
    weight = torch.randint(-6, 7, (64, H), generator=g) / 8.0 * mult.unsqueeze(-1)
    weight[50:] = 500.0  # padding rows: huge logits that must never count
    case["weight"] = weight
    ref = reference(case)
    assert (ref["logp"] < -40).any()  # the rise is real: some targets are far below their row's max
    check(run_fused(case, None, 0, 1, chunk=5, keep=keep, vb=8), ref, tol=1e-5)


def _rising_sum_case() -> dict:
    """16 logits ~38 above the first vocab block's max in block 1 (vocab blocks of 16): no single one rises
    SHIFT_HEADROOM above it, but their Σexp passes exp(SHIFT_HEADROOM) (16·e^38 > e^40). Dyadic entries: the
    fp32 logits are exact."""
    from camopd_megatron.ops.fused_output import SHIFT_HEADROOM

    case = make_case(14, 9, V=60, P=64)
    g = torch.Generator().manual_seed(15)
    case["hidden"] = torch.randint(-4, 5, (9, H), generator=g) / 8.0
    case["hidden"][:, 0] = 1.0
    weight = torch.randint(-4, 5, (64, H), generator=g) / 64.0
    weight[:, 0] = 0.0
    weight[16:32, 0] = SHIFT_HEADROOM - 2.0  # block 1: every logit ~38 above block 0's
    weight[32:48, 0] = 1.0  # block 2: back down, against a row shift now ~38
    weight[60:] = 500.0  # padding rows
    case["weight"] = weight
    assert ((case["hidden"].double() @ weight[16:32].double().t()).amax(-1) < SHIFT_HEADROOM).all()
    return case


@pytest.mark.parametrize("keep", [0, 2**28], ids=["recompute", "keep_softmax"])
def test_a_block_taken_again_on_its_sum_matches_torch(keep):
    """Later vocab blocks are exponentiated at the first block's max without a max of their own; a block whose
    Σexp passes exp(SHIFT_HEADROOM) is taken again at its own max: values and gradients as float64 torch."""
    case = _rising_sum_case()
    check(run_fused(case, None, 0, 1, chunk=4, keep=keep, vb=16), reference(case), tol=1e-5)


def test_a_block_is_taken_again_on_its_sum(monkeypatch):
    """The forward projects the block whose Σexp passed exp(SHIFT_HEADROOM) a second time, in every chunk."""
    from camopd_megatron.ops import fused_output as fo

    case = _rising_sum_case()
    projected = []
    project = fo._project_
    monkeypatch.setattr(fo, "_project_", lambda h, w, *a: projected.append(h.shape[0]) or project(h, w, *a))
    with torch.no_grad():
        fused_output_logprobs(case["hidden"], case["weight"], case["targets"], None, vocab_size=60,
                              chunk_tokens=4, vocab_block=16)
    assert projected == [4] * 5 + [4] * 5 + [1] * 5  # 3 chunks: 4 blocks, then block 1 again


@pytest.mark.parametrize("keep", [0, 2**28], ids=["recompute", "keep_softmax"])
def test_logits_spread_past_the_exp_range(keep):
    """Logits ~ N(0, 60²), as a peaked softmax: most of a row lies more than 87 below its max, where fp32's exp
    underflows (on a CPU exp's argument is clamped there, ops.vocab_parallel.exp_minus_, and the tiles backward
    multiplies hold 0). Values and gradients still match the float64 reference; padding rows get no gradient."""
    case = make_case(12, 17, V=50, P=64)
    case["weight"][:50] *= 60.0 / 4.0 / 0.7  # |h| ~ 4: logit std ~ 60
    ref = reference(case)
    lp = torch.log_softmax((case["hidden"].double() @ case["weight"][:50].double().t()), -1)
    assert (lp < -87).float().mean() > 0.5  # the case is real
    ours = run_fused(case, None, 0, 1, chunk=5, keep=keep, vb=16)
    check(ours, ref, tol=1e-5)
    assert not ours["dw"][50:].any()


def test_kept_tiles_hold_no_subnormals_where_logits_spread_wide():
    """A first block spanning more than SAFE_SPREAD makes the forward clamp exp's argument and zero the kept
    tiles' elements below EXP_MIN: no subnormal reaches backward's products (slow on a CPU); a narrow spread
    keeps the tiles exactly exp(x − shift), unclamped."""
    from camopd_megatron.ops import KeptSoftmaxBuffer
    from camopd_megatron.ops.vocab_parallel import EXP_MIN, SAFE_SPREAD, spread_exceeds

    assert spread_exceeds(torch.tensor([[0.0, -SAFE_SPREAD - 1]])) and not spread_exceeds(torch.tensor([[0.0, -1.0]]))
    for scale, wide in ((60.0 / 4.0 / 0.7, True), (1.0, False)):
        case = make_case(13, 17, V=64, P=64)
        case["weight"] *= scale
        kb = KeptSoftmaxBuffer()
        h, w = case["hidden"].requires_grad_(True), case["weight"].requires_grad_(True)
        logp = fused_output_logprobs(h, w, case["targets"], None, vocab_size=64, vocab_block=16, kept_buffer=kb)
        tiles = kb._buf  # held by the graph until backward
        tiny = (tiles > 0) & (tiles <= EXP_MIN)
        assert not tiny.any()
        assert (tiles == 0).any() == wide  # underflowed elements are 0 exactly; none underflow when narrow
        logp.sum().backward()


def test_bf16_and_shapes_and_errors():
    case = make_case(4, 12, V=40, P=48)
    check(run_fused(case, None, 0, 1, dtype=torch.bfloat16, chunk=5), reference(case), tol=5e-2)
    for keep in (0, 2**28):  # several vocab blocks: dL/dh sums them in fp32
        check(run_fused(case, None, 0, 1, dtype=torch.bfloat16, chunk=5, keep=keep, vb=6), reference(case), tol=5e-2)
    with pytest.raises(ValueError, match="vocab_block"):
        fused_output_logprobs(case["hidden"], case["weight"], case["targets"], None, vocab_size=40, vocab_block=0)
    h3 = case["hidden"].view(3, 4, H)
    out = fused_output_logprobs(h3, case["weight"], case["targets"].view(3, 4), None, vocab_size=40)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="weight_shard"):
        fused_output_logprobs(case["hidden"], case["weight"][:, :5], case["targets"], None, vocab_size=40)
    with pytest.raises(ValueError, match="targets"):
        fused_output_logprobs(case["hidden"], case["weight"], case["targets"][:3], None, vocab_size=40)
    with pytest.raises(ValueError, match="targets: ids must lie"):
        fused_output_logprobs(case["hidden"], case["weight"], torch.full((12,), 45), None, vocab_size=40)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_output_logprobs(case["hidden"], case["weight"], case["targets"], None, vocab_size=49)
    # kept softmax chunks are consumed by the first backward: a second one says so instead of going wrong
    h = case["hidden"].clone().requires_grad_(True)
    out = fused_output_logprobs(h, case["weight"], case["targets"], None, vocab_size=40).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.backward()


def test_weight_gradient_goes_into_megatron_main_grad():
    """A DDP-style parameter (fp32 main_grad + grad_added_to_main_grad): dL/dW is ADDED to main_grad in
    place (over two micro-batches), the flag is set, and the returned gradient is a dummy the hook skips."""
    case = make_case(5, 13, V=30, P=32)
    ref = reference(case)
    w = case["weight"].clone().requires_grad_(True)
    w.main_grad = torch.full_like(w, 0.25)
    w.grad_added_to_main_grad = False
    for keep in (0, 2**28):  # row chunks of 4 adding in turn, then all rows from the kept tiles
        h = case["hidden"].clone().requires_grad_(True)
        logp = fused_output_logprobs(h, w, case["targets"], None, vocab_size=30, chunk_tokens=4, vocab_block=5,
                                     keep_softmax_bytes=keep)
        (logp * case["upstream"]).sum().backward()
        torch.testing.assert_close(h.grad.double(), ref["dh"], atol=1e-5, rtol=1e-5)
    assert w.grad_added_to_main_grad is True
    torch.testing.assert_close(w.main_grad.double(), 0.25 + 2 * ref["dw"], atol=1e-5, rtol=1e-5)


CASES = [  # (seed, tokens, V, P, temperature, offset): P divisible by 4; V = 35 leaves the 4th shard of 48 all padding
    (11, 17, 60, 64, 1.0, 0.0),
    (12, 9, 35, 48, 0.8, 0.0),
    (15, 7, 35, 48, 1.0, -3e4),  # all padding there, under a row max of about -3e4
    (13, 1, 64, 64, 1.0, 0.0),
    (14, 13, 60, 64, 1.0, 1e4),  # large logits
]


def _tp_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    groups2 = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group4 = dist.new_group([0, 1, 2, 3])
    out = {}
    for seed, n, V, P, temp, offset in CASES:
        case = make_case(seed, n, V, P, temperature=temp, offset=offset)
        out[(seed, 2)] = run_fused(case, groups2[rank // 2], rank % 2, 2, chunk=4, keep=0 if rank < 2 else 2**28,
                                   vb=5)  # 32 local columns: 7 blocks, the last 2 wide
        out[(seed, 4)] = run_fused(case, group4, rank, 4, keep=0)
        out[(seed, "4 kept")] = run_fused(case, group4, rank, 4, vb=5)  # kept tiles, also on the padding shard
    return out


def test_tp2_and_tp4_match_the_single_process_reference():
    per_rank = run_on_ranks(_tp_worker, 4, timeout_s=240, pg_timeout_s=60)
    for seed, n, V, P, temp, offset in CASES:
        ref = reference(make_case(seed, n, V, P, temperature=temp, offset=offset))
        for rank, res in enumerate(per_rank):
            for tp in (2, 4, "4 kept"):
                check(res[(seed, tp)], ref, tol=1e-5, offset=offset)


def test_output_layer_benchmark_smoke():
    """The benchmark's three paths agree (it raises otherwise) and it prints one row per mode."""
    from camopd_megatron.bench.output_layer import main

    table = main(["--quick", "--threads", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and "fwd+bwd" in rows[1]


def test_kept_buffer_is_reused_and_never_shared_by_two_live_forwards():
    """Consecutive forward/backward pairs reuse one buffer; a second forward while the first still awaits
    its backward gets its own memory (both backwards right); results equal those without the buffer."""
    from camopd_megatron.ops import KeptSoftmaxBuffer

    case = make_case(7, 21, V=50, P=64)
    ref = reference(case)
    kept = KeptSoftmaxBuffer()

    def forward():
        h = case["hidden"].clone().requires_grad_(True)
        logp = fused_output_logprobs(h, case["weight"], case["targets"], None, vocab_size=50, vocab_block=16,
                                     kept_buffer=kept)
        return h, (logp * case["upstream"]).sum()

    ptrs = []
    for _ in range(2):
        h, loss = forward()
        ptrs.append(kept._buf.data_ptr())
        loss.backward()
        torch.testing.assert_close(h.grad.double(), ref["dh"], atol=1e-5, rtol=1e-5)
    assert ptrs[0] == ptrs[1] and not kept._held
    h1, loss1 = forward()  # holds the buffer ...
    h2, loss2 = forward()  # ... so this one gets fresh memory
    assert kept._held
    loss2.backward()
    loss1.backward()
    del loss1, loss2
    assert not kept._held
    for h in (h1, h2):
        torch.testing.assert_close(h.grad.double(), ref["dh"], atol=1e-5, rtol=1e-5)
