"""One place where failures become `{"error": {"code", "message"}}` responses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
import nats.errors
import redis.exceptions
from aiohttp import web

from events.errors import EventLogUnavailable, describe
from events.tracing import REQUEST_ID

log = logging.getLogger(__name__)

# What the edge calls itself in `Server`: aiohttp's default names the Python and
# aiohttp versions, which are nobody's business.
SERVER_NAME = "parley"

# Failures of NATS, Postgres or Redis that mean "down or unreachable", not "bug".
UNAVAILABLE: tuple[type[BaseException], ...] = (
    EventLogUnavailable,
    nats.errors.Error,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    # shutting down, crashed, or starting up (replaying its WAL): 57P01-57P03
    asyncpg.exceptions.OperatorInterventionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # a Redis that answers but takes no writes: full (maxmemory) or a replica
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    OSError,  # refused or reset connections, unreachable hosts
)


# The subset that means Postgres (the read models) is away.
POSTGRES_AWAY: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    OSError,
)


# The statuses whose answer always carries Retry-After (seconds).
RETRY_LATER = frozenset({429, 503})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: int | None = None,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra: dict[str, object] = {}  # more keys of the error object (a busy turn's id)
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)
        self.close = close  # end the connection after the answer (a body left half-read)
        self.headers = headers or {}  # more headers of the answer (a 401's WWW-Authenticate)


def error_response(
    status: int, code: str, message: str, extra: dict[str, object] | None = None
) -> web.Response:
    """The error answer; it names its request (`X-Request-Id`, api/request_ids.py) in
    the body too, where a client that shows only the body (the AI SDK's `onError`)
    still has the id a user quotes in a report."""
    error: dict[str, object] = {"code": code, "message": message, **(extra or {})}
    request_id = REQUEST_ID.get()
    if request_id:  # (none outside a request: the listener's own answers)
        error["request_id"] = request_id
    return web.json_response({"error": error}, status=status)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The streamed response whose headers already went out, if any (`begin_stream`).
OPEN_STREAM = web.RequestKey("open_stream", web.StreamResponse)
# Set when the client went away during its stream (the metrics count it as a 499).
CLIENT_GONE = web.RequestKey("client_gone", bool)


async def begin_stream(request: web.Request, response: web.StreamResponse) -> None:
    """Send a streamed response's headers. From here on a failure cannot become an
    error answer: the middleware ends the stream instead (the client resumes from its
    last id), where an error response written into it would leave the client waiting
    for ever on a stream that never ends."""
    request[OPEN_STREAM] = response
    await response.prepare(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        response = error_response(err.status, err.code, err.message, err.extra)
        response.headers.update(err.headers)
        retry_after = err.retry_after
        if retry_after is None and err.status in RETRY_LATER:
            retry_after = 1  # a 429 or 503 always says when to try again (the document says so)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, retry_after))
        if err.close:
            response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge as err:
        return error_response(413, "body_too_large", err.text or "request body too large")
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status, "http_error")
        response = error_response(err.status, code, err.reason)
        if "Allow" in err.headers:  # a 405 names the methods the route takes
            response.headers["Allow"] = err.headers["Allow"]
        return response
    except ConnectionResetError:
        # The client went away, here while its stream was being begun or written
        # (the headers, a first line): nothing to answer, and nothing went wrong
        # here. Re-raised, aiohttp logged every such viewer as an error with its
        # traceback (the soak at 250 users, as its viewers left).
        begun: web.StreamResponse | None = request.get(OPEN_STREAM)
        if begun is None:
            raise
        request[CLIENT_GONE] = True
        return begun
    except Exception as err:
        stream: web.StreamResponse | None = request.get(OPEN_STREAM)
        if stream is None:
            return _error_answer(request, err)
        # Too late for an error answer: end the stream; the client resumes from its last id.
        if isinstance(err, UNAVAILABLE):
            log.warning("stream ended: %s", _unavailable(err), extra={"path": request.path})
        else:
            log.error("stream ended by an error", exc_info=err, extra={"path": request.path})
        return stream  # already prepared: aiohttp only ends it


def _error_answer(request: web.Request, err: Exception) -> web.Response:
    if not isinstance(err, UNAVAILABLE):
        log.error("unhandled error", exc_info=err, extra={"path": request.path})
        return error_response(500, "internal", "internal error")
    # A server behind the edge is down: say so, and that trying again is right.
    log.warning("dependency unavailable", extra={"path": request.path, "error": describe(err)})
    response = error_response(503, "unavailable", _unavailable(err))
    response.headers["Retry-After"] = "1"
    return response


def _unavailable(err: BaseException) -> str:
    return f"a backing service is unavailable: {type(err).__name__}"
