"""Stage-time estimate of one CaMOPD step and teacher rank counts that keep the teachers off the critical path.

An ESTIMATE: each stage's floor at a :class:`~camopd_megatron.planner.profiles.DeviceProfile`'s rates,
``max(compute seconds, bytes / mem_bandwidth)`` per pass, with the work split evenly over the
ranks that share it. Compute seconds: FLOPs / ``peak_flops`` for a profile without a matmul table
(the GPU data sheets); with one (a calibrated CPU), the sum over the pass's matrix products
(``counts.forward_matmuls``: QKV, attention scores and context, projection, MLP or experts, output
layer) of each product's FLOPs at the table's rate for its shape, plus, where the profile has an
``elementwise_rate``, the non-matmul element operations (``counts.forward_elementwise``: norms, RoPE,
softmax, SwiGLU's activation, log-softmax) at that rate. A decode step's compute stays FLOPs / peak (it
is bandwidth bound). Not counted: communication (TP all-reduces, the all-to-all of expert
parallelism, pipeline sends and bubbles, DP gradient reduction, teacher ↔ student transfers), kernel
launch and Python overhead, load imbalance between experts. Counts: :mod:`camopd_megatron.planner.counts`.

Per step, per student data-parallel replica (B = ceil(rollout.prompts_per_step / DP) samples,
P = data.max_prompt_tokens, R = rollout.max_new_tokens, T = P + R capped at model.seq_length, the
output layer at the R response positions; every sample assumed to run to R tokens and to be kept):

* **rollout** — the prefill, ``B · forward(P)`` FLOPs over TP (the pipeline stages take turns), then
  R decode steps per rollout micro-batch (rollout.micro_batch_size rows). A decode step is memory-bandwidth bound: it reads every weight
  of the replica once (for MoE: the dense weights and the experts its tokens are routed to; with r
  tokens routed top-k of E, a given expert is hit with probability ``1 - (1 - k/E)^r``, counting the
  tokens of the whole expert group in lock-step) and the KV cache at its mean length P + R/2;
  its FLOPs are ``2 · active parameters`` per row plus attention over the cache.
* **teacher** — a forward over the step's samples, ``forward(T)`` each, spread over the teacher's
  ranks (a separate teacher group: its TP × PP × DP ranks; colocated: the student's replica); the
  weights are read once per scoring micro-batch (optim.micro_batch_size rows). Worst
  case assumed: the whole global batch is of the teacher's branch (an alternating step).
* **recompute** — one no-grad student forward over the replica's samples, when the gaps need
  log π_θ before the update (``selection.student_logprobs: recompute`` and a selection that depends
  on the gaps); none when the recompute is fused into the training forward or μ is used.
* **train** — forward + backward ≈ 3 forwards (backward = 2 × forward: input and weight gradients;
  with a matmul table, at the forward products' shapes, the elementwise work 2 × too),
  output layer included; ``model.recompute: full`` re-runs the forward (4×), ``selective`` the
  attention scores.
* **optimizer** — memory bound: per parameter of the rank (divided by DP for the distributed
  optimizer's shard) the grad read twice (norm + update), Adam m and v read and written, the FP32
  master / parameter read and written, the 16-bit parameter written, the grad buffer zeroed.

Teacher sizing: with the rollout split into chunks that the teachers score while the next chunk
is sampled, a teacher is off the critical path when its scoring takes no longer than the rollout.
:func:`suggest_teacher_dp` finds, for the same world size, the smallest DP of each separate teacher
group that achieves this, the student keeping the remaining ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from camopd_megatron.config import Config, ModelConfig
from camopd_megatron.config.moe import expert_layout_problems
from camopd_megatron.parallel import RoleLayout
from camopd_megatron.planner.counts import (CORE_ATTENTION, dtype_bytes, expert_params, forward_elementwise,
                                            forward_flops, forward_matmuls, stage_params)
from camopd_megatron.planner.profiles import DeviceProfile

__all__ = ["StageTime", "StageEstimate", "estimate", "estimate_stages", "suggest_teacher_dp", "optimizer_bytes_per_param",
           "gap_free"]


@dataclass(frozen=True)
class StageTime:
    """One stage's estimated seconds per step and what bounds it."""

    name: str
    seconds: float
    flops: float
    """FLOPs on one rank of the stage."""
    bytes: float
    """Bytes read/written on one rank of the stage."""
    bound: str
    """``compute`` or ``memory``."""
    note: str = ""


@dataclass(frozen=True)
class StageEstimate:
    """The per-stage estimate of one step and the teacher suggestion."""

    profile: DeviceProfile
    stages: tuple[StageTime, ...]
    suggestion: tuple[str, ...] = field(default_factory=tuple)

    def stage(self, name: str) -> StageTime:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages are {[s.name for s in self.stages]}")

    @property
    def step_seconds(self) -> float:
        """Sum of the student's stages (teachers on separate ranks overlap the rollout only with chunking)."""
        return sum(s.seconds for s in self.stages)

    def render(self) -> str:
        p = self.profile
        out = [f"stage times per step — ESTIMATE (floors at the profile's rates; communication, pipeline bubbles, "
               f"launch/Python overhead not counted)",
               f"  profile {p.name}: {p.peak_flops / 1e12:.3g} TFLOP/s ({p.dtype}), {p.mem_bandwidth / 1e9:.4g} GB/s"
               + (f", matmuls at a table of {len(p.matmul_rates)} shapes "
                  f"({min(r[3] for r in p.matmul_rates) / 1e9:.4g}-{max(r[3] for r in p.matmul_rates) / 1e9:.4g} "
                  f"GFLOP/s)" if p.matmul_rates else "")
               + (f", non-matmul work at {p.elementwise_rate / 1e9:.3g} G element-ops/s"
                  if p.elementwise_rate is not None else "")
               + (f" — {p.source}" if p.source else "")]
        w = max(len(s.name) for s in self.stages)
        for s in self.stages:
            out.append(f"  {s.name:<{w}}  {s.seconds:10.4f} s  {s.bound:<7}  {s.note}")
        out += [f"  {'sum':<{w}}  {self.step_seconds:10.4f} s  (stages run one after another)"]
        out += [f"  {line}" for line in self.suggestion]
        return "\n".join(out)


def gap_free(cfg: Config) -> bool:
    """The selection needs no gap before training (the fused recompute): the rule of
    ``distill.selection.SelectionPolicy.gap_free`` read from the config (selection off, r_i = r_b)."""
    sel = cfg.selection
    return not sel.enabled and (not sel.scale_only_selected or sel.scale_mode == "lr"
                                or all(r == 1.0 for r in cfg.loss.adv_scale.values()))


def optimizer_bytes_per_param(param_bytes: int) -> int:
    """Bytes moved per parameter by one optimizer step (module docstring): grad 4 read twice, m and v
    8 read + 8 written, FP32 master/parameter 4 read + 4 written, a 16-bit parameter written, grad zeroed 4."""
    return 2 * 4 + 16 + 8 + (param_bytes if param_bytes < 4 else 0) + 4


def _time(name: str, flops: float, nbytes: float, prof: DeviceProfile, note: str,
          compute_s: Optional[float] = None) -> StageTime:
    """``compute_s``: the compute seconds (default FLOPs / peak); the stage takes the larger of those and the bytes'."""
    tc, tm = (flops / prof.peak_flops if compute_s is None else compute_s), nbytes / prof.mem_bandwidth
    return StageTime(name, max(tc, tm), flops, nbytes, "compute" if tc >= tm else "memory", note)


def _hit_fraction(m: ModelConfig, tokens: int) -> float:
    """Expected fraction of experts that ``tokens`` tokens routed top-k of E reach."""
    moe = m.moe
    if moe is None:
        return 1.0
    return 1.0 - (1.0 - moe.router_topk / moe.num_experts) ** max(tokens, 1)


def _forward(m: ModelConfig, tokens: int, scored: int, rows: int, prof: DeviceProfile, tp: int,
             ranks: int, batch: int, attention_only: bool = False) -> tuple[float, float]:
    """FLOPs and compute seconds on one rank of ``rows`` forwards in micro-batches of ``batch``, the work
    split evenly over ``ranks`` (TP splits each product's shape; module docstring). ``attention_only``:
    the attention scores and context products alone (selective recompute)."""
    products = [p for p in forward_matmuls(m, tokens, scored) if not attention_only or p.name in CORE_ATTENTION]
    flops = rows * sum(p.flops for p in products) / ranks
    if not prof.matmul_rates and prof.elementwise_rate is None:  # a data-sheet profile: everything at the peak
        return flops, flops / prof.peak_flops
    seconds = sum(p.flops / prof.matmul_flops(*p.shape(tp, max(1, min(batch, rows)))) for p in products)
    if prof.elementwise_rate is not None and not attention_only:
        seconds += forward_elementwise(m, tokens, scored) / prof.elementwise_rate
    return flops, rows * seconds / ranks


def _decode(m: ModelConfig, *, prompt: int, new: int, rows: int, tp: int, pp: int, ep: int, etp: Optional[int],
            wbytes: int, prof: DeviceProfile) -> tuple[float, float, float]:
    """Seconds, FLOPs and bytes per rank of ``new`` decode steps of ``rows`` rows (PP stages one after another)."""
    etp = tp if etp is None else etp
    ctx = prompt + new / 2.0  # mean cache length
    group_tokens = rows * max(1, ep * etp // tp)  # the expert group decodes in lock-step
    experts_all = sum(expert_params(m, tp, pp, ep, etp))
    dense = sum(stage_params(m, tp, pp, ep, etp)) - experts_all
    if not m.tie_embeddings:  # the input embedding is a lookup of B rows, not a read of the table
        dense -= m.padded_vocab_size * m.hidden_size // tp
    kv = 2 * m.num_layers * max(m.kv_heads // tp, 1) * m.kv_channels * ctx * rows * wbytes
    step_bytes = (dense + experts_all * _hit_fraction(m, group_tokens)) * wbytes + kv
    step_flops = rows * forward_flops(m, 1, 1, context=ctx) / tp
    per_step = max(step_flops / prof.peak_flops, step_bytes / prof.mem_bandwidth)
    return new * per_step, new * step_flops, new * step_bytes


def estimate_stages(cfg: Config, layout: RoleLayout, prof: DeviceProfile, *, teacher_dp: Optional[dict[str, int]] = None,
                    student_dp: Optional[int] = None) -> list[StageTime]:
    """The stage times of one step for ``layout`` (a :class:`~camopd_megatron.parallel.RoleLayout`);
    ``teacher_dp`` / ``student_dp`` replace the layout's DP sizes (the suggestion's search)."""
    m, par, st = cfg.model, cfg.parallel, layout.student
    dev = prof.device_type
    pbytes = dtype_bytes(cfg.precision.params_dtype, dev)
    dp = student_dp or st.dp
    tp, pp = st.tp, st.pp
    ep, etp = st.ep, st.expert_tp
    prompt = cfg.data.max_prompt_tokens
    new = cfg.rollout.max_new_tokens
    seq = min(m.seq_length, prompt + new)
    new = seq - prompt if seq > prompt else new
    rows = -(-cfg.rollout.prompts_per_step // dp)
    ranks = tp * pp

    # rollout: prefill (compute) + decode (bandwidth), per rollout micro-batch
    rmb = min(cfg.rollout.micro_batch_size, rows)
    passes = -(-rows // rmb)
    # one micro-batch: the pipeline stages run one after another
    pre, pre_s = _forward(m, prompt, 1, rows, prof, tp, tp, rmb)
    dec_s, dec_f, dec_b = _decode(m, prompt=prompt, new=new, rows=rmb, tp=tp, pp=pp, ep=ep, etp=etp, wbytes=pbytes,
                                  prof=prof)
    roll_s = pre_s + passes * dec_s
    stages = [StageTime("rollout", roll_s, pre + passes * dec_f, passes * dec_b,
                        "memory" if passes * dec_s > pre_s else "compute",
                        f"{rows} rows/replica: prefill {prompt} tokens + {passes} x {new} decode steps of {rmb} rows")]

    # teachers
    by_name = {t.name: i for i, t in enumerate(cfg.teachers)}
    global_rows = cfg.rollout.prompts_per_step
    for t in cfg.teachers:
        mt = cfg.teacher_model(by_name[t.name])[0]
        if t.placement == "colocated":
            t_tp, t_pp, t_ep, t_etp, t_rows, where = tp, pp, ep, etp, rows, "colocated on the student's ranks"
        else:
            r = layout.role(t.role_name)
            t_dp = (teacher_dp or {}).get(r.name, r.dp)
            t_tp, t_pp, t_rows, where = r.tp, r.pp, -(-global_rows // t_dp), f"group {r.name} dp {t_dp}"
            t_ep, t_etp = r.ep, r.expert_tp
        tb = dtype_bytes(t.dtype, dev)
        f, f_s = _forward(mt, seq, new, t_rows, prof, t_tp, t_tp * t_pp, cfg.optim.micro_batch_size)
        # the weights are read once per scoring micro-batch (optim.micro_batch_size rows)
        wbytes = max(stage_params(mt, t_tp, t_pp, t_ep, t_etp)) * tb * -(-t_rows // cfg.optim.micro_batch_size)
        stages.append(_time(f"teacher {t.name}", f, wbytes, prof,
                            f"{t_rows} samples x {seq} tokens, {where} (worst case: whole batch of its branch)", f_s))

    if cfg.selection.student_logprobs == "recompute" and not gap_free(cfg):
        rf, rf_s = _forward(m, seq, new, rows, prof, tp, ranks, cfg.optim.micro_batch_size)
        stages.append(_time("recompute", rf, 0.0, prof, f"{rows} samples x {seq} tokens, no-grad forward", rf_s))
    factor = {"full": 4.0, "selective": 3.0, "none": 3.0}[m.recompute]
    fwd_f, fwd_s = _forward(m, seq, new, rows, prof, tp, ranks, cfg.optim.micro_batch_size)
    train_f, train_s = factor * fwd_f, factor * fwd_s
    if m.recompute == "selective":  # the attention scores re-run in the backward
        att_f, att_s = _forward(m, seq, new, rows, prof, tp, ranks, cfg.optim.micro_batch_size,
                                attention_only=True)
        train_f, train_s = train_f + att_f, train_s + att_s
    stages.append(_time("train", train_f, 0.0, prof,
                        f"{rows} samples x {seq} tokens, fwd+bwd = {factor:g} forwards"
                        + (" (full recompute)" if m.recompute == "full" else "")
                        + (", the recompute fused in" if gap_free(cfg) else ""), train_s))
    n_rank = max(stage_params(m, tp, pp, ep, etp))
    n_exp = max(expert_params(m, tp, pp, ep, etp))
    if par.use_distributed_optimizer:
        edp = max(1, tp * dp // (ep * (tp if etp is None else etp)))
        shard = (n_rank - n_exp) / dp + n_exp / edp
    else:
        shard = n_rank
    per = optimizer_bytes_per_param(pbytes)
    stages.append(_time("optimizer", 0.0, shard * per, prof,
                        f"{shard / 1e6:.1f}M params x {per} B moved" + (" (distributed optimizer shard)"
                                                                        if par.use_distributed_optimizer else "")))
    return stages


_KEYS = {k: k for k in ("tp", "dp", "ep", "etp", "sp")}


def _dp_fits(models: list[ModelConfig], tp: int, dp: int, ep: int, etp: Optional[int]) -> bool:
    """The expert layout rules (``config.moe.expert_layout_problems``, the one place they are written)
    accept ``dp`` for every model of a role."""
    return not any(expert_layout_problems(m.moe, tp=tp, dp=dp, ep=ep, etp=etp, keys=_KEYS, moe_key="moe")
                   for m in models if m.moe is not None)


def suggest_teacher_dp(cfg: Config, layout: RoleLayout, prof: DeviceProfile) -> Optional[tuple[dict[str, int], int, list[StageTime]]]:
    """For the same world size: the smallest DP of each separate teacher group whose scoring takes no
    longer than the rollout, the student keeping the largest DP the remaining ranks allow (DP sizes
    that break the expert layout rules are skipped). Returns (teacher DPs, student DP, stages), or None
    when no split of this world size does it."""
    st = layout.student
    groups = list(layout.roles[1:])
    if not groups:
        return None
    by_name = {t.name: i for i, t in enumerate(cfg.teachers)}
    models = {r.name: [cfg.teacher_model(by_name[n])[0] for n in r.teachers] for r in groups}
    student_models = [cfg.model] + [cfg.teacher_model(i)[0] for i, t in enumerate(cfg.teachers)
                                    if t.placement == "colocated"]

    def next_dp(r, dp: int) -> Optional[int]:
        for cand in range(dp, cfg.rollout.prompts_per_step + 1):
            if _dp_fits(models[r.name], r.tp, cand, r.ep, r.expert_tp):
                return cand
        return None

    dps: dict[str, int] = {}
    for r in groups:
        first = next_dp(r, 1)
        if first is None:
            return None
        dps[r.name] = first
    while True:
        left = layout.world_size - sum(r.tp * r.pp * dps[r.name] for r in groups)
        s_dp = next((d for d in range(left // (st.tp * st.pp), 0, -1)
                     if _dp_fits(student_models, st.tp, d, st.ep, st.expert_tp)), None)
        if s_dp is None:
            return None
        stages = estimate_stages(cfg, layout, prof, teacher_dp=dps, student_dp=s_dp)
        roll = stages[0].seconds
        slow = [r for r in groups
                if max(s.seconds for s in stages if s.name in {f"teacher {n}" for n in r.teachers}) > roll]
        if not slow:
            return dps, s_dp, stages
        for r in slow:
            nxt = next_dp(r, dps[r.name] + 1)
            if nxt is None:
                return None
            dps[r.name] = nxt


def estimate(cfg: Config, layout: RoleLayout, prof: DeviceProfile) -> StageEstimate:
    """The stage estimate of the layout as configured, with the teacher-rank suggestion."""
    stages = estimate_stages(cfg, layout, prof)
    roll = stages[0].seconds
    lines = []
    teachers = [s for s in stages if s.name.startswith("teacher ")]
    for s in teachers:
        state = "off the critical path with the streamed overlap" if s.seconds <= roll else "ON the critical path"
        lines.append(f"{s.name}: {s.seconds:.4g} s vs rollout {roll:.4g} s — {state}")
    sug = suggest_teacher_dp(cfg, layout, prof)
    st_ranks = layout.student.tp * layout.student.pp
    if sug is not None:
        dps, s_dp, _ = sug
        parts = [f"{r.name} dp {dps[r.name]} ({r.tp * r.pp * dps[r.name]} ranks)" for r in layout.roles[1:]]
        idle = layout.world_size - sum(r.tp * r.pp * dps[r.name] for r in layout.roles[1:]) - s_dp * st_ranks
        lines.append("suggested teacher ranks (scoring <= rollout, same world size): " + ", ".join(parts)
                     + f", student dp {s_dp}" + (f" ({idle} rank(s) left idle by the expert layout)" if idle else ""))
    elif len(layout.roles) > 1:
        lines.append("suggested teacher ranks: none of the splits of this world size keeps every teacher's "
                     "scoring under the rollout; add ranks or shorten the teachers' sequences")
    if any(t.placement == "colocated" for t in cfg.teachers):
        lines.append("colocated teachers always add their scoring to the student's step; "
                     "placement: separate lets them overlap the rollout")
    return StageEstimate(prof, tuple(stages), tuple(lines))
