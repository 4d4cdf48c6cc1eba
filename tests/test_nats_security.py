"""NATS as teams secure it in production: TLS with their own CA, mutual TLS, and
decentralised auth (a user's `.creds` file, an NKey seed).

Each test runs the `parley` command against a real nats-server configured that
way (tests/nats_security.py makes the certificates and the JWTs). Every process
that connects (the roles of `parley serve`, `replay`, `audit`, `projections
rebuild`) must get in with the settings; a setting that cannot work must stop
it at start in one line, exit 2, instead of a wait for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import nkeys
import pytest

from api.auth import mint
from events import broker
from events.broker import NatsSecurity, security_problem
from events.streams import ensure_streams
from parley.config import settings_from_env
from parley.services import Servers
from parley.stack import free_ports
from tests.conftest import SECRET
from tests.nats_security import (
    Operator,
    Pki,
    make_operator,
    make_pki,
    new_keys,
    operator_config,
)
from tests.sse import SseClient
from tests.test_cli import clean_env, run, serving
from tests.test_misconfigured import listening_server

UNKNOWN = "01M8PH5T8HWRP8V6GA7ENEWHPN"  # a conversation id no log holds


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Operator:
    return make_operator(tmp_path_factory.mktemp("operator"))


@pytest.fixture(scope="module")
def secured_server(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, operator: Operator
) -> Iterator[str]:
    """Operator mode behind mutual TLS, as a multi-tenant NATS (Synadia Cloud) is: its URL."""
    from tests.test_start import NATS_SERVER

    folder = tmp_path_factory.mktemp("secured-nats")
    port = free_ports(1)[0]
    config = folder / "nats.conf"
    config.write_text(operator_config(operator, pki, port, folder / "js"))
    with listening_server([str(NATS_SERVER), "-c", str(config)], port):
        yield f"tls://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A nats-server whose one user is an NKey: its URL and the user's seed file."""
    from tests.test_start import NATS_SERVER

    folder = tmp_path_factory.mktemp("nkey-nats")
    user = new_keys(nkeys.PREFIX_BYTE_USER)
    seed = folder / "user.nk"
    seed.write_bytes(user.seed + b"\n")
    port = free_ports(1)[0]
    config = folder / "nats.conf"
    config.write_text(
        f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{folder / "js"}" }}
authorization {{ users: [ {{ nkey: {user.public_key.decode()} }} ] }}
"""
    )
    with listening_server([str(NATS_SERVER), "-c", str(config)], port):
        yield f"nats://127.0.0.1:{port}", seed


def secured_env(stack: Servers, url: str, **settings: str | Path) -> dict[str, str]:
    return clean_env(
        PARLEY_NATS_URL=url,
        PARLEY_DATABASE_URL=stack.database_url,
        PARLEY_REDIS_URL=stack.redis_url,
        PARLEY_JWT_SECRET=SECRET,
        PARLEY_DB_SCHEMA="nats_security_test",
        **{name: str(value) for name, value in settings.items()},
    )


def full_settings(pki: Pki, operator: Operator) -> dict[str, str | Path]:
    return {
        "PARLEY_NATS_TLS_CA": pki.ca,
        "PARLEY_NATS_TLS_CERT": pki.client_cert,
        "PARLEY_NATS_TLS_KEY": pki.client_key,
        "PARLEY_NATS_CREDS": operator.creds,
    }


def assert_refused(done: subprocess.CompletedProcess[str], says: str) -> None:
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    assert says in done.stderr, done.stderr


async def test_every_process_connects_over_mutual_tls_with_a_creds_file(
    stack: Servers,
    secured_server: str,
    pki: Pki,
    operator: Operator,
    demo_model_url: str,
    http: aiohttp.ClientSession,
) -> None:
    env = secured_env(stack, secured_server, **full_settings(pki, operator))
    env["PARLEY_MODEL_BASE_URL"] = demo_model_url
    seed = seed_of(operator.creds)
    with serving("all", env, ready="edge listening at") as (url, lines):
        api = SseClient(http, url, mint(SECRET, "u-nats-security", admin=True))
        conversation = await api.create_conversation()
        events = await api.send_stream(conversation["id"], "hello [[tokens=3]]")
        assert events[-1].data == "ok", events
        async with http.get(url + "/metrics") as answer:
            metrics = await answer.text()
        assert seed not in metrics
        for args in (
            ["replay", conversation["id"]],
            ["audit", "billing"],
            ["projections", "rebuild"],
        ):
            done = await asyncio.to_thread(run, *args, env=env)
            assert done.returncode == 0, (args, done)
            assert seed not in done.stdout + done.stderr
    assert seed not in "".join(lines)


ROLE = ["serve", "--role", "edge", "--port", "0"]
COMMAND = ["replay", UNKNOWN]


@pytest.mark.parametrize(
    ("args", "change", "says"),
    [
        # the system's authorities do not know the team's CA
        (ROLE, {"PARLEY_NATS_TLS_CA": None}, "certificate did not verify against the system's"),
        # the server asks for a client certificate; none was given, or one it does not trust
        (
            COMMAND,
            {"PARLEY_NATS_TLS_CERT": None, "PARLEY_NATS_TLS_KEY": None},
            "the NATS server requires a client certificate (mutual TLS)",
        ),
        (
            COMMAND,
            {"PARLEY_NATS_TLS_CERT": "stranger_cert", "PARLEY_NATS_TLS_KEY": "stranger_key"},
            "the NATS server did not accept the client certificate of PARLEY_NATS_TLS_CERT",
        ),
        # a user of an account the operator does not know
        (
            ROLE,
            {"PARLEY_NATS_CREDS": "stranger_creds"},
            "NATS refused the user of PARLEY_NATS_CREDS",
        ),
    ],
    ids=[
        "role-system-ca",
        "no-client-cert",
        "untrusted-client-cert",
        "role-creds",
    ],
)
async def test_settings_that_cannot_work_stop_every_process_in_one_line(
    stack: Servers,
    secured_server: str,
    pki: Pki,
    operator: Operator,
    tmp_path: Path,
    args: list[str],
    change: dict[str, str | None],
    says: str,
) -> None:
    """A role waits for ever for a NATS that is away; none of these is an outage."""
    env = secured_env(stack, secured_server, **changed(pki, operator, tmp_path, change))
    done = await asyncio.to_thread(run, *args, env=env, timeout=30)
    assert_refused(done, says)
    assert seed_of(operator.creds) not in done.stderr


def changed(
    pki: Pki, operator: Operator, tmp_path: Path, change: dict[str, str | None]
) -> dict[str, str | Path]:
    files: dict[str, Path] = {
        "stranger_cert": pki.stranger_cert,
        "stranger_key": pki.stranger_key,
        "server_key": pki.server_key,
        "stranger_creds": operator.stranger_creds,
        "missing": tmp_path / "nowhere.creds",
        "folder": tmp_path,
        "ca": pki.ca,
    }
    settings = full_settings(pki, operator)
    for name, value in change.items():
        if value is None:
            del settings[name]
        else:
            settings[name] = files[value]
    return settings


def seed_of(creds: Path) -> str:
    return creds.read_text().split("-----BEGIN USER NKEY SEED-----\n")[1].split()[0]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({}, None),
        ({"PARLEY_NATS_CREDS": "missing"}, "PARLEY_NATS_CREDS: {missing} does not exist"),
        ({"PARLEY_NATS_CREDS": "folder"}, "PARLEY_NATS_CREDS: {folder} cannot be read"),
        ({"PARLEY_NATS_CREDS": "ca"}, "{ca} is not a NATS credentials file"),
        (
            {"PARLEY_NATS_TLS_CA": "server_key"},
            "PARLEY_NATS_TLS_CA: {key} holds no PEM certificate",
        ),
        ({"PARLEY_NATS_TLS_KEY": "server_key"}, "PARLEY_NATS_TLS_KEY is not the private key"),
        ({"PARLEY_NATS_TLS_KEY": None}, "PARLEY_NATS_TLS_CERT and PARLEY_NATS_TLS_KEY go together"),
        ({"PARLEY_NATS_NKEY": "ca"}, "PARLEY_NATS_CREDS and PARLEY_NATS_NKEY are two ways"),
    ],
)
def test_files_that_cannot_work_are_named_before_any_connection(
    pki: Pki, operator: Operator, tmp_path: Path, change: dict[str, str | None], says: str | None
) -> None:
    settings = changed(pki, operator, tmp_path, change)
    security = settings_from_env(
        {name: str(value) for name, value in settings.items()}, tmp_path
    ).nats_security
    problem = security_problem(security)
    if says is None:
        assert problem is None
        return
    files = {
        "missing": tmp_path / "nowhere.creds",
        "folder": tmp_path,
        "ca": pki.ca,
        "key": pki.server_key,
    }
    assert problem is not None and says.format(**files) in problem, problem
    assert seed_of(operator.creds) not in problem


def test_a_seed_file_that_holds_no_seed_is_named(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("SUnot-a-seed\n")
    problem = security_problem(NatsSecurity(nkey=str(seed)))
    assert problem is not None and "does not hold a user's NKey seed" in problem
    assert "not-a-seed" not in problem


async def test_a_tls_url_never_sends_credentials_to_a_server_without_tls(stack: Servers) -> None:
    """nats.py connects to a tls:// URL in the clear when the server offers no TLS, and
    sends the URL's password with its CONNECT: a server that lost its `tls` block, or
    anyone in between who drops `tls_required` from its INFO, would read it."""
    plain = stack.nats_url.replace("nats://", "tls://parley:a-password@", 1)
    done = await asyncio.to_thread(run, *ROLE, env=secured_env(stack, plain), timeout=30)
    assert_refused(done, "the NATS server offers no TLS")
    assert "a-password" not in done.stderr


async def test_an_nkey_seed_signs_in_and_a_wrong_one_is_refused(
    stack: Servers, nkey_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, seed = nkey_server
    nc = await nats.connect(url, nkeys_seed=str(seed))
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    env = secured_env(stack, url, PARLEY_NATS_NKEY=seed)
    done = await asyncio.to_thread(run, "replay", UNKNOWN, env=env)
    assert done.returncode == 1, done  # connected: the log has no such conversation
    assert "no events for conversation" in done.stderr, done.stderr

    other = tmp_path / "other.nk"
    other.write_bytes(new_keys(nkeys.PREFIX_BYTE_USER).seed)
    env = secured_env(stack, url, PARLEY_NATS_NKEY=other)
    done = await asyncio.to_thread(run, "replay", UNKNOWN, env=env, timeout=30)
    assert_refused(done, "NATS refused the NKey of PARLEY_NATS_NKEY")
    assert other.read_text() not in done.stderr


def test_settings_for_nats_without_its_url_are_refused(tmp_path: Path) -> None:
    env = clean_env(PARLEY_NATS_CREDS=str(tmp_path / "a.creds"))
    done = run("replay", UNKNOWN, "--data", str(tmp_path), env=env)
    assert_refused(done, "apply to the servers of PARLEY_NATS_URL")


def _secured_config(operator: Operator, pki: Pki, port: int, folder: Path, *, cert: Path) -> Path:
    """operator_config, with `cert` (and its key) as the server's certificate."""
    key = pki.stranger_key if cert == pki.stranger_cert else pki.server_key
    text = operator_config(operator, pki, port, folder / "js")
    config = folder / "nats.conf"
    config.write_text(
        text.replace(str(pki.server_cert), str(cert)).replace(str(pki.server_key), str(key))
    )
    return config


async def test_a_connection_whose_node_returns_with_a_certificate_it_refuses_still_closes(
    pki: Pki, operator: Operator, tmp_path: Path
) -> None:
    """After a TLS handshake failed (a node back with a certificate of another CA, or
    restarting in the middle of one) nats.py's close waited for ever on the socket
    the failed handshake had closed: a role stopped then, or a command whose server
    went away under it, never ended."""
    port = free_ports(1)[0]
    security = NatsSecurity(
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        creds=str(operator.creds),
    )
    failures: asyncio.Queue[tuple[int, str, dict[str, str]]] = asyncio.Queue()

    def report(level: int, message: str, fields: dict[str, str]) -> None:
        if "CERTIFICATE_VERIFY_FAILED" in fields.get("error", ""):
            failures.put_nowait((level, message, fields))

    config = _secured_config(operator, pki, port, tmp_path, cert=pki.server_cert)
    async with _nats_server(config, port):
        nc = await broker.connect(
            f"tls://127.0.0.1:{port}", name="t", report=report, security=security
        )
    config = _secured_config(operator, pki, port, tmp_path, cert=pki.stranger_cert)
    async with _nats_server(config, port):
        # it is back, and refused: said at once, at warning level, with what to do
        # (it was said only at debug level, attempt after attempt, for ever)
        level, message, fields = await asyncio.wait_for(failures.get(), 30)
        await asyncio.wait_for(nc.close(), 5)
        assert nc.is_closed
    assert (level, message) == (logging.WARNING, "NATS still not reachable; still trying")
    assert "did not verify against PARLEY_NATS_TLS_CA" in fields["reason"], fields


@contextlib.asynccontextmanager
async def _nats_server(config: Path, port: int) -> AsyncIterator[None]:
    from tests.test_start import NATS_SERVER, listening

    server = await asyncio.create_subprocess_exec(
        str(NATS_SERVER), "-c", str(config), stderr=subprocess.DEVNULL
    )
    try:
        await listening(port)
        yield
    finally:
        server.terminate()
        await server.wait()
