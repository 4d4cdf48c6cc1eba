"""Chunk construction: text that piled up while an append was in flight, as few events as can carry it.

Pure: the caller passes the clock reading and the id maker. The writer
(`actors.writer.TurnStream`) hands over everything pending; consecutive text of
one kind becomes one `chunk`, and other events keep their place between runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from events.vocabulary import Chunk, ChunkKind, Event

Pending = Event | tuple[ChunkKind, str]


def coalesce(
    batch: Sequence[Pending],
    conversation_id: str,
    turn_id: str,
    now: int,
    new_id: Callable[[], str],
) -> list[Event]:
    out: list[Event] = []
    run_kind: ChunkKind | None = None
    run: list[str] = []

    def flush() -> None:
        if run_kind is not None and run:
            out.append(
                Chunk(
                    conversation_id=conversation_id,
                    at=now,
                    event_id=new_id(),
                    turn_id=turn_id,
                    kind=run_kind,
                    text="".join(run),
                )
            )

    for item in batch:
        if isinstance(item, tuple):
            kind, text = item
            if kind != run_kind:
                flush()
                run_kind, run = kind, []
            run.append(text)
        else:
            flush()
            run_kind, run = None, []
            out.append(item)
    flush()
    return out
