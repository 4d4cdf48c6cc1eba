"""Request bodies in, typed values out: what the edge accepts, decided before anything is appended.

Pure functions, no aiohttp: every rule here is tested without a server.

The rule (DESIGN section 1): text a read model cannot hold is refused at the
edge, so it never reaches the log. That is NUL (Postgres text cannot store it)
and text that is not valid UTF-8, raw or as a lone surrogate escape. Bodies are
bounded before they are parsed in full: the size by the server's body limit,
the nesting depth by a scan here (msgspec recurses once per level, and a
thousand levels would exhaust the stack even inside a field we ignore).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from events.codec import UNSTORABLE

MAX_DEPTH = 32
# The largest position a query may name: a log's sequence (and Postgres's bigint).
MAX_POSITION = 2**63 - 1
T = TypeVar("T")

_SYNTAX = re.compile(rb'[\[\]{}"\\]')
_BACKSLASH, _QUOTE = ord("\\"), ord('"')
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


class InvalidBody(Exception):
    """A body the edge refuses; `code` and `status` say how to answer."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def nesting_depth(body: bytes, limit: int) -> int:
    """The deepest nesting of arrays and objects, counted up to `limit + 1`.

    Brackets inside strings do not count. Cheap for the usual body: with no more
    brackets than the limit, no scan is needed at all.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return 0
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the position a backslash inside a string escapes
    for match in _SYNTAX.finditer(body):
        pos = match.start()
        if pos == escaped_at:
            continue
        char = body[pos]
        if in_string:
            if char == _BACKSLASH:
                escaped_at = pos + 1
            elif char == _QUOTE:
                in_string = False
        elif char == _QUOTE:
            in_string = True
        elif char in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif char in _CLOSE:
            depth -= 1
    return deepest


def unstorable_text(value: Any, path: str = "$") -> str | None:
    """The path of the first string (or key) holding NUL or a lone surrogate, if any."""
    if isinstance(value, str):
        return path if UNSTORABLE.search(value) else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = unstorable_text(item, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and UNSTORABLE.search(key):
                return f"{path} (a key)"
            found = unstorable_text(item, f"{path}.{key}")
            if found:
                return found
    return None


def decode_body(body: bytes, kind: type[T], *, max_depth: int = MAX_DEPTH) -> T:
    """The body as a `kind`, or `InvalidBody` saying plainly what is wrong with it."""
    if not body.strip():
        raise InvalidBody("invalid_json", "request body is empty; expected a JSON object")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidBody(
            "invalid_encoding", f"request body is not valid UTF-8 (byte {err.start})"
        ) from err
    if nesting_depth(body, max_depth) > max_depth:
        raise InvalidBody("too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        loose = msgspec.json.decode(body)
    except msgspec.DecodeError as err:
        found = _lone_surrogate_in(body)  # msgspec says only "Input data was truncated"
        if found:
            raise InvalidBody(
                "invalid_text",
                f"{found} holds a NUL character or a lone surrogate, which cannot be stored",
            ) from err
        raise InvalidBody("invalid_json", f"malformed JSON: {err}") from err
    found = unstorable_text(loose)
    if found:
        raise InvalidBody(
            "invalid_text",
            f"{found} holds a NUL character or a lone surrogate, which cannot be stored",
        )
    try:
        return msgspec.convert(loose, type=kind)
    except msgspec.ValidationError as err:
        raise InvalidBody("invalid_request", f"invalid request: {err}") from err


def _lone_surrogate_in(body: bytes) -> str | None:
    """Where a body msgspec refused holds a lone surrogate escape (`"\\ud800"`), if
    that is why: the standard library's reader takes such escapes, msgspec's not."""
    try:
        loose = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return unstorable_text(loose)


_PARAM_NAMES: dict[type, tuple[str, ...]] = {}


def _param_names(kind: type) -> tuple[str, ...]:
    """A Struct's parameter names. `msgspec.structs.fields` reads the class's annotations
    again on every call (15 us, and a reference cycle left for the collector: twice
    on every SSE viewer's request), so they are read once per kind."""
    names = _PARAM_NAMES.get(kind)
    if names is None:
        fields = msgspec.structs.fields(kind)
        names = _PARAM_NAMES[kind] = tuple(f.encode_name for f in fields)
    return names


def decode_params(source: Mapping[str, str], kind: type[T]) -> T:
    """Query parameters or headers as a `kind` Struct, whose field names (or `name=`
    renames) are the parameter names; numbers are parsed from their text."""
    values = {name: source[name] for name in _param_names(kind) if name in source}
    found = unstorable_text(values)
    if found:
        raise InvalidBody("invalid_text", f"{found} holds a NUL character or a lone surrogate")
    try:
        return msgspec.convert(values, type=kind, strict=False)
    except msgspec.ValidationError as err:
        raise InvalidBody("invalid_request", f"invalid parameter: {err}") from err
