"""Every answer names its request (`X-Request-Id`); tests/test_dead_servers.py checks that
the edge's log lines name it too."""

from __future__ import annotations

import aiohttp
import pytest

from api.request_ids import HEADER
from tests.sse import SseClient


async def test_every_answer_names_its_request_errors_and_streams_too(
    api: SseClient, http: aiohttp.ClientSession
) -> None:
    cid = (await api.create_conversation())["id"]
    seen: list[str] = []
    for method, path, headers, status in [
        ("GET", f"/v1/conversations/{cid}", api.headers(), 200),
        ("GET", "/v1/conversations/nope", api.headers(), 404),
        ("GET", f"/v1/conversations/{cid}", {}, 401),
        ("GET", "/no/such/route", {}, 404),
        ("GET", "/healthz", {}, 200),
    ]:
        async with http.request(method, api.url(path), headers=headers) as response:
            assert response.status == status, (path, response.status)
            seen.append(response.headers[HEADER])
    async with http.get(
        api.url(f"/v1/conversations/{cid}/events"), headers=api.headers(), params={"after": "0"}
    ) as stream:
        assert stream.content_type == "text/event-stream"
        seen.append(stream.headers[HEADER])
    assert len(set(seen)) == len(seen) and all(seen), seen


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("lb-7f3a9c.0:1", True),  # what a proxy gives: kept, so both logs name one id
        ("9b2f6e0e-1c4d-4e8a-a0a5-3d6f0e8c2b71", True),
        ("x" * 128, True),
        ("x" * 129, False),  # longer than any proxy's: a log line is no place for a payload
        ("has space", False),
        ("", False),
    ],
)
async def test_a_proxys_request_id_is_kept_when_it_is_an_id(
    api: SseClient, http: aiohttp.ClientSession, sent: str, kept: bool
) -> None:
    async with http.get(api.url("/healthz"), headers={HEADER: sent}) as response:
        answered = response.headers[HEADER]
    assert (answered == sent) is kept, answered
    assert answered
