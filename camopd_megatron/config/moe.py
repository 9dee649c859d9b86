"""Mixture-of-experts config (``model.moe``, ``teachers[i].model.moe``) and the expert-parallel layout rules.

A role whose ``model.moe`` is set builds megatron-core's MoE layer (router, token dispatcher, experts as
a ``SequentialMLP``) in the layers :attr:`MoEConfig.layer_pattern` marks; ``None`` is a dense model.
The expert-parallel sizes live with the other parallel sizes (``parallel.ep`` / ``parallel.etp``,
``teachers[i].ep`` / ``teachers[i].etp``); :func:`expert_layout_problems` is the one place their rules
are written, used by the config validation and by the role layout (which knows the derived DP size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from camopd_megatron.config.errors import problem

__all__ = ["MoEConfig", "expert_layout_problems", "moe_from_saved", "moe_arch", "MOE_ARCH_FIELDS", "lock_step_needed"]

MOE_ARCH_FIELDS = ("num_experts", "router_topk", "ffn_hidden_size", "shared_expert_ffn_hidden_size",
                   "shared_expert_gate", "layer_pattern", "router_pre_softmax")
"""The :class:`MoEConfig` fields that are the model's architecture: a checkpoint and the config that loads it
must agree on them. The others (loss coefficients, capacity, dispatcher, routing replay) are how a run
trains it, and the run's config may change them."""


@dataclass
class MoEConfig:
    """A mixture-of-experts model's expert layers (megatron-core's MoE layer; HF names in brackets)."""

    num_experts: int
    """Routed experts per MoE layer (HF ``num_experts`` / ``num_local_experts``)."""
    router_topk: int
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    ffn_hidden_size: int
    """Per-expert SwiGLU width (HF ``moe_intermediate_size``; Mixtral ``intermediate_size``)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Width of the shared expert every token also goes through (Qwen2-MoE ``shared_expert_intermediate_size``); None = none."""
    shared_expert_gate: bool = False
    """Sigmoid gate on the shared expert's output (Qwen2-MoE); needs ``shared_expert_ffn_hidden_size``."""
    layer_pattern: Optional[list[int]] = None
    """One 0/1 per layer, 1 = MoE layer, 0 = dense layer with ``model.ffn_hidden_size`` (Qwen3-MoE
    ``mlp_only_layers`` / ``decoder_sparse_step``); None = every layer is an MoE layer."""
    router_pre_softmax: bool = False
    """False: top-k of the logits, then softmax over those k (Mixtral; Qwen3-MoE ``norm_topk_prob: true``).
    True: softmax over all experts, then top-k, not renormalised (``norm_topk_prob: false``)."""
    aux_loss_coeff: float = 0.001
    """Load-balancing loss coefficient (HF ``router_aux_loss_coef``; megatron adds its gradient through
    ``MoEAuxLossAutoScaler``, scaled per micro-batch by the training loop); 0 = off."""
    z_loss_coeff: float = 0.0
    """Router z-loss coefficient; 0 = off."""
    capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the even share of tokens (tokens over it are dropped); None = no dropping."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """megatron token dispatcher. Both run on CPU/gloo; ``alltoall`` sends each token only to the EP ranks
    holding its experts, ``allgather`` gathers every token on every EP rank."""
    routing_replay: bool = False
    """Route the update as the rollout did (megatron's routing replay, ``moe_enable_routing_replay``): the
    rollout records every MoE layer's top-k experts per token and the training forwards (and the pre-update
    log-prob recompute) send each token to those experts, with gate weights from the current router. Without
    it a token may reach other experts in training than in sampling, one source of rollout/training mismatch
    in MoE RL. Costs int16 [tokens, MoE layers, top-k] per rollout. The student's only (teachers never train)."""

    def validate(self, prefix: str = "model.moe", *, num_layers: Optional[int] = None) -> list[str]:
        """In-section problems (empty when valid); ``num_layers`` checks :attr:`layer_pattern`'s length."""
        problems: list[str] = []
        for name in ("num_experts", "router_topk", "ffn_hidden_size", "shared_expert_ffn_hidden_size", "capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(problem(f"{prefix}.{name}", value, "a value > 0", f"set {prefix}.{name} to a positive number"))
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            if not value >= 0:
                problems.append(problem(f"{prefix}.{name}", value, "a value >= 0", f"set {prefix}.{name} to 0 (off) or more"))
        if self.num_experts > 0 and self.router_topk > self.num_experts:
            problems.append(problem(
                f"{prefix}.router_topk", self.router_topk, f"at most {prefix}.num_experts={self.num_experts}",
                f"lower {prefix}.router_topk",
            ))
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size is None:
            problems.append(problem(
                f"{prefix}.shared_expert_gate", True, f"a shared expert to gate ({prefix}.shared_expert_ffn_hidden_size)",
                f"set {prefix}.shared_expert_ffn_hidden_size or drop {prefix}.shared_expert_gate",
            ))
        pattern = self.layer_pattern
        if pattern is not None:
            if any(v not in (0, 1) for v in pattern):
                problems.append(problem(f"{prefix}.layer_pattern", pattern, "one 0 (dense) or 1 (MoE) per layer",
                                        "write e.g. [0, 1, 1, 1]"))
            elif not any(pattern):
                problems.append(problem(f"{prefix}.layer_pattern", pattern, "at least one MoE layer (a 1)",
                                        f"drop {prefix} for a dense model"))
            if num_layers is not None and len(pattern) != num_layers:
                problems.append(problem(
                    f"{prefix}.layer_pattern", pattern, f"{num_layers} entries (one per layer: model.num_layers={num_layers})",
                    f"give {prefix}.layer_pattern one 0/1 per layer",
                ))
        return problems

    @property
    def has_dense_layers(self) -> bool:
        """Some layers are dense (they use ``model.ffn_hidden_size``)."""
        return self.layer_pattern is not None and 0 in self.layer_pattern


def moe_arch(moe: Any) -> Optional[dict[str, Any]]:
    """The architecture part (:data:`MOE_ARCH_FIELDS`) of a :class:`MoEConfig` or a recorded dict; None: dense."""
    if moe is None:
        return None
    get = (lambda k: moe.get(k)) if isinstance(moe, dict) else (lambda k: getattr(moe, k))
    return {k: get(k) for k in MOE_ARCH_FIELDS}


def moe_from_saved(value: Any) -> Optional[MoEConfig]:
    """A manifest's recorded ``moe`` (a plain dict, or None for a dense model) as a :class:`MoEConfig`."""
    if value is None or isinstance(value, MoEConfig):
        return value
    return MoEConfig(**value)


def expert_layout_problems(
    moe: Optional[MoEConfig], *, tp: int, dp: Optional[int], ep: int, etp: Optional[int],
    keys: dict[str, str], moe_key: str, sequence_parallel: Optional[bool] = None,
) -> list[str]:
    """Problems of splitting ``moe``'s experts over a role's ``ep`` x ``etp`` ranks.

    The expert layers run on the role's own ranks, regrouped: inside each pipeline stage the TP x DP ranks
    are split into expert-TP x EP x expert-DP groups (``models.groups``). That regrouping must keep each
    expert-TP group inside one TP group and each EP group inside one pipeline stage, so: ``etp`` divides
    ``tp``, ``tp / etp`` divides ``ep`` (EP first fills the rest of the TP group), and ``ep / (tp / etp)``
    divides ``dp`` (then spans DP replicas). ``ep`` divides the experts, ``etp`` the expert FFN width.
    ``keys`` names the keys of ``tp``, ``dp``, ``ep``, ``etp`` and ``sp`` (sequence parallelism; checked
    only when ``sequence_parallel`` is given: megatron-core 0.19.2 trains an MoE layer with TP > 1 only
    under SP). Sizes that are not positive are skipped (the sections report them).
    """
    problems: list[str] = []
    etp_v = tp if etp is None else etp
    if moe is None:
        for name, value in (("ep", ep), ("etp", etp)):
            if value is not None and value != 1 and not (name == "etp" and value == tp):
                problems.append(problem(
                    keys[name], value, f"1: {moe_key} is not set (a dense model has no experts to split)",
                    f"drop {keys[name]}, or set {moe_key} for a mixture-of-experts model",
                ))
        return problems
    if min(tp, ep, etp_v) <= 0 or (dp is not None and dp <= 0):
        return problems
    if moe.num_experts > 0 and moe.num_experts % ep:
        problems.append(problem(
            keys["ep"], ep, f"a divisor of {moe_key}.num_experts={moe.num_experts} (each EP rank holds as many experts)",
            f"use a {keys['ep']} that divides the number of experts",
        ))
    if moe.ffn_hidden_size > 0 and moe.ffn_hidden_size % etp_v:
        problems.append(problem(
            keys["etp"], etp_v, f"a divisor of {moe_key}.ffn_hidden_size={moe.ffn_hidden_size} (expert tensor parallelism"
            f"{'; unset, it is ' + keys['tp'] if etp is None else ''})",
            f"set {keys['etp']} to a divisor of the expert FFN width",
        ))
    shared = moe.shared_expert_ffn_hidden_size
    if shared is not None and shared > 0 and shared % tp:
        problems.append(problem(
            keys["tp"], tp, f"a divisor of {moe_key}.shared_expert_ffn_hidden_size={shared}",
            f"use a {keys['tp']} that divides the shared expert's width",
        ))
    if tp % etp_v:
        problems.append(problem(
            keys["etp"], etp_v, f"a divisor of {keys['tp']}={tp} (each expert-TP group lies inside a TP group)",
            f"set {keys['etp']} to a divisor of {keys['tp']} (e.g. 1 or {tp})",
        ))
    else:
        inside = tp // etp_v  # EP ranks inside one TP group
        if ep % inside:
            problems.append(problem(
                keys["ep"], ep, f"a multiple of {keys['tp']} / {keys['etp']} = {inside} (the expert groups fill "
                "each TP group first)", f"set {keys['ep']} to a multiple of {inside}, or {keys['etp']} to {tp}",
            ))
        elif dp is not None and dp % (ep // inside):
            problems.append(problem(
                keys["ep"], ep, f"EP groups that tile the data-parallel replicas: {keys['ep']} / ({keys['tp']} / "
                f"{keys['etp']}) = {ep // inside} must divide {keys['dp']}={dp}",
                f"choose {keys['ep']} and {keys['dp']} so that it divides (e.g. {keys['dp']}: a multiple of {ep // inside})",
            ))
    if moe.token_dispatcher == "allgather" and lock_step_needed(tp, ep, etp):
        # the allgather dispatcher gathers equal-size token blocks over the EP group, but DP replicas hold
        # micro-batches of their own lengths (rollout decode, selection): only alltoall exchanges counts
        problems.append(problem(
            f"{moe_key}.token_dispatcher", "allgather", f"alltoall: with {keys['ep']}={ep} the expert groups span "
            "data-parallel replicas, whose micro-batches differ in length",
            f"set {moe_key}.token_dispatcher: alltoall, or keep {keys['ep']} x {keys['etp']} within {keys['tp']}",
        ))
    if sequence_parallel is not None and tp > 1 and not sequence_parallel:
        problems.append(problem(
            keys["sp"], False, f"true: megatron-core trains an MoE model ({moe_key}) with {keys['tp']}={tp} only under "
            "sequence parallelism", f"set {keys['sp']}: true, or {keys['tp']}: 1",
        ))
    return problems


def lock_step_needed(tp: int, ep: int, etp: Optional[int]) -> bool:
    """Whether a role's expert-parallel groups span data-parallel replicas, so that its replicas must run
    the same number of forwards (``models.pipeline``, "Lock-step"): an EP group fills the ``tp / etp``
    expert-TP slices of its TP group first (``models.groups``), so it reaches other replicas when
    ``ep · etp > tp`` (``etp`` None = ``tp``)."""
    return ep * (etp or tp) > tp
