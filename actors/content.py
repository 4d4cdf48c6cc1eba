"""Pure rules about message content, carried over from the original system.

- stored assistant content: merge consecutive chunks of one kind into blocks,
  drop empty ones, normalise thinking once, on the merged block;
- the history sent to the model, and the newest part of it that fits in the
  model's context window;
- the automatic title.

No I/O, no clock, no logging: everything here is tested without servers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

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


# ---------------------------------------------------------------- context window

# The room kept for the answer when the model's max_output_tokens is unset: what a
# long chat answer takes, and never more than a quarter of a small window.
ANSWER_RESERVE_TOKENS = 4096
# What a message costs beyond its JSON (a chat template's role markers: 3-4 tokens
# with OpenAI's, about 5 with Llama 3's), and the priming of the reply.
MESSAGE_OVERHEAD_TOKENS = 8
REPLY_PRIMING_TOKENS = 8
# A byte-level BPE token (GPT, Llama 3, Qwen, Mistral's Tekken) or a SentencePiece one
# with byte fallback is never less than one byte of UTF-8: counting one token a byte
# of a message's JSON is safe for every model, without its tokenizer. Measured on a
# conversation (the provider's reported input tokens over the bytes sent), the rate
# is sharpened, with a margin for text that tokenizes worse than what was measured,
# and never below one token in 8 bytes (no tokenizer packs chat text that densely;
# a provider reporting 0 prompt tokens must not make every history fit).
SAFE_TOKENS_PER_BYTE = 1.0
MIN_TOKENS_PER_BYTE = 1 / 8
RATE_MARGIN = 1.25


def tokens_per_byte(measured_tokens: int, measured_bytes: int) -> float:
    """The rate to estimate with, from a call's reported input tokens and the bytes sent."""
    if measured_tokens <= 0 or measured_bytes <= 0:
        return SAFE_TOKENS_PER_BYTE
    rate = measured_tokens / measured_bytes * RATE_MARGIN
    return min(SAFE_TOKENS_PER_BYTE, max(MIN_TOKENS_PER_BYTE, rate))


def json_bytes(value: Any) -> int:
    """The size of what goes to the model for `value` (a message, the tool schemas)."""
    return len(msgspec.json.encode(value))


def estimate_tokens(value: Any, rate: float) -> int:
    return math.ceil(json_bytes(value) * rate)


def history_budget(
    context_window: int | None, max_output_tokens: int | None, tools_tokens: int
) -> int | None:
    """The tokens the history may take: the window minus the answer's room (its
    max_output_tokens, else a reserve) and the tool schemas; None when the window is
    not known."""
    if context_window is None:
        return None
    reserve = (
        max_output_tokens
        if max_output_tokens is not None
        else min(ANSWER_RESERVE_TOKENS, context_window // 4)
    )
    return context_window - reserve - tools_tokens - REPLY_PRIMING_TOKENS


def _message_tokens(message: dict[str, Any], rate: float) -> int:
    return estimate_tokens(message, rate) + MESSAGE_OVERHEAD_TOKENS


def history_tokens(messages: Sequence[dict[str, Any]], rate: float) -> int:
    """About how many tokens `messages` take, counted as `fit_history` counts them."""
    return sum(_message_tokens(m, rate) for m in messages)


class Fitted(NamedTuple):
    """The history a model call sends: `messages`, `omitted` earlier messages left out,
    about `tokens` tokens (over `budget` only when nothing more could be left out; 0,
    not counted, without a budget)."""

    messages: list[dict[str, Any]]
    omitted: int
    tokens: int


def fit_history(
    messages: Sequence[dict[str, Any]], budget: int | None, rate: float = SAFE_TOKENS_PER_BYTE
) -> Fitted:
    """The newest part of `messages` that fits in `budget` tokens (None: all of it).

    Kept always: every system message, and the message being answered (the last user
    message) with everything after it (this turn's tool rounds). Before it, whole
    exchanges (a user message and what answered it, tool calls with their results)
    are left out, oldest first, until the rest fits; so what is left out is always
    the first non-system messages, and a tool call never goes without its result.
    When even the kept part does not fit, every exchange before it is left out and
    `tokens` says by how much it is over.
    """
    if budget is None:
        # no window to fit: nothing is counted (a long conversation's history is
        # megabytes of JSON, and this runs on every turn's way to its first token)
        return Fitted(list(messages), 0, 0)
    costs = [_message_tokens(m, rate) for m in messages]
    total = sum(costs)
    if total <= budget:
        return Fitted(list(messages), 0, total)
    answered = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    exchanges: list[list[int]] = []
    for i in range(answered):
        if messages[i].get("role") == "system":
            continue
        if not exchanges or messages[i].get("role") == "user":
            exchanges.append([])
        exchanges[-1].append(i)
    left_out: set[int] = set()
    for exchange in exchanges:
        if total <= budget:
            break
        left_out.update(exchange)
        total -= sum(costs[i] for i in exchange)
    kept = [m for i, m in enumerate(messages) if i not in left_out]
    return Fitted(kept, len(left_out), total)


def without_oldest(messages: Sequence[dict[str, Any]], omitted: int) -> list[dict[str, Any]]:
    """`messages` less the `omitted` first non-system ones: what `fit_history` sent when
    it left that many out (an estimate of a call whose usage never came)."""
    out, skipped = [], 0
    for m in messages:
        if skipped < omitted and m.get("role") != "system":
            skipped += 1
            continue
        out.append(m)
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
