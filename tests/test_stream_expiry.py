"""A stream lasts as long as the token that opened it: when the edge would refuse the
token, the stream ends with a word and a clean end, and what it missed is there for a
fresh token from its last id. Before, a stream outlived its token for as long as the
connection held (an idle viewer's, with pings, for ever), so a user whose access had
ended kept reading the conversation."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from api.auth import mint
from events.ids import new_id
from events.log import EventLog
from events.vocabulary import Done
from parley.services import Services
from tests.conftest import SECRET, token_for
from tests.sse import SseClient, SseComment, SseEvent, read_sse

EXPIRED = "your token expired; reconnect with a fresh one and Last-Event-ID to go on"
# The edge accepts a token up to 30 s past its `exp` (clocks differ): this one is
# refused two seconds from now.
NEARLY_EXPIRED_TTL_S = -28


def nearly_expired(user: str) -> str:
    return mint(SECRET, user, ttl_s=NEARLY_EXPIRED_TTL_S)


async def test_a_viewer_waiting_for_turns_is_ended_when_its_token_expires(
    services: Services, http: aiohttp.ClientSession, user: str, api: SseClient
) -> None:
    cid = (await api.create_conversation())["id"]
    short = SseClient(http, services.edge_url, nearly_expired(user))
    async with short.events(cid) as viewer:
        assert viewer.status == 200
        said = [item async for item in read_sse(viewer)]  # raises if the end is unclean
    assert said[-1] == SseComment(EXPIRED), said
    # the token is refused from now on, as the stream said
    status, _ = await short.request("GET", f"/v1/conversations/{cid}")
    assert status == 401


async def test_a_turns_stream_cut_by_its_token_resumes_whole_with_a_fresh_one(
    services: Services, http: aiohttp.ClientSession, user: str, api: SseClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    short = SseClient(http, services.edge_url, nearly_expired(user))
    async with short.http.post(
        short.url(f"/v1/conversations/{cid}/messages"),
        json={"content": "go [[tokens=100]] [[rate=20]]"},
        headers=short.headers(Accept="text/event-stream"),
    ) as turn:
        seen = [item async for item in read_sse(turn)]
    assert seen[-1] == SseComment(EXPIRED), seen[-3:]
    events = [e for e in seen if isinstance(e, SseEvent)]
    assert events and all(e.event != "done" for e in events)
    async with api.events(cid, last_event_id=events[-1].id) as rest:
        later = [e async for e in read_sse(rest) if isinstance(e, SseEvent)]
    assert later[-1].event == "done" and later[-1].data == "ok"
    text = "".join(e.data for e in events + later if e.event == "token")
    done = next(e for e in (s.event for s in await event_log.read(cid)) if isinstance(e, Done))
    assert text == "".join(b.content for b in done.content if b.role == "assistant")


async def test_a_use_chat_stream_cut_by_its_token_says_so_and_how_to_resume(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    chat = new_id()
    short = SseClient(http, services.edge_url, nearly_expired(user))
    text = {"type": "text", "text": "go [[tokens=100]] [[rate=20]]"}
    message = {"id": "m1", "role": "user", "parts": [text]}
    status, body = await short.request(
        "POST", "/v1/ai-sdk/chat", json={"id": chat, "messages": [message]}
    )
    assert status == 200
    assert '"type":"error"' in body and "your token expired" in body, body[-300:]
    assert f"resume it with a fresh token (GET /v1/ai-sdk/chat/{chat}/stream)" in body
    assert "[DONE]" not in body
    # the answer went on (for 5 s, cut after 2): a fresh token resumes it to its end
    fresh = SseClient(http, services.edge_url, token_for(user))
    status, rest = await fresh.request("GET", f"/v1/ai-sdk/chat/{chat}/stream")
    assert status == 200 and rest.rstrip().endswith("data: [DONE]"), rest[-300:]


async def test_a_long_catch_up_read_slowly_ends_when_its_token_expires(
    services: Services, http: aiohttp.ClientSession, user: str, api: SseClient
) -> None:
    """The token was looked at only once the stream had caught up: a client reading a
    long log slowly read all of it, and what came live meanwhile, long after its token
    was refused (measured: 1.1 MB over 42 s, with a token refused after 2 s)."""
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "a big one [[bulk=2000000]]")
    token = nearly_expired(user)
    short = SseClient(http, services.edge_url, token)
    port = int(services.edge_url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock,
            f"GET /v1/conversations/{cid}/events?after=0 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode(),
        )
        received = await loop.sock_recv(sock, 64)
        assert received.startswith(b"HTTP/1.1 200"), received
        # the client reads nothing more until its token is refused...
        for _ in range(200):
            if (await short.request("GET", f"/v1/conversations/{cid}"))[0] == 401:
                break
            await asyncio.sleep(0.1)
        # ...then reads on to the body's end (the connection stays open for another
        # request): what the edge was writing, and no more
        async with asyncio.timeout(20):
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, received[-300:]
                received += chunk
    finally:
        sock.close()
    assert received.endswith(f": {EXPIRED}\n\n\r\n0\r\n\r\n".encode()), received[-300:]
    assert b'"event":"done"' not in received
    assert len(received) < 1_000_000, len(received)
