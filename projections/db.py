"""Postgres connections for the read models: one schema per deployment (tests use one per test).

A schema holds three kinds of tables, each created by its own DDL file:
`bookkeeping.sql` (checkpoints and projection errors, rows per projection),
`config.sql` (configuration: never touched by a rebuild) and each projection's
own file (its tables; see projections/catalog.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import ssl
from collections.abc import Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from events.errors import SettingFileUnreadable, describe, read_setting_file, without_userinfo
from projections.catalog import PROJECTIONS
from projections.registry import Projection

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


class SchemaMissing(LookupError):
    """A command that only reads found no read models in the schema it was given."""


class DatabaseUnreachable(ConnectionError):
    """Postgres did not answer the first connection; the message names the setting."""


class DatabaseMisconfigured(ValueError):
    """PARLEY_DATABASE_URL asks for what no wait mends: a TLS file that is not there, SSL
    of a server that has none, a setting asyncpg does not take. The message names it."""


# What Postgres answers to a connection or DDL its configuration does not allow: no
# retry mends these, the operator does (PARLEY_DATABASE_URL, or a GRANT).
REFUSALS: tuple[type[Exception], ...] = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,  # no such role, pg_hba.conf says no
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InsufficientPrivilegeError,
)


def refusal_hint(err: BaseException, schema: str) -> str:
    """What to do about one of REFUSALS, for the one line an operator reads."""
    if isinstance(err, asyncpg.InsufficientPrivilegeError):
        return (
            f"the role in PARLEY_DATABASE_URL may not create parley's schema {schema!r}: "
            "grant it CREATE on the database (GRANT CREATE ON DATABASE <db> TO <role>), or "
            f"create the schema for it (CREATE SCHEMA {schema} AUTHORIZATION <role>); "
            "`parley projections rebuild` needs CREATE on the database"
        )
    if isinstance(err, asyncpg.InvalidCatalogNameError):
        return "the database named in PARLEY_DATABASE_URL does not exist: create it"
    return "check the user and password in PARLEY_DATABASE_URL and the server's pg_hba.conf"


async def create_pool(
    database_url: str, schema: str, *, max_size: int = 10, create: bool = True
) -> Any:
    """A pool whose connections see `schema` first; the schema and tables are created if
    missing, or, with `create` false (a command that only reads, such as the audit:
    a mistyped schema must not pass it as empty), SchemaMissing."""
    schema = check_schema_name(schema)
    conn = await connect_first(database_url)
    try:
        if create:
            await ensure_schema(conn, schema)
        elif not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        ):
            raise SchemaMissing(
                f"no read models in the schema {schema!r}: is PARLEY_DB_SCHEMA right, "
                "and has parley run against this database?"
            )
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=max_size,
        server_settings={"search_path": schema},
    )


# How long a pool may take to close when its process stops (`close_pool`).
CLOSE_WITHIN_S = 2.0


async def close_pool(pool: Any, within_s: float = CLOSE_WITHIN_S) -> None:
    """Close a pool as its process stops: each connection told goodbye when Postgres
    answers within `within_s`, else dropped. asyncpg's own close waits on a server
    that stopped answering (a frozen host, a cut network) for ever."""
    try:
        async with asyncio.timeout(within_s):
            await pool.close()
    except TimeoutError:
        pool.terminate()


# How long the first connection may take. asyncpg's own 60 s kept a command (or a
# starting role) silent for a minute on a host that accepts connections and never
# answers (a Postgres frozen, the port of another server).
CONNECT_TIMEOUT_S = 10.0


async def connect_first(database_url: str) -> Any:
    """A process's first connection to Postgres, before its pools.

    Raises DatabaseMisconfigured for what the URL gets wrong, DatabaseUnreachable
    for a Postgres that does not answer (exit 1: an outage, for a supervisor to
    start the process again), and lets REFUSALS through (Postgres said no).
    """
    problem = tls_problem(database_url)
    if problem is not None:
        raise DatabaseMisconfigured(f"PARLEY_DATABASE_URL: {problem}")
    try:
        return await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    except asyncpg.ClientConfigurationError as err:  # an sslmode it does not know, ...
        hint = f" ({err.hint})" if err.hint else ""  # on a line of its own in str(err)
        raise DatabaseMisconfigured(f"PARLEY_DATABASE_URL: {err.args[0]}{hint}") from err
    except ValueError as err:  # a port that is not a number: a password's / # ? unencoded
        raise DatabaseMisconfigured(
            f"PARLEY_DATABASE_URL: asyncpg cannot read it "
            f"({without_userinfo(describe(err), database_url)}); a password holding "
            "/ # ? @ must be percent-encoded (%2F %23 %3F %40)"
        ) from err
    except (OSError, TimeoutError) as err:
        # asyncpg's words for a server that did not answer its SSL request with yes or
        # no. prefer and allow take "no SSL here", so the answer was no Postgres's at
        # all (the port of another server); require, verify-ca and verify-full do
        # not fall back to plain text, so it was most likely that no.
        if "rejected SSL upgrade" in str(err):
            if _ssl_mode(database_url) in ("prefer", "allow"):
                where = re.search(r'at "([^"]+)"', str(err))
                raise DatabaseMisconfigured(
                    f"PARLEY_DATABASE_URL: what answers at {where[1] if where else 'it'} is"
                    " not Postgres (it answered Postgres's first message with something"
                    " else): check the host and port"
                ) from err
            raise DatabaseMisconfigured(
                f"PARLEY_DATABASE_URL asks for SSL (sslmode={_ssl_mode(database_url)}) and "
                f"Postgres has none ({err}): turn it on in the server (ssl = on, with its "
                "certificate and key), or connect with sslmode=disable where the network "
                "is trusted"
            ) from err
        raise DatabaseUnreachable(
            f"Postgres (PARLEY_DATABASE_URL) did not answer: {describe(err)}"
        ) from err


# The files asyncpg reads for TLS: the URL's parameter, else libpq's variable.
_TLS_FILES = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}
_VERIFYING_MODES = ("require", "verify-ca", "verify-full")


def _query(database_url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(database_url).query).items() if v}


def _ssl_mode(database_url: str) -> str:
    return _query(database_url).get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"


def tls_problem(database_url: str) -> str | None:
    """What is wrong with the TLS files the URL (or PGSSL*) names, in one line, or None.

    Checked before connecting: asyncpg opens them while it reads its settings, and
    a missing one came out as a bare FileNotFoundError, taken for a Postgres that
    did not answer. Only the files asyncpg reads at this sslmode are checked (the
    root certificate and CRL from `require` on, the client's certificate, and its
    key with it, from `allow` on), so a URL that works today keeps working. Never
    quotes a file's content.
    """
    query = _query(database_url)
    mode = _ssl_mode(database_url)
    names = [*(("sslrootcert", "sslcrl") if mode in _VERIFYING_MODES else ())]
    names += ["sslcert", "sslkey"] if mode != "disable" else []
    paths: dict[str, str] = {}
    for name in names:
        path = query.get(name) or os.environ.get(_TLS_FILES[name])
        if not path or (name == "sslkey" and "sslcert" not in paths):
            continue
        setting = name if name in query else _TLS_FILES[name]
        try:
            read_setting_file(setting, path)
        except SettingFileUnreadable as err:
            return str(err)
        paths[name] = path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name in ("sslrootcert", "sslcrl"):
        if name in paths:
            try:
                context.load_verify_locations(cafile=paths[name])
            except ssl.SSLError as err:
                return f"{name}: {paths[name]} cannot be loaded as PEM ({describe(err)})"
    if "sslcert" in paths:
        try:
            context.load_cert_chain(
                paths["sslcert"], paths.get("sslkey"), password=query.get("sslpassword", "")
            )
        except ssl.SSLError as err:
            return (
                "sslcert and sslkey cannot be loaded as a PEM certificate and its key "
                f"({describe(err)})"
            )
    return None


def ddl_of(*files: str) -> str:
    return "\n".join(resources.files("projections").joinpath(f).read_text() for f in files)


async def ensure_schema(
    conn: Any,
    schema: str,
    *,
    projections: Iterable[Projection] = PROJECTIONS.values(),
    config: bool = True,
) -> None:
    """Create the schema and whatever of its tables is missing.

    A rebuild's side schema gets the bookkeeping and the projection's own tables
    only (`config=False`): configuration lives in the live schema alone.
    """
    schema = check_schema_name(schema)
    files = ["bookkeeping.sql", *(["config.sql"] if config else []), *(p.ddl for p in projections)]
    ddl = ddl_of(*files)
    digest = hashlib.sha256(ddl.encode()).hexdigest()
    async with conn.transaction():
        # Two processes starting at once must not race on CREATE ... IF NOT EXISTS.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"parley-ddl-{schema}")
        # CREATE SCHEMA IF NOT EXISTS checks the CREATE privilege on the database before
        # it looks whether the schema exists: a role given CREATE for the first start
        # only would be refused on every later one. Ask first.
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        # DDL already in place still locks what it names (CREATE INDEX IF NOT EXISTS
        # takes a ShareLock on its table), and a projector writing those tables
        # meanwhile deadlocked with it when a second role started (`parley dev`
        # on servers with a log to project). So the files run only when they changed.
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_ddl"
            " (digest text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        if await conn.fetchval("SELECT 1 FROM schema_ddl WHERE digest = $1", digest):
            return
        await conn.execute(ddl)
        await conn.execute("INSERT INTO schema_ddl (digest) VALUES ($1)", digest)


async def drop_schema(database_url: str, schema: str) -> None:
    schema = check_schema_name(schema)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
