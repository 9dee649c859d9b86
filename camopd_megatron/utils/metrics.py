"""Metrics behind a tiny interface: TensorBoard on the logging rank, nothing elsewhere."""
from __future__ import annotations

import logging
from typing import Mapping, Protocol

logger = logging.getLogger(__name__)


class MetricsWriter(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def text(self, step: int, tag: str, value: str) -> None: ...

    def close(self) -> None: ...


class NullWriter:
    """Writes nothing (non-logging ranks, tests)."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def text(self, step: int, tag: str, value: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """TensorBoard event files under ``log_dir``; keys like ``loss/general`` become grouped plots."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=log_dir)
        self.log_dir = log_dir

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self._w.add_scalar(k, float(v), global_step=step)

    def text(self, step: int, tag: str, value: str) -> None:
        self._w.add_text(tag, value, global_step=step)

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def make_writer(enabled: bool, log_dir: str | None, is_logging_rank: bool) -> MetricsWriter:
    if enabled and is_logging_rank:
        if not log_dir:
            raise ValueError("logging.dir: TensorBoard is on but no log directory was resolved; set logging.dir")
        logger.info("TensorBoard events -> %s", log_dir)
        return TensorBoardWriter(log_dir)
    return NullWriter()
