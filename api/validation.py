"""Request bodies in, typed values out: what the edge accepts, decided before anything is appended.

Pure functions, no aiohttp: every rule here is tested without a server.

The rule (DESIGN section 1): text a read model cannot hold is refused at the
edge, so it never reaches the log. That is NUL (Postgres text cannot store it)
and text that is not valid UTF-8, raw or as a lone surrogate escape. Bodies are
bounded before they are parsed in full: the size by the server's body limit,
the nesting depth by a scan here (msgspec recurses once per level, and a
thousand levels would exhaust the stack even inside a field we ignore).

A field's limits (lengths, ranges, patterns) are written once, as `msgspec.Meta`
on the request types (`refused`): decoding enforces them, `/openapi.json`
shows them, and the words a client gets when a value breaks one stand beside
it, so the document, the check and the message cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec

from api.config import MAX_MESSAGE_CHARS
from events.codec import UNSTORABLE
from events.subjects import ID_PATTERN

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


_REFUSAL = "refusal"  # the key of a refusal's (code, message) in a Meta's `extra`


def refused(message: str, *, code: str = "bad_request", **limits: Any) -> msgspec.Meta:
    """`limits` (msgspec.Meta's: min_length, max_length, pattern, ge, le, description, ...)
    with what a client is told when its value breaks one: `message`, in which
    `{field}` is the field's name, and `code`."""
    return msgspec.Meta(**limits, extra={_REFUSAL: (code, message)})


ID_RULE = "{field} must be 1-128 characters of A-Z a-z 0-9 _ -"
# A trailing newline passes the pattern (its `$`, in Python): handlers whose id
# names a subject still check it with events.subjects.valid_id.
Id = Annotated[str, refused(ID_RULE, pattern=ID_PATTERN)]
IdempotencyKey = Annotated[
    str,
    refused(
        "idempotency_key must be 1-200 characters",
        min_length=1,
        max_length=200,
        description="the same request again with the same key is applied once (kept 24 hours)",
    ),
]
# The longest a message may be is the edge's `max_message_chars` (checked with the
# configuration at hand, api.turn_routes.check_text): the document names the default.
Content = Annotated[
    str,
    refused(
        "content is empty",
        min_length=1,
        pattern=r"\S",
        description=f"the message's text: not blank, at most {MAX_MESSAGE_CHARS:,} characters"
        " (the default; an edge may be configured otherwise)",
        extra_json_schema={"maxLength": MAX_MESSAGE_CHARS},
    ),
]


# What a client may send as `model`: the document can only say "a name" (the edge's
# configuration lists them); one it does not know is 400 `unknown_model`.
ModelName = Annotated[
    str,
    msgspec.Meta(
        description="one of the model names GET /v1/models lists",
        extra_json_schema={"minLength": 1},
    ),
]


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
        raise invalid(err, kind, "invalid request") from err


# where a ValidationError says a top-level field broke a rule: "... - at `$.title`"
_AT_FIELD = re.compile(r" - at `\$\.(\w+)`$")
_REFUSALS: dict[type, dict[str, tuple[str, str]]] = {}


def invalid(err: msgspec.ValidationError, kind: type, what: str) -> InvalidBody:
    """A ValidationError of decoding a `kind` as the client is told it: in the words of
    the field's `refused` limit when it broke one, else msgspec's own ("Expected
    `str`, got `int` - at `$.content`", "Object missing required field ...")."""
    text = str(err)
    at = _AT_FIELD.search(text)
    if at is not None and ", got `" not in text:  # a limit broken, not a wrong type
        said = _refusals(kind).get(at.group(1))
        if said is not None:
            code, message = said
            return InvalidBody(code, message.format(field=at.group(1)))
    return InvalidBody("invalid_request", f"{what}: {text}")


def _refusals(kind: type) -> dict[str, tuple[str, str]]:
    """A Struct's `refused` fields by the name a client sends, read once per kind."""
    found = _REFUSALS.get(kind)
    if found is None:
        found = _REFUSALS[kind] = {}
        info = msgspec.inspect.type_info(kind)
        if isinstance(info, msgspec.inspect.StructType):
            for field in info.fields:
                said = _refusal_of(field.type)
                if said is not None:
                    found[field.encode_name] = said
    return found


def _refusal_of(info: msgspec.inspect.Type) -> tuple[str, str] | None:
    if isinstance(info, msgspec.inspect.Metadata) and info.extra:
        said: tuple[str, str] | None = info.extra.get(_REFUSAL)
        return said
    if isinstance(info, msgspec.inspect.UnionType):  # an optional field: `Id | None`
        for member in info.types:
            said = _refusal_of(member)
            if said is not None:
                return said
    return None


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
        raise invalid(err, kind, "invalid parameter") from err
