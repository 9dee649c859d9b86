"""Frozen teachers: the wire protocol, the teacher rank (host) and the student side (client).

- :mod:`~camopd_megatron.teachers.protocol`: commands, header, wire tags, bounded point-to-point,
  batch checks, message encoding.
- :mod:`~camopd_megatron.teachers.host`: a frozen :class:`TeacherModel` and the :class:`TeacherHost`
  loop of a separate teacher group (scoring with :func:`camopd_megatron.models.scoring.score_logprobs`).
- :mod:`~camopd_megatron.teachers.client`: :class:`TeacherClient` (student ranks), colocated
  teachers, the placement checks and the :func:`build_teachers` factory.
"""
from camopd_megatron.teachers.client import (
    ColocatedTeacher,
    TeacherClient,
    build_teachers,
    check_teachers,
)
from camopd_megatron.teachers.host import ServeStats, TeacherHost, TeacherModel
from camopd_megatron.teachers.protocol import Command, StudentAborted, TeacherServiceError, check_batch

__all__ = [
    "Command",
    "ColocatedTeacher",
    "ServeStats",
    "StudentAborted",
    "TeacherClient",
    "TeacherHost",
    "TeacherModel",
    "TeacherServiceError",
    "build_teachers",
    "check_batch",
    "check_teachers",
]
