"""`parley chat` driven as a person drives it: in a pseudo-terminal, on the live server.

The command runs in its own process on a pty (pexpect); what it prints is fed to
a VT100 screen (pyte), and the tests read that screen, which is what a person
sees: the spinner drawn and erased, styles, lines rewritten by the prompt. Every
wait is for something to appear on the screen, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pexpect
import pyte
import pytest

from api.auth import mint
from api.config import EdgeLimits
from parley.chat_view import STOPPED
from parley.services import Servers, Services
from tests.conftest import SECRET, Projected, extra_edge, token_for
from tests.sse import SseClient

ROWS, COLUMNS = 60, 160
WAIT_S = 30.0
PROMPT_ROW = "you>"
_NUMBERS = re.compile(r"(?:\d+ ?)+")


class Terminal:
    """`parley chat` in a pseudo-terminal, and the screen it draws."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "parley.cli", *args],
            env=env,
            dimensions=(ROWS, COLUMNS),
            encoding="utf-8",
            codec_errors="replace",
        )
        # with the lines scrolled off its top: a long answer pushes the start of a turn away
        self.screen = pyte.HistoryScreen(COLUMNS, ROWS, history=100_000)
        self.stream = pyte.Stream(self.screen)
        self.raw: list[str] = []  # everything printed, escape codes included
        self._rows = [" " * COLUMNS] * ROWS
        self._scrolled: list[str] = []

    # ------------------------------------------------------------ reading the screen

    def rows(self) -> list[str]:
        """The lines written, those scrolled away included: a row filled to its last
        column goes on in the next (the terminal wrapped it), so a long answer is one
        line here, as printed. Trailing blanks are dropped. Only rows that changed are
        read again. A line keeps its index while the screen scrolls."""
        scrolled = self.screen.history.top
        for line in list(scrolled)[len(self._scrolled) :]:
            self._scrolled.append("".join(line[x].data for x in range(COLUMNS)))
        for y in self.screen.dirty:
            line = self.screen.buffer[y]
            self._rows[y] = "".join(line[x].data for x in range(COLUMNS))
        self.screen.dirty.clear()
        lines: list[str] = []
        current = ""
        for row in [*self._scrolled, *self._rows]:
            current += row
            if not row.endswith(" "):
                continue  # wrapped; or a token ended on the last column, which joins the same
            lines.append(current.rstrip())
            current = ""
        if current:
            lines.append(current.rstrip())
        return lines

    def text(self) -> str:
        return "\n".join(self.rows()).rstrip()

    def row_after(self, start: int, match: Callable[[str], bool]) -> int | None:
        rows = self.rows()
        return next((i for i in range(start + 1, len(rows)) if match(rows[i])), None)

    def _pump(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"waited {timeout:g} s for {what}; the screen shows:\n{self.text()}"
                )
            try:
                data = self.child.read_nonblocking(65536, timeout=min(left, 0.5))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                raise AssertionError(
                    f"parley chat ended while we waited for {what}; the screen shows:\n{self.text()}"
                ) from None
            self.raw.append(data)
            self.stream.feed(data)

    async def until(self, done: Callable[[], bool], what: str) -> None:
        # in a thread: the server under test shares this event loop
        await asyncio.to_thread(self._pump, done, what, WAIT_S)

    async def until_row(self, match: Callable[[str], bool], what: str, after: int = -1) -> int:
        await self.until(lambda: self.row_after(after, match) is not None, what)
        found = self.row_after(after, match)
        assert found is not None
        return found

    async def prompt_after(self, row: int) -> int:
        """The prompt, back on a row below `row`."""
        return await self.until_row(lambda r: r == PROMPT_ROW, "the prompt", after=row)

    # ------------------------------------------------------------ typing

    def type_line(self, text: str) -> None:
        self.child.send(text + "\r")

    def ctrl_c(self) -> None:
        self.child.sendintr()

    async def exit_status(self) -> int | None:
        """Wait for the process to end: its exit status (None if a signal killed it)."""

        def read_to_end() -> None:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                try:
                    data = self.child.read_nonblocking(65536, timeout=0.5)
                except pexpect.TIMEOUT:
                    continue
                except pexpect.EOF:
                    self.child.wait()
                    return
                self.raw.append(data)
                self.stream.feed(data)
            raise AssertionError(f"parley chat did not end; the screen shows:\n{self.text()}")

        await asyncio.to_thread(read_to_end)
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def chat_env(**extra: str) -> dict[str, str]:
    """A terminal's environment, without the outer one's PARLEY_* or colour settings."""
    skip = ("PARLEY_", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TERM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    # pexpect answers no cursor-position requests; prompt-toolkit would wait for one
    env.update(TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", **extra)
    return env


@contextlib.contextmanager
def terminal(*args: str, env: dict[str, str]) -> Iterator[Terminal]:
    term = Terminal(list(args), env)
    try:
        yield term
    finally:
        term.close()


def numbers_between(term: Terminal, first: int, last: int) -> tuple[list[int], list[str]]:
    """The `[[tokens=N]]` answer drawn between two rows, and the other rows there."""
    numbers: list[int] = []
    others: list[str] = []
    for row in term.rows()[first + 1 : last]:
        if _NUMBERS.fullmatch(row):
            numbers += [int(n) for n in row.split()]
        elif row:
            others.append(row)
    return numbers, others


def conversation_id_on(term: Terminal) -> str:
    match = re.search(r"^conversation (\w+)", term.text(), re.MULTILINE)
    assert match, term.text()
    return match.group(1)


def _style_at(raw: str, index: int) -> list[str]:
    """The parameters of the last SGR code written before `index` (the style in force)."""
    codes = re.findall(r"\x1b\[([0-9;]*)m", raw[:index])
    return codes[-1].split(";") if codes else []


# ---------------------------------------------------------------- tests


async def test_a_whole_turn_renders_with_the_dev_found_on_the_data_folder(
    services: Services, api: SseClient, user: str, tmp_path: Path
) -> None:
    # What a running `parley dev` leaves in its folder: its secret and where its edge is
    # (its pid: this process, alive). No PARLEY_* variable: the command finds both.
    (tmp_path / "jwt_secret").write_text(SECRET)
    run = {"edge_url": services.edge_url, "model_base_url": "", "pid": os.getpid()}
    (tmp_path / "run.json").write_text(json.dumps(run))
    with terminal("--data", str(tmp_path), "chat", "--user", user, env=chat_env()) as term:
        await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
        term.type_line("calculate 6*7")
        answer = await term.until_row(lambda r: r == "The result is 42.", "the answer")
        await term.prompt_after(answer)
        rows = term.rows()
        start = rows.index("you> calculate 6*7")
        turn = [row for row in rows[start + 1 : answer + 1] if row]
        conversation_id = conversation_id_on(term)
        assert turn == [
            f"conversation {conversation_id} "
            f"(continue it later: parley chat --conversation {conversation_id})",
            "── calculate 6*7 ──",
            "The user asks something the calculator tool can answer; I will call it.",
            '⚙ calculator(expression="6*7")',
            turn[4],
            "The tool has answered; I will pass its result on.",
            "The result is 42.",
        ], term.text()
        assert re.fullmatch(r"  ↳ 42 · [0-9.]+ m?s", turn[4]), turn[4]

        raw = "".join(term.raw)
        # the spinner was drawn before the first token came, then erased
        assert raw.index("waiting for the answer") < raw.index("asks "), raw
        assert "waiting for the answer" not in term.text()
        # thinking dimmed (SGR 2), the answer not
        assert "2" in _style_at(raw, raw.index("asks ")), raw
        assert "2" not in _style_at(raw, raw.rindex("42.")), raw

        term.child.sendeof()  # Ctrl-D on the empty prompt
        assert await term.exit_status() == 0

    # the turn ran as `user`, with a token signed by the dev's secret
    status, body = await api.request("GET", f"/v1/conversations/{conversation_id}")
    assert status == 200 and body["title"] == "calculate 6*7", body


async def test_ctrl_c_stops_a_long_answer_and_a_second_ctrl_c_quits(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    with terminal("chat", env=env) as term:
        await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
        term.type_line("[[tokens=4000]]")
        typed = await term.until_row(lambda r: r == "you> [[tokens=4000]]", "the message")
        await term.until_row(lambda r: " 30 " in r, "the answer streaming", after=typed)
        term.ctrl_c()
        stopped = await term.until_row(lambda r: r == STOPPED, "the stopped turn", after=typed)
        await term.prompt_after(stopped)
        numbers, others = numbers_between(term, typed, stopped)
        assert numbers == list(range(len(numbers))), numbers  # in order, none twice
        assert 30 < len(numbers) < 4000, len(numbers)
        assert others[-1] == "stopping the answer… (Ctrl-C again quits)", others
        conversation_id = conversation_id_on(term)

        term.ctrl_c()  # on the empty prompt: quits
        assert await term.exit_status() in (0, 130)

    await projected(conversation_id)
    status, body = await api.request("GET", f"/v1/conversations/{conversation_id}/messages")
    assert status == 200, body
    answer = body["messages"][-1]
    assert answer["status"] == "cancelled", answer
    # what the terminal showed is what was kept
    assert answer["content"][0]["content"].split() == [str(n) for n in numbers]


async def test_two_ctrl_c_in_a_row_quit_and_the_answer_stops_on_the_server(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    with terminal("chat", env=env) as term:
        await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
        term.type_line("[[tokens=4000]]")
        typed = await term.until_row(lambda r: r == "you> [[tokens=4000]]", "the message")
        await term.until_row(lambda r: " 20 " in r, "the answer streaming", after=typed)
        conversation_id = conversation_id_on(term)
        term.ctrl_c()
        # a person's second press, not one in the same instant (two SIGINTs that close
        # together arrive as one): mid-turn or at the prompt, it quits
        await term.until_row(lambda r: r.startswith("stopping the answer"), "the notice")
        term.ctrl_c()
        assert await term.exit_status() in (0, 130)
    await projected(conversation_id)
    _, body = await api.request("GET", f"/v1/conversations/{conversation_id}/messages")
    assert body["messages"][-1]["status"] == "cancelled", body


async def test_conversation_option_shows_recent_messages_then_continues(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    conversation_id = (await api.create_conversation())["id"]
    events = await api.send_stream(conversation_id, "hello history")
    assert events[-1].data == "ok"
    await projected(conversation_id)
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    with terminal("chat", "--conversation", conversation_id, env=env) as term:
        answered = await term.until_row(
            lambda r: r.startswith('You said: "hello history". I am parley'), "the history"
        )
        first_prompt = await term.prompt_after(answered)
        shown = [row for row in term.rows()[:first_prompt] if row]
        assert shown[:4] == [
            f"conversation {conversation_id}",
            "── hello history ──",
            "you> hello history",
            'The user wrote "hello history". I will answer briefly and repeat it back.',
        ], term.text()
        assert len(shown) == 5, term.text()
        assert shown[4].startswith('You said: "hello history". I am parley'), shown[4]

        term.type_line("second message")
        answer = await term.until_row(
            lambda r: r.startswith('You said: "second message"'), "the second answer"
        )
        await term.prompt_after(answer)
        term.ctrl_c()
        assert await term.exit_status() in (0, 130)

    await projected(conversation_id)
    _, body = await api.request("GET", f"/v1/conversations/{conversation_id}/messages")
    contents = [m["content"][-1]["content"] for m in body["messages"]]
    assert len(contents) == 4 and contents[2] == "second message", contents


async def test_conversation_option_joins_an_answer_still_being_written_and_can_stop_it(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    conversation_id = (await api.create_conversation())["id"]
    # 50 s of answer, which outlasts the client's start on a loaded machine; the test
    # stops it as soon as the client shows it
    await api.send_json(conversation_id, "[[tokens=20000]]")
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    with terminal("chat", "--conversation", conversation_id, env=env) as term:
        asked = await term.until_row(lambda r: r == "you> [[tokens=20000]]", "the history")
        await term.until_row(lambda r: " 3 " in r, "the answer", after=asked)
        term.ctrl_c()
        stopped = await term.until_row(lambda r: r == STOPPED, "the stopped turn", after=asked)
        await term.prompt_after(stopped)
        numbers, _ = numbers_between(term, asked, stopped)
        assert numbers == list(range(len(numbers))) and numbers, numbers  # from its start, once
        term.ctrl_c()
        assert await term.exit_status() in (0, 130)
    await projected(conversation_id)
    _, body = await api.request("GET", f"/v1/conversations/{conversation_id}/messages")
    assert body["messages"][-1]["status"] == "cancelled", body


class CuttingProxy:
    """A TCP proxy in front of the edge that can drop every connection through it at once,
    as a flaky network does. It keeps what clients sent, to see how they came back."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sent: list[bytearray] = []  # client -> server bytes, per connection
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""
        self.down = False  # every new connection is dropped at once, as by an edge away

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        sent = bytearray()
        self.sent.append(sent)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, log: bytearray | None
        ) -> None:
            try:
                while data := await source.read(65536):
                    if log is not None:
                        log += data
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass  # cut: the other side's reader sees it too
            finally:
                sink.close()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(pump(reader, up_writer, sent))
            tasks.create_task(pump(up_reader, writer, None))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CuttingProxy]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            server.close()
            self.cut()
            await server.wait_closed()


async def test_a_dropped_connection_is_resumed_with_every_token_exactly_once(
    services: Services, user: str
) -> None:
    count = 1000  # 2.5 s at the test model's 400 tokens/s: the cut lands mid-answer
    async with CuttingProxy(services.edge_url).running() as proxy:
        env = chat_env(PARLEY_URL=proxy.url, PARLEY_TOKEN=token_for(user))
        with terminal("chat", env=env) as term:
            await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
            term.type_line(f"[[tokens={count}]]")
            typed = await term.until_row(lambda r: r == f"you> [[tokens={count}]]", "the message")
            await term.until_row(lambda r: " 40 " in r, "the answer streaming", after=typed)
            # (the number alone: the edge's port in the header may hold its digits)
            last = re.compile(rf"(?<![\d:]){count - 1}(?!\d)")
            assert not last.search(term.text()), "the answer ended before the cut"
            proxy.cut()
            notice = await term.until_row(
                lambda r: r.startswith("⟳ connection lost"), "the resume notice", after=typed
            )
            end = await term.prompt_after(notice)
            numbers, others = numbers_between(term, typed, end)
            assert numbers == list(range(count)), numbers
            assert others == [
                f"conversation {conversation_id_on(term)} "
                f"(continue it later: parley chat --conversation {conversation_id_on(term)})",
                f"── [[tokens={count}]] ──",
                "⟳ connection lost (the connection was cut); resuming",
            ], others
            conversation_id = conversation_id_on(term)
            term.ctrl_c()
            assert await term.exit_status() in (0, 130)

    sent = [bytes(s) for s in proxy.sent]
    posts = [s for s in sent if f"POST /v1/conversations/{conversation_id}/messages".encode() in s]
    assert len(posts) == 1, "resumed by asking again instead of reading on"
    resumes = [s for s in sent if f"GET /v1/conversations/{conversation_id}/events".encode() in s]
    assert len(resumes) == 1, sent
    assert re.search(rb"(?i)last-event-id: [0-9]+\r\n", resumes[0]), resumes[0]


async def test_ctrl_c_while_the_edge_is_away_stops_the_answer_once_it_is_back(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    async with CuttingProxy(services.edge_url).running() as proxy:
        env = chat_env(PARLEY_URL=proxy.url, PARLEY_TOKEN=token_for(user))
        with terminal("chat", env=env) as term:
            await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
            term.type_line("[[tokens=8000]]")  # 20 s at the test model's pace
            typed = await term.until_row(lambda r: r == "you> [[tokens=8000]]", "the message")
            await term.until_row(lambda r: " 30 " in r, "the answer streaming", after=typed)
            conversation_id = conversation_id_on(term)
            proxy.down = True
            proxy.cut()
            lost = await term.until_row(
                lambda r: r.startswith("⟳ connection lost"), "the resume notice", after=typed
            )
            term.ctrl_c()  # the stop cannot reach the edge now
            await term.until_row(lambda r: r.startswith("could not"), "the failed stop", after=lost)
            proxy.down = False
            stopped = await term.until_row(lambda r: r == STOPPED, "the stopped turn", after=lost)
            await term.prompt_after(stopped)
            numbers, _ = numbers_between(term, typed, stopped)
            assert numbers == list(range(len(numbers))) and len(numbers) < 8000, numbers
            term.ctrl_c()
            assert await term.exit_status() in (0, 130)
    await projected(conversation_id)
    _, body = await api.request("GET", f"/v1/conversations/{conversation_id}/messages")
    assert body["messages"][-1]["status"] == "cancelled", body


async def _run_chat(*args: str, env: dict[str, str], lines: str = "") -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "parley.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        out, err = await process.communicate(lines.encode())
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def test_chat_says_plainly_when_it_has_no_server_or_its_token_is_refused(
    services: Services, tmp_path: Path, user: str
) -> None:
    code, said = await _run_chat("--data", str(tmp_path), "chat", env=chat_env())
    assert code == 2 and "PARLEY_URL" in said and "parley dev" in said, said
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN="not-a-token")
    code, said = await _run_chat("chat", env=env)
    assert code == 2 and "unauthorized" in said and "Traceback" not in said, said
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    code, said = await _run_chat("chat", "--conversation", "01M8GGRZF5FGDZ57JN7PPQBC8X", env=env)
    assert code == 2 and "not found" in said, said
    # a server that does not answer: 1, as every command's
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
        env = chat_env(PARLEY_URL=nobody, PARLEY_TOKEN=token_for(user))
        code, said = await _run_chat("chat", env=env)
        assert code == 1 and f"cannot reach {nobody}: cannot connect" in said, said
        assert "Traceback" not in said, said


async def test_piped_chat_exits_non_zero_when_an_answer_failed(
    services: Services, user: str
) -> None:
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    code, said = await _run_chat("chat", env=env, lines="hello [[tokens=2]]\n")
    assert code == 0 and "0 1" in said, said
    code, said = await _run_chat(
        "chat", env=env, lines="hello [[tokens=2]]\nnow fail [[fail=500]]\n"
    )
    assert code == 1 and "0 1" in said, said


async def test_a_message_refused_while_too_many_wait_is_sent_once_one_ends(
    stack: Servers, services: Services, api: SseClient, user: str
) -> None:
    # an edge where one message at a time may wait for its answer: the chat's is refused
    # (429) while another is answered, and goes once that one has ended
    turns = EdgeLimits(rate_per_s=0, max_streams_per_user=0, max_turns_per_user=1)
    async with extra_edge(stack, limits=turns) as edge:
        other = (await api.create_conversation())["id"]
        await api.send_json(other, "a long one [[tokens=2000]]")  # 5 s at the test pace
        env = chat_env(PARLEY_URL=edge, PARLEY_TOKEN=token_for(user))
        code, said = await _run_chat("chat", env=env, lines="mine [[tokens=3]]\n")
    assert code == 0 and "\n0 1 2" in said, said
    assert "⟳ the server cannot take this now (at most 1 " in said, said
    assert "connection lost" not in said and "resuming" not in said, said


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
async def test_a_chat_ended_by_a_signal_mid_answer_gives_the_terminal_back(
    services: Services, user: str, signum: int
) -> None:
    """`kill` (SIGTERM) or a closed window (SIGHUP) while an answer streamed ended the
    process on the spot, with the terminal's echo still off: the shell it returned to
    showed nothing that was typed. `stty -a` run after it on the same terminal says."""
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    command = f"{sys.executable} -m parley.cli chat; echo EXIT=$?; stty -a"
    child = pexpect.spawn(
        "/bin/sh", ["-c", command], env=env, encoding="utf-8", dimensions=(ROWS, COLUMNS)
    )
    try:
        await asyncio.to_thread(child.expect, "you>", timeout=WAIT_S)
        child.send("[[tokens=4000]]\r")
        await asyncio.to_thread(child.expect, " 30 ", timeout=WAIT_S)
        proc = Path(f"/proc/{child.pid}/task/{child.pid}/children")
        children = (await asyncio.to_thread(proc.read_text)).split()
        os.kill(int(children[0]), signum)
        await asyncio.to_thread(child.expect, r"EXIT=(\d+)", timeout=WAIT_S)
        assert isinstance(child.match, re.Match)
        status = int(child.match.group(1))
        await asyncio.to_thread(child.expect, r"\s(-?echo)\s", timeout=WAIT_S)
        assert isinstance(child.match, re.Match)
        echo = child.match.group(1)
    finally:
        child.close(force=True)
    assert (status, echo) == (128 + signum, "echo")


async def test_typed_at_a_terminal_with_the_output_written_to_a_file(
    services: Services, user: str, tmp_path: Path
) -> None:
    """`parley chat > log`: the file gets the plain conversation, not a line editor's
    prompt and redraws; the keyboard still types (the terminal echoes the line)."""
    log = tmp_path / "chat.log"
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    command = f"exec {sys.executable} -m parley.cli chat > {log}"
    child = pexpect.spawn("/bin/sh", ["-c", command], env=env, encoding="utf-8")
    try:
        child.send("hello [[tokens=3]]\r")

        def answered() -> None:
            deadline = time.monotonic() + WAIT_S
            while "0 1 2" not in (log.read_text() if log.exists() else ""):
                assert time.monotonic() < deadline, log.read_text() if log.exists() else ""
                time.sleep(0.05)

        await asyncio.to_thread(answered)
        child.sendeof()
        await asyncio.to_thread(child.expect, pexpect.EOF, timeout=WAIT_S)
        echoed = str(child.before)
    finally:
        child.close(force=True)
    written = log.read_text()
    assert child.exitstatus == 0, (child.exitstatus, written)
    assert "hello [[tokens=3]]" in echoed, echoed  # what was typed was seen
    assert "you>" not in written and "\r" not in written and "\x1b" not in written, repr(written)
    lines = written.splitlines()
    assert lines[2:] == ["── hello [[tokens=3]] ──", "0 1 2 "], written


def piped_chat(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`parley chat` with its input, output and errors on pipes of the test's."""
    return subprocess.Popen(
        [sys.executable, "-m", "parley.cli", "chat"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_piped_chat_whose_reader_leaves_ends_quietly(services: Services, user: str) -> None:
    """`parley chat | head`: no traceback when head has read enough."""
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))

    def chat_into_a_reader_that_leaves() -> tuple[int, str]:
        process = piped_chat(env)
        assert process.stdin and process.stdout and process.stderr
        process.stdin.write(b"count [[tokens=400]] [[rate=100]]\n")
        process.stdin.close()
        process.stdout.readline()  # the answer has begun
        process.stdout.close()  # and its reader goes
        code = process.wait(WAIT_S)
        return code, process.stderr.read().decode()

    code, said = await asyncio.to_thread(chat_into_a_reader_that_leaves)
    assert code == 0 and "Traceback" not in said, said


async def test_piped_chat_ends_at_ctrl_c_while_its_input_is_open_and_silent(
    services: Services, user: str
) -> None:
    """A script that keeps its pipe open: Ctrl-C between messages ends the chat at once,
    not when the next line (or the pipe's end) comes."""
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))

    def interrupted_between_messages() -> tuple[int | None, str]:
        process = piped_chat(env)
        assert process.stdin and process.stdout and process.stderr
        try:
            process.stdin.write(b"hello [[tokens=3]]\n")
            process.stdin.flush()
            seen = b""
            while b"0 1 2" not in seen:  # the answer, in full
                seen += os.read(process.stdout.fileno(), 4096) or b"!"
                assert not seen.endswith(b"!"), seen
            # again until it ends: one that comes as the turn's stream closes is the turn's
            for _ in range(20):
                process.send_signal(signal.SIGINT)
                try:
                    return process.wait(0.5), process.stderr.read().decode()
                except subprocess.TimeoutExpired:
                    continue
            return None, "still running 10 s after Ctrl-C"
        finally:
            process.kill()
            process.stdin.close()

    code, said = await asyncio.to_thread(interrupted_between_messages)
    assert code is not None and "Traceback" not in said, said


async def test_piped_chat_exits_non_zero_when_its_message_was_never_sent(
    demo_model_url: str, user: str
) -> None:
    # a server that is up but makes no conversation (here: a model server, not parley)
    elsewhere = demo_model_url.removesuffix("/v1")
    env = chat_env(PARLEY_URL=elsewhere, PARLEY_TOKEN=token_for(user))
    code, said = await _run_chat("chat", env=env, lines="hello\n")
    assert code == 1 and "could not start a conversation" in said, said


# A title (OSC 0), a clear screen, a colour, a clipboard write (OSC 52), and C1's CSI:
# in a message the demo model repeats, so they come back in its thinking and answer, and
# in the title made from it.
_ESCAPES = "hi \x1b]0;PWNED\x07 \x1b[2J\x1b[31mred \u009b32mgreen \x1b]52;c;cHduZWQ=\x07 end"


async def test_escape_sequences_in_an_answer_are_shown_not_obeyed(
    services: Services, api: SseClient, user: str, projected: Projected
) -> None:
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    # streamed live, written to a pipe
    code, said = await _run_chat("chat", env=env, lines=_ESCAPES + "\n")
    assert code == 0, said
    assert "\x1b" not in said and "\x9b" not in said and "\x07" not in said, repr(said)
    assert 'You said: "hi ␛]0;PWNED␇ ␛[2J␛[31mred \ufffd32mgreen' in said, said

    # and from the history, on a terminal: the title, the message, thinking and answer
    conversation_id = (await api.create_conversation())["id"]
    events = await api.send_stream(conversation_id, _ESCAPES)
    assert events[-1].data == "ok"
    await projected(conversation_id)
    with terminal("chat", "--conversation", conversation_id, env=env) as term:
        answered = await term.until_row(lambda r: r.startswith("You said:"), "the history")
        await term.prompt_after(answered)
        raw = "".join(term.raw)
        for sequence in ("\x1b]0;", "\x1b]52;", "\x1b[2J", "\x1b[31m", "\x9b"):
            assert sequence not in raw, (sequence, raw)
        assert term.screen.title == "", term.screen.title
        rows = term.rows()
        assert rows[0] == f"conversation {conversation_id}", term.text()  # not cleared
        assert "you> hi ␛]0;PWNED␇ ␛[2J␛[31mred \ufffd32mgreen ␛]52;c;cHduZWQ=␇ end" in rows
        term.ctrl_c()
        assert await term.exit_status() in (0, 130)


async def test_a_conversation_deleted_elsewhere_is_left_for_a_new_one(
    services: Services, api: SseClient, user: str
) -> None:
    # Deleted in the page (or by the API) while the chat was on it: every message
    # after was refused with "conversation not found", for as long as the chat ran.
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    with terminal("chat", env=env) as term:
        await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
        term.type_line("hello")
        answer = await term.until_row(lambda r: r.startswith("You said:"), "the answer")
        await term.prompt_after(answer)
        first = conversation_id_on(term)
        status, _ = await api.request("DELETE", f"/v1/conversations/{first}")
        assert status == 202

        term.type_line("are you there?")
        gone = await term.until_row(lambda r: "is not there any more" in r, "the notice")
        assert term.rows()[gone] == (
            f"conversation {first} is not there any more (deleted elsewhere?); "
            "your next message starts a new one"
        ), term.text()
        prompt = await term.prompt_after(gone)
        term.type_line("hello again")
        started = await term.until_row(
            lambda r: r.startswith("conversation ") and first not in r, "a new conversation", prompt
        )
        answer = await term.until_row(lambda r: r.startswith("You said:"), "its answer", started)
        await term.prompt_after(answer)
        assert "hello again" in term.rows()[answer], term.text()
        term.child.sendeof()
        assert await term.exit_status() == 0


async def test_a_token_that_expires_mid_answer_says_what_to_do(
    services: Services, user: str
) -> None:
    # The edge ends a stream when its token expires and refuses it after: the chat said
    # "error: token expired", and the same for every message typed after it.
    short = mint(SECRET, user, ttl_s=-25)  # refused 5 s from now (30 s of leeway)
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=short)
    with terminal("chat", env=env) as term:
        await term.until_row(lambda r: r == PROMPT_ROW, "the first prompt")
        term.type_line("[[tokens=4000]] count")  # 10 s at 400 tokens/s
        said = await term.until_row(lambda r: r.startswith("error: token expired"), "the refusal")
        conversation_id = conversation_id_on(term)
        assert term.rows()[said].endswith(
            ": the server no longer takes this token; start parley chat again with a fresh"
            " one (--token or PARLEY_TOKEN); the answer goes on there: parley chat"
            f" --conversation {conversation_id}"
        ), term.text()
        assert "(request id " in term.rows()[said]
        await term.prompt_after(said)
        term.ctrl_c()
        assert await term.exit_status() in (0, 130)


async def test_an_error_the_chat_reports_names_the_request_that_failed(
    services: Services, user: str
) -> None:
    """What a person copies from the terminal into a report names the request (the
    edge's X-Request-Id): the operator finds its log lines by that id."""
    env = chat_env(PARLEY_URL=services.edge_url, PARLEY_TOKEN=token_for(user))
    code, said = await _run_chat("chat", "--conversation", "01M8GGRZF5FGDZ57JN7PPQBC8X", env=env)
    assert code == 2 and "not found (request id " in said, said
