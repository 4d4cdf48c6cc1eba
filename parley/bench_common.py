"""What the benchmarks share: the bench user, its limits, percentiles, and the direct path.

The direct path (`direct_server`) is the baseline every workload is held
against: the model's stream written straight to SSE, no broker, no log.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from actors.model_client import ChatRequest, ModelEndpoint, read_chat, send_chat
from actors.model_stream import TextDelta
from api.config import LISTEN_BACKLOG, EdgeLimits
from api.listener import EagerTCPSite
from api.sse import Envelope, frame

SECRET = "bench-" + "s" * 40
# One bench user sends what a crowd of users would: per-user limits are off here.
NO_LIMITS = EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=0)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def flat_json(result: msgspec.Struct) -> str:
    """`result` as the one JSON object of flat keys `--json` prints: a field holding a
    mapping becomes a key per entry (`actions: {"edit": 3}` -> `actions_edit: 3`,
    spaces in an entry's name as `_`)."""
    flat: dict[str, Any] = {}
    for key, value in msgspec.to_builtins(result).items():
        if isinstance(value, dict):
            for name, inner in value.items():
                flat[f"{key}_{str(name).replace(' ', '_')}"] = inner
        else:
            flat[key] = value
    return msgspec.json.encode(flat).decode()


DIRECT_SESSION = web.AppKey("session", aiohttp.ClientSession)
DIRECT_MODEL = web.AppKey("model", str)


async def _direct_handler(request: web.Request) -> web.StreamResponse:
    """The baseline: the model's stream written straight to SSE, nothing in between."""
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    endpoint = ModelEndpoint(base_url=request.app[DIRECT_MODEL], model="demo")
    seq = 0
    sent = await send_chat(
        request.app[DIRECT_SESSION],
        endpoint,
        ChatRequest(messages=[{"role": "user", "content": body["content"]}]),
    )
    async for item in read_chat(sent):
        if isinstance(item, TextDelta):
            seq += 1
            name = "token" if item.kind == "answer" else "thinking"
            await response.write(frame(str(seq), Envelope(name, item.text)))
    await response.write(frame(str(seq + 1), Envelope("done", "ok")))
    return response


@contextlib.asynccontextmanager
async def direct_server(model_url: str) -> AsyncIterator[str]:
    app = web.Application()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app[DIRECT_SESSION] = session
    app[DIRECT_MODEL] = model_url
    app.router.add_post("/direct", _direct_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = EagerTCPSite(runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await session.close()
