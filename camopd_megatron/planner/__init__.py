"""The dry-run planner (``camopd-train --dry-run --world-size N``): no GPUs, no torch.distributed, no torch.

* :mod:`~camopd_megatron.planner.counts` — parameter and FLOP counts, dense and MoE (total, active, per rank);
* :mod:`~camopd_megatron.planner.memory` — the role layout and per-rank memory tables (:func:`plan`);
* :mod:`~camopd_megatron.planner.profiles` — device profiles (GPU data sheets, a measured CPU profile);
* :mod:`~camopd_megatron.planner.stages` — the per-stage time estimate and teacher-rank suggestion.
"""
from camopd_megatron.planner.counts import (active_params, count_params, dtype_bytes, expert_params, forward_flops,
                                            stage_params)
from camopd_megatron.planner.memory import GIB, MemoryItem, Plan, RoleMemory, activation_bytes, dispatcher_bytes, plan
from camopd_megatron.planner.profiles import GPU_PROFILES, DeviceProfile, load_profile, profile_from_dict
from camopd_megatron.planner.stages import StageEstimate, StageTime, estimate, estimate_stages, suggest_teacher_dp

__all__ = ["plan", "Plan", "RoleMemory", "MemoryItem", "activation_bytes", "dispatcher_bytes", "GIB", "count_params", "active_params",
           "expert_params", "stage_params", "forward_flops", "dtype_bytes", "DeviceProfile", "GPU_PROFILES",
           "load_profile", "profile_from_dict", "StageEstimate", "StageTime", "estimate", "estimate_stages", "suggest_teacher_dp"]
