"""Rank functions for tests/test_optimizer.py and tests/test_cpu_compat.py (spawned by run_on_ranks).

Module-level and import-safe (dist_checkpointing's save spawns a Manager that re-imports __main__).
Tiny GPT: 2 layers, hidden 64, 4 heads, ffn 256, vocab 128, seq 16, fp32, CPU init (weights do
not depend on TP), built with ``camopd_megatron.models.gpt.build_gpt_model`` when it exists.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from camopd_megatron.config.sections import ModelConfig, OptimConfig, ParallelConfig
from camopd_megatron.models.groups import in_collection, pg_rank, pg_size, simple_pg_collection
from camopd_megatron.models.optimizer import BranchMoments, build_ddp_and_optimizer, optimizer_step, zero_grad_buffers
from camopd_megatron.models.optimizer_state import load_optimizer_state, optimizer_sharded_state_dict, shard_common_state

# after camopd_megatron, whose import prepares `import megatron.core` (no triton here)
from megatron.core import dist_checkpointing
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

logger = logging.getLogger(__name__)

SEQ = 16
VOCAB = 128
GLOBAL_BATCH = 4
MICRO_BATCH = 1


def tiny_model_cfg(tie: bool = False) -> ModelConfig:
    """The tiny student (vocab 128 = one pad multiple)."""
    return ModelConfig(init="random", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       vocab_size=VOCAB, seq_length=SEQ, tie_embeddings=tie)


def tiny_optim_cfg(**kw: Any) -> OptimConfig:
    base = dict(lr=1e-2, min_lr=0.0, weight_decay=0.01, clip_grad=1.0, lr_schedule="constant")
    base.update(kw)
    return OptimConfig(**base)


def build_model(pgc: Any, seed: int = 1234, *, tie: bool = False, pp: int = 1) -> torch.nn.Module:
    """GPTModel of the tiny config on the role's groups (the lead's builder when available)."""
    pp_rank, pp_size_ = pg_rank(pgc.pp), pg_size(pgc.pp)
    pre, post = pp_rank == 0, pp_rank == pp_size_ - 1
    try:
        from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    except ImportError:
        build_gpt_model = None
    if build_gpt_model is not None:
        init_model_rng(seed, pgc)
        torch.manual_seed(seed)
        return build_gpt_model(tiny_model_cfg(tie), pgc, params_dtype=torch.float32, pre_process=pre, post_process=post)
    return _build_model_direct(pgc, seed, tie=tie, pre=pre, post=post)


def _build_model_direct(pgc: Any, seed: int, *, tie: bool, pre: bool, post: bool) -> torch.nn.Module:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    model_parallel_cuda_manual_seed(seed, tp_rank=pg_rank(pgc.tp), ep_rank=0, etp_rank=0)
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        tensor_model_parallel_size=pg_size(pgc.tp), pipeline_model_parallel_size=pg_size(pgc.pp),
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, batch_p2p_sync=False,
    )
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=pre, post_process=post, share_embeddings_and_output_weights=tie,
                    position_embedding_type="rope", pg_collection=pgc)


def global_batch(step: int) -> torch.Tensor:
    """[GLOBAL_BATCH, SEQ+1] token ids, the same on every rank, different per step."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def loss_mask(step: int) -> torch.Tensor:
    """[GLOBAL_BATCH, SEQ] kept tokens (uneven per sequence, so DP halves have unequal counts)."""
    g = torch.Generator().manual_seed(2000 + step)
    m = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    m[0, :] = 1.0
    return m


def train_steps(ddp_chunks, optimizer, sched, pgc, steps: range,
                before_update: Optional[Callable[[int], None]] = None) -> tuple[list[float], list[float]]:
    """Run optimizer steps with megatron's schedule. Returns (losses, pre-clip grad norms); the loss
    of a step is the global mean over kept tokens (each rank's loss is divided by the GLOBAL kept
    count and DP reduction sums, so the grad norm is DP-independent too: Adam alone would hide a
    1/dp gradient scale). ``before_update(step)`` runs after the backward, before the update."""
    dp, dp_rank = pg_size(pgc.dp), pg_rank(pgc.dp)
    pp = pg_size(pgc.pp)
    per_dp = GLOBAL_BATCH // dp
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    losses, norms = [], []
    fb = get_forward_backward_func(pp_size=pp, vp_size=None)
    for step in steps:
        tokens_all, mask_all = global_batch(step), loss_mask(step)
        total_kept = mask_all.sum()
        local = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
        tokens, mask = tokens_all[local], mask_all[local]
        micro = [(tokens[i:i + MICRO_BATCH], mask[i:i + MICRO_BATCH]) for i in range(0, per_dp, MICRO_BATCH)]

        def forward_step(data_iter, model):
            tok, m = next(data_iter)
            inp, lab = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
            pos = torch.arange(SEQ).unsqueeze(0).expand_as(inp)
            out = model(inp, pos, causal, labels=lab)

            def loss_func(per_token):  # [b, s] CE
                loss = (per_token.float() * m).sum() / total_kept
                return loss, m.sum().to(torch.int), {"loss_sum": loss.detach()}

            return out, loss_func

        zero_grad_buffers(ddp_chunks, optimizer)
        kwargs = dict(forward_step_func=forward_step, data_iterator=iter(micro), model=ddp_chunks,
                      num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                      pg_collection=pgc)
        if pp > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pgc.pp, config=ddp_chunks[0].config)
        reports = fb(**kwargs)
        if before_update is not None:
            before_update(step)
        ok, grad_norm, _ = optimizer_step(optimizer, sched)
        assert ok
        norms.append(grad_norm)
        local_loss = torch.tensor(sum(float(r["loss_sum"]) for r in reports) if reports else 0.0)
        # global loss: sum over DP replicas (last stage holds it; broadcast over PP)
        dist.all_reduce(local_loss, group=pgc.dp)
        if pp > 1:
            last = dist.get_process_group_ranks(pgc.pp)[-1]
            dist.broadcast(local_loss, src=last, group=pgc.pp)
        losses.append(float(local_loss))
    return losses, norms


def _setup(tp: int, dp: int, distopt: bool, offset: int = 0, pp: int = 1, seed: int = 1234, tie: bool = False):
    pgc = simple_pg_collection(tp, pp, dp, offset)
    if not in_collection(pgc):
        return pgc, None, None, None
    model = build_model(pgc, seed, tie=tie, pp=pp)
    ddp, opt, sched = build_ddp_and_optimizer(
        [model], tiny_optim_cfg(), ParallelConfig(tp=tp, pp=pp, dp=dp, use_distributed_optimizer=distopt),
        pgc, total_steps=10,
    )
    return pgc, ddp, opt, sched


# ------------------------------------------------------------------------------------------------
# launched functions
# ------------------------------------------------------------------------------------------------
def layouts_loss_curves(rank: int, world_size: int, layouts: list[tuple[int, int, bool, int]], steps: int) -> dict:
    """Train ``steps`` steps for each (tp, dp, distopt, rank_offset) layout in turn. Every rank of
    the world builds every layout's groups; ranks outside the role only wait in the final world
    barrier, so a world-wide collective inside DDP/optimizer/schedule would hang (caught by the
    short process-group timeout). Returns {layout: ((losses, grad_norms), optimizer class)}."""
    out = {}
    for tp, dp, distopt, offset in layouts:
        pgc, ddp, opt, sched = _setup(tp, dp, distopt, offset)
        if ddp is not None:
            inner = [type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])]
            out[(tp, dp, distopt, offset)] = (train_steps(ddp, opt, sched, pgc, range(steps)), inner)
        dist.barrier()
    return out


def _model_sd(ddp, pgc) -> dict:
    return ddp[0].sharded_state_dict(metadata={"dp_cp_group": pgc.dp_cp})


def _state(ddp, opt, sched, pgc, moments: Optional[BranchMoments], *, is_loading: bool) -> dict:
    msd = _model_sd(ddp, pgc)
    return {"model": msd, "optimizer": optimizer_sharded_state_dict(opt, msd, is_loading=is_loading, pg_collection=pgc,
                                                                    moments=moments),
            "sched": shard_common_state(sched.state_dict(), key_prefix="sched", group=pgc.intra_dist_opt)}


def _save(ddp, opt, sched, pgc, path: str, moments: Optional[BranchMoments] = None) -> None:
    """Every rank of the world calls save; ranks outside the role pass {}."""
    dist_checkpointing.save({} if ddp is None else _state(ddp, opt, sched, pgc, moments, is_loading=False), path)


def _load(ddp, opt, sched, pgc, path: str, moments: Optional[BranchMoments] = None) -> None:
    template = _state(ddp, opt, sched, pgc, moments, is_loading=True)
    loaded = dist_checkpointing.load(template, path, process_group=pgc.intra_dist_opt)
    ddp[0].module.load_state_dict({k.removeprefix("module."): v for k, v in loaded["model"].items()})
    load_optimizer_state(opt, loaded["optimizer"], moments)
    sched.load_state_dict(loaded["sched"])


def resume_matches(rank: int, world_size: int, tp: int, dp: int, distopt: bool, offset: int,
                   ckpt_dir: str, steps: int = 3, extra: int = 3) -> Optional[dict]:
    """Role (tp, dp) at ``offset``: train steps+extra uninterrupted; separately train ``steps``,
    save (whole world), build fresh, load, train ``extra``. Returns both curves on role ranks."""
    pgc, ddp, opt, sched = _setup(tp, dp, distopt, offset)
    full = train_steps(ddp, opt, sched, pgc, range(steps + extra)) if ddp is not None else None
    pgc, ddp, opt, sched = _setup(tp, dp, distopt, offset)
    first = train_steps(ddp, opt, sched, pgc, range(steps)) if ddp is not None else None
    _save(ddp, opt, sched, pgc, ckpt_dir)
    dist.barrier()
    # fresh build from another seed: the load must overwrite everything
    pgc, ddp, opt, sched = _setup(tp, dp, distopt, offset, seed=99)
    if ddp is None:
        dist.barrier()
        return None
    _load(ddp, opt, sched, pgc, ckpt_dir)
    resumed = train_steps(ddp, opt, sched, pgc, range(steps, steps + extra))
    dist.barrier()
    return {"full": full, "first": first, "resumed": resumed, "opt": type(opt).__name__}


# ------------------------------------------------------------------------------------------------
# per-branch Adam moments (optim.branch_state: per_branch)
# ------------------------------------------------------------------------------------------------
PATTERN = ("general", "general", "general", "domain")


def _use_pattern(moments: Optional[BranchMoments]) -> Optional[Callable[[int], None]]:
    """The trainer's call before each update: the step's branch of G,G,G,D."""
    return None if moments is None else (lambda step: moments.use(PATTERN[step % len(PATTERN)]))


def branch_moments_curves(rank: int, world_size: int, layouts: list[tuple[int, int, bool]], steps: int) -> dict:
    """Per-branch moments, G,G,G,D: each (tp, dp, distopt) layout's (losses, grad norms); the shared
    state's curve on TP1×DP1; and, on TP1×DP1 plain, every step's parameters before the update and
    its gradients (for the hand-written AdamW of the test), the last parameters and each one's weight
    decay."""
    out: dict[Any, Any] = {}
    pgc, ddp, opt, sched = _setup(1, 1, False)
    if ddp is not None:
        out["shared"] = train_steps(ddp, opt, sched, pgc, range(steps))
    dist.barrier()
    for tp, dp, distopt in layouts:
        pgc, ddp, opt, sched = _setup(tp, dp, distopt)
        if ddp is None:
            dist.barrier()
            continue
        moments = BranchMoments(opt, ["general", "domain"])
        use = _use_pattern(moments)
        record = (tp, dp, distopt) == (1, 1, False)
        params = dict(ddp[0].module.named_parameters())
        trace: list[dict] = []

        def before_update(step: int) -> None:
            use(step)
            if record:
                trace.append({n: (p.detach().clone(), p.main_grad.detach().clone()) for n, p in params.items()})

        out[(tp, dp, distopt)] = train_steps(ddp, opt, sched, pgc, range(steps), before_update)
        if record:
            decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
            out["trace"] = {"steps": trace, "last": {n: p.detach().clone() for n, p in params.items()},
                            "weight_decay": {n: decay[id(p)] for n, p in params.items()},
                            "lr": opt.param_groups[0]["lr"]}
        dist.barrier()
    return out


def _build_with_moments(tp: int, dp: int, distopt: bool, seed: int = 1234):
    pgc, ddp, opt, sched = _setup(tp, dp, distopt, seed=seed)
    return pgc, ddp, opt, sched, (BranchMoments(opt, ["general", "domain"]) if ddp is not None else None)


def branch_moments_resume(rank: int, world_size: int, scenarios: list[tuple], ckpt_root: str,
                          steps: int = 4, extra: int = 5) -> dict:
    """For each scenario ``(name, save_layout, load_layouts)``, layouts ``(tp, dp, distopt)``: per-branch
    moments, G,G,G,D. Uninterrupted ``steps + extra`` steps at the save layout; separately ``steps``
    steps, save; then for each load layout a fresh build (other seed), load, ``extra`` steps.
    Returns {name: {"full": curve, "first": curve, load_layout: curve}} on rank 0."""
    import os

    out: dict[str, dict] = {}
    for name, save_layout, load_layouts in scenarios:
        path = os.path.join(ckpt_root, name)
        if rank == 0:
            os.makedirs(path)
        dist.barrier()
        res: dict[Any, Any] = {}
        pgc, ddp, opt, sched, moments = _build_with_moments(*save_layout)
        if ddp is not None:
            res["full"] = train_steps(ddp, opt, sched, pgc, range(steps + extra), _use_pattern(moments))
        pgc, ddp, opt, sched, moments = _build_with_moments(*save_layout)
        if ddp is not None:
            res["first"] = train_steps(ddp, opt, sched, pgc, range(steps), _use_pattern(moments))
        _save(ddp, opt, sched, pgc, path, moments)
        dist.barrier()
        for layout in load_layouts:
            pgc, ddp, opt, sched, moments = _build_with_moments(*layout, seed=99)
            if ddp is not None:
                _load(ddp, opt, sched, pgc, path, moments)
                res[layout] = train_steps(ddp, opt, sched, pgc, range(steps, steps + extra), _use_pattern(moments))
            dist.barrier()
        out[name] = res
    return out if rank == 0 else {}
