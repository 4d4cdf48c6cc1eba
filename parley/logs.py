"""Log lines with their structured fields (conversation_id, turn_id, ...), as text or JSON.

`PARLEY_LOG_FORMAT=text` (default): the message, then the fields as key=value.
`PARLEY_LOG_FORMAT=json`: one JSON object per line, `ts`, `level`, `logger`,
`message`, each structured field as a key of its own, and `exc` with a traceback.

No secret leaves through a log line: whatever the format, the rendered line
is scrubbed of the secrets the process was configured with (the JWT secret,
model API keys), of anything shaped like a JWT or a bearer token, and of
passwords in URLs. Code should not log them in the first place; this is the
net under it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any

import msgspec

from events.tracing import REQUEST_ID

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
REDACTED = "[redacted]"
# a JWT (three base64url parts, the first a JSON header), a bearer credential, a URL's password
_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=-]+"
    r"|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"
)


class Redactor:
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # longest first, so a secret that contains another is scrubbed whole
        self._secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _SHAPES.sub(REDACTED, text)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call passed as `extra`."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class KeyValueFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = fields_of(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return self._redact(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exc"] = self.formatStack(record.stack_info)
        # values json cannot hold (an exception, a path) are written as their str()
        return self._redact(msgspec.json.encode(entry, enc_hook=str).decode())


def formatter(log_format: str, secrets: Iterable[str | None] = ()) -> logging.Formatter:
    redact = Redactor(secrets)
    return JsonFormatter(redact) if log_format == "json" else KeyValueFormatter(redact)


def with_request_id(record: logging.LogRecord) -> bool:
    """A handler's filter: a line logged for a request (an edge serving it, a worker
    running what it asked for) names it."""
    request_id = REQUEST_ID.get()
    if request_id and not hasattr(record, "request_id"):
        record.request_id = request_id
    return True


def setup_logging(
    level: int = logging.INFO, log_format: str = "text", secrets: Iterable[str | None] = ()
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, secrets))
    handler.addFilter(with_request_id)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the clients' own chatter is noise at INFO
    for noisy in ("nats", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
