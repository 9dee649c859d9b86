"""Strict loading of plain data into typed dataclasses, dotted overrides, YAML files with ``base:``.

The loader is generic: it reads the dataclass type hints (int, float, str, bool, Optional, Literal,
list, dict[str, X], nested dataclasses, Any) and never executes anything from a config
(``yaml`` safe loading only). Every problem is collected; the caller raises one
:class:`~camopd_megatron.config.errors.ConfigError` with all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from camopd_megatron.config.errors import ConfigError, closest, problem, show

__all__ = ["StrictLoader", "read_yaml", "deep_merge", "convert_fields", "apply_overrides", "to_plain"]

_INVALID = object()
"""Marker returned by a conversion that failed (its problem is already recorded)."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-5`` as a float and rejects duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        """Build a mapping, refusing a key written twice (safe_load would keep the last silently)."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) needs a dot in a float ("1.0e-5"); accept the "1e-5" everyone writes.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# ----------------------------------------------------------------------------- files
def read_yaml(path: str, chain: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML mapping, following ``base:`` (relative to the file; deep merge, lists replaced).

    Raises ConfigError at once for an unreadable file, a syntax error (file, line, column), a
    non-mapping document, a bad ``base`` value or a ``base`` cycle (naming the chain).
    """
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join([*chain, path])
        raise ConfigError([f"base: cycle {cycle}. Fix: remove the 'base:' key that closes the loop"], chain[0])
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        where = f"base (in {chain[-1]})" if chain else "config file"
        raise ConfigError([f"{where}: cannot read {path!r} ({e.strerror}). Fix: check the path"], path) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_error_line(path, e)], path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([problem("<top level>", data, "a mapping of sections", f"make {path} a YAML mapping (key: value)")], path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError([problem("base", base, "a path to another YAML file", "write e.g. base: camopd.yaml")], path)
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return deep_merge(read_yaml(base_path, [*chain, path]), data)


def _yaml_error_line(path: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
    what = getattr(e, "problem", None) or str(e)
    return f"{where}: YAML syntax error: {what}. Fix: correct the YAML at that line"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``: mappings merge recursively, everything else (lists too) is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def to_plain(obj: Any) -> Any:
    """Dataclasses → dicts, recursively (lists/dicts copied); the inverse of loading."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


# ----------------------------------------------------------------------------- types
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` → (X, True); anything else → (tp, False)."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def describe(tp: Any) -> str:
    """Human name of a type hint for error messages."""
    inner, optional = _strip_optional(tp)
    if optional:
        return f"{describe(inner)} or null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of name to {describe(args[1])}" if args else "a mapping"
    if _is_union(tp):
        return " or ".join(describe(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__} fields)"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _accepts_str(tp: Any) -> bool:
    """True when a plain string is a valid value (str, or a Literal of strings)."""
    inner, _ = _strip_optional(tp)
    if inner is str:
        return True
    return typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner))


@dataclass
class _Ctx:
    """State of one conversion: the problems found and the root type (for cross-section hints)."""

    problems: list[str]
    root: type


def _type_problem(ctx: _Ctx, key: str, value: Any, tp: Any) -> object:
    fix = f"set {key} to {describe(tp)}"
    if typing.get_origin(_strip_optional(tp)[0]) is Literal and isinstance(value, str):
        choices = [a for a in typing.get_args(_strip_optional(tp)[0]) if isinstance(a, str)]
        close = closest(value, choices)
        if close:
            fix += f" (did you mean {close!r}?)"
    ctx.problems.append(problem(key or "<top level>", value, describe(tp), fix))
    return _INVALID


def convert(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """``value`` checked against (and built into) type ``tp``; ``_INVALID`` after recording a problem."""
    if tp is Any:
        return copy.deepcopy(value)
    inner, optional = _strip_optional(tp)
    if optional:
        if value is None:
            return None
        scratch = _Ctx([], ctx.root)
        out = convert(value, inner, key, scratch)
        if out is _INVALID and len(scratch.problems) == 1 and scratch.problems[0].startswith(f"{key}: got "):
            return _type_problem(ctx, key, value, tp)  # say "... or null"
        ctx.problems += scratch.problems
        return out
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        for arg in args:
            scratch = _Ctx([], ctx.root)
            out = convert(value, arg, key, scratch)
            if out is not _INVALID:
                return out
        return _type_problem(ctx, key, value, tp)
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
        return value if ok else _type_problem(ctx, key, value, tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _type_problem(ctx, key, value, tp)
        items = [convert(v, args[0] if args else Any, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin is dict:
        if not isinstance(value, Mapping):
            return _type_problem(ctx, key, value, tp)
        ktp, vtp = args if args else (Any, Any)
        out: dict[Any, Any] = {}
        ok = True
        for k, v in value.items():
            if ktp is str and not isinstance(k, str):
                ctx.problems.append(problem(f"{key}.{k}", k, "a string key", f"quote the key: '{k}'"))
                ok = False
                continue
            item = convert(v, vtp, f"{key}.{k}", ctx)
            ok &= item is not _INVALID
            out[k] = item
        return out if ok else _INVALID
    if dataclasses.is_dataclass(tp):
        kwargs, ok = convert_fields(tp, value, key, ctx)
        return tp(**kwargs) if ok else _INVALID
    if tp is bool:
        return value if isinstance(value, bool) else _type_problem(ctx, key, value, tp)
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _type_problem(ctx, key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _type_problem(ctx, key, value, tp)
    if tp is str:
        return value if isinstance(value, str) else _type_problem(ctx, key, value, tp)
    raise TypeError(f"config loader: unsupported type hint {tp!r} at {key!r}")  # a bug in our dataclasses


def convert_fields(cls: type, raw: Any, key: str, ctx: _Ctx) -> tuple[dict[str, Any], bool]:
    """The converted constructor arguments of dataclass ``cls`` from mapping ``raw`` and whether all are valid.

    Unknown keys are reported (with a did-you-mean) but do not stop the other fields from being
    built, so section checks can still run on them.
    """
    if not isinstance(raw, Mapping):
        _type_problem(ctx, key, raw, cls)
        return {}, False
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for k, v in raw.items():
        if k not in fields:
            ctx.problems.append(_unknown_key(ctx, key, k, f"value {show(v)}", list(fields)))
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        sub = _join(key, name)
        if name in raw:
            value = convert(raw[name], hints[name], sub, ctx)
            if value is _INVALID:
                ok = False
            else:
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.problems.append(
                f"{sub}: missing required field; expected {describe(hints[name])}. Fix: add '{name}: ...' to {key or 'the config'}"
            )
            ok = False
    return kwargs, ok


def _unknown_key(ctx: _Ctx, prefix: str, name: Any, where: str, siblings: list[str]) -> str:
    full = _join(prefix, str(name))
    hint = ""
    close = closest(str(name), siblings)
    if close:
        hint = f"; did you mean {_join(prefix, close)!r}?"
    else:
        elsewhere = [p for p in _field_index(ctx.root) if p.rsplit(".", 1)[-1] == str(name)]
        if elsewhere:
            hint = "; did you mean " + " or ".join(repr(p) for p in elsewhere[:3]) + "?"
    return (
        f"{full}: unknown key ({where}){hint or '.'} "
        f"Fix: remove it or use one of: {', '.join(siblings)}"
    )


def _field_index(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a dataclass tree (``teachers[i].tp``, ``data.branches.<name>.paths``)."""
    out: list[str] = []
    for name, tp in _hints(cls).items():
        path = _join(prefix, name)
        out.append(path)
        inner, _ = _strip_optional(tp)
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if dataclasses.is_dataclass(inner):
            out += _field_index(inner, path)
        elif origin is list and args and dataclasses.is_dataclass(args[0]):
            out += _field_index(args[0], f"{path}[i]")
        elif origin is dict and args and dataclasses.is_dataclass(args[1]):
            out += _field_index(args[1], f"{path}.<name>")
    return out


# ----------------------------------------------------------------------------- overrides
_PART = re.compile(r"^([^.\[\]]+)((?:\[\d+\])*)$")


def _parse_path(path: str) -> Optional[list[Any]]:
    """``teachers[0].tp`` / ``teachers.0.tp`` → ['teachers', 0, 'tp'] / ['teachers', '0', 'tp']; None if malformed."""
    tokens: list[Any] = []
    for part in path.split("."):
        m = _PART.match(part.strip())
        if not m:
            return None
        tokens.append(m.group(1))
        tokens += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return tokens


def _fmt_path(tokens: Sequence[Any]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else (f".{t}" if out else str(t))
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], root: type, problems: list[str]) -> None:
    """Apply ``key=value`` overrides to the raw mapping in place (before validation).

    Values are parsed as YAML (``[a, b]``, ``true``, ``null``, ``1e-5``); a field typed as a
    string keeps the text as written. Problems (malformed override, unknown key, missing list
    element, bad YAML value) are appended to ``problems`` and that override is skipped.
    """
    ctx = _Ctx(problems, root)
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"override {ov!r}: missing '='. Fix: write key=value, e.g. optim.lr=1e-5")
            continue
        path, text = ov.split("=", 1)
        tokens = _parse_path(path.strip())
        if not tokens:
            problems.append(f"override {ov!r}: malformed key {path!r}. Fix: use dotted keys like teachers[0].tp or teachers.0.tp")
            continue
        try:
            value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
        except yaml.YAMLError as e:
            problems.append(f"{_fmt_path(tokens)}: override {ov!r} has a value that is not valid YAML ({getattr(e, 'problem', e)}). "
                            f"Fix: quote it or correct the syntax")
            continue
        _set_path(raw, tokens, value, text.strip(), ov, ctx)


def _set_path(raw: dict[str, Any], tokens: list[Any], value: Any, text: str, ov: str, ctx: _Ctx) -> None:
    node: Any = raw
    tp: Any = ctx.root
    for i, tok in enumerate(tokens):
        here = _fmt_path(tokens[:i]) or "the config"
        key = _fmt_path(tokens[: i + 1])
        inner, _ = _strip_optional(tp)
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        default: Any = {}
        if (dataclasses.is_dataclass(inner) or origin is dict) and not isinstance(node, dict):
            ctx.problems.append(f"{key}: override {ov!r}: {here} holds {show(node)}, not a mapping. Fix: correct {here} first")
            return
        if dataclasses.is_dataclass(inner):
            fields = {f.name: f for f in dataclasses.fields(inner)}
            if not isinstance(tok, str) or tok not in fields:
                ctx.problems.append(_unknown_key(ctx, _fmt_path(tokens[:i]), tok, f"from override {ov!r}", list(fields)))
                return
            f = fields[tok]
            child_tp = _hints(inner)[tok]
            if f.default_factory is not dataclasses.MISSING:
                default = to_plain(f.default_factory())
            elif f.default is not dataclasses.MISSING:
                default = to_plain(f.default)
            slot: Any = tok
        elif origin is list:
            idx = tok if isinstance(tok, int) else (int(tok) if str(tok).isdigit() else None)
            key = f"{here}[{idx if idx is not None else tok}]"
            if idx is None:
                ctx.problems.append(f"{key}: override {ov!r}: {here} is a list. Fix: index it, e.g. {here}[0]")
                return
            if not isinstance(node, list) or idx >= len(node):
                n = len(node) if isinstance(node, list) else 0
                ctx.problems.append(
                    f"{key}: override {ov!r}: no element {idx}, the list {here} has {n} element{'s' if n != 1 else ''}. "
                    f"Fix: use an index below {n}, or set the whole list {here}=[...]"
                )
                return
            child_tp, slot = (args[0] if args else Any), idx
        elif origin is dict or inner is Any:
            child_tp, slot = (args[1] if args else Any), str(tok)
        else:
            ctx.problems.append(f"{key}: override {ov!r}: {here} is {describe(tp)}, it has no key {tok!r}. Fix: override {here} itself")
            return
        if i == len(tokens) - 1:
            if value is not None and not isinstance(value, str) and _accepts_str(child_tp):
                value = text  # a string field keeps what was typed (e.g. run.output_dir=2024)
            node[slot] = value
            return
        if isinstance(node, dict) and node.get(slot) is None:
            node[slot] = default if default is not None else {}
        child = node[slot]
        if not isinstance(child, (dict, list)):
            ctx.problems.append(f"{key}: override {ov!r}: {key} holds {show(child)}, not a mapping or list. Fix: correct {key} first")
            return
        node, tp = child, child_tp
