"""Rank functions for tests/test_moe.py (spawned by run_on_ranks): a tiny MoE student under expert,
tensor, sequence and pipeline parallelism, its aux-loss gradient, and checkpoints resharded across EP and PP.

Layouts are compared parameter by parameter under *global* names: a pipeline stage's local layer i is
layer ``layer_number - 1``, EP rank r's local expert j is expert ``r * local + j``. A layout under test
gets the reference layout's weights copied in by those names (the CPU initialisation draws experts and
stages in layout-dependent order), then runs the same global batch: 8 rows split contiguously over the
DP ranks, 2 rows per micro-batch, so every layout sees the same micro-batches.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from camopd_megatron.config.moe import MoEConfig
from camopd_megatron.config.sections import ModelConfig, OptimConfig, ParallelConfig
from camopd_megatron.models.groups import pg_rank, pg_size, simple_pg_collection
from camopd_megatron.models.moe import RoutingStats
from camopd_megatron.testing.configs import TINY_MOE

SEED = 4321
VOCAB = 96
SEQ = 12
ROWS = 8
MICRO = 2


def model_cfg(num_layers: int = 2, **moe: Any) -> ModelConfig:
    return ModelConfig(init="random", num_layers=num_layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                       vocab_size=VOCAB, vocab_pad_multiple=32, seq_length=SEQ, moe=MoEConfig(**{**TINY_MOE, **moe}))


def global_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(11))


def global_names(model: torch.nn.Module, pgc: Any) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under their layout-independent names (module docstring)."""
    local = model.config.num_moe_experts // pg_size(pgc.ep)
    ep_rank = pg_rank(pgc.ep)
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            rest = m[2]
            e = re.match(r"mlp\.experts\.local_experts\.(\d+)\.(.*)", rest)
            if e:
                rest = f"mlp.experts.local_experts.{ep_rank * local + int(e[1])}.{e[2]}"
            name = f"decoder.layers.{model.decoder.layers[int(m[1])].layer_number - 1}.{rest}"
        out[name] = p
    return out


def _loss_fn(pgc: Any, n_tokens: int, main: bool = True):
    from camopd_megatron.models.logprobs import next_token_logprobs

    def loss_fn(batch: dict, logits: torch.Tensor):
        logp = next_token_logprobs(logits, batch["tokens"], pgc.tp, vocab_size=VOCAB)
        loss = -logp[:, :-1].sum() / n_tokens
        if not main:  # the router's aux loss alone: the distillation-side loss contributes no gradient
            loss = loss * 0.0
        return loss, {"loss": float(loss.detach())}

    return loss_fn


def run_layout(tp: int, pp: int, dp: int, ep: int, *, cfg: ModelConfig, src: Optional[dict[str, torch.Tensor]] = None,
               rank_offset: int = 0, tokens: Optional[torch.Tensor] = None, repeat: int = 1, main: bool = True,
               seed: int = SEED, keep: bool = False, stats: bool = False, distopt: bool = False,
               extra: Optional[dict[str, torch.Tensor]] = None, batches: Optional[list[dict]] = None,
               config_extra: Optional[dict] = None) -> Optional[dict]:
    """Build the layout (collective over the world), copy ``src`` in by global name, one forward/backward of
    this DP rank's rows (``repeat`` copies of each micro-batch; ``extra``: more per-row tensors of the global
    batch, split like the tokens; ``batches``: these micro-batches instead). Returns loss (this rank's share),
    the finalised gradients and the weights by (global name, TP rank); None on ranks outside the layout."""
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import in_collection
    from camopd_megatron.models.optimizer import build_ddp_and_optimizer, zero_grad_buffers
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches

    pgc = simple_pg_collection(tp, pp, dp, rank_offset, ep=ep)
    if not in_collection(pgc):
        return None
    init_model_rng(seed, pgc)
    model = build_gpt_model(cfg, pgc, sequence_parallel=tp > 1, config_extra=config_extra)
    tp_rank = pg_rank(pgc.tp)
    if src is not None:
        with torch.no_grad():
            for name, p in global_names(model, pgc).items():
                p.copy_(src[(name, tp_rank)])
    ddp, opt, sched = build_ddp_and_optimizer([model], OptimConfig(lr=1e-2, clip_grad=0.0), ParallelConfig(tp=tp, pp=pp, dp=dp, use_distributed_optimizer=distopt),
                                              pgc, total_steps=2)
    tokens = global_tokens() if tokens is None else tokens
    rows = tokens.shape[0] // dp
    lo = pg_rank(pgc.dp) * rows
    mine = {"tokens": tokens[lo:lo + rows], **{k: v[lo:lo + rows] for k, v in (extra or {}).items()}}
    if batches is None:
        batches = [b for b in make_microbatches(mine, MICRO) for _ in range(repeat)]
    zero_grad_buffers(ddp, opt)
    routing = RoutingStats.of(model)  # also sizes megatron's process-wide aux-loss tracker for this depth
    if not stats:
        routing = None
    outs = run_microbatches(ddp[0], pgc, batches, _loss_fn(pgc, tokens.shape[0] * (SEQ - 1) * repeat, main),
                            forward_only=False)
    loss = sum(o["loss"] for o in outs) if tp_rank == 0 else 0.0
    named = global_names(model, pgc)
    out = {"loss": loss, "grads": {(n, tp_rank): p.main_grad.detach().clone() for n, p in named.items()},
           "params": {(n, tp_rank): p.detach().clone() for n, p in named.items()}}
    if routing is not None:
        out["moe_metrics"] = routing.metrics(pgc.intra_dist_opt, pgc.tp)
    if keep:
        out.update(model=model, ddp=ddp, opt=opt, sched=sched, pgc=pgc)
    return out


def _merged(part: Optional[dict], key: str) -> dict:
    """Every rank's ``part[key]`` merged (DP replicas hold equal copies after the gradient reduction)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if part is None else part[key])
    out: dict = {}
    for g in gathered:
        out.update(g or {})
    return out


def _loss(part: Optional[dict]) -> float:
    t = torch.tensor([0.0 if part is None else part["loss"]], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _compare(ref: Optional[dict], test: Optional[dict]) -> dict:
    ref_g, test_g = _merged(ref, "grads"), _merged(test, "grads")
    common = sorted(set(ref_g) & set(test_g))
    worst = max(float((ref_g[k] - test_g[k]).abs().max()) for k in common)
    scale = max(float(ref_g[k].abs().max()) for k in common)
    return {"loss": (_loss(ref), _loss(test)), "grad_max_diff": worst, "grad_scale": scale, "compared": len(common),
            "missing": sorted({k[0] for k in set(ref_g) ^ set(test_g)}),
            "router_grad": float(sum(v.abs().sum() for k, v in test_g.items() if "router" in k[0]))}


def parallel_equivalence(rank: int, world_size: int) -> dict:
    """World 4: EP = 2 vs EP = 1 (DP 4); TP = 2 x EP = 2 with SP vs TP = 2 x EP = 1; PP = 2 x EP = 2 with a dense
    and an MoE stage vs the one-stage model."""
    out = {}
    cfg = model_cfg()
    ref = run_layout(1, 1, 4, 1, cfg=cfg)
    out["ep2"] = _compare(ref, run_layout(1, 1, 4, 2, cfg=cfg, src=ref["params"]))
    ref_tp = run_layout(2, 1, 2, 1, cfg=cfg)
    out["tp2_ep2_sp"] = _compare(ref_tp, run_layout(2, 1, 2, 2, cfg=cfg, src=ref_tp["params"]))
    cfg4 = model_cfg(num_layers=4, layer_pattern=[0, 1, 1, 0])
    ref_pp = run_layout(1, 1, 4, 1, cfg=cfg4)
    out["pp2_ep2"] = _compare(ref_pp, run_layout(1, 2, 2, 2, cfg=cfg4, src=ref_pp["params"]))
    out.update(replay_under_recompute(ref_pp["params"]))
    dist.barrier()
    return out


def replay_under_recompute(src: dict) -> dict:
    """World 4, PP = 2 x EP = 2 (DP 2), two micro-batches per replica (1F1B runs the second forward before the
    first backward), routing replay of fixed expert choices: full recompute (which runs each layer's forward
    again in the backward) gives the gradients of no recompute, and the replayed choices are not the router's."""
    from camopd_megatron.models.gpt import recompute_kwargs

    cfg = model_cfg(num_layers=4, layer_pattern=[0, 1, 1, 0], routing_replay=True)
    gen = torch.Generator().manual_seed(5)
    # [rows, positions, this stage's MoE layers (one per stage), top-k]: k distinct experts per token
    routes = torch.rand(ROWS, SEQ, 1, cfg.moe.num_experts, generator=gen).argsort(dim=-1)[..., :cfg.moe.router_topk]
    extra = {"routes": routes, "seq_lens": torch.full((ROWS,), SEQ + 1)}  # every position trains: no padding
    full = recompute_kwargs(replace(cfg, recompute="full", recompute_num_layers=1))
    plain = run_layout(1, 2, 2, 2, cfg=cfg, src=src, extra=extra, stats=True)
    recomputed = run_layout(1, 2, 2, 2, cfg=cfg, src=src, extra=extra, config_extra=full)
    routed = run_layout(1, 2, 2, 2, cfg=cfg, src=src, extra={"seq_lens": extra["seq_lens"]}, keep=True)
    metrics = _merged({"m": plain["moe_metrics"]} if plain is not None else None, "m")
    return {"replay_recompute": _compare(plain, recomputed), "replay_vs_routed": _compare(plain, routed),
            "replay_metrics": metrics, "pp_record": _record_per_stage(routed)}


def _record_per_stage(part: dict) -> list[dict]:
    """PP = 2 x EP = 2, lock-step KV-cached rollout of unequal prompts per replica: each stage records its own MoE
    layer's choices, which are the experts a forward of the decoded tokens routes to (positions a loss reads).
    Every rank's result."""
    from megatron.core.transformer.moe.router import TopKRouter

    from camopd_megatron.distill.rollout import SamplingParams, generate
    from camopd_megatron.models.scoring import score_logprobs

    model, pgc = part["model"], part["pgc"]
    dp = pg_rank(pgc.dp)
    prompts = [[(3 * i + j) % (VOCAB - 1) + 1 for j in range(3 + 2 * i + dp)] for i in range(2 + dp)]
    batch = generate(model, pgc, prompts, SamplingParams(max_new_tokens=5), sample_ids=list(range(len(prompts))),
                     seed=1, step=0, vocab_size=VOCAB, max_seq_len=SEQ, micro_batch_size=2, timeout_s=60.0,
                     lock_step=pgc.dp)
    (router,) = [m for m in model.modules() if isinstance(m, TopKRouter)]  # one MoE layer per stage
    maps: list[torch.Tensor] = []
    hook = router.register_forward_hook(lambda m, i, o: maps.append(o[1].detach().clone()))
    try:  # one micro-batch of every row (the other replica's extra forwards are lock-step dummies, after it)
        score_logprobs(model, pgc, batch.tokens_BT, batch.loss_mask_BT, micro_batch=len(prompts), vocab_size=VOCAB,
                       lock_step=pgc.dp, timeout_s=60.0)
    finally:
        hook.remove()
    b, t = batch.tokens_BT.shape
    natural = maps[0].view(t, b, -1).transpose(0, 1)
    rec = batch.routes_BTLK
    recorded = torch.zeros_like(natural).scatter_(2, rec[:, :, 0].long(), True)
    trained = torch.arange(t).unsqueeze(0) < (batch.prompt_lens_B + batch.response_lens_B - 1).unsqueeze(1)
    mine = {"shape": tuple(rec.shape), "positions": int(trained.sum()),
            "equal": bool(torch.equal(natural[trained], recorded[trained]))}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def aux_loss_scale(rank: int, world_size: int) -> dict:
    """World 2: the router-weight gradient of the aux loss alone at 1 vs 2 micro-batches and DP 1 vs 2 (the same
    rows everywhere: the mean aux loss is that of one micro-batch), with coefficient 0, and main + aux vs main."""
    tokens = global_tokens()[:MICRO]
    both = torch.cat([tokens, tokens])  # DP 2: each replica gets the same two rows
    aux = model_cfg(aux_loss_coeff=0.5)
    no_aux = model_cfg(aux_loss_coeff=0.0)

    def router_grads(part: Optional[dict]) -> dict:
        return {k: v for k, v in _merged(part, "grads").items() if "router" in k[0]}

    def solo(**kw: Any) -> dict:  # DP 1 on every rank (each rank its own one-rank role, the same result)
        parts = [run_layout(1, 1, 1, 1, rank_offset=r, **kw) for r in range(world_size)]
        return {k: v for k, v in parts[rank]["grads"].items() if "router" in k[0]}

    stats_dp1 = [run_layout(1, 1, 1, 1, rank_offset=r, cfg=aux, tokens=tokens, stats=True) for r in range(world_size)]
    stats_dp2 = run_layout(1, 1, 2, 1, cfg=aux, tokens=both, repeat=2, stats=True)

    out = {
        "dp1_mb1": solo(cfg=aux, tokens=tokens, main=False),
        "dp1_mb2": solo(cfg=aux, tokens=tokens, repeat=2, main=False),
        "dp2_mb1": router_grads(run_layout(1, 1, 2, 1, cfg=aux, tokens=both, main=False)),
        "dp2_mb2": router_grads(run_layout(1, 1, 2, 1, cfg=aux, tokens=both, repeat=2, main=False)),
        "coeff0": solo(cfg=no_aux, tokens=tokens, main=False),
        "main_aux": router_grads(run_layout(1, 1, 2, 1, cfg=aux, tokens=both)),
        "main": router_grads(run_layout(1, 1, 2, 1, cfg=no_aux, tokens=both)),
        "metrics_dp1_mb1": stats_dp1[rank]["moe_metrics"],
        "metrics_dp2_mb2": stats_dp2["moe_metrics"],
        **padding_cases(aux, tokens, solo),
    }
    dist.barrier()
    return out


def padding_cases(cfg: ModelConfig, tokens: torch.Tensor, solo: Any) -> dict:
    """The aux-loss gradient (DP 1, aux loss alone) of ``tokens`` whose last position is padding by ``seq_lens``,
    of the same rows cut before it with two all-padding rows added, and of the first without ``seq_lens``."""
    b, t = tokens.shape
    lens = torch.full((b,), t)  # the last position (the last token) predicts nothing: padding
    cut = torch.cat([tokens[:, :t - 1], torch.zeros((2, t - 1), dtype=tokens.dtype)])
    cut_batch = {"tokens": cut, "seq_lens": torch.cat([lens, torch.zeros(2, dtype=lens.dtype)]), "n_real": b}
    return {
        "pad_by_lens": solo(cfg=cfg, tokens=tokens, extra={"seq_lens": lens}, main=False),
        "pad_rows": solo(cfg=cfg, tokens=tokens, batches=[cut_batch], main=False),
        "pad_unmasked": solo(cfg=cfg, tokens=tokens, main=False),
    }


def _train_step(part: dict) -> None:
    """One more forward/backward of the global batch (this DP rank's rows) and an update on a kept layout."""
    from camopd_megatron.models.optimizer import optimizer_step, zero_grad_buffers
    from camopd_megatron.models.pipeline import make_microbatches, run_microbatches

    pgc, tokens = part["pgc"], global_tokens()
    rows = tokens.shape[0] // pg_size(pgc.dp)
    mine = tokens[pg_rank(pgc.dp) * rows:(pg_rank(pgc.dp) + 1) * rows]
    zero_grad_buffers(part["ddp"], part["opt"])
    run_microbatches(part["ddp"][0], pgc, make_microbatches({"tokens": mine}, MICRO),
                     _loss_fn(pgc, tokens.shape[0] * (SEQ - 1)), forward_only=False)
    assert optimizer_step(part["opt"], part["sched"])[0]


def _adam_state(part: dict) -> dict:
    """This rank's Adam moments and step by (global name, kind), every DP/EP rank merged."""
    names = {id(p): n for n, p in global_names(part["model"], part["pgc"]).items()}
    out = {}
    for opt in getattr(part["opt"], "chained_optimizers", [part["opt"]]):  # dense + expert optimizers at EP > 1
        inner = opt.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                for kind in ("exp_avg", "exp_avg_sq", "step"):
                    out[(names[id(p)], kind)] = inner.state[p][kind].detach().clone().reshape(-1)
    return _merged({"s": out}, "s")


def _weights(part: dict) -> dict:
    return _merged({"p": {(n, 0): p.detach().clone() for n, p in global_names(part["model"], part["pgc"]).items()}},
                   "p")


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _steps(part: dict) -> list[float]:
    """The distinct Adam step counts of every parameter state on this rank (any optimizer format)."""
    parts = getattr(part["opt"], "chained_optimizers", [part["opt"]])
    return sorted({float(s["step"]) for o in parts for s in o.optimizer.state.values()})


RESHARD = {  # case: (saved, loaded) layouts as (tp, pp, dp, ep) over 4 ranks, the model's number of layers
    "ep2_to_ep1": ((1, 1, 4, 2), (1, 1, 4, 1), 2),
    "ep1_to_ep2": ((1, 1, 4, 1), (1, 1, 4, 2), 2),
    "pp2_ep2_to_pp1_ep1": ((1, 2, 2, 2), (1, 1, 4, 1), 4),
}
"""The resharded resumes :func:`reshard_ep` checks (the 4-layer model: a dense and an MoE layer per stage)."""


def _local_experts(part: dict) -> int:
    """How many expert weight tensors this rank's part of a kept layout holds."""
    return sum("local_experts" in n for n, _ in part["model"].named_parameters())


def reshard_ep(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """World 4: for each :data:`RESHARD` case and each optimizer (plain, distributed), one update at the saved
    layout, save model + optimizer, load both at the other layout from another seed: the same weights and
    Adam state (moments and step by global name; the distributed optimizer's state holds flat DP shards, so
    there the step counts only) and the same next update as the run that did not reshard."""
    from camopd_megatron.checkpoint.dist import load_sharded, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.models.optimizer import optimizer_step
    from camopd_megatron.models.optimizer_state import load_optimizer_state, optimizer_sharded_state_dict

    def state(part: dict, is_loading: bool) -> dict:
        msd = model_sharded_state_dict(part["ddp"][0], part["pgc"])
        return {"model": msd, "optimizer": optimizer_sharded_state_dict(part["opt"], msd, is_loading=is_loading,
                                                                        pg_collection=part["pgc"])}

    out = {}
    for distopt in (False, True):
        for case, (src, dst, layers) in RESHARD.items():
            cfg = model_cfg(num_layers=layers, layer_pattern=[0, 1, 1, 0] if layers == 4 else None)
            optimizer = "distopt" if distopt else "plain"
            path = f"{ckpt_dir}/{case}_{optimizer}"
            saved = run_layout(*src, cfg=cfg, keep=True, distopt=distopt)
            optimizer_step(saved["opt"], saved["sched"])
            before = {"params": _weights(saved), "adam": {} if distopt else _adam_state(saved)}
            save_checkpoint(path, state(saved, False), model_cfg=cfg, step=1)
            _train_step(saved)  # the update after the checkpoint, in the saved layout
            next_saved = _weights(saved)

            loaded = run_layout(*dst, cfg=cfg, seed=SEED + 7, keep=True, distopt=distopt)
            got = load_sharded(path, state(loaded, True), process_group=loaded["pgc"].intra_dist_opt)
            loaded["ddp"][0].module.load_state_dict({k.removeprefix("module."): v for k, v in got["model"].items()},
                                                    strict=False)
            load_optimizer_state(loaded["opt"], got["optimizer"])
            loaded["sched"].load_state_dict({"num_steps": 1})  # the lr cursor travels in the trainer's common state
            after = {"params": _weights(loaded), "adam": {} if distopt else _adam_state(loaded)}
            steps = _steps(loaded)
            _train_step(loaded)  # the same update, resumed in the other layout
            diffs = {kind: _max_diff(before[kind], after[kind]) for kind in ("params", "adam") if after[kind]}
            diffs["next_step"] = _max_diff(next_saved, _weights(loaded))
            out[f"{case}/{optimizer}"] = {
                "diffs": diffs, "n_params": len(after["params"]), "saved_moments": len(before["adam"]),
                "steps": steps, "local_experts": (_local_experts(saved), _local_experts(loaded))}
            dist.barrier()
    return out
