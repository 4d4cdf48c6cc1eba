"""Pure rules about message content, carried over from the original system.

- stored assistant content: merge consecutive chunks of one kind into blocks,
  drop empty ones, normalise thinking once, on the merged block;
- the history sent to the model;
- the automatic title.

No I/O, no clock, no logging: everything here is tested without servers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from actors.model_stream import ToolCallRequest
from actors.tools import ToolOutcome
from events.codec import storable_text
from events.vocabulary import TITLE_LIMIT, ChunkKind, ContentBlock

PERSONAL_SYSTEM_PROMPT = (
    "You are parley, a helpful assistant. This is a personal conversation: "
    "there is no project, repository or team context, and project tools are unavailable."
)

# Tools that only make sense inside a project; hidden in personal scope.
_PROJECT_ONLY_PREFIXES = ("project_", "git_", "repo_")
_PROJECT_ONLY_NAMES = frozenset({"send_message", "retract_message"})

UNTITLED = ("", "New Chat")
TITLE_WORDS = 5
TITLE_MIN_WORD_LEN = 3  # "keep the words longer than two characters"
TITLE_MAX_CHARS = 40


def normalise_thinking(text: str) -> str:
    return text.strip()


def merge_blocks(pieces: Iterable[tuple[ChunkKind | None, str]]) -> list[ContentBlock]:
    """Merge consecutive pieces of the same kind into content blocks.

    A `None` kind is a boundary (a tool call happened there): the chunks on its
    two sides are not consecutive, so they are not glued into one block.
    Thinking is normalised after merging (normalising each piece would eat the
    spaces between tokens); a block left empty is dropped.
    """
    merged: list[tuple[ChunkKind | None, list[str]]] = []
    for kind, text in pieces:
        if kind is not None and merged and merged[-1][0] == kind:
            merged[-1][1].append(text)
        else:
            merged.append((kind, [text]))
    blocks: list[ContentBlock] = []
    for kind, parts in merged:
        text = "".join(parts)
        if kind is None:
            continue
        if kind == "thinking":
            text = normalise_thinking(text)
            if text:
                blocks.append(ContentBlock(role="thinking", content=text))
        elif text.strip():
            blocks.append(ContentBlock(role="assistant", content=text))
    return blocks


def answer_text(blocks: Sequence[ContentBlock]) -> str:
    """An assistant message in the history: its non-thinking blocks joined by newlines."""
    return "\n".join(block.content for block in blocks if block.role != "thinking")


class HistoryMessage(msgspec.Struct, frozen=True):
    """One stored message as the history builder sees it."""

    role: str
    blocks: tuple[str, ...] = ()  # user/system: the text blocks
    assistant_blocks: tuple[ContentBlock, ...] = ()


def build_history(messages: Sequence[HistoryMessage], *, personal: bool) -> list[dict[str, Any]]:
    """The chat messages sent to the model, from the latest message versions in creation order.

    An assistant message contributes its non-thinking blocks joined by "\\n"; a user
    or system message its first block; an unknown role is sent as user. Empty
    assistant answers (a turn that failed before any text) are left out: most
    providers reject an empty assistant message.
    """
    out: list[dict[str, Any]] = []
    if personal:
        out.append({"role": "system", "content": PERSONAL_SYSTEM_PROMPT})
    for message in messages:
        if message.role == "assistant":
            text = answer_text(message.assistant_blocks)
            if text:
                out.append({"role": "assistant", "content": text})
            continue
        role: Literal["user", "system"] = "system" if message.role == "system" else "user"
        out.append({"role": role, "content": message.blocks[0] if message.blocks else ""})
    return out


def visible_tools(tools: Sequence[dict[str, Any]], *, personal: bool) -> list[dict[str, Any]]:
    """The tool schemas offered to the model; project tools are hidden in personal scope."""
    if not personal:
        return list(tools)
    return [tool for tool in tools if not is_project_only(tool_name(tool))]


def refused_tool(name: str, *, personal: bool) -> ToolOutcome | None:
    """The error a call gets for a tool its scope hides, or None when it may run."""
    if personal and is_project_only(name):
        return ToolOutcome(error=f"tool {name!r} is not available in a personal conversation")
    return None


def tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function", {})
    return str(function.get("name", "")) if isinstance(function, dict) else ""


def is_project_only(name: str) -> bool:
    return name.startswith(_PROJECT_ONLY_PREFIXES) or name in _PROJECT_ONLY_NAMES


def tool_round_messages(
    answer: str,
    calls: Sequence[ToolCallRequest],
    outcomes: Sequence[ToolOutcome],
    *,
    reasoning_content: str | None = None,
    content_without_text: Literal[""] | None = None,
) -> list[dict[str, Any]]:
    """A tool round as the model expects to see it next: its assistant message with the
    calls, then one `tool` message per call (an error travels as a JSON object).

    The assistant message's `content` is the round's answer, or, when it wrote none,
    `content_without_text`: null by default (OpenAI's own SDKs send it, and gateways
    onto Anthropic or Bedrock refuse ""), "" for a server that refuses null (xAI:
    400 "Each message must have at least one content element").

    What the server streamed for itself goes back as it came, and only then (a
    server that never sent it may refuse an unknown field): the round's
    `reasoning_content` (DeepSeek's thinking mode refuses a tool round without
    it) and each call's `extra_content` (Gemini 3 refuses a call without its
    thought signature)."""
    assistant: dict[str, Any] = {
        "role": "assistant",
        "content": answer or content_without_text,
        "tool_calls": [_call_message(call) for call in calls],
    }
    if reasoning_content is not None:
        assistant["reasoning_content"] = reasoning_content
    messages: list[dict[str, Any]] = [assistant]
    for call, outcome in zip(calls, outcomes, strict=True):
        content = outcome.result if outcome.error is None else json.dumps({"error": outcome.error})
        messages.append({"role": "tool", "tool_call_id": call.call_id, "content": content})
    return messages


def _call_message(call: ToolCallRequest) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if call.extra_content is not None:
        message["extra_content"] = call.extra_content
    return message


def auto_title(first_user_message: str) -> str:
    """Words longer than two characters, the first five, joined by spaces, cut to 40 characters."""
    words = [word for word in first_user_message.split() if len(word) >= TITLE_MIN_WORD_LEN]
    return " ".join(words[:TITLE_WORDS])[:TITLE_MAX_CHARS]


def needs_title(title: str) -> bool:
    """Untitled, or titled with nothing but spaces (a title a client sent before the
    edge trimmed them): the first message names it."""
    return title.strip() in UNTITLED


def announced_title(title: str) -> str:
    """A conversation's title as each turn announces it again: one that parley did not
    write (a damaged or forged entry in the log) holding NUL or lone surrogates, or
    longer than a title may be set, is not copied into every later turn as it is."""
    return storable_text(title)[:TITLE_LIMIT]
