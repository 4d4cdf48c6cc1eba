"""The edge's listener takes every waiting connection at once, and outlives running out of files."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap

import aiohttp
from aiohttp import web

from api.listener import EagerTCPSite, EdgeRequestHandler, edge_runner


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def _started(host: str = "127.0.0.1") -> tuple[web.AppRunner, EagerTCPSite]:
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = EagerTCPSite(runner, host, 0, backlog=128)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def test_connections_waiting_together_are_all_taken_in_one_go() -> None:
    """uvloop's own server takes one waiting connection per loop iteration (libuv
    #3696): fifty clients that connected while the loop was busy would need fifty."""
    runner, _ = await _started()
    port = runner.addresses[0][1]
    clients: list[socket.socket] = []
    try:
        # the kernel completes these handshakes while the loop runs nothing
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        server = runner.server
        assert server is not None
        for _ in range(4):
            await asyncio.sleep(0)
        assert len(server.connections) == 50
    finally:
        for client in clients:
            client.close()
        await runner.cleanup()


async def test_the_site_serves_requests_and_stops_listening_when_cleaned_up() -> None:
    runner, _ = await _started()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # a kept-alive connection, then more
                async with http.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200
                    assert await response.text() == "hello"
    finally:
        await runner.cleanup()
    refused = False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        refused = True
    assert refused, "the port still accepts connections after cleanup"


async def test_the_edges_connections_keep_the_settings_the_runner_was_given() -> None:
    """EdgeRequestHandler is made with the keyword arguments aiohttp's Server keeps
    privately (api/listener.py `_connections`): read wrongly, an idle connection
    would be held for aiohttp's default hour, not the edge's idle timeout."""
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = edge_runner(app, idle_timeout_s=0.2)
    await runner.setup()
    try:
        await EagerTCPSite(runner, "127.0.0.1", 0, backlog=16, protocol=EdgeRequestHandler).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"hello")
            server = runner.server
            assert server is not None
            assert [type(c) for c in server.connections] == [EdgeRequestHandler]
            # then closed once idle for 0.2 s
            assert await reader.read() == b""
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        await runner.cleanup()


async def test_an_empty_host_listens_on_every_interface_on_one_port() -> None:
    runner, site = await _started("")
    try:
        addresses = runner.addresses
        assert "0.0.0.0" in [a[0] for a in addresses]  # and "::" where IPv6 is on
        ports = {a[1] for a in addresses}
        assert len(ports) == 1
        assert site.name == f"http://0.0.0.0:{ports.pop()}"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{addresses[0][1]}/") as response,
        ):
            assert response.status == 200
    finally:
        await runner.cleanup()


_OUT_OF_FILES = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    from aiohttp import web
    from api.listener import EagerTCPSite
    from parley import loops

    held = []

    class FreeOnWarning(logging.Handler):
        def emit(self, record):
            print("warned:", record.getMessage(), flush=True)
            for fd in held:
                os.close(fd)
            held.clear()

    async def hello(request):
        return web.Response(text="hello")

    async def main():
        logging.getLogger("api.listener").addHandler(FreeOnWarning())
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await EagerTCPSite(runner, "127.0.0.1", 0, backlog=16).start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print("port", runner.addresses[0][1], flush=True)
        await asyncio.sleep(30)

    loops.run(main())
    """
)


def test_running_out_of_files_pauses_accepting_and_the_client_is_served_after() -> None:
    """No file descriptor left for a new connection: the listener says so, waits,
    and takes the connection once there is one; the process goes on."""
    child = subprocess.Popen(
        [sys.executable, "-c", _OUT_OF_FILES],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("port "), line
        port = int(line.split()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert answer.endswith(b"hello")
        warned = child.stdout.readline()
        assert "cannot accept connections" in warned, warned
        assert child.poll() is None, "the server ended"
    finally:
        child.kill()
        child.wait()
