"""Connecting to NATS: one server or several nodes of a cluster, named in one string.

`PARLEY_NATS_URL` holds one URL or a comma-separated list of the nodes of one
cluster (`nats://n1:4222,nats://n2:4222,nats://n3:4222`). The client connects
to the first one that answers, in the order given (so each process can be told
which node it prefers), learns the rest of the cluster from the server, and
moves to another node when its node goes away. What it sent while away is
buffered and goes out on the new connection; a JetStream request that gets no
answer in time is the caller's to retry (events.log does, safely: every append
carries its Nats-Msg-Id).
"""

from __future__ import annotations

from typing import TypeVar

from nats.aio.client import Client as NatsClient

# Between two rounds of attempts over the whole list of nodes.
_RECONNECT_WAIT_S = 1
# A one-shot command gives up after this many rounds (nats.py's own default).
_COMMAND_RECONNECTS = 60

C = TypeVar("C", bound=NatsClient)


def server_list(url: str) -> list[str]:
    """The nodes named in a `PARLEY_NATS_URL`, in order; blanks and spaces ignored."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def connect(url: str, *, name: str, reconnect_forever: bool = True) -> NatsClient:
    """A connection to the server(s) of `url`.

    Roles (edge, worker, projector) reconnect for ever: a broker that is away is
    waited for, never a reason to stop. One-shot commands (`replay`, `audit`)
    pass `reconnect_forever=False` and fail after the client's usual attempts.
    """
    return await connect_client(NatsClient(), url, name=name, reconnect_forever=reconnect_forever)


async def connect_client(client: C, url: str, *, name: str, reconnect_forever: bool = True) -> C:
    """`connect`, for a client of a class of the caller's (the projectors' `EntryClient`,
    projections/feed.py): the same nodes in the same order, the same reconnects."""
    await client.connect(
        servers=server_list(url),
        name=name,
        # The order of the list is the operator's preference, not a suggestion.
        dont_randomize=True,
        reconnect_time_wait=_RECONNECT_WAIT_S,
        max_reconnect_attempts=-1 if reconnect_forever else _COMMAND_RECONNECTS,
    )
    return client
