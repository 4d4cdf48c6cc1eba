"""Whatever a client sends, the edge answers with a clear error or does the work, and stays up.

Explicit cases for what once broke it (NUL, invalid UTF-8, deep nesting, a
burst of SSE connections), then a property-based test that throws generated
bodies, headers, ids and positions at every route of the live server.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from api.context import prefers_json
from events.ids import new_id
from parley.services import Services
from tests.conftest import token_for
from tests.sse import SseClient


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def only_created(api: SseClient, cid: str) -> None:
    status, body = await api.request("GET", f"/v1/conversations/{cid}/log")
    assert status == 200
    lines = (
        [json.loads(line) for line in str(body).splitlines() if line.strip()]
        if isinstance(body, str)
        else [body]
    )
    assert [line["type"] for line in lines] == ["conversation_created"], lines


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"content": "hi \\u0000 there"}', "invalid_text"),
        (b'{"content": "hi", "idempotency_key": "k\\u0000"}', "invalid_text"),
        (b'{"content": "ok", "extra": {"deep": "\\u0000"}}', "invalid_text"),
        (b'{"content": "caf\xe9"}', "invalid_encoding"),
        (b'{"content": "x", "ignored": ' + b"[" * 1000 + b"]" * 1000 + b"}", "too_deep"),
        (b'{"content": "lone \\ud800 surrogate"}', "invalid_text"),
        (b'{"content": "lone \\udc00 low half"}', "invalid_text"),
        (b'{"content": "a pair \\ud83d\\ude00 is fine", "x": nope}', "invalid_json"),
    ],
    ids=[
        "nul",
        "nul-in-key",
        "nul-in-ignored-field",
        "latin1",
        "deep",
        "lone-surrogate",
        "lone-low-surrogate",
        "a-pair-and-bad-json",
    ],
)
async def test_a_message_the_read_models_cannot_hold_is_refused_and_nothing_appended(
    api: SseClient, raw: bytes, code: str
) -> None:
    cid = (await api.create_conversation())["id"]
    status, body = await api.request(
        "POST",
        f"/v1/conversations/{cid}/messages",
        data=raw,
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, body, 400, code)
    await only_created(api, cid)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"title": "a\\u0000b"}', "invalid_text"),
        (b'{"title": "\xff"}', "invalid_encoding"),
        (b"[" * 5000 + b"]" * 5000, "too_deep"),
    ],
)
async def test_a_conversation_the_read_models_cannot_hold_is_refused(
    api: SseClient, raw: bytes, code: str
) -> None:
    status, body = await api.request("POST", "/v1/conversations", data=raw)
    assert_error(status, body, 400, code)
    status, listed = await api.request("GET", "/v1/conversations")
    assert status == 200 and listed["conversations"] == [], listed


async def test_two_hundred_sse_connections_opened_at_once_are_all_served(
    api: SseClient, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]

    async def open_one() -> int:
        async with api.events(cid) as response:
            await response.content.readline()  # "retry: 1000": the stream is open
            status: int = response.status
            return status

    async with asyncio.timeout(60):
        statuses = await asyncio.gather(*(open_one() for _ in range(200)))
    assert statuses == [200] * 200, sorted(set(statuses))


# ---------------------------------------------------------------- generated input

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
known_keys = st.sampled_from(
    ["content", "title", "model", "project_id", "idempotency_key", "on_busy", "micro_credits"]
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(known_keys, json_values, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(known_keys, st.text(), max_size=4).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.integers(min_value=1, max_value=3000).map(
        lambda n: b'{"content": "x", "y": ' + b"[" * n + b"]" * n + b"}"
    ),
)
positions = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=2**70).map(str),
    st.text(max_size=12),
    st.sampled_from(["0", "1", "3-0", "3-1", "99999999", "1-", "-1", "٣", "1e3"]),
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
ROUTES = [
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations"),
    ("GET", "/v1/conversations/{id}"),
    ("POST", "/v1/conversations/{id}/messages"),
    ("GET", "/v1/conversations/{id}/messages"),
    ("GET", "/v1/conversations/{id}/events"),
    ("GET", "/v1/conversations/{id}/log"),
    ("POST", "/v1/conversations/{id}/cancel"),
    ("PATCH", "/v1/conversations/{id}/messages/{id}"),
    ("POST", "/v1/conversations/{id}/messages/{id}/regenerate"),
    ("GET", "/v1/billing/accounts/user/{id}"),
    ("GET", "/v1/billing/ledger"),
    ("POST", "/v1/billing/accounts/user/{id}/credits"),
    ("GET", "/v1/models"),
    ("POST", "/v1/projects"),
    ("GET", "/v1/projects"),
    ("POST", "/v1/projects/{id}/members"),
    ("POST", "/v1/ai-sdk/chat"),
    ("GET", "/v1/ai-sdk/chat/{id}/stream"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
    ("DELETE", "/v1/conversations/{id}"),
]


OTHER_USER = f"fuzz-other-{new_id()}"


class Fuzz:
    """What the generated requests aim at: a conversation of the fuzzing user's own."""

    conversation_id = ""


@pytest.fixture
async def fuzz_target(api: SseClient) -> Fuzz:
    target = Fuzz()
    target.conversation_id = (await api.create_conversation())["id"]
    return target


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(ROUTES),
    which_id=st.one_of(
        st.just("own"),
        st.just("other"),
        st.text(max_size=40),
        # percent-encoded bytes that are not UTF-8 (or are NUL) once decoded
        st.binary(min_size=1, max_size=8).map(lambda b: "".join(f"%{x:02X}" for x in b)),
    ),
    body=bodies,
    position=positions,
    last_event_id=st.one_of(st.none(), header_text),
    accept=st.sampled_from([None, "application/json", "text/event-stream", "*/*", "text/html"]),
    auth=st.sampled_from(["user", "admin", "none", "garbage", "other"]),
    query=st.dictionaries(
        st.sampled_from(["after", "versions", "project", "user", "conversation"]),
        st.text(max_size=10),
        max_size=3,
    ),
)
async def test_no_generated_request_gets_a_5xx_or_breaks_the_server(
    services: Services,
    http: aiohttp.ClientSession,
    api: SseClient,
    fuzz_target: Fuzz,
    route: tuple[str, str],
    which_id: str,
    body: bytes,
    position: str | None,
    last_event_id: str | None,
    accept: str | None,
    auth: str,
    query: dict[str, str],
) -> None:
    method, template = route
    ident = {
        "own": fuzz_target.conversation_id,
        "other": "01JH8Q3ZK4M7T2V9X5B6N1R0SD",
    }.get(which_id, which_id)
    path = template.replace("{id}", quote(ident, safe="%") or "x")
    headers: dict[str, str] = {}
    if auth == "user":
        headers["Authorization"] = f"Bearer {api.token}"
    elif auth == "admin":
        headers["Authorization"] = f"Bearer {token_for('admin', admin=True)}"
    elif auth == "other":
        headers["Authorization"] = f"Bearer {token_for(OTHER_USER)}"
    elif auth == "garbage":
        headers["Authorization"] = "Bearer not.a.token"
    if accept is not None:
        headers["Accept"] = accept
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    params = dict(query)
    if position is not None:
        params["after"] = position
    url = URL(services.edge_url + path, encoded=True).update_query(params)
    async with (
        asyncio.timeout(30),
        http.request(
            method, url, data=body if method in ("POST", "PATCH") else None, headers=headers
        ) as response,
    ):
        status = response.status
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            text = ""  # a stream that opened is a success; leave it (the turn goes on)
        else:
            text = await response.text(errors="replace")
    assert status < 500, (method, path, params, body[:200], status, text[:500])
    if status >= 400 and text:
        error = json.loads(text)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str), text


async def test_after_generated_input_the_server_is_healthy_and_a_turn_works(
    services: Services, http: aiohttp.ClientSession, api: SseClient
) -> None:
    # runs after the property test in file order; on its own it is a plain smoke test
    for path in ("/healthz", "/readyz"):
        async with http.get(services.edge_url + path) as response:
            assert response.status == 200, (path, await response.text())
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "still working? [[tokens=5]]")
    assert events[-1].event == "done" and events[-1].data == "ok", events


@pytest.mark.parametrize("bad", ["abc\n", "abc%0A", "a.b", "a*", "", "x" * 129, "ab c"])
async def test_an_id_with_a_trailing_newline_or_any_other_stray_character_is_unknown(
    api: SseClient, bad: str
) -> None:
    status, body = await api.request("GET", f"/v1/conversations/{quote(bad, safe='%')}")
    assert status in (404, 405), (bad, status, body)


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        ("", False),
        ("*/*", False),
        ("text/event-stream", False),
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/json, text/event-stream", False),  # a tie: the stream, the default
        ("text/event-stream;q=0.5, application/json", True),
        ("application/json;q=0.2, text/event-stream;q=0.9", False),
        ("Application/JSON;q=0.9, text/event-stream;q=bad", True),
        ("application/json;q=0", False),
        # ranges: the most specific one that matches a type gives its weight
        ("application/*", True),
        ("text/event-stream;q=0.1, application/*", True),
        ("text/*", False),
        ("*/*;q=0.5, application/json", True),
        ("*/*, application/json;q=0.5", False),
        ("application/*, application/json;q=0", False),
        ("image/png", False),
    ],
)
def test_the_accept_header_chooses_a_json_answer_by_its_weights(accept: str, wanted: bool) -> None:
    assert prefers_json(accept) is wanted, accept


async def test_a_position_past_any_log_is_a_400_not_a_database_error(api: SseClient) -> None:
    cid = (await api.create_conversation())["id"]
    for path in (f"/v1/conversations/{cid}/log", "/v1/billing/ledger"):
        status, body = await api.request("GET", f"{path}?after={2**63}")
        assert_error(status, body, 400, "invalid_request")
