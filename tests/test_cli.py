"""The `parley` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import jwt
import nats
import pytest
from nats.aio.client import Client as NatsClient

from events.codec import Unreadable
from events.log import EventLog
from events.subjects import EVT_STREAM, event_subject
from events.vocabulary import AnyEvent, event_type
from parley.services import Servers
from tests.sse import SseClient

PARLEY = [sys.executable, "-m", "parley.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update(extra)
    return env


def server_env(stack: Servers) -> dict[str, str]:
    return clean_env(
        PARLEY_NATS_URL=stack.nats_url,
        PARLEY_DATABASE_URL=stack.database_url,
        PARLEY_REDIS_URL=stack.redis_url,
    )


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PARLEY, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def claims_of(secret: str, token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, secret, algorithms=["HS256"])
    return decoded


def test_token_without_a_secret_or_a_running_dev_fails_clearly_and_writes_nothing(
    tmp_path: Path,
) -> None:
    done = run("--data", str(tmp_path), "token", "--user", "bob", env=clean_env())
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert "PARLEY_JWT_SECRET" in done.stderr and "parley dev" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == [], "no secret may be invented where the command stood"


def test_token_signs_with_the_secret_of_the_dev_running_on_the_data_folder(
    tmp_path: Path,
) -> None:
    # What a running `parley dev` keeps in its folder: its secret, and a record naming
    # its process (here this test's own, which is alive). The whole dev is exercised in
    # test_dev_runs_everything_...; this checks the rule on its own.
    secret = "d" * 48
    (tmp_path / "jwt_secret").write_text(secret)
    record = {"edge_url": "http://127.0.0.1:1", "model_base_url": "", "pid": os.getpid()}
    (tmp_path / "run.json").write_text(json.dumps(record))
    done = run("--data", str(tmp_path), "token", "--user", "bob", env=clean_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    claims = claims_of(secret, lines[0])
    assert claims["sub"] == "bob" and not claims["adm"]
    admin = run("--data", str(tmp_path), "token", "--user", "root", "--admin", env=clean_env())
    assert claims_of(secret, admin.stdout.strip())["adm"] is True

    # the same folder once that dev has stopped (its record outlived it): refused
    finished = subprocess.Popen(["true"])
    finished.wait()
    (tmp_path / "run.json").write_text(json.dumps({**record, "pid": finished.pid}))
    stale = run("--data", str(tmp_path), "token", "--user", "bob", env=clean_env())
    assert stale.returncode == 2 and "no `parley dev` running" in stale.stderr, stale.stderr


def test_serve_refuses_to_start_without_a_token_secret_or_jwks(stack: Servers) -> None:
    env = server_env(stack)
    env["PARLEY_MODEL_BASE_URL"] = "http://127.0.0.1:1/v1"
    done = run("serve", "--role", "edge", "--port", "0", env=env)
    assert done.returncode == 2, done
    assert "PARLEY_JWT_SECRET" in done.stderr and "PARLEY_JWT_JWKS_URL" in done.stderr
    short = run("serve", env={**env, "PARLEY_JWT_SECRET": "short"})
    assert short.returncode == 2 and "at least 32 characters" in short.stderr, short.stderr
    half = run("serve", env={**env, "PARLEY_JWT_JWKS_URL": "http://127.0.0.1:1/jwks"})
    assert half.returncode == 2 and "PARLEY_JWT_ISSUER" in half.stderr, half.stderr


def test_serve_asks_for_the_model_endpoint_only_where_a_worker_runs(stack: Servers) -> None:
    env = {**server_env(stack), "PARLEY_JWT_SECRET": "s" * 40}
    for role in ("worker", "all"):
        refused = run("serve", "--role", role, env=env)
        assert refused.returncode == 2, refused
        assert "PARLEY_MODEL_BASE_URL" in refused.stderr and "Traceback" not in refused.stderr
    # an edge calls no model: it starts and serves without one
    with (
        serving("edge", env, ready="edge listening at") as (url, _),
        urllib.request.urlopen(url + "/healthz", timeout=10) as answer,
    ):
        assert answer.status == 200


@contextlib.contextmanager
def serving(role: str, env: dict[str, str], *, ready: str) -> Iterator[tuple[str, list[str]]]:
    """`parley serve --role ROLE` until its log says `ready` (or it stops with a
    `parley:` line): its edge's URL and the lines it wrote; stopped with SIGTERM."""
    process = subprocess.Popen(
        [*PARLEY, "serve", "--role", role, "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, process.kill)  # a start that hangs ends the read below
    watchdog.start()
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if ready in line or "parley:" in line:
                break
        assert lines and ready in lines[-1], "".join(lines)
        url = next(x for x in lines if "edge listening at" in x).split(" at ", 1)[1].strip()
        # Read on: a pipe no one reads fills (64 KiB), and the process's next log line
        # then blocks its event loop for ever. On the session's servers, where earlier
        # tests left turns for a new worker to recover, that held its stop past 30 s.
        reading = threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True)
        reading.start()
        yield url, lines
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError("did not stop within 30 s:\n" + "".join(lines[-40:])) from None


def test_token_uses_parley_jwt_secret_when_set(tmp_path: Path) -> None:
    done = run(
        "--data",
        str(tmp_path),
        "token",
        "--user",
        "eve",
        env=clean_env(PARLEY_JWT_SECRET="s3cr3t" * 8),
    )
    assert claims_of("s3cr3t" * 8, done.stdout.strip())["sub"] == "eve"
    assert not (tmp_path / "jwt_secret").exists()


def test_token_refuses_a_user_id_that_is_not_an_id(tmp_path: Path) -> None:
    done = run("--data", str(tmp_path), "token", "--user", "a b", env=clean_env())
    assert done.returncode == 2 and "--user" in done.stderr and done.stdout == ""


async def test_replay_prints_the_log_in_order_readable_and_as_json(
    api: SseClient, stack: Servers, event_log: EventLog
) -> None:
    conversation = await api.create_conversation()
    cid = conversation["id"]
    await api.send_stream(cid, "calculate 2*21")
    log = await event_log.read(cid)

    readable = await asyncio.to_thread(run, "replay", cid, env=server_env(stack))
    assert readable.returncode == 0, readable.stderr
    assert "no longer holds" not in readable.stderr
    lines = readable.stdout.splitlines()
    assert len(lines) == len(log)
    for line, stored in zip(lines, log, strict=True):
        seq, _time, kind = line.split()[:3]
        assert int(seq) == stored.seq and kind == _kind(stored.event)

    as_json = await asyncio.to_thread(run, "replay", cid, "--json", env=server_env(stack))
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [s.seq for s in log]
    assert [r["type"] for r in rows] == [_kind(s.event) for s in log]
    assert rows[0]["type"] == "conversation_created" and rows[-1]["type"] == "done"


async def test_replay_of_a_conversation_whose_start_was_removed_says_so(
    api: SseClient, stack: Servers, nc: NatsClient, event_log: EventLog
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "hello [[tokens=3]]")
    await api.send_stream(cid, "again [[tokens=3]]")
    log = await event_log.read(cid)
    second = [s.seq for s in log if _kind(s.event) == "user_message"][1]
    # what a retention limit does to its start: a purge of the subject below a position
    purge = {"filter": event_subject(cid), "seq": second}
    answer = await nc.request(f"$JS.API.STREAM.PURGE.{EVT_STREAM}", json.dumps(purge).encode())
    assert json.loads(answer.data)["success"], answer.data

    done = await asyncio.to_thread(run, "replay", cid, env=server_env(stack))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) == second
    assert f"its oldest kept event is {second}" in done.stderr, done.stderr


async def test_replay_of_an_unknown_conversation_says_so(stack: Servers) -> None:
    done = await asyncio.to_thread(
        run, "replay", "01NOSUCHCONVERSATION00000", env=server_env(stack)
    )
    assert done.returncode == 1 and "no events" in done.stderr
    bad = await asyncio.to_thread(run, "replay", "not/an/id", env=server_env(stack))
    assert bad.returncode == 2 and "not a conversation id" in bad.stderr


def test_commands_without_servers_or_a_running_dev_stack_explain_what_to_do(tmp_path: Path) -> None:
    done = run("--data", str(tmp_path), "replay", "01ABC", env=clean_env())
    assert done.returncode == 2
    assert "PARLEY_NATS_URL" in done.stderr and "parley dev" in done.stderr
    partial = run(
        "--data", str(tmp_path), "replay", "01ABC", env=clean_env(PARLEY_NATS_URL="nats://x:1")
    )
    assert partial.returncode == 2 and "PARLEY_DATABASE_URL" in partial.stderr


DEAD = {
    "PARLEY_NATS_URL": "nats://127.0.0.1:1",
    "PARLEY_DATABASE_URL": "postgresql://u:p@127.0.0.1:2/db",
    "PARLEY_REDIS_URL": "redis://127.0.0.1:3/0",
}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["replay", "01ABC"], "cannot reach NATS"),
        (["projections", "rebuild"], "cannot reach NATS"),
        (["audit", "billing"], "cannot reach NATS"),
        (["projections", "errors"], "Postgres (PARLEY_DATABASE_URL) did not answer"),
    ],
)
async def test_a_command_whose_servers_are_away_says_so_in_one_line_within_seconds(
    args: list[str], says: str
) -> None:
    done = await asyncio.to_thread(run, *args, env=clean_env(**DEAD), timeout=30)
    assert done.returncode == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


async def test_a_database_url_naming_another_server_says_it_is_not_postgres(
    stack: Servers,
) -> None:
    # the port of another server (here NATS, which greets every connection first):
    # with the default sslmode=prefer, Postgres without SSL is fine, so this is no
    # Postgres at all, and turning SSL on in a server would not mend it
    nats = urlsplit(stack.nats_url)
    env = {
        **server_env(stack),
        "PARLEY_DATABASE_URL": f"postgresql://u:p@{nats.hostname}:{nats.port}/db",
    }
    done = await asyncio.to_thread(run, "projections", "errors", env=env, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "is not Postgres" in done.stderr and "check the host and port" in done.stderr
    assert "ssl = on" not in done.stderr, done.stderr


async def test_a_postgres_that_takes_the_connection_and_never_answers_is_given_up_on(
    stack: Servers,
) -> None:
    # Redis takes the connection and waits for a line that Postgres's first message
    # never ends: a Postgres that accepts and does not answer, as a frozen one does
    redis = urlsplit(stack.redis_url)
    env = {
        **server_env(stack),
        "PARLEY_DATABASE_URL": f"postgresql://u:p@{redis.hostname}:{redis.port}/db",
    }
    started = time.monotonic()
    done = await asyncio.to_thread(run, "projections", "errors", env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "Postgres (PARLEY_DATABASE_URL) did not answer" in done.stderr, done.stderr
    assert time.monotonic() - started < 20


def test_a_role_waiting_for_nats_that_is_not_there_says_so(tmp_path: Path) -> None:
    """Roles wait for the broker for ever, by design; an operator sees that they do."""
    env = clean_env(**DEAD, PARLEY_JWT_SECRET="a-secret-of-at-least-32-characters-here")
    role = subprocess.Popen(
        [*PARLEY, "--data", str(tmp_path), "serve", "--role", "edge", "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    give_up = threading.Timer(20, role.terminate)  # then the read below ends, empty
    give_up.start()
    try:
        assert role.stderr is not None
        line = role.stderr.readline()  # the first failed attempt, at once
    finally:
        give_up.cancel()
        role.terminate()
        role.wait(10)
    assert "NATS not reachable yet; still trying" in line, line


def signalled_while_starting(
    args: list[str], env: dict[str, str], sig: signal.Signals, once: str, give_up_s: float
) -> tuple[str, str, int]:
    """Run `parley *args`, send it `sig` once its stderr has said `once`, and read the
    rest: (what it said before, what it said after, its exit code)."""
    process = subprocess.Popen(
        [*PARLEY, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    give_up = threading.Timer(give_up_s, process.kill)  # then the reads below end
    give_up.start()
    try:
        assert process.stderr is not None
        before = ""
        while line := process.stderr.readline():
            before += line
            if once in line:
                break
        process.send_signal(sig)
        said = process.stderr.read()
        code = process.wait(30)
    finally:
        give_up.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    return before, said, code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_role_stopped_while_it_waits_for_nats_at_start_says_so_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A role waits at start for a broker that is away (above); a deploy's SIGTERM
    or a Ctrl-C then ended it at once, 143 or 130, without a word, where a stop
    after the start says what it does and exits 0."""
    env = clean_env(**DEAD, PARLEY_MODEL_BASE_URL="http://127.0.0.1:9/v1")
    waiting, said, code = signalled_while_starting(
        ["--data", str(tmp_path), "serve", "--role", "worker"],
        env,
        sig,
        once="NATS not reachable yet; still trying",  # the first failed attempt, at once
        give_up_s=30,
    )
    assert "NATS not reachable yet; still trying" in waiting, waiting
    assert code == 0, said
    assert said.count("stopped while starting") == 1, said
    assert "waiting_for=NATS (parley-roles)" in said, said
    assert "Traceback" not in said, said


def test_dev_stopped_while_its_servers_start_says_so_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM while `parley dev` makes its Postgres cluster (a second or so, the
    first time on a data folder) killed it where it stood, 143 and no word; Ctrl-C
    raised out of the start, 130 and no word either."""
    before, said, code = signalled_while_starting(
        ["--data", str(tmp_path / "data"), "dev", "--port", "0"],
        clean_env(),
        signal.SIGTERM,
        once="initializing a new Postgres cluster",
        give_up_s=60,
    )
    assert code == 0, before + said
    assert said.count("stopped while starting") == 1, said
    assert "waiting_for=the embedded servers" in said, said


async def test_a_read_only_command_on_a_schema_that_is_not_there_does_not_make_it(
    stack: Servers,
    event_log: EventLog,  # the log exists: the command gets as far as the schema
) -> None:
    env = {**server_env(stack), "PARLEY_DB_SCHEMA": "mistyped_schema"}
    for args in (["audit", "billing"], ["projections", "errors"]):
        done = await asyncio.to_thread(run, *args, env=env)
        assert done.returncode == 2 and "no read models" in done.stderr, done.stderr
    conn = await asyncpg.connect(stack.database_url)
    try:
        made = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'mistyped_schema'"
        )
    finally:
        await conn.close()
    assert made == 0


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["dev", "--port", "99999"], {}, "a port is 0-65535"),
        (["projections", "errors", "--limit", "-1"], {}, "at least 1"),
        (["audit", "billing", "--since", ""], {}, "--since"),
        (["audit", "billing", "--project", "garbage!!"], {}, "--project must be"),
        (["replay", "01ABC"], {"PARLEY_DB_SCHEMA": "x;drop"}, "PARLEY_DB_SCHEMA"),
    ],
)
def test_arguments_and_settings_that_cannot_work_are_refused_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    done = run("--data", str(tmp_path), *args, env=clean_env(**DEAD, **env), timeout=30)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_data_folder_that_is_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    done = run("--data", str(not_a_folder), "token", "--user", "u", env=clean_env())
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert str(not_a_folder) in done.stderr


# ---------------------------------------------------------------- parley dev


class Dev:
    """`parley dev` in a subprocess: its URL and admin token read from what it prints."""

    def __init__(self, data: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*PARLEY, "--data", str(data), "dev", "--port", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = ""
        self.token = ""
        self.output: list[str] = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("parley is running at "):
                self.url = line.split()[4]
            elif self.output[-2:-1] == ["admin token:\n"]:
                self.token = line.strip()
                return
        self.proc.kill()
        raise AssertionError("parley dev did not come up:\n" + "".join(self.output))

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code


@pytest.fixture
def dev_data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_dev_runs_everything_replay_reads_it_and_a_restart_keeps_the_data(
    dev_data: Path, http: aiohttp.ClientSession
) -> None:
    dev = await asyncio.to_thread(Dev, dev_data, clean_env())
    try:
        stack_record = json.loads((dev_data / "stack.json").read_text())
        pids = [server["pid"] for server in stack_record["servers"].values()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        api = SseClient(http, dev.url, dev.token)
        conversation = await api.create_conversation()
        events = await api.send_stream(conversation["id"], "hello from the dev stack")
        assert events[-1].event == "done" and events[-1].data == "ok"
        # replay finds the running dev stack through the data folder alone
        replayed = await asyncio.to_thread(
            run, "--data", str(dev_data), "replay", conversation["id"], env=clean_env()
        )
        assert replayed.returncode == 0, replayed.stderr
        assert "conversation_created" in replayed.stdout and "done" in replayed.stdout
        # `parley token` finds the running dev's secret: the server takes its token
        minted = await asyncio.to_thread(
            run, "--data", str(dev_data), "token", "--user", "carol", env=clean_env()
        )
        assert minted.returncode == 0, minted.stderr
        carol = SseClient(http, dev.url, minted.stdout.strip())
        status, listed = await carol.request("GET", "/v1/conversations")
        assert status == 200 and listed == {"conversations": [], "next": None}, (status, listed)
        # poison in the log (what a newer version or a damaged disk could leave):
        # the running stack must go on, and so must every later start on this folder
        poisoned = await api.create_conversation()
        await _poison(stack_record["urls"]["nats_url"], poisoned["id"])
        after = await api.send_stream(conversation["id"], "still alive? [[tokens=3]]")
        assert after[-1].data == "ok", after
    finally:
        code = await asyncio.to_thread(dev.stop, signal.SIGTERM)
    assert code == 0, "".join(dev.output)
    async with asyncio.timeout(10):
        while True:  # the servers exit on their own after the signal
            if not any(_alive(p) for p in pids):
                break
            await asyncio.sleep(0.1)
    assert not (dev_data / "stack.json").exists()

    again = await asyncio.to_thread(Dev, dev_data, clean_env())
    try:
        api = SseClient(http, again.url, again.token)
        async with asyncio.timeout(10):
            while True:  # the restarted projector may still be catching up
                status, body = await api.request("GET", f"/v1/conversations/{conversation['id']}")
                assert status == 200, body
                if body["message_count"] == 4:
                    break
                await asyncio.sleep(0.05)
        assert body["title"] == "hello from the dev stack", body
        async with http.get(again.url + "/readyz") as response:
            ready = await response.json()
        # each projection records what it could not apply: the read models all four,
        # the billing projection the three entries it cannot even decode
        assert response.status == 200 and ready["projection_errors"] == 7, ready
        listed = await asyncio.to_thread(
            run, "--data", str(dev_data), "projections", "errors", env=clean_env()
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("skipped") == 6 and listed.stdout.count("sanitised") == 1, (
            listed.stdout
        )
        assert "conversation=?" not in listed.stdout, listed.stdout  # named by their subject
        latest = await asyncio.to_thread(
            run, "--data", str(dev_data), "projections", "errors", "--limit", "2", env=clean_env()
        )
        lines = listed.stdout.strip().splitlines()
        assert latest.stdout.strip().splitlines()[-2:] == lines[-2:], latest.stdout
        fresh = await api.create_conversation()
        events = await api.send_stream(fresh["id"], "and after a restart? [[tokens=3]]")
        assert events[-1].data == "ok", events
    finally:
        code = await asyncio.to_thread(again.stop, signal.SIGINT)
    assert code == 0, "".join(again.output)


async def test_dev_uses_the_servers_named_in_the_environment(
    dev_data: Path, stack: Servers, http: aiohttp.ClientSession
) -> None:
    env = server_env(stack)
    env["PARLEY_DB_SCHEMA"] = "dev_env_test"
    dev = await asyncio.to_thread(Dev, dev_data, env)
    try:
        assert not (dev_data / "stack.json").exists(), "no embedded stack when URLs are set"
        api = SseClient(http, dev.url, dev.token)
        conversation = await api.create_conversation()
        events = await api.send_stream(conversation["id"], "hello [[tokens=3]]")
        assert events[-1].data == "ok"
    finally:
        code = await asyncio.to_thread(dev.stop, signal.SIGTERM)
    assert code == 0, "".join(dev.output)


async def _poison(nats_url: str, conversation_id: str) -> None:
    """Publish straight to the log what the edge would refuse and this version cannot read."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subject = f"chat.evt.{conversation_id}"
        base = {"conversation_id": conversation_id, "at": time.time_ns()}
        for payload in (
            {
                **base,
                "type": "title",
                "event_id": "p1",
                "title": "nul \u0000 here",
                "source": "user",
            },
            {**base, "type": "done", "event_id": "p2", "turn_id": 7, "content": "?"},
            {**base, "type": "reaction", "event_id": "p3", "emoji": "+1"},
        ):
            await js.publish(subject, json.dumps(payload).encode(), stream="CHAT_EVT")
        await js.publish(subject, b"\xff not json", stream="CHAT_EVT")
    finally:
        await nc.close()


def _kind(event: AnyEvent | Unreadable) -> str:
    assert not isinstance(event, Unreadable), f"expected a readable event, saw {event!r}"
    return event_type(event)


async def test_replay_piped_into_head_ends_quietly(api: SseClient, stack: Servers) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "plenty to print [[bulk=400000]]")  # far more than a pipe holds
    env = server_env(stack)
    command = " ".join([*PARLEY, "replay", cid]) + " | head -n 1"
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-o", "pipefail", "-c", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.count("\n") == 1 and "conversation_created" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0, (done.returncode, done.stderr)


OWN_ENDPOINT_MODELS = """
[[models]]
name = "house"
base_url = "http://127.0.0.1:1/v1"
  [[models.versions]]
  version = "2026-01"
  status = "active"
  input_price = 1.0
  output_price = 2.0
"""


def test_serve_with_models_of_their_own_endpoint_needs_no_shared_one_and_offers_no_demo(
    stack: Servers, tmp_path: Path
) -> None:
    """README: a worker needs PARLEY_MODEL_BASE_URL "unless the default model names its
    own base_url". The built-in demo entry, which names none, was always in the
    catalogue: the worker refused to start, and every edge offered `demo`."""
    models = tmp_path / "models.toml"
    models.write_text(OWN_ENDPOINT_MODELS)
    env = {
        **server_env(stack),
        "PARLEY_JWT_SECRET": "s" * 40,
        "PARLEY_MODELS_FILE": str(models),
        "PARLEY_MODEL": "house",
        "PARLEY_DB_SCHEMA": "serve_own_endpoint",
    }
    with serving("all", env, ready="roles ready") as (url, _):
        token = run("token", "--user", "u1", env=env).stdout.strip()
        request = urllib.request.Request(
            url + "/v1/models", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            names = [m["name"] for m in json.load(answer)["models"]]
    assert names == ["house"], names
