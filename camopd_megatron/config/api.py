"""Public entry points: load a config from YAML + overrides, build it from a dict, dump it back."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from typing import Any, Mapping, Optional, Sequence

import yaml

from camopd_megatron.config.errors import ConfigError, problem
from camopd_megatron.config.loader import _Ctx, apply_overrides, convert_fields, read_yaml, to_plain
from camopd_megatron.config.root import Config

__all__ = ["load_config", "config_from_dict", "config_to_dict", "dump_config"]

logger = logging.getLogger(__name__)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Load and validate a config: YAML file (following ``base:``; None = defaults), then ``key=value`` overrides.

    Raises ConfigError listing every problem (unknown keys, wrong types, missing fields, bad
    overrides, failed checks), one line each naming the dotted key, the value and the fix.
    """
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    source = os.path.abspath(path) if path is not None else "<defaults>"
    problems: list[str] = []
    apply_overrides(raw, overrides, Config, problems)
    cfg = _build(raw, problems)
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    logger.debug("loaded config from %s with %d override(s)", source, len(overrides))
    return cfg


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data (the inverse of :func:`config_to_dict`)."""
    problems: list[str] = []
    cfg = _build(d, problems)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts/lists of a config (``config_from_dict(config_to_dict(c)) == c``)."""
    return to_plain(cfg)


def dump_config(cfg: Config, path: str) -> None:
    """Write the config as YAML (creates the parent directory); :func:`load_config` reads it back equal."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)


def _build(raw: Any, problems: list[str]) -> Optional[Config]:
    """Convert and validate; every problem goes to ``problems``. Sections that parsed are checked
    even when another section did not, so one run reports as much as possible."""
    if not isinstance(raw, Mapping):
        problems.append(problem("<top level>", raw, "a mapping of sections", "write the config as key: value sections"))
        return None
    kwargs, ok = convert_fields(Config, raw, "", _Ctx(problems, Config))
    if ok:
        cfg = Config(**kwargs)
        problems += cfg.validate()
        return cfg
    for name, section in kwargs.items():
        if name == "teachers":
            for i, teacher in enumerate(section):
                problems += teacher.validate(f"teachers[{i}]")
        else:
            problems += section.validate(name)
    problems += _partial_section_problems(raw, kwargs, problems)
    return None


def _partial_section_problems(raw: Mapping[str, Any], parsed: Mapping[str, Any], problems: list[str]) -> list[str]:
    """Checks of the sections that failed to parse, built from their valid fields (defaults for the rest).

    Only problems about keys not already reported are returned, so a type error in one field does
    not hide a range error in its neighbour.
    """
    reported = {p.split(":", 1)[0] for p in problems}
    hints = typing.get_type_hints(Config)
    out: list[str] = []
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if f.name in parsed or f.name not in raw or not dataclasses.is_dataclass(tp):
            continue
        fields, _ = convert_fields(tp, raw[f.name], f.name, _Ctx([], Config))
        try:
            section = tp(**fields)
        except TypeError:  # a required field is missing: nothing to check
            continue
        out += [p for p in section.validate(f.name) if p.split(":", 1)[0] not in reported]
    return out
