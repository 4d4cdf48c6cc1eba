"""The `parley` command line (DESIGN section 7)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import asyncpg
import msgspec
import nats.errors

from actors.models import ModelCatalog
from actors.tools import ToolLoadError
from actors.webhooks import WebhookSettings
from api.auth import mint
from events.broker import BrokerRefused, connect
from events.codec import Unreadable, encode_stored
from events.errors import EventLogUnavailable, StreamMisconfigured
from events.errors import describe as describe_error
from events.log import EventLog, starts_a_conversation
from events.streams import require_jetstream
from events.subjects import valid_id
from events.vocabulary import AnyEvent, Chunk, event_type
from parley import loops
from parley.commands import RUN_FILE, CliError, RunInfo, token_secret
from parley.config import (
    ConfigError,
    Settings,
    data_folder_secret,
    dev_jwt_secret,
    load_catalog,
    load_settings,
)
from parley.logs import setup_logging
from parley.services import ROLES, Servers, ServiceOptions, Services, resolve_servers
from parley.stack import EmbeddedStack, StackError
from projections.db import (
    REFUSALS,
    DatabaseMisconfigured,
    DatabaseUnreachable,
    SchemaMissing,
    create_pool,
    refusal_hint,
)
from projections.store import ReadStore

log = logging.getLogger(__name__)

ADMIN_USER = "admin"
# ---------------------------------------------------------------- dev / serve


def cmd_dev(args: argparse.Namespace) -> int:
    settings = load_settings(args.data)
    catalog = load_catalog(settings)
    stack: EmbeddedStack | None = None
    try:
        if settings.embedded:
            print(
                f"starting NATS, Postgres and Redis under {settings.data_dir} ...", file=sys.stderr
            )
            stack = EmbeddedStack(settings.data_dir)
        with _stop_deferred() as told:
            if stack is not None:
                servers = stack.start()
                if told.is_set():  # the stack is stopped below, as at any stop
                    log.info("stopped while starting", extra={"waiting_for": EMBEDDED_SERVERS})
                    return 0
            else:
                servers = resolve_servers(settings)
            return loops.run(_dev(settings, catalog, servers, args.host, args.port, told))
    except StackError as err:
        raise CliError(f"the embedded stack did not start: {err}") from err
    finally:
        if stack is not None:
            stack.stop()


async def _dev(
    settings: Settings,
    catalog: ModelCatalog,
    servers: Servers,
    host: str,
    port: int,
    told: threading.Event,
) -> int:
    from parley.demo_model import DemoConfig, start_demo_model

    async with contextlib.AsyncExitStack() as stack:
        base_url = settings.model_base_url
        if base_url is None:
            runner, base_url = await start_demo_model(
                "127.0.0.1",
                0,
                DemoConfig(
                    tokens_per_s=settings.demo_tokens_per_s,
                    context_window=settings.demo_context_window or None,
                ),
            )
            stack.push_async_callback(runner.cleanup)
        secret = dev_jwt_secret(settings)
        options = ServiceOptions(
            jwt_secret=secret,
            catalog=catalog,
            model_base_url=base_url,
            model_api_key=settings.model_api_key,
            db_schema=settings.db_schema,
            max_projection_lag=settings.max_projection_lag,
            host=host,
            port=port,
            tool_specs=settings.tools,
            shutdown_grace_s=settings.shutdown_grace_s,
            append_window_s=settings.append_window_ms / 1000,
            append_window_light_s=settings.append_window_light_ms / 1000,
            snapshot_every=settings.snapshot_every,
            webhook=webhook_settings(settings),
            limits=settings.limits,
            cors_origins=settings.cors_origins,
        )
        signals = _StopSignals(told)
        services = Services(servers, options)
        try:
            if not await _start(stack, services, signals):
                return 0
        except BaseException as err:
            signals.close()  # the start failed: the error ends the process
            if isinstance(err, OSError):
                raise CliError(
                    f"cannot listen on {host}:{port}: {err.strerror}; try --port"
                ) from err
            raise
        run_file = settings.data_dir / RUN_FILE
        # with servers named in the environment nothing else has made the folder yet
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_bytes(msgspec.json.encode(RunInfo(services.edge_url, base_url, os.getpid())))
        stack.callback(run_file.unlink, missing_ok=True)
        token = mint(secret, ADMIN_USER, admin=True)
        model_note = "the demo model" if settings.model_base_url is None else base_url
        print(
            f"\nparley is running at {services.edge_url}  (model: {model_note})\n"
            f"admin token:\n{token}\n\n"
            f"try it:\n"
            f"  export TOKEN={token}\n"
            f"  curl -s -H \"Authorization: Bearer $TOKEN\" -X POST {services.edge_url}/v1/conversations -d '{{}}'\n"
            f"or open {services.edge_url}/ and paste the token. Ctrl-C stops everything.\n",
            flush=True,
        )
        await _until_signalled(signals)
    return 0


EMBEDDED_SERVERS = "the embedded servers (NATS, Postgres, Redis)"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopSignals:
    """SIGINT and SIGTERM, heard from before the roles start until a stop begins (then
    a second Ctrl-C ends the process at once, a second SIGTERM is only noted:
    `stopping`)."""

    def __init__(self, told_before: threading.Event | None = None) -> None:
        self.told = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self.told.set)
        if told_before is not None and told_before.is_set():
            self.told.set()  # heard before the loop ran (`_stop_deferred`)

    def close(self) -> None:
        for sig in _STOP_SIGNALS:
            self._loop.remove_signal_handler(sig)

    def stopping(self) -> None:
        """The stop began. Ctrl-C again quits at once (Python's own KeyboardInterrupt).
        SIGTERM again does not cut the stop short: left to its default it killed the
        process on the spot, every stream cut mid-body and every turn left open (a
        supervisor that signals the process group and the process both sends two);
        SIGKILL is there for that."""
        self._loop.remove_signal_handler(signal.SIGINT)
        self._loop.add_signal_handler(signal.SIGTERM, _stopping_already)


def _stopping_already() -> None:
    print("stopping already (SIGTERM again); SIGKILL stops at once", file=sys.stderr)


async def _start(
    stack: contextlib.AsyncExitStack, services: Services, signals: _StopSignals
) -> bool:
    """`services` started, entered on `stack`; False when a stop signal came first.

    A role waits at start for servers that are away or do not answer (README
    "Faults"), so a deploy's SIGTERM or a Ctrl-C may come at any point of it:
    the default handlers ended the process there, 143 (130) and not a word,
    where a stop after the start says what it does and exits 0. Now the start
    is given up (what it made is stopped, as at any stop), one line says so with
    what it waited for, and the process exits 0."""
    entering = asyncio.ensure_future(stack.enter_async_context(services))
    told = asyncio.ensure_future(signals.told.wait())
    try:
        await asyncio.wait({entering, told}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        told.cancel()
        if not entering.done() and not signals.told.is_set():
            entering.cancel()  # cancelled from outside
    if entering.done():
        entering.result()
        return True
    signals.stopping()
    log.info("stopped while starting", extra={"waiting_for": services.starting or "nothing"})
    entering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await entering
    return False


async def _until_signalled(signals: _StopSignals) -> None:
    try:
        await signals.told.wait()
    finally:
        signals.stopping()
        print("stopping ...", file=sys.stderr)


@contextlib.contextmanager
def _stop_deferred() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM, while code that is not the event loop's runs (the embedded
    stack's start, a second or so): the first is noted, for the caller to stop once
    that step is done, and a second stops the process where it stands
    (KeyboardInterrupt). An exception raised by a signal handler lands wherever the
    main thread happens to be, a `finally` or a subprocess's wait among them, where
    it can be swallowed and the start go on, as if no signal had come.
    The event loop's own handlers (`_StopSignals`) take over once it runs."""
    told = threading.Event()

    def note(signum: int, frame: FrameType | None) -> None:
        if told.is_set():
            raise KeyboardInterrupt
        told.set()

    before = {sig: signal.signal(sig, note) for sig in _STOP_SIGNALS}
    try:
        yield told
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def webhook_settings(settings: Settings) -> WebhookSettings | None:
    if settings.webhook_url is None or settings.webhook_secret is None:
        return None
    return WebhookSettings(url=settings.webhook_url, secret=settings.webhook_secret)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.data)
    roles = ROLES if args.role == "all" else (args.role,)
    if "edge" in roles and not (settings.jwt_secret or settings.jwt_jwks_url):
        raise CliError(
            "`parley serve` with the edge role needs PARLEY_JWT_SECRET (at least 32 characters, "
            "the same on every edge) or PARLEY_JWT_JWKS_URL with PARLEY_JWT_ISSUER and "
            "PARLEY_JWT_AUDIENCE: without one, each edge would invent its own secret and refuse "
            "the others' tokens"
        )
    servers = resolve_servers(settings)
    catalog = load_catalog(settings, builtin_demo=False)
    # Only a worker calls models: it needs the shared endpoint for every model that
    # names no base_url of its own (the built-in demo entry among them), which a
    # client may ask for by name. An edge or a projector needs none.
    unserved = [m.name for m in catalog.models if not m.base_url]
    if "worker" in roles and settings.model_base_url is None and unserved:
        raise CliError(
            "`parley serve` with the worker role needs PARLEY_MODEL_BASE_URL, where models "
            f"without a base_url of their own are served ({', '.join(unserved)}); "
            "use `parley dev` for the demo model"
        )

    async def main() -> int:
        options = ServiceOptions(
            jwt_secret=settings.jwt_secret,
            jwks_url=settings.jwt_jwks_url,
            jwt_issuer=settings.jwt_issuer,
            jwt_audience=settings.jwt_audience,
            catalog=catalog,
            model_base_url=settings.model_base_url or "",
            model_api_key=settings.model_api_key,
            db_schema=settings.db_schema,
            max_projection_lag=settings.max_projection_lag,
            host=args.host,
            port=args.port,
            tool_specs=settings.tools,
            shutdown_grace_s=settings.shutdown_grace_s,
            append_window_s=settings.append_window_ms / 1000,
            append_window_light_s=settings.append_window_light_ms / 1000,
            snapshot_every=settings.snapshot_every,
            webhook=webhook_settings(settings),
            limits=settings.limits,
            metrics_port=settings.metrics_port,
            stream_replicas=settings.stream_replicas,
            cors_origins=settings.cors_origins,
        )
        async with contextlib.AsyncExitStack() as stack:
            signals = _StopSignals()
            services = Services(servers, options, roles)
            try:
                if not await _start(stack, services, signals):
                    return 0
            except BaseException:
                signals.close()  # the start failed: the error ends the process
                raise
            if services.edge_url:
                print(f"edge listening at {services.edge_url}", file=sys.stderr, flush=True)
            if services.metrics_url:
                print(f"metrics at {services.metrics_url}", file=sys.stderr, flush=True)
            print(f"roles ready: {', '.join(roles)}", file=sys.stderr, flush=True)
            await _until_signalled(signals)
        return 0

    return loops.run(main())


# ---------------------------------------------------------------- token / replay


def cmd_token(args: argparse.Namespace) -> int:
    if not valid_id(args.user):
        raise CliError("--user must be 1-128 characters of A-Z a-z 0-9 _ -")
    settings = load_settings(args.data)
    print(mint(token_secret(settings), args.user, admin=args.admin))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if not valid_id(args.conversation):
        raise CliError(f"not a conversation id: {args.conversation!r}")
    settings = load_settings(args.data)
    servers = resolve_servers(settings)

    async def main() -> int:
        nc = await connect(
            servers.nats_url,
            name="parley-replay",
            reconnect_forever=False,
            security=servers.nats_security,
        )
        try:
            await require_jetstream(nc.jetstream())
            events = await EventLog(nc.jetstream()).read(args.conversation)
        finally:
            await nc.close()
        if not events:
            print(f"no events for conversation {args.conversation}", file=sys.stderr)
            return 1
        if not starts_a_conversation(events[0].event):
            print(
                f"the log no longer holds the start of conversation {args.conversation}: its"
                f" oldest kept event is {events[0].seq} (the ones before were removed by a"
                " retention limit or a purge of CHAT_EVT); what follows is what is kept",
                file=sys.stderr,
            )
        out = sys.stdout.buffer
        for stored in events:
            if args.json:
                out.write(encode_stored(stored.seq, stored.event) + b"\n")
            else:
                out.write(describe(stored.seq, stored.event).encode() + b"\n")
        out.flush()
        return 0

    return asyncio.run(main())


_SKIP_IN_SUMMARY = frozenset({"conversation_id", "at", "event_id", "schema", "turn_id"})


def describe(seq: int, event: AnyEvent | Unreadable) -> str:
    """One readable line per event: position, time, type, the fields that matter.

    An entry this version cannot read is shown as such, with why and what it holds.
    """
    if isinstance(event, Unreadable):
        raw = event.raw.decode("utf-8", "replace")
        return (
            f"{seq:>8}  {'?':<12}  {'UNREADABLE':<20} type={_short(event.type or '?')}"
            f" error={_short(event.error)} raw={_short(raw, 200)}"
        )
    when = dt.datetime.fromtimestamp(event.at / 1e9, tz=dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    kind = event_type(event)
    if isinstance(event, Chunk):
        detail = f"{event.kind}: {event.text!r}"
    else:
        fields = msgspec.structs.asdict(event)
        detail = " ".join(
            f"{key}={_short(value)}" for key, value in fields.items() if key not in _SKIP_IN_SUMMARY
        )
    return f"{seq:>8}  {when}  {kind:<20} {detail}"


def _short(value: object, limit: int = 80) -> str:
    text = msgspec.json.encode(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- projections


def cmd_projection_errors(args: argparse.Namespace) -> int:
    """Events the projection could not apply as written, and what it did instead."""
    settings = load_settings(args.data)
    servers = resolve_servers(settings)

    async def main() -> int:
        pool = await create_pool(servers.database_url, settings.db_schema, max_size=1, create=False)
        try:
            rows = await ReadStore(pool).projection_errors(limit=args.limit)
        finally:
            await pool.close()
        out = sys.stdout
        if args.json:
            for row in rows:
                out.write(msgspec.json.encode(row).decode() + "\n")
        elif not rows:
            out.write("no projection errors: every event was applied as written\n")
        else:
            for row in rows:
                out.write(
                    f"{row.seq:>8}  {row.projection:<12} {row.rule:<9}  {row.event_type or '?':<18} "
                    f"conversation={row.conversation_id or '?'}\n          {row.reason}\n"
                )
        out.flush()
        return 0

    return asyncio.run(main())


def cmd_audit_billing(args: argparse.Namespace) -> int:
    from parley.audit_command import run_audit

    code: int = run_audit(args)
    return code


def cmd_projection_rebuild(args: argparse.Namespace) -> int:
    from parley.rebuild_command import run_rebuild

    code: int = run_rebuild(args)
    return code


# ---------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace) -> int:
    from parley.chat import run_chat

    code: int = run_chat(args)
    return code


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from parley.bench import run_bench

    if args.conversations is None:
        args.conversations = 100 if args.workload == "burst" else 20
    code: int = run_bench(args)
    return code


# ---------------------------------------------------------------- main


DATA_HELP = "data folder of the dev stack (default .parley, or PARLEY_DATA)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley",
        description="parley: a streaming AI-chat backend on NATS JetStream. "
        "Configuration comes from PARLEY_* environment variables (README: Configuration).",
    )
    parser.add_argument("--data", default=None, help=DATA_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev",
        help="embedded stack + all roles + web page",
        description="Start NATS, Postgres and Redis from their wheels (data under --data), the "
        "demo model unless PARLEY_MODEL_BASE_URL is set, and every role in this process; print "
        "the URL and an admin token. Ctrl-C stops it all.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dev.add_argument("--port", type=port, default=8080, help="port to listen on (default 8080)")
    dev.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser(
        "serve",
        help="one role against configured servers",
        description="Run the edge, worker and/or projector against the servers named by "
        "PARLEY_NATS_URL, PARLEY_DATABASE_URL and PARLEY_REDIS_URL (production). The edge "
        "needs PARLEY_JWT_SECRET or a JWKS; a process without the edge serves /metrics on "
        "PARLEY_METRICS_PORT.",
    )
    serve.add_argument(
        "--role",
        choices=[*ROLES, "all"],
        default="all",
        help="which role this process runs (default all)",
    )
    serve.add_argument(
        "--host", default="0.0.0.0", help="address the edge listens on (default 0.0.0.0)"
    )
    serve.add_argument(
        "--port", type=port, default=8080, help="port the edge listens on (default 8080)"
    )
    serve.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser(
        "token",
        help="print a bearer token for a user",
        description="Print a bearer token (HS256, signed with PARLEY_JWT_SECRET or the secret of "
        "the `parley dev` running on --data) on stdout, nothing else.",
    )
    token.add_argument(
        "--user", required=True, help="the user id (1-128 characters of A-Z a-z 0-9 _ -)"
    )
    token.add_argument(
        "--admin", action="store_true", help="an admin token: may grant credits, nothing more"
    )
    token.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    token.set_defaults(func=cmd_token)

    chat = sub.add_parser(
        "chat",
        help="chat in the terminal, streaming (Ctrl-C stops an answer, twice quits)",
        description="A terminal client on the HTTP/SSE API. It talks to PARLEY_URL, else to "
        "the `parley dev` running on --data; with PARLEY_TOKEN, else a token minted like "
        "`parley token` does.",
    )
    chat.add_argument(
        "--conversation", default=None, metavar="ID", help="continue this conversation"
    )
    chat.add_argument(
        "--url", default=None, help="the edge's base URL (default PARLEY_URL, else the dev's)"
    )
    chat.add_argument(
        "--token", default=None, help="bearer token (default PARLEY_TOKEN, else one minted)"
    )
    chat.add_argument(
        "--user",
        default=ADMIN_USER,
        metavar="ID",
        help=f"whose token to mint when none is given (default {ADMIN_USER}, "
        "the user of the token `parley dev` prints)",
    )
    chat.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    chat.set_defaults(func=cmd_chat)

    replay = sub.add_parser(
        "replay",
        help="a conversation's event log, in order",
        description="Print a conversation's events from the log, one line each; entries this "
        "version cannot read are marked UNREADABLE.",
    )
    replay.add_argument("conversation", help="the conversation id")
    replay.add_argument("--json", action="store_true", help="JSON lines, one event per line")
    replay.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    replay.set_defaults(func=cmd_replay)

    projections = sub.add_parser(
        "projections",
        help="the read models projected from the log",
        description="Look after the Postgres read models projected from the event log.",
    )
    projections_sub = projections.add_subparsers(
        dest="projections_command", required=True, metavar="COMMAND"
    )
    errors = projections_sub.add_parser(
        "errors",
        help="events a projection could not apply as written (skipped or sanitised)",
        description="List the latest events a projection skipped or sanitised, in log order: "
        "position, rule, type, conversation, reason.",
    )
    errors.add_argument(
        "--limit", type=positive, default=100, help="the latest this many (default 100)"
    )
    errors.add_argument("--json", action="store_true", help="JSON lines, one error per line")
    errors.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    errors.set_defaults(func=cmd_projection_errors)
    rebuild = projections_sub.add_parser(
        "rebuild",
        help="rebuild read models from the log beside the live ones, then swap them in",
        description="Rebuild a projection (or every one) from the event log into a schema "
        "beside the live one while everything keeps serving, catch up to the log's head, "
        "then swap the tables in one transaction. Configuration tables are left alone.",
    )
    rebuild.add_argument(
        "--projection", default=None, help="only this projection (default: every one)"
    )
    rebuild.add_argument("--json", action="store_true", help="one JSON object per projection")
    rebuild.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    rebuild.set_defaults(func=cmd_projection_rebuild)

    audit = sub.add_parser(
        "audit",
        help="check what the read models say against the log",
        description="Recompute from the event log alone what a read model holds, and compare.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    billing = audit_sub.add_parser(
        "billing",
        help="recompute every charge and balance from the log and compare them with the "
        "ledger and the balances; exits 1 on any mismatch",
        description="Read the log up to the billing projection's position, recompute each "
        "billed turn's charge (its tokens at the prices its `started` recorded) and each "
        "account's balance, and compare them with the ledger and the balances. Prints a "
        "summary and every mismatch; exit status 1 when there is any.",
    )
    billing.add_argument("--project", default=None, help="only this project's turns and account")
    billing.add_argument(
        "--since", default=None, help="only turns that ended at or after this ISO date/time (UTC)"
    )
    billing.add_argument(
        "--json", action="store_true", help="one JSON object: summary and mismatches"
    )
    billing.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    billing.set_defaults(func=cmd_audit_billing)

    bench = sub.add_parser(
        "bench",
        help="benchmarks (README: Benchmarks)",
        description="capacity: 100 to 1,000 turns at once at 20 tokens/s, per step; "
        "stream: tokens through parley at full model speed; "
        "burst: time to first token for many turns starting at once "
        "(these three run parley, the model, the direct path and the viewers in processes of "
        "their own, parley as `dev` and as split roles, against the direct path in one run); "
        "cancel: cancel -> done: stopped at the viewer; "
        "fanout: one conversation, many viewers; "
        "soak: --minutes of mixed load, then the invariants (exit 1 on a problem); "
        "rebuild: a full rebuild of a large synthetic log, entries per second; "
        "coldstart: a cold actor's fold of a long conversation, from its log and from its "
        "snapshot",
    )
    bench.add_argument(
        "workload",
        choices=["capacity", "stream", "burst", "cancel", "fanout", "soak", "rebuild", "coldstart"],
        help="what to measure",
    )
    bench.add_argument(
        "--json", action="store_true", help="one JSON object per workload and step, flat keys"
    )
    bench.add_argument(
        "--conversations", "-c", type=int, default=None, help="conversations (stream 20, burst 100)"
    )
    bench.add_argument(
        "--tokens",
        "-n",
        type=int,
        default=None,
        help="tokens per answer (stream 500, capacity 150, fanout 500: try 250)",
    )
    bench.add_argument(
        "--rounds",
        "-r",
        type=int,
        default=None,
        help="rounds, medians reported (capacity 1, coldstart 5, else 3; rebuild: rebuilds)",
    )
    bench.add_argument(
        "--viewers", type=int, default=None, help="SSE viewers (fanout 1000, soak 20)"
    )
    bench.add_argument("--minutes", type=float, default=30.0, help="soak: how long the load runs")
    bench.add_argument("--users", type=int, default=12, help="soak: users acting at once")
    bench.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="demo model tokens/s per stream (stream: 0 = full speed; capacity: 0 = 20; fanout: 0 = 50)",
    )
    bench.add_argument("--cancels", type=int, default=200, help="how many cancels (cancel)")
    bench.add_argument("--concurrency", type=int, default=10, help="cancels at a time (cancel)")
    bench.add_argument(
        "--window", type=float, default=1.0, help="seconds over which turns start (burst)"
    )
    bench.add_argument(
        "--events",
        type=int,
        default=None,
        help="rebuild: synthetic log entries to add (1,000,000); "
        "coldstart: entries of the long conversation (100,000)",
    )
    bench.add_argument("--batch", type=int, default=5000, help="rebuild: entries per transaction")
    bench.add_argument(
        "--workers", type=int, default=0, help="rebuild: reader processes (0 = one per core)"
    )
    bench.add_argument(
        "--steps",
        default=None,
        help="capacity: turns at once per step, comma-separated (default 100,250,500,1000)",
    )
    bench.add_argument(
        "--seconds", type=float, default=20.0, help="capacity: measured seconds per step"
    )
    bench.add_argument(
        "--topology",
        choices=["dev", "split", "both"],
        default="both",
        help="capacity, stream, burst: parley in one process (dev), as edge, worker and "
        "projector processes (split), or both one after the other (default)",
    )
    bench.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    bench.set_defaults(func=cmd_bench)
    return parser


def port(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {value}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    db_schema = "parley"  # named in a refusal's hint
    try:
        settings = load_settings(args.data)
        db_schema = settings.db_schema
        # the secrets this process knows are scrubbed from every log line it writes
        setup_logging(
            logging.DEBUG if args.verbose else logging.INFO,
            settings.log_format,
            secrets=(
                settings.jwt_secret,
                settings.model_api_key,
                data_folder_secret(settings.data_dir),
            ),
        )
        code: int = args.func(args)
    except (
        CliError,
        ConfigError,
        DatabaseMisconfigured,
        SchemaMissing,
        StreamMisconfigured,
        BrokerRefused,
        ToolLoadError,
    ) as err:
        # StreamMisconfigured: a stream (or a NATS account) parley cannot use as it is
        # configured; BrokerRefused: credentials NATS does not accept;
        # DatabaseMisconfigured: TLS in PARLEY_DATABASE_URL that cannot work. Each
        # message names the setting and what parley needs
        print(f"parley: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `parley replay ... | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the interpreter's final flush stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # What a command meets at run time is one line too, never a traceback.
    except EventLogUnavailable as err:
        # connected, but JetStream did not answer (a cluster without a leader yet)
        print(
            "parley: NATS answered but its JetStream did not (a cluster electing a leader, "
            f"a node still starting); try again: {describe_error(err)}",
            file=sys.stderr,
        )
        return 1
    except nats.errors.Error as err:
        print(
            "parley: cannot reach NATS (PARLEY_NATS_URL, or the `parley dev` running on the "
            f"data folder): {describe_error(err)}",
            file=sys.stderr,
        )
        return 1
    except REFUSALS as err:
        # Postgres answered, and said no: a setting or a grant is wrong, not an outage
        print(
            f"parley: Postgres refused: {describe_error(err)}; {refusal_hint(err, db_schema)}",
            file=sys.stderr,
        )
        return 2
    except DatabaseUnreachable as err:
        print(f"parley: {err}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        print(f"parley: Postgres (PARLEY_DATABASE_URL): {describe_error(err)}", file=sys.stderr)
        return 1
    except (ConnectionError, TimeoutError) as err:
        # a server the command needs (Postgres, mostly) did not answer, or went away
        print(f"parley: a server did not answer: {describe_error(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a file or folder it needs (a --data that is a file, say)
        print(f"parley: {describe_error(err)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    # `python -m parley.cli` runs this file as __main__, a second copy of the module:
    # run the canonical one, so errors raised by commands in other modules (which
    # import parley.cli) are the classes `main` catches.
    from parley.cli import main as canonical_main

    sys.exit(canonical_main())


__all__ = ["Path", "main"]
