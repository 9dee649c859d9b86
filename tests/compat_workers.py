"""Rank function for tests/test_cpu_compat.py: each compat patch on the real upstream path it exists for.

One 2-rank launch runs every check; the result maps patch name -> a dict of observations that the
test asserts on (a check that raises fails the whole launch with the rank's traceback).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from camopd_megatron.compat import applied_patches
from camopd_megatron.compat.imports import PAGED_STASH_MODULE
from camopd_megatron.compat.logs import GPT_DEPRECATION, GPT_MODEL_LOGGER
from camopd_megatron.models.groups import pg_rank, simple_pg_collection
from tests import optim_workers as W

# after camopd_megatron, whose import prepares `import megatron.core` (no triton here)
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed


def _rng_tracker(tp_rank: int) -> dict:
    """Seeding, fork() and dropout inside the fork draw from the CPU generator, reproducibly, and
    leave the default CPU stream untouched."""
    model_parallel_cuda_manual_seed(123, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)
    before = torch.get_rng_state()
    x = torch.ones(64)
    with get_cuda_rng_tracker().fork():
        a = torch.nn.functional.dropout(x, 0.5, training=True)
    outside_unchanged = torch.equal(before, torch.get_rng_state())
    with get_cuda_rng_tracker().fork():
        b = torch.nn.functional.dropout(x, 0.5, training=True)
    model_parallel_cuda_manual_seed(123, tp_rank=tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        a2 = torch.nn.functional.dropout(x, 0.5, training=True)
    return {"outside_unchanged": outside_unchanged, "advances": not torch.equal(a, b),
            "reproducible": torch.equal(a, a2), "dropped": int((a == 0).sum())}


def _device_factories(pgc: Any) -> dict:
    """Attention forward (GlobalMemoryBuffer, utils.py) and ColumnParallelLinear(gather_output=True)
    (mappings.py gather buffer on torch.cuda.current_device()) at TP=2."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    model = W.build_model(pgc)
    tok = W.global_batch(0)[:2, :-1]
    pos = torch.arange(W.SEQ).unsqueeze(0).expand_as(tok)
    causal = torch.triu(torch.ones(1, 1, W.SEQ, W.SEQ, dtype=torch.bool), diagonal=1)
    logits = model(tok, pos, causal)
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                            tensor_model_parallel_size=2)
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                               gather_output=True, keep_master_weight_for_test=True, tp_group=pgc.tp)
    x = torch.randn(3, 8)
    out, _ = col(x)
    ref = x @ col.master_weight.t()
    return {"logits_shape": tuple(logits.shape), "finite": bool(torch.isfinite(logits).all()),
            "gather_ok": torch.allclose(out, ref, atol=1e-6), "gather_shape": tuple(out.shape)}


def _pipeline_and_tied(pgc_pp: Any) -> dict:
    """PP=2 with tied embeddings: construction runs setup_embeddings_and_output_layer
    (``weight.data.cuda()``), the 1F1B schedule allocates ``torch.zeros([], device="cuda")`` and P2P
    buffers on ``current_device()``; finalize all-reduces the tied embedding grad over embd."""
    model = W.build_model(pgc_pp, tie=True, pp=2)
    ddp, opt, sched = W.build_ddp_and_optimizer(
        [model], W.tiny_optim_cfg(), W.ParallelConfig(pp=2), pgc_pp, total_steps=2)
    (losses, norms) = W.train_steps(ddp, opt, sched, pgc_pp, range(2))
    emb = model.embedding.word_embeddings.weight if model.pre_process else model.output_layer.weight
    return {"losses": losses, "tied_weight_norm": float(emb.detach().norm())}


def _ddp_and_clip(pgc: Any) -> dict:
    """DP=2: DDP start_grad_sync (torch.cuda.current_stream, all-reduce path), the optimizer's
    device='cuda' flags, clip_grad_by_total_norm_fp32's ``.type()`` check (clip_grad > 0 and a
    direct call). The distopt param-group type check runs in :func:`_distopt_checkpoint`."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    model = W.build_model(pgc)
    ddp, opt, sched = W.build_ddp_and_optimizer(
        [model], W.tiny_optim_cfg(clip_grad=1e-3), W.ParallelConfig(dp=2), pgc, total_steps=2)
    losses, norms = W.train_steps(ddp, opt, sched, pgc, range(1))
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    return {"optimizer": [type(o).__name__ for o in opt.chained_optimizers], "grad_norm": norms[0],
            "clipped": p.grad.tolist(), "main_grad_synced": _dp_equal(ddp[0], pgc)}


def _dp_equal(ddp: Any, pgc: Any) -> bool:
    """After the step's grad sync every DP rank holds the same reduced grad buffer."""
    buf = torch.cat([b.grad_data for b in ddp.buffers]).clone()
    other = buf.clone()
    dist.broadcast(other, src=dist.get_process_group_ranks(pgc.dp)[0], group=pgc.dp)
    return torch.equal(buf, other)


def _distopt_checkpoint(pgc: Any, ckpt_dir: str) -> dict:
    """dist_checkpointing save/load (CUDA flags in state_dict_saver/exchange_utils), the DP gather of
    the fully_reshardable format (``send_tensor.cuda()``) and the four DistributedOptimizer +
    torch-Adam fixes, each shown against the unwrapped upstream function."""
    model = W.build_model(pgc)
    ddp, opt, sched = W.build_ddp_and_optimizer(
        [model], W.tiny_optim_cfg(), W.ParallelConfig(dp=2, use_distributed_optimizer=True), pgc, total_steps=3)
    dopt = opt.chained_optimizers[0]
    cls = type(dopt)
    out: dict[str, Any] = {"optimizer": cls.__name__}  # built through the param-group type check
    # fix 1: fresh optimizer -> upstream asserts, patched reports step 0
    try:
        cls.state_dict.__wrapped__(dopt)
        out["fresh_upstream_fails"] = False
    except AssertionError:
        out["fresh_upstream_fails"] = True
    out["fresh_step"] = [g["step"] for g in dopt.state_dict()["optimizer"]["param_groups"]]
    W.train_steps(ddp, opt, sched, pgc, range(2))
    # the DP gather as the fully_reshardable save runs it (Adam state exists now): upstream moves
    # its buffers with .cuda() on every rank, before any collective
    try:
        cls.get_parameter_state_dp_zero.__wrapped__(dopt, use_gloo_comm=False, return_on_all_ranks=True)
        out["dp_zero_upstream_fails"] = False
    except (AssertionError, RuntimeError) as e:
        out["dp_zero_upstream_fails"] = "CUDA" in str(e)
    W._save(ddp, opt, sched, pgc, ckpt_dir)
    out["files"] = sorted(os.listdir(ckpt_dir))
    model2 = W.build_model(pgc, seed=7)
    ddp2, opt2, sched2 = W.build_ddp_and_optimizer(
        [model2], W.tiny_optim_cfg(), W.ParallelConfig(dp=2, use_distributed_optimizer=True), pgc, total_steps=3)
    W._load(ddp2, opt2, sched2, pgc, ckpt_dir)
    steps = [s["step"] for s in opt2.chained_optimizers[0].optimizer.state.values()]
    # fix 3: one step tensor per param, all at the saved value
    out["steps"] = sorted({float(s) for s in steps})
    out["steps_unshared"] = len({id(s) for s in steps}) == len(steps)
    # fixes 4 and 2: the upstream setter with a loaded dict (no 'step') copies into the fp32
    # main-param view outside no_grad (RuntimeError), and under no_grad raises KeyError 'step'
    d2 = opt2.chained_optimizers[0]
    param = next(iter(d2.model_param_group_index_map))
    tensors = {k: v.clone() for k, v in d2._get_main_param_and_optimizer_states(param).items() if k != "step"}
    upstream = type(d2)._set_main_param_and_optimizer_states.__wrapped__
    try:
        upstream(d2, param, tensors)
        out["set_upstream_grad_fails"] = False
    except RuntimeError as e:
        out["set_upstream_grad_fails"] = "in-place" in str(e)
    try:
        with torch.no_grad():
            upstream(d2, param, tensors)
        out["set_upstream_fails"] = False
    except KeyError:
        out["set_upstream_fails"] = True
    d2._set_main_param_and_optimizer_states(param, tensors)
    same = all(torch.equal(p1, p2) for p1, p2 in zip(model.parameters(), model2.parameters()))
    out["params_restored"] = same
    return out


def _deprecation_once(pgc: Any) -> dict:
    """megatron logs the GPTModel deprecation on every build (on global rank 0); with the filter
    once per process (models were built before this check, so no more now)."""
    log = logging.getLogger(GPT_MODEL_LOGGER)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(handler)
    ours = list(log.filters)
    try:
        for f in ours:
            log.removeFilter(f)
        for _ in range(2):
            W.build_model(pgc)
        upstream = sum(GPT_DEPRECATION in m for m in records)
        for f in ours:
            log.addFilter(f)
        records.clear()
        for _ in range(2):
            W.build_model(pgc)
        patched = sum(GPT_DEPRECATION in m for m in records)
    finally:
        log.removeHandler(handler)
        for f in ours:
            if f not in log.filters:
                log.addFilter(f)
    return {"upstream": upstream, "patched": patched}


def _role_local_param_groups(rank: int, world_size: int) -> dict:
    """One-rank roles: only rank 0 builds an optimizer (megatron's param-group alignment would
    gather over the whole world and wait for rank 1); megatron's module torch is restored after."""
    import megatron.core.optimizer as mcore_optimizer

    solo = [simple_pg_collection(1, 1, 1, rank_offset=r) for r in range(world_size)][rank]
    built = None
    if rank == 0:
        model = W.build_model(solo)
        _, opt, _ = W.build_ddp_and_optimizer([model], W.tiny_optim_cfg(), W.ParallelConfig(), solo, total_steps=1)
        built = type(opt).__name__
    dist.barrier()
    return {"built": built, "torch_restored": mcore_optimizer.torch is torch}


def _moe_dispatchers(world_size: int) -> dict:
    """An MoE layer at EP = 2 through both token dispatchers: the router's device moves
    (``router.py``) and the all-to-all dispatcher's streams and split sizes (``token_dispatcher.py``)."""
    from camopd_megatron.config.moe import MoEConfig
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.testing.configs import TINY_MOE

    out: dict[str, Any] = {}
    for dispatcher in ("alltoall", "allgather"):
        cfg = ModelConfig(init="random", num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                          vocab_size=W.VOCAB, seq_length=W.SEQ,
                          moe=MoEConfig(**TINY_MOE, token_dispatcher=dispatcher))
        pgc = simple_pg_collection(1, 1, world_size, ep=world_size)
        init_model_rng(5, pgc)
        model = build_gpt_model(cfg, pgc)
        tok = W.global_batch(dist.get_rank())[:2, :-1]
        logits = model(tok, torch.arange(W.SEQ).unsqueeze(0).expand_as(tok), None)
        logits.float().pow(2).mean().backward()
        router = model.decoder.layers[0].mlp.router.weight
        out[dispatcher] = {"finite": bool(torch.isfinite(logits).all()), "router_grad": bool(router.grad.abs().sum() > 0),
                           "device": str(router.device)}
    return out


def cpu_compat_paths(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """Run every patched path on 2 ranks; returns {patch name: observations}."""
    out: dict[str, Any] = {"applied": list(applied_patches())}
    import megatron.core  # noqa: F401  (the stub let it import)

    stub = sys.modules[PAGED_STASH_MODULE]
    try:
        stub.paged_stash_copy_kernel()
        out["paged_stash_stub"] = {"raises": False}
    except RuntimeError:
        out["paged_stash_stub"] = {"raises": True, "is_stub": "camopd" in (stub.__doc__ or "")}
    tp2 = simple_pg_collection(2, 1, 1)
    dp2 = simple_pg_collection(1, 1, 2)
    pp2 = simple_pg_collection(1, 2, 1)
    out["rng_tracker_on_cpu_generator"] = _rng_tracker(pg_rank(tp2.tp))
    out["device_factories_model"] = _device_factories(tp2)
    out["pipeline_schedules"] = out["tied_embedding_tensor_cuda"] = _pipeline_and_tied(pp2)
    out["ddp_and_optimizer_devices"] = out["cuda_type_checks"] = _ddp_and_clip(dp2)
    out["dist_checkpointing_devices"] = out["distopt_torch_adam_checkpoint"] = out["distopt_dp_zero_gather_cuda"] = (
        _distopt_checkpoint(dp2, ckpt_dir))
    out["gpt_model_deprecation_logged_once"] = _deprecation_once(dp2)
    out["param_groups_aligned_over"] = _role_local_param_groups(rank, world_size)
    out["moe_cuda_devices"] = _moe_dispatchers(world_size)
    dist.barrier()
    return out
