"""Generated interleavings against the running system: a hypothesis state machine
that drives the session's real edge, workers, projector and demo model through the
HTTP routes only, and checks what the log, the read models and the streams say.

One user, one funded project, two conversations in it. The rules are what a
client does (README, "Turns: messages, cancel, busy conversations, versions"):
send a message with each `on_busy`, as JSON or as a stream, with or without an
`idempotency_key` (and the same key again, also while the first is in
flight, in a burst of requests sent at once); drop a keyed stream and send it
again with its last id, as fetch-based clients reconnect; cancel; regenerate an answer; edit a
user message, old versions and ones deep in history included; read the messages
(all versions, a page at a time); open the events stream from an earlier id; and
wait until the conversations are idle. After each wait, and at the end:

- every request the edge accepted ended exactly once in the log (its turn ran and
  ended), or was refused there as README documents; a stream got that end as its
  `done`; a 409 `busy` came only while something ran; one key made one message;
- the log itself: turns never overlap, each ends once, a `busy` refusal only
  while a turn ran or requests waited, nothing left waiting;
- the projected messages equal the log folded (ids, versions, latest, fork
  origins, the content and tokens of ended turns), one latest per version group,
  nothing latest hanging off a message that is not; paged reads equal the whole;
- an events stream resumed from any id got every later turn event once, in
  order, through the `done` it ended at;
- `message_count`, `token_usage_total`, the ledger and the account's balance
  agree with the log; no conversation shows an active turn once idle.

Hypothesis runs in a thread of its own; each step hands its requests to the
session's event loop, where the servers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from events.ids import new_id
from parley.services import Services
from tests.conftest import Projected, token_for
from tests.sse import SseClient, SseEvent, read_sse

T = TypeVar("T")

# What the demo model answers: fast, slow enough to be interrupted mid-answer, failing
# after a few chunks, with a tool round.
ANSWERS = {
    "fast": "[[tokens=3]]",
    "slow": "[[tokens=30]] [[rate=40]]",
    "failing": "[[tokens=6]] [[fail=error]]",
    "tool": "calculate 6*7",
}
END_TYPES = frozenset({"done", "cancelled", "failed", "billing_rejected"})
DONE_OF_END = {
    "done": "ok",
    "cancelled": "stopped",
    "failed": "error",
    "billing_rejected": "billing_error",
}
# log entries an events stream shows, each under its own id
SHOWN = frozenset({"started", "chunk", "tool_call", "tool_result", "title", *END_TYPES})
STEP_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 30.0

OnBusy = Literal["reject", "enqueue", "interrupt"]
Accept = Literal["json", "sse"]
# Every rule draws the same whatever the servers answered (hypothesis replays
# draws): a message to act on is picked by an index into what exists then.
WHICH = st.sampled_from([0, 1])
ON_BUSY = st.sampled_from(["reject", "enqueue", "interrupt"])
ACCEPT = st.sampled_from(["json", "sse"])
KEY = st.sampled_from(["none", "new", "again"])
PICK = st.integers(0, 1_000)


@dataclass
class Stream:
    """A stream read to its end in the background: its events, and how it ended."""

    events: list[SseEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    error: str | None = None

    def done_data(self) -> Any:
        return self.events[-1].data if self.events and self.events[-1].event == "done" else None


@dataclass
class Request:
    """A request for a turn that the edge accepted (202, or 200 and a stream)."""

    kind: Literal["send", "edit", "regenerate"]
    conversation: str
    accept: Accept
    on_busy: OnBusy
    content: str | None  # send and edit: unique, how a streamed one is found in the log
    key: str | None
    command_id: str | None = None  # JSON answers name it
    message_id: str | None = None
    stream: Stream | None = None


@dataclass
class LoggedMessage:
    message_id: str
    role: str
    group: str
    version: int
    parent: str | None
    latest: bool = True
    fork_origin: bool = False
    content: list[dict[str, str]] | None = None
    tokens: tuple[int, int] | None = None
    seq: int = 0


@dataclass
class Log:
    entries: list[dict[str, Any]]

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["type"] in types]

    def messages(self) -> dict[str, LoggedMessage]:
        """The log folded to its messages, by the log's own fields alone."""
        out: dict[str, LoggedMessage] = {}
        for e in self.entries:
            if e["type"] in ("user_message", "started"):
                mid = e["message_id"] if e["type"] == "user_message" else e["turn_id"]
                role = "user" if e["type"] == "user_message" else "assistant"
                for m in out.values():
                    if m.group == e["version_group_id"] or m.message_id in e["supersedes"]:
                        m.latest = False
                    if m.message_id == e["fork_origin"]:
                        m.fork_origin = True
                out[mid] = LoggedMessage(
                    mid,
                    role,
                    e["version_group_id"],
                    e["version_number"],
                    e["parent_message_id"],
                    seq=e["seq"],
                )
                if role == "user":
                    out[mid].content = [{"role": "user", "content": e["content"]}]
            elif e["type"] in ("done", "cancelled", "failed"):
                m = out[e["turn_id"]]
                if not e.get("content_parts"):
                    m.content = e["content"]
                m.tokens = (e["input_tokens"], e["output_tokens"])
        return out


def ended_turns(log: Log) -> dict[str, list[dict[str, Any]]]:
    ends: dict[str, list[dict[str, Any]]] = {}
    for e in log.of_type(*END_TYPES):
        ends.setdefault(e["turn_id"], []).append(e)
    return ends


def check_log(log: Log) -> None:
    """What holds of any conversation's log: turns never overlap and end once, a busy
    refusal only while something ran or waited, one request per idempotency key."""
    open_turn: str | None = None
    waiting: set[str] = set()
    ended: set[str] = set()
    for e in log.entries:
        kind = e["type"]
        if kind in ("user_message", "answer_requested"):
            waiting.add(e["command_id"])
        elif kind == "started":
            assert open_turn is None, f"turn {e['turn_id']} started while {open_turn} ran"
            assert e["turn_id"] not in ended, e
            open_turn = e["turn_id"]
            waiting.discard(e["command_id"])
        elif kind in END_TYPES:
            assert e["turn_id"] not in ended, f"turn {e['turn_id']} ended twice"
            ended.add(e["turn_id"])
            if e["turn_id"] == open_turn:
                open_turn = None
        elif kind == "command_rejected":
            if e["code"] == "busy":
                assert open_turn is not None or waiting, f"refused as busy while idle: {e}"
            waiting.discard(e["command_id"])
    assert open_turn is None, f"turn {open_turn} never ended"
    assert not waiting, f"requests accepted and never answered: {waiting}"
    keys = Counter(
        e["request_key"]
        for e in log.of_type("user_message", "answer_requested")
        if e.get("request_key")
    )
    assert all(n == 1 for n in keys.values()), f"one key, two requests: {keys}"


# what the requests were answered, for a look at what a run covered (pytest -s)
OUTCOMES: Counter[str] = Counter()


def check_answer(events: list[SseEvent], end: dict[str, Any]) -> None:
    """A turn's stream carried its answer once: its tokens are the answer its end holds."""
    if end["type"] == "billing_rejected" or end.get("content_parts"):
        return
    streamed = "".join(e.data for e in events if e.event == "token")
    stored = "".join(b["content"] for b in end["content"] if b["role"] == "assistant")
    assert streamed == stored, (streamed, stored)


def event_position(event_id: str) -> tuple[int, int]:
    """An SSE id in order: an entry's seq, with "-n" for the n-th of the events one
    entry makes but its last (which has the seq alone)."""
    seq, _, nth = event_id.partition("-")
    return int(seq), int(nth) if nth else 1 << 30


async def _finished() -> asyncio.Task[None]:
    """A task already done, for a stream read to its end in the step itself."""

    async def nothing() -> None:
        pass

    task = asyncio.get_running_loop().create_task(nothing())
    await task
    return task


class LiveHistories(RuleBasedStateMachine):
    """Set up by `run_live_histories` with the session's servers and its loop."""

    services: Services
    http: aiohttp.ClientSession
    projected: Projected
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.numbers = itertools.count(1)
        self.requests: list[Request] = []
        self.viewers: list[tuple[str, int, Stream]] = []
        self.keys: dict[str, tuple[str, Request]] = {}  # key -> its content, first request
        self.idle: dict[str, bool] = {}
        self.granted = 0

    # --------------------------------------------------------- plumbing

    def run(self, coroutine: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                return await coroutine

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result()

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await self.api.request(method, path, **kwargs)

    def log(self, conversation: str) -> Log:
        status, body = self.run(self._raw(f"/v1/conversations/{conversation}/log"))
        assert status == 200, (status, body)
        return Log([json.loads(line) for line in body.splitlines() if line.strip()])

    async def _raw(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.api.url(path), headers=self.api.headers()) as response:
            return response.status, await response.text()

    def stream_in_background(
        self, response: aiohttp.ClientResponse, before: list[SseEvent] | None = None
    ) -> Stream:
        stream = Stream(events=list(before or []))

        async def read() -> None:
            try:
                async for item in read_sse(response):
                    if isinstance(item, SseEvent):
                        stream.events.append(item)
            except (TimeoutError, aiohttp.ClientError) as err:
                stream.error = repr(err)
            finally:
                response.release()

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(read())

        stream.task = self.run(start())
        return stream

    # --------------------------------------------------------- setup

    @initialize()
    def start(self) -> None:
        self.user = f"u-{new_id()}"
        self.api = SseClient(self.http, self.services.edge_url, token_for(self.user))
        admin = SseClient(self.http, self.services.edge_url, token_for("admin", admin=True))
        status, project = self.run(self.call("POST", "/v1/projects", json={"name": "Live"}))
        assert status == 201, project
        self.project = project["id"]
        self.granted = 1_000_000_000
        status, body = self.run(
            admin.request(
                "POST",
                f"/v1/billing/accounts/project/{self.project}/credits",
                json={"micro_credits": self.granted},
            )
        )
        assert status == 201, body
        self.conversations: list[str] = [
            str(self.run(self.api.create_conversation(project_id=self.project))["id"])
            for _ in range(2)
        ]
        self.idle = {c: True for c in self.conversations}

    def conversation(self, which: int) -> str:
        return self.conversations[which]

    # --------------------------------------------------------- rules

    def _turn_request(
        self,
        kind: Literal["send", "edit", "regenerate"],
        conversation: str,
        method: str,
        path: str,
        body: dict[str, Any],
        accept: Accept,
        on_busy: OnBusy,
        content: str | None,
        key: str | None,
    ) -> None:
        body = {**body, "on_busy": on_busy}
        if key is not None:
            body["idempotency_key"] = key
        was_idle = self.idle[conversation]
        request = Request(kind, conversation, accept, on_busy, content, key)
        if accept == "json":
            status, answer = self.run(
                self.call(method, path, json=body, headers={"Accept": "application/json"})
            )
            if status == 202:
                assert answer["accepted"] is True, answer
                request.command_id = answer["command_id"]
                request.message_id = answer["message_id"]
        else:

            async def open_stream() -> tuple[int, Any, aiohttp.ClientResponse | None]:
                response = await self.http.request(
                    method,
                    self.api.url(path),
                    json=body,
                    headers=self.api.headers(Accept="text/event-stream"),
                )
                if response.status == 200:
                    return 200, None, response
                async with response:
                    text = await response.text()
                return response.status, json.loads(text) if text else None, None

            status, answer, response = self.run(open_stream())
            if response is not None:
                request.stream = self.stream_in_background(response)
        OUTCOMES[f"{kind} {accept} {on_busy} {status}"] += 1
        if status in (200, 202):
            self.requests.append(request)
            self.idle[conversation] = False
            if kind == "send" and key is not None and key not in self.keys:
                self.keys[key] = (json.dumps(body, sort_keys=True), request)
            return
        if status == 204:  # a repeat of a keyed request whose turn it saw end
            assert key is not None and key in self.keys, (status, body)
            return
        assert status in (409, 422), (status, answer)
        code = answer["error"]["code"]
        if status == 422:
            assert code == "idempotency_mismatch", answer
            assert key is not None
            assert kind != "send" or self.keys[key][0] != json.dumps(body, sort_keys=True)
            return
        assert code in ("busy", "superseded"), answer
        if code == "busy":
            assert on_busy == "reject", answer
            assert not was_idle, f"409 busy on an idle conversation: {answer}"

    def _key(self, choice: str, pick: int) -> str | None:
        """No key, a new one, or (`again`) one sent before, if any."""
        if choice == "none":
            return None
        if choice == "again" and self.keys:
            return sorted(self.keys)[pick % len(self.keys)]
        return f"k-{next(self.numbers)}"

    @rule(
        which=WHICH,
        answer=st.sampled_from(sorted(ANSWERS)),
        on_busy=ON_BUSY,
        accept=ACCEPT,
        key=KEY,
        pick=PICK,
        same=st.booleans(),
    )
    def send(
        self,
        which: int,
        answer: str,
        on_busy: OnBusy,
        accept: Accept,
        key: str,
        pick: int,
        same: bool,
    ) -> None:
        OUTCOMES["rule send"] += 1
        conversation = self.conversation(which)
        idempotency_key = self._key(key, pick)
        content = f"{ANSWERS[answer]} q{next(self.numbers)}"
        if idempotency_key in self.keys:  # the same request again, mostly; else a mismatch
            earlier = json.loads(self.keys[idempotency_key][0])
            if same and "content" in earlier:
                content, on_busy = earlier["content"], earlier["on_busy"]
                conversation = self.keys[idempotency_key][1].conversation
        self._turn_request(
            "send",
            conversation,
            "POST",
            f"/v1/conversations/{conversation}/messages",
            {"content": content},
            accept,
            on_busy,
            content,
            idempotency_key,
        )

    @rule(which=WHICH, on_busy=ON_BUSY, accept=ACCEPT, keyed=st.booleans(), pick=PICK)
    def regenerate(
        self, which: int, on_busy: OnBusy, accept: Accept, keyed: bool, pick: int
    ) -> None:
        OUTCOMES["rule regenerate"] += 1
        conversation = self.conversation(which)
        answers = [e["turn_id"] for e in self.log(conversation).of_type("started")]
        if not answers:
            return
        target = answers[pick % len(answers)]
        self._turn_request(
            "regenerate",
            conversation,
            "POST",
            f"/v1/conversations/{conversation}/messages/{target}/regenerate",
            {},
            accept,
            on_busy,
            None,
            self._key("new" if keyed else "none", 0),
        )

    @rule(
        which=WHICH,
        answer=st.sampled_from(sorted(ANSWERS)),
        on_busy=ON_BUSY,
        accept=ACCEPT,
        keyed=st.booleans(),
        pick=PICK,
    )
    def edit(
        self, which: int, answer: str, on_busy: OnBusy, accept: Accept, keyed: bool, pick: int
    ) -> None:
        OUTCOMES["rule edit"] += 1
        conversation = self.conversation(which)
        questions = [e["message_id"] for e in self.log(conversation).of_type("user_message")]
        if not questions:
            return
        target = questions[pick % len(questions)]
        content = f"{ANSWERS[answer]} e{next(self.numbers)}"
        self._turn_request(
            "edit",
            conversation,
            "PATCH",
            f"/v1/conversations/{conversation}/messages/{target}",
            {"content": content},
            accept,
            on_busy,
            content,
            self._key("new" if keyed else "none", 0),
        )

    @rule(which=WHICH, answer=st.sampled_from(sorted(ANSWERS)), after=st.integers(1, 12))
    def reconnect_stream(self, which: int, answer: str, after: int) -> None:
        """A fetch-based client's reconnect: a keyed stream dropped after a few events,
        the same POST again with the last id it saw; the two together are the turn's
        stream, each event once."""
        OUTCOMES["rule reconnect_stream"] += 1
        conversation = self.conversation(which)
        key = f"k-{next(self.numbers)}"
        content = f"{ANSWERS[answer]} r{next(self.numbers)}"
        body = {"content": content, "on_busy": "enqueue", "idempotency_key": key}
        path = self.api.url(f"/v1/conversations/{conversation}/messages")

        async def first() -> list[SseEvent]:
            headers = self.api.headers(Accept="text/event-stream")
            async with self.http.post(path, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                events: list[SseEvent] = []
                async for item in read_sse(response):
                    if isinstance(item, SseEvent):
                        events.append(item)
                        if len(events) >= after or item.event == "done":
                            break
                return events

        seen = self.run(first())
        self.idle[conversation] = False
        request = Request("send", conversation, "sse", "enqueue", content, key)
        self.keys[key] = (json.dumps(body, sort_keys=True), request)
        last = next((e.id for e in reversed(seen) if e.id), None)
        if last is None:
            request.stream = Stream(events=seen, task=self.run(_finished()))
            self.requests.append(request)
            return

        async def again() -> tuple[int, aiohttp.ClientResponse | None]:
            headers = self.api.headers(Accept="text/event-stream", **{"Last-Event-ID": last})
            response = await self.http.post(path, json=body, headers=headers)
            if response.status == 200:
                return 200, response
            async with response:
                return response.status, None

        status, response = self.run(again())
        if seen[-1].event == "done":
            assert status == 204, status
            request.stream = Stream(events=seen, task=self.run(_finished()))
        else:
            assert status == 200 and response is not None, status
            request.stream = self.stream_in_background(response, seen)
        self.requests.append(request)

    @rule(
        which=WHICH,
        burst=st.lists(
            st.tuples(ON_BUSY, ACCEPT, st.sampled_from(sorted(ANSWERS)), st.integers(0, 2)),
            min_size=2,
            max_size=4,
        ),
    )
    def burst(self, which: int, burst: list[tuple[OnBusy, Accept, str, int]]) -> None:
        """Requests sent at once, as clients do: some of them the same keyed request
        (a retry sent while the first was still in flight)."""
        OUTCOMES["rule burst"] += 1
        conversation = self.conversation(which)
        shared = [f"k-{next(self.numbers)}" for _ in range(3)]
        shared_content = {k: f"{ANSWERS['slow']} b{next(self.numbers)}" for k in shared}
        requests: list[tuple[dict[str, Any], Accept, str | None]] = []
        for on_busy, accept, answer, keyed in burst:
            key = shared[keyed] if keyed else None
            content = shared_content[key] if key else f"{ANSWERS[answer]} b{next(self.numbers)}"
            body: dict[str, Any] = {"content": content, "on_busy": "enqueue" if key else on_busy}
            if key:
                body["idempotency_key"] = key
            requests.append((body, accept, key))
        path = self.api.url(f"/v1/conversations/{conversation}/messages")

        async def one(
            body: dict[str, Any], accept: Accept
        ) -> tuple[int, Any, aiohttp.ClientResponse | None]:
            kind = "application/json" if accept == "json" else "text/event-stream"
            response = await self.http.post(path, json=body, headers=self.api.headers(Accept=kind))
            if response.status == 200:
                return 200, None, response
            async with response:
                text = await response.text()
            return response.status, json.loads(text) if text else None, None

        async def all_at_once() -> list[tuple[int, Any, aiohttp.ClientResponse | None]]:
            return list(await asyncio.gather(*(one(b, a) for b, a, _ in requests)))

        for (body, accept, key), (status, answer, response) in zip(
            requests, self.run(all_at_once()), strict=True
        ):
            OUTCOMES[f"burst {accept} {body['on_busy']} {status}"] += 1
            request = Request("send", conversation, accept, body["on_busy"], body["content"], key)
            if status in (200, 202):
                if response is not None:
                    request.stream = self.stream_in_background(response)
                else:
                    assert answer["accepted"] is True, answer
                    request.command_id = answer["command_id"]
                    request.message_id = answer["message_id"]
                self.requests.append(request)
                self.idle[conversation] = False
                if key is not None and key not in self.keys:
                    self.keys[key] = (json.dumps(body, sort_keys=True), request)
                continue
            assert status == 409 and answer["error"]["code"] == "busy", (status, answer)
            assert body["on_busy"] == "reject", answer

    @rule(which=WHICH)
    def cancel(self, which: int) -> None:
        OUTCOMES["rule cancel"] += 1
        conversation = self.conversation(which)
        status, body = self.run(self.call("POST", f"/v1/conversations/{conversation}/cancel"))
        assert status in (200, 202), (status, body)
        if self.idle[conversation]:
            assert status == 200 and body["cancelled"] is False, body

    @rule(which=WHICH, limit=st.integers(1, 4))
    def read_messages(self, which: int, limit: int) -> None:
        OUTCOMES["rule read_messages"] += 1
        conversation = self.conversation(which)
        status, whole = self.run(
            self.call("GET", f"/v1/conversations/{conversation}/messages?versions=all")
        )
        assert status == 200, whole
        ids = [m["id"] for m in whole["messages"]]
        assert len(ids) == len(set(ids)), ids
        # each event is projected in one transaction: this holds mid-turn too
        by_id = {m["id"]: m for m in whole["messages"]}
        latest = [m for m in whole["messages"] if m["is_latest"]]
        groups = Counter(m["version_group_id"] for m in latest)
        assert all(n == 1 for n in groups.values()), groups
        for m in latest:
            parent = m["parent_message_id"]
            assert parent is None or by_id[parent]["is_latest"], (m, by_id.get(parent))
        if self.idle[conversation]:  # nothing is added between the pages
            assert self.paged(conversation, limit) == whole["messages"]

    def paged(self, conversation: str, limit: int) -> list[dict[str, Any]]:
        pages: list[list[dict[str, Any]]] = []
        before: str | None = None
        while True:
            params = f"versions=all&limit={limit}" + (f"&before={before}" if before else "")
            status, page = self.run(
                self.call("GET", f"/v1/conversations/{conversation}/messages?{params}")
            )
            assert status == 200, page
            assert len(page["messages"]) <= limit
            pages.insert(0, page["messages"])
            before = page["next"]
            if before is None:
                return [m for p in pages for m in p]

    @rule(which=WHICH, header=st.booleans(), pick=PICK)
    def resume_events(self, which: int, header: bool, pick: int) -> None:
        OUTCOMES["rule resume_events"] += 1
        conversation = self.conversation(which)
        log = self.log(conversation)
        ends = [e["seq"] for e in log.of_type(*END_TYPES)]
        if not ends:
            return
        # from anywhere before the last turn's end: it reaches a `done` at least
        seqs = [e["seq"] for e in log.entries if e["seq"] < ends[-1]]
        position = seqs[pick % len(seqs)]

        async def open_events() -> aiohttp.ClientResponse:
            headers = self.api.headers(Accept="text/event-stream")
            params = None
            if header:
                headers["Last-Event-ID"] = str(position)
            else:
                params = {"after": str(position)}
            return await self.http.get(
                self.api.url(f"/v1/conversations/{conversation}/events"),
                headers=headers,
                params=params,
            )

        response = self.run(open_events())
        assert response.status == 200, response.status
        self.viewers.append((conversation, position, self.stream_in_background(response)))

    @rule()
    def wait_until_idle(self) -> None:
        OUTCOMES["rule wait_until_idle"] += 1
        for conversation in self.conversations:
            self.until_idle(conversation)
        self.check()

    def teardown(self) -> None:
        try:
            if hasattr(self, "conversations"):
                for conversation in self.conversations:
                    self.until_idle(conversation)
                self.check()
        finally:
            for stream in [r.stream for r in self.requests] + [v[2] for v in self.viewers]:
                if stream is not None and stream.task is not None:
                    self.loop.call_soon_threadsafe(stream.task.cancel)

    # --------------------------------------------------------- invariants

    def until_idle(self, conversation: str) -> None:
        async def wait() -> None:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                while True:
                    status, body = await self.call("GET", f"/v1/conversations/{conversation}")
                    assert status == 200, body
                    streams = [
                        r.stream
                        for r in self.requests
                        if r.conversation == conversation and r.stream is not None
                    ]
                    if body["active_turn"] is None and all(
                        s.task is not None and s.task.done() for s in streams
                    ):
                        status, text = await self._raw(f"/v1/conversations/{conversation}/log")
                        log = Log([json.loads(line) for line in text.splitlines() if line])
                        started = {e["command_id"] for e in log.of_type("started")}
                        refused = {e["command_id"] for e in log.of_type("command_rejected")}
                        asked = log.of_type("user_message", "answer_requested")
                        ends = ended_turns(log)
                        if all(e["command_id"] in started | refused for e in asked) and all(
                            e["turn_id"] in ends for e in log.of_type("started")
                        ):
                            return
                    await asyncio.sleep(0.05)

        try:
            self.run(wait())
        except TimeoutError:
            raise AssertionError(
                f"{conversation} is still busy after {IDLE_TIMEOUT_S}s: "
                + self.run(self.call("GET", f"/v1/conversations/{conversation}")).__repr__()
            ) from None
        self.idle[conversation] = True

    def check(self) -> None:
        for conversation in self.conversations:
            self.run(self.projected(conversation))
            log = self.log(conversation)
            check_log(log)
            self.check_requests(conversation, log)
            self.check_messages(conversation, log)
            self.check_viewers(conversation, log)
        self.check_billing()

    def check_requests(self, conversation: str, log: Log) -> None:
        started = {e["command_id"]: e for e in log.of_type("started")}
        refused = {e["command_id"]: e for e in log.of_type("command_rejected")}
        by_message = {e["message_id"]: e for e in log.of_type("user_message")}
        by_content: dict[str, list[dict[str, Any]]] = {}
        for e in log.of_type("user_message"):
            by_content.setdefault(e["content"], []).append(e)
        ends = ended_turns(log)
        message_of_key: dict[str, set[str]] = {}
        for r in self.requests:
            if r.conversation != conversation:
                continue
            command_id = r.command_id
            if r.stream is not None:
                assert r.stream.error is None, r.stream.error
                assert r.stream.done_data() is not None, f"stream never got done: {r}"
                ids = [event_position(e.id) for e in r.stream.events if e.id]
                assert ids == sorted(set(ids)), f"events twice or out of order: {ids}"
                turn = next((e.data for e in r.stream.events if e.event == "started"), None)
                if turn is not None:
                    command_id = next(
                        c for c, s in started.items() if s["turn_id"] == turn["turn_id"]
                    )
                elif r.content is not None and r.content in by_content:
                    command_id = by_content[r.content][0]["command_id"]
                else:  # refused in its stream
                    assert r.stream.events[-1].data in ("error", "billing_error"), r
                    continue
            assert command_id is not None
            if r.message_id is not None:
                assert by_message[r.message_id]["command_id"] == command_id, r
            if r.kind != "regenerate" and r.key is not None:
                asked = next(
                    e for e in log.of_type("user_message") if e["command_id"] == command_id
                )
                message_of_key.setdefault(r.key, set()).add(asked["message_id"])
            if command_id in started:
                turn_id = started[command_id]["turn_id"]
                assert len(ends.get(turn_id, [])) == 1, (r, ends.get(turn_id))
                if r.stream is not None:
                    end = ends[turn_id][0]
                    assert r.stream.done_data() == DONE_OF_END[end["type"]], (r, end)
                    check_answer(r.stream.events, end)
            else:
                assert command_id in refused, f"accepted, never started nor refused: {r}"
                if r.stream is not None:
                    assert r.stream.done_data() == "error", r
        for key, messages in message_of_key.items():
            assert len(messages) == 1, f"key {key} made messages {messages}"

    def check_messages(self, conversation: str, log: Log) -> None:
        want = log.messages()
        status, got = self.run(
            self.call("GET", f"/v1/conversations/{conversation}/messages?versions=all")
        )
        assert status == 200, got
        rows = {m["id"]: m for m in got["messages"]}
        assert list(rows) == sorted(want, key=lambda m: want[m].seq), (list(rows), list(want))
        for mid, m in want.items():
            row = rows[mid]
            seen = (
                row["role"],
                row["version_group_id"],
                row["version_number"],
                row["parent_message_id"],
                row["is_latest"],
                row["is_fork_origin"],
            )
            assert seen == (m.role, m.group, m.version, m.parent, m.latest, m.fork_origin), (
                mid,
                seen,
                m,
            )
            if m.content is not None:
                assert row["content"] == m.content, (mid, row["content"], m.content)
            if m.tokens is not None:
                assert (row["input_tokens"], row["output_tokens"]) == m.tokens, (row, m)
        latest = [m for m in want.values() if m.latest]
        groups = Counter(m.group for m in latest)
        assert all(n == 1 for n in groups.values()), groups
        for m in latest:
            if m.parent is not None:
                assert want[m.parent].latest, f"{m.message_id} is latest, its parent is not"
        assert self.paged(conversation, 3) == got["messages"]
        status, detail = self.run(self.call("GET", f"/v1/conversations/{conversation}"))
        assert status == 200, detail
        assert detail["active_turn"] is None, detail
        assert detail["message_count"] == len(latest), (detail, len(latest))
        used = sum(
            e["input_tokens"] + e["output_tokens"]
            for e in log.of_type("done", "cancelled", "failed")
        )
        assert detail["token_usage_total"] == used, (detail, used)

    def check_viewers(self, conversation: str, log: Log) -> None:
        shown = [e["seq"] for e in log.entries if e["type"] in SHOWN]
        for of, position, stream in self.viewers:
            if of != conversation:
                continue
            assert stream.task is not None

            async def finished(task: asyncio.Task[None]) -> None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await asyncio.shield(task)

            self.run(finished(stream.task))
            assert stream.task.done(), f"a stream from {position} never ended"
            assert stream.error is None, stream.error
            assert stream.events and stream.events[-1].event == "done", stream.events[-3:]
            ids = [event_position(e.id) for e in stream.events if e.id]
            assert ids == sorted(set(ids)) and ids[0][0] > position, (position, ids)
            seen = {i[0] for i in ids}
            missed = [s for s in shown if position < s <= ids[-1][0] and s not in seen]
            assert not missed, f"a stream from {position} missed {missed}"
        self.viewers = [v for v in self.viewers if v[0] != conversation]

    def check_billing(self) -> None:
        ends: dict[str, dict[str, Any]] = {}
        prices: dict[str, dict[str, float]] = {}
        for conversation in self.conversations:
            log = self.log(conversation)
            for e in log.of_type("started"):
                prices[e["turn_id"]] = e["prices"]
            for e in log.of_type("done", "cancelled", "failed"):
                ends[e["turn_id"]] = e

        async def ledger() -> list[dict[str, Any]]:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                while True:
                    status, body = await self.call(
                        "GET", f"/v1/billing/ledger?project={self.project}"
                    )
                    assert status == 200, body
                    if len(body["entries"]) >= len(ends):
                        return list(body["entries"])
                    await asyncio.sleep(0.05)

        rows = self.run(ledger())
        assert sorted(r["turn_id"] for r in rows) == sorted(ends), (rows, ends)
        for row in rows:
            end = ends[row["turn_id"]]
            price = prices[row["turn_id"]]
            cost = math.ceil(
                end["input_tokens"] * price["input_price"]
                + end["output_tokens"] * price["output_price"]
            )
            got = (row["input_tokens"], row["output_tokens"], row["cost"], row["turn_end"])
            assert got == (end["input_tokens"], end["output_tokens"], cost, end["type"]), (
                row,
                end,
            )
        status, account = self.run(self.call("GET", f"/v1/billing/accounts/project/{self.project}"))
        assert status == 200, account
        charged = sum(r["cost"] for r in rows)
        assert account["balance_micro_credits"] == self.granted - charged, account
        assert account["reserved_micro_credits"] == 0, account


def run_live_histories(
    services: Services,
    http: aiohttp.ClientSession,
    projected: Projected,
    loop: asyncio.AbstractEventLoop,
    chosen: settings,
) -> None:
    class Machine(LiveHistories):
        pass

    Machine.services = services
    Machine.http = http
    Machine.projected = staticmethod(projected)
    Machine.loop = loop
    run_state_machine_as_test(Machine, settings=chosen)


# Longer runs, to look for bugs: PARLEY_LIVE_HISTORIES=examples,steps[,random]
_EXPLORE = os.environ.get("PARLEY_LIVE_HISTORIES", "").split(",")
COMMITTED = settings(
    max_examples=int(_EXPLORE[0]) if _EXPLORE[0] else 10,
    stateful_step_count=int(_EXPLORE[1]) if len(_EXPLORE) > 1 else 25,
    deadline=None,
    derandomize=len(_EXPLORE) < 3,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


async def test_generated_interleavings_keep_every_invariant(
    services: Services, http: aiohttp.ClientSession, projected: Projected
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(run_live_histories, services, http, projected, loop, COMMITTED)
    if _EXPLORE[0]:
        print(sorted(OUTCOMES.items()))
