"""Every answer of the edge names its request: `X-Request-Id`.

A load balancer or proxy that gives each request an id (nginx's `$request_id`,
Envoy's `x-request-id`) passes it on, and the edge keeps it when it is 1 to 128
letters, digits and `._:-`; otherwise it makes one. The id is on the answer
(errors and event streams too) and on every line the edge logs while it serves
the request (the field `request_id`), and on the command that request sends,
so that the worker's lines for it carry it too (events/tracing.py): a user's
report of a failure ("a 500, request id ...") leads to its lines in the log,
and to the proxy's.
"""

from __future__ import annotations

import re

from aiohttp import web

from api.errors import Handler
from events.ids import new_id
from events.tracing import naming

HEADER = "X-Request-Id"
_ID = web.RequestKey("request_id", str)
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(HEADER, "")
    request_id = given if _ACCEPTED.fullmatch(given) else new_id()
    request[_ID] = request_id
    with naming(request_id):
        return await handler(request)


async def name_the_request(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the id on the answer, before its headers go out."""
    request_id = request.get(_ID)
    if request_id is not None:
        response.headers[HEADER] = request_id
