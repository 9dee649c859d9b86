"""Lock-step of forward passes across DP replicas (``models.pipeline``, "Lock-step"), forced on a dense model.

An expert-parallel MoE layer's all-to-all spans DP replicas, so under lock-step every replica runs the
same number of forwards; a dense model at DP = 2 shows it without the MoE machinery: the replicas get
unequal numbers of prompts, response lengths (context limits), scored rows and kept samples. Checked:
every rank counts the same GPTModel forwards (and the run without lock-step does not, so the test can
fail), and the tokens, μ, log-probs, losses, gradients and updated parameters equal those of the run
without it. Then the same with an MoE model at EP = 1 (it may run without lock-step): the dummies add
no router aux / z-loss and leave the aux gradient's scale alone.
"""
from __future__ import annotations

import torch

from camopd_megatron.testing.multiproc import run_on_ranks

VOCAB, SEQ = 96, 24
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
             seq_length=SEQ, init="random")
MOE = dict(num_experts=4, router_topk=2, ffn_hidden_size=32, aux_loss_coeff=0.01, z_loss_coeff=0.001)


def _prompts(dp_rank: int) -> list[list[int]]:
    """Rank 0: three prompts of 20, 21 and 5 tokens (responses of 4, 3 and 12 tokens: the context and
    ``max_new_tokens`` limits), decoded in two micro-batches of 2; rank 1: one of 15 (9 tokens), one
    micro-batch that ends before rank 0's first."""
    lengths = (20, 21, 5) if dp_rank == 0 else (15,)
    return [[(7 * i + j) % VOCAB + 1 for j in range(n)] for i, n in enumerate(lengths)]


def _counting(model) -> list[int]:
    """Count the GPTModel forwards of ``model`` (a pre-hook on the bare module)."""
    from camopd_megatron.models.gpt import unwrap_model

    calls = [0]
    unwrap_model(model).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _worker(rank: int, world_size: int) -> dict:
    """The checks on the dense model, then on an MoE one (EP = 1, so it may run without lock-step too:
    the dummies must add no router aux loss and leave its gradient scale alone)."""
    return {"dense": _checks(MODEL, world_size), "moe": _checks({**MODEL, "moe": MOE}, world_size)}


def _checks(model_cfg: dict, world_size: int) -> dict:
    import torch.distributed as dist

    from camopd_megatron.config.moe import MoEConfig
    from camopd_megatron.config.sections import ModelConfig, OptimConfig, ParallelConfig
    from camopd_megatron.distill.losses import LossOptions
    from camopd_megatron.distill.rollout import SamplingParams
    from camopd_megatron.distill.selection import SelectionPolicy, SelectionResult
    from camopd_megatron.distill.step import GapSource, StepSettings, StudentState, rollout, student_logprobs, train_on_selection
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, unwrap_model
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer, optimizer_step
    from camopd_megatron.models.scoring import score_logprobs

    pgc = simple_pg_collection(1, 1, world_size)
    dp_rank = dist.get_rank(pgc.dp)
    policy = SelectionPolicy(enabled=True, rho={"general": 1.0}, score={"general": "abs"}, adv_scale={"general": 1.0})
    prompts = _prompts(dp_rank)
    ids = list(range(3)) if dp_rank == 0 else [3]
    out: dict = {}
    for lock in (False, True):  # the same initial weights and a fresh optimizer for each
        init_model_rng(11, pgc)
        moe = model_cfg.get("moe")
        model = build_gpt_model(ModelConfig(**{**model_cfg, "moe": MoEConfig(**moe) if moe else None}), pgc)
        optim = OptimConfig(lr=1e-2, min_lr=0.0, clip_grad=0.0, lr_schedule="constant")
        (ddp,), opt, sched = build_ddp_and_optimizer([model], optim, ParallelConfig(), pgc, total_steps=2)
        calls = _counting(ddp)
        student = StudentState(ddp_model=ddp, ddp_chunks=[ddp], optimizer=opt, lr_scheduler=sched, pg_collection=pgc,
                               role_group=dist.group.WORLD, vocab_size=VOCAB, max_seq_len=SEQ)
        res: dict = {"forwards": {}}
        for kv in (True, False):
            settings = StepSettings(sampling=SamplingParams(max_new_tokens=12, eos_token_id=None), policy=policy,
                                    loss_options=LossOptions(), seed=3, micro_batch_size=1, rollout_micro_batch_size=2,
                                    use_kv_cache=kv, timeout_s=60.0, lock_step=lock)
            calls[0] = 0
            batch = rollout(student, prompts, ids, settings, step=0, seed=3)
            res["forwards"][f"rollout_kv{kv}"] = calls[0]
            res[f"tokens_kv{kv}"], res[f"mu_kv{kv}"] = batch.tokens_BT, batch.rollout_logp_BT
            res[f"lens_kv{kv}"] = batch.response_lens_B.tolist()
        # a replica with no prompts at all: its rollout is all dummies
        calls[0] = 0
        empty = rollout(student, prompts if dp_rank == 0 else [], ids if dp_rank == 0 else [], settings, step=1, seed=3)
        res["forwards"]["rollout_one_empty"] = calls[0]
        res["empty_rows"] = len(empty)
        # scoring: unequal rows (micro-batches of 1: 3 vs 1), and a replica with none
        calls[0] = 0
        res["logp"] = student_logprobs(student, batch, settings, 1.0)
        res["forwards"]["recompute"] = calls[0]
        calls[0] = 0
        rows = batch.tokens_BT if dp_rank == 0 else batch.tokens_BT[:0]
        res["logp_none"] = score_logprobs(unwrap_model(ddp), pgc, rows, batch.loss_mask_BT[: rows.shape[0]],
                                          micro_batch=1, vocab_size=VOCAB, timeout_s=60.0,
                                          lock_step=pgc.dp if lock else None)
        res["forwards"]["score_one_empty"] = calls[0]
        # training: rank 0 keeps 3 samples, rank 1 keeps 1 (micro-batches of 1)
        n = len(batch)
        sel = SelectionResult.keep_all(torch.ones(n), {"general": 4})
        teacher = batch.rollout_logp_BT + 0.25 * batch.loss_mask_BT  # a fixed "teacher": real gaps
        calls[0] = 0
        sums, _ = train_on_selection(student, batch, teacher, sel, settings, GapSource.ROLLOUT,
                                     teacher - batch.rollout_logp_BT)
        res["forwards"]["train"] = calls[0]
        res["loss"] = sums.get("loss_sum")
        res["grads"] = {n: p.main_grad.detach().clone() for n, p in unwrap_model(ddp).named_parameters()}
        ok, _, _ = optimizer_step(opt, sched)
        assert ok
        res["params"] = {n: p.detach().clone() for n, p in unwrap_model(ddp).named_parameters()}
        out[lock] = res
    return out


def test_lock_step_equal_forward_counts_and_unchanged_results():
    both = run_on_ranks(_worker, 2, timeout_s=400, pg_timeout_s=60)
    for kind in ("dense", "moe"):
        _check([r[kind] for r in both])


def _check(ranks: list[dict]) -> None:
    free = [r[False]["forwards"] for r in ranks]
    locked = [r[True]["forwards"] for r in ranks]
    assert locked[0] == locked[1], locked  # every pass counted the same on both replicas
    for key in ("rollout_kvFalse", "rollout_one_empty", "recompute", "score_one_empty", "train"):
        assert free[0][key] != free[1][key], (key, free)  # ... which they do not without lock-step
    assert [r[True]["lens_kvTrue"] for r in ranks] == [[4, 3, 12], [9]]  # unequal response lengths
    assert ranks[1][True]["empty_rows"] == 0
    for r in ranks:
        a, b = r[False], r[True]
        for kv in (True, False):
            assert torch.equal(a[f"tokens_kv{kv}"], b[f"tokens_kv{kv}"])
            # without lock-step a TP = 1 replica decodes with the lean decoder: the same tokens, μ to rounding
            tol = 1e-5 if kv else 0.0
            torch.testing.assert_close(a[f"mu_kv{kv}"], b[f"mu_kv{kv}"], rtol=0, atol=tol)
        assert torch.equal(a["logp"], b["logp"]) and torch.equal(a["logp_none"], b["logp_none"])
        assert a["loss"] == b["loss"]
        for name, g in a["grads"].items():
            assert torch.equal(g, b["grads"][name]), name  # dummies add exactly zero
        for name, p in a["params"].items():
            assert torch.equal(p, b["params"][name]), name
