"""Every event fits in one JetStream message: the pure rule that splits or cuts what would not.

NATS refuses a message over its `max_payload` (1 MiB by default), and a refused
append would leave the turn open for ever. So before anything is appended:

- a `chunk` whose text is too long becomes several chunks, text unchanged;
- a `done`, `cancelled` or `failed` whose content blocks are too long moves
  them into `content_part` events just before it, in order, and carries
  `content=[]` with `content_parts=N` (the fold and the projection reassemble
  them, so no text is lost);
- the arguments of a `tool_call` and the result or error of a `tool_result`
  are cut with a note (the model's own message keeps them whole; only the
  log's copy is shortened).

Pure: the caller passes the id maker; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec

from events.codec import encode
from events.vocabulary import (
    Cancelled,
    Chunk,
    ContentBlock,
    ContentPart,
    Done,
    Event,
    Failed,
    ToolCall,
    ToolResult,
)

NewId = Callable[[], str]
# Room for the envelope around a text field: ids, names, JSON punctuation.
_OVERHEAD = 1024
# UTF-8 takes up to 4 bytes a character; JSON escapes of control characters take
# 6. A piece of max_chars characters is measured anyway, and halved if needed.
_BYTES_PER_CHAR = 4


def fit(events: list[Event], max_bytes: int, new_id: NewId) -> list[Event]:
    """The events, with any that would not fit in `max_bytes` split or cut."""
    out: list[Event] = []
    for event in events:
        if len(encode(event)) <= max_bytes:
            out.append(event)
        elif isinstance(event, Chunk):
            out.extend(
                msgspec.structs.replace(
                    event, text=piece, event_id=new_id() if i else event.event_id
                )
                for i, piece in enumerate(_pieces(event.text, max_bytes))
            )
        elif isinstance(event, Done | Cancelled | Failed):
            out.extend(_with_parts(event, max_bytes, new_id))
        elif isinstance(event, ToolCall):
            out.append(
                msgspec.structs.replace(event, arguments=_cut(event.arguments, max_bytes // 2))
            )
        elif isinstance(event, ToolResult):
            out.append(
                msgspec.structs.replace(
                    event,
                    result=None if event.result is None else _cut(event.result, max_bytes // 2),
                    error=None if event.error is None else _cut(event.error, max_bytes // 4),
                )
            )
        else:
            out.append(event)  # bounded at the edge (messages, titles): nothing to split
    return out


def _with_parts(end: Done | Cancelled | Failed, max_bytes: int, new_id: NewId) -> list[Event]:
    parts: list[Event] = []
    for block_index, block in enumerate(end.content):
        for piece in _pieces(block.content, max_bytes):
            parts.append(
                ContentPart(
                    conversation_id=end.conversation_id,
                    at=end.at,
                    event_id=new_id(),
                    turn_id=end.turn_id,
                    index=len(parts),
                    block=block_index,
                    role=block.role,
                    text=piece,
                )
            )
    slim = msgspec.structs.replace(end, content=[], content_parts=len(parts))
    if isinstance(slim, Failed) and len(encode(slim)) > max_bytes:
        slim = msgspec.structs.replace(slim, message=_cut(slim.message, max_bytes // 2))
    return [*parts, slim]


def assemble(parts: list[ContentPart]) -> list[ContentBlock]:
    """The content blocks that `content_part` events carry, in order."""
    blocks: list[ContentBlock] = []
    last_block = -1
    for part in sorted(parts, key=lambda p: p.index):
        if part.block == last_block and blocks:
            blocks[-1] = ContentBlock(role=blocks[-1].role, content=blocks[-1].content + part.text)
        else:
            blocks.append(ContentBlock(role=part.role, content=part.text))
            last_block = part.block
    return blocks


def _pieces(text: str, max_bytes: int) -> Iterator[str]:
    size = max(1, (max_bytes - _OVERHEAD) // _BYTES_PER_CHAR)
    start = 0
    while start < len(text):
        piece = text[start : start + size]
        while len(encode(piece)) > max_bytes - _OVERHEAD and len(piece) > 1:
            piece = piece[: len(piece) // 2]
        yield piece
        start += len(piece)


def _cut(text: str, max_bytes: int) -> str:
    pieces = _pieces(text, max_bytes)
    first = next(pieces, "")
    if len(first) == len(text):
        return text
    return first + f"\n[... {len(text) - len(first)} characters cut from the log's copy]"
