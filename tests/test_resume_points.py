"""Generated reconnect points for SSE resume, against the live stack.

A viewer follows a live turn and drops its connection after a generated number
of events, again and again, resuming each time from the last id it saw (by
`Last-Event-ID`, as EventSource does, or by `?after=`), sometimes only after
the turn has ended. Whatever the cut points, what it saw in total is the turn
exactly: every event once, in order, byte for byte what a viewer that never
dropped received.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sse import SseClient, SseEvent, sse_events, until_done

TURNS = st.sampled_from(
    [
        "count [[tokens=120]]",  # plain answer tokens
        "think first [[think]] [[tokens=80]]",  # thinking then answer
        "what time is it [[rounds=2]]",  # tool calls and results between the text
    ]
)
# How many events a connection reads before it drops (0: it drops at once).
CUTS = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6)


async def read_some(
    api: SseClient, cid: str, last: str | None, by_header: bool, limit: int
) -> list[SseEvent]:
    """One connection: up to `limit` events (or through `done`), then hang up."""
    got: list[SseEvent] = []
    resume = {"last_event_id": last} if by_header else {"after": last}
    async with api.events(cid, **resume) as response, asyncio.timeout(30):
        assert response.status == 200, await response.text()
        if limit == 0:
            return got  # connected, and gone before the first event
        async for event in sse_events(response):
            got.append(event)
            if event.event == "done" or len(got) >= limit:
                break
    return got


async def whole_turn(api: SseClient, cid: str, start: str) -> list[SseEvent]:
    """The turn as a viewer that never dropped sees it (waits for its end)."""
    async with api.events(cid, after=start) as response, asyncio.timeout(30):
        return await until_done(response)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=TURNS,
    cuts=CUTS,
    by_header=st.lists(st.booleans(), min_size=6, max_size=6),
    wait_for_the_end=st.booleans(),
)
async def test_a_viewer_cut_off_at_any_points_sees_the_turn_exactly_once(
    api: SseClient, content: str, cuts: list[int], by_header: list[bool], wait_for_the_end: bool
) -> None:
    cid = (await api.create_conversation())["id"]
    sent = await api.send_json(cid, content)
    start = str(sent["after"])

    seen: list[SseEvent] = []
    last: str | None = start
    for i, cut in enumerate(cuts):
        seen.extend(await read_some(api, cid, last, by_header[i], cut))
        last = seen[-1].id if seen else start
        if seen and seen[-1].event == "done":
            break
    reference: list[SseEvent] = []
    if wait_for_the_end:  # the rest is then read from the log, not live
        reference = await whole_turn(api, cid, start)
    if not seen or seen[-1].event != "done":
        async with api.events(cid, after=last) as response, asyncio.timeout(30):
            seen.extend(await until_done(response))
    reference = reference or await whole_turn(api, cid, start)
    assert reference and reference[-1].event == "done"
    ids = [e.id for e in seen]
    assert len(ids) == len(set(ids)), f"events repeated after cuts {cuts}"
    assert ids == [e.id for e in reference], f"events lost or reordered after cuts {cuts}"
    assert [e.raw for e in seen] == [e.raw for e in reference]


async def test_resuming_at_piece_0_of_a_one_piece_end_is_resuming_after_it(
    api: SseClient,
) -> None:
    """`N-0` names the first piece of event N: of a one-piece `done`, all of it, as `N`
    does. The stream closed at once with nothing in it, and EventSource reconnected
    with the same id every second for good."""
    cid = (await api.create_conversation())["id"]
    first = await api.send_stream(cid, "hi [[tokens=2]]")
    assert first[-1].event == "done" and first[-1].id is not None, first[-1]
    end = first[-1].id
    assert "-" not in end, f"expected a one-piece end, saw id {end!r}"
    for resume in ({"after": f"{end}-0"}, {"last_event_id": f"{end}-0"}):
        async with api.events(cid, **resume) as viewer, asyncio.timeout(30):
            assert viewer.status == 200
            await api.send_json(cid, "again [[tokens=2]]")
            seen = await until_done(viewer)
        assert seen[0].event == "started" and seen[-1].data == "ok", [e.event for e in seen]
