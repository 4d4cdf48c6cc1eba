"""`parley projections rebuild [--projection NAME] [--json]`: the command around
projections.rebuild (how the rebuild works is documented there)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import msgspec

from events.streams import require_jetstream
from parley.commands import CliError
from parley.config import load_settings
from parley.services import resolve_servers
from projections.catalog import PROJECTIONS
from projections.feed import connect
from projections.rebuild import RebuildError, default_workers, rebuild


def run_rebuild(args: argparse.Namespace) -> int:
    """Rebuild read models from the log beside the live ones, then swap them in."""
    if args.projection is not None and args.projection not in PROJECTIONS:
        raise CliError(
            f"no projection {args.projection!r}; known: {', '.join(sorted(PROJECTIONS))}"
        )
    names = [args.projection] if args.projection else list(PROJECTIONS)
    settings = load_settings(args.data)
    servers = resolve_servers(settings)

    def progress(position: int, head: int) -> None:
        print(f"  at {position} of {head}", file=sys.stderr, flush=True)

    async def main() -> int:
        # the fast reader's connection (projections/feed.py), one-shot like every command
        nc = await connect(
            servers.nats_url,
            name="parley-rebuild",
            reconnect_forever=False,
            security=servers.nats_security,
        )
        try:
            await require_jetstream(nc.jetstream())
            for name in names:
                print(f"rebuilding {name} in {settings.db_schema} ...", file=sys.stderr)
                report = await rebuild(
                    nc.jetstream(),
                    servers.database_url,
                    settings.db_schema,
                    PROJECTIONS[name],
                    nats_url=servers.nats_url,
                    nats_security=servers.nats_security,
                    workers=default_workers(),
                    progress=progress,
                )
                if args.json:
                    print(msgspec.json.encode(report).decode(), flush=True)
                else:
                    print(
                        f"{name}: rebuilt from {report.entries} log entries ({report.turns} turns)"
                        f" in {report.seconds:.1f} s, {report.entries_per_s:,.0f} entries/s;"
                        f" swapped in at position {report.position};"
                        f" {report.errors} projection errors",
                        flush=True,
                    )
        except RebuildError as err:
            # met at run time (another rebuild runs, the tables stay locked): exit 1,
            # as a server that does not answer; 2 is for arguments and settings
            print(f"parley: {err}", file=sys.stderr)
            return 1
        finally:
            await nc.close()
        return 0

    return asyncio.run(main())
