"""Cross-origin requests (CORS, the Fetch standard): a frontend served from another
origin may call the edge when its origin is configured (`PARLEY_CORS_ORIGINS`).

Tokens travel in the `Authorization` header, never in cookies, so no credentials
are allowed: a page of a listed origin can do what its user's token lets it do,
and nothing more. Without configured origins the edge sends no CORS headers at all
and a browser keeps other origins out, as before.

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
  answered here, before authentication (a browser sends it without the token): 204
  with the route's methods and the headers asked for, cached by the browser for
  `MAX_AGE_S`; 403 in the error format for an origin not listed, and the usual 404
  or 405 for a path or method the edge does not have.
- Every other answer to a listed origin, errors and event streams included, names
  the origin and exposes the headers a client reads (`Retry-After`, `Allow`,
  `WWW-Authenticate`, `X-Request-Id`, the AI SDK's stream marker).
"""

from __future__ import annotations

from aiohttp import hdrs, web

from api.config import ANY_ORIGIN
from api.context import CONFIG
from api.errors import Handler, error_response

# How long a browser may reuse a preflight's answer (Chromium caps it at 2 hours).
MAX_AGE_S = 600
# Response headers a cross-origin script may read besides the safelisted ones.
EXPOSED = (
    "Retry-After",
    "Allow",
    "WWW-Authenticate",
    "X-Request-Id",
    "x-vercel-ai-ui-message-stream",
)
# Preflight answers depend on these request headers; ordinary answers on Origin.
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def _allowed(app: web.Application, origin: str | None) -> bool:
    allowed = app[CONFIG].cors_origins
    return origin is not None and (ANY_ORIGIN in allowed or origin.lower() in allowed)


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a preflight of a listed origin; before authentication, as it has no token."""
    if not _is_preflight(request):
        return await handler(request)
    if not _allowed(request.app, request.headers[hdrs.ORIGIN]):
        response = error_response(
            403,
            "origin_not_allowed",
            f"origin {request.headers[hdrs.ORIGIN]!r} is not in PARLEY_CORS_ORIGINS",
        )
        response.headers[hdrs.VARY] = _PREFLIGHT_VARY
        return response
    asked = request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD].upper()
    match = await request.app.router.resolve(request.clone(method=asked))
    if match.http_exception is not None:
        # the path is not the edge's (404), or not with that method (405, with Allow)
        err = match.http_exception
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status, "http_error")
        response = error_response(err.status, code, err.reason)
        if hdrs.ALLOW in err.headers:
            response.headers[hdrs.ALLOW] = err.headers[hdrs.ALLOW]
        response.headers[hdrs.VARY] = _PREFLIGHT_VARY
        return response
    methods = sorted(_methods_of(match) | {asked})
    response = web.Response(status=204)
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = request.headers[hdrs.ORIGIN]
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ", ".join(methods)
    asked_headers = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").strip()
    if asked_headers:
        # the browser asks only for headers its page sets: Authorization, Content-Type,
        # Last-Event-ID, or a useChat transport's own; the origin is trusted with them
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked_headers
    response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(MAX_AGE_S)
    response.headers[hdrs.VARY] = _PREFLIGHT_VARY
    return response


def _methods_of(match: web.UrlMappingMatchInfo) -> set[str]:
    resource = match.route.resource
    if resource is None:
        return {match.route.method}
    return {route.method for route in resource if route.method != hdrs.METH_ANY}


async def allow_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Name a listed origin on the answer to its request (a signal of every response)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if _is_preflight(request) or not _allowed(request.app, origin):
        return
    assert origin is not None
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(EXPOSED)
    vary = response.headers.get(hdrs.VARY)
    response.headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"
