"""What `parley chat` shows: parley's SSE stream read and turned into terminal output. Pure.

With no I/O, no clock and no terminal (the events come from `parley/chat_wire.py`):

- `TurnView` turns one turn's events into drawing operations (`Write`, `Spin`,
  `Unspin`). It keeps the id of the last event it took, which is where a dropped
  stream resumes (`Last-Event-ID`), and drops any event at or before it, so a
  resumed stream cannot show a token twice whatever the server sends.
- `history` draws a conversation's recent messages (rows of GET .../messages).

The shell (`parley/chat.py`) owns the sockets, the signals and the terminal; it
draws exactly what these return. Nothing here imports rich or prompt-toolkit: a
style is a name (`Style`) the shell maps to the library's styles, so every
decision about how an event looks is made, and tested, here.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from parley.chat_wire import WireEvent, id_order

# ---------------------------------------------------------------- drawing operations

Style = Literal[
    "answer",  # the answer's text, as the terminal writes text
    "thinking",  # dimmed
    "tool",  # a tool call
    "tool_result",
    "error",
    "notice",  # what the client itself says: stopped, reconnecting
    "title",
    "user",  # a user message shown from the history
    "dim",  # headers and hints
]


class Write(msgspec.Struct, frozen=True):
    """Write text where the cursor is (no newline unless the text holds one)."""

    text: str
    style: Style = "answer"


class Spin(msgspec.Struct, frozen=True):
    """Show a spinner with this label on the current (empty) line, or relabel it."""

    label: str


class Unspin(msgspec.Struct, frozen=True):
    """Take the spinner away; the line it was on is empty again."""


Op = Write | Spin | Unspin


# ---------------------------------------------------------------- what reaches the terminal

# A terminal obeys the control characters in what it is given: ESC starts the sequences
# that clear the screen, move the cursor, retitle the window, write the clipboard (OSC
# 52) or answer with keystrokes of their own, and C1's CSI and OSC (U+009B, U+009D) do
# the same in one character. What parley chat shows comes from a model, a tool, a
# title made from a message or another client: none of it may drive the user's
# terminal. Newline and tab stay; a carriage return goes (CRLF lines stay lines); every
# other control is shown as its control picture (ESC as ␛), C1 as U+FFFD, so the user
# still sees that something was there.
_CONTROLS: dict[int, str | None] = {
    **{c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)},
    0x0D: None,
    0x7F: "\u2421",
    **{c: "\ufffd" for c in range(0x80, 0xA0)},
}


def printable(text: str) -> str:
    """`text` with nothing in it a terminal would take as a command."""
    return text.translate(_CONTROLS)


WAITING = "waiting for the answer"
RESUMING = "reconnecting"
TRYING_AGAIN = "trying again"
STOPPED = "⏹ stopped"
_CLIP_ARGUMENTS = 80
_CLIP_RESULT = 120
_CLIP_THINKING_IN_HISTORY = 300


class TurnView:
    """One turn as the terminal shows it: thinking dimmed, then the answer as it comes,
    each tool call and its result on a line of their own, a spinner while nothing is
    being written, and a closing line for a turn that was stopped.

    `last_id` is the last event taken; `outcome` the turn's `done` ("ok", "stopped",
    "error", "billing_error") or the shell's word for a stream it gave up on.
    """

    def __init__(self, *, title: str | None = None, message_id: str | None = None) -> None:
        self.title = title
        self.message_id = message_id  # the turn's (its `started`); others' events are skipped
        self.last_id: str | None = None
        self.outcome: str | None = None
        self._last_order: tuple[int, int] | None = None
        self._section: Literal["none", "thinking", "answer"] = "none"
        self._at_line_start = True
        self._spinning = False
        self._reconnecting = False
        self._pending_title: str | None = None
        self._out: list[Op] = []

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    # ------------------------------------------------------------ what the shell reports

    def begin(self) -> list[Op]:
        """The request is on its way: a spinner until the first thing to show."""
        self._spin(WAITING)
        return self._take()

    def feed(self, event: WireEvent) -> list[Op]:
        if self.finished:
            return []
        if event.id is not None and (order := id_order(event.id)) is not None:
            if self._last_order is not None and order <= self._last_order:
                return []  # seen before the connection dropped: shown once already
            self._last_order, self.last_id = order, event.id
        if (
            self.message_id is not None
            and event.message_id is not None
            and event.message_id != self.message_id
        ):
            return []  # another request's refusal, seen by a resumed whole-conversation stream
        self._reconnecting = False  # events flow again
        handler = _HANDLERS.get(event.event)
        if handler is not None:
            handler(self, event)
        return self._take()

    def cancelling(self) -> list[Op]:
        """The user pressed Ctrl-C: the turn is being stopped."""
        if self.finished:
            return []
        self._line("stopping the answer… (Ctrl-C again quits)", "notice")
        self._spin("stopping")
        return self._take()

    def reconnecting(self, reason: str, *, busy: bool = False) -> list[Op]:
        """The stream broke before the turn's end, or (`busy`) the edge answered a status
        worth asking again (429, 503: nothing was lost); the shell is about to try again."""
        if self.finished:
            return []
        if not self._reconnecting:
            self._reconnecting = True
            if busy:
                self._line(f"⟳ the server cannot take this now ({reason}); trying again", "notice")
            else:
                self._line(f"⟳ connection lost ({reason}); resuming", "notice")
        self._spin(TRYING_AGAIN if busy else RESUMING)
        return self._take()

    def connected(self) -> list[Op]:
        """A stream answered; after a reconnection, its events pick up where the last left."""
        if self._reconnecting and not self.finished:
            self._reconnecting = False
            self._spin(WAITING)
        return self._take()

    def note(self, message: str) -> list[Op]:
        """Something the user should know that does not end the turn (a cancel not sent)."""
        if self.finished:
            return []
        was_spinning = self._spinning
        self._line(message, "error")
        if was_spinning:
            self._spin(WAITING)
        return self._take()

    def give_up(self, message: str, outcome: str = "lost") -> list[Op]:
        """The shell cannot follow the turn any more (refused, or unreachable for too long)."""
        if self.finished:
            return []
        self._line(message, "error")
        self._finish(outcome)
        return self._take()

    def leave(self) -> list[Op]:
        """The user quits in the middle: leave the terminal on a fresh line."""
        if self.finished:
            return []
        self._finish("quit")
        return self._take()

    # ------------------------------------------------------------ one handler per event

    def _started(self, event: WireEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        message_id = data.get("message_id") or event.message_id
        if isinstance(message_id, str):
            self.message_id = message_id

    def _text(self, event: WireEvent) -> None:
        if not isinstance(event.data, str) or not event.data:
            return
        section: Literal["thinking", "answer"] = (
            "thinking" if event.event == "thinking" else "answer"
        )
        self._unspin()
        if section != self._section:
            self._break()
            self._section = section
        self._write(event.data, section)

    def _tool_call(self, event: WireEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        name = str(data.get("name") or "tool")
        self._line("⚙ " + tool_call_text(name, data.get("arguments"), event.raw_arguments), "tool")
        self._spin(f"running {name}")

    def _tool_result(self, event: WireEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        text, style = tool_result_text(
            data.get("result"), data.get("error"), data.get("duration_ms")
        )
        self._line(text, style)
        self._spin(WAITING)

    def _title(self, event: WireEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        title = data.get("title")
        if not isinstance(title, str) or not title or title == self.title:
            return
        self.title = title
        if self._at_line_start and self._section == "none":
            self._show_title(title)
        else:
            self._pending_title = title  # not in the middle of the answer: after it

    def _error(self, event: WireEvent) -> None:
        prefix = "billing" if event.event == "billing_error" else "error"
        self._line(f"{prefix}: {event.data}", "error")

    def _done(self, event: WireEvent) -> None:
        outcome = event.data if isinstance(event.data, str) else "ok"
        if outcome == "stopped":
            self._line(STOPPED, "notice")
        self._finish(outcome)

    # ------------------------------------------------------------ drawing

    def _finish(self, outcome: str) -> None:
        self._unspin()
        self._break()
        if self._pending_title is not None:
            self._show_title(self._pending_title)
            self._pending_title = None
        self.outcome = outcome

    def _show_title(self, title: str) -> None:
        was_spinning = self._spinning
        self._line(f"── {title} ──", "title")
        if was_spinning:
            self._spin(WAITING)

    def _line(self, text: str, style: Style) -> None:
        """A line of its own: after whatever was being written, which the next text does not continue."""
        self._unspin()
        self._break()
        self._write(text + "\n", style)
        self._section = "none"

    def _break(self) -> None:
        if not self._at_line_start:
            self._write("\n", "answer")

    def _write(self, text: str, style: Style) -> None:
        self._out.append(Write(text, style))
        self._at_line_start = text.endswith("\n")

    def _spin(self, label: str) -> None:
        self._break()  # a spinner owns its line
        self._out.append(Spin(label))
        self._spinning = True

    def _unspin(self) -> None:
        if self._spinning:
            self._out.append(Unspin())
            self._spinning = False

    def _take(self) -> list[Op]:
        out, self._out = self._out, []
        return out


_HANDLERS = {
    "started": TurnView._started,
    "thinking": TurnView._text,
    "token": TurnView._text,
    "tool_call": TurnView._tool_call,
    "tool_result": TurnView._tool_result,
    "title": TurnView._title,
    "error": TurnView._error,
    "billing_error": TurnView._error,
    "done": TurnView._done,
}


# ---------------------------------------------------------------- compact tool lines


def tool_call_text(name: str, arguments: object, raw_arguments: str | None = None) -> str:
    """`calculator(expression="6*7")`: the arguments as the model gave them, cut short."""
    if isinstance(arguments, dict) and raw_arguments is None:
        inner = ", ".join(f"{key}={_json(value)}" for key, value in arguments.items())
    else:
        inner = raw_arguments if raw_arguments is not None else _json(arguments)
    return f"{name}({clip(one_line(inner), _CLIP_ARGUMENTS)})"


def tool_result_text(result: object, error: object, duration_ms: object) -> tuple[str, Style]:
    took = f" · {_duration(duration_ms)}" if isinstance(duration_ms, int | float) else ""
    if error:
        return f"  ✗ {clip(one_line(str(error)), _CLIP_RESULT)}{took}", "error"
    text = result if isinstance(result, str) else _json(result)
    return f"  ↳ {clip(one_line(text), _CLIP_RESULT)}{took}", "tool_result"


def _duration(ms: float) -> str:
    if ms < 1:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.1f} s"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def one_line(text: str) -> str:
    return " ".join(text.split())


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- history


class Block(msgspec.Struct, frozen=True):
    role: str
    content: str = ""


class MessageRow(msgspec.Struct, frozen=True):
    """The fields of a GET .../messages row the history shows."""

    id: str
    role: str
    content: list[Block] = []
    status: str = "complete"
    turn_id: str | None = None
    tool_calls: list[dict[str, Any]] = []
    error_message: str | None = None
    seq: int = 0  # the log position of the message's first event


def welcome(url: str) -> list[Op]:
    return [Write(f"parley chat · {url} · Ctrl-D quits\n", "dim")]


def new_conversation(conversation_id: str) -> list[Op]:
    return [
        Write(
            f"conversation {conversation_id} "
            f"(continue it later: parley chat --conversation {conversation_id})\n",
            "dim",
        )
    ]


def conversation_gone(conversation_id: str) -> list[Op]:
    """The conversation answered 404: deleted elsewhere (the page, another chat, the API)."""
    return [
        Unspin(),
        Write(
            f"conversation {conversation_id} is not there any more (deleted elsewhere?); "
            "your next message starts a new one\n",
            "notice",
        ),
    ]


def token_refused(reported: str, answering: str | None) -> str:
    """The edge no longer takes the token (it expired mid-answer, say): every later
    request would be refused alike, so say what to do. `answering`: the conversation
    whose answer was being followed, which goes on on the server."""
    said = (
        f"error: {reported}: the server no longer takes this token; "
        "start parley chat again with a fresh one (--token or PARLEY_TOKEN)"
    )
    if answering is not None:
        said += f"; the answer goes on there: parley chat --conversation {answering}"
    return said


def failed(message: str) -> list[Op]:
    """A request of the client's own (not a turn's) that did not work."""
    return [Unspin(), Write(message + "\n", "error")]


def history(
    conversation_id: str,
    rows: list[MessageRow],
    *,
    limit: int,
    title: str | None,
    skip_turn: str | None = None,
) -> list[Op]:
    """A conversation's last `limit` messages, drawn like a live turn but finished:
    user messages after the prompt they were typed at, thinking dimmed and cut short,
    tool calls on a line each, the answer, and how a turn that did not end well ended.
    `skip_turn`: an answer still being written, which the live stream will draw."""
    out: list[Op] = [Write(f"conversation {conversation_id}\n", "dim")]
    if title:
        out.append(Write(f"── {title} ──\n", "title"))
    shown = [row for row in rows if row.id != skip_turn]
    if len(shown) > limit:
        earlier = len(shown) - limit
        out.append(Write(f"… {earlier} earlier message{'s' if earlier != 1 else ''}\n", "dim"))
        shown = shown[-limit:]
    for row in shown:
        if row.role == "user":
            text = row.content[0].content if row.content else ""
            out += [Write("you> ", "dim"), Write(text + "\n", "user")]
        else:
            out += _answer_row(row)
    return out


def _answer_row(row: MessageRow) -> list[Op]:
    blocks = [block for block in row.content if block.content]
    # The row keeps its blocks and its tool calls apart. A model thinks, calls, thinks
    # again over the results and answers: the calls go before the thinking that leads
    # into the answer (or before the answer), the one place that is right for one round.
    answer_at = next((i for i, b in enumerate(blocks) if b.role != "thinking"), len(blocks))
    calls_at = (
        answer_at - 1 if answer_at >= 2 and blocks[answer_at - 1].role == "thinking" else answer_at
    )
    out: list[Op] = []
    for i, block in enumerate(blocks):
        if i == calls_at:
            out += _tool_lines(row.tool_calls)
        if block.role == "thinking":
            out.append(Write(clip(block.content, _CLIP_THINKING_IN_HISTORY) + "\n", "thinking"))
        else:
            out.append(Write(block.content + "\n", "answer"))
    if calls_at == len(blocks):
        out += _tool_lines(row.tool_calls)
    if row.status == "cancelled":
        out.append(Write(STOPPED + "\n", "notice"))
    elif row.status == "failed":
        out.append(Write(f"error: {row.error_message or 'the answer failed'}\n", "error"))
    elif row.status not in ("complete", "streaming"):
        out.append(Write(f"({row.status})\n", "notice"))
    return out


def _tool_lines(calls: list[dict[str, Any]]) -> list[Op]:
    lines: list[Op] = []
    for call in calls:
        name = str(call.get("name") or "tool")
        call_line = tool_call_text(name, call.get("arguments"), call.get("raw_arguments"))
        lines.append(Write(f"⚙ {call_line}\n", "tool"))
        if call.get("duration_ms") is not None or call.get("error"):
            text, style = tool_result_text(
                call.get("result"), call.get("error"), call.get("duration_ms")
            )
            lines.append(Write(text + "\n", style))
    return lines
