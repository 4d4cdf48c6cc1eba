"""What an edge keeps by the ten thousand stays out of the garbage collector's passes.

A hub's ring of recent deliveries held 40,000 of them in `parley dev` under
`bench capacity`, and every full collection walked each one: 70-135 ms with
the loop stopped. Deliveries and stored events, like the pieces and messages
of an actor's state, can be part of no cycle, so they are not tracked at all;
this checks that they are not, for a chunk and for a turn's end that carries
a list of content blocks.
"""

from __future__ import annotations

import gc

from actors.state import Message, Piece
from api.hub import Delivery
from events.log import StoredEvent
from events.vocabulary import Chunk, ContentBlock, Done

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
