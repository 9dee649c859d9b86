"""Dry-run planner, the memory part: validate a layout for a world size and estimate per-rank GPU memory.

``camopd-train --config X.yaml --dry-run --world-size 512`` calls :func:`plan` and prints
:meth:`Plan.render`: the rank map (rank ranges per role with TP/PP/DP), one memory table per
role and, with a device profile, the stage-time estimate (:mod:`camopd_megatron.planner.stages`).
Nothing here touches torch.distributed or imports torch, so it runs on a laptop.

The estimate is for one rank of the heaviest pipeline stage, in GiB (2**30 bytes):

* **parameters** — counted exactly for the Llama/Qwen/Mistral-style GPTModel we build (fused QKV
  with GQA, SwiGLU fc1 = gate+up, RMSNorm weights replicated over TP, untied output layer on
  the last stage; :mod:`camopd_megatron.planner.counts`), times the bytes of
  ``precision.params_dtype`` (``auto`` = bf16 on GPU). MoE (``model.moe``): routed experts divided
  by EP × ETP, the rest by TP, the router whole on every rank; the row prints the model's total
  and active (per token) parameters.
* **gradients** — 4 bytes/param: megatron DDP accumulates and reduces FP32 main grads
  (``grad_reduce_in_fp32``); the grad buffer is full size even with the distributed optimizer.
* **optimizer** — Adam m and v in FP32 (8 bytes/param) plus FP32 master weights when the
  parameters are 16-bit (4 bytes/param); divided by the student's DP size with
  ``parallel.use_distributed_optimizer`` (both variants are printed); routed experts by the
  expert-DP size TP·DP/(EP·ETP) instead (the replicas of one expert shard).
* **activations** — Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Table 2, per layer, 16-bit activations, sequence s, micro-batch b,
  hidden h, heads a, TP t:

  - no recompute, no SP: ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes
  - no recompute, SP:    ``s·b·h·(34 + 5·a·s/h)/t`` bytes
  - selective recompute (``model.recompute: selective``, the core attention): the same without the
    ``5·a·s/h`` term
  - full recompute (``model.recompute: full``): ``2·s·b·h`` bytes (``/t`` with SP), the input of each
    recompute group, plus the group re-materialised without recompute during its backward.
    ``recompute_method: uniform`` with N = ``recompute_num_layers``: one input per N layers and N
    layers re-materialised; ``block``: the first N layers of the stage keep their input only, the
    others everything, and one layer is re-materialised.

  The table prints ``model.recompute``'s figure and, beside it, the other variant (full recompute of
  every layer when the config has none, no recompute otherwise).

  The ``5·a·s/h`` term (attention scores, softmax, dropout mask) is dropped with
  transformer-engine's fused/flash attention (``model.transformer_impl`` te or auto); it stays
  for the ``local`` layers. The constants are the paper's GPT (4h GeLU MLP) ones: for SwiGLU the
  MLP share differs by tens of percent — an estimate, not a guarantee. Scaled by bytes/2 for
  FP32 activations. Layers per stage = L/PP, and with the 1F1B schedule the first stage keeps
  PP micro-batches in flight, so the stored part is multiplied by PP. s = min(model.seq_length,
  data.max_prompt_tokens + rollout.max_new_tokens), b = optim.micro_batch_size.
* **logits** — the LM head's ``[s, b, V/t]`` output of one micro-batch (activation dtype).
* **teacher weights** — the teacher group's TP × PP shard of each hosted teacher, in its dtype
  (bf16 on GPU for ``auto``; teachers never use FP8), plus one scoring micro-batch's logits.
  Colocated teachers are added to the student's ranks unless ``offload``.
* **dispatcher** (MoE roles) — the token dispatcher's buffers of one MoE layer's forward
  (:func:`dispatcher_bytes`); MoE layers' activations replace the MLP share of the formula above
  by the routed copies' SwiGLU intermediates (see :func:`activation_bytes`).
* **KV cache** (student ranks; they generate the rollouts):
  ``2 · L/PP · kv_heads/t · head_dim · (prompt + response) · rollout.micro_batch_size · bytes``.

Not counted: CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, FP8 weight
transpose caches, megatron's temporary buffers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from camopd_megatron.config import Config, ModelConfig
from camopd_megatron.parallel import RoleLayout
from camopd_megatron.planner.counts import active_params, count_params, dtype_bytes, expert_params, moe_layers, stage_params
from camopd_megatron.planner.profiles import DeviceProfile
from camopd_megatron.planner.stages import StageEstimate, estimate

__all__ = ["Plan", "RoleMemory", "MemoryItem", "plan", "activation_bytes", "dispatcher_bytes", "GIB"]

logger = logging.getLogger(__name__)

GIB = float(2**30)
"""Bytes per GiB."""

_FP32_GRAD_BYTES = 4
_ADAM_STATE_BYTES = 8  # m and v in FP32
_MASTER_BYTES = 4  # FP32 master copy of 16-bit parameters


@dataclass(frozen=True)
class MemoryItem:
    """One row of a role's memory table (bytes on one rank)."""

    name: str
    bytes: float
    note: str = ""
    alt_bytes: Optional[float] = None
    """The other variant (optimizer without/with the distributed optimizer, activations with full recompute)."""
    alt_label: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class RoleMemory:
    """The per-rank memory estimate of one role."""

    role: str
    kind: str
    ranks: range
    layout: str
    items: tuple[MemoryItem, ...]

    @property
    def total_bytes(self) -> float:
        return sum(i.bytes for i in self.items)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def item(self, name: str) -> MemoryItem:
        """The row called ``name``."""
        for i in self.items:
            if i.name == name:
                return i
        raise KeyError(f"no memory row {name!r} in role {self.role!r}; rows are {[i.name for i in self.items]}")


@dataclass(frozen=True)
class Plan:
    """A validated layout and its per-rank memory estimate (see the module docstring for formulas)."""

    layout: RoleLayout
    roles: tuple[RoleMemory, ...]
    assumptions: tuple[str, ...] = field(default_factory=tuple)
    gpu_memory_gib: Optional[float] = None
    stages: Optional[StageEstimate] = None
    """The stage-time estimate (with a device profile; :mod:`camopd_megatron.planner.stages`)."""

    def role(self, name: str) -> RoleMemory:
        """The estimate of role ``name`` (``"student"`` or a teacher group)."""
        for r in self.roles:
            if r.role == name:
                return r
        raise KeyError(f"no role {name!r}; roles are {[r.role for r in self.roles]}")

    def render(self) -> str:
        """The printable dry-run report: summary, rank map, one table per role."""
        out = [self.layout.summary(), "", "rank map:", self.layout.rank_map(detailed=False), ""]
        out.append("assumptions: " + "; ".join(self.assumptions))
        for r in self.roles:
            unit, scale = ("GiB", GIB) if r.total_bytes >= GIB else ("MiB", float(2**20))  # tiny demo models
            out += ["", f"{r.role} ({r.kind}, ranks {_span(r.ranks)}, {r.layout}) — per rank, {unit}"]
            w = max(len(i.name) for i in r.items)
            for i in r.items:
                alt = f"   [{i.alt_label}: {i.alt_bytes / scale:.2f}]" if i.alt_bytes is not None else ""
                note = f"  {i.note}" if i.note else ""
                out.append(f"  {i.name:<{w}}  {i.bytes / scale:8.2f}{note}{alt}")
            out.append(f"  {'total':<{w}}  {r.total_bytes / scale:8.2f}")
            if self.gpu_memory_gib is not None and r.total_gib > self.gpu_memory_gib:
                out.append(f"  WARNING: {r.total_gib:.1f} GiB exceeds the {self.gpu_memory_gib:.0f} GiB per GPU")
        out.append("")
        out.append(self.stages.render() if self.stages is not None else
                   "stage times: pass --device-profile (h100, h200, a100, b200, or a profile JSON written by "
                   "python -m camopd_megatron.bench.calibrate) for per-stage time estimates and teacher sizing")
        return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _span(ranks: range) -> str:
    return f"{ranks.start}" if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


# ------------------------------------------------------------------------------------ estimate
def _flash_attention(cfg: Config, device_type: str) -> bool:
    """TE's fused attention stores no [s, s] scores; the local layers (and every CPU run) do."""
    return device_type == "cuda" and cfg.model.transformer_impl != "local"


def _seq_lengths(cfg: Config) -> int:
    return min(cfg.model.seq_length, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)


def activation_bytes(
    m: ModelConfig, *, s: int, b: int, tp: int, pp: int, act_bytes: int, sequence_parallel: bool,
    recompute: str, flash_attention: bool, method: str = "uniform", num_layers: int = 1,
) -> float:
    """Stored activations of one rank of the first pipeline stage (Korthikanti et al. 2022, module docstring;
    MoE layers: the MLP share of ``model.moe``'s routed and shared experts and router, see the code).

    ``recompute``: none / selective / full; ``method`` and ``num_layers`` (N) choose the layers of
    ``full`` (megatron ``recompute_method`` / ``recompute_num_layers``)."""
    h, a = m.hidden_size, m.num_attention_heads
    sbh = s * b * h
    scores = 0.0 if flash_attention or recompute == "selective" else 5.0 * a * s / h

    def layer(replicated: float, mlp: float) -> float:
        # Korthikanti, in units of s·b·h bytes: 10 replicated over TP (norm and block inputs, dropout
        # masks), 8/t attention (Q, K, V, projection input), ``mlp``/t MLP (16: the GPT 4h fc1 output and
        # GeLU output), 5as/h scores; with SP everything is split over TP
        if sequence_parallel:
            return sbh * (replicated + 8.0 + mlp + scores) / tp
        return sbh * (replicated + (8.0 + mlp) / tp + scores / tp)

    full_layer = layer(10.0, 16.0)
    layers = m.num_layers // pp
    sparse = sum(moe_layers(m)[:layers])  # MoE layers of the first stage
    moe = m.moe
    if sparse and moe is not None:
        # an MoE layer's MLP share: k routed copies of each token, each keeping its dispatched input (2h B)
        # and its SwiGLU fc1 output (2 f_e) and activation (f_e) at 2 B: k(2 + 6 f_e/h); a shared expert
        # 6 f_s/h; the router's fp32 logits and probabilities, 8E/h, replicated like the block inputs
        mlp = moe.router_topk * (2.0 + 6.0 * moe.ffn_hidden_size / h) + 6.0 * (moe.shared_expert_ffn_hidden_size or 0) / h
        moe_layer = layer(10.0 + 8.0 * moe.num_experts / h, mlp)
        full_layer = (sparse * moe_layer + (layers - sparse) * full_layer) / layers  # the stage's mean layer
    in_flight = pp  # 1F1B: stage 0 holds PP micro-batches
    if recompute == "full":
        stored = 2.0 * sbh / (tp if sequence_parallel else 1)  # one recompute group's input
        n = max(1, min(num_layers, layers))
        if method == "block":  # the first n layers keep their input, the rest everything; one layer re-run
            total = in_flight * (n * stored + (layers - n) * full_layer) + full_layer
        else:  # uniform: one input per group of n layers; a whole group re-materialised in its backward
            total = in_flight * -(-layers // n) * stored + n * full_layer
    else:
        total = layers * in_flight * full_layer
    return total * act_bytes / 2.0


def _recompute_label(m: ModelConfig) -> str:
    if m.recompute == "full":
        return f"full recompute ({m.recompute_method}, {m.recompute_num_layers} layer{'s' if m.recompute_num_layers > 1 else ''})"
    return "selective recompute" if m.recompute == "selective" else "no recompute"


def dispatcher_bytes(m: ModelConfig, *, tokens: int, ep: int, act_bytes: int) -> float:
    """The token dispatcher's buffers of one MoE layer's forward on one rank (transient: freed after the
    layer; the copies kept for backward are in the activations). ``tokens``: the rank's tokens entering
    the layer. ``alltoall``: the k permuted copies, the all-to-all's receive buffer, the experts' output and
    the combine's receive buffer, each tokens·k·h; ``allgather``: the hidden states and fp32 routing
    probabilities of the whole EP group gathered and scattered back (2·ep·tokens·h + ep·tokens·E·4 B)
    plus the local experts' k-fold permuted input and output (2·tokens·k·h). 0 for a dense model."""
    moe = m.moe
    if moe is None:
        return 0.0
    h, k = m.hidden_size, moe.router_topk
    if moe.token_dispatcher == "alltoall":
        return 4.0 * tokens * k * h * act_bytes
    return (2.0 * ep * tokens * h + 2.0 * tokens * k * h) * act_bytes + ep * tokens * moe.num_experts * 4.0


def _params_note(m: ModelConfig, n: int, nbytes: int, *, tp: int, pp: int, ep: int, etp: int) -> str:
    """``params`` row note: the rank's count, and for MoE the model's total / active and the expert sharding."""
    note = f"{_count(n)} params x {nbytes} B"
    if m.moe is None:
        return note
    stage = max(range(pp), key=lambda i: stage_params(m, tp, pp, ep, etp)[i])
    exp = expert_params(m, tp, pp, ep, etp)[stage]
    return (note + f" (experts {_count(exp)} = /ep {ep} x etp {etp}, dense {_count(n - exp)} = /tp {tp}); "
            f"model {_count(count_params(m))} total, {_count(active_params(m))} active per token")


def _student_rows(cfg: Config, layout: RoleLayout, device_type: str) -> list[MemoryItem]:
    m, par, st = cfg.model, cfg.parallel, layout.student
    ep, etp = st.ep, st.expert_tp
    pbytes = dtype_bytes(cfg.precision.params_dtype, device_type)
    per_stage = stage_params(m, st.tp, st.pp, ep, etp)
    stage = max(range(st.pp), key=lambda i: per_stage[i])
    n = per_stage[stage]
    n_exp = expert_params(m, st.tp, st.pp, ep, etp)[stage]
    edp = max(1, st.tp * st.dp // (ep * etp))  # expert data parallel: the rank's expert shard's replicas
    opt_per_param = _ADAM_STATE_BYTES + (_MASTER_BYTES if pbytes < 4 else 0)
    # the distributed optimizer shards dense params over DP and expert params over expert-DP
    opt_full, opt_dist = n * opt_per_param, ((n - n_exp) / st.dp + n_exp / edp) * opt_per_param
    dist_opt = par.use_distributed_optimizer
    s, b = _seq_lengths(cfg), cfg.optim.micro_batch_size
    flash = _flash_attention(cfg, device_type)
    act_kw = dict(s=s, b=b, tp=st.tp, pp=st.pp, act_bytes=pbytes, sequence_parallel=par.sequence_parallel, flash_attention=flash)
    act = activation_bytes(m, recompute=m.recompute, method=m.recompute_method, num_layers=m.recompute_num_layers,
                           **act_kw)
    act_alt = activation_bytes(m, recompute="full" if m.recompute == "none" else "none", **act_kw)
    kv = 2 * (m.num_layers // st.pp) * (m.kv_heads // st.tp) * m.kv_channels * s * cfg.rollout.micro_batch_size * pbytes
    dp_note = f" / dp {st.dp}" + (f" (experts / expert-dp {edp})" if n_exp else "")
    rows = [
        MemoryItem("params", n * pbytes, _params_note(m, n, pbytes, tp=st.tp, pp=st.pp, ep=ep, etp=etp)),
        MemoryItem("grads", n * _FP32_GRAD_BYTES, "fp32 main grads (grad_reduce_in_fp32)"),
        MemoryItem(
            "optimizer", opt_dist if dist_opt else opt_full,
            f"Adam m,v{' + fp32 master' if pbytes < 4 else ''} = {opt_per_param} B/param" + (dp_note if dist_opt else ""),
            alt_bytes=opt_full if dist_opt else opt_dist,
            alt_label="without distributed optimizer" if dist_opt else f"with distributed optimizer (dp {st.dp})",
        ),
        MemoryItem(
            "activations", act, f"mb {b} x s {s}, {_recompute_label(m)}" + (", SP" if par.sequence_parallel else "")
            + (f", {st.pp} in flight" if st.pp > 1 else ""),
            alt_bytes=act_alt, alt_label="full recompute" if m.recompute == "none" else "no recompute",
        ),
        MemoryItem("logits", s * b * m.padded_vocab_size / st.tp * pbytes, "[s, b, V/tp] of one micro-batch"),
        MemoryItem("kv cache", kv, f"rollout mb {cfg.rollout.micro_batch_size} x {s} tokens"),
    ]
    if m.moe is not None:
        tokens = s * b // (st.tp if par.sequence_parallel else 1)
        rows.append(MemoryItem("dispatcher", dispatcher_bytes(m, tokens=tokens, ep=ep, act_bytes=pbytes),
                               f"{m.moe.token_dispatcher} buffers of one MoE layer, {tokens} tokens x top-{m.moe.router_topk}"))
    for i, t in enumerate(cfg.teachers):
        if t.placement == "colocated":
            tb = dtype_bytes(t.dtype, device_type)
            w = 0.0 if t.offload else max(stage_params(cfg.teacher_model(i)[0], st.tp, st.pp, ep, etp)) * tb
            rows.append(MemoryItem(f"teacher {t.name}", w, "offloaded to host" if t.offload else f"colocated, {tb} B/param"))
    return rows


def _teacher_rows(cfg: Config, layout: RoleLayout, role_name: str, device_type: str) -> list[MemoryItem]:
    role = layout.role(role_name)
    by_name = {t.name: i for i, t in enumerate(cfg.teachers)}
    rows = []
    biggest = 0
    for name in role.teachers:
        m = cfg.teacher_model(by_name[name])[0]  # each teacher's own architecture
        t = cfg.teachers[by_name[name]]
        ep, etp = role.ep, role.expert_tp
        tb = dtype_bytes(t.dtype, device_type)
        n = max(stage_params(m, role.tp, role.pp, ep, etp))
        rows.append(MemoryItem(f"weights {name}", n * tb,
                               _params_note(m, n, tb, tp=role.tp, pp=role.pp, ep=ep, etp=etp) + ", no fp8"))
        if m.moe is not None:
            tokens = _seq_lengths(cfg) * cfg.optim.micro_batch_size
            rows.append(MemoryItem(f"dispatcher {name}", dispatcher_bytes(m, tokens=tokens, ep=ep, act_bytes=tb),
                                   f"{m.moe.token_dispatcher} buffers of one MoE layer (scoring)"))
        biggest = max(biggest, tb)
    s, b = _seq_lengths(cfg), cfg.optim.micro_batch_size
    rows.append(MemoryItem("logits", s * b * m.padded_vocab_size / role.tp * biggest, "one scoring micro-batch"))
    return rows


def plan(
    cfg: Config,
    world_size: int,
    *,
    device_type: Optional[str] = None,
    gpu_memory_gib: Optional[float] = None,
    profile: Optional[DeviceProfile] = None,
) -> Plan:
    """Validate the role layout of ``cfg`` for ``world_size`` ranks and estimate per-rank memory.

    Args:
        cfg: the root config, every role's architecture known (``init: random``, or read from the
            checkpoints by :func:`camopd_megatron.checkpoint.inputs.resolve_inputs`, as ``--dry-run`` does).
        world_size: ranks of the planned launch (nodes × GPUs per node).
        device_type: ``cuda`` (``auto`` dtypes become bf16) or ``cpu``; default: the profile's, else cuda.
        gpu_memory_gib: warn in the report when a role's total exceeds this (default: the profile's memory).
        profile: a device profile (:mod:`camopd_megatron.planner.profiles`): adds the stage-time
            estimate and the teacher-rank suggestion (:mod:`camopd_megatron.planner.stages`).

    Raises ConfigError with every problem of the config, or LayoutError (a ConfigError) when
    its roles do not fill ``world_size``; creates no process group.
    """
    layout = RoleLayout.from_config(cfg, world_size)
    device_type = device_type or (profile.device_type if profile is not None else "cuda")
    if gpu_memory_gib is None and profile is not None:
        gpu_memory_gib = profile.memory_gib
    roles = [RoleMemory("student", "student", layout.student.ranks, layout.student.layout_str,
                        tuple(_student_rows(cfg, layout, device_type)))]
    for r in layout.roles[1:]:
        roles.append(RoleMemory(r.name, "teacher", r.ranks, r.layout_str, tuple(_teacher_rows(cfg, layout, r.name, device_type))))
    assumptions = (
        f"device {device_type}",
        f"params {cfg.precision.params_dtype} ({dtype_bytes(cfg.precision.params_dtype, device_type)} B)" + (f" (fp8 {cfg.precision.fp8}/{cfg.precision.fp8_recipe} GEMMs)" if cfg.precision.fp8 else ""),
        f"sequence {_seq_lengths(cfg)} tokens",
        "activations per Korthikanti et al. 2022" + (" with flash attention" if _flash_attention(cfg, device_type) else "")
        + f", {_recompute_label(cfg.model)} (model.recompute)",
        "CUDA context / NCCL buffers not counted",
    )
    stages = None
    if profile is not None:
        if profile.device_type != device_type:
            raise ValueError(f"device profile {profile.name!r} is for {profile.device_type}, the plan for {device_type}; "
                             f"drop --device or pass a {device_type} profile")
        stages = estimate(cfg, layout, profile)
    result = Plan(layout, tuple(roles), assumptions, gpu_memory_gib, stages)
    logger.debug("planned %d roles for world size %d", len(roles), world_size)
    return result
