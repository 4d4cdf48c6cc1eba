"""Snapshots of folded conversations, kept in Redis: a cold actor reads only the log's tail.

A worker keeps the folded state of idle conversations in memory (actors.worker.
IdleStates), but a restarted worker, or one that took a partition over, folds a
conversation from its first event: over a second for a conversation of 1,000
answers (100,000 entries, most of them chunks: `parley bench coldstart`), while
the worker's other conversations wait for the loop. So when an actor leaves a conversation it folded at least
`every` entries past its last snapshot, it writes one: the state and the position
it was folded to. The next actor that has to fold the conversation from the
start, and finds the log longer than one read, reads the snapshot and then only
the entries after it.

A snapshot is a cache, never the truth, so Redis may lose it (a flush, an
eviction, a restart) and the actor folds the log as before. It is used only
when it is certainly what folding the log would give:

- written by the same fold: `fold` is a fingerprint of the code that folds
  (the modules below). A worker of another version ignores it, so a newer
  event an older worker skipped is not lost to a newer one;
- of the same log: the entry at its position must still be this conversation's,
  with the event id it was folded from (a stream deleted and made again, a
  Redis shared by two deployments);
- readable: anything else under its key is ignored and written over.

Entries are immutable and folded in order, so a state folded to position N and
then from N on equals the state folded from the start (tests/test_snapshots.py
checks that for generated logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import zlib
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

import actors.content
import actors.sizing
import actors.state
import events.codec
import events.vocabulary
from actors.state import Conversation, state_bytes
from events.errors import EventLogError
from events.log import EventLog

log = logging.getLogger(__name__)

_KEY = "parley:snapshot:{}"
# A snapshot neither written nor used this long expires (its conversation folds from
# its start again when it is next used): Redis does not keep every state for ever.
SNAPSHOT_TTL_S = 7 * 24 * 3600
# Entries folded past the last snapshot before the next is written: about 13
# answers of 150 tokens at 20 tokens/s. Folding this many costs some tens of ms.
SNAPSHOT_EVERY = 2_000
# Snapshots larger than this are not written: Redis answers one command at a time,
# and a value of tens of megabytes holds every other client up while it is copied.
MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024
# States of more than this (actors.state.state_bytes) are encoded and decoded in a thread.
_OFF_LOOP_BYTES = 1024 * 1024


class Folded(msgspec.Struct, frozen=True):
    """A conversation folded to a position of the log."""

    state: Conversation
    seq: int = 0  # the last entry folded
    entries: int = 0  # entries folded into it, from the conversation's first
    saved: int = 0  # `entries` of the last snapshot written or read (0: none)
    event_id: str = ""  # the event id of the entry at `seq` ("" if it could not be read)


class Snapshot(msgspec.Struct, frozen=True):
    """What Redis keeps: a folded conversation and the fold that made it."""

    fold: str
    folded: Folded


def _fingerprint(files: tuple[str | None, ...]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes() if file else b"?")
        digest.update(b"\0")
    return digest.hexdigest()[:32]


# The code a state depends on: the fold, the types it folds and keeps, the helpers it
# folds with, and what a snapshot is (this module). A change to any of them makes
# snapshots of older code unused.
FOLD_FINGERPRINT = _fingerprint(
    (
        actors.state.__file__,
        actors.content.__file__,
        actors.sizing.__file__,
        events.vocabulary.__file__,
        events.codec.__file__,
        __file__,
    )
)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Snapshot).decode


def encode_snapshot(folded: Folded, fold: str = FOLD_FINGERPRINT) -> bytes:
    return zlib.compress(_encode(Snapshot(fold=fold, folded=folded)), 1)


def decode_snapshot(data: bytes, fold: str = FOLD_FINGERPRINT) -> Folded | None:
    """The folded conversation `data` holds, if this fold made it; None for anything else."""
    try:
        snapshot = _decode(zlib.decompress(data))
    except (zlib.error, msgspec.DecodeError, ValueError, TypeError):
        return None
    return snapshot.folded if snapshot.fold == fold else None


def worth_saving(folded: Folded, every: int) -> bool:
    """Whether a snapshot of `folded` saves a later actor enough reading to be written:
    `every` entries past the last, nothing running (a running turn's state is about to
    change, and its streamed pieces are a list as long as the turn), the entry at its
    position known."""
    return (
        folded.entries - folded.saved >= every
        and folded.state.exists
        and folded.state.active is None
        and bool(folded.event_id)
    )


class SnapshotStore:
    """Reads and writes snapshots; never raises (a snapshot is only ever a shortcut)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        every: int = SNAPSHOT_EVERY,
        ttl_s: int = SNAPSHOT_TTL_S,
        max_bytes: int = MAX_SNAPSHOT_BYTES,
    ) -> None:
        self.redis = redis
        self.every = every
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes

    async def load(self, conversation_id: str, event_log: EventLog) -> Folded | None:
        """The conversation's snapshot, if there is one it can be folded on from. None
        while snapshots are off (0 `every`): those written before live on for a week,
        and snapshots turned off must be out of the way at once."""
        if self.every <= 0:
            return None
        try:
            data = await self.redis.get(_KEY.format(conversation_id))
        except redis.exceptions.RedisError as err:
            log.info(
                "no snapshot read: Redis is away",
                extra={"conversation_id": conversation_id, "error": repr(err)},
            )
            return None
        if not isinstance(data, bytes):
            return None  # none (or a client that decodes replies, which parley's does not)
        if len(data) > _OFF_LOOP_BYTES // 4:  # compressed: about a quarter of the state
            folded = await asyncio.to_thread(decode_snapshot, data)
        else:
            folded = decode_snapshot(data)
        if folded is None or folded.state.conversation_id != conversation_id:
            log.info(
                "snapshot of another fold or unreadable: not used",
                extra={"conversation_id": conversation_id},
            )
            return None
        try:
            at = await event_log.at(folded.seq)
        except EventLogError:
            return None  # the log is away: the caller's read fails the same way
        event = None if at is None else at.event
        if (
            not isinstance(event, events.vocabulary.Event)
            or event.conversation_id != conversation_id
            or event.event_id != folded.event_id
        ):
            log.warning(
                "snapshot not of this log: not used",
                extra={"conversation_id": conversation_id, "seq": folded.seq},
            )
            return None
        # in use: it lasts another SNAPSHOT_TTL_S from now, not from when it was written
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.redis.expire(_KEY.format(conversation_id), self.ttl_s)
        return msgspec.structs.replace(folded, saved=folded.entries)

    async def forget(self, conversation_id: str) -> None:
        """Remove the conversation's snapshot (it holds the conversation's content) when
        the conversation is deleted. Raises RedisError while Redis is away: the delete
        is tried again, not left with its content in Redis for a week."""
        await self.redis.delete(_KEY.format(conversation_id))

    def due(self, folded: Folded) -> bool:
        """Whether `folded` is worth a snapshot (`worth_saving`); 0 `every`: never."""
        return self.every > 0 and worth_saving(folded, self.every)

    async def save(self, folded: Folded) -> bool:
        """Write a snapshot of `folded`; whether it was written."""
        cid = folded.state.conversation_id
        # A state of many megabytes takes milliseconds to compress: off the loop, which
        # every other conversation of the worker is waiting on.
        try:
            if state_bytes(folded.state) > _OFF_LOOP_BYTES:
                data = await asyncio.to_thread(encode_snapshot, folded)
            else:
                data = encode_snapshot(folded)
        except Exception:
            # Only a shortcut: a state it cannot encode (a bug) must not take the
            # worker's other conversations down with it. Said loudly, and skipped.
            log.exception(
                "snapshot not written: its state cannot be encoded", extra={"conversation_id": cid}
            )
            return False
        if len(data) > self.max_bytes:
            log.info(
                "no snapshot written: larger than a Redis value should be",
                extra={"conversation_id": cid, "bytes": len(data)},
            )
            return False
        try:
            await self.redis.set(_KEY.format(cid), data, ex=self.ttl_s)
        except redis.exceptions.RedisError as err:
            log.info(
                "no snapshot written: Redis is away or full",
                extra={"conversation_id": cid, "error": repr(err)},
            )
            return False
        return True
