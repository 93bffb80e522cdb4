"""What user data may hold before it reaches a text or JSON column: the one place that decides.

Read `check` (exact data: reject) and `cleaned` / `clean_text` (free text: repair and say where). Both
databases and every encoder we use have limits a body can hit:
- NUL (U+0000): Postgres text cannot hold it, and its JSON functions refuse `\\u0000` (the heartbeat's
  `json_to_recordset` fails with "unsupported Unicode escape sequence").
- a lone surrogate (U+D800..U+DFFF on its own; a Python str holds a valid pair as one code point): it is
  not UTF-8, so orjson, psycopg and Postgres refuse it, and a stored one makes every later read fail.
- deep nesting: orjson stops at 255 levels, json.dumps and copy.deepcopy at Python's recursion limit.

Exact data (names, configs, axes, resources, checkpoint pointers) must arrive as sent: a bad character is a
422 naming the field. Free text from a trainer or a log (metric values, results, errors, event messages)
gets each bad character replaced by U+FFFD, and the caller says which fields it repaired. Deep nesting is
refused everywhere. Real configs nest fewer than 10 levels; MAX_DEPTH leaves room for far more.
"""
from __future__ import annotations

import re
from typing import Any

import orjson

MAX_DEPTH = 64  # levels of objects/arrays in one JSON value (and in one request body, counted from its root)
MAX_BODY_BYTES = 16 * 2**20  # one request body; a heartbeat of 10,000 metrics is about 1-2 MB
REPLACEMENT = "\ufffd"
_BAD = re.compile("[\x00\ud800-\udfff]")
_PATH_PARTS = 8  # a field path in a message names at most this many levels


class BadValue(ValueError):
    """A value a caller must refuse. `field` is where (e.g. 'config.optim.lr'), `message` what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def under(self, field_name: str | None = None) -> str:
        """The message as a validator of `field_name` says it (pydantic names the field; this says where in it)."""
        return self.message if self.field == field_name else f"{self.message} (at {self.field})"


def path(*parts: Any) -> str:
    """A field path as messages show it ('metrics.0.values.loss'), at most _PATH_PARTS levels."""
    parts = parts[1:] if parts and parts[0] == "" else parts  # "" is the root of the value
    shown = [clean_text(str(p))[0][:40] for p in parts[:_PATH_PARTS]]
    return ".".join(shown) + (".(...)" if len(parts) > _PATH_PARTS else "")


def text_problem(value: str) -> str | None:
    """What is wrong with a string, or None."""
    found = _BAD.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (\\u0000), which cannot be stored"
    return f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode text"


def clean_text(value: str) -> tuple[str, bool]:
    """The string with NUL and lone surrogates replaced by U+FFFD, and whether anything changed."""
    if _BAD.search(value) is None:
        return value, False
    return _BAD.sub(REPLACEMENT, value), True


def is_plain(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """True when `value` certainly has nothing to refuse or repair: one C call for the common case (orjson
    refuses lone surrogates, writes NUL as \\u0000, and fewer brackets than max_depth cannot nest deeper).
    False only means "look closer"."""
    try:
        raw = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # a lone surrogate, a non-str key, deep nesting, a big int
        return False
    return b"\\u0000" not in raw and (raw.count(b"{") + raw.count(b"[") <= max_depth or too_deep(value, "", max_depth) is None)


def too_deep(value: Any, field: str, max_depth: int = MAX_DEPTH) -> BadValue | None:
    """The refusal for a value nested deeper than `max_depth` levels (the value itself is level 1), or None.
    Iterative, so no depth of input can make it recurse."""
    stack: list[tuple[Any, int, tuple]] = [(value, 1, ())]
    while stack:
        node, level, where = stack.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            continue
        if level > max_depth:
            return BadValue(path(field, *where), f"nested deeper than {max_depth} levels")
        stack.extend((child, level + 1, (*where, key)) for key, child in items
                     if isinstance(child, (dict, list, tuple)))
    return None


def check(value: Any, field: str, max_depth: int = MAX_DEPTH) -> Any:
    """Exact data: the value unchanged, or BadValue for deep nesting or a bad character in any key or string."""
    if is_plain(value, max_depth):
        return value
    problem = too_deep(value, field, max_depth)
    if problem is not None:
        raise problem
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            message = text_problem(node)
            if message:
                raise BadValue(path(field, *where), message)
        elif isinstance(node, dict):
            for key, child in node.items():
                message = text_problem(key) if isinstance(key, str) else None
                if message:
                    raise BadValue(path(field, *where, key), "the key " + message)
                stack.append((child, (*where, key)))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, (*where, i)) for i, child in enumerate(node))
    return value


def cleaned(value: Any, field: str, max_depth: int = MAX_DEPTH) -> tuple[Any, list[str]]:
    """Free data: (the value with bad characters in keys and strings replaced by U+FFFD, the paths that
    changed). Deep nesting is still a BadValue. A value with nothing to repair comes back as it is."""
    problem = too_deep(value, field, max_depth)
    if problem is not None:
        raise problem
    changed: list[str] = []
    repaired = _repair(value, (field,), changed)  # recursion is bounded by max_depth here
    return (repaired, changed) if changed else (value, changed)


def _repair(node: Any, where: tuple, changed: list[str]) -> Any:
    if isinstance(node, str):
        text, dirty = clean_text(node)
        if dirty:
            changed.append(path(*where))
        return text
    if isinstance(node, dict):
        out = {}
        for key, child in node.items():
            if isinstance(key, str):
                new_key, dirty = clean_text(key)
                if dirty:
                    changed.append(path(*where, new_key) + " (key)")
                key = new_key
            out[key] = _repair(child, (*where, key), changed)
        return out
    if isinstance(node, (list, tuple)):
        return [_repair(child, (*where, i), changed) for i, child in enumerate(node)]
    return node


def cleaned_note(paths: list[str], limit: int = 5) -> str:
    """One line saying what `cleaned` repaired, for an event on the job and the reply."""
    shown = ", ".join(paths[:limit]) + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")
    return (f"replaced NUL or lone surrogate characters by U+FFFD in {shown} "
            "(neither can be stored as text); the rest was stored as sent")
