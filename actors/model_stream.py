"""Reading an OpenAI-compatible Chat Completions stream: raw SSE bytes in, typed items out.

This room is pure: no sockets, no clock, no logging. It is fed whatever byte
pieces the network delivered (split anywhere: mid-line, mid-UTF-8 character,
between CR and LF) and answers with `StreamItem`s that do not depend on how the
bytes were split. That makes every rule here testable with recorded transcripts
and random splits, and leaves the I/O (timeouts, HTTP status, retries) to
`actors.model_client`.

What the parser promises:
- text is never lost or reordered; thinking and answer are told apart whether the
  server sends `reasoning_content`/`reasoning` deltas or `<think>...</think>`
  inside `content`, tags cut across chunks included;
- tool calls are assembled from their piecewise deltas and emitted whole, in
  index order, when the finish_reason arrives (or at `[DONE]`/end if it never does);
- usage is emitted whenever a chunk carries it (on the finish chunk for
  DeepSeek, on a later `choices: []` chunk for OpenAI); the last one counts;
- a stream that ends without `[DONE]` or a finish_reason is an error, never a
  silently short answer;
- an error the server sends outside a data line, as an `error:` field (llama.cpp's
  server before tools/server) or as an event named `error`, is the answer's error,
  even when `[DONE]` follows it.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from actors.errors import ModelStreamError
from events.vocabulary import ChunkKind


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of thinking or answer text, in stream order."""

    kind: ChunkKind
    text: str


class ToolCallRequest(msgspec.Struct, frozen=True):
    """One complete tool call; `arguments` is the JSON text as the model wrote it.

    `extra_content` is what the server attached to the call for itself (Gemini's
    `{"google": {"thought_signature": ...}}`): it goes back with the call in the
    turn's next request, where Gemini 3 refuses a call without its signature.
    """

    call_id: str
    name: str
    arguments: str
    extra_content: dict[str, Any] | None = None


class Usage(msgspec.Struct, frozen=True):
    """Token counts reported by the server (prompt_tokens / completion_tokens)."""

    input_tokens: int
    output_tokens: int


class Finish(msgspec.Struct, frozen=True):
    """The model stopped: `reason` is its finish_reason ("stop", "length", "tool_calls", ...).

    `reasoning_content`: the thinking the server streamed in that field (DeepSeek,
    Kimi, Qwen, vLLM), else None. DeepSeek's thinking mode refuses (400) a next
    request whose assistant message with tool calls does not carry it back.
    """

    reason: str
    reasoning_content: str | None = None


StreamItem = TextDelta | ToolCallRequest | Usage | Finish


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    index: int | None = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | float | None = None
    completion_tokens: int | float | None = None


class _Chunk(msgspec.Struct):
    """The fields of a chunk the parser reads, in the shapes nearly every server sends.

    Decoding into these skips every other field (id, model, created, logprobs, ...)
    without building it: with the whole-event read in `feed`, a third of the cost
    of the line reader and dicts (2.5 against 6.6-7.6 us an event, recorded
    transcripts, one event a read, as at 20 tokens/s). A chunk in any other shape
    (content as parts, a count that is not a number, an error) fails this decode
    and is read from dicts, by the rules that cover all.
    """

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None
    object: str | None = None


_OPEN_TAG: Final = "<think>"
_CLOSE_TAG: Final = "</think>"
_LINE_END: Final = re.compile(rb"[\r\n]")
_CR: Final = 0x0D
_LF: Final = 0x0A
# A line this long is not a chunk of a chat stream; refusing it bounds the memory a
# misbehaving server can make us hold while we wait for a newline.
_MAX_LINE_BYTES: Final = 8 * 1024 * 1024
_decode_json = msgspec.json.Decoder().decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_DATA: Final = b"data: "
_NEXT_DATA: Final = b"\n\ndata: "


class ChatStreamParser:
    """Incremental parser of one Chat Completions stream (one response, one choice).

    `feed` and `finish` never drop items they parsed: when an error follows some
    items within one call, the call returns those items, sets `error`, and the
    next call raises it. A caller that must not wait for more bytes after an
    error checks `error` after each call.
    """

    def __init__(self) -> None:
        self.done = False  # `data: [DONE]` seen
        self.deltas = (
            0  # non-empty content/reasoning deltas: a token estimate when usage never comes
        )
        self.error: ModelStreamError | None = None
        self._buf = bytearray()
        self._data: list[bytes] = []  # data lines of the SSE event being read
        self._event = b""  # the `event:` name of the SSE event being read
        self._finish_reason: str | None = None
        self._calls: dict[int, _PartialCall] = {}
        # a call `index` the server reused for another call, and where that one went
        self._moved: dict[int, int] = {}
        self._think = _ThinkSplitter()
        self._stray: bytes | None = None  # first line that was not SSE, to explain a cut
        self._ended = False
        # the thinking streamed as `reasoning_content`, to be sent back (`Finish`)
        self._reasoning_content: list[str] = []

    def feed(self, data: bytes) -> list[StreamItem]:
        """Parse the next bytes of the stream; returns the items they completed."""
        if self.error is not None:
            raise self.error
        if self.done or not data:
            return []
        out: list[StreamItem] = []
        if not self._buf and not self._data and data[:6] == _DATA and data[-2:] == b"\n\n":
            # Nearly every read: whole events of one `data: ` line each, LF-ended,
            # with nothing held back from the reads before (a line, or the data
            # lines of an event not ended yet).
            payloads = data[6:-2].split(_NEXT_DATA)
            # two LFs an event: no payload holds a line break of its own
            if data.count(b"\n") == 2 * len(payloads) and b"\r" not in data:
                try:
                    for payload in payloads:
                        if self.done:
                            break
                        self._fast_payload(payload, out)
                except ModelStreamError as err:
                    self.error = err
                    if not out:
                        raise
                return out
        self._buf += data
        try:
            self._read_lines(out, at_end=False)
        except ModelStreamError as err:
            self.error = err
            if not out:
                raise
        return out

    def finish(self) -> list[StreamItem]:
        """The byte stream ended: flush what is held back, or raise `stream_cut`."""
        if self.error is not None:
            raise self.error
        if self._ended:
            return []
        self._ended = True
        out: list[StreamItem] = []
        try:
            if not self.done:
                self._read_lines(out, at_end=True)
            if not self.done:
                self._read_unterminated_tail(out)
            out.extend(self._think.flush())
            if not self.done and self._finish_reason is None:
                raise ModelStreamError("stream_cut", self._cut_message())
        except ModelStreamError as err:
            self.error = err
            if not out:
                raise
        return out

    # ------------------------------------------------------------ SSE framing

    def _read_lines(self, out: list[StreamItem], *, at_end: bool) -> None:
        buf = self._buf
        pos = 0
        while not self.done:
            match = _LINE_END.search(buf, pos)
            if match is None:
                break
            end = match.start()
            if buf[end] == _CR:
                if end + 1 == len(buf) and not at_end:
                    break  # a CR at the very end may be the first half of CRLF: wait
                after = end + 2 if end + 1 < len(buf) and buf[end + 1] == _LF else end + 1
            else:
                after = end + 1
            line = bytes(buf[pos:end])
            pos = after
            self._line(line, out)
        if self.done:
            buf.clear()  # anything after [DONE] is not part of this answer
            return
        del buf[:pos]
        if len(buf) > _MAX_LINE_BYTES:
            raise ModelStreamError(
                "bad_json", f"an SSE line grew past {_MAX_LINE_BYTES} bytes without ending"
            )

    def _read_unterminated_tail(self, out: list[StreamItem]) -> None:
        # Servers that end the body right after the last data line (no blank line, or
        # not even a newline) still meant that line: the SSE rule "discard an event
        # that was not terminated" would turn their last chunk into a cut.
        tail = bytes(self._buf)
        self._buf.clear()
        if tail:
            self._line(tail, out)
        try:
            self._dispatch(out)
        except ModelStreamError as err:
            if err.code != "bad_json" or not tail:
                raise
            raise ModelStreamError(
                "stream_cut", "the stream ended in the middle of a data line"
            ) from err

    def _line(self, line: bytes, out: list[StreamItem]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line[:1] == b":":
            return  # SSE comment, e.g. a keep-alive ": ping"
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value
        elif field == b"error":
            # llama.cpp's server (examples/server, `server_sent_event(sink, "error", ...)`)
            # writes a failure mid-stream as `error: {"code":..,"message":..}`, a field
            # SSE would ignore, and then `data: [DONE]`: read as SSE, the answer ended
            # normally, cut short, and the server's message was lost.
            raise ModelStreamError("model_error", _error_event_message(value))
        elif field not in (b"id", b"retry") and self._stray is None:
            self._stray = line[:200]

    def _dispatch(self, out: list[StreamItem]) -> None:
        lines, self._data = self._data, []
        event, self._event = self._event, b""
        if event == b"error":
            # `event: error`: its data is the error, in whatever shape the server uses
            # (Anthropic-style `{"type": "error", "error": {...}}`, a bare message).
            raise ModelStreamError("model_error", _error_event_message(b"\n".join(lines)))
        if len(lines) <= 1:
            for line in lines:
                self._payload(line, out)
            return
        joined = b"\n".join(lines)
        try:
            chunk = _decode_json(joined)
        except msgspec.DecodeError:
            # Some servers write one JSON chunk per data line with no blank line
            # between them; the SSE join of those lines is not JSON, each line is.
            for line in lines:
                self._payload(line, out)
            return
        self._chunk(chunk, out)

    def _fast_payload(self, raw: bytes, out: list[StreamItem]) -> None:
        try:
            chunk = _decode_chunk(raw)
        except msgspec.DecodeError:  # not JSON, or another shape: the rules for all
            self._payload(raw, out)
            return
        if chunk.error is not None or chunk.object == "error":
            self._payload(raw, out)  # the error, described as the dict path does
            return
        first: _Choice | None = None
        for choice in chunk.choices or ():
            if choice.finish_reason == "error":
                self._payload(raw, out)
                return
            if first is None and choice.index in (0, None):
                first = choice
        if first is not None:
            delta = first.delta
            if delta is None:
                self._apply(None, "", None, first.finish_reason, out)
            else:
                if delta.reasoning_content:
                    self._reasoning_content.append(delta.reasoning_content)
                self._apply(
                    delta.reasoning_content or delta.reasoning,
                    delta.content or "",
                    delta.tool_calls,
                    first.finish_reason,
                    out,
                )
        usage = chunk.usage
        if usage is not None:
            out.append(
                Usage(
                    input_tokens=_count(usage.prompt_tokens),
                    output_tokens=_count(usage.completion_tokens),
                )
            )

    def _payload(self, raw: bytes, out: list[StreamItem]) -> None:
        raw = raw.strip()
        if not raw:
            return
        if raw == b"[DONE]":
            self._on_done(out)
            return
        try:
            chunk = _decode_json(raw)
        except msgspec.DecodeError as err:
            raise ModelStreamError(
                "bad_json", f"a data line is not valid JSON ({err}): {_snippet(raw)}"
            ) from err
        self._chunk(chunk, out)

    # ------------------------------------------------------------ chunks

    def _chunk(self, chunk: Any, out: list[StreamItem]) -> None:
        if not isinstance(chunk, dict):
            raise ModelStreamError(
                "bad_json", f"a data line is JSON but not an object: {_snippet(chunk)}"
            )
        problem = error_in_chunk(chunk)
        if problem is not None:
            raise ModelStreamError("model_error", problem)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                # n=1 is all we ask for; a server that sends more choices gets its first read.
                if isinstance(choice, dict) and choice.get("index", 0) in (0, None):
                    self._choice(choice, out)
                    break
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.append(
                Usage(
                    input_tokens=_count(usage.get("prompt_tokens")),
                    output_tokens=_count(usage.get("completion_tokens")),
                )
            )

    def _choice(self, choice: dict[str, Any], out: list[StreamItem]) -> None:
        delta = choice.get("delta")
        reason = choice.get("finish_reason")
        if not isinstance(reason, str):
            reason = None
        if not isinstance(delta, dict):
            self._apply(None, "", None, reason, out)
            return
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            self._reasoning_content.append(reasoning)
        else:
            reasoning = delta.get("reasoning")
        tool_calls = delta.get("tool_calls")
        content = delta.get("content")
        if isinstance(content, list) and not (isinstance(reasoning, str) and reasoning):
            # Mistral's reasoning models (Magistral) stream thinking as content parts
            # {"type": "thinking", "thinking": [{"type": "text", "text": ...}]}
            reasoning = _thinking_parts(content)
        self._apply(
            reasoning if isinstance(reasoning, str) else None,
            _content_text(content),
            tool_calls if isinstance(tool_calls, list) else None,
            reason,
            out,
        )

    def _apply(
        self,
        reasoning: str | None,
        content: str,
        tool_calls: list[Any] | None,
        reason: str | None,
        out: list[StreamItem],
    ) -> None:
        """One choice's delta and finish_reason, however the chunk was decoded.

        Some servers send both `reasoning_content` and `reasoning` with the same
        text; the caller passes one of them, reasoning_content first, so thinking
        does not double.
        """
        if reasoning:
            self.deltas += 1
            out.extend(self._think.flush())  # text held before this stays before it
            out.append(TextDelta("thinking", reasoning))
        if content:
            self.deltas += 1
            out.extend(self._think.split(content))
        if tool_calls is not None and self._finish_reason is None:
            for tool_call in tool_calls:
                if isinstance(tool_call, dict):
                    self._tool_call_delta(tool_call)
        if reason and self._finish_reason is None:
            self._finish_reason = reason
            out.extend(self._think.flush())
            out.extend(self._take_calls())
            out.append(Finish(reason, self._reasoning_text()))

    def _tool_call_delta(self, delta: dict[str, Any]) -> None:
        call_id = delta.get("id")
        index = delta.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._index_without_index(call_id)
        else:
            index = self._index_of(index, call_id)
        call = self._calls.setdefault(index, _PartialCall())
        if isinstance(call_id, str) and call_id and not call.call_id:
            call.call_id = call_id
        extra = delta.get("extra_content")
        if isinstance(extra, dict) and extra:
            # Gemini sends its thought signature here, on the call's delta or alone
            call.extra_content = {**(call.extra_content or {}), **extra}
        function = delta.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        # The name comes whole in the first delta; some servers repeat it on every
        # delta, so the first one wins rather than being concatenated.
        if isinstance(name, str) and name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            call.arguments.append(arguments)
        elif isinstance(arguments, dict):
            call.arguments.append(msgspec.json.encode(arguments).decode())

    def _index_of(self, index: int, call_id: object) -> int:
        # Ollama gives every call of a response index 0, each with its own id
        # (ollama/ollama#15457): a new id at a taken index is a new call, not more
        # of the one there (whose arguments it would be glued to).
        at = self._moved.get(index, index)
        call = self._calls.get(at)
        if (
            call is not None
            and call.call_id
            and isinstance(call_id, str)
            and call_id
            and call_id != call.call_id
        ):
            at = max(self._calls) + 1
            self._moved[index] = at
        return at

    def _index_without_index(self, call_id: object) -> int:
        # Servers that omit `index` send each call whole with its own id: a new id
        # is a new call, a delta without an id continues the latest call.
        if isinstance(call_id, str) and call_id:
            for index, call in self._calls.items():
                if call.call_id == call_id:
                    return index
            return max(self._calls, default=-1) + 1
        return max(self._calls, default=0)

    def _take_calls(self) -> list[StreamItem]:
        calls, self._calls = self._calls, {}
        self._moved = {}
        return [
            ToolCallRequest(
                call_id=call.call_id or f"call_{index}",
                name=call.name,
                arguments="".join(call.arguments),
                extra_content=call.extra_content,
            )
            for index, call in sorted(calls.items())
        ]

    def _on_done(self, out: list[StreamItem]) -> None:
        self.done = True
        self._data.clear()
        out.extend(self._think.flush())
        if self._finish_reason is None:
            # [DONE] without a finish_reason still ends the answer normally; the
            # reason is inferred so that callers always get exactly one Finish.
            calls = self._take_calls()
            out.extend(calls)
            self._finish_reason = "tool_calls" if calls else "stop"
            out.append(Finish(self._finish_reason, self._reasoning_text()))

    def _reasoning_text(self) -> str | None:
        return "".join(self._reasoning_content) if self._reasoning_content else None

    def _cut_message(self) -> str:
        message = "the stream ended before [DONE] and without a finish_reason"
        if self._stray is not None:
            message += f"; it carried text that is not SSE: {_snippet(self._stray)}"
        return message


class _PartialCall:
    """A tool call still being streamed."""

    __slots__ = ("arguments", "call_id", "extra_content", "name")

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.extra_content: dict[str, Any] | None = None


class _ThinkSplitter:
    """Routes `content` text to thinking or answer by `<think>` tags.

    A chunk may end inside a tag ("...<thi"), so a suffix that could still become
    a tag is held back until the next chunk decides; `flush` releases it as
    literal text when the stream (or the content) ends.
    """

    def __init__(self) -> None:
        self.inside = False
        self.held = ""

    def split(self, text: str) -> list[StreamItem]:
        if not self.held and "<" not in text:
            # nearly every chunk: no tag, nor the start of one (a worker's most
            # frequent call, once per token of every stream)
            return [TextDelta("thinking" if self.inside else "answer", text)] if text else []
        text = self.held + text
        self.held = ""
        out: list[StreamItem] = []
        while text:
            tag = _CLOSE_TAG if self.inside else _OPEN_TAG
            kind: ChunkKind = "thinking" if self.inside else "answer"
            at = text.find(tag)
            if at >= 0:
                if at:
                    out.append(TextDelta(kind, text[:at]))
                text = text[at + len(tag) :]
                self.inside = not self.inside
                continue
            keep = _partial_tag_length(text, tag)
            if keep < len(text):
                out.append(TextDelta(kind, text[: len(text) - keep]))
            self.held = text[len(text) - keep :]
            break
        return out

    def flush(self) -> list[StreamItem]:
        if not self.held:
            return []
        held, self.held = self.held, ""
        return [TextDelta("thinking" if self.inside else "answer", held)]


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    # A tag holds "<" only at its start, so the only candidate is the last "<"
    # among the final len(tag) - 1 characters.
    at = text.rfind("<", max(0, len(text) - len(tag) + 1))
    if at >= 0 and tag.startswith(text[at:]):
        return len(text) - at
    return 0


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content sent as parts ([{"type": "text", "text": ...}]) by some servers.
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _thinking_parts(content: list[Any]) -> str:
    thinking = (
        part.get("thinking")
        for part in content
        if isinstance(part, dict) and part.get("type") == "thinking"
    )
    return "".join(piece if isinstance(piece, str) else _content_text(piece) for piece in thinking)


def error_in_chunk(chunk: dict[str, Any]) -> str | None:
    """The error a decoded chunk (or error body) reports, in any shape servers use, else None."""
    error = chunk.get("error")
    if error is not None:  # {"error": {...}} (OpenAI, SGLang), OpenRouter's top-level error
        return _describe_error(error)
    if chunk.get("object") == "error":  # vLLM: {"object": "error", "message": ...}
        return _describe_error(chunk)
    choices = chunk.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason") == "error":
                return "the model stopped with finish_reason 'error'"
    return None


def completion_items(completion: dict[str, Any]) -> list[StreamItem]:
    """The items of a whole answer: a `chat.completion` object, sent by a server that
    ignores `stream: true`, read as the one chunk its stream would have been.

    Each choice's `message` is read as a `delta` (text, `<think>` tags, reasoning
    fields, content parts), its tool calls numbered in the order they come (a whole
    message's calls carry no `index`), its usage counted; the items end with one
    `Finish`, as a stream's do at `[DONE]`. An error object raises `model_error`.
    """
    chunk = dict(completion)
    choices = completion.get("choices")
    if isinstance(choices, list):
        chunk["choices"] = [_as_delta(choice) for choice in choices]
    parser = ChatStreamParser()
    out: list[StreamItem] = []
    parser._chunk(chunk, out)
    parser._on_done(out)
    return out


def _as_delta(choice: object) -> object:
    if not isinstance(choice, dict):
        return choice
    message = choice.get("message")
    delta = dict(message) if isinstance(message, dict) else None
    if delta is not None and isinstance(delta.get("tool_calls"), list):
        delta["tool_calls"] = [
            {**call, "index": index} if isinstance(call, dict) else call
            for index, call in enumerate(delta["tool_calls"])
        ]
    return {**choice, "delta": delta}


def _error_event_message(raw: bytes) -> str:
    """The message of an error sent as an `error:` field or an `error` event."""
    raw = raw.strip()
    try:
        decoded = _decode_json(raw)
    except msgspec.DecodeError:
        return _snippet(raw) if raw else "the server sent an error event without a message"
    if isinstance(decoded, dict):
        return error_in_chunk(decoded) or _describe_error(decoded)
    return _describe_error(decoded)


def _describe_error(error: object) -> str:
    if isinstance(error, str):
        return error or "unspecified error"
    if not isinstance(error, dict):
        return _snippet(error)
    message = error.get("message")
    text = message if isinstance(message, str) and message else _snippet(error)
    details = [
        f"{key} {error[key]}"
        for key in ("type", "code")
        if isinstance(error.get(key), str | int) and error.get(key) not in ("", None)
    ]
    return f"{text} ({', '.join(details)})" if details else text


def _count(value: object) -> int:
    """A token count as a provider reported it; not a count (a string, a bool, a
    negative number: a provider's bug) counts none, never credits an account."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def _snippet(value: object, limit: int = 200) -> str:
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = msgspec.json.encode(value).decode()
    return text if len(text) <= limit else text[:limit] + "…"
