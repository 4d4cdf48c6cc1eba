"""The error hierarchy of the actors package: one root, one class per failure a caller handles.

Each error carries the fields its caller needs to decide (a machine code for the
`failed` event, a text for people, whether trying again could help), so no caller
ever parses a message. Nothing here does I/O or imports aiohttp: the pure cores
raise these too.
"""

from __future__ import annotations

# The code of a turn whose history does not fit in its model's context window: the
# provider refused it as too long (`ModelStreamError`), or parley knew it would.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

# Codes whose cause is the road to the model, not the request: sending the same
# request again may well succeed.
_RETRYABLE_CODES = frozenset({"unreachable", "timeout", "stream_cut"})


class ActorError(Exception):
    """Root of everything the actors package raises."""


class ModelStreamError(ActorError):
    """A streaming model call failed.

    `code` is one of: `http_<status>` (non-2xx before the first byte),
    `unreachable` (no connection), `timeout` (no first byte, or silence mid-stream),
    `stream_cut` (the stream ended before `[DONE]` or a finish_reason),
    `bad_json` (a data line, or a non-stream body, that is not the expected JSON),
    `model_error` (the model reported an error inside the stream),
    `context_length_exceeded` (a 4xx that says the request is longer than the
    model's context window: trimming the history may help, sending it again not).
    `status` is the HTTP status when one was received. `retryable` says whether the
    same request may succeed if sent again; by default it follows from the code
    (429 and 5xx, lost connections and timeouts are; malformed output is not).
    `message` is for the people in the conversation (it is the `failed` event's, and
    their stream's `error`); `detail` for the operator only (the endpoint's URL, the
    HTTP library's own error), logged with the turn's failure: an internal address
    is nobody else's business.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        detail: str = "",
        context_window: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" ({detail})" if detail else ""))
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status
        self.retry_after = retry_after  # seconds, when the server said how long to wait
        # a refusal for length that said the model's window, in tokens
        self.context_window = context_window
        self.retryable: bool = (
            retryable if retryable is not None else _default_retryable(code, status)
        )


def _default_retryable(code: str, status: int | None) -> bool:
    if code in _RETRYABLE_CODES:
        return True
    if code.startswith("http_") and status is not None:
        return status == 429 or status >= 500
    return False
