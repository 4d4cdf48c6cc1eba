"""A turn's events as the Vercel AI SDK's UI message stream: the pure translation.

Frontends built on the AI SDK's `useChat` read a stream of JSON chunks over SSE
(`x-vercel-ai-ui-message-stream: v1`): `start`, `start-step`, `text-start` /
`text-delta` / `text-end`, `reasoning-*`, `tool-input-start`,
`tool-input-available`, `tool-output-available` / `tool-output-error`,
`finish-step`, `finish`, `abort`, `error`, then `data: [DONE]`. This module
turns one turn's log events into those chunks, keeping track of which text or
reasoning part is open, so that the SDK's reader assembles the same text,
reasoning and tool parts the log holds. The I/O (routes, streaming) is in
api/ai_sdk.py; nothing here reads a socket or a clock.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from api.sse import json_value
from events.codec import Unreadable
from events.vocabulary import (
    AnyEvent,
    BillingRejected,
    Cancelled,
    Chunk,
    CommandRejected,
    Done,
    Failed,
    Started,
    Title,
    ToolCall,
    ToolResult,
)

UiChunk = dict[str, Any]
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
    "x-vercel-ai-ui-message-stream": "v1",
}
DONE_FRAME = b"data: [DONE]\n\n"

_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool-calls"}


def _finish(reason: str) -> UiChunk:
    """The turn's end. Its reason goes in the message's metadata: the SDK's own
    `finishReason` key (and an `abort`'s `reason`) came in ai 5.0.95 and 6.0.50, and
    the versions before reject a chunk with a key they do not know."""
    return {"type": "finish", "messageMetadata": {"finishReason": reason}}


def frame(chunk: UiChunk) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class UiStream:
    """One turn, event by event, into UI message chunks. `finished` once it ended."""

    def __init__(self) -> None:
        self.finished = False
        self._open: tuple[Literal["text", "reasoning"], str] | None = None
        self._parts = 0
        self._in_step = False
        self._after_tools = False

    def feed(self, event: AnyEvent | Unreadable) -> list[UiChunk]:
        if self.finished:
            return []
        match event:
            case Started():
                self._in_step = True
                return [
                    {"type": "start", "messageId": event.turn_id},
                    {"type": "start-step"},
                ]
            case Chunk():
                return self._text("reasoning" if event.kind == "thinking" else "text", event.text)
            case ToolCall():
                out = self._close() + self._step()
                try:
                    arguments: Any = json_value(event.arguments) if event.arguments.strip() else {}
                except ValueError:
                    arguments = event.arguments
                return [
                    *out,
                    {
                        "type": "tool-input-start",
                        "toolCallId": event.call_id,
                        "toolName": event.name,
                    },
                    {
                        "type": "tool-input-available",
                        "toolCallId": event.call_id,
                        "toolName": event.name,
                        "input": arguments,
                    },
                ]
            case ToolResult():
                self._after_tools = True
                if event.error is not None:
                    return [
                        {
                            "type": "tool-output-error",
                            "toolCallId": event.call_id,
                            "errorText": event.error,
                        }
                    ]
                return [
                    {
                        "type": "tool-output-available",
                        "toolCallId": event.call_id,
                        "output": _output(event.result),
                    }
                ]
            case Title():
                return [{"type": "data-title", "data": {"title": event.title}, "transient": True}]
            case Done():
                reason = _FINISH_REASONS.get(event.stop_reason, "other")
                return self._end([_finish(reason)])
            case Cancelled():
                return self._end([{"type": "abort"}])
            case Failed():
                return self._end(
                    [
                        {"type": "error", "errorText": event.message},
                        _finish("error"),
                    ]
                )
            case BillingRejected():
                text = (
                    f"insufficient credits: the account {event.account} has {event.available} "
                    f"micro-credits, this turn needs {event.needed}"
                )
                return self._end(
                    [
                        {"type": "error", "errorText": text},
                        _finish("error"),
                    ]
                )
            case CommandRejected():
                return self._end(
                    [
                        {"type": "error", "errorText": event.message},
                        _finish("error"),
                    ]
                )
            case _:
                return []

    def stalled(self, message: str) -> list[UiChunk]:
        """The stream cannot end by itself (see api/hub.py): end it with an error."""
        return self._end([{"type": "error", "errorText": message}, _finish("error")])

    def _text(self, kind: Literal["text", "reasoning"], text: str) -> list[UiChunk]:
        out = self._step()
        if self._open is None or self._open[0] != kind:
            out += self._close()
            self._parts += 1
            part_id = f"{kind}-{self._parts}"
            self._open = (kind, part_id)
            out.append({"type": f"{kind}-start", "id": part_id})
        out.append({"type": f"{kind}-delta", "id": self._open[1], "delta": text})
        return out

    def _step(self) -> list[UiChunk]:
        """After a round of tools the model answers in a new step."""
        if not self._after_tools:
            return []
        self._after_tools = False
        return [*self._close(), {"type": "finish-step"}, {"type": "start-step"}]

    def _close(self) -> list[UiChunk]:
        if self._open is None:
            return []
        kind, part_id = self._open
        self._open = None
        return [{"type": f"{kind}-end", "id": part_id}]

    def _end(self, last: list[UiChunk]) -> list[UiChunk]:
        self.finished = True
        out = self._close()
        if self._in_step:
            out.append({"type": "finish-step"})
        return [*out, *last]


def _output(result: str | None) -> Any:
    """A tool's result as the SDK shows it: parsed when it is JSON, else the text."""
    if result is None:
        return None
    try:
        return json_value(result)
    except ValueError:
        return result
