"""Explicit megatron-core process groups for one role: ``HyperCommGrid`` -> ``ProcessGroupCollection``.

Rank order inside a role (fastest varying first): ``tp, cp, ep, pp, dp``, i.e.

    rank = rank_offset + tp + TP * (pp + PP * dp)          (cp = ep = 1 in the dense grid)

so each DP replica is a contiguous block of TP*PP ranks (the same order as
:mod:`camopd_megatron.parallel`). Context parallelism is size 1.

Expert parallelism (``ep``, expert TP ``etp``) regroups the TP x DP ranks of each pipeline stage for the
MoE layers, as a second factorisation (a ``HyperCommGrid`` view) of the same ranks:

    tp = etp + ETP * ep_tp,   dp = ep_dp + (EP / (TP/ETP)) * edp,   ep = ep_tp + (TP/ETP) * ep_dp

i.e. the view ``[etp, ep_tp, pp, ep_dp, edp]``: an expert-TP group lies inside a TP group, an EP group
fills the rest of the TP group (``TP/ETP`` ranks) and then spans ``EP/(TP/ETP)`` neighbouring DP
replicas of the same stage, and the expert-DP group is the remaining replicas (the rules
``config.moe.expert_layout_problems`` checks). The pipeline groups are shared by both factorisations.
megatron's own ``tp-pp-dp`` order would need EP x ETP = TP with PP > 1; this view has no such limit.
With EP = 1 and ETP = TP the expert groups alias the dense ones (no extra group is created).

Collective over the WORLD: every rank of the world must call :func:`simple_pg_collection` for
every role, in the same order (``torch.distributed.new_group`` semantics); a rank outside the role
gets ``None`` groups (megatron's non-member value) and must not use that collection.

Fields set (what GPTModel, the pipeline schedules/P2PCommunicator, megatron DDP,
``get_megatron_optimizer(pg_collection=...)``, ``finalize_model_grads`` and dist_checkpointing
metadata read): tp, cp, ep, pp, dp, dp_cp, tp_cp, mp (=tp×pp), tp_dp_cp, tp_ep, tp_ep_pp,
tp_ep_pp_with_egtp_remat, expt_tp, expt_dp, intra_dp_cp, intra_expt_dp, intra_dist_opt (the whole
role: the distributed optimizer's grad-norm group), dp_cp_gtp_remat, expt_dp_gtp_remat, embd
(first+last pipeline stage, tied embeddings), pos_embd (first stage); explicitly ``None``:
inter_dist_opt, gtp_remat, expt_gtp_remat, hcp (megatron reads "None" as "not used").
"""
from __future__ import annotations

import datetime
import logging
from typing import Any, Optional

import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)

DIM_NAMES = ("tp", "cp", "ep", "pp", "dp")
"""Grid dimensions, fastest varying first."""


def simple_pg_collection(
    tp: int,
    pp: int,
    dp: int,
    rank_offset: int = 0,
    *,
    timeout: Optional[datetime.timedelta] = None,
    ep: int = 1,
    etp: Optional[int] = None,
) -> ProcessGroupCollection:
    """Build one role's process groups on ranks ``[rank_offset, rank_offset + tp*pp*dp)``.

    Args:
        tp, pp, dp: the role's tensor-, pipeline- and data-parallel sizes.
        rank_offset: first global rank of the role.
        timeout: process-group timeout (None: the default group's).
        ep, etp: expert-parallel and expert tensor-parallel sizes of the MoE layers (etp None = tp).

    Returns:
        The collection (placeholders on ranks outside the role; see the module docstring).
    """
    etp = tp if etp is None else etp
    for key, value in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("etp", etp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"simple_pg_collection: {key}={value!r} must be a positive int")
    if tp % etp or ep % (tp // etp) or dp % (ep // (tp // etp)):
        raise ValueError(f"simple_pg_collection: ep={ep}, etp={etp} do not tile tp={tp} x dp={dp} "
                         "(etp | tp, tp/etp | ep, ep/(tp/etp) | dp); fix parallel.ep / parallel.etp")
    if not dist.is_initialized():
        raise RuntimeError("simple_pg_collection needs torch.distributed initialised (init_distributed())")
    world = dist.get_world_size()
    if rank_offset < 0 or rank_offset + tp * pp * dp > world:
        raise ValueError(
            f"role of tp*pp*dp={tp * pp * dp} ranks at rank_offset={rank_offset} does not fit the world "
            f"size {world}; fix the parallel layout"
        )
    kw: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    grid = HyperCommGrid([tp, 1, 1, pp, dp], list(DIM_NAMES), rank_offset=rank_offset)
    pgc = ProcessGroupCollection()
    pgc.tp = grid.create_pg("tp", **kw)
    pgc.cp = grid.create_pg("cp", **kw)
    pgc.ep = grid.create_pg("ep", **kw)
    pgc.pp = grid.create_pg("pp", **kw)
    pgc.dp = grid.create_pg("dp", **kw)
    pgc.dp_cp = grid.create_pg(["cp", "dp"], **kw)
    pgc.tp_cp = grid.create_pg(["tp", "cp"], **kw)
    pgc.mp = grid.create_pg(["tp", "pp"], **kw)
    pgc.tp_dp_cp = grid.create_pg(["tp", "cp", "dp"], **kw)
    pgc.tp_ep = grid.create_pg(["tp", "ep"], **kw)
    pgc.tp_ep_pp = grid.create_pg(["tp", "ep", "pp"], **kw)
    pgc.intra_dist_opt = grid.create_pg(list(DIM_NAMES), **kw)
    if ep == 1 and etp == tp:  # the expert groups are the dense ones
        pgc.expt_tp = pgc.tp
        pgc.expt_dp = pgc.dp_cp
    else:
        _expert_groups(grid, pgc, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, kw=kw)
    # CP = 1 and one distributed-optimizer instance: the remaining groups alias others.
    pgc.intra_dp_cp = pgc.dp_cp
    pgc.intra_expt_dp = pgc.expt_dp
    pgc.dp_cp_gtp_remat = pgc.dp_cp
    pgc.expt_dp_gtp_remat = pgc.expt_dp
    pgc.tp_ep_pp_with_egtp_remat = pgc.tp_ep_pp
    pgc.inter_dist_opt = None
    pgc.gtp_remat = None
    pgc.expt_gtp_remat = None
    pgc.hcp = None
    # Embedding groups: first+last stage of each pipeline (tied embeddings), first stage (positions).
    me = dist.get_rank()
    pgc.embd = None
    pgc.pos_embd = None
    for stages in grid.get_rank_enum("pp"):
        embd = dist.new_group(sorted({stages[0], stages[-1]}), **kw)
        pos = dist.new_group([stages[0]], **kw)
        if me in (stages[0], stages[-1]):
            pgc.embd = embd
        if me == stages[0]:
            pgc.pos_embd = pos
    return pgc


def _expert_groups(grid: HyperCommGrid, pgc: ProcessGroupCollection, *, tp: int, pp: int, dp: int, ep: int,
                   etp: int, kw: dict[str, Any]) -> None:
    """The expert groups from the ``expert`` view of ``grid`` (the factorisation in the module docstring)."""
    ep_tp = tp // etp
    ep_dp = ep // ep_tp
    view = "expert"
    grid.register_view(view, [etp, ep_tp, pp, ep_dp, dp // ep_dp], ["etp", "ep_tp", "pp", "ep_dp", "edp"],
                       shared_dims=["pp"])
    pgc.ep = grid.create_pg(["ep_tp", "ep_dp"], view=view, **kw)
    pgc.expt_tp = grid.create_pg("etp", view=view, **kw)
    pgc.expt_dp = grid.create_pg("edp", view=view, **kw)
    pgc.tp_ep = grid.create_pg(["etp", "ep_tp", "ep_dp"], view=view, **kw)
    pgc.tp_ep_pp = grid.create_pg(["etp", "ep_tp", "pp", "ep_dp"], view=view, **kw)


def in_collection(pgc: ProcessGroupCollection) -> bool:
    """True if this rank belongs to the role of ``pgc``."""
    return pgc.tp is not None and pgc.tp != dist.GroupMember.NON_GROUP_MEMBER


def pg_rank(group: Any) -> int:
    """This rank's index in ``group`` (0 for a None group)."""
    return 0 if group is None else dist.get_rank(group)


def pg_size(group: Any) -> int:
    """Size of ``group`` (1 for a None group)."""
    return 1 if group is None else dist.get_world_size(group)
