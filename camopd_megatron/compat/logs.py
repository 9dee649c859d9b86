"""megatron log messages that repeat for every model built (registry condition ``ALWAYS``)."""
from __future__ import annotations

import logging

__all__ = ["GPT_MODEL_LOGGER", "GPT_DEPRECATION", "log_gpt_deprecation_once"]

GPT_MODEL_LOGGER = "megatron.core.models.gpt.gpt_model"
GPT_DEPRECATION = "GPTModel IS DEPRECATED"


class _OnceFilter(logging.Filter):
    """Let one message through once per process."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def log_gpt_deprecation_once() -> None:
    """``GPTModel.__init__`` logs its deprecation (in favour of HybridModel, which 0.19.2 does not
    yet offer for these architectures) on every build: a run builds a student and its teachers, a
    test dozens of models. Keep the first message of the process."""
    logging.getLogger(GPT_MODEL_LOGGER).addFilter(_OnceFilter(GPT_DEPRECATION))
