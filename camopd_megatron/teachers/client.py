"""The student side of the teachers: placement checks, the client, colocated teachers, the factory.

One factory, :func:`build_teachers`, called on every rank of the world after
:func:`~camopd_megatron.parallel.build_process_groups`::

    client, host = build_teachers(cfg, layout, groups)
    if host is not None:            # a teacher rank: serve until the student shuts down
        host.serve(); return
    try:
        logp_BT = client.score("general", tokens_BT, loss_mask_BT)   # collective over student ranks
        ...
    except BaseException as e:
        client.close(error=e); raise
    client.close()

* Student ranks get a :class:`TeacherClient`: each branch is routed to the one teacher listing it
  in ``teachers[i].branches``, either a *separate* teacher group (point-to-point requests, see
  :mod:`camopd_megatron.teachers.protocol`) or a :class:`ColocatedTeacher` on the student's
  own ranks and groups. Either way ``score`` returns the same float32 ``[B, T]`` on every rank of
  the calling student DP replica (all its TP and PP ranks).
* Teacher ranks get a :class:`~camopd_megatron.teachers.host.TeacherHost` hosting the
  model(s) of its group.

Before any collective, :func:`check_teachers` runs on every rank (pure config + local file reads),
so a bad setup fails everywhere with the same message naming the config key: a teacher the layout
does not place, a missing/corrupt checkpoint, an architecture field the checkpoint contradicts, or a
vocabulary that differs from the student's (both sizes named); each teacher's architecture is read from
its own checkpoint. The config's own teacher rules are checked when it is validated.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

import torch

from camopd_megatron.checkpoint.dist import CheckpointError
from camopd_megatron.checkpoint.inputs import resolve_models
from camopd_megatron.config.errors import ConfigError, problem
from camopd_megatron.config.moe import lock_step_needed
from camopd_megatron.models.pipeline import wire_device
from camopd_megatron.teachers.host import TeacherHost, TeacherModel
from camopd_megatron.teachers.protocol import (
    TAG_HEADER, TAG_MASK, TAG_MESSAGE, TAG_TOKENS, Command, TeacherServiceError, Transfer, check_batch,
    encode_message, group_broadcast, header, p2p_irecv, p2p_isend, p2p_send, reply_tag, teacher_ids,
)

if TYPE_CHECKING:
    from camopd_megatron.config import Config
    from camopd_megatron.parallel import RankGroups, RoleLayout, Route

logger = logging.getLogger(__name__)

__all__ = ["build_teachers", "check_teachers", "TeacherClient", "ColocatedTeacher", "PendingScore"]


# ------------------------------------------------------------------------------------------------
# checks that run on every rank before any collective
# ------------------------------------------------------------------------------------------------
def check_teachers(cfg: "Config", layout: "RoleLayout") -> "Config":
    """Refuse a bad teacher setup on every rank, before any process group is used; return ``cfg`` with
    every teacher's architecture read from its checkpoint (:func:`~camopd_megatron.checkpoint.inputs.resolve_models`).

    The config's own rules (a teacher with no branch, a branch with two teachers, ...) are checked
    when it is validated (``Config.validate``; ``RoleLayout.from_config`` refuses a config that fails).

    Raises:
        ConfigError: a teacher the layout does not place.
        CheckpointError: a missing, incomplete or corrupt checkpoint, an architecture field set in the
            config that the checkpoint contradicts, or a teacher whose vocabulary differs from the
            student's (every problem, one per line).
    """
    problems: list[str] = []
    for i, t in enumerate(cfg.teachers):
        if t.name not in layout.teacher_role:
            problems.append(problem(f"teachers[{i}].name", t.name, "a teacher of the planned layout",
                                    "plan the layout from this config (RoleLayout.from_config)"))
    if problems:
        raise ConfigError(problems)
    resolved, bad = resolve_models(cfg)
    if bad:
        raise CheckpointError("\n".join(bad))
    return resolved


# ------------------------------------------------------------------------------------------------
# colocated teachers (student ranks, student groups)
# ------------------------------------------------------------------------------------------------
class ColocatedTeacher:
    """A teacher running on the student's ranks with the student's process groups and layout.

    ``score`` is collective over the student role, each DP replica scoring its own batch; the last
    pipeline stage computes the log-probs and broadcasts them to the earlier stages, so every rank
    of the replica returns them. With ``teachers[i].offload`` the weights live in host memory
    between calls (moved to the device for each call; a no-op on a CPU-only machine).
    """

    def __init__(self, cfg: "Config", index: int, groups: "RankGroups", *, timeout_s: Optional[float] = None,
                 micro_batch_rows: Optional[int] = None) -> None:
        t = cfg.teachers[index]
        self.name, self.index = t.name, index
        self.pgc = groups.student_pg_collection
        self.vocab_size = cfg.model.vocab_size
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.parallel.timeout_s)
        # its own architecture on the student's layout (Config.validate checked that it splits there)
        tm = cfg.teacher_model(index)[0]
        par = cfg.parallel  # an MoE teacher on the student's expert groups: lock-step over its DP group
        lock = self.pgc.dp if tm.moe is not None and lock_step_needed(par.tp, par.ep, par.etp) else None
        self.teacher = TeacherModel(t.name, index, tm, self.pgc, seed=cfg.run.seed, checkpoint=t.checkpoint,
                                    dtype=t.dtype, offload=t.offload, micro_batch_rows=micro_batch_rows,
                                    lock_step=lock)

    def score(self, tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """Teacher log-probs float32 [B, T] of softmax(logits / ``temperature``) (``next_token_logprobs``
        alignment, 0 where masked)."""
        b, t = check_batch(tokens_BT, loss_mask_BT, vocab_size=self.vocab_size, group=self.pgc.mp,
                           what=f"colocated teacher {self.name!r}")
        if b * t == 0 and self.teacher.lock_step is None:
            return torch.zeros(b, t, dtype=torch.float32, device=tokens_BT.device)
        with self.teacher.in_use():  # (under lock-step an empty batch joins the other replicas' forwards)
            return self.teacher.logprobs(tokens_BT, (loss_mask_BT != 0).to(torch.uint8), temperature=temperature,
                                         to_all_stages=True, timeout_s=self.timeout_s)


# ------------------------------------------------------------------------------------------------
# the student-side client
# ------------------------------------------------------------------------------------------------
class TeacherClient:
    """Scores branches on student ranks: separate teachers over point-to-point, colocated ones in place.

    Every call is collective over all ranks of the student role (every DP replica calls with its own
    batch, possibly empty); only the replica's leader (TP 0 of its last stage, ``Route.student_rank``)
    exchanges messages, then broadcasts the answer over the replica's TP × PP group. Byte counters
    of the leader are in :attr:`stats`.
    """

    def __init__(self, cfg: "Config", layout: "RoleLayout", groups: "RankGroups", *,
                 colocated: Optional[dict[str, ColocatedTeacher]] = None,
                 timeout_s: Optional[float] = None) -> None:
        if not groups.is_student:
            raise ValueError(f"TeacherClient runs on student ranks; rank {groups.rank} is in role {groups.role_name!r}")
        self.rank, self.pgc = groups.rank, groups.pg_collection
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.parallel.timeout_s)
        self.vocab_size = cfg.model.vocab_size
        self.ids = teacher_ids(cfg.teachers)
        self.branch_teacher = {b: t.name for t in cfg.teachers for b in t.branches}
        self.colocated = dict(colocated or {})
        self.routes = {n: layout.routes(n)[groups.dp_rank] for n in self.ids if layout.teacher_role[n] != "student"}
        self.group_of = {n: layout.teacher_role[n] for n in self.routes}
        self.stats: dict[str, int] = {"requests": 0, "bytes_sent": 0, "bytes_received": 0}
        self.closed = False
        self._inflight: list[PendingScore] = []
        """Submitted requests whose result was not taken yet, oldest first."""

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(self.branch_teacher)

    def teacher_for(self, branch: str) -> str:
        """Name of the teacher scoring ``branch`` (ValueError naming the served branches otherwise)."""
        if branch not in self.branch_teacher:
            raise ValueError(f"no teacher serves branch {branch!r}; teachers[*].branches cover {sorted(self.branch_teacher)}")
        return self.branch_teacher[branch]

    def _peer(self, route: "Route", rank: int) -> str:
        return f"teacher {route.teacher!r} (role {self.group_of[route.teacher]!r} rank {rank})"

    def score(self, branch: str, tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor, *,
              temperature: float = 1.0) -> torch.Tensor:
        """Teacher log-probs of the sampled tokens: float32 [B, T], ``out[b, t] = log π_T(tokens[b, t+1])``
        (the ``next_token_logprobs`` alignment; 0 where ``loss_mask_BT`` is 0 and in the last column),
        π_T = softmax(teacher logits / ``temperature``) (``loss.teacher_temperature``; a separate
        teacher gets it in the request header).

        Collective over every student rank; every rank of a DP replica passes the same batch and gets
        the result. ``B = 0`` is allowed (an empty result, still collective).
        """
        name = self.teacher_for(branch)
        if name in self.colocated:
            return self.colocated[name].score(tokens_BT, loss_mask_BT, temperature=temperature)
        return self._request(name, tokens_BT, loss_mask_BT, temperature)

    def is_separate(self, branch: str) -> bool:
        """True when ``branch``'s teacher runs on its own ranks (its requests can be in flight, see :meth:`stream`)."""
        return self.teacher_for(branch) not in self.colocated

    def stream(self, branch: str, rows: int, capacity: int, *, temperature: float = 1.0) -> "PendingScore":
        """Open a stream to ``branch``'s separate teacher (protocol "Streams"): ``rows`` sequences whose
        positions lie in [0, ``capacity``), sent block by block with :meth:`PendingScore.extend` while they
        are decoded; :meth:`PendingScore.result` gives their log-probs as :meth:`score` would (up to float
        rounding where the teacher scores blocks through a KV cache).

        Collective like :meth:`score` (every rank of the replica makes the same calls; only the leader
        sends; no collective inside). Open every stream of a micro-batch (one per separate branch, empty
        ones too) before sending any block: that keeps the student replicas in step at a shared teacher
        replica.
        """
        name = self.teacher_for(branch)
        if name in self.colocated:
            raise ValueError(f"stream: branch {branch!r} is scored by the colocated teacher {name!r} on the student's "
                             "own ranks; call score() instead")
        if rows < 0 or capacity < 1:
            raise ValueError(f"stream: rows={rows} must be >= 0 and capacity={capacity} >= 1")
        pending = self._pending(name, rows, 0, device=torch.device("cpu"))
        pending.capacity = capacity
        self._send(pending, header(Command.OPEN, self.ids[name], rows, capacity, temperature), "stream open")
        return pending

    def _request(self, name: str, tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
                 temperature: float) -> torch.Tensor:
        return self._post(name, tokens_BT, loss_mask_BT, temperature).result()

    def _pending(self, name: str, rows: int, width: int, device: torch.device) -> "PendingScore":
        if self.closed:
            raise TeacherServiceError("TeacherClient is closed; build a new one")
        pending = PendingScore(self, name, self.routes[name], rows, width, device)
        if self.rank == pending.route.student_rank:
            self.stats["requests"] += 1
        self._inflight.append(pending)
        return pending

    def _send(self, pending: "PendingScore", head: torch.Tensor, what: str,
              payload: tuple[torch.Tensor, ...] = ()) -> None:
        """The leader posts ``head`` and ``payload`` (tokens, mask) to the teacher's input rank."""
        route = pending.route
        if self.rank != route.student_rank:
            return
        peer_in = self._peer(route, route.teacher_input_rank)
        pending.transfers.append(p2p_isend(head, route.teacher_input_rank, tag=TAG_HEADER, timeout_s=self.timeout_s,
                                           peer=peer_in, what=f"{what} header"))
        for x, tag in zip(payload, (TAG_TOKENS, TAG_MASK)):
            pending.transfers.append(p2p_isend(x, route.teacher_input_rank, tag=tag, timeout_s=self.timeout_s,
                                               peer=peer_in, what=f"{what} payload"))
            self.stats["bytes_sent"] += x.numel() * x.element_size()

    def _post(self, name: str, tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor,
              temperature: float) -> "PendingScore":
        """Post one request (the leader: header, tokens and mask sends and the reply's receive at once)."""
        b, t = check_batch(tokens_BT, loss_mask_BT, vocab_size=self.vocab_size, group=self.pgc.mp,
                           what=f"score for teacher {name!r}")
        pending = self._pending(name, b, t, tokens_BT.device)
        dev = wire_device()
        payload = ((tokens_BT.to(dev), (loss_mask_BT != 0).to(device=dev, dtype=torch.uint8)) if b * t else ())
        self._send(pending, header(Command.SCORE, self.ids[name], b, t, temperature), "request", payload)
        pending._expect(0, t)
        return pending

    def _drain(self) -> None:
        """Finish the transfers of requests still in flight (a step that raised between stream and
        result), all within one ``timeout_s``, so a later abort or shutdown follows them on the wire;
        failures are logged (the caller is already handling an error)."""
        deadline = time.monotonic() + self.timeout_s
        for pending in self._inflight:
            # an open stream's replies may never come (a teacher that scores the whole stream at its last block)
            for tr in pending.transfers + (pending.receives if pending.done or not pending.capacity else []):
                try:
                    tr.wait(max(deadline - time.monotonic(), 0.1))
                except TeacherServiceError as e:
                    logger.warning("request to teacher %r left unfinished: %s", pending.name, e)
        self._inflight.clear()

    def _idle(self, what: str) -> None:
        if self._inflight:
            raise TeacherServiceError(f"TeacherClient.{what}: {len(self._inflight)} score request(s) still in flight; "
                                      "take their results (PendingScore.result) first")

    def _fail(self, route: "Route", why: str) -> None:
        raise TeacherServiceError(f"{self._peer(route, route.teacher_output_rank)} {why}")

    def _leader_targets(self) -> list[tuple[str, "Route"]]:
        """(teacher name, route) per distinct teacher replica this rank leads the traffic to."""
        sent: set[tuple[str, int]] = set()
        out = []
        for name, route in self.routes.items():
            key = (self.group_of[name], route.teacher_dp)
            if self.rank == route.student_rank and key not in sent:
                sent.add(key)
                out.append((name, route))
        return out

    @property
    def has_separate(self) -> bool:
        """True when some teacher runs on its own ranks (they must join world-collective saves)."""
        return bool(self.routes)

    def join_save(self, path: str, step: int) -> None:
        """Ask every separate teacher replica to join the world-collective checkpoint save of ``path``.

        Call on every student rank right before ``save_checkpoint`` (only replica leaders send). The
        teachers pass an empty state: megatron's dist_checkpointing synchronises through global
        rank 0 and world-wide barriers, so every rank of the world must take part.
        """
        if self.closed:
            raise TeacherServiceError("TeacherClient is closed; build a new one")
        self._idle("join_save")
        for name, route in self._leader_targets():
            peer = self._peer(route, route.teacher_input_rank)
            msg = encode_message(path)
            if msg.numel() != len(path.encode("utf-8")):
                raise ValueError(f"checkpoint path too long for the teacher protocol: {path!r}")
            p2p_send(header(Command.SAVE, b=int(step), nmsg=msg.numel()), route.teacher_input_rank, tag=TAG_HEADER,
                     timeout_s=self.timeout_s, peer=peer, what="save request")
            p2p_send(msg, route.teacher_input_rank, tag=TAG_MESSAGE, timeout_s=self.timeout_s, peer=peer,
                     what="save path")

    def step_end(self, step: int) -> None:
        """Tell every separate teacher replica that a student step ended (``step`` steps done).

        Call on every student rank right before the world-wide stop agreement (only replica leaders
        send): each teacher replica joins that collective once every student replica routed to it
        has sent this, so the teachers take part in it once per step without a collective of their own.
        """
        if self.closed:
            raise TeacherServiceError("TeacherClient is closed; build a new one")
        self._idle("step_end")
        for name, route in self._leader_targets():
            p2p_send(header(Command.STEP, b=int(step)), route.teacher_input_rank, tag=TAG_HEADER,
                     timeout_s=self.timeout_s, peer=self._peer(route, route.teacher_input_rank), what="step end")

    def close(self, error: BaseException | str | None = None) -> None:
        """Tell every separate teacher group to stop: ``shutdown``, or ``abort`` carrying ``error``.

        Call it on every student rank in a ``finally`` (only replica leaders send; idempotent).
        Never raises: a teacher that is already gone (or any other failure to reach it) is logged.
        Requests still in flight are finished first (bounded), so the teacher answers them and then
        reads the abort or shutdown.
        """
        if self.closed:
            return
        self.closed = True
        self._drain()
        sent: set[tuple[str, int]] = set()
        for name, route in self.routes.items():
            key = (self.group_of[name], route.teacher_dp)
            if self.rank != route.student_rank or key in sent:
                continue
            sent.add(key)
            peer = self._peer(route, route.teacher_input_rank)
            try:
                if error is None:
                    p2p_send(header(Command.SHUTDOWN), route.teacher_input_rank, tag=TAG_HEADER,
                             timeout_s=self.timeout_s, peer=peer, what="shutdown")
                else:
                    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
                    msg = encode_message(f"student rank {self.rank}: {text}")
                    p2p_send(header(Command.ABORT, nmsg=msg.numel()), route.teacher_input_rank, tag=TAG_HEADER,
                             timeout_s=self.timeout_s, peer=peer, what="abort")
                    if msg.numel():
                        p2p_send(msg, route.teacher_input_rank, tag=TAG_MESSAGE, timeout_s=self.timeout_s,
                                 peer=peer, what="abort message")
            except Exception as e:  # noqa: BLE001 - close runs while the caller handles its own error
                logger.warning("could not stop %s: %s", peer, e)


class PendingScore:
    """A score request or a stream in flight (:meth:`TeacherClient.score`, :meth:`TeacherClient.stream`).
    Its replies land in per-block buffers as soon as the teacher sends them; :meth:`result` is collective
    over the replica like :meth:`TeacherClient.score`: the leader waits for its transfers (each bounded by
    ``parallel.timeout_s``), then broadcasts the assembled [B, T] over the replica's TP × PP ranks."""

    def __init__(self, client: TeacherClient, name: str, route: "Route", rows: int, width: int,
                 device: torch.device) -> None:
        self.client, self.name, self.route, self.rows, self.device = client, name, route, rows, device
        self.transfers: list[Transfer] = []
        """The leader's posted sends."""
        self.receives: list[Transfer] = []
        """The leader's posted reply receives."""
        self.pieces: list[tuple[int, torch.Tensor]] = []
        """(first column, reply buffer [B, n]) per expected reply."""
        self.width = width
        self.capacity = 0
        """A stream's positions lie in [0, capacity) (0: not a stream)."""
        self.end = 0
        """A stream's columns sent so far."""
        self.done = False
        """A stream whose last block was sent (or a request)."""
        self._value: Optional[torch.Tensor] = None

    def _expect(self, start: int, n: int) -> None:
        """A reply of columns [start, start + n) will come (every rank notes it; the leader posts the receive)."""
        self.width = max(self.width, start + n)
        if not self.rows * n:
            return
        buf = torch.zeros((self.rows, n), dtype=torch.float32, device=wire_device())
        self.pieces.append((start, buf))
        client, route = self.client, self.route
        if client.rank == route.student_rank:
            # posted now: the reply lands here whenever it is ready, without the student waiting
            self.receives.append(p2p_irecv(buf, route.teacher_output_rank, tag=reply_tag(client.ids[self.name]),
                                            timeout_s=client.timeout_s, what="teacher reply",
                                            peer=client._peer(route, route.teacher_output_rank)))
            client.stats["bytes_received"] += buf.numel() * 4

    def extend(self, start: int, tokens_Bn1: torch.Tensor, mask_Bn: torch.Tensor, *, last: bool) -> None:
        """Send a stream's next block (:meth:`TeacherClient.stream`): columns [start, start + n) with the
        tokens at positions start..start + n (int64 [B, n + 1]) and the columns' loss mask ([B, n]);
        ``last`` closes the stream. Returns at once (the leader posts the sends and the reply's receive)."""
        n = mask_Bn.shape[1] if mask_Bn.dim() == 2 else -1
        if not self.capacity or self.done:
            raise ValueError(f"extend: {'not a stream' if not self.capacity else 'the stream is closed'} "
                             f"(teacher {self.name!r}); open one with TeacherClient.stream")
        if (tuple(tokens_Bn1.shape) != (self.rows, n + 1) or tuple(mask_Bn.shape) != (self.rows, n)
                or tokens_Bn1.dtype != torch.int64 or start != self.end or start + n + (n > 0) > self.capacity):
            raise ValueError(f"extend: a block of columns [{start}, {start + n}) needs int64 tokens "
                             f"[{self.rows}, n + 1] and a mask [{self.rows}, n] continuing at column {self.end} "
                             f"below the capacity {self.capacity}; got tokens {tuple(tokens_Bn1.shape)} "
                             f"{tokens_Bn1.dtype}, mask {tuple(mask_Bn.shape)}")
        client = self.client
        dev = wire_device()
        payload = ((tokens_Bn1.to(dev), (mask_Bn != 0).to(device=dev, dtype=torch.uint8)) if self.rows * n else ())
        client._send(self, header(Command.EXTEND, client.ids[self.name], self.rows, n, start=start, last=last),
                     "stream block", payload)
        self._expect(start, n)
        self.end, self.done = start + n, last

    def result(self) -> torch.Tensor:
        """Teacher log-probs float32 [B, T] (:meth:`TeacherClient.score`; a stream: T = its columns);
        TeacherServiceError on a timeout, a dead peer or a teacher that failed."""
        if self._value is not None:
            return self._value
        client, route = self.client, self.route
        if self.capacity and not self.done:
            raise ValueError(f"result: the stream to teacher {self.name!r} is still open; send its last block first")
        try:
            for tr in self.transfers + self.receives:
                tr.wait()
        finally:
            if self in client._inflight:
                client._inflight.remove(self)
        out = torch.zeros((self.rows, self.width), dtype=torch.float32, device=wire_device())
        for start, buf in self.pieces:
            out[:, start:start + buf.shape[1]] = buf
        if out.numel():
            # leader → the replica's other TP/PP ranks (they wait here meanwhile)
            group_broadcast(out, route.student_rank, client.pgc.mp, timeout_s=client.timeout_s,
                            peer=f"role 'student' rank {route.student_rank} (this replica's leader)",
                            what=f"teacher {self.name!r} result")
            # +inf is the teacher's failure signal (no log-prob can be > 0); NaN from a healthy teacher
            # passes through: the trainer skips that step and aborts after loss.max_bad_teacher_steps
            if bool((out == float("inf")).any()):
                client._fail(route, "failed while scoring (see its log)")
        self._value = out.to(self.device)
        return self._value


# ------------------------------------------------------------------------------------------------
# the factory
# ------------------------------------------------------------------------------------------------
def build_teachers(cfg: "Config", layout: "RoleLayout", groups: "RankGroups", *, timeout_s: Optional[float] = None,
                   idle_timeout_s: Optional[float] = None,
                   micro_batch_rows: Optional[int] = None) -> tuple[Optional[TeacherClient], Optional[TeacherHost]]:
    """``(client, None)`` on student ranks, ``(None, host)`` on teacher ranks.

    Runs :func:`check_teachers` first (every rank, no collective). Collective afterwards: building
    and loading models is collective over each role (checkpoint loading over the role's ranks);
    colocated teachers are built on the student's ranks in config order.
    """
    cfg = check_teachers(cfg, layout)
    if groups.is_student:
        ids = teacher_ids(cfg.teachers)
        colocated = {n: ColocatedTeacher(cfg, ids[n], groups, timeout_s=timeout_s, micro_batch_rows=micro_batch_rows)
                     for n in layout.student.teachers}
        return TeacherClient(cfg, layout, groups, colocated=colocated, timeout_s=timeout_s), None
    return None, TeacherHost(cfg, layout, groups, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s,
                             micro_batch_rows=micro_batch_rows)
