"""Limits a public endpoint needs, each on an edge of its own against the live stack."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from api.config import EdgeLimits
from api.context import SharedCheck
from api.turn_routes import idem_key
from events.log import EventLog
from events.vocabulary import Done, Started, TurnEnd
from parley.services import Servers, Services
from tests.conftest import extra_edge, token_for
from tests.sse import SseClient


def limits(**overrides: Any) -> EdgeLimits:
    base: dict[str, Any] = {
        "rate_per_s": 0,
        "max_streams_per_user": 0,
        "max_turns_per_user": 0,
        **overrides,
    }
    return EdgeLimits(**base)


def assert_429(status: int, headers: Any, body: Any, code: str) -> None:
    assert status == 429, (status, body)
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert int(headers["Retry-After"]) >= 1, headers


async def test_requests_over_the_users_rate_are_429_with_retry_after(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    async with extra_edge(stack, limits=limits(rate_per_s=0.5, rate_burst=3)) as base:
        api = SseClient(http, base, token_for(user))
        for _ in range(3):
            status, _ = await api.request("GET", "/v1/conversations")
            assert status == 200
        async with http.get(base + "/v1/conversations", headers=api.headers()) as response:
            assert_429(response.status, response.headers, await response.json(), "rate_limited")
            assert int(response.headers["Retry-After"]) == 2  # one token every 2 s
        other = SseClient(http, base, token_for(user + "-other"))
        status, _ = await other.request("GET", "/v1/conversations")
        assert status == 200, "one user's limit is not another's"
        async with http.get(base + "/healthz") as response:
            assert response.status == 200, "public paths are not limited"


async def test_a_user_may_hold_only_so_many_event_streams_and_a_closed_one_frees_its_slot(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    async with extra_edge(
        stack, limits=limits(max_streams_per_user=2), ping_interval_s=0.1
    ) as base:
        api = SseClient(http, base, token_for(user))
        cid = (await api.create_conversation())["id"]
        first = await api.events(cid).__aenter__()
        second = await api.events(cid).__aenter__()
        try:
            assert first.status == second.status == 200
            async with api.events(cid) as third:
                assert_429(third.status, third.headers, await third.json(), "too_many_streams")
            # a POST that wants a stream is one more stream; as JSON it is not
            status, body = await api.request(
                "POST", f"/v1/conversations/{cid}/messages", json={"content": "hi [[tokens=1]]"}
            )
            assert status == 429 and body["error"]["code"] == "too_many_streams", body
            await api.send_json(cid, "as json [[tokens=1]]")
        finally:
            first.close()
        try:
            await until_a_stream_is_free(api, cid)  # once the edge sees the viewer gone
        finally:
            second.close()


async def test_streams_closed_while_idle_free_their_slots_before_their_next_ping(
    stack: Servers, services: Services, user: str
) -> None:
    # pings every minute: only the hub's check of its quiet viewers can see them go
    async with extra_edge(
        stack,
        limits=limits(max_streams_per_user=4),
        ping_interval_s=60,
        stall_check_s=0.2,
        hub_linger_s=60,
    ) as base:
        # a browser closing its tabs: every connection of a client shut down at once
        async with aiohttp.ClientSession() as leaving:
            api = SseClient(leaving, base, token_for(user))
            cid = (await api.create_conversation())["id"]
            streams = [await api.events(cid).__aenter__() for _ in range(4)]
            assert [s.status for s in streams] == [200] * 4
        async with aiohttp.ClientSession() as http:
            await until_a_stream_is_free(SseClient(http, base, token_for(user)), cid)


async def test_a_closed_stream_of_a_queued_turn_frees_its_slot_while_other_turns_stream(
    stack: Servers, services: Services, user: str
) -> None:
    """The hub looked for viewers gone quietly only once its conversation fell silent:
    the stream of a message queued behind a long answer, written nothing while that
    answer streamed, held its slot until its next ping after its client had left."""
    async with (
        extra_edge(
            stack,
            limits=limits(max_streams_per_user=1),
            ping_interval_s=60,
            stall_check_s=0.2,
            hub_linger_s=60,
        ) as base,
        aiohttp.ClientSession() as http,
    ):
        api = SseClient(http, base, token_for(user))
        cid = (await api.create_conversation())["id"]
        await api.send_json(cid, "a long answer [[tokens=40000]]")
        try:
            async with aiohttp.ClientSession() as leaving:
                queued = SseClient(leaving, base, token_for(user))
                response = await leaving.post(
                    queued.url(f"/v1/conversations/{cid}/messages"),
                    json={"content": "after it", "on_busy": "enqueue"},
                    headers=queued.headers(),
                )
                assert response.status == 200, await response.text()
            # its client has gone; the answer before it streams on
            await until_a_stream_is_free(api, cid)
        finally:
            await api.request("POST", f"/v1/conversations/{cid}/cancel")


async def until_a_stream_is_free(api: SseClient, cid: str, within_s: float = 10) -> None:
    """Open the conversation's stream until the user's streams cap lets it."""
    async with asyncio.timeout(within_s):
        while True:
            async with api.events(cid) as again:
                if again.status == 200:
                    return
                assert again.status == 429
            await asyncio.sleep(0.05)


async def wait_for_done(event_log: EventLog, cid: str, within_s: float = 30) -> None:
    async with asyncio.timeout(within_s):
        while True:  # the log, read again until the turn's end is in it
            if any(isinstance(s.event, Done) for s in await event_log.read(cid)):
                return
            await asyncio.sleep(0.05)


async def test_a_user_may_have_only_so_many_messages_waiting_for_an_answer(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    async with extra_edge(stack, limits=limits(max_turns_per_user=1)) as base:
        api = SseClient(http, base, token_for(user))
        cid = (await api.create_conversation())["id"]
        other = (await api.create_conversation())["id"]
        await api.send_json(cid, "a long one [[tokens=2000]]")  # 5 s: past the wait at the cap
        status, body = await api.request(
            "POST",
            f"/v1/conversations/{other}/messages",
            json={"content": "and another"},
            headers={"Accept": "application/json"},
        )
        assert status == 429 and body["error"]["code"] == "too_many_turns", body
        await wait_for_done(event_log, cid)
        async with asyncio.timeout(20):  # the turn ended; its slot is freed by the edge
            while True:
                status, body = await api.request(
                    "POST",
                    f"/v1/conversations/{other}/messages",
                    json={"content": "now? [[tokens=2]]"},
                    headers={"Accept": "application/json"},
                )
                if status == 202:
                    break
                assert status == 429, body
                await asyncio.sleep(0.05)


async def test_a_message_sent_again_through_another_edge_counts_once_and_passes_the_cap(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """A retry (its idempotency key) through a second edge held a second slot until the
    turn ended, and at the cap any retry was refused, though it is the same message."""
    capped = limits(max_turns_per_user=2)
    async with extra_edge(stack, limits=capped) as one, extra_edge(stack, limits=capped) as two:
        first, second = SseClient(http, one, token_for(user)), SseClient(http, two, token_for(user))
        a, b, c = [(await first.create_conversation())["id"] for _ in range(3)]
        sent = await first.send_json(a, "a long one [[tokens=4000]]", idempotency_key="k1")
        again = await second.send_json(a, "a long one [[tokens=4000]]", idempotency_key="k1")
        assert again["message_id"] == sent["message_id"], (sent, again)
        # one slot taken so far, not two: another message fits under the cap of 2
        await first.send_json(b, "another long one [[tokens=4000]]")
        # at the cap now: the same message again is still the same message
        for api in (first, second):
            repeated = await api.send_json(a, "a long one [[tokens=4000]]", idempotency_key="k1")
            assert repeated["message_id"] == sent["message_id"], repeated
        status, body = await first.request(
            "POST",
            f"/v1/conversations/{c}/messages",
            json={"content": "a third"},
            headers={"Accept": "application/json"},
        )
        assert status == 429 and body["error"]["code"] == "too_many_turns", body
        for cid in (a, b):
            await first.request("POST", f"/v1/conversations/{cid}/cancel")


async def test_a_retry_while_its_message_waits_at_the_cap_neither_passes_it_nor_loses_its_key(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    """A new message at the turns cap waits up to a second for a slot. Its idempotency
    key was taken meanwhile, so a retry with it (a client whose connection dropped) was
    taken for a repeat of a message whose turn counted already: it started a turn over
    the cap. Then the first one's 429 freed the key of that running turn, and a retry
    after it was refused as a new message, though its turn ran."""
    redis = aioredis.Redis.from_url(stack.redis_url)
    async with extra_edge(stack, limits=limits(max_turns_per_user=1)) as base:
        api = SseClient(http, base, token_for(user))
        cid, other = [(await api.create_conversation())["id"] for _ in range(2)]
        await api.send_json(cid, "a long one [[tokens=4000]]")  # holds the one slot
        asked = {"content": "the next one", "idempotency_key": "k-next"}

        async def post() -> tuple[int, Any]:
            return await api.request(
                "POST",
                f"/v1/conversations/{other}/messages",
                json=asked,
                headers={"Accept": "application/json"},
            )

        first = asyncio.create_task(post())
        key = idem_key(user, other, "k-next")
        async with asyncio.timeout(10):  # the first one waits for a slot, its key taken or not
            while not first.done() and not await redis.exists(key):  # noqa: ASYNC110 (Redis)
                await asyncio.sleep(0.01)
        retry = await post()
        status, body = await first
        assert status == 429 and body["error"]["code"] == "too_many_turns", body
        assert retry[0] == 429 and retry[1]["error"]["code"] == "too_many_turns", retry
        started = [s for s in await event_log.read(other) if isinstance(s.event, Started)]
        assert started == [], "a turn ran over the cap"
        await api.request("POST", f"/v1/conversations/{cid}/cancel")
    await redis.aclose()


async def _post_as_json(api: SseClient, cid: str, content: str) -> tuple[int, Any]:
    return await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": content},
        headers={"Accept": "application/json"},
    )


def _ended(log: list[Any]) -> bool:
    return any(isinstance(s.event, TurnEnd) for s in log)


async def test_a_message_sent_as_its_previous_turn_ends_through_another_edge_is_let_in(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    """The edge that frees a turn's slot sends the turn's `done` first: a client that
    sent its next message at once through another edge could get there before the
    slot was freed, and was refused below its cap (1 in 13 at a cap of 1). A message
    at the cap waits a moment for a slot being freed; a turn that goes on still
    refuses it (`test_a_user_may_have_only_so_many_messages_waiting_for_an_answer`)."""
    capped = limits(max_turns_per_user=1)
    async with extra_edge(stack, limits=capped) as one, extra_edge(stack, limits=capped) as two:
        first, second = SseClient(http, one, token_for(user)), SseClient(http, two, token_for(user))
        cid, other = [(await first.create_conversation())["id"] for _ in range(2)]
        await first.send_json(cid, "short [[tokens=40]]")
        assert not _ended(await event_log.read(cid)), "the turn ended too soon to tell"
        status, body = await _post_as_json(second, other, "the next one [[tokens=2]]")
        assert status == 202, body
        assert _ended(await event_log.read(cid))


async def test_a_turn_that_runs_on_after_its_edge_stopped_still_holds_its_slot(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    """A stopping edge freed its users' turn slots while their turns ran on in the
    workers: through another edge, a user at the cap started as many turns again.
    A turn that outlives the stop's grace keeps its slot (it lapses, as a dead edge's)."""
    capped = limits(max_turns_per_user=1)
    async with extra_edge(stack, limits=capped) as staying:
        api = SseClient(http, staying, token_for(user))
        cid, other = [(await api.create_conversation())["id"] for _ in range(2)]
        async with extra_edge(stack, limits=capped, stop_grace_s=0.2) as leaving:
            await SseClient(http, leaving, token_for(user)).send_json(cid, "long [[tokens=4000]]")
        # that edge has stopped; the turn goes on
        status, body = await _post_as_json(api, other, "and another")
        assert not _ended(await event_log.read(cid)), "the turn ended too soon to tell"
        assert status == 429 and body["error"]["code"] == "too_many_turns", body
        await api.request("POST", f"/v1/conversations/{cid}/cancel")


async def test_a_stopping_edge_frees_the_slot_of_a_turn_that_ends_within_its_grace(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    """A stop waits for the turns its users' slots are held for, as for turn streams:
    one that ends within the grace frees its slot at its end, not a lease later."""
    capped = limits(max_turns_per_user=1)
    async with extra_edge(stack, limits=capped) as staying:
        api = SseClient(http, staying, token_for(user))
        cid, other = [(await api.create_conversation())["id"] for _ in range(2)]
        async with extra_edge(stack, limits=capped, stop_grace_s=30) as leaving:
            await SseClient(http, leaving, token_for(user)).send_json(cid, "short [[tokens=800]]")
            status, body = await _post_as_json(api, other, "too soon")
            assert status == 429 and body["error"]["code"] == "too_many_turns", body
        # the stop waited for the turn's end, and its slot is free at once
        assert _ended(await event_log.read(cid))
        status, body = await _post_as_json(api, other, "now [[tokens=2]]")
        assert status == 202, body


async def test_leases_that_redis_lost_are_held_again_at_their_next_renewal(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """A renewal only renewed the leases Redis still had (ZADD XX): after a flush, a
    restart without its data or an outage longer than a lease, every stream and turn
    under way counted for nothing until it ended, and the user could open as many
    again. The edge holds them still, and its next renewal says so again."""
    key = f"parley:lease:streams:{user}"
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        async with extra_edge(stack, limits=limits(max_streams_per_user=1, lease_s=1.5)) as base:
            api = SseClient(http, base, token_for(user))
            cid = (await api.create_conversation())["id"]
            async with api.events(cid) as held:
                assert held.status == 200
                assert await redis.delete(key) == 1  # Redis lost it
                async with asyncio.timeout(10):  # a renewal every 0.5 s
                    while True:
                        if await redis.zcard(key):
                            break
                        await asyncio.sleep(0.05)
                async with api.events(cid) as another:
                    assert another.status == 429, "the held stream counts again"
    finally:
        await redis.aclose()


async def _raw_request(port: int, request: bytes, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # a reader with a tiny window: the server's writes back up at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(sock, request)
    return sock


async def _read_all(sock: socket.socket, until: bytes | None = None) -> bytes:
    """What the server sends until it closes (or until `until` has arrived)."""
    loop = asyncio.get_running_loop()
    out = b""
    try:
        while (until is None or until not in out) and (chunk := await loop.sock_recv(sock, 65536)):
            out += chunk
    except ConnectionResetError:
        pass
    return out


async def _read_until_quiet(sock: socket.socket, quiet_s: float = 1.0) -> bytes:
    """What the server still sends, until it closes or has sent nothing for `quiet_s`."""
    loop = asyncio.get_running_loop()
    out = b""
    try:
        while True:
            async with asyncio.timeout(quiet_s):
                chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                return out
            out += chunk
    except (TimeoutError, ConnectionResetError):
        return out


async def test_a_viewer_that_stops_reading_is_cut_off_and_the_turn_goes_on(
    stack: Servers, services: Services, http: aiohttp.ClientSession, user: str, event_log: EventLog
) -> None:
    config = limits(
        write_timeout_s=0.5,
        max_buffer_bytes=64 * 1024,
        socket_send_buffer_bytes=16 * 1024,
        max_streams_per_user=1,
    )
    async with extra_edge(stack, limits=config) as base:
        token = token_for(user)
        api = SseClient(http, base, token)
        cid = (await api.create_conversation())["id"]
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"content": "a big one [[bulk=2000000]]"}).encode()
        sock = await _raw_request(
            port,
            f"POST /v1/conversations/{cid}/messages HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body,
            rcvbuf=4096,
        )
        try:
            head = await _read_all(sock, until=b"\r\n\r\n")  # the stream is open...
            assert head.startswith(b"HTTP/1.1 200"), head
            # ...and from here the client reads nothing. Its stream holds the user's only slot
            # until the edge cuts it, so a second stream opens once it has.
            await until_a_stream_is_free(api, cid, within_s=20)
            received = await _read_until_quiet(sock)
        finally:
            sock.close()
        assert b'"event":"done"' not in received, "the stuck viewer was cut before the end"
        await wait_for_done(event_log, cid)  # the turn does not depend on its viewer


async def test_a_body_that_trickles_in_times_out_with_408(
    stack: Servers, services: Services, user: str
) -> None:
    async with extra_edge(stack, limits=limits(body_timeout_s=0.3)) as base:
        port = int(base.rsplit(":", 1)[1])
        sock = await _raw_request(
            port,
            b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token_for(user)}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        try:
            async with asyncio.timeout(10):
                # answered at once; aiohttp then lingers a while for the rest of the body
                answer = await _read_all(sock, until=b"}}")
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code": "body_timeout"' in answer, answer


async def test_the_log_is_streamed_in_order_as_json_lines(
    api: SseClient, http: aiohttp.ClientSession, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "count [[tokens=300]]")
    expected = [s.seq for s in await event_log.read(cid)]
    async with http.get(api.url(f"/v1/conversations/{cid}/log"), headers=api.headers()) as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked", "streamed, not built whole"
        lines = [json.loads(line) async for line in response.content]
    assert [line["seq"] for line in lines] == expected
    async with http.get(
        api.url(f"/v1/conversations/{cid}/log"),
        headers=api.headers(),
        params={"after": str(expected[-3])},
    ) as response:
        tail = [json.loads(line) async for line in response.content]
    assert [line["seq"] for line in tail] == expected[-2:]


async def test_a_connection_that_sends_no_whole_request_is_closed_when_idle(stack: Servers) -> None:
    """A socket that never sends a request, or trickles its headers and never ends them,
    is closed after PARLEY_IDLE_TIMEOUT_S: such sockets cannot pile up until the edge
    has no file descriptors left (aiohttp's own timer was an hour)."""
    async with extra_edge(stack, limits=limits(idle_timeout_s=1.0)) as base:
        host, port = base.removeprefix("http://").split(":")
        silent_reader, silent = await asyncio.open_connection(host, int(port))
        trickle_reader, trickle = await asyncio.open_connection(host, int(port))
        trickle.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

        async def keep_trickling() -> None:
            for n in range(100):  # a header line every 0.2 s, never the blank line
                await asyncio.sleep(0.2)
                trickle.write(b"X-Slow-%d: 1\r\n" % n)

        trickling = asyncio.create_task(keep_trickling())
        try:
            async with asyncio.timeout(10):
                assert await silent_reader.read() == b""  # closed by the edge
                assert await trickle_reader.read() == b""
        finally:
            trickling.cancel()
            silent.close()
            trickle.close()
        # a connection that does send its request is served as ever
        async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as response:
            assert response.status == 200


async def test_probes_that_come_together_share_one_check_and_its_answer_for_a_while() -> None:
    """/readyz is public: ten thousand anonymous probes must not cost the servers it
    checks ten thousand checks (a flood once made the edge look unready)."""
    shared = SharedCheck(fresh_s=0.3)
    checks = 0

    async def check() -> tuple[bytes, int]:
        nonlocal checks
        checks += 1
        await asyncio.sleep(0.05)
        return b"{}", 200

    answers = await asyncio.gather(*(shared.answer(check) for _ in range(1000)))
    assert checks == 1 and set(answers) == {(b"{}", 200)}
    assert await shared.answer(check) == (b"{}", 200) and checks == 1  # still fresh
    await asyncio.sleep(0.35)
    await shared.answer(check)
    assert checks == 2  # stale: checked again
