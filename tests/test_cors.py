"""Cross-origin requests (api/cors.py): a frontend on another origin calls the edge.

The preflight and the answers are checked on the wire, and a real browser (the
session's chromium) runs a page of another origin that creates a conversation,
streams a turn and reads an error's body and `Retry-After`-style headers, which
it can only do when the edge's CORS headers are right."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser

from api.config import parse_cors_origins
from parley.config import ConfigError, settings_from_env
from parley.services import Servers, Services
from tests.conftest import extra_edge, token_for

FRONTEND = "https://chat.example.test"
PREFLIGHT = {
    "Origin": FRONTEND,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.fixture
async def cors_edge(stack: Servers, services: Services) -> AsyncIterator[str]:
    """An edge that lets FRONTEND's pages call it (the session's workers serve its turns)."""
    async with extra_edge(stack, cors_origins=frozenset({FRONTEND})) as base:
        yield base


def test_origins_are_read_exactly_as_a_browser_sends_them() -> None:
    assert parse_cors_origins(" https://a.example , http://127.0.0.1:8080 ") == {
        "https://a.example",
        "http://127.0.0.1:8080",
    }
    assert parse_cors_origins("HTTPS://App.Example") == {"https://app.example"}
    assert parse_cors_origins("*") == {"*"}
    for wrong in ("https://a.example/", "https://a.example/app", "a.example", "ftp://a.example"):
        with pytest.raises(ValueError, match="is not an origin"):
            parse_cors_origins(wrong)
    with pytest.raises(ValueError, match="every origin"):
        parse_cors_origins("*, https://a.example")
    with pytest.raises(ConfigError, match="PARLEY_CORS_ORIGINS"):
        settings_from_env({"PARLEY_CORS_ORIGINS": "https://a.example/"})
    assert settings_from_env({}).cors_origins == frozenset()


async def test_without_origins_configured_the_edge_sends_no_cors_headers(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    base = services.edge_url
    async with http.options(base + "/v1/conversations", headers=PREFLIGHT) as response:
        assert response.status == 405, response.status  # as before: no such method
        assert "Access-Control-Allow-Origin" not in response.headers
    headers = {"Origin": FRONTEND, "Authorization": f"Bearer {token_for(user)}"}
    async with http.get(base + "/v1/conversations", headers=headers) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_listed_origins_preflight_is_answered_without_a_token(
    cors_edge: str, http: aiohttp.ClientSession, user: str
) -> None:
    path = "/v1/conversations/c_x/messages"
    async with http.options(cors_edge + path, headers=PREFLIGHT) as response:
        assert response.status == 204, await response.text()
        assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
        assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) >= {"POST"}
        allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed == {"authorization", "content-type"}
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        assert "Origin" in response.headers["Vary"]
        assert "Access-Control-Allow-Credentials" not in response.headers
    # a GET route answers HEAD too, and says so
    asked = {**PREFLIGHT, "Access-Control-Request-Method": "GET"}
    async with http.options(cors_edge + "/v1/conversations", headers=asked) as response:
        assert response.status == 204
        assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {
            "GET",
            "HEAD",
            "POST",
        }


async def test_a_preflight_the_edge_cannot_serve_is_refused_in_the_error_format(
    cors_edge: str, http: aiohttp.ClientSession
) -> None:
    other = {**PREFLIGHT, "Origin": "https://evil.example.test"}
    async with http.options(cors_edge + "/v1/conversations", headers=other) as response:
        body = await response.json()
        assert response.status == 403, body
        assert body["error"]["code"] == "origin_not_allowed"
        assert "evil.example.test" in body["error"]["message"]
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.options(cors_edge + "/v1/nothing", headers=PREFLIGHT) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    asked = {**PREFLIGHT, "Access-Control-Request-Method": "DELETE"}
    async with http.options(cors_edge + "/v1/conversations", headers=asked) as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    # OPTIONS that is no preflight is what it was: a method the route does not take
    async with http.options(cors_edge + "/v1/conversations") as response:
        assert response.status == 405


async def test_answers_to_a_listed_origin_name_it_errors_and_streams_too(
    cors_edge: str, http: aiohttp.ClientSession, user: str
) -> None:
    headers = {"Origin": FRONTEND, "Authorization": f"Bearer {token_for(user)}"}
    async with http.post(cors_edge + "/v1/conversations", headers=headers, json={}) as response:
        assert response.status == 201
        assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
        assert "Origin" in response.headers["Vary"]
        assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
        cid = (await response.json())["id"]
    # an error, before any handler ran: the page can still read why
    async with http.get(cors_edge + "/v1/conversations", headers={"Origin": FRONTEND}) as response:
        assert response.status == 401
        assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
        # and which token it needs
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "WWW-Authenticate" in response.headers["Access-Control-Expose-Headers"]
    async with http.post(
        cors_edge + f"/v1/conversations/{cid}/messages",
        headers={**headers, "Accept": "text/event-stream"},
        json={"content": "hello [[tokens=3]]"},
    ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
        assert b'{"event":"done","data":"ok"' in await response.read()
    # another origin gets nothing to let its page read the answer
    other = {**headers, "Origin": "https://evil.example.test"}
    async with http.get(cors_edge + "/v1/conversations", headers=other) as response:
        assert response.status == 200  # the token is valid; the browser withholds the body
        assert "Access-Control-Allow-Origin" not in response.headers


# What a frontend of another origin does: create, stream a turn with fetch (the
# bearer token in a header, as EventSource cannot send one), then read a refusal.
FRONTEND_SCRIPT = """
async ({edge, token}) => {
  const headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};
  const created = await fetch(edge + "/v1/conversations", {method: "POST", headers, body: "{}"});
  const conversation = await created.json();
  const turn = await fetch(edge + "/v1/conversations/" + conversation.id + "/messages", {
    method: "POST",
    headers: {...headers, "Accept": "text/event-stream"},
    body: JSON.stringify({content: "hello [[tokens=5]]"}),
  });
  const reader = turn.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    text += decoder.decode(value, {stream: true});
  }
  const refused = await fetch(edge + "/v1/conversations/nope", {headers});
  return {
    created: created.status,
    stream: text,
    refused: refused.status,
    refusal: await refused.json(),
  };
}
"""


async def serve_frontend() -> tuple[web.AppRunner, str]:
    """A page of another origin (another port is another origin)."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>frontend</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address: Any = runner.addresses[0]
    return runner, f"http://127.0.0.1:{address[1]}"


async def test_a_page_of_a_listed_origin_streams_a_turn_in_a_real_browser(
    stack: Servers, services: Services, browser: Browser, user: str
) -> None:
    runner, frontend = await serve_frontend()
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(frontend + "/")
        token = token_for(user)
        async with extra_edge(stack, cors_origins=frozenset({frontend})) as edge:
            seen: dict[str, Any] = await page.evaluate(
                FRONTEND_SCRIPT, {"edge": edge, "token": token}
            )
            assert seen["created"] == 201
            events = [
                json.loads(line[len("data: ") :])
                for line in seen["stream"].splitlines()
                if line.startswith("data: ")
            ]
            assert [e["event"] for e in events][-1] == "done", events
            assert events[-1]["data"] == "ok", events[-1]
            assert "".join(e["data"] for e in events if e["event"] == "token") == "0 1 2 3 4 "
            assert seen["refused"] == 404 and seen["refusal"]["error"]["code"] == "not_found"
        # an edge that does not list the page's origin: the browser refuses the page
        async with extra_edge(stack, cors_origins=frozenset({FRONTEND})) as edge:
            failure = await page.evaluate(
                """async ({edge, token}) => {
                     try {
                       await fetch(edge + "/v1/conversations",
                                   {headers: {"Authorization": "Bearer " + token}});
                       return "read";
                     } catch (err) { return String(err); }
                   }""",
                {"edge": edge, "token": token},
            )
            assert failure.startswith("TypeError"), failure
    finally:
        await context.close()
        await runner.cleanup()
