"""Listening for connections: every waiting connection is taken each time the socket is ready.

aiohttp's `TCPSite` listens through the event loop's `create_server`. On uvloop
that is libuv, which since libuv/libuv#3696 (2022) accepts one
connection each time the listening socket polls readable, then waits for the
next loop iteration. On a busy loop those iterations are far apart: under
`parley bench capacity` at 1,000 turns with two workers, strace on the edge
showed one `accept4` every 50-300 ms while `ss` showed 400-800 connections
waiting in its accept queue, and a message's request took 0.3-2.3 s (p50,
four runs) from its headers being sent to the edge's first middleware. A scratch script (a
loop doing 20 ms of work an iteration, 300 connections at once) took 6.15 s to
accept them all through uvloop's server, 0.08 s through asyncio's (which
accepts up to the backlog at once) and 0.05 s through the site below.

`EagerTCPSite` binds its own sockets, and when one polls readable accepts
until the kernel has none left (at most `backlog` at a time), handing each to
the loop with `connect_accepted_socket`: the same transports and protocol as
`TCPSite`, on either loop. As asyncio does, an accept that fails for lack of
resources (no file descriptors, no memory) pauses that socket for a second,
with a warning, rather than spin or end the server; the error of a single
waiting connection (aborted while it waited) skips that one.

A request aiohttp's HTTP parser refuses (a header over 8,190 bytes, a space in
a header's name, `Content-Length: abc`, a NUL in a header) never reaches the
application: aiohttp answered it in text/plain, named its versions in `Server`,
and logged a traceback at ERROR for each, so anyone could flood the log. The
edge's sites serve connections with `EdgeRequestHandler`, which answers those in
the edge's error format and logs one line at DEBUG.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from api.errors import SERVER_NAME, error_response

log = logging.getLogger(__name__)

# Errors of accept() that say the process or the kernel is out of something:
# retried after a pause (asyncio's own server does the same, and logs them).
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_AFTER_S = 1.0


def edge_runner(app: web.Application, *, idle_timeout_s: float) -> web.AppRunner:
    """The runner an edge listens through (`parley serve`, and the tests' extra edges).

    `idle_timeout_s` is aiohttp's timer for a connection waiting for its (next)
    request, an hour by default: a client could hold sockets that never sent a
    whole request until the process had no file descriptors left."""
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=5.0, keepalive_timeout=idle_timeout_s
    )


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's handler of one connection, but for what its HTTP parser refuses: a
    400 in the error format (`bad_request`), `Server` as the edge names itself, and
    one line at DEBUG, not a traceback at ERROR (a malformed request is the
    client's doing, and anyone may send them)."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # the handler's own failure: aiohttp's way
            return super().handle_error(request, status, exc, message)
        # the parser's words, without the bytes it quotes: "Invalid header token"
        reason = (exc.message or "malformed").split("\n", 1)[0].split(": b'", 1)[0].rstrip(": .")
        log.debug("refused a request that is not HTTP", extra={"error": reason[:200]})
        if request.writer.output_size > 0:  # as aiohttp: an answer began, none can follow
            raise ConnectionError("an answer was sent already")
        response = error_response(
            400, "bad_request", f"the request is not valid HTTP: {reason[:200]}"
        )
        response.headers["Server"] = SERVER_NAME
        response.force_close()  # where the next request would begin is unknown
        return response


def _connections(server: web.Server, kind: type[web.RequestHandler]) -> Callable[[], Any]:
    """The protocol factory of `server` (its `__call__`), making `kind` of handler.

    No public hook chooses the class a `web.Server` makes for each connection: it
    makes a RequestHandler with the keyword arguments its runner gave it (the
    keep-alive timeout, the access log, ...), kept in its private `_kwargs`. They
    are read here, once per site; tests/test_listener.py pins it (an aiohttp that
    renames them fails there, at the site's start)."""
    kwargs: dict[str, Any] = server._kwargs
    loop = asyncio.get_running_loop()
    return lambda: kind(server, loop=loop, **kwargs)


class EagerTCPSite(web.BaseSite):
    """A TCP site that accepts all waiting connections whenever its socket is ready.

    `protocol`: the class serving each connection (the edge's: `EdgeRequestHandler`)."""

    __slots__ = ("_host", "_port", "_protocol")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        backlog: int,
        protocol: type[web.RequestHandler] = web.RequestHandler,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._protocol = protocol

    @property
    def name(self) -> str:
        host = self._host or "0.0.0.0"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up: BaseSite checked it
        factory: Callable[[], Any] = server
        if self._protocol is not web.RequestHandler:
            factory = _connections(server, self._protocol)
        loop = asyncio.get_running_loop()
        sockets = _listen(self._host, self._port, self._backlog)
        self._server = _EagerServer(loop, factory, sockets, self._backlog)
        self._port = sockets[0].getsockname()[1]


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """A listening socket for every address `host` names (as `create_server` binds
    them), all on one port: `port`, or the one the first was given when it is 0."""
    # "" is every interface, as `create_server` takes it
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this host lacks (IPv6 turned off), as create_server does
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        if not sockets:
            raise OSError(f"no address of {host!r} can be listened on here")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _EagerServer(asyncio.AbstractServer):
    """The listening sockets of an `EagerTCPSite`; `close` stops listening."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        sockets: list[socket.socket],
        backlog: int,
    ) -> None:
        self._loop = loop
        self._factory = factory
        self._sockets = sockets
        self._backlog = backlog
        self._serving = True
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept_waiting, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _accept_waiting(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left
            except OSError as err:
                if err.errno not in _OUT_OF_RESOURCES:
                    # the error of one waiting connection (it was aborted, its
                    # network went away: accept(2) says to go on with the next)
                    log.debug("a waiting connection failed", extra={"error": str(err)})
                    continue
                log.warning(
                    "cannot accept connections; trying again shortly",
                    extra={"error": err.strerror, "retry_in_s": RETRY_AFTER_S},
                )
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(RETRY_AFTER_S, self._resume, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as err:  # the peer left before its transport was made
            log.debug("accepted connection lost at once", extra={"error": str(err)})
            conn.close()

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept_waiting, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []
        self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        return None  # serving since it was made

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
