"""Overlapped gradient reduce and parameter gather (``parallel.overlap_grad_reduce`` /
``overlap_param_gather``), gloo, DP = 2, the distributed optimizer.

Acceptance: the same parameters after N steps as with the overlap off, and evidence that the
overlapped path ran: megatron's bucket groups are instrumented (their own methods, wrapped to record
their own state and call through) so the test sees, from the second step on, every bucket's
reduce-scatter already in flight (dispatched by the backward hooks) when the step waits for it, and
parameter all-gathers in flight when a forward pre-hook waits for them. The training forward uses the
output window and the fused output projection, which read the output weight outside the output
layer's forward, and the last check runs the lean rollout decoder (every weight read directly) right
after an optimizer step: both must wait for the pending gathers.
"""
from __future__ import annotations

import torch

from camopd_megatron.config import ConfigError, config_from_dict
from camopd_megatron.testing.multiproc import run_on_ranks

STEPS = 3
BUCKET = 8_000  # parameters per bucket: the output weight (128 x 64) alone in the first, ~20 buckets in all
SEQ, VOCAB, ROWS = 16, 128, 4  # ROWS per DP rank, two micro-batches of two


def _batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + dp_rank)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    mask = torch.zeros(ROWS, SEQ)
    for r in range(ROWS):
        mask[r, 3 + r: SEQ - 1] = 1.0
    return tokens, mask


def _instrument(ddp) -> dict[str, list[bool]]:
    """Record, per call of a bucket group's finish_grad_sync / finish_param_sync, whether megatron's
    own async handle was in flight (dispatched earlier, not yet waited for)."""
    seen: dict[str, list[bool]] = {"grad": [], "param": []}
    for bg in ddp.bucket_groups:
        def finish_grad(*a, _bg=bg, _orig=bg.finish_grad_sync, **k):
            seen["grad"].append(_bg.grad_reduce_handle is not None)
            return _orig(*a, **k)

        def finish_param(*a, _bg=bg, _orig=bg.finish_param_sync, **k):
            seen["param"].append(_bg.param_gather_handle is not None)
            return _orig(*a, **k)

        bg.finish_grad_sync, bg.finish_param_sync = finish_grad, finish_param
    return seen


def _overlap_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from camopd_megatron.config.sections import ModelConfig, OptimConfig, ParallelConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, output_weight, unwrap_model
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.lean_decode import LeanDecoder
    from camopd_megatron.models.logprobs import next_token_logprobs
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer, optimizer_step, zero_grad_buffers
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                      vocab_size=VOCAB, seq_length=SEQ, init="random")
    # no clipping: the global norm sums per-shard squares in a bucket-dependent order (last-bit differences)
    optim = OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.01, clip_grad=0.0, lr_schedule="constant")
    out: dict = {}
    for overlap in (False, True):
        pgc = simple_pg_collection(1, 1, world_size)
        init_model_rng(1234, pgc)
        model = build_gpt_model(cfg, pgc)
        par = ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                             overlap_param_gather=overlap, bucket_size=BUCKET)
        (ddp,), opt, sched = build_ddp_and_optimizer([model], optim, par, pgc, total_steps=STEPS)
        seen = _instrument(ddp)
        dp_rank = dist.get_rank(pgc.dp)
        weight = output_weight(model)
        losses, per_step = [], []
        for step in range(STEPS):
            tokens, mask = _batch(step, dp_rank)
            n_global = sum(_batch(step, r)[1].sum() for r in range(world_size))

            def loss_fn(mb, hidden):
                logp = next_token_logprobs(hidden, mb["tokens"], pgc.tp, vocab_size=VOCAB, mask_BT=mb["mask"],
                                           first_position=mb["output_window"][0], output_weight=weight)
                loss = -(logp * mb["mask"]).sum() / n_global
                return loss, {"loss": loss.detach()}

            seen["grad"].clear(), seen["param"].clear()
            zero_grad_buffers([ddp], opt)
            ddp.train()
            outs = run_microbatches(ddp, pgc, make_microbatches({"tokens": tokens, "mask": mask}, 2), loss_fn,
                                    forward_only=False)
            ok, _, _ = optimizer_step(opt, sched)
            assert ok
            losses.append(float(sum(o["loss"] for o in outs)))
            per_step.append({k: list(v) for k, v in seen.items()})
        # right after the last step (gathers pending with the overlap): the lean decoder reads every weight
        seen["param"].clear()
        prompt = torch.arange(8).unsqueeze(0) % VOCAB
        lean = LeanDecoder(unwrap_model(ddp), 1, SEQ).logits(prompt, 0)
        out[overlap] = {
            "losses": losses, "lean": lean, "seen": per_step, "lean_param_waits": list(seen["param"]),
            "params": {n: p.detach().clone() for n, p in unwrap_model(ddp).named_parameters()},
            "buckets": len(ddp.bucket_groups),
            "hooks": sum(len(m._forward_pre_hooks) for m in unwrap_model(ddp).modules()),
        }
    return out


def test_overlap_matches_and_runs_overlapped():
    res = run_on_ranks(_overlap_worker, 2, timeout_s=600, pg_timeout_s=120)
    for r in res:
        off, on = r[False], r[True]
        assert on["buckets"] > 2 and off["buckets"] == 1  # overlap: megatron splits the buffer into buckets
        assert off["hooks"] == 0 and on["hooks"] > 0  # the forward pre-hooks exist only with the overlap
        assert on["losses"] == off["losses"]
        for name, p in off["params"].items():
            assert torch.equal(on["params"][name], p), name
        assert torch.equal(on["lean"], off["lean"])
        # evidence: from step 2 on (the first step records which gradients each bucket gets), every
        # bucket's reduce-scatter was dispatched during the backward and is in flight when the step waits
        for step in range(1, STEPS):
            grad = on["seen"][step]["grad"]
            assert grad and all(grad), (step, grad)
            # gathers of the previous update: dispatched one bucket ahead, waited for in the pre-hooks
            # (including the output layer's, run by the output window before the fused projection)
            param = on["seen"][step]["param"]
            assert len(param) >= on["buckets"] and any(param), (step, param)
        assert not any(any(s["grad"]) or s["param"] for s in off["seen"])  # synchronous path: no handles
        assert any(on["lean_param_waits"])  # the lean decoder waited for the last update's gathers


def test_overlap_param_gather_needs_distributed_optimizer():
    import pytest

    with pytest.raises(ConfigError, match="parallel.overlap_param_gather.*use_distributed_optimizer"):
        _config({"parallel": {"overlap_param_gather": True}})
    _config({"parallel": {"overlap_param_gather": True, "use_distributed_optimizer": True,
                                   "overlap_grad_reduce": True, "bucket_size": 1000}})
    with pytest.raises(ConfigError, match="parallel.bucket_size"):
        _config({"parallel": {"bucket_size": 0}})


def _config(d: dict):
    """A config from ``d`` on top of a random-init tiny student and teachers (random weights chosen explicitly)."""
    from camopd_megatron.testing.configs import random_init

    return config_from_dict(random_init(d))
