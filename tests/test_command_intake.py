"""The worker's intake reads, from each delivered command, how many more its
consumer holds (actors.worker.commands_waiting_behind), and fetches exactly those:
a batch fetch asking for more than is there lingers until it expires, which
every command used to pay (20 turns within a second: time to first token p50
30.6 ms before, 14.0 after)."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.js import api

from actors.worker import commands_waiting_behind
from events.ids import new_id


async def test_a_delivered_command_says_how_many_wait_behind_it(nc: NatsClient) -> None:
    js = nc.jetstream()
    name = f"INTAKE_{new_id().upper()}"
    await js.add_stream(name=name, subjects=[f"{name}.>"], storage=api.StorageType.MEMORY)
    try:
        for i in range(3):
            await js.publish(f"{name}.cmd", str(i).encode())
        sub = await js.pull_subscribe(f"{name}.cmd", durable="intake", stream=name)
        [first] = await sub.fetch(1, timeout=1.0)
        assert commands_waiting_behind(first) == 2
        rest = await sub.fetch(commands_waiting_behind(first), timeout=1.0)
        assert [m.data for m in rest] == [b"1", b"2"]
        assert commands_waiting_behind(rest[-1]) == 0
    finally:
        await js.delete_stream(name)
