"""A production deployment configured wrongly is told so in one line, at start.

Each test runs the `parley` command, as an operator does, against a real
nats-server whose configuration holds the mistake: credentials it does not
accept, an account without JetStream, a stream parley cannot use. None of them
is an outage that waiting would end, so no command waits for ever or prints a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sysconfig
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from api import limits
from events import turns
from events.ids import new_id
from events.streams import ensure_streams
from parley.config import ConfigError
from parley.services import _PROBE_SCRIPT, Servers, check_redis
from parley.stack import free_ports
from projections.db import create_pool
from tests.nats_security import make_pki
from tests.test_cli import clean_env, run
from tests.test_start import NATS_SERVER, listening

SECRET = "a-secret-of-at-least-32-characters-here"
NO_JETSTREAM = "nats://nojs:nojs-password@127.0.0.1:{port}"
WITH_JETSTREAM = "nats://app:app-password@127.0.0.1:{port}"


@pytest.fixture
def accounts_server(tmp_path: Path) -> Iterator[int]:
    """A nats-server with two accounts: APP has JetStream, NOJS has none."""
    port = free_ports(1)[0]
    config = tmp_path / "nats.conf"
    config.write_text(
        f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{tmp_path / "js"}" }}
accounts {{
  APP {{ users: [ {{user: app, password: app-password}} ], jetstream: enabled }}
  NOJS {{ users: [ {{user: nojs, password: nojs-password}} ] }}
}}
"""
    )
    with listening_server([str(NATS_SERVER), "-c", str(config)], port):
        yield port


@contextlib.contextmanager
def listening_server(argv: list[str], port: int) -> Iterator[None]:
    """A server of our own, from its start until it listens on `port`, to its stop."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(listening(port))
        yield
    finally:
        server.terminate()
        server.wait(10)


def env_for(stack: Servers, nats_url: str) -> dict[str, str]:
    return clean_env(
        PARLEY_NATS_URL=nats_url,
        PARLEY_DATABASE_URL=stack.database_url,
        PARLEY_REDIS_URL=stack.redis_url,
        PARLEY_JWT_SECRET=SECRET,
    )


@pytest.fixture
def streams_made(stack: Servers) -> None:
    """The streams made before a role starts: a role that makes them says so in a line
    of its own, beside the one these tests count (it did when one of them ran first)."""

    async def make() -> None:
        nc = await nats.connect(stack.nats_url)
        try:
            await ensure_streams(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(make())


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr, done.stderr
    assert says in done.stderr, done.stderr


async def test_a_stream_parley_cannot_use_stops_serve_in_one_line(
    stack: Servers, accounts_server: int
) -> None:
    url = WITH_JETSTREAM.format(port=accounts_server)
    nc = await nats.connect(url)
    try:  # made by hand, as a work queue must not be
        await nc.jetstream().add_stream(
            StreamConfig(name="CHAT_CMD", subjects=["chat.cmd.>"], retention=RetentionPolicy.LIMITS)
        )
    finally:
        await nc.close()
    done = await asyncio.to_thread(
        run, "serve", "--role", "edge", "--port", "0", env=env_for(stack, url), timeout=60
    )
    assert_one_line(done, 2, "stream CHAT_CMD has retention 'limits'")


@pytest.mark.parametrize(
    "args",
    [["replay", "01M8PH5T8HWRP8V6GA7ENEWHPN"], ["audit", "billing"], ["projections", "rebuild"]],
)
async def test_a_command_on_an_account_without_jetstream_says_so(
    stack: Servers, accounts_server: int, args: list[str]
) -> None:
    url = NO_JETSTREAM.format(port=accounts_server)
    done = await asyncio.to_thread(run, *args, env=env_for(stack, url), timeout=60)
    assert_one_line(done, 2, "has no JetStream")
    assert "jetstream: enabled" in done.stderr


@pytest.mark.parametrize(
    "args",
    [["replay", "01M8PH5T8HWRP8V6GA7ENEWHPN"], ["audit", "billing"], ["projections", "rebuild"]],
)
async def test_a_command_on_a_jetstream_without_the_event_log_says_so(
    stack: Servers, accounts_server: int, args: list[str]
) -> None:
    """JetStream answers, but no parley ever ran on this account (a wrong URL or user):
    the reads' "status 503" was reported as a JetStream electing a leader, "try
    again", and the rebuild's "stream not found" as NATS not reachable."""
    url = WITH_JETSTREAM.format(port=accounts_server)
    done = await asyncio.to_thread(run, *args, env=env_for(stack, url), timeout=60)
    assert_one_line(done, 2, "no parley event log on this NATS")
    assert "no stream CHAT_EVT" in done.stderr


async def test_a_role_on_an_account_without_jetstream_stops_instead_of_waiting(
    stack: Servers, accounts_server: int
) -> None:
    """The server answers "JetStream not enabled for account": configuration, which no
    wait ends (a role waits only for a JetStream that does not answer yet)."""
    url = NO_JETSTREAM.format(port=accounts_server)
    done = await asyncio.to_thread(
        run, "serve", "--role", "edge", "--port", "0", env=env_for(stack, url), timeout=30
    )
    assert_one_line(done, 2, "has no JetStream")


@pytest.mark.parametrize(
    "args",
    [["serve", "--role", "edge", "--port", "0"], ["replay", "01M8PH5T8HWRP8V6GA7ENEWHPN"]],
)
async def test_credentials_nats_refuses_stop_parley_with_what_to_fix(
    stack: Servers, accounts_server: int, args: list[str]
) -> None:
    """A role waits for ever for a NATS that is away; a NATS that answers "Authorization
    Violation" to every attempt is not away, and a wrong password never gets right."""
    url = f"nats://app:wrong-password@127.0.0.1:{accounts_server}"
    done = await asyncio.to_thread(run, *args, env=env_for(stack, url), timeout=30)
    assert_one_line(done, 2, "NATS refused the credentials of PARLEY_NATS_URL")
    assert "wrong-password" not in done.stderr


async def test_a_cluster_url_is_refused_only_once_every_node_refused(
    stack: Servers, accounts_server: int
) -> None:
    """The first node in the list refusing is not enough: another may know the user."""
    good = WITH_JETSTREAM.format(port=accounts_server)
    bad = f"nats://app:wrong-password@127.0.0.1:{accounts_server}"
    nc = await nats.connect(good)
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    env = env_for(stack, f"{bad},{good}")
    done = await asyncio.to_thread(run, "replay", "01M8PH5T8HWRP8V6GA7ENEWHPN", env=env)
    assert_one_line(done, 1, "no events for conversation")


# ---------------------------------------------------------------- Postgres


def as_role(database_url: str, role: str) -> str:
    """The stack's database, as `role` (the embedded Postgres trusts loopback)."""
    return database_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


@pytest.fixture
async def limited_role(stack: Servers) -> AsyncIterator[str]:
    """A login role that may not create schemas in the database: its name."""
    role = f"limited_{new_id().lower()[-10:]}"
    admin = await asyncpg.connect(stack.database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"REVOKE CREATE ON DATABASE parley FROM {role}")
        yield role
        await admin.execute(f"DROP OWNED BY {role} CASCADE")
        await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


async def test_a_role_needs_create_on_the_database_only_while_its_schema_is_absent(
    stack: Servers, limited_role: str
) -> None:
    """README: the role needs CREATE on the database for the first start only. An
    operator who creates the schema for it (or revokes CREATE after the first start)
    can start every process with a role that may create nothing but its own tables."""
    schema = f"s_{limited_role}"
    admin = await asyncpg.connect(stack.database_url)
    try:
        await admin.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {limited_role}")
    finally:
        await admin.close()
    url = as_role(stack.database_url, limited_role)
    for _ in range(2):  # the first start makes the tables, the second finds them
        pool = await create_pool(url, schema, max_size=1)
        await pool.close()


@pytest.mark.parametrize(
    ("user", "database", "says", "hint"),
    [
        # the embedded Postgres trusts loopback, so no password is ever wrong there
        ("nobody_here", "parley", "InvalidAuthorizationSpecificationError", "pg_hba.conf"),
        ("postgres", "no_such_db", "InvalidCatalogNameError", "create it"),
    ],
)
def test_a_postgres_that_refuses_the_connection_says_so_and_what_to_check(
    stack: Servers, user: str, database: str, says: str, hint: str
) -> None:
    """It answered, so "a server did not answer" (exit 1, as for an outage) was wrong."""
    host = urlsplit(stack.database_url).netloc.split("@", 1)[1]
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_DATABASE_URL": f"postgresql://{user}@{host}/{database}",
    }
    done = run("projections", "errors", env=env, timeout=60)
    assert_one_line(done, 2, "Postgres refused")
    assert says in done.stderr and hint in done.stderr


async def test_a_role_without_create_on_a_database_without_the_schema_is_told_what_to_grant(
    stack: Servers, limited_role: str
) -> None:
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_DATABASE_URL": as_role(stack.database_url, limited_role),
        "PARLEY_DB_SCHEMA": f"s_{limited_role}",
    }
    done = await asyncio.to_thread(run, "serve", "--role", "projector", env=env, timeout=60)
    assert_one_line(done, 2, "Postgres refused")
    assert "GRANT CREATE ON DATABASE" in done.stderr and f"CREATE SCHEMA s_{limited_role}" in (
        done.stderr
    )


def test_a_postgres_that_does_not_answer_is_named(stack: Servers) -> None:
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/parley",
    }
    done = run("serve", "--role", "projector", env=env, timeout=60)
    assert_one_line(done, 1, "Postgres (PARLEY_DATABASE_URL) did not answer")


@pytest.mark.parametrize(
    ("command", "query", "says"),
    [
        # asyncpg opened the file while reading its settings: "Postgres did not
        # answer: FileNotFoundError", exit 1, as if the server were away
        (
            ["projections", "errors"],
            "sslmode=verify-full&sslrootcert={missing}",
            "sslrootcert: {missing} does not exist",
        ),
        (["projections", "errors"], "sslcert={missing}&sslkey={key}", "sslcert: {missing} does"),
        (["projections", "errors"], "sslmode=verify-ca&sslrootcert={key}", "cannot be loaded as"),
        (["projections", "errors"], "sslmode=always", "`sslmode` parameter must be one of"),
        # the embedded Postgres has no SSL: a client that insists was "did not answer"
        (["serve", "--role", "projector"], "sslmode=require", "asks for SSL (sslmode=require)"),
        (
            ["serve", "--role", "edge", "--port", "0"],
            "sslmode=verify-full&sslrootcert={ca}",
            "Postgres has none",
        ),
    ],
)
@pytest.mark.usefixtures("streams_made")
def test_postgres_tls_settings_that_cannot_work_stop_at_start_naming_the_setting(
    stack: Servers, tmp_path: Path, command: list[str], query: str, says: str
) -> None:
    """Configuration, not an outage: exit 2 in one line, where exit 1 asked a supervisor
    to start the process again, and again."""
    pki = make_pki(tmp_path)
    files = {"missing": str(tmp_path / "no-such.pem"), "ca": str(pki.ca)}
    files["key"] = str(pki.client_key)  # a PEM file, but no certificate
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_DATABASE_URL": f"{stack.database_url}?{query.format(**files)}",
    }
    done = run(*command, env=env, timeout=60)
    assert_one_line(done, 2, says.format(**files))
    assert "PARLEY_DATABASE_URL" in done.stderr and len(done.stderr.splitlines()) == 1


# ---------------------------------------------------------------- Redis

REDIS_SERVER = Path(sysconfig.get_path("scripts")) / "redis-server"


@pytest.fixture
def redis_with_password() -> Iterator[int]:
    port = free_ports(1)[0]
    argv = [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--requirepass", "redis-password", "--save", "", "--appendonly", "no"]
    with listening_server(argv, port):
        yield port


@pytest.mark.parametrize("credentials", [":wrong-password@", ""])
def test_credentials_redis_refuses_stop_an_edge_instead_of_a_ready_edge_without_limits(
    stack: Servers, redis_with_password: int, credentials: str
) -> None:
    """An edge whose Redis refused it started "ready" and ran without limits,
    idempotency keys or turn records for as long as it lived; a Redis that is
    away is still waited out (tests/test_faults.py)."""
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_REDIS_URL": f"redis://{credentials}127.0.0.1:{redis_with_password}/0",
    }
    done = run("serve", "--role", "edge", "--port", "0", env=env, timeout=30)
    assert_one_line(done, 2, "Redis refused the credentials of PARLEY_REDIS_URL")
    assert "wrong-password" not in done.stderr


@pytest.fixture(scope="module")
def redis_with_users() -> Iterator[int]:
    """A redis-server with ACL users, each missing something parley needs, or not."""
    port = free_ports(1)[0]
    argv = [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no"]
    for user, rules in ACL_USERS.items():
        argv += ["--user", user, "on", ">secret", *rules.split()]
    with listening_server(argv, port):
        yield port


# what README "Postgres and Redis" gives an ACL user of parley's
LEAST = "~parley:* +@read +@write +@scripting +@connection +time"
ACL_USERS = {
    "everything": "~* +@all",
    "least": LEAST,
    "no_scripts": "~* +@all -@scripting",
    "no_time": LEAST.replace(" +time", ""),
    "no_zadd": f"{LEAST} -zadd",
    "other_keys": "~other:* +@all",
}


@pytest.mark.parametrize("user", ["everything", "least"])
async def test_an_acl_user_with_what_parley_needs_passes_the_start_check(
    redis_with_users: int, user: str
) -> None:
    await check_redis(f"redis://{user}:secret@127.0.0.1:{redis_with_users}/0")


@pytest.mark.parametrize(
    ("user", "says"),
    [
        ("no_scripts", "no permissions to run the 'script' command"),
        ("no_time", "in a Lua script, TIME:"),
        ("no_zadd", "in a Lua script, ZADD:"),
        ("other_keys", "no permissions to access one of the keys"),
    ],
)
async def test_an_acl_user_without_what_parley_needs_stops_the_start_naming_it(
    redis_with_users: int, user: str, says: str
) -> None:
    """Every limit is a Lua script on keys parley:*: an edge whose user may not run
    one started "ready" and let every request through, for as long as it lived."""
    with pytest.raises(ConfigError, match="Redis refused the user of PARLEY_REDIS_URL") as err:
        await check_redis(f"redis://{user}:secret@127.0.0.1:{redis_with_users}/0")
    assert says in str(err.value) and "ACL SETUSER" in str(err.value)


def test_the_start_check_runs_every_command_of_parleys_lua_scripts() -> None:
    """Guards the check against a script that starts calling a command it does not try."""
    sources = (Path(limits.__file__).read_text(), Path(turns.__file__).read_text())
    called = {c.upper() for text in sources for c in re.findall(r"redis\.call\('(\w+)'", text)}
    assert called and called <= set(re.findall(r"\{'(\w+)'", _PROBE_SCRIPT))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # an SSL error at the handshake, or a handshake never answered (the server
        # waits for a line end): both were "Redis not reachable", and the edge ran
        ("rediss://127.0.0.1:{port}/0", "speaks no TLS: write redis://"),
        ("rediss://127.0.0.1:{port}/0?ssl_ca_certs={missing}", "ssl_ca_certs: {missing} does"),
        ("rediss://127.0.0.1:{port}/0?ssl_ca_certs={key}", "cannot be loaded as PEM"),
        ("redis://no_scripts:secret@127.0.0.1:{port}/0", "Redis refused the user of"),
        # a misspelt parameter was a traceback through the services
        ("redis://127.0.0.1:{port}/0?ssl_ca_cert={missing}", "unexpected keyword argument"),
    ],
)
@pytest.mark.usefixtures("streams_made")
def test_a_redis_url_that_cannot_work_stops_an_edge_in_one_line(
    stack: Servers, redis_with_users: int, tmp_path: Path, url: str, says: str
) -> None:
    files = {"missing": str(tmp_path / "no-such.pem"), "key": str(make_pki(tmp_path).client_key)}
    env = {
        **env_for(stack, stack.nats_url),
        "PARLEY_REDIS_URL": url.format(port=redis_with_users, **files),
    }
    done = run("serve", "--role", "edge", "--port", "0", env=env, timeout=30)
    assert_one_line(done, 2, says.format(**files))
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_tools_module:TOOLS", "no module named 'no_such_tools_module'"),
        ("tests.tool_plugin:NOPE", "module 'tests.tool_plugin' has no attribute 'NOPE'"),
        ("tests.tool_plugin:NOT_A_TOOL", "int is not a Tool"),
    ],
)
async def test_a_worker_with_tools_it_cannot_load_stops_in_one_line(
    stack: Servers, spec: str, says: str
) -> None:
    """What the operator wrote in PARLEY_TOOLS is named, with what is wrong with it; no
    traceback through the event loop and the services."""
    env = env_for(stack, stack.nats_url) | {
        "PARLEY_TOOLS": spec,
        "PARLEY_MODEL_BASE_URL": "http://127.0.0.1:1/v1",
    }
    done = await asyncio.to_thread(run, "serve", "--role", "worker", env=env, timeout=60)
    assert_one_line(done, 2, f"tool spec {spec!r} (PARLEY_TOOLS): {says}")


@pytest.fixture(
    scope="module",
    params=[
        # at maxmemory with nothing to evict: writes answer OOM until keys expire
        ["--maxmemory", "1", "--maxmemory-policy", "noeviction"],
        # a replica (a managed Redis's endpoint during its failover): writes answer READONLY
        ["--replicaof", "127.0.0.1", "9"],
    ],
    ids=["oom", "replica"],
)
def redis_refusing_writes(request: pytest.FixtureRequest) -> Iterator[int]:
    port = free_ports(1)[0]
    argv = [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", *request.param]
    with listening_server(argv, port):
        yield port


async def test_a_redis_refusing_writes_for_now_is_waited_out_not_a_stop(
    redis_refusing_writes: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe's Lua script answered OOM or READONLY and the start check called it an
    ACL user without a command parley needs: exit 2, with the advice to change the
    user, for a Redis that is only full or in the middle of a failover."""
    await check_redis(f"redis://127.0.0.1:{redis_refusing_writes}/0")
    assert "Redis answered an error at start" in caplog.text


@pytest.mark.parametrize(
    ("role", "setting"),
    [("edge", "PARLEY_REDIS_URL"), ("projector", "PARLEY_DATABASE_URL")],
)
async def test_a_password_not_percent_encoded_is_never_quoted(
    stack: Servers, role: str, setting: str
) -> None:
    """A / in a password ends the URL's host part: the client reads what comes before
    it as the port, and its error quoted it ("... integer value as 'Zk3q'"), in the
    stop line or a traceback."""
    env = env_for(stack, stack.nats_url)
    scheme, rest = env[setting].split("://", 1)
    env[setting] = f"{scheme}://parley:Zk3q/9sWx#p@{rest.rpartition('@')[2]}"
    done = await asyncio.to_thread(run, "serve", "--role", role, "--port", "0", env=env)
    assert_one_line(done, 2, "must be percent-encoded")
    for piece in ("Zk3q", "9sWx"):
        assert piece not in done.stderr, done.stderr
