"""Large JSON answers go compressed to a client that accepts it; small ones and streams
as they are (api.app.compression_middleware)."""

from __future__ import annotations

import gzip
import json

import aiohttp

from api.app import COMPRESS_FROM_BYTES
from tests.conftest import Projected
from tests.sse import SseClient


async def test_a_long_conversations_messages_come_gzipped_to_a_client_that_accepts_it(
    api: SseClient, projected: Projected
) -> None:
    cid = (await api.create_conversation())["id"]
    events = await api.send_stream(cid, "count for me [[tokens=3000]] [[rate=0]]")
    assert events[-1].data == "ok"
    await projected(cid)
    path = api.url(f"/v1/conversations/{cid}/messages?versions=all")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(path, headers=api.headers(**{"Accept-Encoding": "gzip"})) as gz:
            assert gz.status == 200
            assert gz.headers.get("Content-Encoding") == "gzip"
            assert "Accept-Encoding" in gz.headers.getall("Vary", [])
            squeezed = await gz.read()
        async with raw.get(path, headers=api.headers(**{"Accept-Encoding": "identity"})) as plain:
            assert plain.status == 200
            assert "Content-Encoding" not in plain.headers
            whole = await plain.read()
    assert len(whole) >= COMPRESS_FROM_BYTES
    assert json.loads(gzip.decompress(squeezed)) == json.loads(whole)
    assert len(squeezed) < len(whole) / 2


async def test_small_answers_and_streams_go_as_they_are(api: SseClient) -> None:
    cid = (await api.create_conversation())["id"]
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        accepts = api.headers(**{"Accept-Encoding": "gzip"})
        async with raw.get(api.url(f"/v1/conversations/{cid}"), headers=accepts) as small:
            assert small.status == 200
            assert "Content-Encoding" not in small.headers
        async with raw.post(
            api.url(f"/v1/conversations/{cid}/messages"),
            json={"content": "a long one [[tokens=3000]] [[rate=0]]"},
            headers=accepts,
        ) as stream:
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            assert "Content-Encoding" not in stream.headers
            body = await stream.read()
    assert b'"event":"done"' in body  # read as it was written, to its end
