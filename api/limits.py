"""Per-user limits a public endpoint needs, kept in Redis so every edge counts together.

- **Rate**: a token bucket per user (`rate_per_s` sustained, `rate_burst` at
  once), one Lua script, Redis's own clock, so edges with skewed clocks agree.
  Over it: 429 `rate_limited` with `Retry-After`. If Redis cannot be reached the
  request goes through (logged): losing the limiter must not take the API down
  with it; the routes that need Redis answer 503 on their own.
- **Open streams**: at most `max_streams_per_user` SSE responses at once.
- **Turns**: at most `max_turns_per_user` messages whose turn has not ended.

The two caps are leases: a sorted set per user and kind whose members expire
(`lease_s`) unless the edge holding them renews them, so an edge that dies frees
its users' slots within a lease instead of holding them for ever. A stream's
lease lives as long as its request. A message's lease is taken before its
command is published and handed, once published, to a `TurnWatcher`: a
subscription to the conversation's hub with no socket, which releases it when
the turn ends (its `done`, a rejection, or the stall check's verdict), whether
or not anyone still watches the stream. An edge that stops waits for those turns
as for its turn streams (`Hubs.drain`, within its grace); a slot whose turn runs
on past that is not released but left to lapse, as a dead edge's: released, it
let the user start as many turns again while theirs still ran on the workers.

What may not enter: the routes themselves. Routes that stream or start turns
are listed in `STREAM_ROUTES` and `TURN_ROUTES`; the middleware does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from api.config import EdgeLimits
from api.context import CLAIMS, CONFIG, METRICS, claims_of, wants_json
from api.errors import ApiError, Handler
from api.hub import Delivery, Hubs, PendingCommand, Subscription, TurnFilter, watch
from api.sse import Envelope, Position
from events.errors import describe
from events.ids import new_id

log = logging.getLogger(__name__)

# Requests that answer with an SSE stream: always, or unless the client asks for JSON.
STREAM_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/conversations/{id}/events"): "always",
    ("POST", "/v1/conversations/{id}/messages"): "unless_json",
    ("PATCH", "/v1/conversations/{id}/messages/{mid}"): "unless_json",
    ("POST", "/v1/conversations/{id}/messages/{mid}/regenerate"): "unless_json",
    ("POST", "/v1/ai-sdk/chat"): "always",
    ("GET", "/v1/ai-sdk/chat/{id}/stream"): "always",
}
# Requests that may start a turn; the handler hands the slot over with `hold_turn`.
TURN_ROUTES = frozenset(
    {
        ("POST", "/v1/conversations/{id}/messages"),
        ("PATCH", "/v1/conversations/{id}/messages/{mid}"),
        ("POST", "/v1/conversations/{id}/messages/{mid}/regenerate"),
        ("POST", "/v1/ai-sdk/chat"),
    }
)

_REPLICATE = "if redis.replicate_commands then redis.replicate_commands() end\n"
_NOW_MS = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# A request's admission in one round trip: the user's rate, then the caps it
# asks for. KEYS: the rate bucket, the user's stream leases, their turn leases.
# ARGV: rate per second (0: none), burst, lease ms, then the stream lease's
# member and cap, the turn lease's member and cap (member "": not asked).
# Returns {verdict, ms to wait}: 0 admitted (the leases asked for are held),
# 1 over the rate, 2 at the streams cap (nothing held), 3 at the turns cap (the
# stream's lease, if asked, is held: the request may be a retry of a message
# whose turn is counted already, which only its route can tell).
_ADMIT = (
    _REPLICATE
    + _NOW_MS
    + """
local rate, burst, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil or ts == nil then tokens, ts = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  local wait = 0
  if tokens >= 1 then
    tokens = tokens - 1
  else
    wait = math.ceil((1 - tokens) * 1000 / rate)
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
  if wait > 0 then return {1, wait} end
end
local function full(key, member, cap)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return cap > 0 and not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= cap
end
local streams, turns = ARGV[4], ARGV[6]
if streams ~= '' and full(KEYS[2], streams, tonumber(ARGV[5])) then return {2, 0} end
local verdict = 0
if turns ~= '' and full(KEYS[3], turns, tonumber(ARGV[7])) then verdict, turns = 3, '' end
for i, member in ipairs({streams, turns}) do
  if member ~= '' then
    redis.call('ZADD', KEYS[i + 1], now + lease, member)
    redis.call('PEXPIRE', KEYS[i + 1], 2 * lease)
  end
end
return {verdict, 0}
"""
)

# A turn's lease handed from the request that took it to the message it is for:
# KEYS: the user's turn leases; ARGV: lease ms, the request's member ("" if it
# took none: a retry at the cap), the message's. Every edge holding a lease for
# the same message holds the same member, so a retry through another edge counts
# once.
_HAND_OVER = (
    _REPLICATE
    + _NOW_MS
    + """
local lease = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], 2 * lease)
return 1
"""
)

# KEYS: leases; ARGV[1] lease ms, then one member per key. Renews them, and puts
# back those Redis lost (a flush, a restart without its data, an outage longer than
# a lease, whose next admission dropped them as lapsed): they are held still.
_RENEW = (
    _REPLICATE
    + _NOW_MS
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * lease)
end
return #KEYS
"""
)


class Leases:
    """Capped sets of leases per user, renewed while this process holds them."""

    def __init__(self, client: aioredis.Redis, lease_s: float) -> None:
        self._client = client
        self.lease_ms = int(lease_s * 1000)
        self.renew_every_s = lease_s / 3
        self._renew = client.register_script(_RENEW)
        self._hand_over = client.register_script(_HAND_OVER)
        self.held: dict[tuple[str, str], None] = {}  # (key, member), insertion-ordered
        # no longer renewed, nor released: left to lapse (`forget`)
        self._lapsing: set[tuple[str, str]] = set()

    @staticmethod
    def key(kind: str, user_id: str) -> str:
        return f"parley:lease:{kind}:{user_id}"

    async def hand_over(self, kind: str, user_id: str, member: str | None, to: str) -> None:
        """The lease `member` (None: none was taken) held from now on as `to`."""
        key = self.key(kind, user_id)
        # before the round trip, as `release`: a renewal under way then removes again
        # what it put back
        self.held[(key, to)] = None
        if member is not None:
            self.held.pop((key, member), None)
        await self._hand_over(keys=[key], args=[self.lease_ms, member or "", to])

    def forget(self, kind: str, user_id: str, *members: str | None) -> None:
        """Renew these leases no more: they lapse within `lease_s`."""
        key = self.key(kind, user_id)
        for member in members:
            if member is not None:
                self.held.pop((key, member), None)
                self._lapsing.add((key, member))

    async def release(self, kind: str, user_id: str, member: str) -> None:
        key = self.key(kind, user_id)
        self.held.pop((key, member), None)
        await self._client.zrem(key, member)

    async def renew(self) -> None:
        held = list(self.held)
        for start in range(0, len(held), 500):
            part = held[start : start + 500]
            await self._renew(
                keys=[key for key, _ in part], args=[self.lease_ms, *(m for _, m in part)]
            )
            # Released (or handed over) while the renewal was on its way: its ZREM may
            # have gone first, and the renewal put the lease back.
            released: dict[str, list[str]] = {}
            for key, member in part:
                if (key, member) not in self.held and (key, member) not in self._lapsing:
                    released.setdefault(key, []).append(member)
            for key, members in released.items():
                await self._client.zrem(key, *members)

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew this process's leases until `stopping`."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_every_s):
                    await stopping.wait()
            try:
                await self.renew()
            except _REDIS_DOWN as err:
                log.warning("cannot renew leases", extra={"error": describe(err)})


class TurnWatcher(Subscription):
    """Holds a user's turn slot until the turn that answers their message ends."""

    __slots__ = ()
    for_a_client = False

    def take(self, delivery: Delivery) -> None:
        if self.turn is not None and self.turn.admit(delivery.stored) and delivery.ends_turn:
            self.end("done")

    def take_stall(self, error: Envelope) -> None:
        self.end("stalled")

    def finishes_at_stop(self) -> bool:
        return True  # its turn's end is near, as for a POST's stream: a stop waits for it


class TurnSlot:
    """The turn slot a request took (`member`), or None when the user was at the cap;
    `hold_turn` hands it to a watcher."""

    __slots__ = ("handed", "member")

    def __init__(self, member: str | None) -> None:
        self.member = member
        self.handed = False


class Admission(msgspec.Struct, frozen=True):
    """A request let in (`refused` None), or which limit refused it and when to retry."""

    refused: str | None = None  # "rate", "streams", "turns"
    wait_s: float = 0.0


_REFUSALS: tuple[str | None, ...] = (None, "rate", "streams", "turns")


class Limits:
    """The edge's limiter and leases, and the watchers that hold turn slots."""

    def __init__(
        self,
        client: aioredis.Redis,
        hubs: Hubs,
        *,
        rate_per_s: float,
        burst: int,
        lease_s: float,
        max_turn_s: float = 3600.0,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.leases = Leases(client, lease_s)
        self._admit = client.register_script(_ADMIT)
        self._hubs = hubs
        self._max_turn_s = max_turn_s
        self._watchers: dict[str, asyncio.Task[None]] = {}  # by message id
        self._stopping = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    async def admit(
        self,
        user_id: str,
        *,
        stream: str | None,
        streams_cap: int,
        turn: str | None,
        turns_cap: int,
        rate: bool = True,
    ) -> Admission:
        """The user's rate (unless `rate` is False: a request let in once already) and
        the caps this request asks for (a lease member for each), checked and taken in
        one round trip; the leases are held only if admitted."""
        rate_per_s = self.rate_per_s if rate else 0.0
        if rate_per_s <= 0 and stream is None and turn is None:
            return Admission()
        leases = self.leases
        verdict, wait_ms = await self._admit(
            keys=[
                f"parley:rate:{user_id}",
                leases.key("streams", user_id),
                leases.key("turns", user_id),
            ],
            args=[
                rate_per_s,
                self.burst,
                leases.lease_ms,
                stream or "",
                streams_cap,
                turn or "",
                turns_cap,
            ],
        )
        refused = _REFUSALS[int(verdict)]
        if refused in (None, "turns"):  # at the turns cap the stream's lease is held
            for kind, member in (("streams", stream), ("turns", turn if refused is None else None)):
                if member is not None:
                    leases.held[(leases.key(kind, user_id), member)] = None
        return Admission(refused=refused, wait_s=int(wait_ms) / 1000)

    def start(self) -> None:
        self._keeper = asyncio.create_task(self.leases.keep(self._stopping), name="lease-keeper")

    async def close(self) -> None:
        self._stopping.set()
        watchers = list(self._watchers.values())
        if watchers:
            # The edge's drain ended every watcher: those whose turn ended are freeing
            # its slot (a round trip), which a cancel would cut short for a lapse.
            await asyncio.wait(watchers, timeout=_RELEASE_WAIT_S)
        tasks = [*self._watchers.values(), *([self._keeper] if self._keeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def watching(self, message_id: str) -> bool:
        return message_id in self._watchers

    def watch(
        self,
        user_id: str,
        member: str | None,
        conversation_id: str,
        after: int,
        message_id: str,
        command: PendingCommand,
    ) -> None:
        task = asyncio.create_task(
            self._watch(user_id, member, conversation_id, after, message_id, command),
            name=f"turn-slot-{message_id}",
        )
        self._watchers[message_id] = task
        task.add_done_callback(lambda _: self._watchers.pop(message_id, None))

    async def _watch(
        self,
        user_id: str,
        member: str | None,
        conversation_id: str,
        after: int,
        message_id: str,
        command: PendingCommand,
    ) -> None:
        turn = TurnFilter(message_id)
        seen = after
        # False while the turn may still run: a watcher the edge's stop ended (or
        # cancelled) leaves the slot to lapse instead of freeing it for a new turn
        ended = False
        try:
            try:
                await self.leases.hand_over("turns", user_id, member, message_id)
            except _REDIS_DOWN as err:
                log.warning("cannot hand a turn slot over", extra={"error": describe(err)})
            async with asyncio.timeout(self._max_turn_s):
                while True:
                    watcher = TurnWatcher(Position(seq=seen), turn=turn, command=command)
                    reason = await self._follow(conversation_id, watcher)
                    if reason == "stopping":
                        return
                    if reason != "broken":
                        ended = True
                        return
                    seen = max(seen, watcher.seen)
                    await asyncio.sleep(1.0)  # the broker is back soon; look again
        except TimeoutError:
            ended = True
            log.warning(
                "turn slot held too long; released", extra={"conversation_id": conversation_id}
            )
        finally:
            if ended:
                await self._release_turn(user_id, member, message_id)
            else:
                self.leases.forget("turns", user_id, member, message_id)

    async def _release_turn(self, user_id: str, member: str | None, message_id: str) -> None:
        try:
            await self.leases.release("turns", user_id, message_id)
            if member is not None:
                await self.leases.release("turns", user_id, member)  # if not handed over
        except _REDIS_DOWN as err:
            log.warning("cannot release a turn slot; it expires", extra={"error": describe(err)})

    async def _follow(self, conversation_id: str, watcher: TurnWatcher) -> str:
        return await watch(self._hubs, conversation_id, watcher)


LIMITS = web.AppKey("limits", Limits)
TURN_SLOT = web.RequestKey("turn_slot", TurnSlot)


def hold_turn(
    request: web.Request, conversation_id: str, message_id: str, after: int, command_seq: int
) -> None:
    """Called by a route once a message's command is published: the user's turn slot
    stays taken until that message's turn ends (see the module docstring)."""
    slot = request.get(TURN_SLOT)
    limits = request.app[LIMITS]
    if slot is None or limits.watching(message_id):
        return  # no cap, or a retry of a message already watched here: the slot is freed
    # a retry through another edge: the same member as there, so the turn counts once
    slot.handed = True
    limits.watch(
        request[CLAIMS].sub,
        slot.member,
        conversation_id,
        after,
        message_id,
        PendingCommand(stream_seq=command_seq),
    )


# Redis away, hung, or answering but refusing: full (`maxmemory` reached, OOM), a
# replica (READONLY), or unable to persist (MISCONF). Any of them loosens the
# limits; none may turn into a 500 for every request (a script's refusal arrives
# as a plain ResponseError: "Error running script ... -OOM ...").
_REDIS_DOWN = (redis.exceptions.RedisError, TimeoutError)
# How long a new message at the turns cap waits for a slot that is being freed, and
# how often it looks (`refuse_at_cap`)
TURN_WAIT_S = 1.0
_TURN_LOOK_S = 0.05
# How long a stopping edge waits for its turn slots' releases before it cancels them
_RELEASE_WAIT_S = 2.0
# How long a request waits for the limits' answer from Redis before it goes through
# unlimited: a Redis that hangs (stopped, swapping) held every request 10 s.
ADMIT_WAIT_S = 0.5


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    claims = request.get(CLAIMS)
    if claims is None:
        return await handler(request)  # a public path
    app = request.app
    config = app[CONFIG]
    limits = app[LIMITS]
    metrics = app[METRICS]
    resource = request.match_info.route.resource
    route = (request.method, resource.canonical if resource is not None else "")
    streams = STREAM_ROUTES.get(route)
    streaming = streams == "always" or (streams is not None and not wants_json(request))
    caps = config.limits
    stream = new_id() if streaming and caps.max_streams_per_user > 0 else None
    turn = new_id() if route in TURN_ROUTES and caps.max_turns_per_user > 0 else None
    try:
        async with asyncio.timeout(ADMIT_WAIT_S):
            admission = await limits.admit(
                claims.sub,
                stream=stream,
                streams_cap=caps.max_streams_per_user,
                turn=turn,
                turns_cap=caps.max_turns_per_user,
            )
    except _REDIS_DOWN as err:
        # Losing Redis loosens limits, it does not stop conversations (README: what
        # degrades while Redis is away): the request goes through, holding nothing.
        log.warning("limits unavailable; request let through", extra={"error": describe(err)})
        admission = Admission()
        stream = turn = None
    if admission.refused == "turns":
        # The stream's lease is held; whether the request starts a turn (or repeats
        # a message whose turn counts already) its route finds out: `refuse_at_cap`.
        request[TURN_SLOT] = TurnSlot(None)
    elif admission.refused is not None:
        metrics.limited(admission.refused)
        raise _refusal(admission, caps)
    elif turn is not None:
        request[TURN_SLOT] = TurnSlot(turn)
    held = [("streams", stream)] if stream is not None else []
    try:
        return await handler(request)
    finally:
        slot = request.get(TURN_SLOT)
        if slot is not None and slot.member is not None and not slot.handed:
            held.append(("turns", slot.member))
        for kind, member in held:
            try:
                await limits.leases.release(kind, claims.sub, member)
            except _REDIS_DOWN as err:
                log.warning("cannot release a lease; it expires", extra={"error": describe(err)})


def at_turns_cap(request: web.Request) -> bool:
    """Whether the user was at the turns cap when the request came in: a new message
    waits for a slot (`refuse_at_cap`)."""
    slot = request.get(TURN_SLOT)
    return slot is not None and slot.member is None


async def refuse_at_cap(request: web.Request) -> None:
    """A request for a new message while the user is at the turns cap: 429, unless a
    slot frees within `TURN_WAIT_S`. (One that repeats a message, its idempotency key
    seen before, is not asked here: its turn is counted already.)

    The wait is for a turn that has just ended: the edge whose watcher frees its slot
    delivered its `done` to the client first, and a client that sends its next message
    at once through another edge could reach Redis before that release (1 in 13 at a
    cap of 1, alternating edges) and be refused below its cap."""
    if not at_turns_cap(request):
        return
    slot = request[TURN_SLOT]
    limits = request.app[LIMITS]
    caps = request.app[CONFIG].limits
    member = new_id()
    deadline = time.monotonic() + TURN_WAIT_S
    while time.monotonic() < deadline:
        await asyncio.sleep(_TURN_LOOK_S)
        try:
            async with asyncio.timeout(ADMIT_WAIT_S):
                admission = await limits.admit(
                    claims_of(request).sub,
                    stream=None,
                    streams_cap=0,
                    turn=member,
                    turns_cap=caps.max_turns_per_user,
                    rate=False,
                )
        except _REDIS_DOWN:
            return  # as any request while Redis is away: through, holding nothing
        if admission.refused is None:
            slot.member = member  # held now, released or handed over as any
            return
    request.app[METRICS].limited("turns")
    raise _refusal(Admission(refused="turns"), caps)


def _refusal(admission: Admission, caps: EdgeLimits) -> ApiError:
    if admission.refused == "rate":
        return ApiError(
            429,
            "rate_limited",
            f"too many requests; at most {caps.rate_per_s:g} per second "
            f"(bursts of {caps.rate_burst}); retry in {admission.wait_s:.2f} s",
            retry_after=math.ceil(admission.wait_s),
        )
    if admission.refused == "streams":
        return ApiError(
            429,
            "too_many_streams",
            f"at most {caps.max_streams_per_user} open event streams per user; close one first",
            retry_after=1,
        )
    return ApiError(
        429,
        "too_many_turns",
        f"at most {caps.max_turns_per_user} messages per user may wait for "
        "their answer at once; wait for one to finish",
        retry_after=1,
    )
