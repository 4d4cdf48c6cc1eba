"""Tokens on the live edge: what is refused (401), what an identity provider's token
gets, and what an admin token may not do."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import multidict
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.auth import REMEMBER_S, InvalidToken, Verifier, mint
from parley.services import Servers, Services
from tests.conftest import SECRET, extra_edge, token_for
from tests.sse import SseClient

ISSUER = "https://idp.example.test/"
AUDIENCE = "parley-api"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_signed(key: bytes, claims: dict[str, Any], *, alg: str = "HS256", **header: Any) -> str:
    """Signed by hand: PyJWT itself refuses to make some of the tokens an attacker would."""
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    head = _b64(json.dumps({"alg": alg, "typ": "JWT", **header}).encode())
    signing_input = f"{head}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned(claims: dict[str, Any]) -> str:
    """`alg: none`: a token that claims to need no signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


async def status_with(http: aiohttp.ClientSession, base: str, token: str) -> tuple[int, Any]:
    async with http.get(
        base + "/v1/conversations", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.json()


def assert_401(status: int, body: Any, token: str) -> None:
    assert status == 401, (status, body)
    assert body["error"]["code"] == "unauthorized", body
    assert token not in json.dumps(body), "an error must not echo the token"


def hs256_cases() -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": mint(SECRET, "alice", ttl_s=-3600),
        "forged": mint("not-the-server-secret-" + "y" * 30, "alice"),
        "alg-none": unsigned({"sub": "alice", "exp": now + 3600}),
        "no-exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "no-sub": jwt.encode({"exp": now + 3600}, SECRET, algorithm="HS256"),
        "sub-not-an-id": jwt.encode({"sub": "a|b", "exp": now + 3600}, SECRET, algorithm="HS256"),
        "hs512": hmac_signed(SECRET.encode(), {"sub": "alice", "exp": now + 3600}, alg="HS512"),
        "tampered": mint(SECRET, "alice")[:-4] + "AAAA",
    }


@pytest.mark.parametrize("case", sorted(hs256_cases()))
async def test_expired_forged_unsigned_and_incomplete_tokens_are_401(
    services: Services, http: aiohttp.ClientSession, case: str
) -> None:
    token = hs256_cases()[case]
    status, body = await status_with(http, services.edge_url, token)
    assert_401(status, body, token)


async def test_a_token_of_the_shared_secret_is_accepted(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    status, body = await status_with(http, services.edge_url, token_for(user))
    assert status == 200 and body == {"conversations": [], "next": None}, body


# ---------------------------------------------------------------- an identity provider


class IdentityProvider:
    """Keys of a team's identity provider, and the JWKS document it publishes."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.requests = 0

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
            ]
        }

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response(self.jwks())

    def token(self, sub: str, *, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
        key: Any = self.rsa if alg.startswith("RS") else self.ec
        payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
        payload.update(claims)
        default_kid = "rsa-1" if alg.startswith("RS") else "ec-1"
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid or default_kid})


@pytest.fixture(scope="module")
async def idp() -> AsyncIterator[tuple[IdentityProvider, str]]:
    provider = IdentityProvider()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", provider.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield provider, str(server.make_url("/.well-known/jwks.json"))
    await server.close()


@pytest.fixture(scope="module")
async def idp_edge(
    stack: Servers, idp: tuple[IdentityProvider, str], services: Services
) -> AsyncIterator[str]:
    async with extra_edge(stack, jwks_url=idp[1], jwt_issuer=ISSUER, jwt_audience=AUDIENCE) as base:
        yield base


async def test_rs256_and_es256_tokens_from_the_identity_providers_jwks_are_accepted(
    idp: tuple[IdentityProvider, str], idp_edge: str, http: aiohttp.ClientSession, user: str
) -> None:
    provider, _ = idp
    for alg in ("RS256", "ES256"):
        token = provider.token(user, alg=alg)
        status, body = await status_with(http, idp_edge, token)
        assert status == 200, (alg, status, body)
    # and they act as that user: a conversation made with one is theirs under the other
    api = SseClient(http, idp_edge, provider.token(user))
    created = await api.create_conversation()
    other = SseClient(http, idp_edge, token_for(user))
    status, body = await other.request("GET", f"/v1/conversations/{created['id']}")
    assert status == 200 and body["user_id"] == user, body


async def test_identity_provider_tokens_with_a_wrong_audience_issuer_key_or_age_are_401(
    idp: tuple[IdentityProvider, str], idp_edge: str, http: aiohttp.ClientSession, user: str
) -> None:
    provider, _ = idp
    impostor = IdentityProvider()
    public_pem = provider.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = {
        "wrong audience": provider.token(user, aud="someone-else"),
        "wrong issuer": provider.token(user, iss="https://evil.example.test/"),
        "expired": provider.token(user, exp=int(time.time()) - 3600),
        "no audience": jwt.encode(
            {"sub": user, "iss": ISSUER, "exp": int(time.time()) + 600},
            provider.rsa,
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
        "unknown key": provider.token(user, kid="rsa-unknown"),
        "signed by another key": impostor.token(user),
        # algorithm confusion: HS256 "signed" with the provider's public key
        "hs256 with the public key": hmac_signed(
            public_pem,
            {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600},
            kid="rsa-1",
        ),
        "alg none": unsigned(
            {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
        ),
    }
    for name, token in cases.items():
        status, body = await status_with(http, idp_edge, token)
        assert status == 401, (name, status, body)
        assert_401(status, body, token)


async def test_unknown_key_ids_do_not_make_the_edge_refetch_the_jwks_each_time(
    idp: tuple[IdentityProvider, str], idp_edge: str, http: aiohttp.ClientSession, user: str
) -> None:
    provider, _ = idp
    status, _ = await status_with(http, idp_edge, provider.token(user))  # keys fetched
    assert status == 200
    before = provider.requests
    for i in range(20):
        status, _ = await status_with(http, idp_edge, provider.token(user, kid=f"nope-{i}"))
        assert status == 401
    assert provider.requests - before <= 1, provider.requests - before


# ---------------------------------------------------------------- what an admin may not do


async def test_an_admin_token_cannot_read_or_write_another_users_conversation(
    api: SseClient, http: aiohttp.ClientSession, services: Services
) -> None:
    cid = (await api.create_conversation())["id"]
    await api.send_stream(cid, "private [[tokens=2]]")
    admin = SseClient(http, services.edge_url, token_for("admin", admin=True))
    for method, path in [
        ("GET", f"/v1/conversations/{cid}"),
        ("GET", f"/v1/conversations/{cid}/messages"),
        ("GET", f"/v1/conversations/{cid}/log"),
        ("GET", f"/v1/conversations/{cid}/events?after=0"),
        ("POST", f"/v1/conversations/{cid}/messages"),
    ]:
        kwargs: dict[str, Any] = {"json": {"content": "hi"}} if method == "POST" else {}
        status, body = await admin.request(method, path, **kwargs)
        assert status == 404 and body["error"]["code"] == "not_found", (path, status, body)
    status, listed = await admin.request("GET", "/v1/conversations")
    assert status == 200 and cid not in {c["id"] for c in listed["conversations"]}


async def test_only_the_json_value_true_in_an_operators_token_makes_an_admin(
    idp: tuple[IdentityProvider, str],
    idp_edge: str,
    http: aiohttp.ClientSession,
    services: Services,
    user: str,
) -> None:
    """ "true", "1" and 1 are not true; and an identity provider's token is never an
    admin's (where its users can set claims, one could name itself admin)."""
    provider, _ = idp
    now = int(time.time())

    async def grant(base: str, token: str) -> int:
        async with http.post(
            f"{base}/v1/billing/accounts/user/{user}/credits",
            json={"micro_credits": 1},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            return response.status

    for adm in ("true", "True", "1", 1):
        token = hmac_signed(SECRET.encode(), {"sub": "admin", "exp": now + 600, "adm": adm})
        assert await grant(services.edge_url, token) == 403, adm
    assert await grant(services.edge_url, token_for("admin", admin=True)) == 201
    assert await grant(idp_edge, provider.token("admin", adm=True)) == 403


async def test_numeric_dates_are_read_as_json_gives_them(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    """RFC 7519 lets a NumericDate have a fraction; a number in a string is no date."""
    now = time.time()
    fraction = hmac_signed(SECRET.encode(), {"sub": user, "exp": now + 600.5, "iat": now - 0.5})
    status, body = await status_with(http, services.edge_url, fraction)
    assert status == 200, body
    text = hmac_signed(SECRET.encode(), {"sub": user, "exp": str(int(now) + 600)})
    status, body = await status_with(http, services.edge_url, text)
    assert_401(status, body, text)


async def test_a_refused_token_is_told_why_in_words_and_no_version_is_named(
    services: Services, http: aiohttp.ClientSession, user: str
) -> None:
    early = hmac_signed(
        SECRET.encode(), {"sub": user, "exp": time.time() + 7200, "nbf": time.time() + 3600}
    )
    async with http.get(
        f"{services.edge_url}/v1/conversations", headers={"Authorization": f"Bearer {early}"}
    ) as response:
        body = await response.json()
        server = response.headers.get("Server", "")
    assert response.status == 401 and "not valid yet" in body["error"]["message"], body
    assert "Error" not in body["error"]["message"], body  # no exception class of a library
    assert "aiohttp" not in server and "Python" not in server, server


async def test_two_authorization_headers_are_refused_not_one_picked(
    services: Services, user: str
) -> None:
    """A proxy's header and a client's: which one counts would be a guess."""
    async with aiohttp.ClientSession() as http:
        headers = multidict.CIMultiDict(
            [("Authorization", f"Bearer {token_for(user)}"), ("Authorization", "Bearer x")]
        )
        async with http.get(f"{services.edge_url}/v1/conversations", headers=headers) as response:
            body = await response.json()
    assert response.status == 400 and "more than one Authorization" in body["error"]["message"]


# ---------------------------------------------------------------- remembered tokens


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_token_that_passed_is_remembered_for_a_minute_and_never_past_its_expiry() -> None:
    clock = Clock()
    verifier = Verifier(secret=SECRET, clock=clock)
    token = mint(SECRET, "alice")
    first = await verifier.verify(token)
    assert await verifier.verify(token) == first and verifier.checks == 1
    clock.now += REMEMBER_S + 1
    assert await verifier.verify(token) == first and verifier.checks == 2  # checked again

    # a token that expires sooner is remembered only until then
    clock.now = time.time()
    soon = mint(SECRET, "bob", ttl_s=5, now=clock.now)
    await verifier.verify(soon)
    await verifier.verify(soon)
    assert verifier.checks == 3
    clock.now += 6
    await verifier.verify(soon)  # checked again (PyJWT's clock, with its leeway, admits it)
    assert verifier.checks == 4


async def test_only_tokens_that_passed_are_remembered_and_only_by_their_exact_text() -> None:
    verifier = Verifier(secret=SECRET)
    genuine = mint(SECRET, "alice")
    await verifier.verify(genuine)
    for token in (genuine[:-4] + "AAAA", mint("not-the-server-secret-" + "y" * 30, "alice")):
        for _ in range(2):  # refused, and refused again: a failure is never kept
            with pytest.raises(InvalidToken):
                await verifier.verify(token)
    assert verifier.remembered == 1 and verifier.checks == 5


async def test_the_remembered_tokens_are_bounded_the_least_recently_used_go_first() -> None:
    verifier = Verifier(secret=SECRET, max_remembered=3)
    tokens = [mint(SECRET, f"user-{n}") for n in range(4)]
    for token in tokens[:3]:
        await verifier.verify(token)
    await verifier.verify(tokens[0])  # used again: now the most recent
    await verifier.verify(tokens[3])  # the fourth pushes out the least recent, tokens[1]
    assert verifier.remembered == 3 and verifier.checks == 4
    await verifier.verify(tokens[0])
    await verifier.verify(tokens[2])
    assert verifier.checks == 4
    await verifier.verify(tokens[1])
    assert verifier.checks == 5
