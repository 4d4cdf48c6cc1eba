"""`parley chat [--conversation ID]`: the terminal client's I/O, on the public HTTP/SSE API.

This module moves bytes and draws: it reads a line (prompt-toolkit), posts it
through `parley.chat_api` (which also finds the edge and the token), decodes the
turn's SSE stream (`parley.chat_wire`) and hands every event to
`parley.chat_view.TurnView`, whose operations it draws with rich. How an event
looks is decided there, never here.

What it owns:
- Ctrl-C during a turn asks the server to stop it (POST .../cancel; the stream
  then ends with `done: "stopped"`); a second Ctrl-C quits. At the prompt,
  Ctrl-C clears the line, or quits when the line is empty; so does Ctrl-D.
- A stream that breaks before its `done` is resumed, at once and then with
  backoff: GET .../events with `Last-Event-ID` = the last id the view took, or,
  when no event came yet, the same POST again with the same idempotency key
  (the edge answers a repeated key with the first request's turn, and the actor
  applies its command once). The view drops anything at or before its last id,
  so every token is shown exactly once.

Like every command, it reads no environment itself: the edge's URL and the token
come from the settings (PARLEY_URL, PARLEY_TOKEN), else from the `parley dev`
running on the data folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TextIO

import aiohttp
import msgspec
from prompt_toolkit import PromptSession
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.style import Style as RichStyle
from rich.text import Text

from events.subjects import valid_id
from parley.chat_api import (
    Api,
    ConversationJson,
    Endpoint,
    MessagesJson,
    RequestFailed,
    failure,
    resolve_endpoint,
)
from parley.chat_view import (
    Op,
    Spin,
    Style,
    TurnView,
    Unspin,
    Write,
    conversation_gone,
    failed,
    history,
    new_conversation,
    printable,
    token_refused,
    welcome,
)
from parley.chat_wire import SseDecoder
from parley.commands import CliError
from parley.config import load_settings

PROMPT = "you> "
RECENT_MESSAGES = 10
# The edge sends `: ping` on an idle stream every 15 s: three missed pings mean
# the connection is dead even though no socket said so.
READ_TIMEOUT_S = 45.0
# Resuming is tried this long after the last byte that arrived; then the client
# says where the answer can still be seen (the turn goes on without it).
GIVE_UP_AFTER_S = 60.0
# Statuses worth asking again: the edge is busy or briefly without its servers.
_RETRYABLE = frozenset({429, 502, 503, 504})

STYLES: dict[Style, RichStyle] = {
    "answer": RichStyle.null(),
    "thinking": RichStyle(dim=True, italic=True),
    "tool": RichStyle(color="cyan"),
    "tool_result": RichStyle(color="cyan", dim=True),
    "error": RichStyle(color="red"),
    "notice": RichStyle(color="yellow"),
    "title": RichStyle(bold=True, dim=True),
    "user": RichStyle(bold=True),
    "dim": RichStyle(dim=True),
}


def run_chat(args: argparse.Namespace) -> int:
    if args.conversation is not None and not valid_id(args.conversation):
        raise CliError(f"not a conversation id: {args.conversation!r}")
    endpoint = resolve_endpoint(
        load_settings(args.data), url=args.url, token=args.token, user=args.user
    )
    console = _Console(highlight=False)
    try:
        code: int = asyncio.run(_until_terminated(Chat(endpoint, console), args.conversation))
    except Unreachable as err:
        # a server that does not answer exits 1, as every command's does (a bad argument
        # or setting, a refused token or an unknown conversation: 2, as a CliError)
        print(f"parley: {err}", file=sys.stderr)
        return 1
    return code


async def _until_terminated(chat: Chat, conversation_id: str | None) -> int:
    """The chat, ended like a Ctrl-C by SIGTERM or SIGHUP (`kill`, a closed terminal
    window): every `finally` runs, so the terminal gets its echo and cursor back (the
    default action ended the process on the spot, leaving a shell that showed no
    typed key). Exit status 128 + the signal's number, as the shell reports it."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    ended_by: list[int] = []

    def terminate(signum: int) -> None:
        ended_by.append(signum)
        main.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, terminate, signum)
    try:
        return await chat.run(conversation_id)
    except asyncio.CancelledError:
        if not ended_by:
            raise
        return 128 + ended_by[0]
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _read_in_background(stream: TextIO) -> asyncio.Queue[str]:
    """The stream's lines, then "" at its end, read by a daemon thread. A read in the
    loop's executor could not be stopped: Ctrl-C while a script's pipe stayed open
    and silent waited for its next line before the chat could end."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            line = stream.readline()
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the chat has ended meanwhile
                return
            if not line:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


class _Console(Console):
    """Rich's console, but a reader that leaves (`parley chat | head`) ends the chat
    quietly, as `replay | head` does: rich's own answer, SystemExit raised inside a
    task, came out as an asyncio traceback."""

    reader_left = False

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more is written
        self.reader_left = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


Opener = Callable[[], AbstractAsyncContextManager[aiohttp.ClientResponse]]


def backoff_s(attempt: int) -> float:
    """Before resume attempt `attempt` (0 = the first): at once, then doubling to 5 s, jittered."""
    if attempt == 0:
        return 0.0  # a dropped connection is mostly a one-off: try straight away
    return min(5.0, 0.25 * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------- the session


class Chat:
    api: Api  # from `run` on

    def __init__(self, endpoint: Endpoint, console: Console) -> None:
        self.endpoint = endpoint
        self.console = console
        self.conversation_id: str | None = None
        self.title: str | None = None
        self._live: Live | None = None
        self._prompt: PromptSession[str] | None = None
        self._piped: asyncio.Queue[str] | None = None  # lines read from piped input
        # messages whose answer ended in an error, or that were never sent (a script's
        # exit code)
        self.failed_turns = 0
        # the conversation answered 404: deleted (in the page, another chat, the API)
        self.conversation_gone = False

    async def run(self, conversation_id: str | None) -> int:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {self.endpoint.token}"}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            self.api = Api(http, self.endpoint)
            try:
                if conversation_id is not None:
                    if not await self._continue(conversation_id):
                        return 130
                else:
                    # the edge is there and takes the token, before anything is typed
                    await self.api.call("GET", "/v1/models")
                    self.draw(welcome(self.endpoint.url))
                return await self._loop()
            except RequestFailed as err:  # at the start: the loop handles its own
                raise CliError(
                    f"{self.endpoint.url} answered: {err.reported} ({err.code})"
                ) from err
            except (aiohttp.ClientError, TimeoutError) as err:
                raise Unreachable(f"cannot reach {self.endpoint.url}: {describe(err)}") from err
            finally:
                # never leave the spinner's thread drawing, or the cursor hidden
                self.draw([Unspin()])

    async def _continue(self, conversation_id: str) -> bool:
        """Show the conversation's recent messages, and follow an answer still being written.
        False if the user quit meanwhile."""
        path = f"/v1/conversations/{conversation_id}"
        conversation = msgspec.convert(await self.api.call("GET", path), ConversationJson)
        rows = msgspec.convert(await self.api.call("GET", path + "/messages"), MessagesJson)
        self.conversation_id, self.title = conversation.id, conversation.title or None
        active = conversation.active_turn
        turn_id = active.get("turn_id") if active else None
        self.draw(
            history(
                conversation.id,
                rows.messages,
                limit=RECENT_MESSAGES,
                title=self.title,
                skip_turn=turn_id,
            )
        )
        if active is None:
            return True
        # The running answer from its start: the position just before its first event
        # (its row's), so a turn that ends meanwhile is still read to its `done`. No row
        # yet: the edge starts a viewer without a position at the active turn.
        start = next((row.seq - 1 for row in rows.messages if row.id == turn_id), None)
        after = str(start) if start is not None else None
        view = TurnView(title=self.title, message_id=turn_id if isinstance(turn_id, str) else None)
        self.draw(view.begin())

        def opener() -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
            return self.api.events(conversation_id, view.last_id or after)

        keep_going = await self._follow(view, opener, opener, sending=False)
        self._leave_if_gone()
        return keep_going

    async def _loop(self) -> int:
        while True:
            try:
                line = await self._read_line()
            except (EOFError, KeyboardInterrupt):
                # piped in, a script learns from the exit code whether every answer came
                return 1 if self.failed_turns and not sys.stdin.isatty() else 0
            text = line.strip()
            if not text:
                continue
            if self.conversation_id is None and not await self._create():
                self.failed_turns += 1  # this message was never sent
                continue
            if not await self._turn(text):
                return 130
            if isinstance(self.console, _Console) and self.console.reader_left:
                return 0  # whoever read the answers has gone

    async def _create(self) -> bool:
        try:
            created = await self.api.call("POST", "/v1/conversations", {})
        except (RequestFailed, aiohttp.ClientError, TimeoutError) as err:
            self.draw(failed(f"could not start a conversation: {describe(err)}"))
            return False
        self.conversation_id = str(created["id"])
        self.draw(new_conversation(self.conversation_id))
        return True

    async def _turn(self, content: str) -> bool:
        """One message and its answer. False when the user asked to quit (a second Ctrl-C)."""
        conversation_id = self.conversation_id
        assert conversation_id is not None
        # The same key on a repeated POST: the edge answers with this request's turn
        # (api/turn_routes.py, `_idempotency`), and the actor applies it once.
        body = {"content": content, "idempotency_key": uuid.uuid4().hex}
        view = TurnView(title=self.title)
        self.draw(view.begin())

        def again() -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
            if view.last_id is not None:
                return self.api.events(conversation_id, view.last_id)
            return self.api.post_message(conversation_id, body)

        keep_going = await self._follow(
            view, lambda: self.api.post_message(conversation_id, body), again, sending=True
        )
        self.title = view.title
        if view.outcome not in (None, "ok", "stopped"):
            self.failed_turns += 1
        self._leave_if_gone()
        return keep_going

    def _leave_if_gone(self) -> None:
        """After a 404 for the conversation (deleted elsewhere), every later message would
        be refused alike: say so, and let the next message start a new conversation."""
        if self.conversation_gone and self.conversation_id is not None:
            self.draw(conversation_gone(self.conversation_id))
            self.conversation_id, self.title = None, None
        self.conversation_gone = False

    # ------------------------------------------------------------ following a turn

    async def _follow(self, view: TurnView, first: Opener, again: Opener, *, sending: bool) -> bool:
        """Read the turn to its end, Ctrl-C stopping it; False if a second Ctrl-C quit.
        `sending`: `first` posts the message whose turn this is."""
        loop = asyncio.get_running_loop()
        quitting = asyncio.Event()
        stopping: asyncio.Task[None] | None = None
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(self._read(view, first, again, sending=sending))

            def interrupted() -> None:
                nonlocal stopping
                if reading.done():
                    # the turn ended (the first Ctrl-C's stop came through) as the second
                    # came: it quits all the same, as it would at the prompt
                    if stopping is not None:
                        quitting.set()
                    return
                if stopping is None:
                    self.draw(view.cancelling())
                    stopping = tasks.create_task(self._cancel(view, quitting))
                else:
                    quitting.set()  # a stop being sent is still sent, but not tried again
                    reading.cancel()

            loop.add_signal_handler(signal.SIGINT, interrupted)
            try:
                with _quiet_keyboard():
                    await asyncio.wait({reading})
            finally:
                loop.remove_signal_handler(signal.SIGINT)
                if stopping is not None and not quitting.is_set():
                    stopping.cancel()  # the turn has ended: nothing left to stop
        self.draw(view.leave() if quitting.is_set() else [Unspin()])
        return not quitting.is_set()

    async def _cancel(self, view: TurnView, quitting: asyncio.Event) -> None:
        """Ask the server to stop the turn, and again until it has heard: a stop pressed
        while the edge is away (the stream being resumed) is sent once it is back, not
        dropped while the answer goes on. `_follow` cancels this when the turn ends; a
        user who quits meanwhile waits for the request under way, not for more."""
        assert self.conversation_id is not None
        path = f"/v1/conversations/{self.conversation_id}/cancel"
        told = False
        attempt = 0
        while True:
            reason: str | None = None
            try:
                answer = await self.api.call("POST", path, {})
            except RequestFailed as err:
                if err.status not in _RETRYABLE:
                    self.draw(view.note(f"could not stop the answer: {err.reported}"))
                    return
                reason = err.message
            except (aiohttp.ClientError, TimeoutError) as err:
                reason = describe(err)
            else:
                if not isinstance(answer, dict) or answer.get("cancelled") is not False:
                    return  # on its way to the actor; the stream ends with "stopped"
                # "no turn is running": the message is not there yet (a Ctrl-C right
                # after Enter), or its turn has just ended and the stream's done comes
            if reason is not None and not told:
                told = True
                self.draw(view.note(f"could not stop the answer yet ({reason}); trying again"))
            with contextlib.suppress(TimeoutError):  # the pause before trying again
                await asyncio.wait_for(quitting.wait(), backoff_s(attempt + 1))
            if quitting.is_set():
                return
            attempt += 1

    async def _read(self, view: TurnView, first: Opener, again: Opener, *, sending: bool) -> None:
        opener = first
        attempt = 0
        heard_at = time.monotonic()
        while True:
            reason = "the stream ended before the answer did"
            busy = False  # the edge answered, but not now (429, 503): nothing was lost
            try:
                async with opener() as response:
                    if response.status != 200:
                        refused = await failure(response)
                        self.conversation_gone = response.status == 404
                        if response.status == 401:  # expired, say, and asked again alike
                            self.draw(
                                view.give_up(
                                    token_refused(
                                        refused.reported,
                                        self.conversation_id if view.last_id else None,
                                    ),
                                    "refused",
                                )
                            )
                            return
                        if response.status not in _RETRYABLE:
                            self.draw(view.give_up(f"error: {refused.reported}", "refused"))
                            return
                        raise _Retry(refused.message)
                    self.draw(view.connected())
                    decoder = SseDecoder()  # one per connection: no half frame carried over
                    async for chunk in response.content.iter_any():
                        heard_at = time.monotonic()  # pings too: the connection lives
                        events = decoder.feed(chunk)
                        if events:  # progress, not only a connection: back to a quick retry
                            attempt = 0
                        ops: list[Op] = []
                        for event in events:
                            ops += view.feed(event)
                        self.draw(ops)
                        if view.finished:
                            return
            except _Retry as err:
                reason, busy = str(err), True
            except (aiohttp.ClientError, TimeoutError) as err:
                reason = describe(err)
            if view.finished:  # e.g. a cancel that could not be sent
                return
            if time.monotonic() - heard_at > GIVE_UP_AFTER_S:
                self.draw(self._given_up(view, reason, busy=busy, sending=sending))
                return
            self.draw(view.reconnecting(reason, busy=busy))
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1
            opener = again

    def _given_up(self, view: TurnView, reason: str, *, busy: bool, sending: bool) -> list[Op]:
        """What the user is told after GIVE_UP_AFTER_S of trying: whether the message is
        in the conversation and where its answer can still be seen."""
        where = f"parley chat --conversation {self.conversation_id}"
        waited = f"{GIVE_UP_AFTER_S:.0f} s"
        if sending and view.last_id is None:  # not one event of the turn came
            if busy:  # a repeated key passes every cap: refused, the message is not there
                return view.give_up(
                    f"error: {reason} (for {waited}); the message was not sent", "refused"
                )
            return view.give_up(
                f"the server has not answered for {waited} ({reason}); "
                f"the message may not have been sent: see {where}"
            )
        if busy:
            return view.give_up(
                f"the server refused the stream for {waited} ({reason}); "
                f"the answer goes on there: {where}"
            )
        return view.give_up(
            f"the server has not answered for {waited} ({reason}); the answer goes on there: {where}"
        )

    # ------------------------------------------------------------ the terminal

    async def _read_line(self) -> str:
        # Piped in, or written to a file or a pipe (`parley chat > log`): one message a
        # line, no line editor. prompt-toolkit draws its prompt and redraws on stdout,
        # which would put them in the log and leave whoever types with no echo at all.
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            if self._piped is None:
                self._piped = _read_in_background(sys.stdin)
            line = await self._piped.get()
            if not line:
                raise EOFError
            return line
        if self._prompt is None:
            self._prompt = PromptSession(key_bindings=_prompt_keys())
        return str(await self._prompt.prompt_async(PROMPT))

    def draw(self, ops: list[Op]) -> None:
        text = Text()  # writes in a row go out as one: a burst of tokens is one print
        for op in ops:
            if isinstance(op, Write):
                # the one way to the terminal: whatever a model wrote cannot command it
                text.append(printable(op.text), STYLES[op.style])
                continue
            if text:
                self.console.print(text, end="", soft_wrap=True)
                text = Text()
            if isinstance(op, Spin):
                label = Text(printable(op.label), style=STYLES["dim"])  # a tool's name
                spinner = Spinner("dots", text=label)
                if self._live is None:
                    self._live = Live(
                        spinner,
                        console=self.console,
                        transient=True,
                        refresh_per_second=12.5,
                        redirect_stdout=False,
                        redirect_stderr=False,
                    )
                    # drawn now, not at the first tick: a quick answer still shows it waited
                    self._live.start(refresh=True)
                else:
                    self._live.update(spinner, refresh=True)
            elif isinstance(op, Unspin) and self._live is not None:
                self._live.stop()
                self._live = None
        if text:
            self.console.print(text, end="", soft_wrap=True)


class _Retry(Exception):
    """The edge answered a status worth asking again."""


class Unreachable(Exception):
    """The edge did not answer at the start: nothing was sent."""


def describe(err: BaseException) -> str:
    """A transport failure in a few words (aiohttp's own texts are for developers)."""
    if isinstance(err, TimeoutError):
        return f"nothing for {READ_TIMEOUT_S:.0f} s"
    if isinstance(err, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "the connection was cut"
    if isinstance(err, aiohttp.ClientConnectorError):
        return f"cannot connect: {err.os_error.strerror or err.os_error}"
    text = str(err) or type(err).__name__
    return text if len(text) <= 100 else text[:99] + "…"


@contextlib.contextmanager
def _quiet_keyboard() -> Iterator[None]:
    """While an answer streams, keys typed are not echoed into it (they wait for the
    next prompt), and Ctrl-C does not make the terminal discard output it has not
    shown yet (NOFLSH): words already written to it would vanish from the screen,
    though the server keeps them in the stopped answer."""
    fd = next((f.fileno() for f in (sys.stdin, sys.stdout) if f.isatty()), None)
    if fd is None:
        yield
        return
    before = termios.tcgetattr(fd)
    during = termios.tcgetattr(fd)
    during[3] = (during[3] & ~termios.ECHO) | termios.NOFLSH  # local modes
    termios.tcsetattr(fd, termios.TCSANOW, during)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


def _prompt_keys() -> KeyBindings:
    keys = KeyBindings()

    @keys.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        """Ctrl-C clears what was typed; on an empty line it quits."""
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return keys
