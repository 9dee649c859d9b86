"""The wire protocol of the log-prob scoring service: commands, header, tags, bounded p2p, batch checks.

Protocol (point-to-point on the world group, one exchange per student DP replica and request).
The student replica's leader (``Route.student_rank``: TP 0 of its last pipeline stage) talks to
the serving teacher replica's input rank (TP 0, first stage) and output rank (TP 0, last stage)::

    student leader ──header int64[6] = (cmd, teacher id, B, T, temperature, message bytes)──▶ teacher input rank
                   ──tokens int64 [B, T], mask uint8 [B, T]──────────────────────▶ teacher input rank
    teacher input rank ── broadcast header/tokens/mask over the teacher replica (pg.mp: TP × PP ranks)
    teacher replica   ── forward-only pass (megatron's pipeline schedule when PP > 1), vocab-parallel
                         sampled-token log-probs on the last stage (three one-float TP reductions)
    teacher output rank ──logp float32 [B, T]───────────────────────────────────▶ student leader

so teacher → student moves exactly ``4 * B * T`` bytes per request (a stream: per block, see "Streams").
Nothing is sent when ``B * T == 0`` beyond the header. The header's temperature field carries the float64
bits of the softmax temperature the teacher scores at (``loss.teacher_temperature``, see :func:`header`),
so one teacher serves requests at any temperature.

Ordering. ``score`` is collective over every student rank, every student replica sending one request
per call, so a teacher replica serves its student replicas (those ``Route`` maps to it, round-robin
``d mod DP_t``) in a fixed order, one request each per turn: no any-source receive, no reordering.
A student replica may have several requests in flight (the step's streams, ``rollout.overlap_teachers``):
it posts each request's sends and the receive of its reply at once, and the teacher answers them in that
order (sends and receives between two ranks on one tag are matched in the order they were posted), so
every student replica must send the same number of turns (see "Streams") per step.

Streams (``open``, ``extend``; ``rollout.overlap_teachers``). While the student decodes a rollout
micro-batch it streams it, per separate teacher, in blocks of newly decoded positions: ``open`` (B rows,
positions below T) then ``extend`` blocks, each carrying the tokens at positions start..start + n (int64
[B, n + 1]) and the mask of columns [start, start + n) (uint8 [B, n]), the last one flagged; the reply is
that block's log-probs (float32 [B, n]). A teacher that can extend a KV cache (TP = PP = 1, a dense model
of the lean decoder's architecture, ``models.lean_decode``) scores each block on arrival, so only the
last block's work remains once the decode ends; any other teacher keeps the blocks and scores the whole
sequence at the last one (the same work and result as one ``score``), then sends every block's reply.
Replies travel on one tag per teacher (:func:`reply_tag`), so each teacher's stay in its request order.
A teacher replica serves one student replica's *turn* at a time: one ``score``, or every request from
that replica's first ``open`` until none of its streams is open. The student opens all the streams of a
micro-batch (one per separate branch, empty ones too) before it sends any block, so each micro-batch is
one turn at every teacher replica it uses and the replicas stay in step as with ``score``.

Commands: ``score``, ``open``, ``extend``, ``shutdown`` (the replica exits once every student replica routed to
it has sent one; :meth:`TeacherHost.serve` returns), ``abort`` (carries the student's error text; the
replica waits a bounded time for the abort of each other student replica routed to it, then every
rank of it raises :class:`StudentAborted`), ``save`` (join a world-collective checkpoint save) and
``step`` (the end of a student step: once every routed student replica sent it, every teacher rank
joins the world-wide stop agreement, the one collective per step that the student ranks run too).

Failure. Every wait is bounded (``parallel.timeout_s``; the teacher's wait for the *next* request by
``idle_timeout_s``, default the same) and a dead peer surfaces as gloo's "connection closed"; both are
turned into :class:`TeacherServiceError` naming the peer's role and global rank. A teacher whose
forward fails sends NaNs before raising, so the student fails at once instead of waiting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from camopd_megatron.models.pipeline import group_broadcast as _group_broadcast
from camopd_megatron.models.pipeline import CollectiveError, wait_bounded, wire_device

if TYPE_CHECKING:
    from camopd_megatron.config import TeacherConfig

__all__ = [
    "Command",
    "HEADER_LEN",
    "TeacherServiceError",
    "StudentAborted",
    "check_batch",
    "decode_message",
    "encode_message",
    "group_broadcast",
    "header",
    "header_temperature",
    "p2p_irecv",
    "p2p_isend",
    "p2p_recv",
    "p2p_send",
    "reply_tag",
    "Transfer",
    "teacher_ids",
]


class Command:
    """Request commands (first header field)."""

    SCORE = 1
    OPEN = 7
    """Open a stream of blocks (header B = rows, T = capacity: positions lie in [0, T)); see "Streams"."""
    EXTEND = 8
    """A stream's next block (header B = rows, T = columns n, start = its first column, last = 1 ends the stream)."""
    SHUTDOWN = 3
    ABORT = 4
    SAVE = 5
    """Join a world-collective checkpoint save (header B = step, message = path); see ``join_save``."""
    STEP = 6
    """A student step ended (header B = steps done): join the world's stop agreement; see ``step_end``."""


HEADER_LEN = 8
"""Header fields: command, teacher id (index in ``teachers``), B, T, temperature (score, open: float64 bits),
message bytes (abort, save), start column (extend), last block (extend: 1 ends the stream)."""
TAG_HEADER, TAG_TOKENS, TAG_MASK, TAG_MESSAGE = 101, 102, 103, 106
_TAG_VALUES = 1000


def reply_tag(teacher_id: int) -> int:
    """The tag of teacher ``teacher_id``'s replies: one per teacher, so the replies of two teachers of one
    time-shared replica, one answering blocks at once and the other at the end of its stream, cannot be
    taken for each other's (each teacher's replies leave in the order its requests came)."""
    return _TAG_VALUES + int(teacher_id)


class TeacherServiceError(CollectiveError):
    """A scoring exchange failed: timeout, dead peer, or a teacher-side failure (names role and rank)."""


class StudentAborted(TeacherServiceError):
    """The student sent ``abort`` (it raised); carries the student's error message."""


# ------------------------------------------------------------------------------------------------
# bounded point-to-point / broadcast
# ------------------------------------------------------------------------------------------------
_HINT = "it died, hung, or is not running the scoring service"


def _post(op: Callable[[], dist.Work], what: str, peer: str) -> dist.Work:
    """Post an isend/irecv; gloo raises at once (a bare RuntimeError) when the peer's connection is gone."""
    try:
        return op()
    except RuntimeError as e:
        raise TeacherServiceError(f"{what} with {peer} failed: {e}. Check that rank's log: {_HINT}") from e


class Transfer:
    """A posted point-to-point send or receive; :meth:`wait` is bounded. It keeps its tensor alive
    until then (the transport reads or writes it in the background)."""

    def __init__(self, work: dist.Work, tensor: torch.Tensor, *, timeout_s: float, peer: str, what: str) -> None:
        self.work, self.tensor, self.timeout_s, self.peer, self.what = work, tensor, timeout_s, peer, what

    def wait(self, timeout_s: Optional[float] = None) -> torch.Tensor:
        """The tensor once the transfer is done; TeacherServiceError naming the peer on timeout/death."""
        wait_bounded(self.work, self.timeout_s if timeout_s is None else timeout_s, self.what, self.peer,
                     error=TeacherServiceError, hint=_HINT)
        return self.tensor


def p2p_isend(t: torch.Tensor, dst: int, *, tag: int, timeout_s: float, peer: str, what: str) -> Transfer:
    """Post a send of ``t`` to global rank ``dst`` (wait with :meth:`Transfer.wait`)."""
    t = t.contiguous()
    return Transfer(_post(lambda: dist.isend(t, dst=dst, tag=tag), f"{what} (send)", peer), t,
                    timeout_s=timeout_s, peer=peer, what=f"{what} (send)")


def p2p_irecv(t: torch.Tensor, src: int, *, tag: int, timeout_s: float, peer: str, what: str) -> Transfer:
    """Post a receive into ``t`` from global rank ``src`` (wait with :meth:`Transfer.wait`). Receives
    posted for the same peer and tag are filled in the order they were posted."""
    return Transfer(_post(lambda: dist.irecv(t, src=src, tag=tag), f"{what} (receive)", peer), t,
                    timeout_s=timeout_s, peer=peer, what=f"{what} (receive)")


def p2p_send(t: torch.Tensor, dst: int, *, tag: int, timeout_s: float, peer: str, what: str) -> None:
    """Send ``t`` to global rank ``dst``; TeacherServiceError naming ``peer`` on timeout/death."""
    p2p_isend(t, dst, tag=tag, timeout_s=timeout_s, peer=peer, what=what).wait()


def p2p_recv(t: torch.Tensor, src: int, *, tag: int, timeout_s: float, peer: str, what: str) -> torch.Tensor:
    """Receive into ``t`` from global rank ``src``; TeacherServiceError naming ``peer`` on timeout/death."""
    return p2p_irecv(t, src, tag=tag, timeout_s=timeout_s, peer=peer, what=what).wait()


def group_broadcast(t: torch.Tensor, src: int, group: Optional[dist.ProcessGroup], *, timeout_s: float, peer: str,
                    what: str) -> torch.Tensor:
    """Bounded ``broadcast`` of ``t`` from global rank ``src`` inside ``group``; TeacherServiceError on failure."""
    return _group_broadcast(t, src, group, timeout_s=timeout_s, peer=peer, what=what, error=TeacherServiceError,
                            hint=_HINT)


# ------------------------------------------------------------------------------------------------
# input checks shared by the client and the colocated path
# ------------------------------------------------------------------------------------------------
def check_batch(tokens_BT: torch.Tensor, loss_mask_BT: torch.Tensor, *, vocab_size: int,
                group: Optional[dist.ProcessGroup], what: str) -> tuple[int, int]:
    """Validate one replica's batch on every rank of ``group`` (its TP × PP ranks) and return (B, T).

    Local checks first, then one all-reduce of (B, T, −B, −T, error) so that a mismatch between the
    replica's ranks or a bad token on one of them raises the same ValueError on all of them.
    """
    err = ""
    if not isinstance(tokens_BT, torch.Tensor) or tokens_BT.dim() != 2 or tokens_BT.dtype != torch.int64:
        err = f"{what}: tokens_BT must be an int64 [B, T] tensor, got {getattr(tokens_BT, 'dtype', type(tokens_BT))} " \
              f"{tuple(getattr(tokens_BT, 'shape', ()))}"
    elif not isinstance(loss_mask_BT, torch.Tensor) or tuple(loss_mask_BT.shape) != tuple(tokens_BT.shape):
        err = f"{what}: loss_mask_BT must have the tokens' shape {tuple(tokens_BT.shape)}, got " \
              f"{tuple(getattr(loss_mask_BT, 'shape', ()))}"
    elif tokens_BT.numel() and (int(tokens_BT.min()) < 0 or int(tokens_BT.max()) >= vocab_size):
        err = f"{what}: token ids must lie in [0, model.vocab_size={vocab_size}), got " \
              f"[{int(tokens_BT.min())}, {int(tokens_BT.max())}]; pad with a real token id and mask it out"
    shape = tuple(tokens_BT.shape) if not err else (-1, -1)
    flags = torch.tensor([shape[0], shape[1], -shape[0], -shape[1], int(bool(err))], dtype=torch.int64,
                         device=wire_device())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    b, t, nb, nt, bad = (int(v) for v in flags.tolist())
    if err:
        raise ValueError(err)
    if bad:
        raise ValueError(f"{what}: another rank of this student replica rejected its batch (see its error)")
    if b != -nb or t != -nt:
        raise ValueError(
            f"{what}: the ranks of one student replica (its TP/PP ranks) must pass the same batch shape; "
            f"got shapes between [{-nb}, {-nt}] and [{b}, {t}]"
        )
    return shape


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------
def encode_message(text: str, limit: int = 4096) -> torch.Tensor:
    """UTF-8 bytes of an abort message as a uint8 tensor (truncated to ``limit`` bytes)."""
    data = text.encode("utf-8", errors="replace")[:limit]
    return torch.tensor(list(data), dtype=torch.uint8, device=wire_device())


def decode_message(data: torch.Tensor) -> str:
    """The text of a received message (inverse of :func:`encode_message`)."""
    return bytes(data.cpu().tolist()).decode("utf-8", errors="replace")


def header(cmd: int, teacher_id: int = -1, b: int = 0, t: int = 0, temperature: float = 1.0,
           nmsg: int = 0, start: int = 0, last: bool = False) -> torch.Tensor:
    """A request header (see :data:`HEADER_LEN`); ``temperature`` travels as its exact float64 bits."""
    bits = int(torch.tensor([float(temperature)], dtype=torch.float64).view(torch.int64).item())
    return torch.tensor([cmd, teacher_id, b, t, bits, nmsg, start, int(last)], dtype=torch.int64,
                        device=wire_device())


def header_temperature(field: int) -> float:
    """The temperature of a received header's field 4 (inverse of :func:`header`)."""
    return float(torch.tensor([int(field)], dtype=torch.int64).view(torch.float64).item())


def teacher_ids(teachers: Sequence["TeacherConfig"]) -> dict[str, int]:
    """Teacher name → id on the wire (its index in ``teachers``)."""
    return {t.name: i for i, t in enumerate(teachers)}
