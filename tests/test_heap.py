"""What an edge keeps by the ten thousand stays out of the garbage collector's passes.

A hub's ring of recent deliveries held 40,000 of them in `parley dev` under
`bench capacity`, and every full collection walked each one: 70-135 ms with
the loop stopped. Deliveries and stored events, like the pieces and messages
of an actor's state, can be part of no cycle, so they are not tracked at all;
this checks that they are not, for a chunk and for a turn's end that carries
a list of content blocks.
"""

from __future__ import annotations

import asyncio
import gc

from actors.state import Message, Piece
from api.hub import Delivery
from events.log import StoredEvent
from events.vocabulary import Chunk, ContentBlock, Done
from parley import loops

CHUNK = Chunk(conversation_id="c", at=1, event_id="e1", turn_id="t", kind="answer", text="hi")
DONE = Done(
    conversation_id="c",
    at=2,
    event_id="e2",
    turn_id="t",
    content=[ContentBlock(role="assistant", content="hi")],
    stop_reason="stop",
    input_tokens=3,
    output_tokens=1,
)


def test_deliveries_and_stored_events_are_not_walked_by_the_collector() -> None:
    deliveries = [Delivery.of(StoredEvent(seq=seq, event=e)) for seq, e in ((1, CHUNK), (2, DONE))]
    gc.collect()  # what is left tracked after a pass stays tracked
    for delivery in deliveries:
        assert not gc.is_tracked(delivery)
        assert not gc.is_tracked(delivery.stored)
        assert not gc.is_tracked(delivery.pieces)
    assert deliveries[1].ends_turn and deliveries[1].ended == "t"


def test_an_actors_pieces_and_messages_are_not_walked_by_the_collector() -> None:
    piece = Piece(kind="answer", text="b", previous=Piece(kind="answer", text="a"))
    message = Message(message_id="m", role="assistant", blocks=(ContentBlock("assistant", "ab"),))
    gc.collect()
    assert not gc.is_tracked(piece) and not gc.is_tracked(piece.previous)
    assert not gc.is_tracked(message)


async def _through_three_awaits(future: asyncio.Future[None]) -> None:
    async def leaf() -> None:
        await future

    async def middle() -> None:
        await leaf()

    await middle()


def test_turns_waiting_in_flight_do_not_set_the_collector_off_every_few_hundred_objects() -> None:
    """parley's processes run (parley/loops.py) with a young generation large enough
    that 2,000 awaits in flight, about 20,000 young objects, make no collection at
    all; at Python's default of 700 they made about fifty, each walking all of them."""
    collected: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    async def in_flight() -> int:
        loop = asyncio.get_running_loop()
        gc.callbacks.append(note)
        try:
            futures = [loop.create_future() for _ in range(2_000)]
            tasks = [asyncio.ensure_future(_through_three_awaits(f)) for f in futures]
            await asyncio.sleep(0)
            young = len(gc.get_objects(generation=0))
            for future in futures:
                future.set_result(None)
            await asyncio.gather(*tasks)
        finally:
            gc.callbacks.remove(note)
        return young

    before = gc.get_threshold()
    young = loops.run(in_flight())
    assert young > 15_000, young
    assert collected == []
    assert gc.get_threshold() == before  # only while parley's loop runs
