"""The teacher rank: frozen teacher models and the host loop that serves log-prob requests.

A :class:`TeacherHost` runs on every rank of a separate teacher group (see
:mod:`camopd_megatron.teachers.protocol` for the wire protocol): its input rank receives each
request from a student replica's leader and broadcasts it over the teacher replica, every rank runs
the forward (:func:`camopd_megatron.models.scoring.score_logprobs`), and the output rank (TP 0 of
the last stage) sends the log-probs back. A stream (protocol "Streams") is scored block by block through
a KV cache (:class:`~camopd_megatron.models.scoring.IncrementalScorer`) by a teacher that allows it, and
whole at its last block by any other. :class:`TeacherModel` is one frozen teacher on one role's
ranks; colocated teachers (:mod:`camopd_megatron.teachers.client`) use it on the student's ranks.
"""
from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn, Optional

import torch

from camopd_megatron.checkpoint.dist import load_model, save_checkpoint
from camopd_megatron.config.errors import ConfigError, problem
from camopd_megatron.config.moe import lock_step_needed
from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, stage_info
from camopd_megatron.models.pipeline import compute_device, wire_device
from camopd_megatron.models.precision import resolve_dtype, teacher_precision_kwargs
from camopd_megatron.models.scoring import IncrementalScorer, score_logprobs
from camopd_megatron.teachers.protocol import (
    HEADER_LEN, TAG_HEADER, TAG_MASK, TAG_MESSAGE, TAG_TOKENS, Command, StudentAborted, TeacherServiceError,
    decode_message, group_broadcast, header_temperature, p2p_recv, p2p_send, reply_tag,
)

if TYPE_CHECKING:
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from camopd_megatron.config import Config, ModelConfig
    from camopd_megatron.parallel import RankGroups, RoleLayout

logger = logging.getLogger(__name__)

__all__ = ["TeacherModel", "TeacherHost", "ServeStats"]


# ------------------------------------------------------------------------------------------------
# one frozen teacher model on one role's ranks
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Keep the caller's torch and megatron RNG streams (a colocated teacher is built on student ranks)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    try:
        saved_tracker = tracker.get_states()
    except Exception:  # noqa: BLE001 - an unseeded tracker has nothing to save
        saved_tracker = None
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    if saved_tracker:
        tracker.set_states(saved_tracker)


class TeacherModel:
    """One frozen teacher: this rank's TP shard of its pipeline stage, on its role's groups.

    Built with ``init_model_rng(run.seed)`` (so ``checkpoint: null`` gives the student's CPU-init
    weights for the same seed and layout), loaded from ``teachers[i].checkpoint`` (our distributed
    checkpoint; any saved TP/PP loads into this layout) and kept in eval mode without gradients.
    """

    def __init__(self, name: str, index: int, model_cfg: "ModelConfig", pg_collection: "ProcessGroupCollection", *,
                 seed: int,
                 checkpoint: Optional[str], dtype: str = "auto", offload: bool = False,
                 micro_batch_rows: Optional[int] = None, lock_step: Optional["dist.ProcessGroup"] = None) -> None:
        self.name, self.index, self.model_cfg, self.pgc = name, index, model_cfg, pg_collection
        self.key = f"teachers[{index}]"
        self.offload, self.micro_batch_rows = offload, micro_batch_rows
        # an expert-parallel MoE teacher: its replicas score in lock-step over this DP group (models.pipeline)
        self.lock_step = lock_step
        self.stage = stage_info(pg_collection)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = compute_device()
        params_dtype = resolve_dtype(dtype, device_type)
        with _preserved_rng():
            init_model_rng(seed, pg_collection)
            self.model = build_gpt_model(model_cfg, pg_collection, params_dtype=params_dtype,
                                         config_extra=teacher_precision_kwargs(SimpleNamespace(dtype=dtype), device_type))
        if checkpoint is not None:
            load_model(self.model, checkpoint, model_cfg=model_cfg, pg_collection=pg_collection,
                       key=f"{self.key}.checkpoint")
        self.model.eval()
        self.model.requires_grad_(False)
        if offload:
            self._move("cpu")
        self.incremental = lock_step is None and not offload and IncrementalScorer.supported(self.model, pg_collection)
        """Scores a stream block by block through a KV cache (``models.scoring.IncrementalScorer``); else a
        stream is scored whole at its last block (protocol "Streams")."""
        logger.info("teacher %r (%s) ready: dtype %s, checkpoint %s, pp stage %d/%d", name, self.key, params_dtype,
                    checkpoint or "random init (run.seed)", self.stage.pp_rank, self.stage.pp_size)

    # -------------------------------------------------------------- offload (colocated)
    def _move(self, device: str | torch.device) -> None:
        """Move weights between host and device memory (a no-op on a CPU-only machine)."""
        self.model.to(device)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Weights on the compute device inside the block; back to host memory after when offloading."""
        if self.offload:
            self._move(self.device)
        try:
            yield
        finally:
            if self.offload:
                self._move("cpu")

    # -------------------------------------------------------------- scoring
    def logprobs(self, tokens_BT: torch.Tensor, mask_BT: torch.Tensor, *, temperature: float = 1.0,
                 to_all_stages: bool = False, timeout_s: Optional[float] = None) -> Optional[torch.Tensor]:
        """Sampled-token log-probs fp32 [B, T] of softmax(logits / ``temperature``)
        (``next_token_logprobs`` alignment, 0 where masked) on the last pipeline stage (every TP rank
        of it), on the wire device; None on the other stages (``to_all_stages``: on every stage, see
        :func:`~camopd_megatron.models.scoring.score_logprobs`)."""
        return score_logprobs(self.model, self.pgc, tokens_BT, mask_BT, micro_batch=self.micro_batch_rows,
                              vocab_size=self.model_cfg.vocab_size, temperature=temperature, device=self.device,
                              to_all_stages=to_all_stages, timeout_s=timeout_s, lock_step=self.lock_step)


# ------------------------------------------------------------------------------------------------
# one open stream (protocol "Streams")
# ------------------------------------------------------------------------------------------------
class _Stream:
    """One student replica's open stream to one teacher on this replica: its blocks scored on arrival
    through a KV cache (:attr:`TeacherModel.incremental`), or kept and scored whole at the last one."""

    def __init__(self, teacher: TeacherModel, rows: int, capacity: int, temperature: float,
                 device: torch.device) -> None:
        self.teacher, self.rows, self.capacity, self.temperature = teacher, rows, capacity, temperature
        self.end = 0  # columns received
        self.owed: list[tuple[int, int]] = []  # (start, n) of blocks whose reply is not sent yet
        self.scorer = (IncrementalScorer(teacher.model, rows=rows, capacity=capacity,
                                         vocab_size=teacher.model_cfg.vocab_size, temperature=temperature)
                       if teacher.incremental and rows else None)
        if self.scorer is None:
            self.tokens = torch.zeros(rows, capacity, dtype=torch.int64, device=device)
            self.mask = torch.zeros(rows, capacity, dtype=torch.uint8, device=device)

    def extend(self, start: int, tokens_Bn1: torch.Tensor, mask_Bn: torch.Tensor,
               last: bool) -> list[torch.Tensor]:
        """Take the block of columns [start, start + n); return the replies now due, in order (none on a rank
        off the last pipeline stage)."""
        n = mask_Bn.shape[1]
        self.owed.append((start, n))
        if self.scorer is not None:
            due = [self.scorer.extend(tokens_Bn1, mask_Bn)]
        else:
            self.tokens[:, start:start + n + 1] = tokens_Bn1
            self.mask[:, start:start + n] = mask_Bn
            if not last:
                self.end = start + n
                return []
            width = start + n + 1 if self.rows else 1  # an empty stream under lock-step joins the others' forwards
            logp = (self.teacher.logprobs(self.tokens[:, :width], self.mask[:, :width], temperature=self.temperature)
                    if self.rows or self.teacher.lock_step is not None else None)
            due = [] if logp is None else [logp[:, s:s + k] for s, k in self.owed]
        self.end = start + n
        self.owed.clear()
        return due


# ------------------------------------------------------------------------------------------------
# the host loop on teacher ranks
# ------------------------------------------------------------------------------------------------
@dataclass
class ServeStats:
    """What one :meth:`TeacherHost.serve` call did (per rank)."""

    requests: dict[str, int] = field(default_factory=dict)
    """Teacher name → requests scored."""
    tokens: int = 0
    bytes_sent: int = 0
    """Payload bytes this rank sent to students (output rank only)."""
    shutdowns: int = 0
    saves: int = 0
    last_step: int = 0
    """Steps done at the student's last ``step`` or ``save`` command."""
    stopped: Optional[str] = None
    """Why the world agreed to stop early (what ``on_step`` returned), else None."""


class TeacherHost:
    """Serves the teachers of one separate teacher group on this rank (every rank of the group runs it).

    Args:
        cfg: the root config (``model``, ``run.seed``, ``teachers``, ``parallel.timeout_s``).
        layout: the world's :class:`~camopd_megatron.parallel.RoleLayout`.
        groups: this rank's :class:`~camopd_megatron.parallel.RankGroups` (a teacher role).
        timeout_s: bound on every wait inside a request (default ``parallel.timeout_s``).
        idle_timeout_s: bound on the wait for the next request (default: ``timeout_s``); must exceed
            the student's longest step (rollout + update). A dead student is detected at once anyway.
        micro_batch_rows: rows per pipeline micro-batch (None: the whole request at once).
    """

    def __init__(self, cfg: "Config", layout: "RoleLayout", groups: "RankGroups", *, timeout_s: Optional[float] = None,
                 idle_timeout_s: Optional[float] = None, micro_batch_rows: Optional[int] = None) -> None:
        if groups.is_student:
            raise ValueError(f"TeacherHost runs on teacher ranks; rank {groups.rank} is a student rank")
        self.role, self.rank, self.pgc = groups.role, groups.rank, groups.pg_collection
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.parallel.timeout_s)
        self.idle_timeout_s = float(idle_timeout_s if idle_timeout_s is not None else self.timeout_s)
        index = {t.name: i for i, t in enumerate(cfg.teachers)}
        self.models: dict[int, TeacherModel] = {}
        # EP groups across this group's replicas: an MoE teacher scores in lock-step (every replica gets the
        # same requests in the same order: RoleLayout routes the same number of student replicas to each)
        lock = self.pgc.dp if lock_step_needed(self.role.tp, self.role.ep, self.role.expert_tp) else None
        for name in self.role.teachers:  # time-shared group: one model per hosted teacher
            t = cfg.teachers[index[name]]
            tm = cfg.teacher_model(index[name])[0]
            self.models[index[name]] = TeacherModel(
                name, index[name], tm, self.pgc, seed=cfg.run.seed, checkpoint=t.checkpoint,
                dtype=t.dtype, offload=False, micro_batch_rows=micro_batch_rows,
                lock_step=lock if tm.moe is not None else None)
        dp = groups.dp_rank
        self.input_rank = self.role.rank_at(0, 0, dp)
        self.output_rank = self.role.rank_at(0, self.role.pp - 1, dp)
        routes = layout.routes(self.role.teachers[0])  # teachers of one group share routes
        self.senders: list[tuple[int, int]] = [(r.student_rank, r.student_dp) for r in routes if r.teacher_dp == dp]
        served = [sum(r.teacher_dp == d for r in routes) for d in range(self.role.dp)]
        if any(m.lock_step is not None for m in self.models.values()) and len(set(served)) > 1:
            # the layout refuses it when the config names the teachers' moe; a checkpoint's moe is known only now
            raise ConfigError([problem(
                f"teachers[{index[self.role.teachers[0]]}].dp", self.role.dp,
                f"a divisor of the student's DP={len(routes)}: an expert-parallel MoE teacher's replicas run in "
                f"lock-step and must serve the same number of student replicas (now {served})",
                "set the teacher group's dp to a divisor of the student's")])
        self.vocab_size = cfg.model.vocab_size
        self.model_cfg = cfg.model
        self.device = wire_device()
        self.streams: dict[tuple[tuple[int, int], int], _Stream] = {}
        """Open streams by (sender, teacher id)."""

    def _peer(self, student_rank: int, student_dp: int) -> str:
        return f"role 'student' rank {student_rank} (DP replica {student_dp} leader)"

    def _me(self) -> str:
        return f"role {self.role.name!r} rank {self.input_rank} (this teacher replica's input rank)"

    ABORT_GRACE_S = 30.0
    """After one student replica's ``abort``: the longest wait for each other routed replica's (they
    usually fail at the same point); without it a second abort would be sent to a teacher that exited."""

    def serve(self, on_step: Optional[Callable[[int], Optional[str]]] = None) -> ServeStats:
        """Answer requests until every routed student replica sent ``shutdown``.

        ``step``: once every routed student replica sent it, ``on_step(steps done)`` runs on every rank
        of this replica (the trainer's world-wide stop agreement, a collective the student ranks join
        at the same point); what it returns is kept in ``ServeStats.stopped``. ``abort``: the aborts of
        the other routed student replicas are taken too (bounded by :attr:`ABORT_GRACE_S`), then
        :class:`StudentAborted` on every rank of the replica.
        """
        stats = ServeStats()
        open_senders = list(self.senders)
        logger.info("role %s rank %d serving %s for student replica(s) %s", self.role.name, self.rank,
                    [m.name for m in self.models.values()], [d for _, d in open_senders])
        # SAVE and STEP are world-collective: every routed replica asks at the same point of its step
        # sequence, and this replica joins once all of them did
        save_requests: set[tuple[int, int]] = set()
        step_requests: set[tuple[int, int]] = set()
        self.streams.clear()

        def handle(sender: tuple[int, int]) -> None:
            header = self._next_header(sender)
            cmd, tid, b, t, temp_bits, nmsg, start, last = (int(v) for v in header.tolist())
            if cmd == Command.SHUTDOWN:
                open_senders.remove(sender)
                stats.shutdowns += 1
                return
            if cmd == Command.ABORT:
                open_senders.remove(sender)
                self._abort(sender, nmsg, open_senders)
            if cmd == Command.SAVE:
                path = self._message(sender, nmsg, "save path")
                save_requests.add(sender)
                if save_requests >= set(open_senders):
                    save_checkpoint(path, None, model_cfg=self.model_cfg, step=b, overwrite=True)
                    save_requests.clear()
                    stats.saves += 1
                    stats.last_step = b
                return
            if cmd == Command.STEP:
                step_requests.add(sender)
                if step_requests >= set(open_senders):
                    step_requests.clear()
                    stats.last_step = b
                    reason = on_step(b) if on_step is not None else None
                    stats.stopped = stats.stopped or reason
                return
            if cmd not in (Command.SCORE, Command.OPEN, Command.EXTEND):
                self._bad_request(sender, f"unknown command {cmd}")
            if tid not in self.models:
                self._bad_request(sender, f"command {cmd} for teacher id {tid}, which this group does not host")
            if cmd == Command.SCORE:
                self._answer(sender, self.models[tid], b, t, header_temperature(temp_bits), stats)
            elif cmd == Command.OPEN:
                self._open(sender, self.models[tid], b, t, header_temperature(temp_bits), stats)
            else:
                self._extend(sender, self.models[tid], b, t, start, bool(last), stats)

        while open_senders:
            for sender in list(open_senders):
                handle(sender)  # one turn: a request, or every request while the sender has a stream open
                while sender in open_senders and any(key[0] == sender for key in self.streams):
                    handle(sender)
        logger.info("role %s rank %d: shutdown after %s", self.role.name, self.rank, stats.requests)
        return stats

    def _next_header(self, sender: tuple[int, int], grace_s: Optional[float] = None) -> torch.Tensor:
        """The sender's next header on every rank of the replica. With ``grace_s``: wait at most that
        long and give an all-zero header (no command) instead of raising when nothing came."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        wait_s = self.idle_timeout_s if grace_s is None else grace_s
        if self.rank == self.input_rank:
            try:
                p2p_recv(header, sender[0], tag=TAG_HEADER, timeout_s=wait_s, peer=self._peer(*sender),
                         what=f"teacher role {self.role.name!r} rank {self.rank} waiting for the next request")
            except TeacherServiceError:
                if grace_s is None:
                    raise
                header.zero_()
        # the other ranks wait out the input rank's grace too
        bcast_s = self.idle_timeout_s if grace_s is None else grace_s + self.timeout_s
        return group_broadcast(header, self.input_rank, self.pgc.mp, timeout_s=bcast_s,
                               peer=self._me(),
                               what=f"teacher role {self.role.name!r} rank {self.rank} waiting for a request header")

    def _message(self, sender: tuple[int, int], nmsg: int, what: str) -> str:
        """Receive a text message of ``nmsg`` bytes from ``sender`` on every rank of the replica."""
        msg = torch.zeros(max(nmsg, 1), dtype=torch.uint8, device=self.device)
        if nmsg and self.rank == self.input_rank:
            p2p_recv(msg[:nmsg], sender[0], tag=TAG_MESSAGE, timeout_s=self.timeout_s, peer=self._peer(*sender),
                     what=what)
        if nmsg:
            group_broadcast(msg, self.input_rank, self.pgc.mp, timeout_s=self.timeout_s, peer=self._me(), what=what)
        return decode_message(msg[:nmsg])

    def _abort(self, sender: tuple[int, int], nmsg: int, others: list[tuple[int, int]]) -> NoReturn:
        """Raise StudentAborted with ``sender``'s message, after taking the abort (or shutdown) of each
        replica in ``others``; one that sends anything else, or nothing within the grace, is left to its
        own timeout."""
        text = self._message(sender, nmsg, "abort message")
        grace = min(self.ABORT_GRACE_S, self.idle_timeout_s)
        for other in others:
            cmd, *_, other_nmsg = (int(v) for v in self._next_header(other, grace_s=grace).tolist())
            if cmd == Command.ABORT:
                self._message(other, other_nmsg, "abort message")
            elif cmd != Command.SHUTDOWN:
                break
        raise StudentAborted(f"role {self.role.name!r} rank {self.rank}: the student aborted "
                             f"({self._peer(*sender)}): {text or 'no message'}")

    def _bad_request(self, sender: tuple[int, int], why: str) -> NoReturn:
        raise TeacherServiceError(
            f"role {self.role.name!r} rank {self.rank}: bad request from {self._peer(*sender)}: {why} (this group "
            f"hosts ids {sorted(self.models)}; the student and teachers must run the same camopd_megatron and config)")

    def _bad_stream(self, sender: tuple[int, int], teacher: TeacherModel, why: str) -> NoReturn:
        raise TeacherServiceError(f"role {self.role.name!r} rank {self.rank}: bad stream request from "
                                  f"{self._peer(*sender)} for teacher {teacher.name!r}: {why}")

    def _open(self, sender: tuple[int, int], teacher: TeacherModel, rows: int, capacity: int, temperature: float,
              stats: ServeStats) -> None:
        if (sender, teacher.index) in self.streams:
            self._bad_stream(sender, teacher, "opened while its previous stream is still open")
        if rows < 0 or capacity < 1:
            self._bad_stream(sender, teacher, f"a stream of {rows} rows and capacity {capacity} (rows >= 0 and "
                                              f"capacity >= 1)")
        stats.requests[teacher.name] = stats.requests.get(teacher.name, 0) + 1
        self.streams[(sender, teacher.index)] = _Stream(teacher, rows, capacity, temperature, self.device)

    def _extend(self, sender: tuple[int, int], teacher: TeacherModel, b: int, n: int, start: int, last: bool,
                stats: ServeStats) -> None:
        stream = self.streams.get((sender, teacher.index))
        if stream is None:
            self._bad_stream(sender, teacher, "a block for a stream that is not open")
        if b != stream.rows:
            self._bad_stream(sender, teacher, f"a block of {b} rows for a stream of {stream.rows}")
        if start != stream.end:
            self._bad_stream(sender, teacher, f"a block at column {start}; the stream continues at column {stream.end}")
        if n < 0 or start + n + (n > 0) > stream.capacity:  # tokens of columns [start, start + n] travel
            self._bad_stream(sender, teacher, f"a block of columns [{start}, {start + n}) (tokens up to column "
                                              f"{start + n}) for a stream of capacity {stream.capacity}")
        tokens, mask = self._payload(sender, (b, n + 1), (b, n), "block")
        stats.tokens += b * n
        if last:
            del self.streams[(sender, teacher.index)]
        try:
            replies = stream.extend(start, tokens, mask, last)
        except Exception:
            if self.rank == self.output_rank:  # +inf for every reply owed (see _answer)
                for _, k in stream.owed:
                    if b * k:
                        self._reply(sender, teacher, torch.full((b, k), float("inf"), device=self.device), stats,
                                    what="failure reply")
            raise
        if self.rank == self.output_rank:
            for out in replies:
                if out.numel():
                    self._reply(sender, teacher, out, stats)

    def _payload(self, sender: tuple[int, int], token_shape: tuple[int, int], mask_shape: tuple[int, int],
                 what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's tokens and mask on every rank of the replica (none sent for an empty mask)."""
        tokens = torch.zeros(token_shape, dtype=torch.int64, device=self.device)
        mask = torch.zeros(mask_shape, dtype=torch.uint8, device=self.device)
        if not mask.numel():
            return tokens, mask
        if self.rank == self.input_rank:
            peer = self._peer(*sender)
            p2p_recv(tokens, sender[0], tag=TAG_TOKENS, timeout_s=self.timeout_s, peer=peer, what=f"{what} tokens")
            p2p_recv(mask, sender[0], tag=TAG_MASK, timeout_s=self.timeout_s, peer=peer, what=f"{what} mask")
        for x, name in ((tokens, "tokens"), (mask, "mask")):  # every TP/PP rank of the replica needs them
            group_broadcast(x, self.input_rank, self.pgc.mp, timeout_s=self.timeout_s, peer=self._me(),
                            what=f"{what} {name}")
        return tokens, mask

    def _reply(self, sender: tuple[int, int], teacher: TeacherModel, out: torch.Tensor, stats: ServeStats,
               what: str = "reply") -> None:
        p2p_send(out.to(self.device, torch.float32).contiguous(), sender[0], tag=reply_tag(teacher.index),
                 timeout_s=self.timeout_s, peer=self._peer(*sender), what=what)
        stats.bytes_sent += out.numel() * 4

    def _answer(self, sender: tuple[int, int], teacher: TeacherModel, b: int, t: int, temperature: float,
                stats: ServeStats) -> None:
        stats.requests[teacher.name] = stats.requests.get(teacher.name, 0) + 1
        if b * t == 0:
            if teacher.lock_step is not None:  # nothing to score here; join the other replicas' forwards
                teacher.logprobs(torch.zeros((0, t), dtype=torch.int64, device=self.device),
                                 torch.zeros((0, t), dtype=torch.uint8, device=self.device), temperature=temperature)
            return
        tokens, mask = self._payload(sender, (b, t), (b, t), "request")
        stats.tokens += b * t
        try:
            out = teacher.logprobs(tokens, mask, temperature=temperature)
        except Exception:
            if self.rank == self.output_rank:  # tell the student now instead of letting it time out
                # +inf: impossible as a log-prob, so the student can tell a failure from a NaN score
                self._reply(sender, teacher, torch.full((b, t), float("inf"), device=self.device), stats,
                            what="failure reply")
            raise
        if self.rank == self.output_rank and out is not None:
            self._reply(sender, teacher, out, stats)
