"""Routes declared once, and the OpenAPI 3.1 document made from them.

Each route of the edge is one `Operation` in `api.routes.ROUTES`: method,
path, handler, and the msgspec types it reads (body, query, headers) and
answers with. The same entry registers the handler with aiohttp
(`register`) and describes it in `/openapi.json` (`document`), with schemas
from `msgspec.json.schema_components`: the request types are the ones the
handlers decode with, the answers the Structs they encode (api/responses.py).
So the document is never written by hand, and a route added later is one line.

Errors need no declaring: every route answers `{"error": {"code", "message"}}`
(api/errors.py), and which statuses it may send follows from what it takes (a
body: 400, 408, 413; an id in the path: 404; a token: 401, 429) plus the
`errors` its entry adds.

Pure apart from `register`: no I/O, nothing read at request time.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from api.errors import RETRY_LATER
from api.request_ids import HEADER
from api.responses import ErrorBody
from api.sse import DATA_SHAPES
from events.subjects import ID_PATTERN

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Media:
    """An answer that is not one JSON document: an event stream, JSON lines, a page."""

    content_type: str
    description: str
    # for an event stream: each event's `data` type by event name (api.sse.DATA_SHAPES)
    events: Mapping[str, Any] | None = None


SSE = Media(
    "text/event-stream",
    'Server-Sent Events: `id: <log position>` and `data: {"event", "data", ...}` '
    "(README: the SSE wire format); `: ping` comments keep the connection alive",
    events=DATA_SHAPES,
)
NDJSON = Media("application/x-ndjson", "one JSON object per line, in log order")
AI_SDK_STREAM = Media(
    "text/event-stream",
    "the Vercel AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`): "
    "`data: {type: start|text-delta|reasoning-delta|tool-...|finish|abort|error, ...}`, "
    "then `data: [DONE]`",
)
HTML = Media("text/html", "the web page")
# what parley.metrics renders with (prometheus_client's generate_latest)
PROMETHEUS = Media("text/plain", f"Prometheus text exposition format (`{CONTENT_TYPE_LATEST}`)")

# A 2xx answer: a msgspec type (JSON), a Media, or None (no body).
Answer = type | Media | None

_ERRORS = {
    400: "the request is malformed; `code` says how (`invalid_json`, `invalid_request`, ...)",
    401: "no valid bearer token",
    403: "the token may not do this",
    404: "no such resource, or not yours (existence is not told)",
    408: "the request body did not arrive in time",
    409: "the conversation is busy (`on_busy: reject`) or refuses new messages",
    413: "the request body is too large",
    422: "the idempotency key was used for a different request",
    429: "a per-user limit; `Retry-After` says when to try again",
    503: "a backing service (NATS, Postgres, Redis) is unavailable; `Retry-After`",
    504: "NATS took the command but did not confirm it (`outcome_unknown`): it may still"
    " be applied; a request sent again with the same idempotency_key is applied once",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}
_REQUEST_ID = {
    HEADER: {
        "description": "the request's id: the one sent in `X-Request-Id` (1-128 letters,"
        " digits and `._:-`), else one the edge made; its log lines carry it",
        "required": True,
        "schema": {"type": "string"},
    }
}
# Headers every error answer of a status carries (api/errors.py, api/app.py).
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    **dict.fromkeys(RETRY_LATER, _RETRY_AFTER),
    401: {
        "WWW-Authenticate": {
            "description": '`Bearer`; `Bearer error="invalid_token"` when a token was refused',
            "required": True,
            "schema": {"type": "string"},
        }
    },
}
_PATH_PARAM = re.compile(r"{(\w+)}")


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    # status -> what a success carries
    answers: Mapping[int, Answer]
    body: type | None = None
    body_required: bool = True
    # Structs whose fields are the query parameters / request headers the handler reads
    query: type | None = None
    headers: type | None = None
    errors: tuple[int, ...] = ()
    public: bool = False  # no token needed
    tag: str = "conversations"
    description: str = ""
    path_params: Mapping[str, str] = field(default_factory=dict)  # name -> description
    # name -> its type, when it is not an id (events.subjects.ID_PATTERN)
    path_types: Mapping[str, Any] = field(default_factory=dict)

    @property
    def operation_id(self) -> str:
        return getattr(self.handler, "__name__", f"{self.method}{self.path}")

    def error_statuses(self) -> list[int]:
        statuses = set(self.errors)
        if not self.public:
            statuses |= {401, 429, 503}
        if self.body is not None:
            statuses |= {400, 408, 413}
        if self.query is not None or self.headers is not None:
            statuses.add(400)
        if _PATH_PARAM.search(self.path):
            statuses.add(404)
        return sorted(statuses)


def register(app: web.Application, operations: Iterable[Operation]) -> None:
    for op in operations:
        if op.method == "GET":  # answers HEAD too (add_get's default); the document lists GET
            app.router.add_get(op.path, op.handler)
        else:
            app.router.add_route(op.method, op.path, op.handler)


def document(operations: Iterable[Operation], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing `operations`."""
    operations = list(operations)
    types: list[Any] = [ErrorBody, *DATA_SHAPES.values()]
    for op in operations:
        types.extend(t for t in (op.body, op.query, op.headers) if t is not None)
        types.extend(a for a in op.answers.values() if isinstance(a, type))
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = {id(t): s for t, s in zip(types, schemas, strict=True)}
    components["SseEnvelope"] = _envelope_schema(DATA_SHAPES, schema_of)
    components["SseEvent"] = _SSE_EVENT

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }


def _operation(
    op: Operation, schema_of: dict[int, Any], components: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        out["description"] = op.description
    if op.public:
        out["security"] = []
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": op.path_params.get(name, name),
            "schema": msgspec.json.schema(op.path_types[name])
            if name in op.path_types
            else {"type": "string", "pattern": ID_PATTERN},
        }
        for name in _PATH_PARAM.findall(op.path)
    ]
    for kind, where in ((op.query, "query"), (op.headers, "header")):
        if kind is not None:
            parameters.extend(_parameters(schema_of[id(kind)], components, where))
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schema_of[id(op.body)]}},
        }
    responses: dict[str, Any] = {}
    for status, what in op.answers.items():
        responses[str(status)] = _answer(what, schema_of)
        if status in RETRY_LATER:  # a report, not an error, and still says when to ask again
            responses[str(status)]["headers"] = _RETRY_AFTER
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for status in op.error_statuses():
        responses[str(status)] = {
            "description": _ERRORS.get(status, "error"),
            "content": {"application/json": {"schema": error}},
        }
        if status in _ERROR_HEADERS:
            responses[str(status)]["headers"] = _ERROR_HEADERS[status]
    responses["default"] = {
        "description": "any other failure (500 internal)",
        "content": {"application/json": {"schema": error}},
    }
    for answer in responses.values():  # every answer names its request (api/request_ids.py)
        answer["headers"] = {**answer.get("headers", {}), **_REQUEST_ID}
    out["responses"] = responses
    return out


# One event of a stream as a client's parser sees it (OpenAPI 3.1: `schema` of an
# event-stream describes each event); its `data` is the JSON envelope. Each stream
# opens with `retry: 1000`, an event with no `data` (api/streaming.py).
_SSE_EVENT = {
    "type": "object",
    "description": "an event of the stream: `data` holds the envelope; the first, with only"
    " `retry` (milliseconds), sets how soon a client reconnects",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"},
        "event": {"type": "string"},
        "retry": {"type": "integer"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/SseEnvelope"},
        },
    },
}


def _envelope_schema(shapes: Mapping[str, Any], schema_of: dict[int, Any]) -> dict[str, Any]:
    """`{"event": name, "data": ...}`, one alternative per event name; more keys may ride along."""
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {"event": {"const": name}, "data": schema_of[id(shape)]},
            }
            for name, shape in shapes.items()
        ]
    }


def _answer(what: Answer, schema_of: dict[int, Any]) -> dict[str, Any]:
    if what is None:
        return {"description": "no body"}
    if isinstance(what, Media):
        schema = {"$ref": "#/components/schemas/SseEvent"} if what.events else {"type": "string"}
        return {
            "description": what.description,
            "content": {what.content_type: {"schema": schema}},
        }
    return {
        "description": (what.__doc__ or what.__name__).strip().splitlines()[0],
        "content": {"application/json": {"schema": schema_of[id(what)]}},
    }


def _parameters(
    ref: dict[str, Any], components: dict[str, Any], where: str
) -> list[dict[str, Any]]:
    """A Struct's fields as parameters `in` the query or the headers."""
    schema = components[ref["$ref"].rsplit("/", 1)[1]]
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": where, "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]
