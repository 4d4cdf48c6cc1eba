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
from collections.abc import Sequence
from pathlib import Path

import msgspec
import nats

from actors.models import ModelCatalog
from api.auth import mint
from events.codec import Unreadable, encode_stored
from events.log import EventLog
from events.subjects import valid_id
from events.vocabulary import AnyEvent, Chunk, event_type
from parley.config import ConfigError, Settings, jwt_secret, load_catalog, load_settings
from parley.logs import setup_logging
from parley.services import ROLES, Servers, ServiceOptions, Services
from parley.stack import EmbeddedStack, StackError, running_stack_urls
from projections.db import create_pool
from projections.store import ReadStore

log = logging.getLogger(__name__)

ADMIN_USER = "admin"


class CliError(Exception):
    """A message for the user; the command exits with status 2."""


class RunInfo(msgspec.Struct, frozen=True):
    """What `parley dev` records in the data folder for the other commands."""

    edge_url: str
    model_base_url: str
    pid: int


def resolve_servers(settings: Settings) -> Servers:
    """The servers named in the environment, else the dev stack running on the data folder."""
    named = {
        "PARLEY_NATS_URL": settings.nats_url,
        "PARLEY_DATABASE_URL": settings.database_url,
        "PARLEY_REDIS_URL": settings.redis_url,
    }
    if any(named.values()):
        missing = [name for name, value in named.items() if not value]
        if missing:
            raise CliError(f"set {', '.join(missing)} too, or none of the PARLEY_*_URL variables")
        return Servers(
            nats_url=settings.nats_url or "",
            database_url=settings.database_url or "",
            redis_url=settings.redis_url or "",
        )
    urls = running_stack_urls(settings.data_dir)
    if urls is None:
        raise CliError(
            f"no servers configured (PARLEY_NATS_URL, PARLEY_DATABASE_URL, PARLEY_REDIS_URL) "
            f"and no `parley dev` running on {settings.data_dir}"
        )
    return urls


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
            servers = stack.start()
        else:
            servers = resolve_servers(settings)
        return asyncio.run(_dev(settings, catalog, servers, args.host, args.port))
    except StackError as err:
        raise CliError(f"the embedded stack did not start: {err}") from err
    finally:
        if stack is not None:
            stack.stop()


async def _dev(
    settings: Settings, catalog: ModelCatalog, servers: Servers, host: str, port: int
) -> int:
    from parley.demo_model import DemoConfig, start_demo_model

    async with contextlib.AsyncExitStack() as stack:
        base_url = settings.model_base_url
        if base_url is None:
            runner, base_url = await start_demo_model(
                "127.0.0.1", 0, DemoConfig(tokens_per_s=settings.demo_tokens_per_s)
            )
            stack.push_async_callback(runner.cleanup)
        secret = jwt_secret(settings)
        options = ServiceOptions(
            jwt_secret=secret,
            catalog=catalog,
            model_base_url=base_url,
            model_api_key=settings.model_api_key,
            db_schema=settings.db_schema,
            max_projection_lag=settings.max_projection_lag,
            host=host,
            port=port,
        )
        try:
            services = await stack.enter_async_context(Services(servers, options))
        except OSError as err:
            raise CliError(f"cannot listen on {host}:{port}: {err.strerror}; try --port") from err
        run_file = settings.data_dir / "run.json"
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
        await _until_signalled(services)
    return 0


async def _until_signalled(services: Services) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, services.stop)
    try:
        await services.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("stopping ...", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.data)
    servers = resolve_servers(settings)
    roles = ROLES if args.role == "all" else (args.role,)
    if settings.model_base_url is None:
        raise CliError(
            "PARLEY_MODEL_BASE_URL is required for `parley serve` (use `parley dev` for the demo model)"
        )

    async def main() -> int:
        options = ServiceOptions(
            jwt_secret=jwt_secret(settings),
            catalog=load_catalog(settings),
            model_base_url=settings.model_base_url or "",
            model_api_key=settings.model_api_key,
            db_schema=settings.db_schema,
            max_projection_lag=settings.max_projection_lag,
            host=args.host,
            port=args.port,
        )
        async with Services(servers, options, roles) as services:
            if services.edge_url:
                print(f"edge listening at {services.edge_url}", file=sys.stderr, flush=True)
            await _until_signalled(services)
        return 0

    return asyncio.run(main())


# ---------------------------------------------------------------- token / replay


def cmd_token(args: argparse.Namespace) -> int:
    if not valid_id(args.user):
        raise CliError("--user must be 1-128 characters of A-Z a-z 0-9 _ -")
    settings = load_settings(args.data)
    print(mint(jwt_secret(settings), args.user, admin=args.admin))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if not valid_id(args.conversation):
        raise CliError(f"not a conversation id: {args.conversation!r}")
    settings = load_settings(args.data)
    servers = resolve_servers(settings)

    async def main() -> int:
        nc = await nats.connect(servers.nats_url, name="parley-replay")
        try:
            events = await EventLog(nc.jetstream()).read(args.conversation)
        finally:
            await nc.close()
        if not events:
            print(f"no events for conversation {args.conversation}", file=sys.stderr)
            return 1
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
        pool = await create_pool(servers.database_url, settings.db_schema, max_size=1)
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
                    f"{row.seq:>8}  {row.rule:<9}  {row.event_type or '?':<18} "
                    f"conversation={row.conversation_id or '?'}\n          {row.reason}\n"
                )
        out.flush()
        return 0

    return asyncio.run(main())


def cmd_projection_rebuild(args: argparse.Namespace) -> int:
    from parley.rebuild_command import run_rebuild

    code: int = run_rebuild(args)
    return code


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from parley.bench import run_bench

    code: int = run_bench(args)
    return code


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="streaming AI-chat backend")
    parser.add_argument(
        "--data", default=None, help="data folder of the dev stack (default .parley)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="embedded stack + all roles + web page")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--data", default=argparse.SUPPRESS)
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="one role against configured servers")
    serve.add_argument("--role", choices=[*ROLES, "all"], default="all")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--data", default=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="print a bearer token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--admin", action="store_true")
    token.add_argument("--data", default=argparse.SUPPRESS)
    token.set_defaults(func=cmd_token)

    replay = sub.add_parser("replay", help="a conversation's event log, in order")
    replay.add_argument("conversation")
    replay.add_argument("--json", action="store_true", help="JSON lines, one event per line")
    replay.add_argument("--data", default=argparse.SUPPRESS)
    replay.set_defaults(func=cmd_replay)

    projections = sub.add_parser("projections", help="the read models projected from the log")
    projections_sub = projections.add_subparsers(dest="projections_command", required=True)
    errors = projections_sub.add_parser(
        "errors", help="events a projection could not apply as written (skipped or sanitised)"
    )
    errors.add_argument("--limit", type=int, default=100, help="at most this many (oldest first)")
    errors.add_argument("--json", action="store_true", help="JSON lines, one error per line")
    errors.add_argument("--data", default=argparse.SUPPRESS)
    errors.set_defaults(func=cmd_projection_errors)
    rebuild = projections_sub.add_parser(
        "rebuild",
        help="rebuild read models from the log beside the live ones, then swap them in",
    )
    rebuild.add_argument(
        "--projection", default=None, help="only this projection (default: every one)"
    )
    rebuild.add_argument("--json", action="store_true", help="one JSON object per projection")
    rebuild.add_argument("--data", default=argparse.SUPPRESS)
    rebuild.set_defaults(func=cmd_projection_rebuild)

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("workload", choices=["stream", "rebuild"])
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--conversations", "-c", type=int, default=20)
    bench.add_argument("--tokens", "-n", type=int, default=500)
    bench.add_argument("--rounds", "-r", type=int, default=3)
    bench.add_argument(
        "--rate", type=float, default=0.0, help="demo model tokens/s per stream (0 = full speed)"
    )
    bench.add_argument(
        "--events", type=int, default=1_000_000, help="rebuild: synthetic log entries to add"
    )
    bench.add_argument("--batch", type=int, default=5000, help="rebuild: entries per transaction")
    bench.add_argument(
        "--workers", type=int, default=0, help="rebuild: reader processes (0 = one per core)"
    )
    bench.add_argument("--data", default=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        code: int = args.func(args)
    except (CliError, ConfigError) as err:
        print(f"parley: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `parley replay ... | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the interpreter's final flush stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    # `python -m parley.cli` runs this file as __main__, a second copy of the module:
    # run the canonical one, so errors raised by commands in other modules (which
    # import parley.cli) are the classes `main` catches.
    from parley.cli import main as canonical_main

    sys.exit(canonical_main())


__all__ = ["Path", "main"]
