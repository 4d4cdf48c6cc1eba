"""Every bad request gets a clear JSON error and changes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from api.app import metrics_middleware
from api.context import METRICS, NoMetrics
from api.errors import begin_stream, error_middleware
from api.turn_routes import refusal_error
from events.vocabulary import CommandRejected
from parley.services import Services
from tests.conftest import token_for
from tests.sse import SseClient


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def test_malformed_json_is_a_400_with_a_json_error(api: SseClient) -> None:
    status, body = await api.request("POST", "/v1/conversations", data=b'{"title": ')
    assert_error(status, body, 400, "invalid_json")
    conversation = await api.create_conversation()
    status, body = await api.request(
        "POST", f"/v1/conversations/{conversation['id']}/messages", data=b"not json at all"
    )
    assert_error(status, body, 400, "invalid_json")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"content": 5}, "invalid_request"),
        ({}, "invalid_request"),
        ({"content": "   "}, "bad_request"),
        ({"content": "hi", "on_busy": "sometimes"}, "invalid_request"),
        ({"content": "hi", "model": "no-such-model"}, "unknown_model"),
    ],
)
async def test_invalid_message_bodies_are_refused_and_nothing_is_appended(
    api: SseClient, payload: dict[str, Any], code: str
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    status, body = await api.request("POST", f"/v1/conversations/{cid}/messages", json=payload)
    assert_error(status, body, 400, code)
    status, log = await api.request("GET", f"/v1/conversations/{cid}/log")
    assert status == 200
    assert [line["type"] for line in _lines(log)] == ["conversation_created"]


def _lines(body: Any) -> list[dict[str, Any]]:
    import json

    if isinstance(body, dict):
        return [body]
    return [json.loads(line) for line in str(body).splitlines() if line]


async def test_an_oversize_body_is_a_413(api: SseClient) -> None:
    conversation = await api.create_conversation()
    huge = b'{"content": "' + b"a" * (300 * 1024) + b'"}'
    status, body = await api.request(
        "POST", f"/v1/conversations/{conversation['id']}/messages", data=huge
    )
    assert_error(status, body, 413, "body_too_large")


async def test_a_body_declared_too_large_is_refused_before_it_is_sent(
    services: Services, api: SseClient
) -> None:
    conversation = await api.create_conversation()
    url = URL(services.edge_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"POST /v1/conversations/{conversation['id']}/messages HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {api.token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 300000\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):  # the body never comes: the answer must not wait for it
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            assert head.startswith("HTTP/1.1 413"), head
            length = next(
                int(line.split(":")[1])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            )
            assert b"body_too_large" in await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        b"X-Long: " + b"a" * 9000,  # over aiohttp's 8,190 bytes
        b"Two Words: v",  # a space in a header's name
        b"Content-Length: abc",
        b"X-Nul: a\x00b",
    ],
    ids=["long-header", "space-in-name", "content-length-abc", "nul"],
)
async def test_a_request_the_http_parser_refuses_is_a_json_400_and_one_quiet_log_line(
    services: Services, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    """aiohttp answered these itself: text/plain, its versions in `Server`, and a
    traceback at ERROR for each one, which anyone could send by the thousand."""
    caplog.set_level(logging.DEBUG)
    url = URL(services.edge_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /v1/conversations HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            raw = await reader.read()  # the edge closes the connection after it
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0].split(" ", 2)[1] == "400", raw[:500]
    assert headers["content-type"].startswith("application/json"), headers
    assert headers["server"] == "parley", headers
    assert_error(400, json.loads(body), 400, "bad_request")
    assert "not valid HTTP" in json.loads(body)["error"]["message"], body
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]


async def test_unknown_and_foreign_conversations_are_404_without_leaking_existence(
    api: SseClient, services: Services, http: aiohttp.ClientSession
) -> None:
    mine = await api.create_conversation()
    stranger = SseClient(http, services.edge_url, token_for("someone-else"))
    for client, cid in (
        (api, "01NOSUCHCONVERSATION00000"),
        (stranger, mine["id"]),
        (api, "bad.id*"),
    ):
        for method, path in (
            ("GET", f"/v1/conversations/{cid}"),
            ("GET", f"/v1/conversations/{cid}/messages"),
            ("GET", f"/v1/conversations/{cid}/log"),
            ("GET", f"/v1/conversations/{cid}/events"),
            ("POST", f"/v1/conversations/{cid}/messages"),
        ):
            kwargs: dict[str, Any] = {"json": {"content": "hi"}} if method == "POST" else {}
            status, body = await client.request(method, path, **kwargs)
            assert_error(status, body, 404, "not_found")
    status, listed = await stranger.request("GET", "/v1/conversations")
    assert status == 200 and listed["conversations"] == []


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nonsense", "Basic abc", "Bearer a.b.c"])
async def test_requests_without_a_valid_token_are_401(
    services: Services, http: aiohttp.ClientSession, header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with http.get(services.edge_url + "/v1/conversations", headers=headers) as response:
        assert_error(response.status, await response.json(), 401, "unauthorized")


@pytest.mark.parametrize(
    ("header", "challenge"),
    [
        (None, "Bearer"),
        ("Basic abc", "Bearer"),  # no bearer credentials: the scheme, no error code
        ("Bearer", "Bearer"),
        ("Bearer nonsense", 'Bearer error="invalid_token"'),
        ("Bearer a.b.c", 'Bearer error="invalid_token"'),
    ],
)
async def test_a_401_names_the_bearer_scheme_and_whether_a_token_was_refused(
    services: Services, http: aiohttp.ClientSession, header: str | None, challenge: str
) -> None:
    """RFC 9110 15.5.2: a 401 carries WWW-Authenticate; RFC 6750 section 3: `Bearer`,
    with `error="invalid_token"` when a token came and was refused."""
    headers = {"Authorization": header} if header is not None else {}
    async with http.get(services.edge_url + "/v1/conversations", headers=headers) as response:
        assert response.status == 401
        assert response.headers.getall("WWW-Authenticate", []) == [challenge], response.headers


async def test_a_token_signed_with_another_secret_is_401(
    services: Services, http: aiohttp.ClientSession
) -> None:
    from api.auth import mint

    forged = mint("not-the-server-secret-" + "y" * 30, "alice")
    async with http.get(
        services.edge_url + "/v1/conversations", headers={"Authorization": f"Bearer {forged}"}
    ) as response:
        assert_error(response.status, await response.json(), 401, "unauthorized")


@pytest.mark.parametrize("position", ["abc", "-1", "12-x", "99999999999"])
async def test_a_bad_resume_position_is_a_400(api: SseClient, position: str) -> None:
    conversation = await api.create_conversation()
    status, body = await api.request(
        "GET", f"/v1/conversations/{conversation['id']}/events", params={"after": position}
    )
    assert_error(status, body, 400, "bad_position")


_ID_RULE = "must be 1-128 characters of A-Z a-z 0-9 _ -"
_GRANT = "/v1/billing/accounts/user/someone/credits"


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("POST", "/v1/conversations", {"title": "t" * 201}, "title longer than 200 characters"),
        ("POST", "/v1/conversations", {"project_id": "no such!"}, f"project_id {_ID_RULE}"),
        ("POST", "/v1/projects", {"name": ""}, "name must be 1-200 characters"),
        ("POST", "/v1/projects", {"name": " \t "}, "name must be 1-200 characters"),
        ("POST", "/v1/projects", {"name": "n" * 201}, "name must be 1-200 characters"),
        ("POST", "{cid}/messages", {"content": ""}, "content is empty"),
        ("POST", "{cid}/messages", {"content": "\n "}, "content is empty"),
        (
            "POST",
            "{cid}/messages",
            {"content": "hi", "idempotency_key": "k" * 201},
            "idempotency_key must be 1-200 characters",
        ),
        ("POST", "{project}/members", {"user_id": "two words"}, f"user_id {_ID_RULE}"),
        ("POST", _GRANT, {"micro_credits": 0}, "micro_credits must be between 1 and 10**15"),
        (
            "POST",
            _GRANT,
            {"micro_credits": 10**15 + 1},
            "micro_credits must be between 1 and 10**15",
        ),
        (
            "POST",
            _GRANT,
            {"micro_credits": 1, "note": "n" * 501},
            "note longer than 500 characters",
        ),
        ("GET", "/v1/billing/ledger?project=a.b", None, f"project {_ID_RULE}"),
        ("GET", "/v1/billing/ledger?conversation=%2A", None, f"conversation {_ID_RULE}"),
        ("POST", "/v1/ai-sdk/chat", {"id": "a b", "messages": []}, f"id {_ID_RULE}"),
        (
            "POST",
            "/v1/ai-sdk/chat",
            {"id": "chat", "messages": [], "trigger": "resume"},
            "trigger must be submit-message or regenerate-message",
        ),
    ],
)
async def test_a_value_past_a_documented_limit_is_a_400_that_names_the_limit(
    services: Services,
    http: aiohttp.ClientSession,
    user: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    message: str,
) -> None:
    """The limits the document states (tests/test_openapi.py) are the ones enforced,
    each refused in its own words, not in msgspec's."""
    api = SseClient(http, services.edge_url, token_for(user, admin=True))
    if "{cid}" in path:
        path = path.format(cid=f"/v1/conversations/{(await api.create_conversation())['id']}")
    if "{project}" in path:
        status, project = await api.request("POST", "/v1/projects", json={"name": "p"})
        path = path.format(project=f"/v1/projects/{project['id']}")
    status, answer = await api.request(method, path, json=body)
    assert_error(status, answer, 400, "bad_request")
    assert answer["error"]["message"] == message.replace("10**15", str(10**15)), answer


async def test_null_for_an_optional_field_of_a_new_conversation_is_as_if_absent(
    api: SseClient,
) -> None:
    created = await api.create_conversation(title=None, project_id=None, model=None)
    assert created["title"] == "" and created["project_id"] is None, created


async def test_head_is_answered_wherever_get_is(api: SseClient) -> None:
    cid = (await api.create_conversation())["id"]
    for path in ("/healthz", "/", "/v1/conversations", f"/v1/conversations/{cid}/events"):
        async with api.http.head(api.url(path), headers=api.headers()) as response:
            assert response.status == 200, (path, response.status)
            assert await response.read() == b"", path


async def test_unknown_routes_and_methods_answer_in_the_error_format(api: SseClient) -> None:
    status, body = await api.request("GET", "/v1/nothing-here")
    assert_error(status, body, 404, "not_found")
    # with no token too: a path that does not exist is a 404, not a 401 (a browser's
    # /favicon.ico)
    async with api.http.get(api.url("/favicon.ico")) as response:
        assert_error(response.status, await response.json(), 404, "not_found")
    async with api.http.delete(api.url("/v1/conversations"), headers=api.headers()) as response:
        assert_error(response.status, await response.json(), 405, "method_not_allowed")
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}, (
            response.headers
        )


async def test_busy_conversation_with_on_busy_reject_is_a_409(api: SseClient) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    await api.send_json(cid, "keep busy [[tokens=400]]")
    import asyncio

    async with asyncio.timeout(10):
        while True:  # poll the edge, as a client would, until the turn has its id
            _, current = await api.request("GET", f"/v1/conversations/{cid}")
            if (current["active_turn"] or {}).get("turn_id"):
                break
            await asyncio.sleep(0.02)
    status, body = await api.request(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "me too", "on_busy": "reject"}
    )
    assert_error(status, body, 409, "busy")
    assert body["error"]["turn_id"] == current["active_turn"]["turn_id"], body
    # the default is reject too (DESIGN section 5)
    status, body = await api.request(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "and me"}
    )
    assert_error(status, body, 409, "busy")


async def test_health_and_readiness_answer_without_a_token(
    services: Services, http: aiohttp.ClientSession
) -> None:
    async with http.get(services.edge_url + "/healthz") as response:
        assert response.status == 200
    async with http.get(services.edge_url + "/readyz") as response:
        body = await response.json()
        assert response.status == 200, body
        assert body["checks"] == {"nats": "ok", "postgres": "ok", "redis": "ok"}
    async with http.get(services.edge_url + "/") as response:
        assert response.status == 200 and response.content_type == "text/html"


class _Requests(NoMetrics):
    """The edge's metrics, keeping the statuses of the requests counted."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.statuses.append(status)


async def test_a_viewer_gone_before_its_stream_began_is_counted_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The soak at 250 users: viewers that left while their stream's headers were
    # being written were logged by aiohttp as errors, traceback and all. Here the
    # stream begins once the client has really closed its connection.
    began = asyncio.Event()

    async def late_stream(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        async with asyncio.timeout(10):
            while transport is not None and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        began.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await begin_stream(request, response)  # as every stream of the edge begins
        await response.write(b"retry: 1000\n\n")
        return response

    counted = _Requests()
    app = web.Application(middlewares=[metrics_middleware, error_middleware])
    app[METRICS] = counted
    app.router.add_get("/stream", late_stream)
    async with TestServer(app) as server:
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):
            await began.wait()
            while not counted.statuses:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert counted.statuses == [499]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_the_conversation_list_comes_a_page_at_a_time_and_refuses_a_bad_cursor(
    api: SseClient,
) -> None:
    made = [(await api.create_conversation(title=f"c{i}"))["id"] for i in range(5)]
    async with asyncio.timeout(10):
        while True:  # until the read models hold all five
            status, whole = await api.request("GET", "/v1/conversations")
            assert status == 200 and whole["next"] is None, whole
            everything = [c["id"] for c in whole["conversations"]]
            if set(made) <= set(everything):
                break
            await asyncio.sleep(0.02)
    assert everything[0] == made[-1], everything

    paged: list[str] = []
    cursor = None
    for _ in range(10):
        params = "limit=2" + (f"&before={cursor}" if cursor else "")
        status, page = await api.request("GET", f"/v1/conversations?{params}")
        assert status == 200 and len(page["conversations"]) <= 2, page
        paged += [c["id"] for c in page["conversations"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert paged == everything  # every conversation once, in the same order
    # a last page that is exactly full says it is the last
    status, exact = await api.request("GET", f"/v1/conversations?limit={len(everything)}")
    assert status == 200 and len(exact["conversations"]) == len(everything), exact
    assert exact["next"] is None, exact

    def encoded(key: bytes) -> str:  # a cursor's form around what no cursor holds
        return base64.urlsafe_b64encode(key).decode().rstrip("=")

    odd = [
        encoded(b"2026-01-01T00:00:00+00:00|a\x00b"),
        encoded(b"2026-01-01T00:00:00|x"),  # no time zone
        encoded(b"9999-12-31T23:00:00-14:00|x"),  # past the calendar once in UTC
    ]
    for bad in ("limit=0", "limit=101", "not-a-cursor", "x" * 40, *odd):
        query = bad if bad.startswith("limit=") else f"before={bad}"
        status, body = await api.request("GET", f"/v1/conversations?{query}")
        assert status == 400, (query, status, body)
        assert body["error"]["code"] in ("bad_cursor", "invalid_request"), body


async def test_a_client_gone_in_the_middle_of_its_body_is_answered_not_logged_as_an_error(
    services: Services, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async def answered() -> float:
        async with http.get(services.edge_url + "/metrics") as response:
            text = await response.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("parley_http_requests_total{")
            and 'route="/v1/conversations"' in line
            and 'method="POST"' in line
        )

    before = await answered()
    url = URL(services.edge_url)
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {token_for('leaver')}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"title": "'
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    async with asyncio.timeout(10):
        while await answered() == before:  # noqa: ASYNC110 (the edge's count)
            await asyncio.sleep(0.02)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.mark.parametrize(("running", "key"), [("turn-7", "turn-7"), (None, None)])
def test_a_busy_refusal_always_names_the_running_turn_or_null(
    running: str | None, key: str | None
) -> None:
    """Between two queued turns no turn runs yet: the 409 had no `turn_id` key at all,
    though the README gives every busy answer one."""
    refused = CommandRejected(
        conversation_id="c",
        at=1,
        event_id="e",
        command_id="cmd",
        code="busy",
        message="earlier messages are waiting",
        turn_id=running,
    )
    error = refusal_error(refused)
    assert (error.status, error.code, error.extra) == (409, "busy", {"turn_id": key})
