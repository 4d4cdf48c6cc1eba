"""Calling an OpenAI-compatible model: one streaming Chat Completions request, items out.

This is the I/O shell around the pure `actors.model_stream` parser. It owns the
HTTP request, every timeout, and the mapping of transport failures to
`ModelStreamError` codes; it owns no policy: retries, billing, token estimates
and events are the conversation actor's. Nothing here logs conversation data or
reads settings from the environment: the endpoint and its key are passed in.

Every wait has a deadline (connect, first byte, silence between bytes), so a call
ends with items or an error, never a hang. The response is always released, after
its body's end is read, so its connection serves the next call; when the caller
stops early or anything fails, the connection is closed outright, so a real server
stops generating (and billing) tokens nobody will read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
import msgspec

from actors.errors import CONTEXT_LENGTH_EXCEEDED, ModelStreamError
from actors.model_stream import ChatStreamParser, StreamItem, completion_items, error_in_chunk

# Error bodies are read for their message only; a proxy's multi-megabyte HTML page
# must not be buffered whole.
_ERROR_BODY_LIMIT: Final = 64 * 1024
# A whole answer (a server that ignores `stream: true`) is read up to this, as
# much as the stream parser lets one SSE line grow.
_ANSWER_BODY_LIMIT: Final = 8 * 1024 * 1024
_MESSAGE_LIMIT: Final = 300
# Content types that may carry the event stream. aiohttp reports a missing
# Content-Type as application/octet-stream, and some self-hosted servers label
# their SSE text/plain; the parser decides on the bytes themselves.
_STREAM_TYPES: Final = frozenset({"text/event-stream", "text/plain", "application/octet-stream"})


class ModelEndpoint(msgspec.Struct, frozen=True):
    """Where a model is served: `base_url` like http://127.0.0.1:9000/v1."""

    base_url: str
    model: str
    api_key: str | None = None

    def __repr__(self) -> str:
        # Endpoints end up in logs and tracebacks; the key must not.
        key = "'***'" if self.api_key else "None"
        return f"ModelEndpoint(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"


class ChatRequest(msgspec.Struct, frozen=True):
    """What to ask: OpenAI-format messages and tool schemas."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = []
    max_tokens: int | None = None
    temperature: float = 0.7
    # the body field max_tokens is sent in: OpenAI's reasoning models refuse `max_tokens`
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # whether to ask for usage with `stream_options` (a server may refuse the field)
    include_usage: bool = True


def request_body(endpoint: ModelEndpoint, request: ChatRequest) -> dict[str, Any]:
    """The JSON body of a streaming Chat Completions request."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": request.messages,
        "stream": True,
        "temperature": request.temperature,
    }
    if request.include_usage:
        # Without this OpenAI sends no usage at all in a stream; with it, a last
        # `choices: []` chunk carries the counts billing needs. Servers that refuse
        # the field (Mistral: 422) send usage on their last chunk unasked.
        body["stream_options"] = {"include_usage": True}
    if request.max_tokens is not None:
        body[request.max_tokens_field] = request.max_tokens
    if request.tools:
        # Some servers reject an empty tools list, so it is sent only when non-empty.
        body["tools"] = request.tools
    return body


@dataclass(frozen=True, slots=True)
class SentChat:
    """A chat request sent and answered with a stream's status and headers
    (`send_chat`); its body is read by `read_chat`."""

    response: aiohttp.ClientResponse
    url: str
    # when the first stream data must have come (the first-byte budget)
    first_byte_deadline: float
    idle_timeout: float
    first_byte_timeout: float
    # the items of a whole answer, read already: the server ignored `stream: true`
    answer: tuple[StreamItem, ...] | None = None

    def close(self) -> None:
        """Close the connection unread: the server stops generating."""
        self.response.close()

    def arrived(self) -> bytes:
        """What of the answer's body has arrived so far, taken without waiting: what a
        call about to be closed unread has consumed is still billed."""
        try:
            return self.response.content.read_nowait()
        except (aiohttp.ClientError, RuntimeError):
            return b""  # the connection failed, or a reader is waiting on it


async def stream_chat(
    session: aiohttp.ClientSession,
    endpoint: ModelEndpoint,
    request: ChatRequest,
    **timeouts: float,
) -> AsyncGenerator[StreamItem, None]:
    """Stream one chat completion; yields items as the bytes arrive (`send_chat`, with
    its `timeouts`, then `read_chat`).

    A caller that stops early should close the generator (`contextlib.aclosing`),
    which closes the connection at once rather than when it is garbage collected.

    Raises `ModelStreamError`: `http_<status>`, `context_length_exceeded`,
    `unreachable`, `timeout`, `stream_cut`, `bad_json` or `model_error` (see
    `actors.errors`). Items yielded
    before an error stay valid: they are what the model produced until then.

    A server that ignores `stream: true` and answers one `chat.completion` JSON
    object gives the items its stream would have (`completion_items`), all at once.
    """
    async for item in read_chat(await send_chat(session, endpoint, request, **timeouts)):
        yield item


async def send_chat(
    session: aiohttp.ClientSession,
    endpoint: ModelEndpoint,
    request: ChatRequest,
    *,
    connect_timeout: float = 10,
    first_byte_timeout: float = 120,
    idle_timeout: float = 120,
) -> SentChat:
    """Send one streaming chat request and wait for its answer's status: a stream, or
    `ModelStreamError` (`http_<status>`, `unreachable`, `timeout`, `stream_cut`).
    What the model streams meanwhile waits in the connection for `read_chat`; a
    caller that will not read it closes it (`SentChat.close`)."""
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    body = msgspec.json.encode(request_body(endpoint, request))
    # aiohttp's own timeouts cover connecting only: total=None because a long
    # answer is not a failure, and the read deadlines below are ours.
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=None
    )
    loop = asyncio.get_running_loop()
    # The first-byte budget starts once connecting is over, so a slow connect does
    # not eat the model's time to first token.
    first_byte_deadline = loop.time() + connect_timeout + first_byte_timeout

    try:
        async with asyncio.timeout_at(first_byte_deadline):
            response = await session.post(url, data=body, headers=headers, timeout=timeout)
    except aiohttp.ConnectionTimeoutError as err:
        raise ModelStreamError(
            "unreachable", f"no connection to the model within {connect_timeout}s", detail=url
        ) from err
    except aiohttp.ClientConnectorError as err:  # refused, DNS, TLS, no route
        raise ModelStreamError(
            "unreachable", "cannot connect to the model", detail=f"{url}: {err}"
        ) from err
    except TimeoutError as err:
        raise ModelStreamError(
            "timeout", f"the model sent no response within {first_byte_timeout}s", detail=url
        ) from err
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
        raise ModelStreamError(
            "stream_cut",
            "the model closed the connection before answering",
            detail=f"{url}: {err}",
        ) from err
    except aiohttp.ClientError as err:
        raise ModelStreamError(
            "unreachable", "the request to the model failed", detail=f"{url}: {err}"
        ) from err

    try:
        if not 200 <= response.status < 300:
            raise await _http_error(response, idle_timeout)
        answer = None
        if response.content_type not in _STREAM_TYPES:
            answer = tuple(await _whole_answer(response, idle_timeout))
    except BaseException:
        response.close()
        raise
    return SentChat(response, url, first_byte_deadline, idle_timeout, first_byte_timeout, answer)


async def read_chat(sent: SentChat) -> AsyncGenerator[StreamItem, None]:
    """The items of a sent chat's stream, as its bytes arrive (see `stream_chat`)."""
    response, url, idle_timeout = sent.response, sent.url, sent.idle_timeout
    if sent.answer is not None:
        # A whole answer, its body read to the end by `send_chat`: the connection
        # goes back to the pool however far the caller reads.
        try:
            for item in sent.answer:
                yield item
        finally:
            response.release()
        return
    loop = asyncio.get_running_loop()
    try:
        parser = ChatStreamParser()
        cut_by: BaseException | None = None
        received = False
        watch = _Silence(loop, sent.first_byte_deadline)
        try:
            while not parser.done:
                try:
                    data = await watch.read(response.content)
                except TimeoutError as err:
                    raise ModelStreamError(
                        "timeout",
                        f"the model went silent for {idle_timeout}s mid-stream"
                        if received
                        else f"the model sent no stream data within {sent.first_byte_timeout}s",
                        detail=url,
                    ) from err
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as err:
                    # The server dropped the connection. Whether that lost anything
                    # is the parser's call: after a finish_reason nothing was lost.
                    cut_by = err
                    break
                if not data:
                    break
                received = True
                watch.move(loop.time() + idle_timeout)
                for item in parser.feed(data):
                    yield item
                if parser.error is not None:
                    raise parser.error
        finally:
            watch.close()
        try:
            tail = parser.finish()
        except ModelStreamError as err:
            if err.code == "stream_cut" and cut_by is not None:
                raise ModelStreamError(
                    "stream_cut", err.message, detail=f"{url}: connection lost: {cut_by}"
                ) from cut_by
            raise
        for item in tail:
            yield item
        if parser.error is not None:
            raise parser.error
    except BaseException:
        # Also on GeneratorExit/cancellation: closing (not just releasing) tells
        # the server at once that nobody reads the rest of the answer.
        response.close()
        raise
    _release_when_read(response, idle_timeout)


# Answers whose end is still being read after `[DONE]` (`_release_when_read`).
_READING: set[asyncio.Task[None]] = set()
# What may follow `[DONE]` before the connection is given up rather than reused.
_TAIL_LIMIT: Final = 64 * 1024


def _release_when_read(response: aiohttp.ClientResponse, limit_s: float) -> None:
    """Give the connection back to the pool once the answer's body has ended.

    `[DONE]` is not the end of the HTTP body: the chunked encoding's last chunk
    follows, usually in the next packet. A response released before it has come
    closes its connection, and the next call opens another: with the demo model
    at 1,000 turns, a new TCP connection per turn (aiohttp's connect was 2.4% of
    a worker's CPU, py-spy), with a provider a TLS handshake each. The end is
    read here, off the turn's way: the turn ends at `[DONE]`, not a packet later.
    """
    if response.content.is_eof():
        response.release()
        return
    task = asyncio.get_running_loop().create_task(_read_to_end(response, limit_s))
    _READING.add(task)
    task.add_done_callback(_READING.discard)


async def _read_to_end(response: aiohttp.ClientResponse, limit_s: float) -> None:
    read = 0
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await response.content.readany():
                read += len(chunk)
                if read > _TAIL_LIMIT:
                    response.close()  # more than an end: not worth keeping
                    return
    except (TimeoutError, aiohttp.ClientError, OSError):
        response.close()
        return
    except BaseException:
        response.close()
        raise
    response.release()


async def answers_read() -> None:
    """Wait until every answer's end has been read and its connection released."""
    while _READING:
        await asyncio.gather(*_READING, return_exceptions=True)


class _Silence:
    """The deadline for the stream's next bytes, with one timer per stream, not per read.

    `asyncio.timeout_at` around every read armed and cancelled a timer per
    token: 7% of a worker under `parley bench capacity` (py-spy). Here the
    deadline is a number moved on each read; the timer, when it fires early,
    re-arms itself at the deadline, and it cancels the reading task only while
    that task waits in `read` (between reads the caller's code runs, and a
    cancel must not land there). A read that starts past the deadline fails
    at once, as `timeout_at` did.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._loop = loop
        self.deadline = deadline
        self._task = asyncio.current_task()
        self._reading = False
        self._fired = False
        self._armed = deadline
        self._timer = loop.call_at(deadline, self._check)

    def move(self, deadline: float) -> None:
        """The new deadline; the timer is touched only when it would fire too late."""
        self.deadline = deadline
        if deadline < self._armed:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        self._timer.cancel()
        self._armed = when
        self._timer = self._loop.call_at(when, self._check)

    async def read(self, content: aiohttp.StreamReader) -> bytes:
        if self._loop.time() >= self.deadline:
            raise TimeoutError
        self._reading = True
        try:
            return await content.readany()
        except asyncio.CancelledError:
            task = self._task
            if self._fired and task is not None and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._reading = False

    def _check(self) -> None:
        if self._loop.time() < self.deadline or not self._reading or self._task is None:
            self._timer = self._loop.call_at(
                max(self.deadline, self._loop.time() + 0.01), self._check
            )
            return
        self._fired = True
        self._task.cancel()

    def close(self) -> None:
        self._timer.cancel()


async def _read_body(
    response: aiohttp.ClientResponse, idle_timeout: float, limit: int = _ERROR_BODY_LIMIT
) -> bytes:
    """Up to `limit` bytes of a (non-stream) body; what arrived if it stalls."""
    parts: list[bytes] = []
    size = 0
    try:
        while size < limit:
            async with asyncio.timeout(idle_timeout):
                part = await response.content.readany()
            if not part:
                break
            parts.append(part)
            size += len(part)
    except (TimeoutError, aiohttp.ClientError):
        pass  # the message is best effort: the status alone already says what failed
    return b"".join(parts)[:limit]


async def _http_error(response: aiohttp.ClientResponse, idle_timeout: float) -> ModelStreamError:
    status = response.status
    raw = await _read_body(response, idle_timeout)
    message = _message_from_body(raw) or response.reason or "no message"
    if refused_as_too_long(status, raw):
        return ModelStreamError(
            CONTEXT_LENGTH_EXCEEDED, message, status=status, context_window=window_said(message)
        )
    return ModelStreamError(
        f"http_{status}",
        message,
        status=status,
        retry_after=_retry_after(response.headers.get("Retry-After")),
    )


# What a provider's refusal of a request longer than its model's context window
# says, in its error's code, type or message (lower case). OpenAI and Azure:
# code "context_length_exceeded", "This model's maximum context length is ...",
# as DeepSeek, vLLM and SGLang word it; llama.cpp's server: type
# "exceed_context_size_error", "request (N tokens) exceeds the available context
# size (M tokens)"; Mistral: "... too large for model with N maximum context
# length"; Anthropic's compatible endpoint: "prompt is too long"; Gemini's: "The
# input token count (N) exceeds the maximum number of tokens allowed"; xAI: "This
# model's maximum prompt length is ...". A 429 is never one ("too many tokens per
# minute" is a rate limit, tried again as such).
_TOO_LONG_STATUSES: Final = frozenset({400, 413, 422})
_TOO_LONG_SAYINGS: Final = (
    "context_length_exceeded",
    "exceed_context_size_error",
    "context length",
    "context window",
    "context size",
    "prompt is too long",
    "maximum prompt length",
    "exceeds the maximum number of tokens",
)


# What a validation error echoes of the request, which may be the user's own words
# ("context length" in a question about models): the quoted value of an `input`, as
# pydantic words it (vLLM, SGLang, LiteLLM: `'input': '...'`, `input_value='...'`)
# and JSON echoes it (`"input": "..."`). Other quoted text is read: a gateway quotes
# the refusal it passes on (LiteLLM: `... Error code: 400 - {'error': {'message':
# "This model's maximum context length is ..."}}`). Only the message's first
# _SAID_LIMIT characters are read: a refusal says why at once.
_ECHOED: Final = re.compile(
    r"""\binput(?:_value)?['"]?\s*[:=]\s*(['"])(?:\\.|(?!\1)[^\\])*\1""", re.DOTALL
)
_SAID_LIMIT: Final = 4096


def _not_echoed(text: str) -> str:
    return _ECHOED.sub(" ", text[:_SAID_LIMIT])


def refused_as_too_long(status: int, raw: bytes) -> bool:
    """Whether an error answer refuses the request as longer than the model's context
    window. Only the error's own fields are read (its code, type and message), not
    the whole body, and of its message not the input a validation error echoes: that
    may be the user's words too."""
    if status not in _TOO_LONG_STATUSES:
        return False
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        decoded = raw.decode("utf-8", "replace")[:_MESSAGE_LIMIT]
    if isinstance(decoded, dict):
        error = decoded.get("error")
        fields = error if isinstance(error, dict) else decoded
        said = " ".join(
            _not_echoed(str(value))
            for key in ("code", "type", "message", "detail")
            if isinstance(value := fields.get(key), str | int)
        ) + (f" {_not_echoed(error)}" if isinstance(error, str) else "")
    else:
        said = _not_echoed(str(decoded))
    said = said.lower()
    return any(saying in said for saying in _TOO_LONG_SAYINGS)


# How the refusals above name the window: OpenAI, DeepSeek, vLLM ("maximum context
# length is N tokens"), SGLang ("maximum context length of N tokens"; older: "the
# model's context length (N tokens)", as Together words it), Mistral ("N maximum
# context length"), llama.cpp ("available context size (N tokens)"), Anthropic ("N
# tokens > M maximum"), Gemini ("maximum number of tokens allowed (N)"), xAI
# ("maximum prompt length is N").
_WINDOW_SAID: Final = re.compile(
    r"maximum context length (?:is|of) (\d+)|(\d+) maximum context length"
    r"|context length \((\d+)(?: tokens)?\)"
    r"|available context size \((\d+) tokens\)|> (\d+) maximum"
    r"|maximum number of tokens allowed \((\d+)\)|maximum prompt length is (\d+)",
    re.IGNORECASE,
)


def window_said(message: str) -> int | None:
    """The model's context window a refusal for length names, if it names one (not a
    number in the input a validation error echoes)."""
    match = _WINDOW_SAID.search(_not_echoed(message))
    if match is None:
        return None
    return int(next(group for group in match.groups() if group is not None))


_RETRY_AFTER_MAX_S = 60.0


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta form; an HTTP date is ignored), at most a minute."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)


async def _whole_answer(response: aiohttp.ClientResponse, idle_timeout: float) -> list[StreamItem]:
    """The items of a 2xx body that is not an event stream: a `chat.completion` object
    (some proxies and older local servers ignore `stream: true`), else the error it is.

    vercel/ai's simulateStreamingMiddleware and litellm's
    convert_model_response_to_streaming read such an answer the same way: its
    message as one chunk of a stream.
    """
    content_type = response.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raw = await _read_body(response, idle_timeout)
        raise ModelStreamError(
            "bad_json",
            f"expected an event stream, got {content_type}: "
            + _truncate(raw.decode("utf-8", "replace")),
        )
    raw = await _read_body(response, idle_timeout, _ANSWER_BODY_LIMIT)
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ModelStreamError(
            "bad_json",
            f"expected an event stream, got {content_type} that is not valid JSON: "
            + _truncate(raw.decode("utf-8", "replace")),
        ) from None
    problem = error_in_chunk(decoded) if isinstance(decoded, dict) else None
    if problem is not None:
        raise ModelStreamError("model_error", problem, status=response.status)
    if isinstance(decoded, dict) and isinstance(decoded.get("choices"), list):
        return completion_items(decoded)
    raise ModelStreamError(
        "model_error",
        "the server answered with one JSON body that is not a chat completion: "
        + _truncate(raw.decode("utf-8", "replace")),
        status=response.status,
    )


def _message_from_body(raw: bytes) -> str:
    """The error message in an error body: error.message when it is JSON, else the text."""
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _truncate(raw.decode("utf-8", "replace").strip())
    if isinstance(decoded, dict):
        problem = error_in_chunk(decoded)
        if problem is not None:
            return _truncate(problem)
        detail = decoded.get("detail")  # FastAPI-style servers
        if isinstance(detail, str) and detail:
            return _truncate(detail)
    return _truncate(raw.decode("utf-8", "replace").strip())


def _truncate(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "…"
