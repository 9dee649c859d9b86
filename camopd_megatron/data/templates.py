"""Prompt records and chat templates: a record's ``prompt`` or ``messages`` -> the text to tokenize.

A record (one JSONL line or Parquet row) has either ``prompt`` (a string) or ``messages`` (a list of
``{"role": "system"|"user"|"assistant", "content": str}``), and optionally ``domain`` (a string label).
Templates (``data.chat_template``), each ending with the assistant generation prompt:

- ``plain``: a ``prompt`` string is used as is (tokenized with the tokenizer's own special tokens,
  e.g. BOS); ``messages`` render as ``"System: ...\\nUser: ...\\n"`` lines followed by ``"Assistant:"``.
- ``chatml`` (Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, then
  ``<|im_start|>assistant\\n``. No default system prompt is inserted (Qwen3 style).
- ``llama3``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per turn (content stripped, as Meta's template), then the assistant header. No date/system preamble.

A ``prompt`` string under ``chatml``/``llama3`` is treated as one user turn. Bad records raise
:class:`DataError`, whose message names the file and line (or row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DataError", "ROLES", "TEMPLATES", "PromptRecord", "parse_record", "render"]

ROLES = ("system", "user", "assistant")
TEMPLATES = ("plain", "chatml", "llama3")


class DataError(ValueError):
    """A malformed prompt record or file (the message names the file and line, or row), or an unusable
    tokenizer (the message names ``data.tokenizer`` or the file)."""


@dataclass(frozen=True)
class PromptRecord:
    """One validated record: exactly one of ``prompt`` / ``messages`` is set."""

    prompt: Optional[str]
    messages: Optional[tuple[tuple[str, str], ...]]
    domain: Optional[str]


def parse_record(obj: Any, where: str) -> PromptRecord:
    """Validate one decoded record; ``where`` (``"file:line 7"``) prefixes every error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' or 'messages', got {type(obj).__name__}")
    prompt, messages, domain = obj.get("prompt"), obj.get("messages"), obj.get("domain")
    if prompt is not None and messages is not None:
        raise DataError(f"{where}: has both 'prompt' and 'messages'; keep one of them")
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"{where}: 'domain' must be a string, got {domain!r}")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        return PromptRecord(prompt, None, domain)
    if messages is None:
        raise DataError(f"{where}: missing 'prompt' (string) or 'messages' (list of {{role, content}}); "
                        f"keys present: {sorted(obj)}")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {messages!r:.60}")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] must be {{'role': ..., 'content': <string>}}, got {m!r:.60}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{k}] has unknown role {role!r}; use one of {', '.join(ROLES)}")
        turns.append((str(role), m["content"]))
    return PromptRecord(None, tuple(turns), domain)


def render(record: PromptRecord, template: str) -> tuple[str, bool]:
    """The prompt text under ``template`` and whether to encode it with the tokenizer's special tokens.

    Returns ``(text, add_special_tokens)``: True only for a plain ``prompt`` string (the tokenizer adds
    its BOS, as ``transformers`` does); templated text already spells its special tokens.
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.chat_template: got {template!r}; use one of {', '.join(TEMPLATES)}")
    if record.prompt is not None:
        if template == "plain":
            return record.prompt, True
        turns: tuple[tuple[str, str], ...] = (("user", record.prompt),)
    else:
        assert record.messages is not None
        turns = record.messages
    if template == "plain":
        body = "".join(f"{role.capitalize()}: {content}\n" for role, content in turns)
        return body + "Assistant:", True
    if template == "chatml":
        body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        return body + "<|im_start|>assistant\n", False
    body = "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>" for role, content in turns
    )
    return "<|begin_of_text|>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n", False
