"""Log lines: JSON with the structured fields as keys, and never a token or a secret."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from api.auth import mint
from parley.logs import REDACTED, fields_of, formatter
from parley.services import Services
from tests.conftest import SECRET, token_for
from tests.sse import SseClient

TOKEN = mint(SECRET, "someone")


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("parley.test", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_carries_the_structured_fields_as_keys() -> None:
    line = formatter("json").format(
        record("turn failed: %s", "model_error", conversation_id="c1", turn_id="t1", retry_in_s=0.5)
    )
    entry = json.loads(line)
    assert entry["message"] == "turn failed: model_error"
    assert entry["level"] == "info" and entry["logger"] == "parley.test"
    assert (entry["conversation_id"], entry["turn_id"], entry["retry_in_s"]) == ("c1", "t1", 0.5)
    assert entry["ts"].endswith("+00:00")


def test_an_exception_and_values_json_cannot_hold_still_make_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed", error=ValueError("boom"))
        made.exc_info = sys.exc_info()
    line = formatter("json").format(made)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["error"] == "boom" and "ValueError: boom" in entry["exc"]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_tokens_and_url_passwords_are_scrubbed_from_a_line(log_format: str) -> None:
    api_key = "sk-live-0123456789abcdef"
    line = formatter(log_format, secrets=[SECRET, api_key, None]).format(
        record(
            "calling with %s and %s",
            f"Authorization: Bearer {TOKEN}",
            api_key,
            header=f"bearer {TOKEN}",
            jwt=TOKEN,
            secret=SECRET,
            url="redis://user:hunter2@127.0.0.1:6379/0",
        )
    )
    for leaked in (TOKEN, SECRET, api_key, "hunter2", TOKEN.split(".")[2]):
        assert leaked not in line, f"{leaked!r} in {line}"
    assert REDACTED in line and "127.0.0.1:6379" in line


class Capture(logging.Handler):
    """Every record of the process, kept raw and as the JSON formatter renders it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.out = io.StringIO()
        self.setFormatter(formatter("json", secrets=[SECRET]))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.out.write(self.format(record) + "\n")

    def raw(self) -> str:
        return "\n".join(
            f"{r.getMessage()} {fields_of(r)} {r.exc_text or ''}" for r in self.records
        )


@pytest.fixture
def captured() -> Iterator[Capture]:
    root = logging.getLogger()
    handler, level = Capture(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_a_turn_logs_its_ids_and_no_trace_of_the_token_or_the_secret(
    services: Services, http: aiohttp.ClientSession, user: str, captured: Capture
) -> None:
    token = token_for(user)
    api = SseClient(http, services.edge_url, token)
    cid = (await api.create_conversation())["id"]
    # a model nothing answers: the turn retries and fails, and says so in the log
    events = await api.send_stream(cid, "hello", model="unreachable-model")
    assert events[-1].event == "done" and events[-1].data == "error", events[-3:]
    # a forged token and a token in the query string are refused, and not written down
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    async with http.get(
        f"{services.edge_url}/v1/conversations/{cid}?access_token={token}",
        headers={"Authorization": f"Bearer {forged}"},
    ) as response:
        assert response.status == 401

    lines = [json.loads(line) for line in captured.out.getvalue().splitlines()]
    mine = [line for line in lines if line.get("conversation_id") == cid]
    assert mine and all(line.get("turn_id") for line in mine if "turn" in line["message"]), mine
    raw, out = captured.raw(), captured.out.getvalue()
    for leaked in (token, forged, SECRET, token.split(".")[2]):
        assert leaked not in raw, f"logged: {leaked[:12]}..."
        assert leaked not in out, f"written: {leaked[:12]}..."
